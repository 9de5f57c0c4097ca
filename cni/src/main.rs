//! podwire-cni: podwire's CNI plugin (spec 1.1). The runtime execs it with CNI_* variables and
//! the network configuration on stdin; it wires the pod's veth and addressing and hands the
//! endpoint to the node's podwire agent, which owns IPAM and the datapath.

mod config;
mod error;
mod result;
mod version;

use std::{io::Read as _, process::ExitCode};

use podwire_agent::{
    api::{self, Attachment, Reply, Request},
    wiring::{self as wire, Netlink, GATEWAY},
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
            "CHECK" => check(&conf).await.map(|()| None),
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

fn call(conf: &NetConf, request: &Request) -> Result<Reply, CniError> {
    Ok(api::call(&conf.socket(), request)?)
}

fn unexpected(reply: Reply) -> CniError {
    CniError::new(
        code::IO_FAILURE,
        format!("unexpected answer from the podwire agent: {reply:?}"),
    )
}

async fn add(conf: &NetConf) -> Result<String, CniError> {
    let attachment = config::attachment("ADD")?;
    let netns = config::required("CNI_NETNS", "ADD")?;
    let netlink = Netlink::open(Some(&netns))?;
    let (ip, node_mtu) = match call(
        conf,
        &Request::Allocate {
            attachment: attachment.clone(),
            netns: netns.clone(),
        },
    )? {
        Reply::Allocated { ip, mtu, .. } => (ip, mtu),
        other => return Err(unexpected(other)),
    };
    let host_ifname = wire::host_ifname(&attachment);
    let mtu = conf.mtu.unwrap_or(node_mtu);
    match wire_up(conf, &netlink, &attachment, &host_ifname, &netns, ip, mtu).await {
        Ok(result) => Ok(result),
        Err(e) => {
            // Leave nothing behind: the veth (its peer goes with it) and the address.
            let _ = netlink.delete_host_veth(&host_ifname).await;
            let _ = call(conf, &Request::Release { attachment });
            Err(e)
        }
    }
}

async fn wire_up(
    conf: &NetConf,
    netlink: &Netlink,
    attachment: &Attachment,
    host_ifname: &str,
    netns: &str,
    ip: std::net::Ipv4Addr,
    mtu: u32,
) -> Result<String, CniError> {
    // A leftover of an earlier ADD of this attachment (the runtime should have called DEL).
    netlink.delete_host_veth(host_ifname).await?;
    let (host_mac, pod_mac) = netlink
        .create(host_ifname, &attachment.ifname, ip, mtu)
        .await?;
    call(
        conf,
        &Request::Register {
            attachment: attachment.clone(),
            host_ifname: host_ifname.to_owned(),
            host_mac,
            pod_mac,
        },
    )?;
    let ours = CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: host_ifname.to_owned(),
                mac: host_mac.to_string(),
                mtu: Some(mtu),
                sandbox: None,
            },
            Interface {
                name: attachment.ifname.clone(),
                mac: pod_mac.to_string(),
                mtu: Some(mtu),
                sandbox: Some(netns.to_owned()),
            },
        ],
        ips: vec![IpConfig {
            version: None,
            address: format!("{ip}/32"),
            gateway: Some(GATEWAY.to_string()),
            interface: Some(1),
        }],
        routes: vec![Route {
            dst: "0.0.0.0/0".into(),
            gw: Some(GATEWAY.to_string()),
        }],
        dns: Default::default(),
    };
    let result = match &conf.prev_result {
        Some(prev) => prev.clone().merge(ours),
        None => ours,
    };
    Ok(serde_json::to_string(&result.for_version(&conf.cni_version)).expect("results serialise"))
}

async fn del(conf: &NetConf) -> Result<(), CniError> {
    let attachment = config::attachment("DEL")?;
    // The netns may already be gone; the host-side veth is all DEL needs to remove.
    let netlink = Netlink::open(None)?;
    netlink
        .delete_host_veth(&wire::host_ifname(&attachment))
        .await?;
    // Unreachable agent: "try again later", so the runtime retries and the address is released.
    call(conf, &Request::Release { attachment })?;
    Ok(())
}

async fn check(conf: &NetConf) -> Result<(), CniError> {
    let attachment = config::attachment("CHECK")?;
    let netns = config::required("CNI_NETNS", "CHECK")?;
    let endpoint = match call(
        conf,
        &Request::Check {
            attachment: attachment.clone(),
        },
    ) {
        Ok(Reply::Checked { endpoint }) => endpoint,
        Ok(other) => return Err(unexpected(other)),
        Err(e) if e.code == code::INVALID_CONFIG => {
            return Err(CniError::new(code::CHECK_FAILED, e.msg))
        }
        Err(e) => return Err(e),
    };
    if let Some(prev) = &conf.prev_result {
        let want = format!("{}/32", endpoint.ip);
        if !prev.ips.iter().any(|ip| ip.address == want) {
            return Err(CniError::new(
                code::CHECK_FAILED,
                format!(
                    "prevResult does not list {want}, the address the agent holds for {}",
                    attachment.key()
                ),
            ));
        }
    }
    let wiring = endpoint
        .wiring
        .as_ref()
        .expect("the agent checks registered endpoints only");
    let netlink = Netlink::open(Some(&netns))
        .map_err(|e| CniError::new(code::CONTAINER_UNKNOWN, e.to_string()))?;
    if !netlink.host_veth_exists(&wiring.host_ifname).await? {
        return Err(CniError::new(
            code::CHECK_FAILED,
            format!("host-side veth {} is missing", wiring.host_ifname),
        ));
    }
    Ok(netlink
        .check_pod(&attachment.ifname, endpoint.ip, wiring.host_mac)
        .await?)
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
    match call(
        conf,
        &Request::Gc {
            valid: conf.valid_attachments.clone(),
        },
    )? {
        Reply::Collected { .. } => Ok(()),
        other => Err(unexpected(other)),
    }
}
