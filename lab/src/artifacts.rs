//! What `cargo xtask` built for the lab to run: the binaries, the eBPF object, cnitool,
//! Kubernetes and its nodes' container runtime. xtask passes their paths in the environment of the tests it runs;
//! its own commands set the binary directory with [`set_bin_dir`].

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{ensure, Context as _, Result};

/// Environment variable naming the directory of the built binaries.
pub const BIN_DIR_ENV: &str = "PODWIRE_BIN_DIR";
/// Environment variable naming the built eBPF object.
pub const OBJECT_ENV: &str = "PODWIRE_EBPF_OBJECT";
/// Environment variable naming the built cnitool.
pub const CNITOOL_ENV: &str = "PODWIRE_CNITOOL";
/// Environment variable naming the directory of the Kubernetes binaries.
pub const K8S_BIN_DIR_ENV: &str = "PODWIRE_K8S_BIN_DIR";
/// Environment variable naming the directory of the kubelet nodes' runtime (containerd, runc,
/// pause, the loopback CNI plugin, the images every node imports).
pub const K8S_NODE_DIR_ENV: &str = "PODWIRE_K8S_NODE_DIR";

static BIN_DIR: OnceLock<PathBuf> = OnceLock::new();

fn target() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// Makes the lab run the binaries in `dir` (a release build, say); call it before anything
/// else of the lab.
pub fn set_bin_dir(dir: &Path) {
    let _ = BIN_DIR.set(dir.to_path_buf());
}

fn bin_dir() -> &'static Path {
    BIN_DIR.get_or_init(|| {
        std::env::var_os(BIN_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| target().join("debug"))
    })
}

fn existing(path: PathBuf) -> Result<PathBuf> {
    ensure!(
        path.exists(),
        "{} not found: run this through `cargo xtask`, which builds it",
        path.display()
    );
    Ok(path)
}

/// Path of the built binary `name` (podwire-agent, podwire-cni, podwire).
pub fn bin(name: &str) -> Result<PathBuf> {
    existing(bin_dir().join(name))
}

/// The eBPF object, read into memory aligned as the ELF parser needs it (as the agent's
/// `include_bytes_aligned!` embeds it).
pub struct Object {
    words: Vec<u64>,
    len: usize,
}

impl Object {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the words hold `len` initialised bytes; u8 has no alignment requirement.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }
}

/// The eBPF object `cargo xtask` built.
pub fn object() -> Result<Object> {
    let path = std::env::var_os(OBJECT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| target().join("ebpf/bpfel-unknown-none/release/podwire"));
    let path = existing(path)?;
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    for (word, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
        let mut buf = [0u8; 8];
        buf[..chunk.len()].copy_from_slice(chunk);
        *word = u64::from_ne_bytes(buf);
    }
    Ok(Object {
        words,
        len: bytes.len(),
    })
}

/// Path of cnitool, the CNI project's reference runtime client.
pub fn cnitool() -> Result<PathBuf> {
    existing(
        std::env::var_os(CNITOOL_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| target().join("tools/cnitool")),
    )
}

/// Path of the Kubernetes binary `name`: a v1.20.2 server or node binary (kube-apiserver,
/// kube-controller-manager, kube-scheduler, kubelet, kube-proxy) or e2e.test or agnhost, which
/// `cargo xtask test` builds from Debian's source package into target/k8s/bin, or etcd 3.4 or
/// kubectl 1.20.2, which it takes out of Debian's packages into the same directory.
pub fn k8s_bin(name: &str) -> Result<PathBuf> {
    let dir = std::env::var_os(K8S_BIN_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| target().join("k8s/bin"));
    let path = dir.join(name);
    ensure!(
        path.exists(),
        "{} not found: run the tests through `cargo xtask test`, which puts Kubernetes' {name} \
         there (building the server binaries takes several minutes, once)",
        path.display()
    );
    Ok(path)
}

/// The kubelet nodes' runtime, which `cargo xtask test` puts into target/k8s/node: `bin/` holds
/// containerd 1.6.20, its runc shim, ctr, runc 1.1.5 (from Debian's packages) and pause; `cni/`
/// the loopback plugin; `images/` the sandbox image and busybox as docker archives.
pub fn k8s_node_dir() -> Result<PathBuf> {
    let dir = std::env::var_os(K8S_NODE_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| target().join("k8s/node"));
    ensure!(
        dir.join("bin/containerd").exists(),
        "{} has no containerd: run the tests through `cargo xtask test`, which puts the kubelet \
         nodes' runtime there",
        dir.display()
    );
    Ok(dir)
}

/// Environment variable naming podwire's container image, an OCI archive.
pub const IMAGE_ARCHIVE_ENV: &str = "PODWIRE_IMAGE_ARCHIVE";
/// Environment variable naming the helm binary.
pub const HELM_ENV: &str = "PODWIRE_HELM";

/// podwire's container image as an OCI archive (`localhost/podwire:<version>`), which `cargo
/// xtask test` and `cargo xtask image` build into target/image.
pub fn image_archive() -> Result<PathBuf> {
    existing(
        std::env::var_os(IMAGE_ARCHIVE_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| target().join("image/podwire.oci.tar")),
    )
}

/// helm 3, which `cargo xtask test` and `cargo xtask image` put into target/helm/bin.
pub fn helm() -> Result<PathBuf> {
    existing(
        std::env::var_os(HELM_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| target().join("helm/bin/helm")),
    )
}
