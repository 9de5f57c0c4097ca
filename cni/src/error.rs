//! CNI errors: the spec's JSON error object on stdout, with its well-known codes.
//! <https://github.com/containernetworking/cni/blob/main/SPEC.md#error>

use podwire_core::{
    api::{ClientError, ErrorKind},
    error_chain,
};
use podwire_netlink::{pod::CheckError, NetlinkError};
use serde::Serialize;

/// Well-known error codes of the CNI spec (1-99 reserved), and podwire's own (100+).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const CONTAINER_UNKNOWN: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// CHECK found the attachment not as ADD left it.
    pub const CHECK_FAILED: u32 = 100;
}

/// A failed CNI operation, printed as the spec's error object.
#[derive(Debug, Serialize, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            cni_version: crate::version::LATEST.into(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }
}

impl From<ClientError> for CniError {
    fn from(e: ClientError) -> CniError {
        let code = match &e {
            // Transient: an agent that is not running yet, restarting or stuck. The runtime
            // retries, and a DEL retried releases the address.
            ClientError::Unreachable { .. }
            | ClientError::Timeout { .. }
            | ClientError::Closed { .. } => code::TRY_AGAIN_LATER,
            ClientError::Protocol { .. } => code::IO_FAILURE,
            ClientError::Agent(api) => match api.kind {
                ErrorKind::TryAgain => code::TRY_AGAIN_LATER,
                ErrorKind::Invalid => code::INVALID_CONFIG,
                ErrorKind::Internal => code::IO_FAILURE,
            },
        };
        // Its messages carry their causes already.
        CniError::new(code, e.to_string())
    }
}

impl From<NetlinkError> for CniError {
    fn from(e: NetlinkError) -> CniError {
        let code = match &e {
            NetlinkError::Netns { .. } => code::INVALID_ENV,
            _ => code::IO_FAILURE,
        };
        CniError::new(code, error_chain(&e))
    }
}

impl From<CheckError> for CniError {
    fn from(e: CheckError) -> CniError {
        match e {
            CheckError::Mismatch(m) => CniError::new(code::CHECK_FAILED, m.to_string()),
            CheckError::Netlink(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_agent_that_cannot_answer_now_is_try_again_later_naming_its_socket() {
        let socket = "/run/podwire/agent.sock".to_owned();
        for e in [
            ClientError::Timeout {
                socket: socket.clone(),
                waited: Duration::from_secs(10),
            },
            ClientError::Closed {
                socket: socket.clone(),
            },
            ClientError::Unreachable {
                socket: socket.clone(),
                source: std::io::ErrorKind::NotFound.into(),
            },
        ] {
            let cni = CniError::from(e);
            assert_eq!(cni.code, code::TRY_AGAIN_LATER, "{}", cni.msg);
            assert!(cni.msg.contains(&socket), "{}", cni.msg);
        }
        let e = CniError::from(ClientError::Protocol {
            socket,
            detail: "bad answer".into(),
        });
        assert_eq!(e.code, code::IO_FAILURE);
    }
}
