//! CNI spec versions this plugin speaks.

/// Newest spec version, used for answers that have no configuration to take one from.
pub const LATEST: &str = "1.1.0";

/// Every version accepted in `cniVersion`. 0.4.0 is the first with CHECK; results are the same
/// shape from 1.0.0 on, 0.4.0 adds `"version": "4"` to each IP.
pub const SUPPORTED: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

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

/// Whether `v` is at least 1.1.0, which introduced STATUS, GC and the interface `mtu` result field.
pub fn at_least_1_1(v: &str) -> bool {
    parse(v).is_some_and(|t| t >= (1, 1, 0))
}
