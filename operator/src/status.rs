//! Status of every object from one compile (pure): `observedGeneration`, `Ready` and
//! `ResolvedRefs` straight from the compile diagnostics, plus `Propagated` (whether the
//! gateways serve this generation of the object), kind-specific fields, and the Events
//! that mark a transition. Nothing is patched when nothing changed.
//!
//! Propagation costs O(1) writes per change, whatever the number of objects: an object's
//! `Propagated` describes its own generation only (False when it changes, True once every
//! live gateway serves a configuration built from it, then left alone while other objects
//! change), and the gateways' progress on the latest configuration is one record on the
//! generated ConfigMap ([`Record`]). While the reports cannot be read (Redis failing),
//! every condition keeps its last value.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use tollgate_api::{
    compile::CompileOutput,
    diagnostics::{ConditionState, Kind, ObjectRef, Severity, condition_types, reasons},
    v1alpha1::{
        ApiKey, ApiKeyStatus, CommonStatus, PreviousKey, Provider, ProviderStatus, RoutePolicy,
        RoutePolicyStatus,
    },
};

/// Condition type: whether the gateways serve the configuration holding this object.
pub const PROPAGATED: &str = "Propagated";

/// Annotation on the generated ConfigMap: the gateways' progress on the latest
/// configuration, as a JSON [`Record`].
pub const PROPAGATION_ANNOTATION: &str = "tollgate.dev/propagation";

/// What the gateways' reports say about the configuration just written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation<'a> {
    /// Nothing reports (no Redis): objects carry no `Propagated` condition.
    Off,
    /// The reports could not be read (Redis failing): every condition and the record
    /// keep their last value.
    Unknown,
    /// `serving` of the `live` gateways serve configuration `hash`.
    Known {
        /// The configuration just written.
        hash: &'a str,
        /// Live gateways serving it.
        serving: usize,
        /// Gateways that reported recently.
        live: usize,
    },
}

/// The gateways' progress on the latest configuration, kept on the generated ConfigMap
/// (`tollgate.dev/propagation`) and rewritten only when the configuration, its state or
/// the number of live gateways changes, never for each gateway that catches up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The latest configuration.
    pub config_hash: String,
    /// `Serving` (every live gateway serves it), `Propagating` or `NoGatewayReports`.
    pub state: String,
    /// Live gateways when the state was recorded.
    pub gateways: usize,
    /// When the state was recorded (RFC 3339).
    pub since: String,
}

impl Record {
    /// The record for `propagation`, or `None` when nothing is known.
    pub fn of(propagation: Propagation<'_>, now: Timestamp) -> Option<Self> {
        let Propagation::Known {
            hash,
            serving,
            live,
        } = propagation
        else {
            return None;
        };
        Some(Self {
            config_hash: hash.to_owned(),
            state: object_state(serving, live).reason.to_owned(),
            gateways: live,
            since: now.to_string(),
        })
    }

    /// Whether `previous` (the annotation now on the ConfigMap) already says this.
    pub fn same_as(&self, previous: Option<&str>) -> bool {
        previous
            .and_then(|p| serde_json::from_str::<Self>(p).ok())
            .is_some_and(|p| {
                (&p.config_hash, &p.state, p.gateways)
                    == (&self.config_hash, &self.state, self.gateways)
            })
    }
}

/// An object's `Propagated` for its current generation: no counts and no configuration
/// hash while it waits, so other objects' changes and gateways catching up one by one
/// never rewrite it.
fn object_state(serving: usize, live: usize) -> ConditionState {
    if live == 0 {
        ConditionState {
            type_: PROPAGATED,
            status: "Unknown",
            reason: "NoGatewayReports",
            message: "no gateway has reported the configuration it serves (gateways report through Redis every 5 s)".to_owned(),
        }
    } else if serving == live {
        ConditionState {
            type_: PROPAGATED,
            status: "True",
            reason: "Serving",
            message: String::new(),
        }
    } else {
        ConditionState {
            type_: PROPAGATED,
            status: "False",
            reason: "Propagating",
            message:
                "waiting for every live gateway to serve a configuration built from this generation"
                    .to_owned(),
        }
    }
}

/// The `Propagated` condition of an object at `generation`, given its previous one.
fn propagated_condition(
    previous: Option<&Condition>,
    generation: Option<i64>,
    propagation: Propagation<'_>,
    now: Timestamp,
) -> Option<Condition> {
    let Propagation::Known {
        hash,
        serving,
        live,
    } = propagation
    else {
        return match propagation {
            Propagation::Off => None,
            _ => previous.cloned(),
        };
    };
    let mut state = object_state(serving, live);
    // At most two writes per generation: when it changes (waiting) and when every live
    // gateway serves it. Served once, later configurations still hold it; while it waits,
    // the waiting state is not rewritten as gateways come, go or catch up.
    if let Some(p) = previous
        && p.observed_generation == generation
        && (p.status == "True" || state.status != "True")
    {
        return Some(p.clone());
    }
    if state.status == "True" {
        state.message = format!(
            "every live gateway ({live}) serves it, since configuration {}",
            &hash[..hash.len().min(12)]
        );
    }
    Some(state.to_condition(generation, Time(now), previous))
}

/// An Event to record about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventNote {
    /// `Normal` or `Warning`.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Human-readable note.
    pub note: String,
}

/// The common part of a status: conditions (transition times kept when unchanged) and the
/// generation they describe.
fn common(
    generation: Option<i64>,
    previous: Option<&CommonStatus>,
    states: &[ConditionState],
    propagation: Propagation<'_>,
    now: Timestamp,
) -> CommonStatus {
    let old = |t: &str| previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == t));
    let conditions: Vec<Condition> = states
        .iter()
        .map(|s| s.to_condition(generation, Time(now), old(s.type_)))
        .chain(propagated_condition(
            old(PROPAGATED),
            generation,
            propagation,
            now,
        ))
        .collect();
    CommonStatus {
        observed_generation: generation,
        conditions,
    }
}

/// The Event marking a change of `Ready`, if it changed.
fn transition(previous: Option<&CommonStatus>, next: &CommonStatus) -> Option<EventNote> {
    let ready = |s: Option<&CommonStatus>| {
        s.and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == condition_types::READY)
                .map(|c| (c.status.clone(), c.reason.clone()))
        })
    };
    let (before, after) = (ready(previous), ready(Some(next)));
    if before == after {
        return None;
    }
    // A new object that is simply Ready is the normal case, not news: 10,000 ApiKeys
    // applied at once must not mean 10,000 Events.
    if before.is_none()
        && after
            .as_ref()
            .is_some_and(|(s, r)| s == "True" && r == reasons::READY)
    {
        return None;
    }
    // A new key waiting for the gateways is normal too, and its end is told by the
    // `KeyIssued` Event: no Event into or out of `KeyPending` (unless it was something
    // else before, or becomes something else than Ready).
    let pending =
        |c: &Option<(String, String)>| c.as_ref().is_some_and(|(_, r)| r == reasons::KEY_PENDING);
    let simply_ready = |c: &Option<(String, String)>| {
        c.as_ref()
            .is_some_and(|(s, r)| s == "True" && r == reasons::READY)
    };
    if (before.is_none() && pending(&after)) || (pending(&before) && simply_ready(&after)) {
        return None;
    }
    let cond = next
        .conditions
        .iter()
        .find(|c| c.type_ == condition_types::READY)?;
    Some(EventNote {
        warning: cond.status != "True",
        reason: cond.reason.clone(),
        note: truncate(&cond.message, 1000),
    })
}

/// The Event for a change of `Ready`, or else for a warning that was not in the previous
/// `Ready` message (a shared route shadowed, a key that reaches no route…): a warning
/// leaves `Ready` true, but the team that owns the object should still hear of it once.
fn event(
    previous: Option<&CommonStatus>,
    next: &CommonStatus,
    object: &ObjectRef,
    out: &CompileOutput,
) -> Option<EventNote> {
    transition(previous, next).or_else(|| {
        let before = previous
            .and_then(|p| {
                p.conditions
                    .iter()
                    .find(|c| c.type_ == condition_types::READY)
            })
            .map(|c| c.message.as_str())
            .unwrap_or_default();
        out.diagnostics_for(object)
            .find(|d| d.severity == Severity::Warning && !before.contains(&d.message))
            .map(|d| EventNote {
                warning: true,
                reason: d.reason.to_owned(),
                note: truncate(&d.to_string(), 1000),
            })
    })
}

/// Events notes are limited to 1 KiB by the API server.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// A status to write, and the Event that goes with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Update<S> {
    /// The new status.
    pub status: S,
    /// The Event, when `Ready` changed.
    pub event: Option<EventNote>,
}

fn object_ref<K: ResourceExt>(kind: Kind, o: &K) -> ObjectRef {
    ObjectRef::new(
        kind,
        o.namespace().as_deref().unwrap_or_default(),
        &o.name_any(),
    )
}

/// A Provider's new status, or `None` when it is unchanged.
pub fn provider(
    p: &Provider,
    out: &CompileOutput,
    propagation: Propagation<'_>,
    now: Timestamp,
) -> Option<Update<ProviderStatus>> {
    let object = object_ref(Kind::Provider, p);
    let outcome = out.objects.get(&object).cloned().unwrap_or_default();
    let previous = p.status.as_ref();
    let next = ProviderStatus {
        common: common(
            p.metadata.generation,
            previous.map(|s| &s.common),
            &out.conditions(&object),
            propagation,
            now,
        ),
        model_count: outcome.model_count,
    };
    (previous != Some(&next)).then(|| Update {
        event: event(previous.map(|s| &s.common), &next.common, &object, out),
        status: next,
    })
}

/// A RoutePolicy's new status, or `None` when it is unchanged.
pub fn route_policy(
    r: &RoutePolicy,
    out: &CompileOutput,
    propagation: Propagation<'_>,
    now: Timestamp,
) -> Option<Update<RoutePolicyStatus>> {
    let object = object_ref(Kind::RoutePolicy, r);
    let outcome = out.objects.get(&object).cloned().unwrap_or_default();
    let previous = r.status.as_ref();
    let next = RoutePolicyStatus {
        common: common(
            r.metadata.generation,
            previous.map(|s| &s.common),
            &out.conditions(&object),
            propagation,
            now,
        ),
        ready_targets: outcome.ready_targets,
    };
    (previous != Some(&next)).then(|| Update {
        event: event(previous.map(|s| &s.common), &next.common, &object, out),
        status: next,
    })
}

/// An ApiKey's new status, or `None` when it is unchanged. Rotation bookkeeping and usage
/// are kept from the current status (they have their own writers).
pub fn api_key(
    k: &ApiKey,
    out: &CompileOutput,
    propagation: Propagation<'_>,
    rotation: Option<(Option<i64>, Option<PreviousKey>)>,
    now: Timestamp,
) -> Option<Update<ApiKeyStatus>> {
    let object = object_ref(Kind::ApiKey, k);
    let outcome = out.objects.get(&object).cloned().unwrap_or_default();
    let previous = k.status.as_ref();
    let keep = previous.cloned().unwrap_or_default();
    let next = ApiKeyStatus {
        common: common(
            k.metadata.generation,
            previous.map(|s| &s.common),
            &out.conditions(&object),
            propagation,
            now,
        ),
        // A key that is not served (disabled, expired…) still shows which key it is.
        key_id: outcome.key_id.or(keep.key_id),
        key_prefix: outcome.key_prefix.or(keep.key_prefix),
        secret_name: outcome.secret_name.or(keep.secret_name),
        // From the key Secret, the record the gateways trust; the status only shows it.
        rotated_generation: match &rotation {
            Some((Some(g), _)) => Some(*g),
            _ => keep.rotated_generation,
        },
        previous_key: match rotation {
            // As the API stores it (whole seconds), so a status read back compares equal.
            Some((_, previous)) => previous.map(|p| PreviousKey {
                expires_at: Time(
                    Timestamp::from_second(p.expires_at.0.as_second()).unwrap_or(p.expires_at.0),
                ),
                ..p
            }),
            None => keep.previous_key,
        }
        .filter(|p| p.expires_at.0 > now),
        usage: keep.usage,
    };
    (previous != Some(&next)).then(|| Update {
        event: event(previous.map(|s| &s.common), &next.common, &object, out),
        status: next,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{ByteString, api::core::v1::Secret};
    use tollgate_api::{
        compile::{Resources, SecretStore, compile},
        diagnostics::reasons,
    };

    use super::*;

    fn load(yaml: &str) -> Resources {
        let mut loaded = tollgate_api::manifests::Loaded::default();
        let mut errors = Vec::new();
        tollgate_api::manifests::load_str(
            std::path::Path::new("t.yaml"),
            yaml,
            &mut loaded,
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let mut r = loaded.resources;
        for k in &mut r.api_keys {
            k.metadata.generation = Some(1);
        }
        for p in &mut r.providers {
            p.metadata.generation = Some(2);
        }
        r
    }

    const WORLD: &str = "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {name: mock, namespace: default}\nspec: {type: mock, models: [{name: demo}]}\n---\n\
        apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: demo, namespace: default}\nspec: {models: [demo], targets: [{provider: mock}]}\n---\n\
        apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: app, namespace: default}\nspec: {owner: team}\n";

    fn secrets(with_key: bool) -> SecretStore {
        let mut s = Secret::default();
        s.metadata.name = Some("app-key".into());
        s.metadata.namespace = Some("default".into());
        if with_key {
            s.data = Some(BTreeMap::from([(
                "apiKey".to_owned(),
                ByteString(b"tg_someKeyThatIsLongEnough000000000".to_vec()),
            )]));
        }
        SecretStore::new([&s], "default")
    }

    fn now() -> Timestamp {
        "2026-11-22T10:00:00Z".parse().unwrap()
    }

    #[test]
    fn statuses_come_from_the_compile_and_are_written_once() {
        let r = load(WORLD);
        let out = compile(&r, &secrets(true), now());
        let p = provider(&r.providers[0], &out, Propagation::Off, now()).unwrap();
        assert_eq!(p.status.common.observed_generation, Some(2));
        assert_eq!(p.status.model_count, Some(1));
        let types: Vec<&str> = p
            .status
            .common
            .conditions
            .iter()
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(types, ["Ready", "ResolvedRefs"]);
        assert_eq!(p.event, None, "a new, healthy object is no news");

        let k = api_key(&r.api_keys[0], &out, Propagation::Off, None, now()).unwrap();
        assert_eq!(k.status.secret_name.as_deref(), Some("app-key"));
        assert_eq!(k.status.key_prefix.as_deref(), Some("tg_some"));
        assert_eq!(k.status.key_id.as_ref().map(String::len), Some(24));

        // Written back, a later compile changes nothing, even at a later time.
        let mut written = r.api_keys[0].clone();
        written.status = Some(k.status);
        let later = now() + jiff::SignedDuration::from_secs(60);
        assert_eq!(api_key(&written, &out, Propagation::Off, None, later), None);
    }

    #[test]
    fn a_broken_reference_turns_ready_false_with_a_warning_event_and_keeps_the_key_id() {
        let r = load(WORLD);
        let good = compile(&r, &secrets(true), now());
        let mut key = r.api_keys[0].clone();
        key.status = Some(
            api_key(&key, &good, Propagation::Off, None, now())
                .unwrap()
                .status,
        );

        let broken = compile(&r, &secrets(false), now());
        let later = now() + jiff::SignedDuration::from_secs(5);
        let update = api_key(&key, &broken, Propagation::Off, None, later).unwrap();
        let ready = &update.status.common.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", reasons::SECRET_KEY_NOT_FOUND)
        );
        assert!(ready.message.contains("app-key"), "{}", ready.message);
        assert_eq!(ready.last_transition_time.0, later);
        let event = update.event.unwrap();
        assert!(event.warning);
        assert_eq!(event.reason, reasons::SECRET_KEY_NOT_FOUND);
        assert_eq!(update.status.key_id, key.status.as_ref().unwrap().key_id);
    }

    fn propagated_of(r: &RoutePolicy) -> Condition {
        r.status
            .as_ref()
            .unwrap()
            .common
            .conditions
            .iter()
            .find(|c| c.type_ == PROPAGATED)
            .unwrap()
            .clone()
    }

    #[test]
    fn propagation_is_written_once_per_change_of_the_object_itself() {
        let r = load(WORLD);
        let out = compile(&r, &secrets(true), now());
        let mut route = r.route_policies[0].clone();
        route.metadata.generation = Some(1);
        let known = |hash, serving, live| Propagation::Known {
            hash,
            serving,
            live,
        };
        let first = route_policy(&route, &out, known("abcdef0123456789", 1, 3), now()).unwrap();
        assert_eq!(first.event, None, "only Ready transitions make Events");
        route.status = Some(first.status);
        let c = propagated_of(&route);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "Propagating")
        );
        assert_eq!(c.observed_generation, Some(1));

        // Gateways catching up one by one, coming and going, and other objects changing
        // the configuration, rewrite nothing while this generation waits.
        for (hash, serving, live) in [
            ("abcdef0123456789", 2, 3),
            ("0123456789abcdef", 0, 3),
            ("0123456789abcdef", 0, 0),
        ] {
            assert_eq!(
                route_policy(&route, &out, known(hash, serving, live), now()),
                None
            );
        }
        // Unreadable reports (Redis failing) keep the last value: no write.
        assert_eq!(
            route_policy(&route, &out, Propagation::Unknown, now()),
            None
        );

        let served = route_policy(&route, &out, known("0123456789abcdef", 3, 3), now()).unwrap();
        route.status = Some(served.status);
        let c = propagated_of(&route);
        assert_eq!(
            (c.status.as_str(), c.message.as_str()),
            (
                "True",
                "every live gateway (3) serves it, since configuration 0123456789ab"
            )
        );
        // Once served, later configurations and scale changes leave it alone...
        for p in [
            known("fedcba9876543210", 0, 4),
            known("fedcba9876543210", 1, 1),
            known("fedcba9876543210", 0, 0),
            Propagation::Unknown,
        ] {
            assert_eq!(route_policy(&route, &out, p, now()), None, "{p:?}");
        }
        // ...until the object itself changes.
        route.metadata.generation = Some(2);
        let next = route_policy(&route, &out, known("fedcba9876543210", 0, 4), now()).unwrap();
        let cond = next
            .status
            .common
            .conditions
            .iter()
            .find(|c| c.type_ == PROPAGATED)
            .unwrap();
        assert_eq!(
            (cond.status.as_str(), cond.observed_generation),
            ("False", Some(2))
        );

        // Without Redis there is no condition at all.
        route.status = None;
        let off = route_policy(&route, &out, Propagation::Off, now()).unwrap();
        assert!(
            off.status
                .common
                .conditions
                .iter()
                .all(|c| c.type_ != PROPAGATED)
        );
        let none = route_policy(&route, &out, known("ab", 0, 0), now()).unwrap();
        let c = none.status.common.conditions.last().unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("Unknown", "NoGatewayReports")
        );
    }

    #[test]
    fn the_global_record_changes_with_the_configuration_its_state_or_the_gateway_count() {
        let known = |hash, serving, live| Propagation::Known {
            hash,
            serving,
            live,
        };
        let first = Record::of(known("aa", 1, 3), now()).unwrap();
        assert_eq!(first.state, "Propagating");
        let text = serde_json::to_string(&first).unwrap();
        let later = now() + jiff::SignedDuration::from_secs(5);
        let same = |p| Record::of(p, later).unwrap().same_as(Some(&text));
        assert!(
            same(known("aa", 2, 3)),
            "a gateway catching up changes nothing"
        );
        for changed in [known("aa", 3, 3), known("bb", 1, 3), known("aa", 1, 4)] {
            assert!(!same(changed), "{changed:?}");
        }
        assert!(!first.same_as(None) && !first.same_as(Some("garbage")));
        assert_eq!(Record::of(Propagation::Unknown, now()), None);
        assert_eq!(Record::of(Propagation::Off, now()), None);
    }

    #[test]
    fn an_expired_previous_key_is_dropped_from_status() {
        let r = load(WORLD);
        let out = compile(&r, &secrets(true), now());
        let mut key = r.api_keys[0].clone();
        let mut status = api_key(&key, &out, Propagation::Off, None, now())
            .unwrap()
            .status;
        status.previous_key = Some(tollgate_api::v1alpha1::PreviousKey {
            sha256: "0".repeat(64),
            expires_at: Time(now() + jiff::SignedDuration::from_secs(30)),
        });
        key.status = Some(status);
        assert_eq!(api_key(&key, &out, Propagation::Off, None, now()), None);
        let later = now() + jiff::SignedDuration::from_secs(31);
        let update = api_key(&key, &out, Propagation::Off, None, later).unwrap();
        assert_eq!(update.status.previous_key, None);
    }

    #[test]
    fn a_new_warning_is_an_event_once_while_ready_stays_true() {
        // The key's namespace serves nothing: Ready, with a NoRoutes warning.
        let r = load(&WORLD.replace(
            "kind: ApiKey\nmetadata: {name: app, namespace: default}",
            "kind: ApiKey\nmetadata: {name: app, namespace: other}",
        ));
        let mut s = Secret::default();
        s.metadata.name = Some("app-key".into());
        s.metadata.namespace = Some("other".into());
        s.data = Some(BTreeMap::from([(
            "apiKey".to_owned(),
            ByteString(b"tg_someKeyThatIsLongEnough000000000".to_vec()),
        )]));
        let out = compile(&r, &SecretStore::new([&s], "default"), now());
        let mut key = r.api_keys[0].clone();
        let update = api_key(&key, &out, Propagation::Off, None, now()).unwrap();
        assert_eq!(update.status.common.conditions[0].status, "True");
        let event = update.event.expect("the warning is news");
        assert!(event.warning);
        assert_eq!(event.reason, "NoRoutes");
        // Written back, the same warning is not announced again.
        key.status = Some(update.status);
        let later = now() + jiff::SignedDuration::from_secs(60);
        assert_eq!(api_key(&key, &out, Propagation::Off, None, later), None);
    }

    #[test]
    fn a_key_waiting_for_the_gateways_is_no_event_and_neither_is_its_end() {
        let with_ready = |status: &str, reason: &str| -> CommonStatus {
            serde_json::from_value(serde_json::json!({"conditions": [{
                "type": "Ready", "status": status, "reason": reason, "message": "m",
                "lastTransitionTime": "2026-11-22T10:00:00Z",
            }]}))
            .unwrap()
        };
        let pending = with_ready("False", reasons::KEY_PENDING);
        let ready = with_ready("True", reasons::READY);
        let refused = with_ready("False", reasons::SECRET_REFUSED);
        assert_eq!(transition(None, &pending), None);
        assert_eq!(transition(Some(&pending), &ready), None);
        // Anything else stays news.
        assert!(transition(Some(&pending), &refused).is_some_and(|e| e.warning));
        assert!(transition(Some(&ready), &pending).is_some_and(|e| e.warning));
    }

    #[test]
    fn long_event_notes_are_cut_on_a_character_boundary() {
        let text = "é".repeat(600);
        let cut = truncate(&text, 1000);
        assert!(cut.len() <= 1000 && cut.ends_with("..."));
    }
}
