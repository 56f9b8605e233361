//! Status of every object from one compile (pure): `observedGeneration`, `Ready` and
//! `ResolvedRefs` straight from the compile diagnostics, plus `Propagated` (whether the
//! gateways serve the configuration), kind-specific fields, and the Events that mark a
//! transition. Nothing is patched when nothing changed.

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
    propagated: Option<&ConditionState>,
    now: Timestamp,
) -> CommonStatus {
    let old = |t: &str| previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == t));
    let conditions: Vec<Condition> = states
        .iter()
        .chain(propagated)
        .map(|s| s.to_condition(generation, Time(now), old(s.type_)))
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
    propagated: Option<&ConditionState>,
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
            propagated,
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
    propagated: Option<&ConditionState>,
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
            propagated,
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
    propagated: Option<&ConditionState>,
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
            propagated,
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
            Some((_, previous)) => previous,
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

/// `Propagated` from how many live gateways serve the configuration `hash`.
pub fn propagated(hash: &str, serving: usize, live: usize) -> ConditionState {
    let short = &hash[..hash.len().min(12)];
    if live == 0 {
        ConditionState {
            type_: PROPAGATED,
            status: "Unknown",
            reason: "NoGatewayReports",
            message: format!(
                "no gateway has reported the configuration it serves (needs Redis); latest is {short}"
            ),
        }
    } else if serving == live {
        ConditionState {
            type_: PROPAGATED,
            status: "True",
            reason: "Serving",
            message: format!("{serving}/{live} gateways serve configuration {short}"),
        }
    } else {
        ConditionState {
            type_: PROPAGATED,
            status: "False",
            reason: "Propagating",
            message: format!("{serving}/{live} gateways serve configuration {short}"),
        }
    }
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
        let p = provider(&r.providers[0], &out, None, now()).unwrap();
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

        let k = api_key(&r.api_keys[0], &out, None, None, now()).unwrap();
        assert_eq!(k.status.secret_name.as_deref(), Some("app-key"));
        assert_eq!(k.status.key_prefix.as_deref(), Some("tg_some"));
        assert_eq!(k.status.key_id.as_ref().map(String::len), Some(24));

        // Written back, a later compile changes nothing, even at a later time.
        let mut written = r.api_keys[0].clone();
        written.status = Some(k.status);
        let later = now() + jiff::SignedDuration::from_secs(60);
        assert_eq!(api_key(&written, &out, None, None, later), None);
    }

    #[test]
    fn a_broken_reference_turns_ready_false_with_a_warning_event_and_keeps_the_key_id() {
        let r = load(WORLD);
        let good = compile(&r, &secrets(true), now());
        let mut key = r.api_keys[0].clone();
        key.status = Some(api_key(&key, &good, None, None, now()).unwrap().status);

        let broken = compile(&r, &secrets(false), now());
        let later = now() + jiff::SignedDuration::from_secs(5);
        let update = api_key(&key, &broken, None, None, later).unwrap();
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

    #[test]
    fn propagation_is_reported_as_a_condition_and_changes_without_an_event() {
        let r = load(WORLD);
        let out = compile(&r, &secrets(true), now());
        let mut route = r.route_policies[0].clone();
        let pending = propagated("abcdef0123456789", 1, 3);
        let first = route_policy(&route, &out, Some(&pending), now()).unwrap();
        let cond = first.status.common.conditions.last().unwrap();
        assert_eq!(
            (
                cond.type_.as_str(),
                cond.status.as_str(),
                cond.message.as_str()
            ),
            (
                PROPAGATED,
                "False",
                "1/3 gateways serve configuration abcdef012345"
            )
        );
        route.status = Some(first.status);
        let done = propagated("abcdef0123456789", 3, 3);
        let second = route_policy(&route, &out, Some(&done), now()).unwrap();
        assert_eq!(second.status.common.conditions[2].status, "True");
        assert_eq!(second.event, None, "only Ready transitions make Events");
        assert_eq!(propagated("ab", 0, 0).status, "Unknown");
    }

    #[test]
    fn an_expired_previous_key_is_dropped_from_status() {
        let r = load(WORLD);
        let out = compile(&r, &secrets(true), now());
        let mut key = r.api_keys[0].clone();
        let mut status = api_key(&key, &out, None, None, now()).unwrap().status;
        status.previous_key = Some(tollgate_api::v1alpha1::PreviousKey {
            sha256: "0".repeat(64),
            expires_at: Time(now() + jiff::SignedDuration::from_secs(30)),
        });
        key.status = Some(status);
        assert_eq!(api_key(&key, &out, None, None, now()), None);
        let later = now() + jiff::SignedDuration::from_secs(31);
        let update = api_key(&key, &out, None, None, later).unwrap();
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
        let update = api_key(&key, &out, None, None, now()).unwrap();
        assert_eq!(update.status.common.conditions[0].status, "True");
        let event = update.event.expect("the warning is news");
        assert!(event.warning);
        assert_eq!(event.reason, "NoRoutes");
        // Written back, the same warning is not announced again.
        key.status = Some(update.status);
        let later = now() + jiff::SignedDuration::from_secs(60);
        assert_eq!(api_key(&key, &out, None, None, later), None);
    }

    #[test]
    fn long_event_notes_are_cut_on_a_character_boundary() {
        let text = "é".repeat(600);
        let cut = truncate(&text, 1000);
        assert!(cut.len() <= 1000 && cut.ends_with("..."));
    }
}
