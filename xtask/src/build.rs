//! `cargo xtask build`, and the building every other command starts with: the eBPF object with
//! Debian's toolchain, the userspace binaries that embed it with the default one.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};
use podwire_lab::artifacts::OBJECT_ENV;

use crate::{
    cmd,
    toolchain::{self, Needs},
};

const BPF_TARGET: &str = "bpfel-unknown-none";

/// `cargo xtask build [--release]`.
pub fn run(release: bool) -> Result<()> {
    all(release, Needs::Build)?;
    Ok(())
}

/// What a build produced.
pub struct Built {
    /// The userspace binaries' directory.
    pub bins: PathBuf,
    /// The eBPF object they embed.
    pub object: PathBuf,
}

/// Installs what `needs` calls for and builds everything.
pub fn all(release: bool, needs: Needs) -> Result<Built> {
    let linker_dir = toolchain::ensure(needs)?;
    let object = ebpf(&linker_dir)?;
    let mut cargo = userspace_cargo(&object);
    cargo.args([
        "build",
        "--workspace",
        "--exclude",
        "podwire-ebpf",
        "--bins",
    ]);
    if release {
        cargo.arg("--release");
    }
    cmd::run(cargo).context("building the userspace binaries")?;
    let bins = workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" });
    Ok(Built { bins, object })
}

/// Builds the eBPF object with Debian's toolchain (`linker_dir` holds bpf-linker), returning its
/// path.
pub fn ebpf(linker_dir: &Path) -> Result<PathBuf> {
    let root = workspace_root();
    let target_dir = root.join("target/ebpf");
    let mut cargo = Command::new(toolchain::CARGO);
    cargo
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--package",
            "podwire-ebpf",
            "--target",
            BPF_TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", toolchain::RUSTC)
        // aya-ebpf uses unstable features; Debian's rustc is a stable release.
        .env("RUSTC_BOOTSTRAP", "1")
        // Full debug info so bpf-linker can emit BTF: the verifier log and bpftool then show
        // source lines, and aya relocates map definitions from it.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .env("PATH", prepend_path(linker_dir))
        // Whatever the rustup proxy or an outer cargo set must not leak into Debian's cargo.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    cmd::run(cargo).context("building the eBPF object")?;
    Ok(target_dir.join(BPF_TARGET).join("release/podwire"))
}

/// The default toolchain's cargo in the workspace (the one running xtask, which `cargo xtask`
/// names in CARGO), with the agent's build script pointed at `object` to embed; the caller adds
/// the verb and its arguments.
pub fn userspace_cargo(object: &Path) -> Command {
    let mut cargo = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo.current_dir(workspace_root()).env(OBJECT_ENV, object);
    cargo
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn prepend_path(dir: &Path) -> OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(path) = env::var_os("PATH") {
        paths.extend(env::split_paths(&path));
    }
    env::join_paths(paths).expect("PATH entries contain no ':'")
}
