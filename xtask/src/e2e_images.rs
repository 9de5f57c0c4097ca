//! The container image upstream's networking conformance specs run besides pause and busybox
//! (which the lab's kubelet nodes carry already, under the names the suite uses), built on this
//! machine: no registry is reachable, so it is a one-layer docker archive assembled from the
//! agnhost binary the Kubernetes build made and from Debian packages (taken out with `dpkg-deb
//! -x`, never installed), imported into the nodes as `k8s.gcr.io/e2e-test-images/agnhost:2.21`,
//! exactly the name Kubernetes v1.20.2's test/utils/image/manifest.go gives, so the suite needs
//! no registry remapping.
//!
//! It is laid out as upstream's Dockerfile does (ENTRYPOINT /agnhost, CMD pause, /agnhost-2,
//! /uploads, porter's /localhost.crt and .key). The specs also exec shell commands in it: `nc -zv
//! -t -w 2 HOST PORT`, `echo x | nc -w 1 -u HOST PORT`, `curl -g -q -s [--connect-timeout N]
//! URL`, `wget -T N -qO- URL`. Debian's busybox-static fails them: its shell runs busybox's own
//! nc (no `-z`) before PATH, its static getaddrinfo crashes on any name, and busybox 1.35's `wget
//! -T` crashes. What passes them: the dynamic busybox with glibc's runtime and an nsswitch.conf
//! (`hosts: files dns`), dash as /bin/sh, OpenBSD's netcat as nc, and small curl and wget
//! wrappers over busybox wget that bound the call with `timeout` instead of `-T`.

use std::{
    fs,
    os::unix::fs::{symlink, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context as _, Result};
use podwire_lab::images::{docker_archive, ImageConfig};

use crate::{apt::PrivateApt, build::workspace_root, cmd::run, k8s};

/// Bumped whenever what goes into an image changes, so archives built before are rebuilt.
const REVISION: u32 = 1;

/// The files of Kubernetes' source package ([`k8s::source_package`]) that the agnhost image
/// carries (the Kubernetes build keeps only its binaries).
const PORTER_FILES: &[&str] = &["localhost.crt", "localhost.key"];
/// Where they are in the tree.
const PORTER_DIR: &str = "test/images/agnhost/porter";

/// agnhost's userland: the dynamic busybox, glibc's runtime, dash, OpenBSD's netcat and the
/// libraries it links.
const AGNHOST_PACKAGES: &[&str] = &[
    "busybox",
    "libc6",
    "dash",
    "netcat-openbsd",
    "libbsd0",
    "libmd0",
];

/// The container's PATH: the wrappers in /usr/local/bin come before busybox's applets in /bin.
const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// curl as the e2e specs call it, over busybox wget. `-w '%{http_code}'` prints the status
/// line's code (000 without an answer); curl's other flags the specs pass (-g, -q, -s, -i, -k)
/// change nothing the specs read. The whole call is bounded by --max-time, else by
/// --connect-timeout, else 30 s.
const CURL: &str = r#"#!/bin/sh
# curl, as far as Kubernetes' e2e specs use it, over busybox wget.
ct= mt= out=- code= url=
while [ $# -gt 0 ]; do
	case $1 in
	--connect-timeout) ct=$2; shift ;;
	--max-time|-m) mt=$2; shift ;;
	-o) out=$2; shift ;;
	-w) code=$2; shift ;;
	-*) ;;
	*) url=$1 ;;
	esac
	shift
done
secs=${mt:-${ct:-30}}
if [ -n "$code" ]; then
	status=$(timeout "$secs" busybox wget -S -O "$out" "$url" 2>&1 >/dev/null |
		sed -n 's|^ *HTTP/[0-9.]* \([0-9][0-9][0-9]\).*|\1|p' | tail -n 1)
	printf '%s' "${status:-000}"
	exit 0
fi
exec timeout "$secs" busybox wget -q -O "$out" "$url"
"#;

/// wget with `-T N` run as busybox wget under `timeout N` (busybox 1.35's own -T crashes).
const WGET: &str = r#"#!/bin/sh
# wget -T N as busybox wget under timeout N.
secs=900 n=$#
while [ "$n" -gt 0 ]; do
	a=$1; shift; n=$((n - 1))
	case $a in
	-T) secs=$1; shift; n=$((n - 1)) ;;
	-T*) secs=${a#-T} ;;
	*) set -- "$@" "$a" ;;
	esac
done
exec timeout "$secs" busybox wget "$@"
"#;

/// The reference the image is imported under.
pub const AGNHOST: &str = "k8s.gcr.io/e2e-test-images/agnhost:2.21";

/// Returns the agnhost image's docker archive in target/k8s/images, building it if it is
/// missing. `k8s_bin` holds the agnhost binary (from [`crate::k8s::ensure`]).
pub fn agnhost(k8s_bin: &Path) -> Result<PathBuf> {
    let dir = workspace_root().join("target/k8s/images");
    let archive = dir.join(format!("agnhost-2.21-r{REVISION}.tar"));
    if archive.exists() {
        return Ok(archive);
    }
    let work = dir.join("work");
    // An interrupted earlier run may have left its files behind.
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    eprintln!(
        "xtask: building {AGNHOST} into {} (from Debian packages; once)",
        dir.display()
    );
    let apt = PrivateApt::new(&work.join("apt"))?;
    let rootfs = work.join("rootfs");
    let config = agnhost_rootfs(&apt, &work, &rootfs, &k8s_bin.join("agnhost"), &dir)?;
    // Written next to its final name and renamed, so an archive that exists is whole.
    let partial = archive.with_extension("partial");
    docker_archive(AGNHOST, &rootfs, &config, &partial)
        .with_context(|| format!("writing the image {AGNHOST}"))?;
    fs::rename(&partial, &archive).with_context(|| format!("renaming {}", partial.display()))?;
    fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    Ok(archive)
}

/// agnhost's tree in `rootfs`; porter's files are cached in `cache`.
fn agnhost_rootfs(
    apt: &PrivateApt,
    work: &Path,
    rootfs: &Path,
    agnhost: &Path,
    cache: &Path,
) -> Result<ImageConfig> {
    unpack_packages(apt, &work.join("agnhost-debs"), AGNHOST_PACKAGES, rootfs)?;
    // Documentation and glibc's character set converters: nothing in the image reads them.
    for unused in ["usr/share", "usr/lib/x86_64-linux-gnu/gconv"] {
        let path = rootfs.join(unused);
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    let bin = rootfs.join("bin");
    ensure!(
        fs::read_link(bin.join("sh")).is_ok_and(|target| target == Path::new("dash")),
        "Debian's dash package no longer links /bin/sh to dash"
    );
    link("nc.openbsd", &bin.join("nc"))?;
    busybox_applets(&bin)?;
    write_file(
        &rootfs.join("etc/nsswitch.conf"),
        "hosts: files dns\n",
        0o644,
    )?;
    let local = rootfs.join("usr/local/bin");
    write_file(&local.join("curl"), CURL, 0o755)?;
    write_file(&local.join("wget"), WGET, 0o755)?;

    // As upstream's Dockerfile lays it out.
    copy(agnhost, &rootfs.join("agnhost"))?;
    link("agnhost", &rootfs.join("agnhost-2"))?;
    let porter = porter_files(apt, &cache.join("porter"))?;
    for name in PORTER_FILES {
        copy(&porter.join(name), &rootfs.join(name))?;
    }
    for dir in ["uploads", "tmp"] {
        make_dir(&rootfs.join(dir))?;
    }
    Ok(ImageConfig {
        entrypoint: vec!["/agnhost".into()],
        cmd: vec!["pause".into()],
        env: vec![PATH.into()],
        workdir: None,
    })
}

/// Downloads `packages` into `debs` and unpacks each into `rootfs` (files only; no scripts run).
fn unpack_packages(apt: &PrivateApt, debs: &Path, packages: &[&str], rootfs: &Path) -> Result<()> {
    let mut args = vec!["download"];
    args.extend_from_slice(packages);
    apt.download(debs, &args)?;
    for entry in fs::read_dir(debs).with_context(|| format!("listing {}", debs.display()))? {
        let deb = entry?.path();
        if deb.extension().is_some_and(|ext| ext == "deb") {
            let mut unpack = Command::new("dpkg-deb");
            unpack.arg("-x").arg(&deb).arg(rootfs);
            run(unpack).with_context(|| format!("unpacking {}", deb.display()))?;
        }
    }
    Ok(())
}

/// A link to busybox in `bin` (which holds it) for each of its applets that has no file there
/// yet: dash's sh and netcat's nc stay.
fn busybox_applets(bin: &Path) -> Result<()> {
    let busybox = bin.join("busybox");
    // The Debian build runs on this Debian machine, the dynamic one with the host's glibc.
    let out = Command::new(&busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("running {} --list", busybox.display()))?;
    ensure!(
        out.status.success(),
        "{} --list failed: {}",
        busybox.display(),
        out.status
    );
    let applets = String::from_utf8(out.stdout)?;
    ensure!(
        applets.lines().any(|a| a == "wget") && applets.lines().any(|a| a == "timeout"),
        "{} has no wget or no timeout applet, which the image's curl and wget wrap",
        busybox.display()
    );
    for applet in applets.lines().filter(|a| !a.is_empty()) {
        let path = bin.join(applet);
        if path.symlink_metadata().is_err() {
            link("busybox", &path)?;
        }
    }
    Ok(())
}

/// Porter's certificate and key (test/images/agnhost/porter in the Kubernetes tree), taken out
/// of Kubernetes' source package into `cache` once.
fn porter_files(apt: &PrivateApt, cache: &Path) -> Result<PathBuf> {
    if PORTER_FILES.iter().all(|name| cache.join(name).exists()) {
        return Ok(cache.to_owned());
    }
    let partial = cache.with_extension("partial");
    if partial.exists() {
        fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    make_dir(&partial)?;
    let paths: Vec<String> = PORTER_FILES
        .iter()
        .map(|name| format!("{PORTER_DIR}/{name}"))
        .collect();
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    k8s::source_files(apt, &partial, &paths)?;
    for name in PORTER_FILES {
        let from = partial.join(PORTER_DIR).join(name);
        fs::rename(&from, partial.join(name))
            .with_context(|| format!("moving {}", from.display()))?;
    }
    fs::remove_dir_all(partial.join("test")).context("removing porter's tree")?;
    if cache.exists() {
        fs::remove_dir_all(cache).with_context(|| format!("removing {}", cache.display()))?;
    }
    fs::rename(&partial, cache).with_context(|| format!("renaming {}", partial.display()))?;
    Ok(cache.to_owned())
}

fn make_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}

fn link(target: &str, path: &Path) -> Result<()> {
    symlink(target, path).with_context(|| format!("linking {} to {target}", path.display()))
}

/// Writes `text` to `path` (its directory created) with permissions `mode`.
fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        make_dir(dir)?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}
