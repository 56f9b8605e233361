//! What `compile` makes of Tollgate objects: the served configuration, the diagnostics
//! and the conditions users see in `status`.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use sha2::{Digest, Sha256};

use super::{CompileOutput, DEFAULT_NAMESPACE, Resources, SecretStore, compile};
use crate::{
    config::{CompiledAuth, CompiledBudget, CompiledKey, CompiledRoute, CompiledTarget},
    diagnostics::{ConditionState, Kind, ObjectRef, Severity, condition_types, reasons},
    v1alpha1::{
        AnthropicSettings, ApiKey, ApiKeySpec, ApiKeyStatus, AuthStyle, AzureSettings, Budget,
        BudgetPeriod, CREDENTIAL_LABEL, Credentials, Limits, MockSettings,
        PREVIOUS_KEY_EXPIRES_SECRET_KEY, PREVIOUS_KEY_SHA256_SECRET_KEY, PreviousKey, Pricing,
        Provider, ProviderModel, ProviderSpec, ProviderType, Retries, Rotation, RoutePolicy,
        RoutePolicySpec, RouteTarget, SecretKeyRef,
    },
};

// === Fixtures ===

const NS: &str = "team-a";
const OPENAI_TOKEN: &str = "sk-test-openai-7f3a9c21";
const ALICE_KEY: &str = "tg_live_alice_0123456789abcdef";
const BOB_KEY: &str = "tg_live_bob_fedcba9876543210xyz";

/// The fixed "current time" every compilation runs at.
fn now() -> Timestamp {
    Timestamp::from_second(1_750_000_000).unwrap()
}

/// `now` shifted by `seconds` (negative is the past).
fn at(seconds: i64) -> Time {
    Time(now() + SignedDuration::from_secs(seconds))
}

/// Puts an object in the test namespace, as the API server would.
fn placed<K: kube::Resource>(mut obj: K) -> K {
    let meta = obj.meta_mut();
    meta.namespace = Some(NS.to_owned());
    meta.generation = Some(1);
    obj
}

/// Sets `creationTimestamp` to `seconds_ago` before `now`.
fn created<K: kube::Resource>(mut obj: K, seconds_ago: i64) -> K {
    obj.meta_mut().creation_timestamp = Some(at(-seconds_ago));
    obj
}

fn model(name: &str) -> ProviderModel {
    ProviderModel {
        name: name.to_owned(),
        upstream_name: None,
        pricing: Some(Pricing {
            input_per_million: 2.5,
            output_per_million: 10.0,
            cached_input_per_million: None,
            cache_write_per_million: None,
        }),
        context_window: Some(128_000),
        max_output_tokens: None,
    }
}

/// A Provider of `kind` serving `models`, with everything its type needs: a credential in
/// Secret `<name>-credentials` (key `token`), a base URL and an azure section where
/// required.
fn provider(name: &str, kind: ProviderType, models: &[&str]) -> Provider {
    let needs_url = matches!(
        kind,
        ProviderType::AzureOpenAi | ProviderType::OpenaiCompatible
    );
    placed(Provider::new(
        name,
        ProviderSpec {
            provider_type: kind,
            base_url: needs_url.then(|| format!("https://{name}.example.com/v1")),
            credentials: (kind != ProviderType::Mock).then(|| Credentials {
                secret_ref: SecretKeyRef {
                    name: format!("{name}-credentials"),
                    key: "token".to_owned(),
                },
                auth_style: None,
                header_name: None,
            }),
            azure: (kind == ProviderType::AzureOpenAi).then(|| AzureSettings {
                api_version: "2024-10-21".to_owned(),
            }),
            anthropic: None,
            apis: None,
            mock: None,
            models: models.iter().map(|m| model(m)).collect(),
            currency: "USD".to_owned(),
            timeouts: Default::default(),
            max_concurrency: None,
            circuit_breaker: Default::default(),
            http_version: Default::default(),
            headers: BTreeMap::new(),
            shared_with: Vec::new(),
        },
    ))
}

fn openai(models: &[&str]) -> Provider {
    provider("openai", ProviderType::Openai, models)
}

fn secret_meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(NS.to_owned()),
        ..Default::default()
    }
}

/// A Secret written with `stringData`.
fn string_secret(name: &str, entries: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: secret_meta(name),
        string_data: Some(
            entries
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        ..Default::default()
    }
}

/// A Secret written with (already decoded) `data`.
fn data_secret(name: &str, entries: &[(&str, &[u8])]) -> Secret {
    Secret {
        metadata: secret_meta(name),
        data: Some(
            entries
                .iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// The credential Secret [`provider`] refers to, labelled as a credential.
fn credential_secret(provider: &str, value: &str) -> Secret {
    labelled(string_secret(
        &format!("{provider}-credentials"),
        &[("token", value)],
    ))
}

/// `secret` with the label that lets Providers use it.
fn labelled(mut secret: Secret) -> Secret {
    secret
        .metadata
        .labels
        .get_or_insert_default()
        .insert(CREDENTIAL_LABEL.to_owned(), "true".to_owned());
    secret
}

fn target(provider: &str) -> RouteTarget {
    RouteTarget {
        provider: provider.to_owned(),
        provider_namespace: None,
        model: None,
        weight: 1,
        priority: 0,
    }
}

fn target_model(provider: &str, model: &str) -> RouteTarget {
    RouteTarget {
        model: Some(model.to_owned()),
        ..target(provider)
    }
}

fn route(name: &str, models: &[&str], targets: Vec<RouteTarget>) -> RoutePolicy {
    placed(RoutePolicy::new(
        name,
        RoutePolicySpec {
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            targets,
            strategy: Default::default(),
            strategy_options: None,
            retries: Default::default(),
            timeouts: None,
            cache: None,
            rate_limit: None,
            telemetry: None,
            guardrails: Vec::new(),
            shared_with: Vec::new(),
        },
    ))
}

/// An ApiKey owned by `name`, reading the default Secret `<name>-key`.
fn api_key(name: &str) -> ApiKey {
    placed(ApiKey::new(
        name,
        ApiKeySpec {
            owner: name.to_owned(),
            team: None,
            description: None,
            allowed_models: Vec::new(),
            shared_routes_from: Vec::new(),
            limits: None,
            budget: None,
            expires_at: None,
            disabled: false,
            secret_name: None,
            rotation: None,
            guardrails: Vec::new(),
        },
    ))
}

/// The Secret an ApiKey named `api_key` reads by default.
fn key_secret(api_key: &str, value: &str) -> Secret {
    string_secret(&format!("{api_key}-key"), &[("apiKey", value)])
}

fn sha256(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Objects plus the Secrets they read.
#[derive(Clone, Default)]
struct World {
    resources: Resources,
    secrets: Vec<Secret>,
}

impl World {
    fn provider(mut self, provider: Provider) -> Self {
        self.resources.providers.push(provider);
        self
    }

    fn route(mut self, route: RoutePolicy) -> Self {
        self.resources.route_policies.push(route);
        self
    }

    fn api_key(mut self, key: ApiKey) -> Self {
        self.resources.api_keys.push(key);
        self
    }

    fn secret(mut self, secret: Secret) -> Self {
        self.secrets.push(secret);
        self
    }

    fn compile(&self) -> CompileOutput {
        let store = SecretStore::new(&self.secrets, DEFAULT_NAMESPACE);
        compile(&self.resources, &store, now())
    }
}

/// Provider `openai` (gpt-4o, gpt-4o-mini) with its credential.
fn openai_world() -> World {
    World::default()
        .provider(openai(&["gpt-4o", "gpt-4o-mini"]))
        .secret(credential_secret("openai", OPENAI_TOKEN))
}

/// [`openai_world`] plus RoutePolicy `chat` serving both models from it.
fn routed_world() -> World {
    openai_world().route(route(
        "chat",
        &["gpt-4o", "gpt-4o-mini"],
        vec![target("openai")],
    ))
}

/// [`routed_world`] plus ApiKey `alice` with her key.
fn keyed_world(key: ApiKey) -> World {
    let name = key.metadata.name.clone().unwrap();
    routed_world()
        .api_key(key)
        .secret(key_secret(&name, ALICE_KEY))
}

fn provider_ref(name: &str) -> ObjectRef {
    ObjectRef::new(Kind::Provider, NS, name)
}

fn route_ref(name: &str) -> ObjectRef {
    ObjectRef::new(Kind::RoutePolicy, NS, name)
}

fn key_ref(name: &str) -> ObjectRef {
    ObjectRef::new(Kind::ApiKey, NS, name)
}

// === Assertions ===

/// Asserts that `object` has exactly one diagnostic with `reason` on `field`, of
/// `severity`, whose message contains `message_part`.
#[track_caller]
fn assert_diagnostic(
    out: &CompileOutput,
    object: &ObjectRef,
    severity: Severity,
    reason: &str,
    field: &str,
    message_part: &str,
) {
    let found: Vec<_> = out
        .diagnostics_for(object)
        .filter(|d| d.reason == reason && d.field.as_deref() == Some(field))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {reason} diagnostic on {field} for {object}, got {:#?}",
        out.diagnostics
    );
    let d = found[0];
    assert_eq!(d.severity, severity, "{d}");
    assert!(
        d.message.contains(message_part),
        "message of {d} lacks {message_part:?}"
    );
}

/// Asserts the `Ready` and `ResolvedRefs` conditions as `(status, reason)` and returns them.
#[track_caller]
fn assert_conditions(
    out: &CompileOutput,
    object: &ObjectRef,
    ready: (&str, &str),
    resolved_refs: (&str, &str),
) -> Vec<ConditionState> {
    let conditions = out.conditions(object);
    let find = |type_: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no {type_} condition for {object}"))
    };
    let r = find(condition_types::READY);
    assert_eq!((r.status, r.reason), ready, "Ready of {object}: {r:?}");
    let rr = find(condition_types::RESOLVED_REFS);
    assert_eq!(
        (rr.status, rr.reason),
        resolved_refs,
        "ResolvedRefs of {object}: {rr:?}"
    );
    conditions
}

/// Asserts that `object` compiled without any diagnostic.
#[track_caller]
fn assert_clean(out: &CompileOutput, object: &ObjectRef) {
    let mine: Vec<_> = out.diagnostics_for(object).collect();
    assert!(mine.is_empty(), "unexpected diagnostics: {mine:#?}");
    assert_served(out, object);
    assert_conditions(
        out,
        object,
        ("True", reasons::READY),
        ("True", reasons::RESOLVED),
    );
}

fn served(out: &CompileOutput, object: &ObjectRef) -> bool {
    out.objects
        .get(object)
        .unwrap_or_else(|| panic!("{object} has no outcome"))
        .served
}

/// Whether the configuration contains anything compiled from `object`.
fn in_config(out: &CompileOutput, object: &ObjectRef) -> bool {
    let id = format!("{}/{}", object.namespace, object.name);
    match object.kind {
        Kind::Provider => {
            out.config.routing.providers.contains_key(&id)
                || out.config.credentials.providers.contains_key(&id)
        }
        Kind::RoutePolicy => out.config.routing.routes.iter().any(|r| r.id == id),
        Kind::ApiKey => out.config.keys.keys.iter().any(|k| k.api_key == id),
    }
}

/// Asserts that `object` is not served: neither marked so nor in the configuration.
#[track_caller]
fn assert_left_out(out: &CompileOutput, object: &ObjectRef) {
    assert!(!served(out, object), "{object} is marked served");
    assert!(!in_config(out, object), "{object} is in the configuration");
}

/// Asserts that `object` is served and in the configuration.
#[track_caller]
fn assert_served(out: &CompileOutput, object: &ObjectRef) {
    assert!(served(out, object), "{object} is not marked served");
    assert!(
        in_config(out, object),
        "{object} is not in the configuration"
    );
}

fn compiled_route<'a>(out: &'a CompileOutput, name: &str) -> Option<&'a CompiledRoute> {
    let id = format!("{NS}/{name}");
    out.config.routing.routes.iter().find(|r| r.id == id)
}

fn compiled_keys<'a>(out: &'a CompileOutput, name: &str) -> Vec<&'a CompiledKey> {
    let id = format!("{NS}/{name}");
    out.config
        .keys
        .keys
        .iter()
        .filter(|k| k.api_key == id)
        .collect()
}

/// Asserts that neither any diagnostic nor any condition message contains `needle`.
#[track_caller]
fn assert_never_mentioned(out: &CompileOutput, needle: &str) {
    for d in &out.diagnostics {
        assert!(!d.to_string().contains(needle), "{d} reveals {needle:?}");
    }
    for object in out.objects.keys() {
        for c in out.conditions(object) {
            assert!(!c.message.contains(needle), "{c:?} reveals {needle:?}");
        }
    }
}

mod api_key;
mod guardrails;
mod provider;
mod route;
mod tenancy;
mod whole;
