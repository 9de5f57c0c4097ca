//! `cnitool`, the CNI project's reference runtime client, through which the tests drive CNI plugins
//! the way a container runtime would. Debian has no binary package of it: it ships only inside
//! the source package of the CNI library (`golang-github-appc-cni`, bookworm), so it is built from
//! there once, into target/tools. The source comes through a private deb-src list (the machine's
//! apt configuration stays untouched), and Debian's Go builds it in GOPATH mode against the
//! library `golang-github-appc-cni-dev` installs, as the Go module proxy is out of reach here.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{apt::PrivateApt, build::workspace_root, cmd::run, toolchain::ensure_packages};

const PACKAGES: &[(&str, &str)] = &[
    ("golang-go", "Go, to build cnitool"),
    (
        "golang-github-appc-cni-dev",
        "the CNI library cnitool is built against",
    ),
    (
        "dpkg-dev",
        "dpkg-source, to unpack cnitool's source package",
    ),
    (
        "containernetworking-plugins",
        "the reference CNI plugins in /usr/lib/cni for test conflists",
    ),
];
const SOURCE_PACKAGE: &str = "golang-github-appc-cni";
/// Debian's Go, whose GOPATH mode finds the CNI library golang-github-appc-cni-dev installs.
const GO: &str = "/usr/bin/go";
const GOPATH: &str = "/usr/share/gocode";

/// Returns the path of a working `cnitool` binary (the CNI project's reference runtime client),
/// building it if needed; also makes sure the Debian reference plugins are installed.
pub fn ensure() -> Result<PathBuf> {
    ensure_packages(PACKAGES)?;
    let tools = workspace_root().join("target/tools");
    let cnitool = tools.join("cnitool");
    if runs(&cnitool) {
        return Ok(cnitool);
    }
    eprintln!(
        "xtask: building cnitool from Debian's {SOURCE_PACKAGE} source package \
         (the reference CNI runtime client the tests drive plugins with; takes seconds, once)"
    );
    let work = tools.join("cnitool-build");
    // An interrupted earlier build may have left its files behind.
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    let built = build(&work, &cnitool);
    let cleaned = fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()));
    built.and(cleaned)?;
    if !runs(&cnitool) {
        bail!("{} was built but does not run", cnitool.display());
    }
    Ok(cnitool)
}

/// Whether `cnitool` runs: without arguments it prints its usage, naming itself, on stderr.
fn runs(cnitool: &Path) -> bool {
    Command::new(cnitool)
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stderr).starts_with("cnitool"))
}

/// Downloads, unpacks and builds the source package in `work`, writing the binary to `out`.
fn build(work: &Path, out: &Path) -> Result<()> {
    let apt = PrivateApt::new(&work.join("apt"))?;
    apt.download(work, &["source", "--download-only", SOURCE_PACKAGE])?;

    let dsc = fs::read_dir(work)
        .with_context(|| format!("listing {}", work.display()))?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "dsc"))
        .with_context(|| format!("apt-get source left no .dsc file in {}", work.display()))?;
    let src = work.join("src");
    let mut unpack = Command::new("dpkg-source");
    // apt has already checked the files against the archive's signed index; the uploader's key
    // (debian-keyring) is not on the machine, so dpkg-source's own check could only warn.
    unpack.arg("--no-check").arg("-x").arg(&dsc).arg(&src);
    run(unpack).with_context(|| format!("unpacking {}", dsc.display()))?;

    let mut go = Command::new(GO);
    go.current_dir(src.join("cnitool"))
        .arg("build")
        .arg("-o")
        .arg(out)
        // The CNI library comes from Debian's GOPATH, not from the module proxy (unreachable here).
        .env("GO111MODULE", "off")
        .env("GOPATH", GOPATH)
        // Go needs a build cache and finds none when HOME is unset.
        .env("GOCACHE", work.join("gocache"));
    run(go).context("go build of cnitool")
}
