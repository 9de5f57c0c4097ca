//! Leaving a node clean when podwire is uninstalled: the agent follows its own DaemonSet
//! ([`watch_daemonset`]); once that is deleted (as `helm uninstall` does, unlike a rolling update
//! or a pod restart, which leave it in place), the SIGTERM that ends the agent's pod also
//! removes everything podwire put on the node ([`Cleanup`]). `podwire-agent --cleanup` does the
//! same for a node whose podwire went without Helm.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::{
    runtime::{
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Api, Client,
};
use podwire_core::pins::Pins;
use podwire_datapath::{detach, Hook};
use podwire_netlink::Netlink;
use tracing::{info, warn};

use crate::{masquerade, overlay::VXLAN_DEV};

/// How long the agent asks the API about its DaemonSet on SIGTERM before it keeps everything.
const LAST_LOOK: Duration = Duration::from_secs(3);

/// Whether podwire's DaemonSet is being uninstalled: deleted, or being deleted.
#[derive(Debug, Default)]
pub struct Uninstalling(AtomicBool);

impl Uninstalling {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, why: &str) {
        if !self.0.swap(true, Ordering::Relaxed) {
            info!(
                "{why}: podwire is being uninstalled, so the agent cleans this node when it exits"
            );
        }
    }
}

/// Whether the DaemonSet `ds` is being deleted.
fn deleting(ds: &DaemonSet) -> bool {
    ds.metadata.deletion_timestamp.is_some()
}

/// Follows the DaemonSet `name` in `namespace` and sets `uninstalling` once it is deleted or
/// has a deletionTimestamp. A relist that no longer finds it, after it was seen, counts as a
/// deletion (the watch missed the event). Runs until the task is dropped.
pub async fn watch_daemonset(
    client: Client,
    namespace: String,
    name: String,
    uninstalling: Arc<Uninstalling>,
) {
    let api = Api::<DaemonSet>::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let mut seen = false;
    let mut listed = false;
    let what = format!("DaemonSet {namespace}/{name}");
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listed = false,
            Ok(Event::InitApply(ds) | Event::Apply(ds)) => {
                seen = true;
                listed = true;
                if deleting(&ds) {
                    uninstalling.set(&format!("{what} is being deleted"));
                }
            }
            Ok(Event::Delete(_)) => uninstalling.set(&format!("{what} was deleted")),
            Ok(Event::InitDone) if !listed && seen => {
                uninstalling.set(&format!("{what} is gone"));
            }
            Ok(Event::InitDone) if !listed => warn!(
                "{what} does not exist: the agent cannot tell an uninstall from a restart and \
                 keeps the datapath when it exits (check --daemonset and POD_NAMESPACE)"
            ),
            Ok(Event::InitDone) => {}
            Err(e) => warn!("watching {what}: {}", podwire_core::error_chain(&e)),
        }
    }
}

/// A last look at the DaemonSet on SIGTERM, in case its deletion has not reached the watch
/// yet: true when it is gone or being deleted. An API that does not answer in time means no.
pub async fn daemonset_gone(client: Client, namespace: &str, name: &str) -> bool {
    let api = Api::<DaemonSet>::namespaced(client, namespace);
    match tokio::time::timeout(LAST_LOOK, api.get_opt(name)).await {
        Ok(Ok(None)) => true,
        Ok(Ok(Some(ds))) => deleting(&ds),
        Ok(Err(e)) => {
            warn!("looking up DaemonSet {namespace}/{name}: {e}; keeping the datapath");
            false
        }
        Err(_) => {
            warn!("DaemonSet {namespace}/{name}: no answer in {LAST_LOOK:?}; keeping the datapath");
            false
        }
    }
}

/// Everything podwire puts on a node, to remove on uninstall.
#[derive(Clone, Debug)]
pub struct Cleanup {
    /// The CNI conflist the chart installed (`--cni-conf-file`).
    pub conf_file: Option<PathBuf>,
    /// The CNI plugin binary the chart installed (`--cni-bin-file`).
    pub bin_file: Option<PathBuf>,
    /// The agent's pin root (`--bpffs`).
    pub pins: Pins,
    /// The agent's state directory (`--state-dir`).
    pub state_dir: PathBuf,
    /// The agent's API socket (`--socket`).
    pub socket: PathBuf,
}

/// One step of the cleanup that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {error}")]
pub struct CleanupFailure {
    what: String,
    error: String,
}

/// Errors of a cleanup: every step is tried, and those that failed are listed.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// Some steps failed (the others were done).
    #[error("cleanup incomplete: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Incomplete(Vec<CleanupFailure>),
}

impl Cleanup {
    /// Removes, in this order: the conflist (so the runtime stops sending pods to a datapath
    /// that is going away), the plugin binary, every pinned link and map (unpinning a link
    /// detaches its program, the maps go with their last user), the overlay device, the
    /// masquerade table, the state directory and the socket. Each removal is logged; what was
    /// not there is skipped. The datapath must no longer be held by this process.
    pub async fn run(&self) -> Result<(), CleanupError> {
        let mut failures = Vec::new();
        let mut step = |what: String, result: Result<bool, String>| match result {
            Ok(true) => info!("removed {what}"),
            Ok(false) => {}
            Err(error) => {
                warn!("could not remove {what}: {error}");
                failures.push(CleanupFailure { what, error });
            }
        };
        for file in [&self.conf_file, &self.bin_file].into_iter().flatten() {
            step(file.display().to_string(), remove_file(file));
        }
        // Pods' veths hold their programs in netlink tc filters, not in pins: removing the pins
        // would leave every running pod's veth with podwire's programs (and maps) attached.
        for veth in pod_veths() {
            let detached = Hook::pod(&veth)
                .into_iter()
                .try_for_each(|hook| detach(hook, &self.pins))
                .map(|()| true)
                .map_err(|e| podwire_core::error_chain(&e));
            step(format!("podwire's tc filters on {veth}"), detached);
        }
        for dir in [self.pins.links_dir(), self.pins.maps_dir()] {
            step(format!("the pins in {}", dir.display()), remove_dir(&dir));
        }
        // The root too, if nothing else is in it (it may be a directory the operator chose).
        let _ = std::fs::remove_dir(self.pins.root());
        let vxlan = async {
            let netlink = Netlink::connect().map_err(|e| podwire_core::error_chain(&e))?;
            let existed = netlink
                .link(podwire_netlink::LinkRef::Name(VXLAN_DEV))
                .await
                .map_err(|e| podwire_core::error_chain(&e))?
                .is_some();
            netlink
                .delete_link(VXLAN_DEV)
                .await
                .map_err(|e| podwire_core::error_chain(&e))?;
            Ok(existed)
        };
        step(format!("the overlay device {VXLAN_DEV}"), vxlan.await);
        step(
            format!("the nftables table ip {}", masquerade::TABLE),
            masquerade::remove().map_err(|e| podwire_core::error_chain(&e)),
        );
        step(
            format!("the state directory {}", self.state_dir.display()),
            remove_dir(&self.state_dir),
        );
        step(
            format!("the socket {}", self.socket.display()),
            remove_file(&self.socket),
        );
        if failures.is_empty() {
            Ok(())
        } else {
            Err(CleanupError::Incomplete(failures))
        }
    }
}

/// The host-side veths of pods on this node: the interfaces named as
/// [`podwire_core::endpoint::Attachment::host_ifname`] names them ("pw" and 11 hex digits).
fn pod_veths() -> Vec<String> {
    // if_nameindex asks the kernel over netlink: the calling thread's network namespace (sysfs
    // shows the one it was mounted in).
    let Ok(interfaces) = nix::net::if_::if_nameindex() else {
        return Vec::new();
    };
    interfaces
        .iter()
        .filter_map(|i| i.name().to_str().ok().map(str::to_owned))
        .filter(|name| {
            name.len() == 13
                && name
                    .strip_prefix("pw")
                    .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .collect()
}

fn remove_file(path: &Path) -> Result<bool, String> {
    absent_is_fine(std::fs::remove_file(path))
}

fn remove_dir(path: &Path) -> Result<bool, String> {
    absent_is_fine(std::fs::remove_dir_all(path))
}

fn absent_is_fine(result: io::Result<()>) -> Result<bool, String> {
    match result {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}
