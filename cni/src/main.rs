//! podwire-cni: podwire's CNI plugin (spec 1.1). The runtime execs it with CNI_* variables and
//! the network configuration on stdin; it wires the pod's veth and addressing and hands the
//! endpoint to the node's podwire agent, which owns IPAM and the datapath.

mod check;
mod config;
mod error;
mod result;
mod version;

use std::{io::Read as _, process::ExitCode};

use ipnet::Ipv4Net;

use podwire_core::{
    api::{self, Reply, Request},
    endpoint::{Attachment, VethPair},
    fault::{self, Injected},
};
use podwire_netlink::{
    pod::{self, MtuSplit, PodInterface, PodNetns, GATEWAY},
    Netlink,
};

use crate::{
    config::NetConf,
    error::{code, CniError},
    result::{CniResult, Interface, IpConfig, Route},
};

fn main() -> ExitCode {
    match run() {
        Ok(Some(output)) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            println!("{}", serde_json::to_string(&e).expect("errors serialise"));
            ExitCode::FAILURE
        }
    }
}

/// Runs the command; `Some` is the JSON to print on success.
fn run() -> Result<Option<String>, CniError> {
    let command = config::required("CNI_COMMAND", "any command")?;
    let mut stdin = Vec::new();
    std::io::stdin().read_to_end(&mut stdin).map_err(|e| {
        CniError::new(
            code::IO_FAILURE,
            format!("reading the configuration from stdin: {e}"),
        )
    })?;
    if command == "VERSION" {
        return Ok(Some(
            serde_json::json!({ "cniVersion": version::LATEST, "supportedVersions": version::SUPPORTED }).to_string(),
        ));
    }
    let conf = NetConf::parse(&stdin)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            conf.error(CniError::new(
                code::IO_FAILURE,
                format!("starting the async runtime: {e}"),
            ))
        })?;
    let outcome = runtime.block_on(async {
        match command.as_str() {
            "ADD" => add(&conf).await.map(Some),
            "DEL" => del(&conf).await.map(|()| None),
            "CHECK" => check::check(&conf).await.map(|()| None),
            "STATUS" => status(&conf).map(|()| None),
            "GC" => gc(&conf).map(|()| None),
            other => Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"),
            )),
        }
    });
    outcome.map_err(|e| conf.error(e))
}

pub(crate) fn call(conf: &NetConf, request: &Request) -> Result<Reply, CniError> {
    Ok(api::call(&conf.socket(), request)?)
}

pub(crate) fn unexpected(reply: Reply) -> CniError {
    CniError::new(
        code::IO_FAILURE,
        format!("unexpected answer from the podwire agent: {reply:?}"),
    )
}

async fn add(conf: &NetConf) -> Result<String, CniError> {
    let attachment = config::attachment("ADD")?;
    let netns = config::required("CNI_NETNS", "ADD")?;
    let host = Netlink::connect()?;
    let pod_ns = PodNetns::open(&netns)?;
    let (ip, (mtu, split), fresh, registered) = match call(
        conf,
        &Request::Allocate {
            attachment: attachment.clone(),
            netns: netns.clone(),
            network: Some(conf.name.clone()),
        },
    )? {
        Reply::Allocated {
            ip,
            pod_cidr,
            mtu,
            local_mtu,
            fresh,
            registered,
        } => (
            ip,
            pod_mtus(conf.mtu, mtu, local_mtu, pod_cidr),
            fresh,
            registered,
        ),
        other => return Err(unexpected(other)),
    };
    let host_ifname = attachment.host_ifname();
    let want = PodInterface {
        host_ifname: &host_ifname,
        ifname: &attachment.ifname,
        ip,
        mtu,
        split,
    };
    // A repeated ADD (a restarted kubelet, a lost answer) of a pod that is wired as the agent
    // recorded it: the same result, and nothing touched.
    if let Some(veth) = &registered {
        let wired = veth.host_ifname == host_ifname
            && pod::check(&host, &pod_ns, veth, &attachment.ifname, ip)
                .await
                .is_ok()
            && pod::check_mtus(&host, &pod_ns, want).await.is_ok();
        if wired {
            return Ok(add_result(conf, &attachment, &netns, want, veth));
        }
    }
    let mut made_veth = false;
    match wire_up(conf, &host, &pod_ns, &attachment, want, &mut made_veth).await {
        Ok(veth) => Ok(add_result(conf, &attachment, &netns, want, &veth)),
        Err(e) => {
            // Undo what this ADD did and nothing else: the veth it made (its peer goes with it)
            // and the address it allocated. An address held before belongs to a pod the runtime
            // still has; its DEL releases it.
            if made_veth {
                let _ = host.delete_link(&host_ifname).await;
            }
            if fresh {
                let _ = call(conf, &Request::Release { attachment });
            }
            Err(e)
        }
    }
}

/// The MTU of the pod's link and, if traffic leaving the node has less room, the split of its
/// routes: from the agent's `cluster` MTU (what may cross the tunnel) and `local` one (the
/// node's own pods, in `pod_cidr`; absent from older agents), unless the plugin's configuration
/// sets one MTU for everything.
fn pod_mtus(
    configured: Option<u32>,
    cluster: u32,
    local: Option<u32>,
    pod_cidr: Ipv4Net,
) -> (u32, Option<MtuSplit>) {
    match (configured, local) {
        (Some(mtu), _) => (mtu, None),
        (None, Some(local)) if local > cluster => (
            local,
            Some(MtuSplit {
                node_pods: pod_cidr.trunc(),
                cluster_mtu: cluster,
            }),
        ),
        _ => (cluster, None),
    }
}

/// Creates the pod's veth pair and addressing and registers it with the agent; `made_veth` is
/// set once the pair exists.
async fn wire_up(
    conf: &NetConf,
    host: &Netlink,
    pod_ns: &PodNetns,
    attachment: &Attachment,
    want: PodInterface<'_>,
    made_veth: &mut bool,
) -> Result<VethPair, CniError> {
    fault::point("cni.add.after-allocate").map_err(injected)?;
    // A leftover of an earlier ADD of this attachment that never completed, or whose pod lost its
    // interface: made anew.
    host.delete_link(want.host_ifname).await?;
    // It removes the pair itself if it fails half way.
    let veth = pod::create(host, pod_ns, want).await?;
    *made_veth = true;
    call(
        conf,
        &Request::Register {
            attachment: attachment.clone(),
            host_ifname: veth.host_ifname.clone(),
            host_mac: veth.host_mac,
            pod_mac: veth.pod_mac,
        },
    )?;
    fault::point("cni.add.after-register").map_err(injected)?;
    Ok(veth)
}

/// A failure injected at a fault point (see `podwire_core::fault`): an I/O failure, as a netlink
/// or agent error there would be.
fn injected(e: Injected) -> CniError {
    CniError::new(code::IO_FAILURE, e.to_string())
}

/// ADD's result: ours, after the previous plugins' in a chain, in the configuration's version.
fn add_result(
    conf: &NetConf,
    attachment: &Attachment,
    netns: &str,
    want: PodInterface<'_>,
    veth: &VethPair,
) -> String {
    let ours = CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: veth.host_ifname.clone(),
                mac: veth.host_mac.to_string(),
                mtu: Some(want.mtu),
                sandbox: None,
                ..Default::default()
            },
            Interface {
                name: attachment.ifname.clone(),
                mac: veth.pod_mac.to_string(),
                mtu: Some(want.mtu),
                sandbox: Some(netns.to_owned()),
                ..Default::default()
            },
        ],
        ips: vec![IpConfig {
            version: None,
            address: format!("{}/32", want.ip),
            gateway: Some(GATEWAY.to_string()),
            interface: Some(1),
            ..Default::default()
        }],
        routes: want
            .routes()
            .into_iter()
            .map(|(dst, mtu)| Route {
                dst: dst.to_string(),
                gw: Some(GATEWAY.to_string()),
                mtu,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let result = match &conf.prev_result {
        Some(prev) => prev.clone().merge(ours),
        None => ours,
    };
    serde_json::to_string(&result.for_version(&conf.cni_version)).expect("results serialise")
}

async fn del(conf: &NetConf) -> Result<(), CniError> {
    let attachment = config::attachment("DEL")?;
    // The netns may already be gone; the host-side veth is all DEL needs to remove. DEL is
    // done with it once it has left the node and the pod (its names free for the next ADD),
    // not once the kernel has finished freeing it.
    Netlink::connect()?
        .delete_link_unlisted(&attachment.host_ifname())
        .await?;
    fault::point("cni.del.after-veth-delete").map_err(injected)?;
    // Unreachable agent: "try again later", so the runtime retries and the address is released.
    call(conf, &Request::Release { attachment })?;
    Ok(())
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    if !version::at_least_1_1(&conf.cni_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "STATUS needs cniVersion 1.1.0 or later, not {}",
                conf.cni_version
            ),
        ));
    }
    match call(conf, &Request::Status) {
        Ok(Reply::Status { .. }) => Ok(()),
        Ok(other) => Err(unexpected(other)),
        Err(e) => Err(CniError::new(code::PLUGIN_NOT_AVAILABLE, e.msg)),
    }
}

fn gc(conf: &NetConf) -> Result<(), CniError> {
    if !version::at_least_1_1(&conf.cni_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "GC needs cniVersion 1.1.0 or later, not {}",
                conf.cni_version
            ),
        ));
    }
    let valid = conf.valid_attachments()?;
    fault::point("cni.gc.before-call").map_err(injected)?;
    match call(
        conf,
        &Request::Gc {
            valid,
            network: Some(conf.name.clone()),
        },
    )? {
        Reply::Collected { .. } => Ok(()),
        other => Err(unexpected(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_get_the_full_mtu_to_their_node_and_the_tunnels_beyond() {
        let cidr: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let split = |cluster_mtu| {
            Some(MtuSplit {
                node_pods: cidr,
                cluster_mtu,
            })
        };
        assert_eq!(pod_mtus(None, 1450, Some(1500), cidr), (1500, split(1450)));
        // A configured MTU is the one MTU; so is the agent's where both are the same.
        assert_eq!(pod_mtus(Some(1400), 1450, Some(1500), cidr), (1400, None));
        assert_eq!(pod_mtus(None, 1500, Some(1500), cidr), (1500, None));
        // An agent from before the split.
        assert_eq!(pod_mtus(None, 1450, None, cidr), (1450, None));
        // The CIDR as a route's destination: its network address.
        let loose: Ipv4Net = "10.244.1.7/24".parse().unwrap();
        assert_eq!(pod_mtus(None, 1450, Some(9000), loose), (9000, split(1450)));
    }
}
