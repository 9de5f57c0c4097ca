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

use crate::{build::workspace_root, cmd::run, toolchain::ensure_packages};

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
const SUITE: &str = "bookworm";
const DEBIAN_SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
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
    // A private sources list and package lists: the machine's apt configuration has no deb-src
    // lines and stays untouched.
    let lists = work.join("lists");
    fs::create_dir_all(lists.join("partial")).with_context(|| {
        format!(
            "creating the private apt lists directory {}",
            lists.display()
        )
    })?;
    let sources = work.join("sources.list");
    let mirror = mirror();
    fs::write(
        &sources,
        format!("deb-src [signed-by={KEYRING}] {mirror} {SUITE} main\n"),
    )
    .with_context(|| format!("writing {}", sources.display()))?;
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.current_dir(work)
            .arg("-q")
            .arg("-o")
            .arg(format!("Dir::Etc::SourceList={}", sources.display()))
            .args(["-o", "Dir::Etc::SourceParts=/dev/null"])
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", lists.display()))
            // Another install on the machine may hold the dpkg lock for a while.
            .args(["-o", "DPkg::Lock::Timeout=600"])
            // The download lands in a directory only root can write; without this apt warns that
            // it falls back from its unprivileged _apt user to root.
            .args(["-o", "APT::Sandbox::User=root"])
            .args(args);
        cmd
    };
    run(apt(&["update"]))
        .with_context(|| format!("apt-get update of the private deb-src list for {mirror}"))?;
    run(apt(&["source", "--download-only", SOURCE_PACKAGE]))
        .with_context(|| format!("apt-get source {SOURCE_PACKAGE}"))?;

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

/// The mirror the machine's apt already uses for the suite, so the source comes from the same place.
fn mirror() -> String {
    fs::read_to_string(DEBIAN_SOURCES)
        .ok()
        .and_then(|text| {
            let stanza = text.split("\n\n").find(|stanza| {
                field(stanza, "Suites")
                    .is_some_and(|suites| suites.split_whitespace().any(|s| s == SUITE))
            })?;
            Some(field(stanza, "URIs")?.split_whitespace().next()?.to_owned())
        })
        .unwrap_or_else(|| DEFAULT_MIRROR.to_owned())
}

/// The value of field `name` in a deb822 stanza.
fn field<'a>(stanza: &'a str, name: &str) -> Option<&'a str> {
    stanza
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
}
