//! Where gateways record per-key usage in Redis, so the operator (ApiKey status) and the
//! self-service usage endpoint read the same numbers. One hash per key and period:
//!
//! `tollgate:v1:{k:<key id>}:usage:<period>` with fields [`REQUESTS`], [`INPUT_TOKENS`],
//! [`OUTPUT_TOKENS`] and [`SPEND`]; `<period>` is a UTC day (`2026-11-21`), a UTC month
//! (`2026-11`) or [`TOTAL`]. Daily hashes expire after [`DAILY_TTL_SECS`]; monthly and
//! total ones [`MONTHLY_TTL_SECS`] after the key was last used.

/// Layout version shared with the limit scripts.
pub const LAYOUT: &str = "v1";
/// Requests answered.
pub const REQUESTS: &str = "requests";
/// Input (prompt) tokens.
pub const INPUT_TOKENS: &str = "input_tokens";
/// Output (completion) tokens.
pub const OUTPUT_TOKENS: &str = "output_tokens";
/// Input tokens read from the provider's prompt cache (part of [`INPUT_TOKENS`]).
pub const CACHED_INPUT_TOKENS: &str = "cached_input_tokens";
/// Input tokens written to the provider's prompt cache (part of [`INPUT_TOKENS`]).
pub const CACHE_WRITE_TOKENS: &str = "cache_write_tokens";
/// Spend in the provider's currency.
pub const SPEND: &str = "spend";
/// Period id of the all-time counters.
pub const TOTAL: &str = "total";
/// Lifetime of a daily usage hash.
pub const DAILY_TTL_SECS: i64 = 35 * 24 * 3600;
/// Lifetime of a monthly usage hash.
pub const MONTHLY_TTL_SECS: i64 = 400 * 24 * 3600;

/// The Redis key of a key's usage in one period.
pub fn usage_key(key_id: &str, period: &str) -> String {
    format!("tollgate:{LAYOUT}:{{k:{key_id}}}:usage:{period}")
}

/// The day and month period ids containing `now` (UTC).
pub fn periods(now: jiff::Timestamp) -> (String, String) {
    let date = now.to_zoned(jiff::tz::TimeZone::UTC).date();
    (
        date.to_string(),
        format!("{:04}-{:02}", date.year(), date.month()),
    )
}

/// The id of the budget period containing `now`: a UTC day, a UTC month, or `total`.
pub fn budget_period_id(period: crate::v1alpha1::BudgetPeriod, now: jiff::Timestamp) -> String {
    use crate::v1alpha1::BudgetPeriod;
    let (day, month) = periods(now);
    match period {
        BudgetPeriod::Daily => day,
        BudgetPeriod::Monthly => month,
        BudgetPeriod::Total => TOTAL.to_owned(),
    }
}

/// Prefix of a key's budget keys in one period (`…:spent` holds the settled spend; the
/// gateway's admission script also keeps reservations there).
pub fn budget_prefix(key_id: &str, period_id: &str) -> String {
    format!("tollgate:{LAYOUT}:{{k:{key_id}}}:budget:{period_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_keys_are_hash_tagged_per_key_and_named_by_utc_period() {
        let now: jiff::Timestamp = "2026-11-21T23:59:59Z".parse().unwrap();
        assert_eq!(
            periods(now),
            ("2026-11-21".to_owned(), "2026-11".to_owned())
        );
        assert_eq!(
            usage_key("abc", "2026-11"),
            "tollgate:v1:{k:abc}:usage:2026-11"
        );
    }
}
