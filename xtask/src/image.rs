//! `cargo xtask image`: podwire's container image, saved as an OCI archive, and its Helm chart,
//! packaged.
//!
//! No base image can be pulled here, so the base is a Debian 12 root file system that
//! `mmdebstrap` makes from Debian's packages (extracted, not installed: a container needs no
//! package database or maintainer scripts), holding only what runs at run time: glibc, `nft`, and
//! the shell and tools of the chart's init containers. It is cached in target/image (rebuilt when
//! the package list changes) and `podman import`ed under a tag of its digest. image/Containerfile
//! then copies the release binaries onto it; it has no RUN step, so `podman build` runs no
//! container. The result is `localhost/podwire:<version>`, saved with `podman save --format
//! oci-archive` to target/image/podwire.oci.tar, which `ctr -n k8s.io images import` reads.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{
    build::{self, workspace_root, Built},
    cmd, helm,
    toolchain::{self, Needs},
};

/// podwire's version (the workspace's): the image's tag and the chart's appVersion.
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The image's name; the chart's default `image.repository`.
const REPOSITORY: &str = "localhost/podwire";
const BASE_REPOSITORY: &str = "localhost/podwire-base";
const SUITE: &str = "bookworm";
/// The machine's apt sources (Debian 12 with its security updates), which mmdebstrap reuses.
const APT_SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";
/// The binaries in the image.
const BINARIES: [&str; 3] = ["podwire-agent", "podwire-cni", "podwire"];
const CHART: &str = "helm/podwire";

/// What the base holds, each with the reason; their dependencies come along.
const BASE_PACKAGES: &[(&str, &str)] = &[
    ("base-files", "the root file system's layout and os-release"),
    ("libc6", "glibc, which the binaries link"),
    ("libgcc-s1", "unwinding, which the binaries link"),
    (
        "nftables",
        "nft, which the agent runs for its masquerade table",
    ),
    ("dash", "/bin/sh for the init containers' scripts"),
    (
        "coreutils",
        "stat, cat, cp, chmod, mv in the init containers",
    ),
    ("mount", "mount -t bpf in the prepare-node init container"),
];
/// Commands the image must hold: the agent runs nft, the chart's init containers the others.
const COMMANDS: &[&str] = &[
    "nft", "sh", "stat", "mount", "cat", "cp", "chmod", "mv", "dirname", "basename",
];
/// What no container reads: documentation, translations, glibc's iconv modules.
const EXCLUDES: &[&str] = &[
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
    "/usr/lib/x86_64-linux-gnu/gconv/*",
];

/// Host tools building the image needs.
const PACKAGES: &[(&str, &str)] = &[
    ("podman", "builds and saves podwire's image"),
    ("mmdebstrap", "makes the image's Debian 12 base"),
    (
        "binutils",
        "strip: the binaries go into the image without their debug information",
    ),
];

/// `cargo xtask image`.
pub fn run() -> Result<()> {
    let Built { bins, .. } = build::all(true, Needs::Build)?;
    let archive = archive(&bins)?;
    let chart = package_chart(
        &workspace_root(),
        archive.parent().expect("in target/image"),
    )?;
    println!(
        "image {REPOSITORY}:{VERSION}: {} ({}; import with `ctr -n k8s.io images import {}`)",
        archive.display(),
        size(&archive)?,
        archive.display()
    );
    println!("chart: {} ({})", chart.display(), size(&chart)?);
    Ok(())
}

/// Builds the image from the binaries in `bins` (a release build for users; the tests may
/// take their debug build) and saves it as target/image/podwire.oci.tar; returns that path.
/// Seconds when only the binaries changed.
pub fn archive(bins: &Path) -> Result<PathBuf> {
    toolchain::ensure_packages(PACKAGES)?;
    let root = workspace_root();
    let dir = root.join("target/image");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let rootfs = base_rootfs(&dir)?;
    check_base(&rootfs, bins)?;
    let base = import_base(&rootfs)?;

    let context = dir.join("context");
    let _ = fs::remove_dir_all(&context);
    fs::create_dir_all(&context)?;
    for name in BINARIES {
        // Without their DWARF (symbols stay, for backtraces): a debug build's agent shrinks
        // from about 230 MB, a release build loses little.
        let mut strip = Command::new("strip");
        strip
            .arg("--strip-debug")
            .arg("-o")
            .arg(context.join(name))
            .arg(bins.join(name));
        cmd::run(strip).with_context(|| format!("copying {name} into the build context"))?;
    }
    let image = format!("{REPOSITORY}:{VERSION}");
    let mut podman = Command::new("podman");
    podman
        .args(["build", "--quiet", "--pull=never", "--timestamp=0"])
        .arg(format!("--build-arg=BASE={base}"))
        .arg(format!("--build-arg=VERSION={VERSION}"))
        .arg("--file")
        .arg(root.join("image/Containerfile"))
        .args(["--tag", &image])
        .arg(&context);
    cmd::run(podman).context("building podwire's image with podman")?;

    let archive = dir.join("podwire.oci.tar");
    let partial = dir.join("podwire.oci.tar.partial");
    let _ = fs::remove_file(&partial);
    let mut save = Command::new("podman");
    save.args(["save", "--quiet", "--format", "oci-archive", "--output"])
        .arg(&partial)
        .arg(&image);
    cmd::run(save).context("saving podwire's image")?;
    fs::rename(&partial, &archive)?;
    Ok(archive)
}

/// target/image/base.tar, made by mmdebstrap unless it exists for the same package list.
fn base_rootfs(dir: &Path) -> Result<PathBuf> {
    let rootfs = dir.join("base.tar");
    let key_file = dir.join("base.key");
    let key = base_key();
    if rootfs.exists() && fs::read_to_string(&key_file).ok().as_deref() == Some(key.as_str()) {
        return Ok(rootfs);
    }
    eprintln!("xtask: making the image's Debian 12 base with mmdebstrap (about half a minute)");
    let partial = dir.join("base.partial.tar");
    let packages: Vec<&str> = BASE_PACKAGES.iter().map(|(name, _)| *name).collect();
    let mut mmdebstrap = Command::new("mmdebstrap");
    mmdebstrap
        .args([
            "--mode=root",
            "--variant=extract",
            "--format=tar",
            "--quiet",
        ])
        .arg(format!("--include={}", packages.join(",")))
        .args(
            EXCLUDES
                .iter()
                .map(|path| format!("--dpkgopt=path-exclude={path}")),
        )
        .arg(SUITE)
        .arg(&partial);
    if Path::new(APT_SOURCES).exists() {
        mmdebstrap.arg(APT_SOURCES);
    }
    cmd::run(mmdebstrap).context("making the image's base with mmdebstrap")?;
    fs::rename(&partial, &rootfs)?;
    fs::write(&key_file, key)?;
    Ok(rootfs)
}

/// What the base was made from; a different one means making it again.
fn base_key() -> String {
    let packages: Vec<&str> = BASE_PACKAGES.iter().map(|(name, _)| *name).collect();
    format!(
        "{SUITE}\npackages {}\nexcludes {}\n",
        packages.join(","),
        EXCLUDES.join(",")
    )
}

/// Fails unless the base holds every library the binaries load (as `ldd` finds them on this
/// machine, which builds them against the same Debian 12) and every command of [`COMMANDS`]: a
/// missing one would only show when a node runs the image.
fn check_base(rootfs: &Path, bins: &Path) -> Result<()> {
    let out = Command::new("tar")
        .arg("--list")
        .arg("--file")
        .arg(rootfs)
        .output()
        .context("listing the base with tar")?;
    ensure!(out.status.success(), "tar cannot list {}", rootfs.display());
    let listing = listing(&String::from_utf8_lossy(&out.stdout));
    let mut needed = Vec::new();
    for name in BINARIES {
        let out = Command::new("ldd")
            .arg(bins.join(name))
            .output()
            .context("running ldd")?;
        let libs = libraries(&String::from_utf8_lossy(&out.stdout))
            .with_context(|| format!("{name}'s libraries"))?;
        needed.extend(libs);
    }
    for command in COMMANDS {
        needed.push(format!("/usr/bin/{command}"));
    }
    let missing = missing(&listing, &needed);
    if !missing.is_empty() {
        bail!(
            "the image's base lacks {}: add the packages holding them to BASE_PACKAGES in {}",
            missing.join(", "),
            file!()
        );
    }
    Ok(())
}

/// The paths of a `tar --list`, without the leading "./" and trailing "/".
fn listing(tar_list: &str) -> BTreeSet<String> {
    tar_list
        .lines()
        .map(|line| line.trim_start_matches("./").trim_end_matches('/'))
        .filter(|path| !path.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The files `ldd` output says a binary loads (the vDSO is no file).
fn libraries(ldd: &str) -> Result<Vec<String>> {
    let mut libs = Vec::new();
    for line in ldd.lines().map(str::trim).filter(|l| !l.is_empty()) {
        ensure!(!line.contains("not found"), "ldd: {line}");
        let path = match line.split_once("=> ") {
            Some((_, rest)) => rest,
            None => line,
        };
        let path = path.split(" (").next().unwrap_or_default();
        if path.starts_with('/') {
            libs.push(path.to_owned());
        }
    }
    Ok(libs)
}

/// Those of `paths` the base has under none of their names: Debian 12's extracted packages keep
/// /bin, /sbin and /lib apart from /usr's (no merged /usr), while a merged host may name either.
fn missing(listing: &BTreeSet<String>, paths: &[String]) -> Vec<String> {
    paths
        .iter()
        .filter(|path| {
            let file = path.rsplit('/').next().unwrap_or_default();
            let rel = path.trim_start_matches('/');
            let rel = rel.strip_prefix("usr/").unwrap_or(rel);
            let dir = rel.rsplit_once('/').map_or("", |(dir, _)| dir);
            // Commands may sit in any of the PATH directories, libraries in lib or usr/lib.
            let dirs: Vec<String> = if matches!(dir, "bin" | "sbin") {
                vec!["bin".into(), "sbin".into()]
            } else {
                vec![dir.to_owned()]
            };
            !dirs.iter().any(|dir| {
                listing.contains(&format!("{dir}/{file}"))
                    || listing.contains(&format!("usr/{dir}/{file}"))
            })
        })
        .cloned()
        .collect()
}

/// `podman import`s the base under a tag of its digest, unless that image exists; returns it.
fn import_base(rootfs: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(rootfs)
        .output()
        .context("running sha256sum")?;
    let digest = String::from_utf8_lossy(&out.stdout);
    let digest = digest.get(..12).context("sha256sum printed no digest")?;
    let base = format!("{BASE_REPOSITORY}:{digest}");
    let exists = Command::new("podman")
        .args(["image", "exists", &base])
        .status()
        .context("running podman")?;
    if !exists.success() {
        let mut import = Command::new("podman");
        import.args(["import", "--quiet"]).arg(rootfs).arg(&base);
        cmd::run(import).context("importing the image's base")?;
    }
    Ok(base)
}

/// Lints helm/podwire and packages it into `dir`; returns the package.
fn package_chart(root: &Path, dir: &Path) -> Result<PathBuf> {
    let chart = root.join(CHART);
    let meta = fs::read_to_string(chart.join("Chart.yaml"))?;
    let app_version = meta
        .lines()
        .find_map(|line| line.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"'));
    ensure!(
        app_version == Some(VERSION),
        "{CHART}/Chart.yaml has appVersion {app_version:?}, but podwire's version is {VERSION}: \
         the chart would run another image; give both the same version"
    );
    let helm = helm::ensure()?;
    let mut lint = Command::new(&helm);
    lint.args(["lint", "--strict"]).arg(&chart);
    cmd::run(lint).context("linting the chart")?;
    let mut package = Command::new(&helm);
    package
        .arg("package")
        .arg(&chart)
        .arg("--destination")
        .arg(dir);
    cmd::run(package).context("packaging the chart")?;
    Ok(dir.join(format!("podwire-{VERSION}.tgz")))
}

fn size(path: &Path) -> Result<String> {
    let bytes = fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    Ok(if bytes < 1024 * 1024 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    })
}

#[cfg(test)]
mod tests {
    use super::{libraries, listing, missing};

    const LDD: &str = "\tlinux-vdso.so.1 (0x00007ffd)\n\
        \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f32)\n\
        \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f32)\n\
        \t/lib64/ld-linux-x86-64.so.2 (0x00007f32)\n";

    #[test]
    fn ldd_names_the_loaded_files() {
        assert_eq!(
            libraries(LDD).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        let err = libraries("\tlibssl.so.3 => not found\n").unwrap_err();
        assert!(err.to_string().contains("libssl.so.3"), "{err}");
    }

    #[test]
    fn finds_files_under_either_usr_layout() {
        let tar = "./\n./lib/\n./lib/x86_64-linux-gnu/libc.so.6\n\
                   ./usr/lib/x86_64-linux-gnu/libgcc_s.so.1\n./lib64/ld-linux-x86-64.so.2\n\
                   ./usr/sbin/nft\n./bin/sh\n";
        let listing = listing(tar);
        let wanted: Vec<String> = libraries(LDD)
            .unwrap()
            .into_iter()
            .chain(["/usr/bin/nft".into(), "/usr/bin/sh".into()])
            .chain([
                "/usr/bin/stat".into(),
                "/usr/lib/x86_64-linux-gnu/libm.so.6".into(),
            ])
            .collect();
        assert_eq!(
            missing(&listing, &wanted),
            ["/usr/bin/stat", "/usr/lib/x86_64-linux-gnu/libm.so.6"]
        );
    }
}
