//! Mirrors each key's usage and spend in its current budget period (the month when it has
//! no budget) from the gateways' Redis counters into `ApiKey.status.usage`, on an
//! interval, writing only figures that changed.

use std::{collections::BTreeSet, time::Duration};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tollgate_api::{
    compile::DEFAULT_NAMESPACE,
    redis_conn::SharedConn,
    usage,
    v1alpha1::{ApiKey, BudgetPeriod, KeyUsage},
};

/// Counters of one key in one period, as stored by the gateways.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// Requests answered.
    pub requests: u64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Spend.
    pub spend: f64,
}

impl Counters {
    fn from_fields(fields: &std::collections::HashMap<String, String>) -> Self {
        let int = |k: &str| fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        Self {
            requests: int(usage::REQUESTS),
            input_tokens: int(usage::INPUT_TOKENS),
            output_tokens: int(usage::OUTPUT_TOKENS),
            spend: fields
                .get(usage::SPEND)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0),
        }
    }
}

/// The period a key's status reports: its budget's, else the month.
pub fn period(key: &ApiKey) -> BudgetPeriod {
    key.spec
        .budget
        .as_ref()
        .map_or(BudgetPeriod::Monthly, |b| b.period)
}

fn period_name(p: BudgetPeriod) -> &'static str {
    match p {
        BudgetPeriod::Daily => "daily",
        BudgetPeriod::Monthly => "monthly",
        BudgetPeriod::Total => "total",
    }
}

/// Start of the period containing `now` (none for `total`).
fn period_start(p: BudgetPeriod, now: Timestamp) -> Option<Time> {
    let date = now.to_zoned(jiff::tz::TimeZone::UTC).date();
    let start = match p {
        BudgetPeriod::Daily => date,
        BudgetPeriod::Monthly => date.first_of_month(),
        BudgetPeriod::Total => return None,
    };
    start
        .to_zoned(jiff::tz::TimeZone::UTC)
        .ok()
        .map(|z| Time(z.timestamp()))
}

/// The usage to show for `key` (pure). `currency` is used when the key has no budget and
/// every Provider prices in one currency.
pub fn key_usage(
    key: &ApiKey,
    counters: &Counters,
    currency: Option<&str>,
    now: Timestamp,
) -> KeyUsage {
    let p = period(key);
    let currency = key
        .spec
        .budget
        .as_ref()
        .map(|b| b.currency.as_str())
        .or(currency);
    let money = |amount: f64| match currency {
        Some(c) => format!("{amount:.2} {c}"),
        None => format!("{amount:.2}"),
    };
    KeyUsage {
        period_start: period_start(p, now),
        requests: counters.requests,
        input_tokens: counters.input_tokens,
        output_tokens: counters.output_tokens,
        spend: Some(money(counters.spend)),
        budget: key
            .spec
            .budget
            .as_ref()
            .map(|b| format!("{}/{}", money(b.amount), period_name(b.period))),
        updated_at: Some(Time(now)),
    }
}

/// Whether two usages differ in anything but when they were read.
fn same_figures(a: &KeyUsage, b: &KeyUsage) -> bool {
    let strip = |u: &KeyUsage| KeyUsage {
        updated_at: None,
        ..u.clone()
    };
    strip(a) == strip(b)
}

/// The field manager of usage writes (`status.usage` only).
pub const USAGE_MANAGER: &str = "tollgate-operator-usage";

/// Why a usage refresh stopped.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// Redis did not answer in time.
    #[error("timed out")]
    Timeout,
    /// Redis refused or the connection failed.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// Leadership was lost during the pass.
    #[error("stopped writing: this replica no longer holds the lease")]
    LostLease,
    /// The API server refused a status write.
    #[error("updating usage of ApiKey {object}: {source}")]
    Write {
        /// `namespace/name`.
        object: String,
        /// What the API server said.
        source: kube::Error,
    },
}

/// Reads every key's counters and writes changed figures. Returns how many statuses were
/// written.
pub async fn refresh(
    client: &Client,
    conn: &SharedConn,
    keys: &[ApiKey],
    currencies: &BTreeSet<String>,
    timeout: Duration,
    fence: &crate::leader::Fence,
) -> Result<usize, RefreshError> {
    let now = Timestamp::now();
    let currency = (currencies.len() == 1)
        .then(|| currencies.iter().next().cloned())
        .flatten();
    let with_ids: Vec<(&ApiKey, String)> = keys
        .iter()
        .filter_map(|k| Some((k, k.status.as_ref()?.key_id.clone()?)))
        .collect();
    let mut written = 0;
    // Concurrent single-key reads: every key is its own slot on a cluster.
    for chunk in with_ids.chunks(100) {
        let reads = chunk.iter().map(|(k, id)| {
            let mut conn = conn.clone();
            let redis_key = usage::usage_key(id, &usage::budget_period_id(period(k), now));
            async move {
                tokio::time::timeout(
                    timeout,
                    redis::cmd("HGETALL")
                        .arg(redis_key)
                        .query_async::<std::collections::HashMap<String, String>>(&mut conn),
                )
                .await
                .map_err(|_| RefreshError::Timeout)?
                .map_err(RefreshError::from)
            }
        });
        let results = futures_util::future::join_all(reads).await;
        for ((key, _), fields) in chunk.iter().zip(results) {
            let counters = Counters::from_fields(&fields?);
            let next = key_usage(key, &counters, currency.as_deref(), now);
            let current = key.status.as_ref().and_then(|s| s.usage.as_ref());
            // Unchanged, or a key never used yet (10,000 new keys are not 10,000 writes
            // of zeros): nothing to write.
            if current.map_or(next.requests == 0, |c| same_figures(c, &next)) {
                continue;
            }
            let ns = key
                .namespace()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
            // Every write is fenced: a pass may outlast this replica's leadership.
            if !fence.holds() {
                return Err(RefreshError::LostLease);
            }
            let api = Api::<ApiKey>::namespaced(client.clone(), &ns);
            let patch = json!({"status": {"usage": next}});
            match api
                .patch_status(
                    &key.name_any(),
                    &PatchParams {
                        field_manager: Some(USAGE_MANAGER.to_owned()),
                        ..PatchParams::default()
                    },
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => written += 1,
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    return Err(RefreshError::Write {
                        object: format!("{ns}/{}", key.name_any()),
                        source: e,
                    });
                }
            }
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(budget: Option<serde_json::Value>) -> ApiKey {
        let mut spec = json!({"owner": "team"});
        if let Some(b) = budget {
            spec["budget"] = b;
        }
        ApiKey::new("app", serde_json::from_value(spec).unwrap())
    }

    fn now() -> Timestamp {
        "2026-11-22T10:15:00Z".parse().unwrap()
    }

    #[test]
    fn usage_is_shown_for_the_budget_period_with_its_currency() {
        let k = key(Some(
            json!({"amount": 100.0, "period": "daily", "currency": "EUR"}),
        ));
        let c = Counters {
            requests: 12,
            input_tokens: 300,
            output_tokens: 40,
            spend: 1.23456,
        };
        let u = key_usage(&k, &c, Some("USD"), now());
        assert_eq!(u.spend.as_deref(), Some("1.23 EUR"));
        assert_eq!(u.budget.as_deref(), Some("100.00 EUR/daily"));
        assert_eq!(
            u.period_start.unwrap().0,
            "2026-11-22T00:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!((u.requests, u.input_tokens, u.output_tokens), (12, 300, 40));
    }

    #[test]
    fn keys_without_budget_report_the_month_and_total_budgets_have_no_start() {
        let u = key_usage(&key(None), &Counters::default(), Some("USD"), now());
        assert_eq!(u.budget, None);
        assert_eq!(u.spend.as_deref(), Some("0.00 USD"));
        assert_eq!(
            u.period_start.unwrap().0,
            "2026-11-01T00:00:00Z".parse::<Timestamp>().unwrap()
        );
        let total = key(Some(
            json!({"amount": 5.0, "period": "total", "currency": "USD"}),
        ));
        assert_eq!(
            key_usage(&total, &Counters::default(), None, now()).period_start,
            None
        );
        assert_eq!(usage::budget_period_id(period(&total), now()), usage::TOTAL);
    }

    #[test]
    fn only_changed_figures_count_as_a_change() {
        let k = key(None);
        let a = key_usage(&k, &Counters::default(), None, now());
        let later = now() + jiff::SignedDuration::from_secs(30);
        let b = key_usage(&k, &Counters::default(), None, later);
        assert!(same_figures(&a, &b));
        let c = key_usage(
            &k,
            &Counters {
                requests: 1,
                ..Counters::default()
            },
            None,
            later,
        );
        assert!(!same_figures(&a, &c));
    }
}
