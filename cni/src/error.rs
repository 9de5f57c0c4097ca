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
            ClientError::Unreachable { .. } => code::TRY_AGAIN_LATER,
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
