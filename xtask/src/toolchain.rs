//! Finds, and installs when missing, everything the build and the tests need: Debian's Rust with the
//! precompiled `bpfel-unknown-none` standard library, bpf-linker built against Debian's LLVM 22, and
//! the network tools the integration tests drive.
//!
//! Why Debian's Rust: the rustup toolchains here cannot download components, so they have neither
//! `rust-src` nor a standard library for `bpfel-unknown-none`. Debian's `rustc-web` (1.96, at
//! /usr/bin/rustc, built on LLVM 22) comes with a precompiled `core` for that target in
//! `libstd-rust-web-dev-bpf`, so no `-Z build-std` is needed; aya-ebpf uses unstable features, so
//! it runs with `RUSTC_BOOTSTRAP=1`. bpf-linker links the object and must use the LLVM rustc
//! emits bitcode for, hence LLVM 22 (its default feature wants LLVM 23, which Debian lacks). The
//! userspace crates, xtask included, build with the default rustup toolchain.
//!
//! The check is a single `dpkg-query` plus a `bpf-linker --version`, so it costs milliseconds when
//! everything is present; installing is idempotent.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::cmd::run;

/// Debian's rustc/cargo 1.96 (LLVM 22): the rustup toolchains here cannot target bpfel.
pub const RUSTC: &str = "/usr/bin/rustc";
pub const CARGO: &str = "/usr/bin/cargo";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Packages the eBPF build needs, each with the reason shown while it installs.
const BUILD_PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "rustc 1.96 that can target bpfel-unknown-none"),
    ("cargo-web", "the cargo that drives it"),
    (
        "libstd-rust-web-dev-bpf",
        "precompiled core for bpfel-unknown-none",
    ),
    ("llvm-22-dev", "LLVM 22 for bpf-linker"),
    ("libpolly-22-dev", "LLVM 22 for bpf-linker"),
    ("zlib1g-dev", "bpf-linker's LLVM link"),
    ("libzstd-dev", "bpf-linker's LLVM link"),
];

/// Packages the kernel integration tests and the demo drive.
const TEST_PACKAGES: &[(&str, &str)] = &[
    (
        "iproute2",
        "network namespaces and veths for test nodes and pods",
    ),
    ("iputils-ping", "ICMP between test pods"),
    ("procps", "sysctl for forwarding in test nodes"),
    ("tcpdump", "captures on the test underlay"),
    ("nftables", "the agent's masquerade rules"),
];

/// What a command needs from the machine.
#[derive(Clone, Copy)]
pub enum Needs {
    /// Building the eBPF object.
    Build,
    /// Building and running the kernel tests or the demo.
    Run,
}

/// Makes sure everything `needs` calls for is installed; returns the directory holding bpf-linker,
/// which must be on PATH for rustc's bpf target.
pub fn ensure(needs: Needs) -> Result<PathBuf> {
    let mut packages: Vec<(&str, &str)> = BUILD_PACKAGES.to_vec();
    if let Needs::Run = needs {
        packages.extend_from_slice(TEST_PACKAGES);
    }
    ensure_packages(&packages)?;
    ensure_bpf_linker()
}

/// Installs those of `packages` (name, reason shown while installing) that are missing.
pub fn ensure_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing = missing_packages(packages)?;
    if missing.is_empty() {
        return Ok(());
    }
    install_packages(&missing)
}

fn missing_packages<'a>(packages: &[(&'a str, &'a str)]) -> Result<Vec<(&'a str, &'a str)>> {
    let names: Vec<&str> = packages.iter().map(|(name, _)| *name).collect();
    // dpkg-query exits non-zero when any name is unknown, but still prints the known ones.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
        .args(&names)
        .output()
        .context(
            "running dpkg-query: podwire's build installs its toolchain with dpkg and apt, so it \
             needs a Debian 12 machine",
        )?;
    let listing = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = listing
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(_, status)| status.starts_with("ii"))
        .map(|(name, _)| name)
        .collect();
    Ok(packages
        .iter()
        .filter(|(name, _)| !installed.contains(name))
        .copied()
        .collect())
}

fn install_packages(missing: &[(&str, &str)]) -> Result<()> {
    for (name, why) in missing {
        eprintln!("xtask: installing Debian package {name} ({why})");
    }
    let names: Vec<&str> = missing.iter().map(|(name, _)| *name).collect();
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        // Another install on the machine may hold the dpkg lock for a while.
        cmd.args(["-o", "DPkg::Lock::Timeout=600", "-q"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run(apt(&["update"])).context("apt-get update")?;
    let mut install = apt(&["install", "-y", "--no-install-recommends"]);
    install.args(&names);
    run(install).with_context(|| format!("apt-get install {}", names.join(" ")))
}

fn ensure_bpf_linker() -> Result<PathBuf> {
    let cargo_bin = cargo_home().join("bin");
    let linker = cargo_bin.join("bpf-linker");
    if linker_version(&linker).as_deref() == Some(BPF_LINKER_VERSION) {
        return Ok(cargo_bin);
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against Debian's LLVM 22 \
         (links the eBPF object; takes about a minute, once)"
    );
    // The rustup cargo builds it; its default feature wants LLVM 23, which Debian does not ship.
    let mut install = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    install
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", LLVM_PREFIX);
    run(install).context("cargo install bpf-linker")?;
    match linker_version(&linker) {
        Some(v) if v == BPF_LINKER_VERSION => Ok(cargo_bin),
        other => bail!(
            "bpf-linker at {} reports version {other:?} after installing {BPF_LINKER_VERSION}",
            linker.display()
        ),
    }
}

fn linker_version(linker: &Path) -> Option<String> {
    let out = Command::new(linker).arg("--version").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    // "bpf-linker 0.13.0"
    text.split_whitespace().nth(1).map(str::to_owned)
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}
