//! Gateways report the configuration they serve through Redis, so the operator can show
//! on every object whether the gateways have picked it up.
//!
//! Every [`EVERY_SECS`], each gateway adds itself to the sorted set [`SEEN`] (score: Unix
//! milliseconds of the report) and records its configuration hash in the hash [`CONFIG`]
//! under the same instance id. A gateway counts as live while its last report is younger
//! than [`LIVE_WITHIN_SECS`]; readers prune older ones. Both keys share a hash tag, so a
//! Redis Cluster keeps them in one slot.

/// Sorted set: instance id → Unix milliseconds of its last report.
pub const SEEN: &str = "tollgate:v1:{gw}:seen";
/// Hash: instance id → configuration hash it serves (empty: none loaded yet).
pub const CONFIG: &str = "tollgate:v1:{gw}:config";
/// How often a gateway reports.
pub const EVERY_SECS: u64 = 5;
/// How recent a report must be for its gateway to count as live.
pub const LIVE_WITHIN_SECS: u64 = 20;
/// Reports older than this are pruned.
pub const FORGET_AFTER_SECS: u64 = 3600;
