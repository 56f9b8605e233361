//! Reports the configuration this gateway serves to Redis (see
//! `tollgate_api::heartbeat`), for the operator's `Propagated` condition.

use std::{sync::Arc, time::Duration};

use tollgate_api::heartbeat::{CONFIG, EVERY_SECS, FORGET_AFTER_SECS, SEEN};

use tollgate_api::redis_conn::SharedConn;

use crate::config_source::ConfigState;

/// This process's id in reports: the pod name (`HOSTNAME` in Kubernetes) and a random
/// suffix, so two processes on one host never share one.
pub fn instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".to_owned());
    format!("{host}-{:06x}", fastrand::u32(..0x100_0000))
}

/// Reports forever, every `EVERY_SECS` and right after each new configuration is loaded;
/// failures are left to the next round (Redis state is already reported by the limits
/// store).
pub async fn run(mut conn: SharedConn, config: Arc<ConfigState>, instance: String) {
    let mut tick = tokio::time::interval(Duration::from_secs(EVERY_SECS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = config.loaded.notified() => {}
        }
        let hash = config
            .current
            .load()
            .as_ref()
            .map(|s| s.config_hash.clone())
            .unwrap_or_default();
        let now = jiff::Timestamp::now().as_millisecond();
        let mut pipe = redis::pipe();
        pipe.zadd(SEEN, &instance, now)
            .ignore()
            .hset(CONFIG, &instance, &hash)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(SEEN)
            .arg("-inf")
            .arg(now - (FORGET_AFTER_SECS * 1000) as i64)
            .ignore()
            .expire(SEEN, FORGET_AFTER_SECS as i64)
            .ignore()
            .expire(CONFIG, FORGET_AFTER_SECS as i64)
            .ignore();
        let sent = tokio::time::timeout(Duration::from_secs(2), pipe.query_async::<()>(&mut conn));
        match sent.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "configuration heartbeat failed"),
            Err(_) => tracing::debug!("configuration heartbeat timed out"),
        }
    }
}
