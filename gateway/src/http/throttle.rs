//! Failed-authentication throttling per client address: each address may fail
//! authentication `per_minute` times a minute (a token bucket); past that, its requests
//! get 429 before any key is looked at, until the bucket refills. Guessing keys from one
//! address becomes slow, and a client stuck on a bad key backs off.
//!
//! Requests from addresses that never failed cost one atomic load: the map is consulted
//! only while some address is throttled.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Addresses tracked at most; beyond, those whose bucket is full again are forgotten.
const MAX_TRACKED: usize = 100_000;

/// The client address of a request (set by the listener: the peer, or the first address
/// of the configured forwarding header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The throttle.
#[derive(Debug)]
pub struct AuthThrottle {
    per_minute: u32,
    started: Instant,
    /// Until when (ms after `started`) some address may be throttled.
    throttled_until_ms: AtomicU64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl AuthThrottle {
    /// Allows `per_minute` failed authentications a minute per address; 0 turns it off.
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            started: Instant::now(),
            throttled_until_ms: AtomicU64::new(0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let capacity = f64::from(self.per_minute);
        let elapsed = now.duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * capacity / 60.0).min(capacity);
        bucket.updated = now;
    }

    /// How long `addr` must wait, if it is throttled now.
    pub fn check(&self, addr: IpAddr) -> Option<Duration> {
        if self.per_minute == 0 || self.throttled_until_ms.load(Ordering::Relaxed) <= self.now_ms()
        {
            return None;
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.get_mut(&addr)?;
        self.refill(bucket, now);
        (bucket.tokens < 1.0).then(|| self.wait(bucket))
    }

    fn wait(&self, bucket: &Bucket) -> Duration {
        Duration::from_secs_f64((1.0 - bucket.tokens).max(0.0) * 60.0 / f64::from(self.per_minute))
    }

    /// Counts a failed authentication from `addr`.
    pub fn failed(&self, addr: IpAddr) {
        if self.per_minute == 0 {
            return;
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&addr) {
            let capacity = f64::from(self.per_minute);
            buckets.retain(|_, b| {
                self.refill(b, now);
                b.tokens < capacity
            });
        }
        let bucket = buckets.entry(addr).or_insert(Bucket {
            tokens: f64::from(self.per_minute),
            updated: now,
        });
        self.refill(bucket, now);
        bucket.tokens -= 1.0;
        if bucket.tokens < 1.0 {
            let until = self.now_ms() + self.wait(bucket).as_millis() as u64 + 1;
            self.throttled_until_ms.fetch_max(until, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_throttled_after_its_allowance_and_others_are_not() {
        let throttle = AuthThrottle::new(3);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..2 {
            throttle.failed(a);
            assert_eq!(throttle.check(a), None);
        }
        throttle.failed(a);
        let wait = throttle.check(a).expect("throttled after 3 failures");
        assert!(
            wait > Duration::from_secs(15) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert_eq!(throttle.check(b), None, "other addresses are not");
    }

    #[test]
    fn off_means_off() {
        let throttle = AuthThrottle::new(0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..100 {
            throttle.failed(a);
        }
        assert_eq!(throttle.check(a), None);
    }
}
