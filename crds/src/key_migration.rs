//! Moving a key's shared state to a new key id: when the served configuration gives an
//! ApiKey another id (key ids grew from 48 to 96 bits), its budget spend and usage counters
//! of the current periods are copied to the new id before gateways use it, so a budget
//! never restarts because of an upgrade. Copies never overwrite state the new id already
//! has, so running twice (or after gateways started on the new id) is harmless.

use std::time::Duration;

use crate::{
    config::KeysConfig,
    redis_conn::SharedConn,
    usage::{TOTAL, budget_period_id, budget_prefix, periods, usage_key},
    v1alpha1::BudgetPeriod,
};

/// One ApiKey whose id changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdChange {
    /// The id gateways use now.
    pub old: String,
    /// The id of the new configuration.
    pub new: String,
    /// The key's budget period, if it has a budget.
    pub budget: Option<BudgetPeriod>,
}

/// ApiKeys (by `namespace/name`) whose id differs between the `live` and `new` configuration.
pub fn id_changes(live: &KeysConfig, new: &KeysConfig) -> Vec<IdChange> {
    let before: std::collections::BTreeMap<&str, &str> = live
        .keys
        .iter()
        .map(|k| (k.api_key.as_str(), k.id.as_str()))
        .collect();
    let mut out: Vec<IdChange> = Vec::new();
    for k in &new.keys {
        let Some(old) = before.get(k.api_key.as_str()) else {
            continue;
        };
        // A rotated key has two entries with one id: one change is enough.
        if *old != k.id && !out.iter().any(|c| c.new == k.id) {
            out.push(IdChange {
                old: (*old).to_owned(),
                new: k.id.clone(),
                budget: k.budget.as_ref().map(|b| b.period),
            });
        }
    }
    out
}

/// The Redis keys to copy for one change, as (from, to) pairs, at `now`.
pub fn copies(change: &IdChange, now: jiff::Timestamp) -> Vec<(String, String)> {
    let (day, month) = periods(now);
    let mut out: Vec<(String, String)> = [day.as_str(), month.as_str(), TOTAL]
        .iter()
        .map(|p| (usage_key(&change.old, p), usage_key(&change.new, p)))
        .collect();
    if let Some(period) = change.budget {
        let id = budget_period_id(period, now);
        out.push((
            format!("{}:spent", budget_prefix(&change.old, &id)),
            format!("{}:spent", budget_prefix(&change.new, &id)),
        ));
    }
    out
}

/// Why copying a key's state failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Redis did not answer in time for one copy.
    #[error("copying {0} timed out")]
    Timeout(String),
    /// Redis refused or the connection failed.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// Copies the state of every change (see [`copies`]); returns how many Redis keys were
/// copied. Each copy keeps the source's time to live; an existing target is left alone.
pub async fn copy_state(
    conn: SharedConn,
    changes: &[IdChange],
    now: jiff::Timestamp,
    timeout: Duration,
) -> Result<usize, CopyError> {
    use futures_util::StreamExt;
    let pairs: Vec<(String, String)> = changes.iter().flat_map(|c| copies(c, now)).collect();
    let results: Vec<Result<bool, CopyError>> = futures_util::stream::iter(pairs)
        .map(|(from, to)| {
            let conn = conn.clone();
            async move {
                tokio::time::timeout(timeout, copy_one(conn, &from, &to))
                    .await
                    .map_err(|_| CopyError::Timeout(from))?
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut copied = 0;
    for r in results {
        copied += usize::from(r?);
    }
    Ok(copied)
}

async fn copy_one(mut conn: SharedConn, from: &str, to: &str) -> Result<bool, CopyError> {
    let dump: Option<Vec<u8>> = redis::cmd("DUMP").arg(from).query_async(&mut conn).await?;
    let Some(dump) = dump else {
        return Ok(false);
    };
    let ttl: i64 = redis::cmd("PTTL").arg(from).query_async(&mut conn).await?;
    let restored: Result<(), _> = redis::cmd("RESTORE")
        .arg(to)
        .arg(ttl.max(0))
        .arg(dump)
        .query_async(&mut conn)
        .await;
    match restored {
        Ok(()) => Ok(true),
        // The new id already has state (gateways use it): never overwritten.
        Err(e) if e.code() == Some("BUSYKEY") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CompiledBudget, CompiledKey};

    fn key(api_key: &str, id: &str, sha: &str, budget: bool) -> CompiledKey {
        CompiledKey {
            sha256: sha.to_owned(),
            id: id.to_owned(),
            api_key: api_key.to_owned(),
            owner: "o".to_owned(),
            team: None,
            allowed_models: Vec::new(),
            shared_routes_from: Vec::new(),
            limits: None,
            budget: budget.then(|| CompiledBudget {
                amount: 1.0,
                period: BudgetPeriod::Monthly,
                currency: "USD".to_owned(),
            }),
            expires_at: None,
            guardrails: Vec::new(),
        }
    }

    #[test]
    fn only_keys_whose_id_changed_are_moved_once_each() {
        let live = KeysConfig {
            keys: vec![
                key("a/x", "aaaaaaaaaaaa", "1", true),
                key("a/y", "bbbbbbbbbbbbbbbbbbbbbbbb", "2", false),
            ],
        };
        let new = KeysConfig {
            keys: vec![
                key("a/x", "aaaaaaaaaaaa000000000000", "1", true),
                // The rotated-out entry of the same ApiKey.
                key("a/x", "aaaaaaaaaaaa000000000000", "3", true),
                key("a/y", "bbbbbbbbbbbbbbbbbbbbbbbb", "2", false),
                key("a/z", "cccccccccccccccccccccccc", "4", false),
            ],
        };
        let changes = id_changes(&live, &new);
        assert_eq!(
            changes,
            [IdChange {
                old: "aaaaaaaaaaaa".into(),
                new: "aaaaaaaaaaaa000000000000".into(),
                budget: Some(BudgetPeriod::Monthly),
            }]
        );
        let now: jiff::Timestamp = "2026-12-03T10:00:00Z".parse().unwrap();
        let pairs = copies(&changes[0], now);
        assert_eq!(pairs.len(), 4);
        assert_eq!(
            pairs[3],
            (
                "tollgate:v1:{k:aaaaaaaaaaaa}:budget:2026-12:spent".to_owned(),
                "tollgate:v1:{k:aaaaaaaaaaaa000000000000}:budget:2026-12:spent".to_owned()
            )
        );
    }
}
