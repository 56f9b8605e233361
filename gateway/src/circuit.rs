//! Circuit breakers per upstream target (provider and model): after `threshold`
//! consecutive failures the target is skipped for `open` time, then one probe request is
//! let through; its success closes the circuit, its failure opens it again. State lives
//! outside configuration snapshots, so a reload does not forget a failing upstream.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

/// One target's breaker. Lock-free: atomics only.
#[derive(Debug, Default)]
pub struct Breaker {
    failures: AtomicU32,
    /// Unix milliseconds until which the circuit is open; 0 when closed.
    open_until_ms: AtomicU64,
    probing: AtomicBool,
}

/// Circuit state, as exported in metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Traffic flows.
    Closed,
    /// Traffic is refused.
    Open,
    /// One probe may pass.
    HalfOpen,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl Breaker {
    /// Current state.
    pub fn state(&self) -> State {
        self.state_at(now_ms())
    }

    fn state_at(&self, now: u64) -> State {
        match self.open_until_ms.load(Ordering::Acquire) {
            0 => State::Closed,
            until if now < until => State::Open,
            _ => State::HalfOpen,
        }
    }

    /// Whether a request may go to this target now (taking the probe slot when half-open).
    pub fn allow(&self) -> bool {
        self.allow_at(now_ms())
    }

    fn allow_at(&self, now: u64) -> bool {
        match self.state_at(now) {
            State::Closed => true,
            State::Open => false,
            State::HalfOpen => self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok(),
        }
    }

    /// Records a healthy answer.
    pub fn success(&self) {
        self.failures.store(0, Ordering::Release);
        self.open_until_ms.store(0, Ordering::Release);
        self.probing.store(false, Ordering::Release);
    }

    /// Gives back the probe slot after an attempt that said nothing about the upstream's
    /// health (the request never reached it).
    pub fn release(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// Records a failure (connection error, timeout, 429, 5xx).
    pub fn failure(&self, threshold: u32, open_ms: u64) {
        self.failure_at(threshold, open_ms, now_ms());
    }

    fn failure_at(&self, threshold: u32, open_ms: u64, now: u64) {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let half_open = self.probing.swap(false, Ordering::AcqRel);
        if half_open || failures >= threshold.max(1) {
            self.open_until_ms
                .store(now + open_ms.max(1), Ordering::Release);
        }
    }
}

/// All breakers, by target key.
#[derive(Debug, Default)]
pub struct Breakers {
    map: RwLock<HashMap<String, Arc<Breaker>>>,
}

impl Breakers {
    /// The breaker of `provider`/`model`, created closed on first use.
    pub fn get(&self, provider: &str, model: &str) -> Arc<Breaker> {
        let key = format!("{provider}#{model}");
        if let Some(b) = self.map.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return b.clone();
        }
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone()
    }

    /// Every breaker's state, for metrics.
    pub fn states(&self) -> Vec<(String, State)> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, b)| (k.clone(), b.state()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_a_success_resets_the_count() {
        let b = Breaker::default();
        b.failure_at(3, 1000, 10);
        b.failure_at(3, 1000, 10);
        b.success();
        b.failure_at(3, 1000, 10);
        b.failure_at(3, 1000, 10);
        assert_eq!(b.state_at(10), State::Closed);
        b.failure_at(3, 1000, 10);
        assert_eq!(b.state_at(10), State::Open);
        assert!(!b.allow_at(500));
    }

    #[test]
    fn half_open_lets_exactly_one_probe_through() {
        let b = Breaker::default();
        b.failure_at(1, 100, 0);
        assert!(!b.allow_at(50));
        assert!(b.allow_at(100), "the probe");
        assert!(!b.allow_at(101), "only one probe at a time");
        b.success();
        assert!(b.allow_at(102) && b.allow_at(103));
    }

    #[test]
    fn a_failed_probe_reopens_the_circuit() {
        let b = Breaker::default();
        b.failure_at(5, 100, 0);
        b.failure_at(1, 100, 0);
        assert!(b.allow_at(100));
        b.failure_at(5, 100, 100);
        assert_eq!(b.state_at(150), State::Open);
        assert_eq!(b.state_at(200), State::HalfOpen);
    }
}
