//! Building the eBPF object with Debian's toolchain and the userspace with the default one.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::{
    cmd::run,
    toolchain::{self, Needs},
    workspace_root,
};

/// Environment variable through which the agent's build script finds the eBPF object to embed.
pub const OBJECT_ENV: &str = "PODWIRE_EBPF_OBJECT";
/// Environment variable through which the integration tests find the built binaries.
pub const BIN_DIR_ENV: &str = "PODWIRE_BIN_DIR";
const BPF_TARGET: &str = "bpfel-unknown-none";

/// Builds the eBPF object, returning its path.
pub fn ebpf(linker_dir: &Path) -> Result<PathBuf> {
    let root = workspace_root();
    let target_dir = root.join("target/ebpf");
    let mut cmd = Command::new(toolchain::CARGO);
    cmd.current_dir(&root)
        .args(["build", "--release", "--package", "podwire-ebpf", "--target", BPF_TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", toolchain::RUSTC)
        // aya-ebpf uses unstable features; Debian's rustc is a stable release.
        .env("RUSTC_BOOTSTRAP", "1")
        // Full debug info so bpf-linker can emit BTF: the verifier log and bpftool then show
        // source lines, and aya relocates map definitions from it.
        .env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf")
        .env("PATH", prepend_path(linker_dir))
        // Whatever the rustup proxy or an outer cargo set must not leak into Debian's cargo.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    run(cmd).context("building the eBPF object")?;
    Ok(target_dir.join(BPF_TARGET).join("release/podwire"))
}

/// Builds everything; returns the directory holding the userspace binaries.
pub fn all(release: bool) -> Result<PathBuf> {
    let linker_dir = toolchain::ensure(Needs::Build)?;
    let object = ebpf(&linker_dir)?;
    let mut cmd = userspace_cargo(&object, "build");
    cmd.args(["--bins"]);
    if release {
        cmd.arg("--release");
    }
    run(cmd).context("building the userspace binaries")?;
    Ok(workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" }))
}

/// Builds everything, then runs unit and kernel integration tests.
pub fn test(args: &[String]) -> Result<()> {
    toolchain::ensure(Needs::Run)?;
    let bins = all(false)?;
    let object = workspace_root().join("target/ebpf").join(BPF_TARGET).join("release/podwire");
    let mut cmd = userspace_cargo(&object, "test");
    cmd.env(BIN_DIR_ENV, &bins);
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    run(cmd).context("tests failed")
}

fn userspace_cargo(object: &Path, verb: &str) -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root())
        .args([verb, "--workspace", "--exclude", "podwire-ebpf"])
        .env(OBJECT_ENV, object);
    cmd
}

fn prepend_path(dir: &Path) -> OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(path) = env::var_os("PATH") {
        paths.extend(env::split_paths(&path));
    }
    env::join_paths(paths).expect("PATH entries contain no ':'")
}
