//! CNI spec versions this plugin speaks, and which of them each command accepts.

use crate::error::{code, CniError};

/// Newest spec version, used for answers that have no configuration to take one from.
pub const LATEST: &str = "1.1.0";

/// Every version ADD answers in (VERSION's `supportedVersions`). 0.4.0 is the first with CHECK;
/// results are the same shape from 1.0.0 on, 0.4.0 adds `"version": "4"` to each IP.
pub const SUPPORTED: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// Every version the spec has had. DEL prints nothing and needs nothing but CNI_CONTAINERID and
/// CNI_IFNAME, which every version has, so it takes them all: a DEL refused because the node's
/// configuration changed version since ADD would leak the pod's address and veth for good.
pub const SPEC_VERSIONS: [&str; 7] = [
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

/// Parsed `major.minor.patch`, for comparisons.
pub fn parse(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.split('.').map(str::parse::<u32>);
    let triple = (
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next()?.ok()?,
    );
    parts.next().is_none().then_some(triple)
}

/// Whether `v` is at least 1.1.0, which introduced STATUS, GC and the 1.1 result fields
/// (interface `mtu`, `socketPath`, `pciID`; route `mtu`, `advmss`, `priority`, `table`, `scope`).
pub fn at_least_1_1(v: &str) -> bool {
    parse(v).is_some_and(|t| t >= (1, 1, 0))
}

/// Whether `command` can run with a configuration of version `v`; the error says why not.
pub fn accepts(command: &str, v: &str) -> Result<(), CniError> {
    let (known, since): (&[&str], Option<&str>) = match command {
        "DEL" => (&SPEC_VERSIONS, None),
        "CHECK" => (&SUPPORTED, Some("0.4.0")),
        "STATUS" | "GC" => (&SUPPORTED, Some("1.1.0")),
        _ => (&SUPPORTED, None),
    };
    if let Some(since) = since {
        if parse(v).is_some_and(|t| Some(t) < parse(since)) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("{command} needs cniVersion {since} or later, not {v}"),
            ));
        }
    }
    if known.contains(&v) {
        return Ok(());
    }
    Err(CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!(
            "cniVersion {v:?} is not supported for {command}; podwire supports {}",
            known.join(", ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn del_takes_every_spec_version_and_nothing_else() {
        for v in SPEC_VERSIONS {
            assert!(accepts("DEL", v).is_ok(), "{v}");
        }
        for v in ["2.0.0", "1.2.0", "0.5.0", "x", ""] {
            let e = accepts("DEL", v).unwrap_err();
            assert_eq!(e.code, code::INCOMPATIBLE_VERSION, "{v}");
        }
    }

    #[test]
    fn add_check_status_gc_take_what_they_can_answer() {
        for v in SUPPORTED {
            assert!(
                accepts("ADD", v).is_ok() && accepts("CHECK", v).is_ok(),
                "{v}"
            );
        }
        let e = accepts("ADD", "0.3.1").unwrap_err();
        assert!(
            e.msg.contains("0.3.1") && e.msg.contains("1.1.0"),
            "{}",
            e.msg
        );
        let e = accepts("CHECK", "0.3.1").unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(e.msg.contains("CHECK needs cniVersion 0.4.0"), "{}", e.msg);
        for command in ["STATUS", "GC"] {
            assert!(accepts(command, "1.1.0").is_ok());
            let e = accepts(command, "1.0.0").unwrap_err();
            assert!(e.msg.contains("1.1.0 or later, not 1.0.0"), "{}", e.msg);
        }
    }
}
