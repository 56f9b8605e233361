//! Revoked keys known to this replica, fed by Redis pub/sub (see
//! `tollgate_api::revocation`), and publishing the keys this replica saw disappear.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use futures_util::StreamExt;
use tollgate_api::revocation::{CHANNEL, REVOKED_SET, Revocation};

use tollgate_api::redis_conn::{RedisCallError, SharedConn, bounded};

/// Revoked key hashes and when each revocation lapses (Unix milliseconds).
#[derive(Debug, Default)]
pub struct Revocations {
    revoked: RwLock<HashMap<[u8; 32], i64>>,
}

fn now_millis() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

fn decode(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Lowercase hex of a hash.
pub fn encode(hash: &[u8; 32]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

impl Revocations {
    /// Whether the key with this hash is revoked now.
    pub fn is_revoked(&self, hash: &[u8; 32]) -> bool {
        let map = self.revoked.read().unwrap_or_else(|e| e.into_inner());
        map.get(hash).is_some_and(|until| *until > now_millis())
    }

    /// Applies a revocation.
    pub fn apply(&self, r: &Revocation) {
        let mut map = self.revoked.write().unwrap_or_else(|e| e.into_inner());
        let now = now_millis();
        map.retain(|_, until| *until > now);
        for hash in r.key_sha256.iter().filter_map(|h| decode(h)) {
            let entry = map.entry(hash).or_insert(r.until_millis);
            *entry = (*entry).max(r.until_millis);
        }
    }

    /// Number of revocations in force.
    pub fn len(&self) -> usize {
        let now = now_millis();
        self.revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|u| **u > now)
            .count()
    }

    /// Whether none is in force.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Publishes the revocation of `hashes` (see `tollgate_api::revocation::publish`).
pub async fn publish(
    conn: SharedConn,
    hashes: &[[u8; 32]],
    timeout: Duration,
) -> Result<(), RedisCallError> {
    let hex: Vec<String> = hashes.iter().map(encode).collect();
    tollgate_api::revocation::publish(conn, &hex, timeout).await
}

/// Follows the revocation channel forever through any of `clients` (one per Redis node;
/// pub/sub messages reach every node of a cluster): resynchronises from the set over
/// `conn` on every (re)connection, then applies messages as they arrive.
pub async fn follow(clients: Vec<redis::Client>, conn: SharedConn, revocations: Arc<Revocations>) {
    let mut backoff = Duration::from_millis(100);
    for client in clients.iter().cycle() {
        match follow_once(client, conn.clone(), &revocations).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => tracing::debug!(error = %e, "revocation channel unavailable; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// How often a replica re-reads the revocation set even while subscribed.
const RESYNC_EVERY: Duration = Duration::from_secs(10);

async fn resync(conn: &mut SharedConn, revocations: &Revocations) -> Result<(), RedisCallError> {
    let members: Vec<(String, i64)> = bounded("resynchronisation", Duration::from_secs(2), async {
        Ok(redis::cmd("ZRANGEBYSCORE")
            .arg(REVOKED_SET)
            .arg(now_millis())
            .arg("+inf")
            .arg("WITHSCORES")
            .query_async(conn)
            .await?)
    })
    .await?;
    for (hash, until) in members {
        revocations.apply(&Revocation {
            key_sha256: vec![hash],
            until_millis: until,
        });
    }
    Ok(())
}

async fn follow_once(
    client: &redis::Client,
    mut conn: SharedConn,
    revocations: &Revocations,
) -> Result<(), RedisCallError> {
    let mut pubsub = bounded("connect", Duration::from_secs(2), async {
        Ok(client.get_async_pubsub().await?)
    })
    .await?;
    pubsub.subscribe(CHANNEL).await?;
    // Catch up on what was published while this replica was not listening, and again
    // now and then in case this connection went quiet without closing.
    resync(&mut conn, revocations).await?;
    let mut messages = pubsub.into_on_message();
    let mut tick = tokio::time::interval(RESYNC_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else { break };
                let Ok(payload) = message.get_payload::<String>() else {
                    continue;
                };
                match serde_json::from_str::<Revocation>(&payload) {
                    Ok(r) => revocations.apply(&r),
                    Err(e) => tracing::warn!(error = %e, "ignoring a malformed revocation message"),
                }
            }
            _ = tick.tick() => {
                if let Err(e) = resync(&mut conn, revocations).await {
                    tracing::debug!(error = %e, "periodic revocation resynchronisation failed");
                }
            }
        }
    }
    Err(RedisCallError::Closed("revocation channel"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_hold_until_they_lapse() {
        let r = Revocations::default();
        let hash = [7u8; 32];
        r.apply(&Revocation {
            key_sha256: vec![encode(&hash)],
            until_millis: now_millis() + 60_000,
        });
        assert!(r.is_revoked(&hash));
        assert!(!r.is_revoked(&[8u8; 32]));
        r.apply(&Revocation {
            key_sha256: vec![encode(&[9u8; 32])],
            until_millis: now_millis() - 1,
        });
        assert!(
            !r.is_revoked(&[9u8; 32]),
            "a lapsed revocation does not apply"
        );
        assert_eq!(r.len(), 1);
    }
}
