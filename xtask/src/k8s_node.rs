//! What a kubelet node of the lab runs besides kubelet and kube-proxy: containerd 1.6.20 and runc
//! 1.1.5, the CNI `loopback` plugin every kubeadm node has in /opt/cni/bin, and the images every
//! node imports: the sandbox image (pause) and busybox for test pods. All of it lands in
//! target/k8s/node, where the lab finds it through [`podwire_lab::artifacts`].
//!
//! containerd and runc are Debian 12's (`containerd`, `runc`), taken out of their packages with
//! `dpkg-deb -x`, never installed: the `containerd` package would enable a containerd service on
//! the host. The tools kubelet and kube-proxy call from PATH (iptables, conntrack) and the
//! reference CNI plugins are installed from Debian by [`crate::k8s`] and [`crate::cnitool`].
//! pause is compiled statically from Kubernetes' build/pause/linux/pause.c, taken out of Debian's
//! `kubernetes` source package alone (seconds), so a missing pause never rebuilds Kubernetes.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context as _, Result};
use podwire_lab::{
    images::{docker_archive, ImageConfig, BUSYBOX_IMAGE, PAUSE_IMAGE},
    kubelet,
};

use crate::{
    apt::{Packaged, PrivateApt},
    build::workspace_root,
    cmd::run,
    k8s,
    toolchain::ensure_packages,
};

/// What building pause and the busybox image needs from the machine.
const TOOL_PACKAGES: &[(&str, &str)] = &[
    ("gcc", "to compile the pause binary of the sandbox image"),
    ("libc6-dev", "the static C library pause links"),
    ("busybox-static", "the busybox of the test pods' image"),
    (
        "containernetworking-plugins",
        "the CNI loopback plugin every kubelet node has",
    ),
];

const PACKAGED: &[Packaged] = &[
    Packaged {
        name: "containerd",
        package: "containerd",
        pin: None,
        path: "usr/bin/containerd",
        version_args: &["--version"],
        version: " 1.6.20",
    },
    Packaged {
        name: "containerd-shim-runc-v2",
        package: "containerd",
        pin: None,
        path: "usr/bin/containerd-shim-runc-v2",
        version_args: &["-v"],
        version: "Version:  1.6.20",
    },
    Packaged {
        name: "ctr",
        package: "containerd",
        pin: None,
        path: "usr/bin/ctr",
        version_args: &["--version"],
        version: " 1.6.20",
    },
    Packaged {
        name: "runc",
        package: "runc",
        pin: None,
        path: "usr/sbin/runc",
        version_args: &["--version"],
        version: "runc version 1.1.5",
    },
];

/// The images every node imports, by file name in target/k8s/node/images.
const PAUSE_ARCHIVE: &str = "pause.tar";
const BUSYBOX_ARCHIVE: &str = "busybox.tar";
/// The version pause reports with `-v`, as in the sandbox image's tag.
const PAUSE_VERSION: &str = "3.2";
/// Kubernetes' pause program inside its source tree.
const PAUSE_SOURCE: &str = "build/pause/linux/pause.c";

/// Returns target/k8s/node (`bin/`: containerd, its runc shim, ctr, runc, pause; `cni/`:
/// loopback; `images/`: the sandbox and busybox images), fetching and building what is missing.
pub fn ensure() -> Result<PathBuf> {
    ensure_packages(TOOL_PACKAGES)?;
    let node = workspace_root().join("target/k8s/node");
    let (bin, cni, images) = (node.join("bin"), node.join("cni"), node.join("images"));
    // Another xtask may be filling the same directory.
    let _lock = k8s::lock(&node)?;
    let packaged: Vec<&Packaged> = PACKAGED.iter().filter(|p| !p.is_in(&bin)).collect();
    let pause = bin.join("pause");
    let have_pause = pause_runs(&pause);
    let loopback = cni.join("loopback");
    let images_done = [PAUSE_ARCHIVE, BUSYBOX_ARCHIVE]
        .iter()
        .all(|name| images.join(name).exists());
    if packaged.is_empty() && have_pause && loopback.exists() && images_done {
        return Ok(node);
    }
    for dir in [&bin, &cni, &images] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let work = node.join("work");
    // An interrupted earlier run may have left its files behind.
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    eprintln!(
        "xtask: preparing the lab's kubelet node runtime in {} (containerd and runc from Debian, \
         pause, images; once)",
        node.display()
    );
    let needs_apt = !packaged.is_empty() || !have_pause;
    let apt = needs_apt
        .then(|| PrivateApt::new(&work.join("apt")))
        .transpose()?;
    if let Some(apt) = &apt {
        if !packaged.is_empty() {
            apt.extract(&work.join("debs"), &packaged, &bin)?;
        }
        if !have_pause {
            build_pause(apt, &work.join("pause"), &pause)?;
        }
    }
    let from = Path::new(kubelet::REFERENCE_PLUGINS).join("loopback");
    fs::copy(&from, &loopback)
        .with_context(|| format!("copying {} to {}", from.display(), loopback.display()))?;
    // The images follow their content: rebuilt whenever the binaries were.
    pause_image(
        &pause,
        &work.join("pause-rootfs"),
        &images.join(PAUSE_ARCHIVE),
    )?;
    busybox_image(&work.join("busybox-rootfs"), &images.join(BUSYBOX_ARCHIVE))?;
    fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    for p in PACKAGED {
        p.check(&bin)?;
    }
    ensure!(
        pause_runs(&pause),
        "{} was built but does not report its version",
        pause.display()
    );
    Ok(node)
}

/// Whether `pause -v` prints the version of the sandbox image.
fn pause_runs(pause: &Path) -> bool {
    Command::new(pause)
        .arg("-v")
        .output()
        .is_ok_and(|out| out.stdout == format!("pause.c v{PAUSE_VERSION}\n").as_bytes())
}

/// Compiles Kubernetes' pause.c, taken out of the source package, statically into `out`.
fn build_pause(apt: &PrivateApt, work: &Path, out: &Path) -> Result<()> {
    k8s::source_files(apt, work, &[PAUSE_SOURCE])?;
    let source = work.join(PAUSE_SOURCE);
    let mut gcc = Command::new("gcc");
    gcc.args(["-Os", "-static", "-Wall", "-Werror"])
        .arg(format!("-DVERSION=v{PAUSE_VERSION}"))
        .arg("-o")
        .arg(out)
        .arg(&source);
    run(gcc).context("compiling pause")?;
    let mut strip = Command::new("strip");
    strip.arg(out);
    run(strip).context("stripping pause")
}

/// The sandbox image: pause alone, as upstream's.
fn pause_image(pause: &Path, rootfs: &Path, out: &Path) -> Result<()> {
    fs::create_dir_all(rootfs).with_context(|| format!("creating {}", rootfs.display()))?;
    fs::copy(pause, rootfs.join("pause")).context("copying pause into its image")?;
    let config = ImageConfig {
        entrypoint: vec!["/pause".into()],
        ..ImageConfig::default()
    };
    docker_archive(PAUSE_IMAGE, rootfs, &config, out)
}

/// busybox for test pods: Debian's static busybox with a link for each applet in /bin, a shell
/// by default.
fn busybox_image(rootfs: &Path, out: &Path) -> Result<()> {
    const BUSYBOX: &str = "/bin/busybox";
    let bin = rootfs.join("bin");
    for dir in [bin.clone(), rootfs.join("tmp"), rootfs.join("etc")] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::copy(BUSYBOX, bin.join("busybox"))
        .with_context(|| format!("copying {BUSYBOX} (busybox-static) into its image"))?;
    let list = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .with_context(|| format!("running {BUSYBOX} --list"))?;
    ensure!(list.status.success(), "{BUSYBOX} --list failed");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            symlink("busybox", bin.join(applet))
                .with_context(|| format!("linking busybox's {applet}"))?;
        }
    }
    let config = ImageConfig {
        cmd: vec!["sh".into()],
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        ..ImageConfig::default()
    };
    docker_archive(BUSYBOX_IMAGE, rootfs, &config, out)
}
