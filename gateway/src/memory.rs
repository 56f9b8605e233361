//! The gateway-wide budget for request memory in flight.
//!
//! Every request holds a share of one budget for as long as its body (and whatever the
//! gateway derives from it) is in memory: the body's bytes as they arrive, a rewritten
//! copy when the body is edited, and an estimate of the parsed tree when a step needs
//! one (guardrails, cache keys, dialect translation, content recording). A request that
//! does not fit in what is left is answered `503 overloaded` with `Retry-After` instead
//! of growing the process; one that could never fit (a tree larger than the whole
//! budget) gets a 413 that says why. The share is returned when the request is done
//! with its body (when the response head is sent), so open streams hold none.
//!
//! The sizes are accounted, not measured: `TREE_BYTES_PER_VALUE` is an upper bound of
//! what `serde_json::Value` costs per JSON value (32-byte values, vectors that grow by
//! doubling, B-tree map nodes), checked by the memory test and the `hostile` benchmark.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::error::ApiError;

/// Accounting unit: permits are KiB, so a u32 count covers any budget.
const UNIT: usize = 1024;

/// Bytes charged per JSON value of a parsed tree, on top of the body's own bytes (which
/// bound every string and key the tree copies).
pub const TREE_BYTES_PER_VALUE: usize = 96;

/// The process-wide budget.
#[derive(Debug)]
pub struct Budget {
    permits: Arc<Semaphore>,
    total_units: usize,
}

impl Budget {
    /// A budget of `bytes` (rounded up to whole KiB). `0` means unlimited.
    pub fn new(bytes: usize) -> Arc<Self> {
        let total_units = if bytes == 0 {
            Semaphore::MAX_PERMITS
        } else {
            bytes.div_ceil(UNIT).min(Semaphore::MAX_PERMITS)
        };
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(total_units)),
            total_units,
        })
    }

    /// The whole budget in bytes (`usize::MAX` when unlimited).
    pub fn total_bytes(&self) -> usize {
        if self.total_units == Semaphore::MAX_PERMITS {
            usize::MAX
        } else {
            self.total_units * UNIT
        }
    }

    /// Bytes currently held by requests.
    pub fn in_use_bytes(&self) -> usize {
        (self.total_units - self.permits.available_permits()) * UNIT
    }

    /// An empty share for one request.
    pub fn share(self: &Arc<Self>) -> Share {
        Share {
            budget: self.clone(),
            held: Mutex::new(Held::default()),
        }
    }
}

#[derive(Debug, Default)]
struct Held {
    permit: Option<OwnedSemaphorePermit>,
    /// Units held for the body and its copies.
    body_units: usize,
    /// Units held for parsed trees (the largest ever asked for).
    tree_units: usize,
}

/// What one request holds of the budget; returned when dropped.
#[derive(Debug)]
pub struct Share {
    budget: Arc<Budget>,
    held: Mutex<Held>,
}

/// Why a share could not grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// Not now: other requests hold the rest.
    Busy,
    /// Never: more than the whole budget.
    TooLarge,
}

impl Share {
    /// Holds `bytes` more for the body or a copy of it; `what` names the use in a 413.
    pub fn grow(&self, bytes: usize, what: &str) -> Result<(), ApiError> {
        self.try_grow(bytes).map_err(|r| self.error(r, what))
    }

    /// Makes sure `trees` parsed trees of `body` fit in what is held (idempotent: asking
    /// again for as many trees, or fewer, takes nothing more); `what` names the use.
    pub fn reserve_trees(&self, body: &[u8], trees: usize, what: &str) -> Result<(), ApiError> {
        self.try_reserve_trees(body, trees)
            .map_err(|r| self.error(r, what))
    }

    fn try_grow(&self, bytes: usize) -> Result<(), Refused> {
        let units = bytes.div_ceil(UNIT);
        let mut held = self.held.lock().expect("budget share lock");
        self.take(&mut held, units)?;
        held.body_units += units;
        Ok(())
    }

    fn try_reserve_trees(&self, body: &[u8], trees: usize) -> Result<(), Refused> {
        let one = tree_bytes(body);
        let units = one.saturating_mul(trees).div_ceil(UNIT);
        let mut held = self.held.lock().expect("budget share lock");
        if units <= held.tree_units {
            return Ok(());
        }
        let more = units - held.tree_units;
        self.take(&mut held, more)?;
        held.tree_units = units;
        Ok(())
    }

    /// Bytes held by this request.
    pub fn held_bytes(&self) -> usize {
        let held = self.held.lock().expect("budget share lock");
        (held.body_units + held.tree_units) * UNIT
    }

    fn take(&self, held: &mut Held, units: usize) -> Result<(), Refused> {
        if units == 0 {
            return Ok(());
        }
        let whole = held.body_units + held.tree_units + units;
        if whole > self.budget.total_units {
            return Err(Refused::TooLarge);
        }
        let n = u32::try_from(units).map_err(|_| Refused::TooLarge)?;
        let permit = match self.budget.permits.clone().try_acquire_many_owned(n) {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => return Err(Refused::Busy),
            Err(TryAcquireError::Closed) => return Err(Refused::Busy),
        };
        match held.permit.as_mut() {
            Some(p) => p.merge(permit),
            None => held.permit = Some(permit),
        }
        Ok(())
    }
}

impl Share {
    /// The client's answer: `503 overloaded` (retry) or a 413 naming what needed the
    /// memory.
    fn error(&self, refused: Refused, what: &str) -> ApiError {
        match refused {
            Refused::Busy => ApiError::Overloaded,
            Refused::TooLarge => ApiError::TooComplex(format!(
                "The request needs more memory for {what} than this gateway allows for all requests in flight ({} MiB); send a smaller or simpler body.",
                self.budget.total_bytes() / (1024 * 1024)
            )),
        }
    }
}

/// Upper bound of the memory of `serde_json::Value` parsed from `body`: its bytes plus
/// `TREE_BYTES_PER_VALUE` per value. One pass, no allocation.
pub fn tree_bytes(body: &[u8]) -> usize {
    body.len().saturating_add(
        crate::request::shape(body)
            .values
            .saturating_mul(TREE_BYTES_PER_VALUE),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_counted_outside_strings() {
        let values = |b: &[u8]| crate::request::shape(b).values;
        assert_eq!(values(b"0"), 1);
        assert_eq!(values(b"[0,0,0]"), 4);
        assert_eq!(values(br#"{"a":[1,2],"b":"x,y,[{"}"#), 5);
        assert_eq!(values(br#"{"a":"\",["}"#), 2);
    }

    #[test]
    fn the_estimate_bounds_what_serde_json_allocates() {
        // The hostile shape: a huge array of small numbers. Sizes of the Value tree:
        // 32 bytes per element, vector capacity at most twice the length.
        let body = format!(r#"{{"model":"m","pad":[{}0]}}"#, "0,".repeat(100_000));
        let estimate = tree_bytes(body.as_bytes());
        let value_size = std::mem::size_of::<serde_json::Value>();
        assert!(value_size <= 32, "{value_size}");
        assert!(estimate >= 100_000 * 2 * value_size, "{estimate}");
    }

    #[test]
    fn shares_take_from_one_budget_and_give_back_when_dropped() {
        let budget = Budget::new(64 * 1024);
        let a = budget.share();
        a.grow(40 * 1024, "its body").unwrap();
        let b = budget.share();
        assert_eq!(b.try_grow(40 * 1024), Err(Refused::Busy));
        assert_eq!(b.try_grow(100 * 1024), Err(Refused::TooLarge));
        let busy = b.grow(40 * 1024, "its body").unwrap_err();
        assert_eq!(busy.status(), 503);
        let never = b.grow(100 * 1024, "its body").unwrap_err();
        assert_eq!(never.status(), 413);
        assert!(never.to_string().contains("for its body"), "{never}");
        b.grow(24 * 1024, "its body").unwrap();
        assert_eq!(budget.in_use_bytes(), 64 * 1024);
        drop(a);
        assert_eq!(budget.in_use_bytes(), 24 * 1024);
        // Trees are reserved once, at the largest size asked for.
        let small = br#"{"model":"m","messages":[]}"#;
        drop(b);
        let b = budget.share();
        b.reserve_trees(small, 2, "x").unwrap();
        let held = b.held_bytes();
        b.reserve_trees(small, 1, "x").unwrap();
        b.reserve_trees(small, 2, "x").unwrap();
        assert_eq!(b.held_bytes(), held);
        drop(b);
        assert_eq!(budget.in_use_bytes(), 0);
    }

    #[test]
    fn zero_means_unlimited() {
        let budget = Budget::new(0);
        let share = budget.share();
        share.grow(1 << 40, "x").unwrap();
        assert_eq!(budget.total_bytes(), usize::MAX);
    }
}
