//! Exact-match response cache (in process; the Redis-backed cache shares it across
//! replicas next). Entries are keyed by the route, the operation, the scope (key owner by
//! default, the key itself, or shared when a RoutePolicy opts in) and the request body
//! with its JSON keys sorted, so a different model, parameter or message is a different
//! entry. Only complete, successful, non-streamed answers are stored.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::redis::{Redis, StoreError};

/// The cache the gateway uses: this replica's memory, plus Redis when configured so every
/// replica shares answers. A Redis outage is only a miss.
#[derive(Debug)]
pub struct Cache {
    local: ResponseCache,
    shared: Option<Redis>,
}

impl Cache {
    /// A cache in memory, shared through `redis` when given.
    pub fn new(max_bytes: usize, shared: Option<Redis>) -> Self {
        Self {
            local: ResponseCache::new(max_bytes),
            shared,
        }
    }

    /// The live entry for `key`: this replica's first, then the shared one.
    pub async fn get(&self, key: &[u8; 32]) -> Option<Entry> {
        if let Some(e) = self.local.get(key) {
            return Some(e);
        }
        let redis = self.shared.as_ref()?;
        let (content_type, body) = shared_get(redis, &hex(key)).await.ok().flatten()?;
        Some(Entry {
            body,
            content_type,
            expires: Instant::now(),
        })
    }

    /// Stores an answer here and, in the background, in Redis.
    pub fn put(&self, key: [u8; 32], body: Bytes, content_type: String, ttl: Duration) {
        if let Some(redis) = &self.shared
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            let (redis, id, body, content_type) =
                (redis.clone(), hex(&key), body.clone(), content_type.clone());
            handle.spawn(async move {
                if let Err(e) = shared_put(&redis, &id, &content_type, &body, ttl).await {
                    tracing::debug!(error = %e, "storing a cache entry in Redis failed");
                }
            });
        }
        self.local.put(key, body, content_type, ttl);
    }
}

fn hex(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// A cached answer.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Response body.
    pub body: Bytes,
    /// Its content type.
    pub content_type: String,
    expires: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<[u8; 32], Entry>,
    /// Insertion order, for eviction.
    order: VecDeque<[u8; 32]>,
    bytes: usize,
}

/// The cache of this replica, bounded in bytes.
#[derive(Debug)]
pub struct ResponseCache {
    inner: Mutex<Inner>,
    max_bytes: usize,
}

/// The cache key of a request, or `None` when its body is not JSON.
pub fn key(scope: &str, route: &str, operation: &str, body: &[u8]) -> Option<[u8; 32]> {
    // serde_json's map is ordered by key, so re-serialising normalises key order and
    // whitespace while keeping every value (including the stream flag).
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let canonical = serde_json::to_vec(&value).ok()?;
    let mut h = Sha256::new();
    for part in [scope.as_bytes(), route.as_bytes(), operation.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(&canonical);
    Some(h.finalize().into())
}

impl ResponseCache {
    /// A cache holding at most `max_bytes` of bodies.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_bytes,
        }
    }

    /// The live entry for `key`, if any.
    pub fn get(&self, key: &[u8; 32]) -> Option<Entry> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .entries
            .get(key)
            .filter(|e| e.expires > Instant::now())
            .cloned()
    }

    /// Stores an answer for `ttl`, evicting expired then oldest entries to stay in bounds.
    pub fn put(&self, key: [u8; 32], body: Bytes, content_type: String, ttl: Duration) {
        if body.len() > self.max_bytes {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some(old) = inner.entries.remove(&key) {
            inner.bytes -= old.body.len();
            inner.order.retain(|k| k != &key);
        }
        while inner.bytes + body.len() > self.max_bytes {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(e) = inner.entries.remove(&oldest) {
                inner.bytes -= e.body.len();
            }
        }
        // Expired entries go too, so the map does not grow with dead keys.
        let expired: Vec<[u8; 32]> = inner
            .entries
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(k, _)| *k)
            .take(16)
            .collect();
        for k in expired {
            if let Some(e) = inner.entries.remove(&k) {
                inner.bytes -= e.body.len();
                inner.order.retain(|o| o != &k);
            }
        }
        inner.bytes += body.len();
        inner.order.push_back(key);
        inner.entries.insert(
            key,
            Entry {
                body,
                content_type,
                expires: now + ttl,
            },
        );
    }
}

/// A shared cache entry: its content type and body.
async fn shared_get(redis: &Redis, id: &str) -> Result<Option<(String, bytes::Bytes)>, StoreError> {
    let mut conn = redis.conn();
    let value: Option<Vec<u8>> = redis
        .call(
            "cache_get",
            redis::cmd("GET").arg(cache_key(id)).query_async(&mut conn),
        )
        .await?;
    Ok(value.and_then(|v| {
        // Stored as `<content type>\n<body>`.
        let split = v.iter().position(|b| *b == b'\n')?;
        let content_type = String::from_utf8(v[..split].to_vec()).ok()?;
        Some((content_type, bytes::Bytes::copy_from_slice(&v[split + 1..])))
    }))
}

/// Stores a shared cache entry for `ttl`.
async fn shared_put(
    redis: &Redis,
    id: &str,
    content_type: &str,
    body: &[u8],
    ttl: Duration,
) -> Result<(), StoreError> {
    let mut value = Vec::with_capacity(content_type.len() + 1 + body.len());
    value.extend_from_slice(content_type.as_bytes());
    value.push(b'\n');
    value.extend_from_slice(body);
    let mut conn = redis.conn();
    let _: () = redis
        .call(
            "cache_put",
            redis::cmd("SET")
                .arg(cache_key(id))
                .arg(value)
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64)
                .query_async(&mut conn),
        )
        .await?;
    Ok(())
}

fn cache_key(id: &str) -> String {
    format!("tollgate:{}:cache:{id}", crate::limits::redis::LAYOUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_ignore_json_formatting_but_not_content_scope_or_route() {
        let a = key(
            "owner",
            "r",
            "chat",
            br#"{"model":"m","messages":[1],"temperature":0}"#,
        )
        .unwrap();
        let b = key(
            "owner",
            "r",
            "chat",
            br#"{ "temperature": 0, "messages": [1], "model": "m" }"#,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_ne!(
            a,
            key(
                "owner",
                "r",
                "chat",
                br#"{"model":"m","messages":[1],"temperature":1}"#
            )
            .unwrap()
        );
        assert_ne!(
            a,
            key(
                "other",
                "r",
                "chat",
                br#"{"model":"m","messages":[1],"temperature":0}"#
            )
            .unwrap()
        );
        assert_ne!(
            a,
            key(
                "owner",
                "r2",
                "chat",
                br#"{"model":"m","messages":[1],"temperature":0}"#
            )
            .unwrap()
        );
        assert_ne!(
            a,
            key(
                "owner",
                "r",
                "chat",
                br#"{"model":"m","messages":[1],"temperature":0,"stream":true}"#
            )
            .unwrap()
        );
        assert!(key("o", "r", "c", b"not json").is_none());
    }

    #[test]
    fn entries_expire_and_the_size_bound_evicts_the_oldest() {
        let cache = ResponseCache::new(10);
        cache.put(
            [1; 32],
            Bytes::from_static(b"12345"),
            "a".into(),
            Duration::from_secs(60),
        );
        cache.put(
            [2; 32],
            Bytes::from_static(b"12345"),
            "a".into(),
            Duration::from_secs(60),
        );
        cache.put(
            [3; 32],
            Bytes::from_static(b"123"),
            "a".into(),
            Duration::from_secs(60),
        );
        assert!(
            cache.get(&[1; 32]).is_none(),
            "evicted to stay within 10 bytes"
        );
        assert!(cache.get(&[2; 32]).is_some() && cache.get(&[3; 32]).is_some());
        cache.put(
            [4; 32],
            Bytes::from_static(b"1"),
            "a".into(),
            Duration::ZERO,
        );
        assert!(cache.get(&[4; 32]).is_none(), "expired");
        cache.put(
            [5; 32],
            Bytes::from(vec![0; 11]),
            "a".into(),
            Duration::from_secs(60),
        );
        assert!(cache.get(&[5; 32]).is_none(), "larger than the whole cache");
    }
}
