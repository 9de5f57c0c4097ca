//! CHECK: the agent's view of the attachment (its map entry and attachment checked there) against
//! the runtime's prevResult and the pod's interface as it is now.

use podwire_core::api::{Reply, Request};
use podwire_netlink::{
    pod::{self, PodNetns},
    Netlink,
};

use crate::{
    call,
    config::{self, NetConf},
    error::{code, CniError},
    unexpected,
};

pub async fn check(conf: &NetConf) -> Result<(), CniError> {
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
    let veth = endpoint
        .veth
        .as_ref()
        .expect("the agent checks registered endpoints only");
    let host = Netlink::connect()?;
    let pod_ns = PodNetns::open(&netns)
        .map_err(|e| CniError::new(code::CONTAINER_UNKNOWN, podwire_core::error_chain(&e)))?;
    Ok(pod::check(&host, &pod_ns, veth, &attachment.ifname, endpoint.ip).await?)
}
