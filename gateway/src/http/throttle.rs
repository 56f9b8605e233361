//! Failed-authentication throttling per client address: each address may fail
//! authentication `per_minute` times a minute (a token bucket); past that, its requests
//! get 429 before any key is looked at, until the bucket refills. Guessing keys from one
//! address becomes slow, and a client stuck on a bad key backs off.
//!
//! IPv6 clients are counted per /64 (one customer network: rotating addresses within it
//! changes nothing). Requests from addresses that never failed cost one atomic load: the
//! tables are consulted only while some address is throttled. The tables are bounded and
//! sharded: a full shard forgets its oldest entry (O(1)), never scanning under a lock.

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, RandomState},
    net::{IpAddr, Ipv6Addr},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Addresses (or /64s) tracked at most, over all shards.
const MAX_TRACKED: usize = 100_000;

/// Independent tables, so that failures from many addresses do not queue on one lock.
const SHARDS: usize = 16;

/// The client address of a request (set by the listener; see [`crate::client_addr`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// One shard: buckets, and their keys in insertion order for eviction.
#[derive(Debug, Default)]
struct Shard {
    buckets: HashMap<IpAddr, Bucket>,
    order: VecDeque<IpAddr>,
}

/// The throttle.
#[derive(Debug)]
pub struct AuthThrottle {
    per_minute: u32,
    started: Instant,
    /// Until when (ms after `started`) some address may be throttled.
    throttled_until_ms: AtomicU64,
    hasher: RandomState,
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
}

/// What the throttle counts for `addr`: the address, or its /64 for IPv6.
fn throttle_key(addr: IpAddr) -> IpAddr {
    match crate::client_addr::canonical(addr) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

impl AuthThrottle {
    /// Allows `per_minute` failed authentications a minute per address; 0 turns it off.
    pub fn new(per_minute: u32) -> Self {
        Self::with_capacity(per_minute, MAX_TRACKED)
    }

    /// Like [`AuthThrottle::new`], tracking at most about `capacity` addresses.
    pub fn with_capacity(per_minute: u32, capacity: usize) -> Self {
        Self {
            per_minute,
            started: Instant::now(),
            throttled_until_ms: AtomicU64::new(0),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, key: IpAddr) -> std::sync::MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
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
        let key = throttle_key(addr);
        let mut shard = self.shard(key);
        let bucket = shard.buckets.get_mut(&key)?;
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
        let key = throttle_key(addr);
        let mut guard = self.shard(key);
        let shard = &mut *guard;
        if !shard.buckets.contains_key(&key) {
            // Full: forget the oldest entry (most likely refilled long ago).
            while shard.buckets.len() >= self.per_shard {
                let Some(oldest) = shard.order.pop_front() else {
                    break;
                };
                shard.buckets.remove(&oldest);
            }
            shard.order.push_back(key);
        }
        let bucket = shard.buckets.entry(key).or_insert(Bucket {
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

    /// Addresses (or /64s) tracked now.
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).buckets.len())
            .sum()
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
    fn ipv6_clients_are_counted_per_64_and_ipv4_mapped_as_ipv4() {
        let throttle = AuthThrottle::new(2);
        throttle.failed("2001:db8:1:2::1".parse().unwrap());
        throttle.failed("2001:db8:1:2:ffff::9".parse().unwrap());
        // Another address of the same /64: throttled with it.
        assert!(
            throttle
                .check("2001:db8:1:2::abcd".parse().unwrap())
                .is_some()
        );
        assert_eq!(throttle.check("2001:db8:1:3::1".parse().unwrap()), None);
        throttle.failed("::ffff:192.0.2.1".parse().unwrap());
        throttle.failed("192.0.2.1".parse().unwrap());
        assert!(throttle.check("192.0.2.1".parse().unwrap()).is_some());
    }

    #[test]
    fn the_table_stays_bounded_and_forgets_its_oldest_entries() {
        let throttle = AuthThrottle::with_capacity(1, 160);
        for i in 0..10_000u32 {
            throttle.failed(IpAddr::from(i.to_be_bytes()));
        }
        assert!(throttle.tracked() <= 160, "{}", throttle.tracked());
        // The newest are still throttled.
        assert!(
            throttle
                .check(IpAddr::from(9_999u32.to_be_bytes()))
                .is_some()
        );
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
