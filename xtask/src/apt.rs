//! apt with sources and package lists of its own, for what the machine's configuration lacks:
//! its sources have no deb-src entries, and source and binary packages the build takes files
//! out of are downloaded, not installed. The machine's apt configuration stays untouched.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context as _, Result};

use crate::cmd::{reports, run};

/// The machine's own apt sources (deb822), whose archives the private copy uses.
const DEBIAN_SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";

/// apt with sources and package lists of its own, below a directory: the machine's archives,
/// binary and source, as the machine's own lists have no deb-src entries (and stay untouched).
pub struct PrivateApt {
    parts: PathBuf,
    lists: PathBuf,
}

impl PrivateApt {
    /// Writes the sources below `dir` and downloads their package lists.
    pub fn new(dir: &Path) -> Result<PrivateApt> {
        let apt = PrivateApt {
            parts: dir.join("sources"),
            lists: dir.join("lists"),
        };
        for d in [&apt.parts, &apt.lists.join("partial")] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        // The machine's own archives (the release, its updates and security suites).
        let sources = fs::read_to_string(DEBIAN_SOURCES).with_context(|| {
            format!("reading {DEBIAN_SOURCES} (a Debian 12 machine's apt sources)")
        })?;
        let sources: String = sources
            .lines()
            .map(|line| match line.trim_end() {
                "Types: deb" => "Types: deb deb-src\n".to_owned(),
                other => format!("{other}\n"),
            })
            .collect();
        let copy = apt.parts.join("debian.sources");
        fs::write(&copy, sources).with_context(|| format!("writing {}", copy.display()))?;
        run(apt.command(dir, &["update"])).context("apt-get update of private apt sources")?;
        Ok(apt)
    }

    /// `apt-get args` on the private sources and lists, in `dir`.
    pub fn command(&self, dir: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("apt-get");
        cmd.current_dir(dir)
            .arg("-q")
            .args(["-o", "Dir::Etc::SourceList=/dev/null"])
            .arg("-o")
            .arg(format!("Dir::Etc::SourceParts={}", self.parts.display()))
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", self.lists.display()))
            // Downloads land in a directory only root can write; without this apt warns that it
            // falls back from its unprivileged _apt user to root.
            .args(["-o", "APT::Sandbox::User=root"])
            .args(args);
        cmd
    }

    /// Runs `apt-get args` in `dir` (created), where what it downloads lands.
    pub fn download(&self, dir: &Path, args: &[&str]) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        run(self.command(dir, args)).with_context(|| format!("apt-get {}", args.join(" ")))
    }

    /// Downloads the binary `packages` into `dir` and unpacks every one of them, files only (no
    /// maintainer scripts, nothing installed), into `dir`/root; returns that root.
    pub fn unpack(&self, dir: &Path, packages: &[&str]) -> Result<PathBuf> {
        let mut args = vec!["download"];
        args.extend(packages);
        self.download(dir, &args)?;
        let root = dir.join("root");
        for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let deb = entry?.path();
            if deb.extension().is_some_and(|ext| ext == "deb") {
                let mut unpack = Command::new("dpkg-deb");
                unpack.arg("-x").arg(&deb).arg(&root);
                run(unpack).with_context(|| format!("unpacking {}", deb.display()))?;
            }
        }
        Ok(root)
    }
}

/// A binary taken out of a Debian package (files extracted, nothing installed).
pub struct Packaged {
    pub name: &'static str,
    /// The binary package.
    pub package: &'static str,
    /// The package version apt must take, when any will not do.
    pub pin: Option<&'static str>,
    /// Where the package installs the binary.
    pub path: &'static str,
    /// Arguments that make it print its version on stdout, and what that holds.
    pub version_args: &'static [&'static str],
    pub version: &'static str,
}

impl Packaged {
    /// Whether the binary is in `bin` and the version wanted.
    pub fn is_in(&self, bin: &Path) -> bool {
        reports(&bin.join(self.name), self.version_args, self.version)
    }

    /// Fails unless the binary is in `bin` and the version wanted.
    pub fn check(&self, bin: &Path) -> Result<()> {
        ensure!(
            self.is_in(bin),
            "{} does not report {:?}",
            bin.join(self.name).display(),
            self.version
        );
        Ok(())
    }
}

impl PrivateApt {
    /// Takes the `packaged` binaries out of their packages (downloaded into `debs`) into `bin`.
    pub fn extract(&self, debs: &Path, packaged: &[&Packaged], bin: &Path) -> Result<()> {
        let mut packages: Vec<String> = packaged
            .iter()
            .map(|p| match p.pin {
                Some(version) => format!("{}={version}", p.package),
                None => p.package.to_owned(),
            })
            .collect();
        packages.sort_unstable();
        packages.dedup();
        let packages: Vec<&str> = packages.iter().map(String::as_str).collect();
        let root = self.unpack(debs, &packages)?;
        for p in packaged {
            let from = root.join(p.path);
            let to = bin.join(p.name);
            fs::copy(&from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
        Ok(())
    }
}
