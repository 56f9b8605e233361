//! Key revocation over Redis, so a disabled, deleted or rotated-out key stops working on
//! every gateway at once instead of when each pod's mounted configuration catches up.
//!
//! Publishers (the operator, and any gateway that loads a configuration in which a key
//! disappeared) add each revoked key hash to the sorted set [`REVOKED_SET`] (score: Unix
//! milliseconds until which the revocation holds) and publish a [`Revocation`] as JSON on
//! [`CHANNEL`]. Gateways apply messages as they arrive and re-read the set when they
//! (re)connect, so a missed message is caught up. The mounted configuration stays the
//! source of truth; revocations only bridge the time it takes to propagate.

use serde::{Deserialize, Serialize};

/// Pub/sub channel of revocation messages.
pub const CHANNEL: &str = "tollgate:v1:revocations";
/// Sorted set of revoked key hashes, scored by expiry (Unix milliseconds).
pub const REVOKED_SET: &str = "tollgate:v1:revoked";
/// How long a revocation holds: longer than configuration takes to reach every pod.
pub const HOLD_MILLIS: i64 = 5 * 60 * 1000;

/// One revocation message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Revocation {
    /// SHA-256 (lowercase hex) of each revoked key.
    pub key_sha256: Vec<String>,
    /// Unix milliseconds until which the revocation holds.
    pub until_millis: i64,
}

/// Publishes the revocation of `key_sha256` (lowercase hex) for [`HOLD_MILLIS`]: recorded
/// in [`REVOKED_SET`] first (for replicas that miss the message), then announced on
/// [`CHANNEL`], so a replica that resynchronises on the message finds it.
#[cfg(feature = "redis")]
pub async fn publish(
    mut conn: crate::redis_conn::SharedConn,
    key_sha256: &[String],
    timeout: std::time::Duration,
) -> Result<(), crate::redis_conn::RedisCallError> {
    let now = jiff::Timestamp::now().as_millisecond();
    let message = Revocation {
        key_sha256: key_sha256.to_vec(),
        until_millis: now + HOLD_MILLIS,
    };
    // The set is one key (one slot on a cluster); the message goes out separately.
    let mut pipe = redis::pipe();
    for hash in &message.key_sha256 {
        pipe.zadd(REVOKED_SET, hash, message.until_millis).ignore();
    }
    pipe.cmd("ZREMRANGEBYSCORE")
        .arg(REVOKED_SET)
        .arg("-inf")
        .arg(now)
        .ignore();
    let payload = serde_json::to_string(&message)?;
    let work = async {
        pipe.query_async::<()>(&mut conn).await?;
        redis::cmd("PUBLISH")
            .arg(CHANNEL)
            .arg(payload)
            .query_async::<i64>(&mut conn)
            .await?;
        Ok(())
    };
    crate::redis_conn::bounded("publishing revocations", timeout, work).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_camel_case_json() {
        let r = Revocation {
            key_sha256: vec!["ab".into()],
            until_millis: 5,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"keySha256":["ab"],"untilMillis":5}"#);
        assert_eq!(serde_json::from_str::<Revocation>(&text).unwrap(), r);
        assert!(
            serde_json::from_str::<Revocation>(r#"{"keySha256":[],"untilMillis":1,"x":1}"#)
                .is_err()
        );
    }
}
