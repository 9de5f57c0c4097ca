//! A real Kubernetes v1.20.2 for the lab: the control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler), the node binaries (kubelet, kube-proxy), kubectl, and
//! upstream's e2e suite (`e2e.test`) with its test server `agnhost`, so the tests can run podwire
//! in a real cluster and hold it to the networking conformance specs. Everything lands in
//! target/k8s/bin, the directory the lab runs them from; the nodes' container runtime is
//! [`crate::k8s_node`]'s.
//!
//! etcd and kubectl 1.20.2 are Debian 12's (`etcd-server`, `kubernetes-client`), taken out of
//! their packages rather than installed: installing `etcd-server` enables an etcd service on the
//! host's loopback, and `kubernetes-client` cannot be installed next to another package that owns
//! /usr/bin/kubectl (Google's). Debian has no binary package of the server binaries: they are
//! built from its source package `kubernetes` (the whole upstream v1.20.2 tree with its vendor
//! directory, in the orig tarball) with Debian's Go 1.19, offline, once. A cold build takes about
//! five minutes on two cores; after that the check costs one `--version` per binary.
//!
//! Building the upstream tree with Go 1.19 needs GOPATH mode (module mode wants the module proxy)
//! and two repairs:
//! - the vendored github.com/modern-go/reflect2 1.0.1 reads Go runtime internals that changed
//!   in Go 1.18: with it kube-apiserver dies of SIGSEGV inside json-iterator on its first request.
//!   Debian's reflect2 1.0.2 (`golang-github-modern-go-reflect2-dev`) replaces it.
//! - pkg/generated/openapi/zz_generated.openapi.go, which upstream's Makefile generates and the
//!   tree does not hold: kube-apiserver refuses to start without the OpenAPI model of its types.
//!   The vendored openapi-gen writes it from every package tagged `+k8s:openapi-gen=`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, ensure, Context as _, Result};
use nix::fcntl::Flock;

use crate::{
    apt::{Packaged, PrivateApt},
    build::workspace_root,
    cmd::{reports, run},
    toolchain::ensure_packages,
};

/// What the lab runs from the machine next to the binaries in target/k8s/bin.
const RUN_PACKAGES: &[(&str, &str)] = &[
    (
        "iptables",
        "the rules kube-proxy and kubelet write into lab nodes",
    ),
    (
        "conntrack",
        "kube-proxy clears stale UDP flows of Services with it",
    ),
    (
        "openssl",
        "the lab control plane's service account key pair",
    ),
];

/// What building the server binaries needs.
const BUILD_PACKAGES: &[(&str, &str)] = &[
    (
        "golang-1.19-go",
        "Go 1.19, to build the Kubernetes binaries",
    ),
    (
        "golang-github-modern-go-reflect2-dev",
        "reflect2 1.0.2 for the Kubernetes build: the vendored 1.0.1 crashes under Go 1.19",
    ),
];

const VERSION: &str = "v1.20.2";
/// Debian's version of the `kubernetes` source package and of its binary packages: the upstream
/// v1.20.2 tree.
const DEBIAN_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";
const SOURCE_PACKAGE: &str = "kubernetes";

/// The source package at the version of the built binaries, as `apt-get source` takes it.
pub fn source_package() -> String {
    format!("{SOURCE_PACKAGE}={DEBIAN_VERSION}")
}
const GOROOT: &str = "/usr/lib/go-1.19";
const REFLECT2: &str = "/usr/share/gocode/src/github.com/modern-go/reflect2";
/// The tree's Go import path: GOPATH mode finds it at $GOPATH/src/k8s.io/kubernetes.
const IMPORT_PATH: &str = "k8s.io/kubernetes";
/// How a binary is made from the tree.
#[derive(Clone, Copy, PartialEq)]
enum Make {
    /// `go build` of a main package.
    Build,
    /// `go test -c` of a test package: upstream's e2e suite is one.
    TestBinary,
}

/// A binary built from the tree.
#[derive(Clone, Copy)]
struct Built {
    name: &'static str,
    /// Its package, relative to the tree.
    package: &'static str,
    make: Make,
    /// Arguments that make it print its version on stdout, and what that holds.
    version_args: &'static [&'static str],
    version: &'static str,
}

const fn server(name: &'static str, package: &'static str) -> Built {
    Built {
        name,
        package,
        make: Make::Build,
        version_args: &["--version"],
        version: "Kubernetes v1.20.2",
    }
}

/// What the lab runs from the tree: a control plane, kubelet nodes with kube-proxy, and the
/// upstream networking conformance suite with its test server image's binary.
const BUILT: &[Built] = &[
    server("kube-apiserver", "cmd/kube-apiserver"),
    server("kube-controller-manager", "cmd/kube-controller-manager"),
    server("kube-scheduler", "cmd/kube-scheduler"),
    server("kube-proxy", "cmd/kube-proxy"),
    server("kubelet", "cmd/kubelet"),
    Built {
        name: "e2e.test",
        package: "test/e2e",
        make: Make::TestBinary,
        version_args: &["--version"],
        version: "v1.20.2",
    },
    Built {
        name: "agnhost",
        package: "test/images/agnhost",
        make: Make::Build,
        version_args: &["--help"],
        version: "netexec",
    },
];

const PACKAGED: &[Packaged] = &[
    Packaged {
        name: "etcd",
        package: "etcd-server",
        pin: None,
        path: "usr/bin/etcd",
        version_args: &["--version"],
        version: "etcd Version: 3.4.",
    },
    Packaged {
        name: "kubectl",
        // The Kubernetes of the built binaries.
        package: "kubernetes-client",
        pin: Some(DEBIAN_VERSION),
        path: "usr/bin/kubectl",
        version_args: &["version", "--client", "--short"],
        version: "Client Version: v1.20.2",
    },
];

/// Returns the directory holding the Kubernetes v1.20.2 binaries ([`BUILT`]), etcd and kubectl,
/// fetching and building those that are missing; also installs the tools kube-proxy and kubelet
/// call.
pub fn ensure() -> Result<PathBuf> {
    ensure_packages(RUN_PACKAGES)?;
    let k8s = workspace_root().join("target/k8s");
    let bin = k8s.join("bin");
    // Developers sharing a checkout run `cargo xtask test` at the same time: one of them builds,
    // the others wait for it instead of removing its work directory.
    let _lock = lock(&k8s)?;
    let packaged: Vec<&Packaged> = PACKAGED.iter().filter(|p| !p.is_in(&bin)).collect();
    let built: Vec<Built> = BUILT.iter().filter(|b| !b.is_in(&bin)).copied().collect();
    if packaged.is_empty() && built.is_empty() {
        return Ok(bin);
    }
    let work = k8s.join("work");
    // An interrupted earlier run may have left its files behind.
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    let apt = PrivateApt::new(&work.join("apt"))?;
    if !packaged.is_empty() {
        let names: Vec<&str> = packaged.iter().map(|p| p.name).collect();
        eprintln!(
            "xtask: taking {} out of Debian's packages (the lab's Kubernetes runs them)",
            names.join(", ")
        );
        apt.extract(&work.join("debs"), &packaged, &bin)?;
    }
    if !built.is_empty() {
        ensure_packages(BUILD_PACKAGES)?;
        let names: Vec<&str> = built.iter().map(|b| b.name).collect();
        eprintln!(
            "xtask: building {} {VERSION} from Debian's {SOURCE_PACKAGE} source package with Go \
             1.19 (the lab's Kubernetes; several minutes, once)",
            names.join(", ")
        );
        let started = Instant::now();
        // A failed build keeps its directory for a look; the next attempt starts afresh.
        build(&apt, &work.join("build"), &built, &bin)
            .with_context(|| format!("building Kubernetes in {}", work.display()))?;
        eprintln!(
            "xtask: built {} in {} s",
            names.join(", "),
            started.elapsed().as_secs()
        );
    }
    fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    for p in PACKAGED {
        p.check(&bin)?;
    }
    for b in BUILT {
        ensure!(
            b.is_in(&bin),
            "{} was built but does not report {:?}",
            bin.join(b.name).display(),
            b.version
        );
    }
    Ok(bin)
}

/// Takes the exclusive lock of `dir` (created), waiting while another xtask holds it.
pub(crate) fn lock(dir: &Path) -> Result<Flock<fs::File>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    podwire_lab::lock_exclusive(
        &dir.join("lock"),
        "xtask: waiting for another xtask fetching or building Kubernetes",
    )
}

impl Built {
    /// Whether the binary is in `bin` and the version the lab wants.
    fn is_in(&self, bin: &Path) -> bool {
        reports(&bin.join(self.name), self.version_args, self.version)
    }
}

/// Downloads and unpacks the tree into a GOPATH in `work`, repairs it and builds `binaries`
/// (name, main package) into `bin`.
fn build(apt: &PrivateApt, work: &Path, binaries: &[Built], bin: &Path) -> Result<()> {
    let download = work.join("download");
    let source = source_package();
    apt.download(&download, &["source", "--download-only", &source])?;
    let tree = work.join("gopath/src").join(IMPORT_PATH);
    unpack_orig(&download, &tree)?;
    fs::remove_dir_all(&download).with_context(|| format!("removing {}", download.display()))?;

    let vendored = tree.join("vendor/github.com/modern-go/reflect2");
    fs::remove_dir_all(&vendored).with_context(|| format!("removing {}", vendored.display()))?;
    let mut copy = Command::new("cp");
    copy.arg("-r").arg(REFLECT2).arg(&vendored);
    run(copy).context("replacing the vendored reflect2 1.0.1 by Debian's 1.0.2")?;

    generate_openapi(work, &tree)?;

    let version_flags: Vec<String> = [
        "vendor/k8s.io/component-base/version",
        "vendor/k8s.io/client-go/pkg/version",
    ]
    .iter()
    .flat_map(|pkg| {
        // Without these the binaries call themselves v0.0.0-master, and clients that compare
        // versions (kubectl) warn about skew.
        [
            format!("-X {IMPORT_PATH}/{pkg}.gitVersion={VERSION}"),
            format!("-X {IMPORT_PATH}/{pkg}.gitMajor=1"),
            format!("-X {IMPORT_PATH}/{pkg}.gitMinor=20"),
        ]
    })
    .collect();
    let ldflags = version_flags.join(" ");
    if binaries.iter().any(|b| b.make == Make::TestBinary) {
        generate_bindata(work, &tree)?;
    }
    for b in binaries {
        let mut go = go(work, &tree);
        match b.make {
            Make::Build => go.arg("build"),
            Make::TestBinary => go.args(["test", "-c"]),
        };
        go.arg("-o")
            .arg(bin.join(b.name))
            .arg("-ldflags")
            .arg(&ldflags)
            .arg(format!("{IMPORT_PATH}/{}", b.package));
        run(go).with_context(|| format!("go build of {}", b.name))?;
    }
    Ok(())
}

/// Writes test/e2e/generated/bindata.go, the manifests and fixtures the e2e suite embeds, with
/// the vendored go-bindata as upstream's hack/generate-bindata.sh does: the tree does not hold
/// it, and without it the suite fails to build (`undefined: Asset`).
fn generate_bindata(work: &Path, tree: &Path) -> Result<()> {
    let go_bindata = work.join("go-bindata");
    let mut go = go(work, tree);
    go.arg("build").arg("-o").arg(&go_bindata).arg(format!(
        "{IMPORT_PATH}/vendor/github.com/go-bindata/go-bindata/go-bindata"
    ));
    run(go).context("go build of go-bindata")?;
    let mut generate = Command::new(&go_bindata);
    generate
        .current_dir(tree)
        .args(["-nometadata", "-o", "test/e2e/generated/bindata.go"])
        .args(["-pkg", "generated", "-ignore", ".jpg", "-ignore", ".png"])
        .args(["-ignore", ".md", "-ignore", "BUILD(\\.bazel)?"])
        .args([
            "test/conformance/testdata/...",
            "test/e2e/testing-manifests/...",
            "test/e2e_node/testing-manifests/...",
            "test/images/...",
            "test/fixtures/...",
        ]);
    run(generate).context("generating the e2e suite's bindata")
}

/// Takes the files `paths` (relative to the tree) out of the source package's orig tarball into
/// `work` (under the same relative paths), without unpacking the rest.
pub(crate) fn source_files(apt: &PrivateApt, work: &Path, paths: &[&str]) -> Result<()> {
    let download = work.join("download");
    let source = source_package();
    apt.download(&download, &["source", "--download-only", &source])?;
    let orig = orig_tarball(&download)?;
    let mut tar = Command::new("tar");
    // The tarball holds one directory, kubernetes-1.20.2/.
    tar.arg("-xzf")
        .arg(&orig)
        .arg("-C")
        .arg(work)
        .arg("--strip-components=1")
        .args(
            paths
                .iter()
                .map(|path| format!("kubernetes-{}/{path}", &VERSION[1..])),
        );
    run(tar).with_context(|| format!("taking {paths:?} out of {}", orig.display()))?;
    fs::remove_dir_all(&download).with_context(|| format!("removing {}", download.display()))
}

/// The orig tarball `apt-get source` left in `download`.
fn orig_tarball(download: &Path) -> Result<PathBuf> {
    fs::read_dir(download)
        .with_context(|| format!("listing {}", download.display()))?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .find(|path| path.to_string_lossy().ends_with(".orig.tar.gz"))
        .with_context(|| {
            format!(
                "apt-get source left no orig tarball in {}",
                download.display()
            )
        })
}

/// Unpacks the upstream tree, the orig tarball `apt-get source` left in `download`, into `tree`.
/// Debian's own patches are not applied: they only adapt the packaging to Debian's build.
fn unpack_orig(download: &Path, tree: &Path) -> Result<()> {
    let orig = orig_tarball(download)?;
    fs::create_dir_all(tree).with_context(|| format!("creating {}", tree.display()))?;
    let mut tar = Command::new("tar");
    // The tarball holds one directory, kubernetes-1.20.2/, whose content goes into `tree`.
    tar.arg("-xzf")
        .arg(&orig)
        .arg("-C")
        .arg(tree)
        .arg("--strip-components=1");
    run(tar).with_context(|| format!("unpacking {}", orig.display()))
}

/// Writes pkg/generated/openapi/zz_generated.openapi.go with the vendored openapi-gen, as
/// upstream's Makefile does, from every package tagged `+k8s:openapi-gen=` under pkg and
/// vendor/k8s.io (about 970 definitions).
fn generate_openapi(work: &Path, tree: &Path) -> Result<()> {
    let openapi_gen = work.join("openapi-gen");
    let mut go = go(work, tree);
    go.arg("build").arg("-o").arg(&openapi_gen).arg(format!(
        "{IMPORT_PATH}/vendor/k8s.io/kube-openapi/cmd/openapi-gen"
    ));
    run(go).context("go build of openapi-gen")?;

    // -R, not -r: vendor/k8s.io/* are symlinks into staging/src/k8s.io, and without following
    // them only 3 definitions come out, and kube-apiserver exits with "cannot find model
    // definition for ...CustomResourceDefinition".
    let mut grep = Command::new("grep");
    grep.current_dir(tree).args([
        "-R",
        "-l",
        "--include=*.go",
        "+k8s:openapi-gen=",
        "pkg",
        "vendor/k8s.io",
    ]);
    let out = grep.output().with_context(|| format!("running {grep:?}"))?;
    ensure!(out.status.success(), "{grep:?} failed: {}", out.status);
    let mut packages: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|file| Some(Path::new(file).parent()?.to_string_lossy().into_owned()))
        // Generators and examples, not API types kube-apiserver serves.
        .filter(|dir| {
            !["code-generator", "sample-apiserver", "kube-openapi"]
                .iter()
                .any(|skip| dir.split('/').any(|part| part == *skip))
        })
        .map(|dir| format!("{IMPORT_PATH}/{dir}"))
        .collect();
    packages.sort();
    packages.dedup();
    ensure!(
        packages.len() > 50,
        "only {} packages tagged +k8s:openapi-gen= found in {}",
        packages.len(),
        tree.display()
    );

    let mut generate = Command::new(&openapi_gen);
    generate
        .current_dir(tree)
        .envs(go_env(work))
        .arg("-i")
        .arg(packages.join(","))
        .args(["-p", &format!("{IMPORT_PATH}/pkg/generated/openapi")])
        .args(["-O", "zz_generated.openapi"])
        .args(["-h", "vendor/k8s.io/code-generator/hack/boilerplate.go.txt"])
        .arg("-o")
        .arg(work.join("gopath/src"))
        // Upstream checks the API rule violations against its list of known ones; they are no
        // concern of the lab's, and would flood the output.
        .arg("--report-filename")
        .arg(work.join("api-violations.txt"));
    run(generate).context("generating the OpenAPI definitions")?;
    let generated = tree.join("pkg/generated/openapi/zz_generated.openapi.go");
    if !generated.exists() {
        bail!("openapi-gen wrote no {}", generated.display());
    }
    Ok(())
}

/// Go 1.19 in GOPATH mode with caches in `work`, static binaries, no network.
fn go_env(work: &Path) -> Vec<(&'static str, String)> {
    let path = std::env::var("PATH").unwrap_or_default();
    vec![
        ("GOROOT", GOROOT.to_owned()),
        ("PATH", format!("{GOROOT}/bin:{path}")),
        ("GOPATH", work.join("gopath").display().to_string()),
        ("GOCACHE", work.join("gocache").display().to_string()),
        ("GO111MODULE", "off".to_owned()),
        ("GOPROXY", "off".to_owned()),
        ("CGO_ENABLED", "0".to_owned()),
    ]
}

/// `go` in `tree` with [`go_env`].
fn go(work: &Path, tree: &Path) -> Command {
    let mut cmd = Command::new(format!("{GOROOT}/bin/go"));
    cmd.current_dir(tree).envs(go_env(work));
    cmd
}
