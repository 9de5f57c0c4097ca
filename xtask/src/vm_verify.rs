//! `cargo xtask vm-verify`: boots Debian 12's own 6.1 LTS kernel in qemu with an initramfs whose
//! init runs `podwire-verify`, so every eBPF program goes through the verifier of the kernel users
//! run, not only this machine's, and pods exchange packets through the datapath attached with
//! netlink tc, as kernels before 6.6 (no TCX) need. Then two nodes in network namespaces run the
//! real `podwire-agent` and `podwire-cni` (in the initramfs too), carry traffic across the VXLAN
//! tunnel and have their agents killed and restarted under continuous traffic. podwire-verify
//! states what it found in one JSON report line (`podwire_lab::vm`), which is checked here.
//!
//! The kernel is Debian's `linux-image-6.1.0-*-cloud-amd64-unsigned` package, downloaded once
//! with apt and unpacked with `dpkg-deb`. KVM does not work on these machines (qemu fails on an
//! MSR with `-cpu host` or `max`): qemu emulates (TCG), which still boots in seconds. The
//! initramfs holds no libc, so podwire's binaries are linked statically (glibc, crt-static); the
//! agent's `nft` comes from this machine with the shared libraries it needs.

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
    (
        "nftables",
        "nft, which the agent runs for its masquerade rules, copied into the VM",
    ),
];
/// The kernel modules the VM loads, by name, of those Debian's cloud kernel builds as modules:
/// veth; clsact and the bpf classifier for netlink tc; the VXLAN device; nftables' NAT chain and
/// masquerade for the agent's rules. What they depend on is found in their `.modinfo` and loaded
/// first.
const MODULES: [&str; 6] = [
    "veth",
    "sch_ingress",
    "cls_bpf",
    "vxlan",
    "nft_chain_nat",
    "nft_masq",
];
/// Lists the modules, in load order, in the unpacked kernel's modules directory; its first line
/// names the [`MODULES`] it was made for.
const LOAD_ORDER: &str = "load-order";
/// Where nft is, on this machine and in the VM.
const NFT: &str = "/usr/sbin/nft";
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Booting takes seconds and emulated verification and delivery little more; the two-node check
/// starts agents (each through the verifier) several times and runs its traffic for a minute or
/// two. Beyond this the VM is stuck.
const TIMEOUT: Duration = Duration::from_secs(480);
/// The agent's environment variables for its datapath mode (`--routing`, `--encap`) that the
/// VM's init passes on from xtask's own environment, e.g.
/// `PODWIRE_ENCAP=bpf cargo xtask vm-verify`.
const AGENT_ENV: [&str; 2] = ["PODWIRE_ROUTING", "PODWIRE_ENCAP"];

/// Printed by the VM's init around podwire-verify's output.
const START: &str = "podwire-vm: running podwire-verify";
const EXIT: &str = "podwire-vm: podwire-verify exited with ";

/// Boots the VM with podwire-verify built around the eBPF `object` and checks its report.
pub fn run(object: &Path) -> Result<()> {
    toolchain::ensure_packages(PACKAGES)?;
    let dir = workspace_root().join("target/vm");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let kernel = kernel(&dir)?;
    let bins = build_static(object)?;
    let initrd = initramfs(&dir, &bins, &kernel.modules)?;
    let started = Instant::now();
    let serial = boot(&kernel.vmlinuz, &initrd)?;
    eprintln!(
        "xtask: the VM ran for {:.1} s",
        started.elapsed().as_secs_f64()
    );
    check(&serial)
}

/// A kernel image and the [`MODULES`] of its release with what they depend on, in load order.
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
    let vmlinuz = dir.join(format!("vmlinuz-{release}"));
    if vmlinuz.exists() {
        if let Some(modules) = cached_modules(&modules_dir)? {
            return Ok(Kernel { vmlinuz, modules });
        }
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
    let release_dir = unpacked.join(format!("lib/modules/{release}"));
    let index = module_index(&release_dir.join("kernel"))?;
    let builtin = fs::read_to_string(release_dir.join("modules.builtin"))
        .context("reading the kernel's modules.builtin")?;
    let builtin: Vec<String> = builtin
        .lines()
        .filter_map(|line| Path::new(line).file_stem())
        .map(|stem| module_name(&stem.to_string_lossy()))
        .collect();
    let mut depends = std::collections::BTreeMap::new();
    for (name, path) in &index {
        let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        depends.insert(name.clone(), modinfo_depends(&bytes));
    }
    let order = load_order(&MODULES, &depends, &builtin)?;
    remove_dir(&modules_dir)?;
    fs::create_dir_all(&modules_dir)
        .with_context(|| format!("creating {}", modules_dir.display()))?;
    for name in &order {
        let from = &index[name];
        let to = modules_dir.join(format!("{name}.ko"));
        fs::rename(from, &to)
            .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
    }
    fs::write(
        modules_dir.join(LOAD_ORDER),
        format!("{}\n{}\n", MODULES.join(" "), order.join("\n")),
    )
    .context("writing the modules' load order")?;
    let from = unpacked.join(format!("boot/vmlinuz-{release}"));
    fs::rename(&from, &vmlinuz)
        .with_context(|| format!("moving {} to {}", from.display(), vmlinuz.display()))?;
    remove_dir(&unpacked)?;
    Ok(Kernel {
        vmlinuz,
        modules: cached_modules(&modules_dir)?
            .context("the modules just unpacked are not where they were put")?,
    })
}

/// The modules unpacked earlier into `dir`, in load order, if they were unpacked for [`MODULES`].
fn cached_modules(dir: &Path) -> Result<Option<Vec<PathBuf>>> {
    let Ok(listing) = fs::read_to_string(dir.join(LOAD_ORDER)) else {
        return Ok(None);
    };
    let mut lines = listing.lines();
    if lines.next() != Some(MODULES.join(" ").as_str()) {
        return Ok(None);
    }
    let modules: Vec<PathBuf> = lines.map(|name| dir.join(format!("{name}.ko"))).collect();
    Ok(modules.iter().all(|m| m.exists()).then_some(modules))
}

/// A module's name as the kernel knows it: its file's stem with `-` as `_`.
fn module_name(stem: &str) -> String {
    stem.replace('-', "_")
}

/// Every `.ko` below `dir`, by module name.
fn module_index(dir: &Path) -> Result<std::collections::BTreeMap<String, PathBuf>> {
    let mut index = std::collections::BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "ko") {
                let stem = path.file_stem().expect("a .ko file").to_string_lossy();
                index.insert(module_name(&stem), path);
            }
        }
    }
    Ok(index)
}

/// The modules a module needs loaded first: its `.modinfo` section's `depends=` (NUL-separated
/// `key=value` strings; the list comma-separated, empty when none).
fn modinfo_depends(module: &[u8]) -> Vec<String> {
    module
        .split(|&b| b == 0)
        .find_map(|field| field.strip_prefix(b"depends="))
        .map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .filter(|name| !name.is_empty())
                .map(module_name)
                .collect()
        })
        .unwrap_or_default()
}

/// `wanted` and everything they depend on (through `depends`), each after its dependencies;
/// modules built into the kernel (`builtin`) need no loading.
fn load_order(
    wanted: &[&str],
    depends: &std::collections::BTreeMap<String, Vec<String>>,
    builtin: &[String],
) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        depends: &std::collections::BTreeMap<String, Vec<String>>,
        builtin: &[String],
        order: &mut Vec<String>,
        path: &mut Vec<String>,
    ) -> Result<()> {
        if order.iter().any(|m| m == name) || builtin.iter().any(|m| m == name) {
            return Ok(());
        }
        ensure!(
            !path.iter().any(|m| m == name),
            "modules depend on each other in a cycle: {} -> {name}",
            path.join(" -> ")
        );
        let needs = depends.get(name).with_context(|| {
            format!("the kernel has no module {name} (needed by {path:?}), nor is it built in")
        })?;
        path.push(name.to_owned());
        for dep in needs {
            visit(dep, depends, builtin, order, path)?;
        }
        path.pop();
        order.push(name.to_owned());
        Ok(())
    }
    let mut order = Vec::new();
    for name in wanted {
        visit(name, depends, builtin, &mut order, &mut Vec::new())?;
    }
    Ok(order)
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

/// podwire's binaries for the VM, built statically.
struct StaticBins {
    verifier: PathBuf,
    agent: PathBuf,
    plugin: PathBuf,
}

/// Builds podwire-verify, the agent and the plugin statically, since the initramfs has no libc.
fn build_static(object: &Path) -> Result<StaticBins> {
    let target_dir = workspace_root().join("target");
    let mut cargo = build::userspace_cargo(object);
    cargo
        .args(["build", "--release"])
        .args(["-p", "podwire-agent", "-p", "podwire-cni"])
        .args([
            "--bin",
            "podwire-verify",
            "--bin",
            "podwire-agent",
            "--bin",
            "podwire-cni",
        ])
        // An explicit target keeps crt-static off build scripts and proc macros.
        .args(["--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    cmd::run(cargo).context("building podwire-verify, podwire-agent and podwire-cni statically")?;
    let release = target_dir.join(TARGET).join("release");
    Ok(StaticBins {
        verifier: release.join("podwire-verify"),
        agent: release.join("podwire-agent"),
        plugin: release.join("podwire-cni"),
    })
}

/// The files `binary` loads at run time (the dynamic loader included), from `ldd`'s output.
fn shared_libraries(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Packs busybox, podwire's binaries, nft with its libraries, `modules` and an init loading them
/// and running podwire-verify into `dir`/initrd.gz (newc cpio, gzip).
fn initramfs(dir: &Path, bins: &StaticBins, modules: &[PathBuf]) -> Result<PathBuf> {
    let root = dir.join("initramfs");
    remove_dir(&root)?;
    let ldd = Command::new("ldd")
        .arg(NFT)
        .output()
        .with_context(|| format!("running ldd {NFT}"))?;
    ensure!(ldd.status.success(), "ldd {NFT} failed: {}", ldd.status);
    let mut files: Vec<(PathBuf, String)> = vec![
        ("/bin/busybox".into(), "bin/busybox".into()),
        (bins.verifier.clone(), "podwire-verify".into()),
        (bins.agent.clone(), "podwire-agent".into()),
        (bins.plugin.clone(), "podwire-cni".into()),
        (NFT.into(), NFT.trim_start_matches('/').into()),
    ];
    for library in shared_libraries(&String::from_utf8_lossy(&ldd.stdout)) {
        let inside = library.to_string_lossy().trim_start_matches('/').to_owned();
        files.push((library, inside));
    }
    let module_files: Vec<String> = modules
        .iter()
        .map(|module| {
            let name = module.file_name().expect("a file").to_string_lossy();
            format!("modules/{name}")
        })
        .collect();
    files.extend(modules.iter().cloned().zip(module_files.iter().cloned()));
    // Every directory a file lies in, parents first; /run for the agents' sockets and lock.
    let mut dirs =
        std::collections::BTreeSet::from(["dev", "proc", "sys", "run"].map(PathBuf::from));
    for (_, to) in &files {
        dirs.extend(
            Path::new(to)
                .ancestors()
                .skip(1)
                .filter(|p| !p.as_os_str().is_empty())
                .map(Path::to_path_buf),
        );
    }
    for sub in &dirs {
        fs::create_dir_all(root.join(sub))
            .with_context(|| format!("creating {}", root.display()))?;
    }
    for (from, to) in &files {
        fs::copy(from, root.join(to)).with_context(|| format!("copying {}", from.display()))?;
    }
    let insmod: String = module_files
        .iter()
        .map(|to| format!("/bin/busybox insmod /{to}\n"))
        .collect();
    // procfs for the kernel release and sysctls, sysfs for the kernel's BTF, CPU list and
    // /sys/fs/bpf, where the agents mount bpffs. The modules load after START so that their
    // errors are echoed. PATH for the agents' nft. Powering off makes qemu exit (-no-reboot).
    // The agents' datapath mode (--routing, --encap) as xtask's environment names it, so a run
    // can put another mode's programs through the 6.1 verifier (the programs are loaded with
    // their mode fixed, and the verifier skips the other modes' paths).
    let agent_env: String = AGENT_ENV
        .iter()
        .filter_map(|var| Some((var, std::env::var(var).ok()?)))
        .filter(|(_, value)| value.chars().all(|c| c.is_ascii_alphanumeric()))
        .map(|(var, value)| format!("export {var}={value}\n"))
        .collect();
    let init = format!(
        "#!/bin/busybox sh\n\
         export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n\
         {agent_env}\
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
    // What a child's stdin is when nothing is piped to it (the agents' nft, podwire's commands).
    mknod(
        &root.join("dev/null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .context("creating dev/null in the initramfs (needs root)")?;

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
    let entries: Vec<String> = ["."]
        .into_iter()
        .map(str::to_owned)
        .chain(dirs.iter().map(|d| d.to_string_lossy().into_owned()))
        .chain(["dev/console", "dev/null", "init"].map(str::to_owned))
        .chain(files.iter().map(|(_, to)| to.clone()))
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
        "1024",
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
/// program of `podwire_core::object::programs::ALL` verified, datagrams delivered pod-to-pod
/// through netlink tc with forwarding off, and the two-node check without problems (traffic
/// across the tunnel, agents restarted under load adopting the pinned state, no stream broken
/// or stalled, at most 0.1% of pings lost).
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
    let cluster = report
        .cluster
        .context("podwire-verify succeeded but reported no two-node check")?;
    let problems = cluster.problems();
    ensure!(
        problems.is_empty() && cluster.attach == NETLINK_TC,
        "the two-node check on kernel {} (attached with {}) found: {problems:#?}",
        report.kernel,
        cluster.attach
    );
    let (sent, lost) = cluster.pings.iter().fold((0, 0), |(sent, lost), p| {
        (sent + p.sent, lost + p.sent - p.received)
    });
    let bytes: u64 = cluster.streams.iter().map(|s| s.bytes).sum();
    let serving: Vec<String> = cluster
        .restarts
        .iter()
        .map(|r| format!("{} ms", r.serving_ms))
        .collect();
    eprintln!(
        "xtask: two nodes with the real agent and plugin: {} streams carried {bytes} bytes in \
         order and {sent} pings lost {lost}, through the tunnel too ({} packets in, {} out), while \
         agents were killed and restarted {} times, adopting the pinned state (serving again \
         after {})",
        cluster.streams.len(),
        cluster.tunnelled_packets,
        cluster.from_tunnel_packets,
        cluster.restarts.len(),
        serving.join(", ")
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_modules_depends_come_from_its_modinfo() {
        let ko = b"\x7fELF...\0license=GPL\0depends=udp_tunnel,ip6_udp_tunnel\0retpoline=Y\0";
        assert_eq!(modinfo_depends(ko), ["udp_tunnel", "ip6_udp_tunnel"]);
        assert_eq!(
            modinfo_depends(b"\0depends=\0intree=Y\0"),
            Vec::<String>::new()
        );
        assert_eq!(modinfo_depends(b"no modinfo"), Vec::<String>::new());
    }

    #[test]
    fn modules_load_after_what_they_depend_on_once_each() {
        let deps: BTreeMap<String, Vec<String>> = [
            ("vxlan", &["udp_tunnel", "ip6_udp_tunnel"][..]),
            ("udp_tunnel", &[]),
            ("ip6_udp_tunnel", &[]),
            ("nft_masq", &["nf_nat", "nf_tables"]),
            ("nf_nat", &["nf_conntrack", "libcrc32c"]),
            ("nf_conntrack", &["libcrc32c"]),
            ("libcrc32c", &[]),
            ("nf_tables", &["nfnetlink"]),
            ("veth", &[]),
        ]
        .into_iter()
        .map(|(m, d)| (m.to_owned(), d.iter().map(|s| s.to_string()).collect()))
        .collect();
        let order =
            load_order(&["veth", "vxlan", "nft_masq"], &deps, &["nfnetlink".into()]).unwrap();
        assert_eq!(
            order,
            [
                "veth",
                "udp_tunnel",
                "ip6_udp_tunnel",
                "vxlan",
                "libcrc32c",
                "nf_conntrack",
                "nf_nat",
                "nf_tables",
                "nft_masq"
            ]
        );
        let err = load_order(&["nf_tables"], &deps, &[]).unwrap_err();
        assert!(err.to_string().contains("no module nfnetlink"), "{err}");
        let cycle: BTreeMap<String, Vec<String>> = [("a", "b"), ("b", "a")]
            .into_iter()
            .map(|(m, d)| (m.to_owned(), vec![d.to_owned()]))
            .collect();
        assert!(load_order(&["a"], &cycle, &[]).is_err());
    }

    #[test]
    fn ldd_names_the_libraries_and_the_loader() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibnftables.so.1 => /lib/x86_64-linux-gnu/libnftables.so.1 (0x00007fb7)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fb6)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007fb8)\n";
        assert_eq!(
            shared_libraries(ldd),
            [
                "/lib/x86_64-linux-gnu/libnftables.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }
}
