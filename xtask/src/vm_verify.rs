//! `cargo xtask vm-verify`: boots Debian 12's own 6.1 LTS kernel in qemu with an initramfs whose
//! init runs `podwire-verify`, so every eBPF program goes through the verifier of the kernel users
//! run, not only this machine's, and pods exchange packets through the datapath attached with
//! netlink tc, as kernels before 6.6 (no TCX) need. podwire-verify states what it found in one
//! JSON report line (`podwire_lab::vm`), which is checked here.
//!
//! The kernel is Debian's `linux-image-6.1.0-*-cloud-amd64-unsigned` package, downloaded once
//! with apt and unpacked with `dpkg-deb`. KVM does not work on these machines (qemu fails on an
//! MSR with `-cpu host` or `max`): qemu emulates (TCG), which still boots in seconds. The
//! initramfs holds no libc, so podwire-verify is linked statically (glibc, crt-static).

use std::{
    fs::{self, File},
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use podwire_core::object::programs;
use podwire_lab::vm::{VerifyReport, NETLINK_TC};

use crate::{
    build::{self, workspace_root},
    cmd, toolchain,
};

const PACKAGES: &[(&str, &str)] = &[
    (
        "qemu-system-x86",
        "emulates the machine that boots Debian's 6.1 kernel",
    ),
    (
        "busybox-static",
        "the shell and mount in the VM's initramfs",
    ),
    ("cpio", "packs the initramfs"),
];
/// What podwire-verify's pod-to-pod check needs that Debian's cloud kernel builds as modules
/// (paths below lib/modules/<release>/kernel; none depends on another): veth, and clsact and the
/// bpf classifier for netlink tc.
const MODULES: [&str; 3] = [
    "drivers/net/veth.ko",
    "net/sched/sch_ingress.ko",
    "net/sched/cls_bpf.ko",
];
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Booting takes seconds and emulated verification and delivery little more; beyond this the VM
/// is stuck.
const TIMEOUT: Duration = Duration::from_secs(180);
/// Printed by the VM's init around podwire-verify's output.
const START: &str = "podwire-vm: running podwire-verify";
const EXIT: &str = "podwire-vm: podwire-verify exited with ";

/// Boots the VM with podwire-verify built around the eBPF `object` and checks its report.
pub fn run(object: &Path) -> Result<()> {
    toolchain::ensure_packages(PACKAGES)?;
    let dir = workspace_root().join("target/vm");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let kernel = kernel(&dir)?;
    let verifier = build_verifier(object)?;
    let initrd = initramfs(&dir, &verifier, &kernel.modules)?;
    let started = Instant::now();
    let serial = boot(&kernel.vmlinuz, &initrd)?;
    eprintln!(
        "xtask: the VM ran for {:.1} s",
        started.elapsed().as_secs_f64()
    );
    check(&serial)
}

/// A kernel image and the [`MODULES`] of its release.
struct Kernel {
    vmlinuz: PathBuf,
    modules: Vec<PathBuf>,
}

/// The newest Debian 6.1 cloud kernel in apt's lists, downloaded and unpacked once into `dir`.
fn kernel(dir: &Path) -> Result<Kernel> {
    let package = newest_kernel_package()?;
    let release = package
        .strip_prefix("linux-image-")
        .and_then(|rest| rest.strip_suffix("-unsigned"))
        .expect("the search pattern fixes prefix and suffix");
    let modules_dir = dir.join(format!("modules-{release}"));
    let kernel = Kernel {
        vmlinuz: dir.join(format!("vmlinuz-{release}")),
        modules: MODULES
            .iter()
            .map(|module| modules_dir.join(Path::new(module).file_name().expect("a file")))
            .collect(),
    };
    if kernel.vmlinuz.exists() && kernel.modules.iter().all(|m| m.exists()) {
        return Ok(kernel);
    }
    let deb = match cached_deb(dir, &package)? {
        Some(deb) => deb,
        None => {
            eprintln!("xtask: downloading {package} (Debian 12's 6.1 kernel, once)");
            let mut download = Command::new("apt-get");
            download.current_dir(dir).args(["-q", "download", &package]);
            cmd::run(download).with_context(|| format!("downloading {package}"))?;
            cached_deb(dir, &package)?.with_context(|| {
                format!(
                    "apt-get download left no {package}_*.deb in {}",
                    dir.display()
                )
            })?
        }
    };
    // Unpacked aside and moved into place last, so an interrupted run leaves no half kernel.
    let unpacked = dir.join("unpacked");
    remove_dir(&unpacked)?;
    let mut extract = Command::new("dpkg-deb");
    extract.arg("-x").arg(&deb).arg(&unpacked);
    cmd::run(extract)
        .with_context(|| format!("unpacking {} (delete it to download again)", deb.display()))?;
    fs::create_dir_all(&modules_dir)
        .with_context(|| format!("creating {}", modules_dir.display()))?;
    let modules = unpacked.join(format!("lib/modules/{release}/kernel"));
    let moves = MODULES
        .iter()
        .map(|module| modules.join(module))
        .zip(&kernel.modules)
        .chain([(
            unpacked.join(format!("boot/vmlinuz-{release}")),
            &kernel.vmlinuz,
        )]);
    for (inside, to) in moves {
        fs::rename(&inside, to)
            .with_context(|| format!("moving {} to {}", inside.display(), to.display()))?;
    }
    remove_dir(&unpacked)?;
    Ok(kernel)
}

fn newest_kernel_package() -> Result<String> {
    let pattern = r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$";
    let out = Command::new("apt-cache")
        .args(["search", "--names-only", pattern])
        .output()
        .context("running apt-cache search")?;
    ensure!(
        out.status.success(),
        "apt-cache search {pattern} failed: {}",
        out.status
    );
    // "linux-image-6.1.0-56-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud": newest ABI wins.
    let abi = |name: &str| -> Option<u32> {
        name.strip_prefix("linux-image-6.1.0-")?
            .split('-')
            .next()?
            .parse()
            .ok()
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| Some((abi(name)?, name.to_owned())))
        .max()
        .map(|(_, name)| name)
        .context("apt knows no linux-image-6.1.0-*-cloud-amd64-unsigned: run `apt-get update`")
}

/// The .deb of `package` that an earlier run downloaded into `dir`, if any.
fn cached_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(dir.join(&*name)));
        }
    }
    Ok(None)
}

/// Builds podwire-verify statically, since the initramfs has no libc; returns its path.
fn build_verifier(object: &Path) -> Result<PathBuf> {
    let target_dir = workspace_root().join("target");
    let mut cargo = build::userspace_cargo(object);
    cargo
        .args([
            "build",
            "--release",
            "-p",
            "podwire-agent",
            "--bin",
            "podwire-verify",
        ])
        // An explicit target keeps crt-static off build scripts and proc macros.
        .args(["--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    cmd::run(cargo).context("building podwire-verify statically")?;
    Ok(target_dir.join(TARGET).join("release/podwire-verify"))
}

/// Packs busybox, podwire-verify, `modules` and an init loading them and running podwire-verify
/// into `dir`/initrd.gz (newc cpio, gzip).
fn initramfs(dir: &Path, verifier: &Path, modules: &[PathBuf]) -> Result<PathBuf> {
    let root = dir.join("initramfs");
    remove_dir(&root)?;
    let dirs = ["bin", "dev", "proc", "sys", "modules"];
    for sub in dirs {
        fs::create_dir_all(root.join(sub))
            .with_context(|| format!("creating {}", root.display()))?;
    }
    let modules: Vec<(&Path, String)> = modules
        .iter()
        .map(|module| {
            let name = module.file_name().expect("a file").to_string_lossy();
            (module.as_path(), format!("modules/{name}"))
        })
        .collect();
    let files: Vec<(&Path, String)> = [
        (Path::new("/bin/busybox"), "bin/busybox".to_owned()),
        (verifier, "podwire-verify".to_owned()),
    ]
    .into_iter()
    .chain(modules.iter().cloned())
    .collect();
    for (from, to) in &files {
        fs::copy(from, root.join(to)).with_context(|| format!("copying {}", from.display()))?;
    }
    let insmod: String = modules
        .iter()
        .map(|(_, to)| format!("/bin/busybox insmod /{to}\n"))
        .collect();
    // procfs for the kernel release and sysctls, sysfs for the kernel's BTF and CPU list; nothing
    // is pinned, so no bpffs. The modules load after START so that their errors are echoed.
    // Powering off makes qemu exit (-no-reboot).
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -t sysfs sysfs /sys\n\
         echo '{START}'\n\
         {insmod}\
         /podwire-verify\n\
         echo \"{EXIT}$?\"\n\
         /bin/busybox poweroff -f\n"
    );
    let init_path = root.join("init");
    fs::write(&init_path, init).context("writing the VM's init")?;
    fs::set_permissions(&init_path, fs::Permissions::from_mode(0o755))
        .context("making the VM's init executable")?;
    // The kernel hands init /dev/console as stdio; ours must not depend on the kernel's own
    // built-in initramfs providing it.
    mknod(
        &root.join("dev/console"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        makedev(5, 1),
    )
    .context("creating dev/console in the initramfs (needs root)")?;

    let initrd = dir.join("initrd.gz");
    let out = File::create(&initrd).with_context(|| format!("creating {}", initrd.display()))?;
    let mut cpio = Command::new("cpio")
        .args(["--quiet", "-o", "-H", "newc", "-R", "0:0"])
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cpio")?;
    let cpio_out = cpio.stdout.take().expect("piped");
    let mut gzip = Command::new("gzip")
        .stdin(cpio_out)
        .stdout(out)
        .spawn()
        .context("starting gzip")?;
    let entries: Vec<&str> = [".", "dev/console", "init"]
        .into_iter()
        .chain(dirs)
        .chain(files.iter().map(|(_, to)| to.as_str()))
        .collect();
    let mut list = cpio.stdin.take().expect("piped");
    list.write_all(entries.join("\n").as_bytes())
        .context("listing files to cpio")?;
    drop(list);
    let cpio_status = cpio.wait().context("waiting for cpio")?;
    let gzip_status = gzip.wait().context("waiting for gzip")?;
    ensure!(
        cpio_status.success(),
        "cpio failed packing {}: {cpio_status}",
        root.display()
    );
    ensure!(
        gzip_status.success(),
        "gzip failed writing {}: {gzip_status}",
        initrd.display()
    );
    Ok(initrd)
}

/// Boots the VM and returns its serial console, line by line, echoing podwire-verify's lines.
fn boot(vmlinuz: &Path, initrd: &Path) -> Result<Vec<String>> {
    eprintln!("xtask: booting {} in qemu (TCG)", vmlinuz.display());
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        "512",
        "-nographic",
        "-no-reboot",
    ])
    // The VM needs no network, and gets none.
    .args(["-nic", "none"])
    .arg("-kernel")
    .arg(vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    // panic=-1 reboots on a panic, which -no-reboot turns into qemu exiting.
    .args(["-append", "console=ttyS0 panic=-1 quiet"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    let mut child = qemu.spawn().with_context(|| format!("starting {qemu:?}"))?;
    let mut console = BufReader::new(child.stdout.take().expect("piped"));
    let (tx, rx) = mpsc::channel();
    // A reader thread, so the wait for the next line can time out.
    thread::spawn(move || {
        let mut line = Vec::new();
        while console.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&line).trim_end().to_owned();
            if tx.send(text).is_err() {
                break;
            }
            line.clear();
        }
    });

    let deadline = Instant::now() + TIMEOUT;
    let mut serial = Vec::new();
    let mut echoing = false;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                // The kernel's console reset escapes precede the first line init prints.
                if line.ends_with(START) {
                    echoing = true;
                } else if echoing {
                    println!("{line}");
                    echoing = !line.starts_with(EXIT);
                }
                serial.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Ignoring errors: qemu may have exited just now.
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the VM did not finish within {} s; its serial console:\n{}",
                    TIMEOUT.as_secs(),
                    serial.join("\n")
                );
            }
        }
    }
    let status = child.wait().context("waiting for qemu")?;
    ensure!(
        status.success(),
        "{qemu:?} failed: {status}; its serial console:\n{}",
        serial.join("\n")
    );
    Ok(serial)
}

/// Fails unless podwire-verify exited 0 and its report says: no error, a 6.1 kernel, every
/// program of `podwire_core::object::programs::ALL` verified, and datagrams delivered pod-to-pod
/// through netlink tc with forwarding off.
fn check(serial: &[String]) -> Result<()> {
    let console = || serial.join("\n");
    let Some(code) = serial.iter().find_map(|line| line.strip_prefix(EXIT)) else {
        bail!(
            "the VM never reported podwire-verify's exit (kernel panic or broken init?); \
             its serial console:\n{}",
            console()
        );
    };
    let report = serial
        .iter()
        .find_map(|line| VerifyReport::from_line(line))
        .with_context(|| {
            format!(
                "podwire-verify exited with {code} without a report line (did it crash?); \
                 its serial console:\n{}",
                console()
            )
        })??;
    if let Some(error) = &report.error {
        bail!(
            "podwire-verify failed on kernel {} (exit code {code}): {error}",
            report.kernel
        );
    }
    ensure!(
        code == "0",
        "podwire-verify exited with {code} but reported no error: {report:?}"
    );
    ensure!(
        report.kernel.starts_with("6.1."),
        "the VM ran kernel {:?}, not Debian's 6.1",
        report.kernel
    );
    ensure!(
        report.verified == programs::ALL,
        "podwire-verify verified {:?}, the object has {:?}",
        report.verified,
        programs::ALL
    );
    let delivery = report
        .delivery
        .context("podwire-verify succeeded but reported no pod-to-pod delivery")?;
    ensure!(
        delivery.attach == NETLINK_TC && !delivery.forwarding && delivery.datagrams > 0,
        "podwire-verify's pod-to-pod delivery was not through {NETLINK_TC} with forwarding off: \
         {delivery:?}"
    );
    eprintln!(
        "xtask: all {} podwire programs passed the verifier of kernel {}, and {} datagrams of {} \
         to {} bytes went pod-to-pod through from_pod attached with netlink tc, forwarding off",
        report.verified.len(),
        report.kernel,
        delivery.datagrams,
        delivery.min_bytes,
        delivery.max_bytes
    );
    Ok(())
}

fn remove_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}
