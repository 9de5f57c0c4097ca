//! Container images for the lab's kubelet nodes, written as `docker save` writes them (a
//! "docker archive"), which `ctr images import` takes: no registry is reachable from the lab, so
//! every image a pod runs is built here from a directory and imported into each node's
//! containerd.
//!
//! The archive holds one layer (`<digest>/layer.tar`, the root filesystem), the image
//! configuration (`<digest>.json`: entrypoint, command, environment, working directory and the
//! layer's diff ID) and `manifest.json`, which tags the configuration with its reference. Layers
//! are written deterministically (no owners, no times), so the same directory gives the same
//! image ID.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::PermissionsExt as _,
    path::Path,
};

use anyhow::{ensure, Context as _, Result};
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// The sandbox image of the lab's kubelet nodes (containerd's `sandbox_image`, kubelet's
/// `--pod-infra-container-image`): kubelet v1.20's default name, which the conformance suite
/// uses too, with Kubernetes' pause program.
pub const PAUSE_IMAGE: &str = "k8s.gcr.io/pause:3.2";
/// busybox for test pods, under the name Kubernetes v1.20's e2e suite gives it.
pub const BUSYBOX_IMAGE: &str = "docker.io/library/busybox:1.29";

/// What a container of the image runs, and with what: the `config` of an image configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// The program and its first arguments (`ENTRYPOINT`); a pod's `command` replaces it.
    pub entrypoint: Vec<String>,
    /// Arguments after the entrypoint, or the whole command without one (`CMD`); a pod's `args`
    /// replace it.
    pub cmd: Vec<String>,
    /// `NAME=value` pairs.
    pub env: Vec<String>,
    /// The working directory; `/` without one.
    pub workdir: Option<String>,
}

/// Writes `rootfs` as a one-layer image tagged `reference` (e.g. `k8s.gcr.io/pause:3.2`) with
/// `config` to the docker archive `out`.
pub fn docker_archive(
    reference: &str,
    rootfs: &Path,
    config: &ImageConfig,
    out: &Path,
) -> Result<()> {
    ensure!(
        rootfs.is_dir(),
        "the root filesystem {} of image {reference} is not a directory",
        rootfs.display()
    );
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    // The layer goes to a file first: its digest names it inside the archive, and agnhost's
    // root filesystem is too big to hold twice in memory.
    let layer = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary layer file in {}", dir.display()))?;
    let diff_id = write_layer(rootfs, layer.as_file())
        .with_context(|| format!("writing {} as the layer of {reference}", rootfs.display()))?;

    let config_json = serde_json::to_vec(&image_config(config, &diff_id))?;
    let config_id = hex(&Sha256::digest(&config_json));
    let config_name = format!("{config_id}.json");
    let layer_name = format!("{diff_id}/layer.tar");
    let manifest = serde_json::to_vec(&json!([{
        "Config": config_name,
        "RepoTags": [reference],
        "Layers": [layer_name],
    }]))?;

    let file = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary archive in {}", dir.display()))?;
    let mut archive = tar::Builder::new(io::BufWriter::new(file));
    append_bytes(&mut archive, &config_name, &config_json)?;
    let mut layer_file = layer.reopen().context("reopening the layer")?;
    let mut header = file_header(layer_file.metadata()?.len());
    archive
        .append_data(&mut header, &layer_name, &mut layer_file)
        .context("adding the layer")?;
    append_bytes(&mut archive, "manifest.json", &manifest)?;
    let file = archive
        .into_inner()
        .and_then(|w| w.into_inner().map_err(io::IntoInnerError::into_error))
        .context("finishing the archive")?;
    // Readable by all, as files `docker save` writes (temporary files are private).
    fs::set_permissions(file.path(), fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting the mode of {}", file.path().display()))?;
    file.persist(out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// Writes `rootfs` as an uncompressed tar to `out` (symbolic links as links, owners root, no
/// times); returns its sha256 in hex: the layer's diff ID, which the configuration lists and
/// containerd checks when it unpacks the layer.
fn write_layer(rootfs: &Path, out: &fs::File) -> Result<String> {
    let mut layer = tar::Builder::new(HashingWriter {
        inner: io::BufWriter::new(out),
        hash: Sha256::new(),
    });
    layer.mode(tar::HeaderMode::Deterministic);
    layer.follow_symlinks(false);
    layer.append_dir_all(".", rootfs)?;
    let mut writer = layer.into_inner()?;
    writer.inner.flush()?;
    Ok(hex(&writer.hash.finalize()))
}

/// The image configuration (the OCI image spec's, which Docker shares) of a one-layer image.
fn image_config(config: &ImageConfig, diff_id: &str) -> serde_json::Value {
    let mut run = json!({
        "Entrypoint": config.entrypoint,
        "Cmd": config.cmd,
        "Env": config.env,
    });
    if let Some(workdir) = &config.workdir {
        run["WorkingDir"] = json!(workdir);
    }
    json!({
        // containerd imports only images of its own platform unless told otherwise.
        "architecture": architecture(),
        "os": "linux",
        "config": run,
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
    })
}

/// This machine's architecture as Go (and so image configurations) names it.
fn architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn file_header(size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_cksum();
    header
}

fn append_bytes<W: Write>(archive: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> Result<()> {
    archive
        .append_data(&mut file_header(bytes.len() as u64), name, bytes)
        .with_context(|| format!("adding {name}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Passes writes on and hashes them.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, io::Read as _, os::unix::fs::symlink};

    use super::*;

    /// Every entry of the tar `bytes`: path, and content (symbolic links: `-> target`).
    fn entries(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let mut archive = tar::Archive::new(bytes);
        archive
            .entries()
            .unwrap()
            .map(|entry| {
                let mut entry = entry.unwrap();
                let path = entry.path().unwrap().display().to_string();
                let mut content = Vec::new();
                match entry.link_name().unwrap() {
                    Some(target) => content = format!("-> {}", target.display()).into_bytes(),
                    None => {
                        entry.read_to_end(&mut content).unwrap();
                    }
                }
                (path, content)
            })
            .collect()
    }

    #[test]
    fn archive_tags_one_layer_with_its_config() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        fs::create_dir_all(rootfs.join("bin")).unwrap();
        fs::write(rootfs.join("bin/busybox"), b"#!binary").unwrap();
        symlink("busybox", rootfs.join("bin/sh")).unwrap();
        let config = ImageConfig {
            entrypoint: vec!["/bin/sh".into()],
            cmd: vec!["-c".into(), "sleep 1".into()],
            env: vec!["PATH=/bin".into()],
            workdir: Some("/tmp".into()),
        };
        let out = dir.path().join("image.tar");
        docker_archive("docker.io/library/busybox:1.29", &rootfs, &config, &out).unwrap();

        let files = entries(&fs::read(&out).unwrap());
        let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        assert_eq!(
            manifest[0]["RepoTags"],
            json!(["docker.io/library/busybox:1.29"])
        );
        // The configuration is named by its digest and names the layer by its digest.
        let config_name = manifest[0]["Config"].as_str().unwrap();
        let config_json = &files[config_name];
        assert_eq!(
            config_name,
            format!("{}.json", hex(&Sha256::digest(config_json)))
        );
        let layer_name = manifest[0]["Layers"][0].as_str().unwrap();
        let layer = &files[layer_name];
        let diff_id = hex(&Sha256::digest(layer));
        assert_eq!(layer_name, format!("{diff_id}/layer.tar"));
        let image: serde_json::Value = serde_json::from_slice(config_json).unwrap();
        assert_eq!(
            image["rootfs"]["diff_ids"],
            json!([format!("sha256:{diff_id}")])
        );
        assert_eq!(image["config"]["Entrypoint"], json!(["/bin/sh"]));
        assert_eq!(image["config"]["Cmd"], json!(["-c", "sleep 1"]));
        assert_eq!(image["config"]["Env"], json!(["PATH=/bin"]));
        assert_eq!(image["config"]["WorkingDir"], json!("/tmp"));
        assert_eq!(image["os"], json!("linux"));

        // The layer is the root filesystem, links kept as links.
        let layer = entries(layer);
        assert_eq!(layer["bin/busybox"], b"#!binary");
        assert_eq!(layer["bin/sh"], b"-> busybox");

        // The same directory makes the same image.
        let again = dir.path().join("again.tar");
        docker_archive("docker.io/library/busybox:1.29", &rootfs, &config, &again).unwrap();
        assert_eq!(fs::read(&out).unwrap(), fs::read(&again).unwrap());
    }
}
