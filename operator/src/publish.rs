//! New keys are readable only once the gateways accept them.
//!
//! A client reads its key from the ApiKey's Secret the moment the Secret appears. Kubelets
//! update the gateways' mounted configuration up to a minute or more after a change, each
//! on its own schedule, so a key written at once would be refused for that long. With
//! Redis (where gateways report the configuration they serve), a new key, or a rotated
//! one, is therefore *held*: generated, kept in the operator's memory and compiled into
//! the configuration, and written into its Secret only when
//!
//! - every live gateway reports serving a configuration written since the key entered it
//!   ([`Why::Served`]);
//! - or no gateway is live, so there is nothing to wait for ([`Why::NoGateways`]);
//! - or the configuration does not serve the key anyway, e.g. the ApiKey is disabled
//!   ([`Why::NotServed`]);
//! - or the wait reaches `--key-publish-wait` ([`Why::Waited`]): a gateway that never
//!   catches up, or reports that cannot be read, delay a key by that much at most.
//!
//! Without Redis, or with a wait of 0, keys are written at once ([`Why::NoReports`]), as
//! before. A held key lives only in this replica's memory: if the leader changes first,
//! the next leader issues another key, and the held one, never handed out, leaves the
//! configuration (its revocation is harmless).
//!
//! The decision reads facts only: which configurations this replica wrote (in order), and
//! the configuration hash each live gateway reports.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use tollgate_api::{compile::DEFAULT_NAMESPACE, v1alpha1::ApiKey};

use crate::keys::{self, KeyAction};

/// How long a written key Secret stands in for one the cache does not show yet.
const CACHE_LAG: Duration = Duration::from_secs(120);

/// Default of `--key-publish-wait`: past a real kubelet's sync period plus its cache TTL.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(180);

/// How often a reconcile runs while keys are held, to see whether the gateways caught up.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Configurations remembered, to tell how recent the one a gateway reports is.
const REMEMBERED_CONFIGS: usize = 1024;

/// What the gateways report, as read at the start of a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reports {
    /// No Redis: nothing reports.
    Off,
    /// Redis did not answer.
    Unknown,
    /// The configuration hash each live gateway serves (empty when none is live).
    Live(Vec<String>),
}

/// Why a held key is written now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// No reports to wait for (no Redis, or a wait of 0).
    NoReports,
    /// No gateway is live.
    NoGateways,
    /// Every live gateway serves a configuration that holds the key.
    Served,
    /// The configuration does not serve the key (disabled, expired, left out).
    NotServed,
    /// `--key-publish-wait` ran out.
    Waited,
}

impl Why {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoReports => "no_reports",
            Self::NoGateways => "no_gateways",
            Self::Served => "served",
            Self::NotServed => "not_served",
            Self::Waited => "waited",
        }
    }
}

/// The gateways' reports, placed among the configurations this replica wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// No Redis.
    Off,
    /// Redis did not answer.
    Unknown,
    /// Each live gateway's configuration, by its position (see [`Holds::view`]).
    Live(Vec<Option<u64>>),
}

/// Whether to write a held key now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Write it.
    Publish(Why),
    /// Keep holding it: `serving` of `live` gateways serve it (0 of 0 while the reports
    /// cannot be read).
    Hold {
        /// Live gateways serving a configuration that holds the key.
        serving: usize,
        /// Live gateways.
        live: usize,
    },
}

/// What a key action was decided from: a new action is taken, with a new key, only when
/// this changes (the Secret was written or edited, or another rotation was asked for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Basis {
    /// `resourceVersion` of the live Secret (`None`: no Secret yet).
    pub secret_version: Option<String>,
    /// The rotation generation asked for.
    pub generation: i64,
}

struct Held {
    action: KeyAction,
    basis: Basis,
    key_hash: String,
    since: Instant,
    /// Sequence number of the first written configuration that holds the key.
    in_config: Option<u64>,
    /// The last written configuration does not serve the key.
    not_served: bool,
}

#[derive(Default)]
struct State {
    held: HashMap<String, Held>,
    /// Key Secrets written, by ApiKey uid, until the cache shows them.
    wrote: HashMap<String, (Secret, Instant)>,
    /// Configuration hashes written, oldest first; `first_seq` numbers the oldest.
    written: VecDeque<String>,
    first_seq: u64,
}

impl State {
    fn seq_of(&self, hash: &str) -> Option<u64> {
        self.written
            .iter()
            .rposition(|h| h == hash)
            .map(|i| self.first_seq + i as u64)
    }
}

/// Keys held until the gateways serve them, by ApiKey uid.
#[derive(Default)]
pub struct Holds {
    state: Mutex<State>,
}

impl std::fmt::Debug for Holds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a key.
        write!(f, "Holds({})", self.len())
    }
}

impl Holds {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.lock().held.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The action to take for the ApiKey `uid`: the one held for the same `basis` (same
    /// key), or `action` (with `key_hash`, the SHA-256 of its key), which is held from now.
    pub fn hold(&self, uid: &str, action: KeyAction, key_hash: String, basis: Basis) -> KeyAction {
        let mut state = self.lock();
        if let Some(held) = state.held.get(uid)
            && held.basis == basis
        {
            return held.action.clone();
        }
        state.held.insert(
            uid.to_owned(),
            Held {
                action: action.clone(),
                basis,
                key_hash,
                since: Instant::now(),
                in_config: None,
                not_served: false,
            },
        );
        action
    }

    /// The reports, as positions in the configurations this replica wrote (`None`: a
    /// configuration it never wrote, or older than it remembers). Computed once per
    /// reconcile for every [`Holds::decide`].
    pub fn view(&self, reports: &Reports) -> View {
        match reports {
            Reports::Off => View::Off,
            Reports::Unknown => View::Unknown,
            Reports::Live(hashes) => {
                let state = self.lock();
                View::Live(hashes.iter().map(|h| state.seq_of(h)).collect())
            }
        }
    }

    /// Whether to write the key held for `uid` now.
    pub fn decide(&self, uid: &str, view: &View, wait: Duration, now: Instant) -> Decision {
        let state = self.lock();
        let Some(held) = state.held.get(uid) else {
            return Decision::Publish(Why::NoReports);
        };
        let gateways = match view {
            View::Off => return Decision::Publish(Why::NoReports),
            _ if wait.is_zero() => return Decision::Publish(Why::NoReports),
            View::Live(g) if g.is_empty() => return Decision::Publish(Why::NoGateways),
            View::Live(g) => g.as_slice(),
            View::Unknown => &[],
        };
        if held.not_served {
            return Decision::Publish(Why::NotServed);
        }
        let serving = match held.in_config {
            None => 0,
            Some(first) => gateways
                .iter()
                .filter(|s| s.is_some_and(|s| s >= first))
                .count(),
        };
        if !gateways.is_empty() && serving == gateways.len() {
            return Decision::Publish(Why::Served);
        }
        if now.saturating_duration_since(held.since) >= wait {
            return Decision::Publish(Why::Waited);
        }
        Decision::Hold {
            serving,
            live: gateways.len(),
        }
    }

    /// A configuration `hash` was written (or found already in place), serving the key
    /// hashes `served`.
    pub fn written(&self, hash: &str, served: &BTreeSet<&str>) {
        let mut state = self.lock();
        if state.written.back().map(String::as_str) != Some(hash) {
            state.written.push_back(hash.to_owned());
            if state.written.len() > REMEMBERED_CONFIGS {
                state.written.pop_front();
                state.first_seq += 1;
            }
        }
        let seq = state.first_seq + state.written.len() as u64 - 1;
        for held in state.held.values_mut() {
            let in_it = served.contains(held.key_hash.as_str());
            held.not_served = !in_it;
            if in_it && held.in_config.is_none() {
                held.in_config = Some(seq);
            }
        }
    }

    /// The key of ApiKey `uid` is in its Secret now: `secret`, as written.
    pub fn release(&self, uid: &str, secret: &Secret) {
        let mut state = self.lock();
        state.held.remove(uid);
        state
            .wrote
            .insert(uid.to_owned(), (secret.clone(), Instant::now()));
    }

    /// Puts the key Secrets this replica wrote, where the cache does not show them yet
    /// (`live`: the cached key Secrets by namespace and name), so a reconcile that runs
    /// before the watch catches up neither issues another key nor drops the written one.
    pub fn overlay(
        &self,
        api_keys: &[ApiKey],
        live: &mut std::collections::BTreeMap<(String, String), Secret>,
    ) {
        let mut state = self.lock();
        if state.wrote.is_empty() {
            return;
        }
        for key in api_keys {
            let Some(uid) = key.metadata.uid.as_deref() else {
                continue;
            };
            let Some((secret, at)) = state.wrote.get(uid) else {
                continue;
            };
            let id = (
                key.namespace()
                    .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
                secret.name_any(),
            );
            let shown = live
                .get(&id)
                .is_some_and(|s| keys::secret_key(s) == keys::secret_key(secret));
            if shown || at.elapsed() > CACHE_LAG {
                state.wrote.remove(uid);
            } else {
                live.insert(id, secret.clone());
            }
        }
        let uids: std::collections::HashSet<&str> = api_keys
            .iter()
            .filter_map(|k| k.metadata.uid.as_deref())
            .collect();
        state.wrote.retain(|uid, _| uids.contains(uid.as_str()));
    }

    /// Forgets keys held for ApiKeys not in `uids` (deleted).
    pub fn retain(&self, uids: &BTreeSet<&str>) {
        self.lock()
            .held
            .retain(|uid, _| uids.contains(uid.as_str()));
    }

    /// Forgets everything (leadership lost: the next leader decides afresh).
    pub fn clear(&self) {
        let mut state = self.lock();
        state.held.clear();
        state.wrote.clear();
        state.written.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basis(v: Option<&str>) -> Basis {
        Basis {
            secret_version: v.map(str::to_owned),
            generation: 0,
        }
    }

    fn action(n: u8) -> KeyAction {
        KeyAction::Conflict(format!("stand-in {n}"))
    }

    const WAIT: Duration = Duration::from_secs(180);

    fn live(hashes: &[&str]) -> Reports {
        Reports::Live(hashes.iter().map(|h| (*h).to_owned()).collect())
    }

    #[test]
    fn a_held_key_is_the_same_key_until_its_basis_changes() {
        let holds = Holds::default();
        assert_eq!(
            holds.hold("u", action(1), "h1".into(), basis(None)),
            action(1)
        );
        // The next reconcile computes a new random key; the held one is used.
        assert_eq!(
            holds.hold("u", action(2), "h2".into(), basis(None)),
            action(1)
        );
        // The Secret changed under it: a new decision, a new key.
        assert_eq!(
            holds.hold("u", action(3), "h3".into(), basis(Some("7"))),
            action(3)
        );
        holds.release("u", &Secret::default());
        assert!(holds.is_empty());
    }

    #[test]
    fn a_key_is_published_once_every_live_gateway_serves_a_configuration_holding_it() {
        let holds = Holds::default();
        let now = Instant::now();
        holds.written("c0", &BTreeSet::from(["old"]));
        holds.hold("u", action(1), "new".into(), basis(None));
        // Before any configuration with it is written: held, whatever gateways serve.
        assert_eq!(
            holds.decide("u", &holds.view(&live(&["c0", "c0"])), WAIT, now),
            Decision::Hold {
                serving: 0,
                live: 2
            }
        );
        holds.written("c1", &BTreeSet::from(["old", "new"]));
        // Another change after it: later configurations hold it too.
        holds.written("c2", &BTreeSet::from(["old", "new", "other"]));
        assert_eq!(
            holds.decide("u", &holds.view(&live(&["c0", "c2"])), WAIT, now),
            Decision::Hold {
                serving: 1,
                live: 2
            }
        );
        // A hash this replica never wrote (another leader's, or older than it remembers)
        // proves nothing.
        assert_eq!(
            holds.decide("u", &holds.view(&live(&["c1", "elsewhere"])), WAIT, now),
            Decision::Hold {
                serving: 1,
                live: 2
            }
        );
        assert_eq!(
            holds.decide("u", &holds.view(&live(&["c1", "c2"])), WAIT, now),
            Decision::Publish(Why::Served)
        );
    }

    #[test]
    fn nothing_to_wait_for_and_the_wait_bound_publish_at_once() {
        let holds = Holds::default();
        let now = Instant::now();
        holds.hold("u", action(1), "new".into(), basis(None));
        assert_eq!(
            holds.decide("u", &holds.view(&Reports::Off), WAIT, now),
            Decision::Publish(Why::NoReports)
        );
        assert_eq!(
            holds.decide("u", &holds.view(&live(&["c0"])), Duration::ZERO, now),
            Decision::Publish(Why::NoReports)
        );
        assert_eq!(
            holds.decide("u", &holds.view(&live(&[])), WAIT, now),
            Decision::Publish(Why::NoGateways)
        );
        // Reports that cannot be read: held, up to the bound.
        assert_eq!(
            holds.decide("u", &holds.view(&Reports::Unknown), WAIT, now),
            Decision::Hold {
                serving: 0,
                live: 0
            }
        );
        assert_eq!(
            holds.decide(
                "u",
                &holds.view(&Reports::Unknown),
                WAIT,
                now + WAIT + Duration::from_secs(1)
            ),
            Decision::Publish(Why::Waited)
        );
        assert_eq!(
            holds.decide(
                "u",
                &holds.view(&live(&["c0"])),
                WAIT,
                now + WAIT + Duration::from_secs(1)
            ),
            Decision::Publish(Why::Waited)
        );
        // A key the configuration does not serve (a disabled ApiKey) has nothing to
        // wait for.
        holds.written("c1", &BTreeSet::new());
        assert_eq!(
            holds.decide("u", &holds.view(&live(&["c0"])), WAIT, now),
            Decision::Publish(Why::NotServed)
        );
    }

    #[test]
    fn deleted_api_keys_and_lost_leadership_forget_their_keys() {
        let holds = Holds::default();
        holds.hold("a", action(1), "ha".into(), basis(None));
        holds.hold("b", action(2), "hb".into(), basis(None));
        holds.retain(&BTreeSet::from(["b"]));
        assert_eq!(holds.len(), 1);
        assert_eq!(
            holds.hold("b", action(3), "hx".into(), basis(None)),
            action(2)
        );
        holds.clear();
        assert!(holds.is_empty());
        assert_eq!(format!("{holds:?}"), "Holds(0)");
    }
}
