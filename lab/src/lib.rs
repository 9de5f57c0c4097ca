//! podwire's lab: a cluster on this machine, for the integration tests, `cargo xtask demo` and
//! `cargo xtask bench`. Nodes and pods are network namespaces ([`namespaces`]) joined by veths and
//! an underlay bridge ([`nodes`]); each node runs the real `podwire-agent` ([`processes`]); pods
//! are wired by exec'ing the real CNI plugin as a container runtime does ([`cni`]); traffic
//! between them is real ([`traffic`]; continuous streams and pings for tests that break things
//! underneath them in [`load`]), and so are the frames crafted for the programs
//! ([`packets`]). [`k8s`] adds a real Kubernetes control plane and the real kube-proxy on the
//! nodes, for Services; [`kubelet`] a whole cluster of real kubelet and containerd nodes, whose
//! images [`images`] writes. What `cargo xtask` built is found through [`artifacts`]. [`vm`] is
//! what `podwire-verify` reports from the VM `cargo xtask vm-verify` boots.
//!
//! Everything made here is removed when its guard drops, also when a test fails; leftovers of a
//! process that was killed are swept by the next one. Needs root.

pub mod artifacts;
pub mod cni;
pub mod dns;
pub mod faults;
pub mod images;
pub mod k8s;
pub mod kubelet;
pub mod load;
pub mod namespaces;
pub mod nodes;
pub mod packets;
pub mod processes;
pub mod traffic;
pub mod vm;

/// Prefix of every namespace and pin root the lab makes, followed by the role, the process id
/// and a sequence number (`pwlab-node-4242-0`): the sweep knows its own by it.
pub const PREFIX: &str = "pwlab";

/// Fails unless this runs as root: the lab must never skip silently.
pub fn require_root() -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "podwire's lab creates network namespaces and loads eBPF: run it as root \
         (cargo xtask test, cargo xtask demo)"
    );
    Ok(())
}

/// Polls `probe` for up to `within` until it holds; whether it did. The bound is against
/// hanging and for what must not happen: tests never assert on time.
pub fn eventually(
    within: std::time::Duration,
    mut probe: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<bool> {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if probe()? {
            return Ok(true);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(false)
}

/// Takes the exclusive lock of the file `path` (created), waiting, with a line saying so on
/// stderr, while another process holds it: `waiting` says what for.
pub fn lock_exclusive(
    path: &std::path::Path,
    waiting: &str,
) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use anyhow::Context as _;
    use nix::{
        errno::Errno,
        fcntl::{Flock, FlockArg},
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((file, Errno::EWOULDBLOCK)) => {
            eprintln!("{waiting} ({})", path.display());
            Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, errno)| errno)
                .with_context(|| format!("locking {}", path.display()))
        }
        Err((_, errno)) => Err(errno).with_context(|| format!("locking {}", path.display())),
    }
}
