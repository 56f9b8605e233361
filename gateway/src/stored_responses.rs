//! Who stored which Responses API response, and where.
//!
//! Every tenant's requests reach an upstream with the Provider's one credential, so at the
//! upstream all their stored responses belong to the same account: an id alone would let
//! one tenant read, delete or continue (`previous_response_id`) another's conversation.
//! The gateway records, for each response an upstream stored (`store` not false), the
//! owner scope of the key that created it (its namespace and owner), the Provider that
//! holds it and the route it came through; retrieving, deleting, listing input items and
//! continuing are allowed to that scope only, and go to that Provider. Ids nobody here
//! recorded are unknown (404), like another tenant's.
//!
//! Kept in Redis when configured (every replica sees it; 30 days, OpenAI's retention),
//! else in process (bounded: the oldest are forgotten first).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::redis::{Redis, StoreError};

/// How long a record is kept (OpenAI keeps stored responses 30 days).
pub const TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Records kept in process without Redis.
pub const MAX_LOCAL: usize = 100_000;

/// Who created a stored response, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The creating key's `namespace/owner`.
    pub scope: String,
    /// The Provider that stores it.
    pub provider: String,
    /// The route it was created through (its response guardrails apply to reads).
    pub route: String,
}

/// The owner scope of a key: its namespace and owner.
pub fn scope_of(key: &crate::snapshot::Key) -> String {
    format!("{}/{}", key.namespace, key.entry.owner)
}

/// Whether `id` looks like a response id (`resp_…`): nothing else is looked up or put
/// into an upstream URL.
pub fn is_response_id(id: &str) -> bool {
    id.starts_with("resp_")
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

/// The records.
#[derive(Debug, Default)]
pub struct StoredResponses {
    local: Mutex<Local>,
    redis: Option<Redis>,
}

#[derive(Debug, Default)]
struct Local {
    owners: HashMap<String, Owner>,
    order: VecDeque<String>,
}

fn redis_key(id: &str) -> String {
    format!("tollgate:{}:response:{id}", crate::limits::redis::LAYOUT)
}

impl StoredResponses {
    /// Records kept in `redis`, or in process without one.
    pub fn new(redis: Option<Redis>) -> Self {
        Self {
            local: Mutex::default(),
            redis,
        }
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `owner` for response `id` (written to Redis in the background).
    pub fn record(self: &Arc<Self>, id: &str, owner: Owner) {
        if !is_response_id(id) {
            return;
        }
        let Some(redis) = &self.redis else {
            let mut local = self.local();
            if local.owners.insert(id.to_owned(), owner).is_none() {
                local.order.push_back(id.to_owned());
            }
            while local.order.len() > MAX_LOCAL {
                if let Some(old) = local.order.pop_front() {
                    local.owners.remove(&old);
                }
            }
            return;
        };
        let Ok(value) = serde_json::to_string(&owner) else {
            return;
        };
        let (redis, key) = (redis.clone(), redis_key(id));
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let mut conn = redis.conn();
                let mut set = redis::cmd("SET");
                set.arg(&key).arg(value).arg("EX").arg(TTL.as_secs());
                let sent = redis
                    .call("response_owner_set", set.query_async::<()>(&mut conn))
                    .await;
                if let Err(e) = sent {
                    tracing::warn!(error = %e, "could not record a stored response's owner; its owner cannot read it through this gateway");
                }
            });
        }
    }

    /// The owner of response `id`, if recorded.
    pub async fn owner(&self, id: &str) -> Result<Option<Owner>, StoreError> {
        if !is_response_id(id) {
            return Ok(None);
        }
        let Some(redis) = &self.redis else {
            return Ok(self.local().owners.get(id).cloned());
        };
        let mut conn = redis.conn();
        let value: Option<String> = redis
            .call(
                "response_owner_get",
                redis::cmd("GET").arg(redis_key(id)).query_async(&mut conn),
            )
            .await?;
        Ok(value.and_then(|v| serde_json::from_str(&v).ok()))
    }

    /// Forgets response `id` (it was deleted upstream).
    pub async fn forget(&self, id: &str) {
        let Some(redis) = &self.redis else {
            let mut local = self.local();
            local.owners.remove(id);
            local.order.retain(|k| k != id);
            return;
        };
        let mut conn = redis.conn();
        let _ = redis
            .call(
                "response_owner_del",
                redis::cmd("DEL")
                    .arg(redis_key(id))
                    .query_async::<i64>(&mut conn),
            )
            .await;
    }
}

/// What the relay records when an upstream stores a response: where, and for whom.
#[derive(Debug, Clone)]
pub struct Remember {
    /// The records.
    pub store: Arc<StoredResponses>,
    /// The owner to record.
    pub owner: Owner,
}

impl Remember {
    /// Records a response object (or a stream event's `response`) the upstream stored.
    pub fn response(&self, response: &serde_json::Value) {
        if response["store"] == false {
            return;
        }
        if let Some(id) = response["id"].as_str() {
            self.store.record(id, self.owner.clone());
        }
    }

    /// Records the response of a whole answer body.
    pub fn body(&self, body: &[u8]) {
        #[derive(Deserialize)]
        struct Head<'a> {
            #[serde(borrow)]
            id: Option<&'a str>,
            store: Option<bool>,
        }
        if let Ok(Head {
            id: Some(id),
            store,
        }) = serde_json::from_slice::<Head<'_>>(body)
            && store != Some(false)
        {
            self.store.record(id, self.owner.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(scope: &str) -> Owner {
        Owner {
            scope: scope.into(),
            provider: "ns/openai".into(),
            route: "ns/chat".into(),
        }
    }

    #[tokio::test]
    async fn records_are_kept_per_id_and_only_for_response_ids() {
        let store = Arc::new(StoredResponses::new(None));
        store.record("resp_abc", owner("team-a/alice"));
        store.record("../../etc", owner("team-a/alice"));
        assert_eq!(
            store.owner("resp_abc").await.unwrap(),
            Some(owner("team-a/alice"))
        );
        assert_eq!(store.owner("../../etc").await.unwrap(), None);
        assert_eq!(store.owner("resp_other").await.unwrap(), None);
        store.forget("resp_abc").await;
        assert_eq!(store.owner("resp_abc").await.unwrap(), None);
    }

    #[test]
    fn only_plain_response_ids_are_accepted() {
        assert!(is_response_id(
            "resp_68af4030592c81938ec0a5fbab4a3e9f05438e46b5f69a3b"
        ));
        for bad in [
            "msg_1",
            "resp_a/b",
            "resp_a?x=1",
            "resp_a%2F..",
            "",
            "resp_\n",
        ] {
            assert!(!is_response_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_response_not_stored_upstream_is_not_recorded() {
        let store = Arc::new(StoredResponses::new(None));
        let remember = Remember {
            store: store.clone(),
            owner: owner("t/o"),
        };
        remember.body(br#"{"id":"resp_kept","object":"response"}"#);
        remember.body(br#"{"id":"resp_dropped","store":false}"#);
        remember.response(&serde_json::json!({"id": "resp_streamed", "store": true}));
        let local = store.local();
        assert!(local.owners.contains_key("resp_kept"));
        assert!(local.owners.contains_key("resp_streamed"));
        assert!(!local.owners.contains_key("resp_dropped"));
    }
}
