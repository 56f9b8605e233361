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
        }),
        context_window: Some(128_000),
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

// === Provider ===

#[test]
fn valid_provider_is_ready_and_compiled_with_its_credential_and_models() {
    let out = openai_world().compile();

    let object = provider_ref("openai");
    assert_clean(&out, &object);
    let conditions = out.conditions(&object);
    assert_eq!(conditions[0].message, "serving 2 model(s) via openai");
    assert_eq!(out.objects[&object].model_count, Some(2));

    let p = &out.config.routing.providers["team-a/openai"];
    assert_eq!(p.base_url, "https://api.openai.com/v1");
    assert_eq!(
        p.auth,
        Some(CompiledAuth {
            header: "authorization".to_owned(),
            prefix: "Bearer ".to_owned(),
        })
    );
    let m = &p.models["gpt-4o"];
    assert_eq!(m.upstream_name, "gpt-4o");
    assert_eq!(
        m.cached_input_per_million, 2.5,
        "defaults to the input price"
    );
    assert_eq!(p.connect_timeout_ms, 5_000);
    assert_eq!(p.request_timeout_ms, 600_000);
    assert_eq!(
        out.config.credentials.providers["team-a/openai"],
        OPENAI_TOKEN
    );
}

#[test]
fn provider_without_its_credential_secret_reports_secret_not_found() {
    let out = World::default().provider(openai(&["gpt-4o"])).compile();

    let object = provider_ref("openai");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::SECRET_NOT_FOUND,
        "spec.credentials.secretRef",
        "Secret team-a/openai-credentials not found",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::SECRET_NOT_FOUND),
        ("False", reasons::SECRET_NOT_FOUND),
    );
    assert_left_out(&out, &object);
    assert!(out.config.routing.providers.is_empty());
    assert!(out.config.credentials.providers.is_empty());
}

#[test]
fn provider_whose_secret_lacks_the_key_reports_secret_key_not_found() {
    let out = World::default()
        .provider(openai(&["gpt-4o"]))
        .secret(labelled(string_secret(
            "openai-credentials",
            &[("apiKey", "sk-x")],
        )))
        .compile();

    let object = provider_ref("openai");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::SECRET_KEY_NOT_FOUND,
        "spec.credentials.secretRef",
        "Secret team-a/openai-credentials has no key \"token\"",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::SECRET_KEY_NOT_FOUND),
        ("False", reasons::SECRET_KEY_NOT_FOUND),
    );
    assert_left_out(&out, &object);
}

#[test]
fn empty_or_malformed_credential_reports_invalid_secret_without_revealing_it() {
    let cases = [
        ("", "the value is empty"),
        (" \t\n", "the value is empty"),
        (
            "sk-live-4411 hunter2",
            "the value contains whitespace or non-printable characters",
        ),
        (
            "sk-live-\u{7}-hunter2",
            "the value contains whitespace or non-printable characters",
        ),
    ];
    for (value, why) in cases {
        let out = World::default()
            .provider(openai(&["gpt-4o"]))
            .secret(credential_secret("openai", value))
            .compile();

        let object = provider_ref("openai");
        assert_diagnostic(
            &out,
            &object,
            Severity::Error,
            reasons::INVALID_SECRET,
            "spec.credentials.secretRef",
            why,
        );
        assert_conditions(
            &out,
            &object,
            ("False", reasons::INVALID_SECRET),
            ("False", reasons::INVALID_SECRET),
        );
        assert_left_out(&out, &object);
        assert!(out.config.credentials.providers.is_empty());
        assert_never_mentioned(&out, "hunter2");
        assert_never_mentioned(&out, "sk-live");
    }
}

#[test]
fn credential_from_data_has_its_trailing_newline_trimmed() {
    let out = World::default()
        .provider(openai(&["gpt-4o"]))
        .secret(labelled(data_secret(
            "openai-credentials",
            &[("token", b"sk-from-data-123\n")],
        )))
        .compile();

    assert_clean(&out, &provider_ref("openai"));
    assert_eq!(
        out.config.credentials.providers["team-a/openai"],
        "sk-from-data-123"
    );
}

#[test]
fn string_data_overrides_data_for_the_same_key() {
    let mut secret = labelled(data_secret(
        "openai-credentials",
        &[("token", b"sk-old-data")],
    ));
    secret.string_data = Some(BTreeMap::from([(
        "token".to_owned(),
        "sk-new-string-data".to_owned(),
    )]));
    let out = World::default()
        .provider(openai(&["gpt-4o"]))
        .secret(secret)
        .compile();

    assert_eq!(
        out.config.credentials.providers["team-a/openai"],
        "sk-new-string-data"
    );
}

#[test]
fn credential_never_appears_in_diagnostics_of_a_provider_broken_elsewhere() {
    let mut p = openai(&["gpt-4o"]);
    p.spec.max_concurrency = Some(0);
    let out = World::default()
        .provider(p)
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .compile();

    assert_left_out(&out, &provider_ref("openai"));
    assert!(out.config.credentials.providers.is_empty());
    assert_never_mentioned(&out, OPENAI_TOKEN);
}

#[test]
fn azure_and_openai_compatible_providers_without_base_url_report_invalid_spec() {
    for (kind, name) in [
        (ProviderType::AzureOpenAi, "azureOpenAI"),
        (ProviderType::OpenaiCompatible, "openaiCompatible"),
    ] {
        let mut p = provider("upstream", kind, &["llama-3"]);
        p.spec.base_url = None;
        let out = World::default()
            .provider(p)
            .secret(credential_secret("upstream", "sk-upstream"))
            .compile();

        let object = provider_ref("upstream");
        assert_diagnostic(
            &out,
            &object,
            Severity::Error,
            reasons::INVALID_SPEC,
            "spec.baseUrl",
            &format!("baseUrl is required for type {name}"),
        );
        assert_conditions(
            &out,
            &object,
            ("False", reasons::INVALID_SPEC),
            ("True", reasons::RESOLVED),
        );
        assert!(out.config.routing.providers.is_empty(), "{name}");
    }
}

#[test]
fn openai_and_anthropic_default_to_their_public_endpoints_and_auth_headers() {
    let out = World::default()
        .provider(openai(&["gpt-4o"]))
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .provider(provider(
            "anthropic",
            ProviderType::Anthropic,
            &["claude-3-5-sonnet"],
        ))
        .secret(credential_secret("anthropic", "sk-ant-123"))
        .compile();

    assert_clean(&out, &provider_ref("openai"));
    assert_clean(&out, &provider_ref("anthropic"));
    let providers = &out.config.routing.providers;
    assert_eq!(
        providers["team-a/openai"].base_url,
        "https://api.openai.com/v1"
    );
    let anthropic = &providers["team-a/anthropic"];
    assert_eq!(anthropic.base_url, "https://api.anthropic.com/v1");
    assert_eq!(anthropic.anthropic_version.as_deref(), Some("2023-06-01"));
    assert_eq!(
        anthropic.auth,
        Some(CompiledAuth {
            header: "x-api-key".to_owned(),
            prefix: String::new(),
        })
    );
}

#[test]
fn given_base_url_is_kept_without_its_trailing_slash() {
    let mut p = provider("vllm", ProviderType::OpenaiCompatible, &["llama-3"]);
    p.spec.base_url = Some("http://vllm.ml:8000/v1/".to_owned());
    let out = World::default()
        .provider(p)
        .secret(credential_secret("vllm", "token-vllm"))
        .compile();

    assert_clean(&out, &provider_ref("vllm"));
    assert_eq!(
        out.config.routing.providers["team-a/vllm"].base_url,
        "http://vllm.ml:8000/v1"
    );
}

#[test]
fn base_url_with_userinfo_is_rejected_without_echoing_the_password() {
    let mut p = openai(&["gpt-4o"]);
    p.spec.base_url = Some("https://svc:hunter2@llm.example.com/v1".to_owned());
    let out = World::default()
        .provider(p)
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .compile();

    let object = provider_ref("openai");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.baseUrl",
        "the URL must not contain credentials",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::INVALID_SPEC),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
    assert_never_mentioned(&out, "hunter2");
}

#[test]
fn base_urls_on_cloud_metadata_or_link_local_addresses_are_refused_unless_allowed() {
    for url in [
        "http://169.254.169.254/latest/meta-data",
        "http://[fd00:ec2::254]/v1",
        "http://metadata.google.internal/computeMetadata/v1",
    ] {
        let mut p = provider("vllm", ProviderType::OpenaiCompatible, &["gpt-4o"]);
        p.spec.base_url = Some(url.to_owned());
        let world = World::default()
            .provider(p)
            .secret(credential_secret("vllm", "token-vllm"));
        let out = world.compile();
        let object = provider_ref("vllm");
        assert_diagnostic(
            &out,
            &object,
            Severity::Error,
            reasons::INVALID_SPEC,
            "spec.baseUrl",
            "--allow-link-local-upstreams",
        );
        assert_left_out(&out, &object);
        let store = SecretStore::new(&world.secrets, DEFAULT_NAMESPACE);
        let allowed = super::compile_with(
            &world.resources,
            &store,
            now(),
            super::CompileOptions {
                allow_link_local_upstreams: true,
            },
        );
        assert_clean(&allowed, &object);
    }
}

#[test]
fn azure_section_is_required_exactly_for_azure_providers() {
    let mut azure_without = provider("azure", ProviderType::AzureOpenAi, &["gpt-4o"]);
    azure_without.spec.azure = None;
    let mut openai_with = openai(&["gpt-4o"]);
    openai_with.spec.azure = Some(AzureSettings {
        api_version: "2024-10-21".to_owned(),
    });
    let out = World::default()
        .provider(azure_without)
        .secret(credential_secret("azure", "azure-key"))
        .provider(openai_with)
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .compile();

    for name in ["azure", "openai"] {
        let object = provider_ref(name);
        assert_diagnostic(
            &out,
            &object,
            Severity::Error,
            reasons::INVALID_SPEC,
            "spec.azure",
            "azure must be set exactly when type is azureOpenAI",
        );
        assert_conditions(
            &out,
            &object,
            ("False", reasons::INVALID_SPEC),
            ("True", reasons::RESOLVED),
        );
        assert_left_out(&out, &object);
    }
}

#[test]
fn complete_azure_provider_sends_the_api_key_header_and_its_api_version() {
    let out = World::default()
        .provider(provider("azure", ProviderType::AzureOpenAi, &["gpt-4o"]))
        .secret(credential_secret("azure", "azure-key"))
        .compile();

    assert_clean(&out, &provider_ref("azure"));
    let p = &out.config.routing.providers["team-a/azure"];
    assert_eq!(p.azure_api_version.as_deref(), Some("2024-10-21"));
    assert_eq!(p.auth.as_ref().map(|a| a.header.as_str()), Some("api-key"));
}

#[test]
fn anthropic_and_mock_sections_on_an_openai_provider_are_rejected() {
    let mut p = openai(&["gpt-4o"]);
    p.spec.anthropic = Some(AnthropicSettings {
        version: "2023-06-01".to_owned(),
    });
    p.spec.mock = Some(MockSettings::default());
    let out = World::default()
        .provider(p)
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .compile();

    let object = provider_ref("openai");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.anthropic",
        "anthropic settings are only allowed when type is anthropic",
    );
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.mock",
        "mock settings are only allowed when type is mock",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::INVALID_SPEC),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
}

#[test]
fn mock_provider_needs_no_credential_and_only_warns_about_an_ignored_base_url() {
    let mut p = provider("mock", ProviderType::Mock, &["echo"]);
    p.spec.base_url = Some("https://unused.example.com".to_owned());
    let out = World::default().provider(p).compile();

    let object = provider_ref("mock");
    assert_diagnostic(
        &out,
        &object,
        Severity::Warning,
        reasons::INVALID_SPEC,
        "spec.baseUrl",
        "ignored: the mock Provider makes no network calls",
    );
    let conditions = assert_conditions(
        &out,
        &object,
        ("True", reasons::READY),
        ("True", reasons::RESOLVED),
    );
    assert_served(&out, &object);
    assert!(conditions[0].message.contains("ignored"));
    let compiled = &out.config.routing.providers["team-a/mock"];
    assert_eq!(compiled.base_url, "");
    assert_eq!(compiled.auth, None);
    assert_eq!(
        compiled.mock.as_ref().map(|m| m.completion_tokens),
        Some(16)
    );
    assert!(out.config.credentials.providers.is_empty());
}

#[test]
fn openai_provider_without_credentials_reports_invalid_spec() {
    let mut p = openai(&["gpt-4o"]);
    p.spec.credentials = None;
    let out = World::default().provider(p).compile();

    let object = provider_ref("openai");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.credentials",
        "credentials are required for type openai",
    );
    assert_left_out(&out, &object);
}

#[test]
fn duplicate_model_names_in_a_provider_are_rejected() {
    let out = World::default()
        .provider(openai(&["gpt-4o", "gpt-4o"]))
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .compile();

    let object = provider_ref("openai");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.models[1]",
        "model \"gpt-4o\" is listed twice",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::INVALID_SPEC),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
}

#[test]
fn negative_or_non_finite_prices_are_rejected() {
    let bad = [
        (-1.0, 10.0, None),
        (f64::NAN, 10.0, None),
        (2.5, f64::INFINITY, None),
        (2.5, 10.0, Some(-0.5)),
    ];
    for (input, output, cached) in bad {
        let mut p = openai(&["gpt-4o", "gpt-4o-mini"]);
        p.spec.models[1].pricing = Some(Pricing {
            input_per_million: input,
            output_per_million: output,
            cached_input_per_million: cached,
        });
        let out = World::default()
            .provider(p)
            .secret(credential_secret("openai", OPENAI_TOKEN))
            .compile();

        let object = provider_ref("openai");
        assert_diagnostic(
            &out,
            &object,
            Severity::Error,
            reasons::INVALID_SPEC,
            "spec.models[1].pricing",
            "prices must be finite and not negative",
        );
        assert_left_out(&out, &object);
    }
}

#[test]
fn malformed_or_zero_durations_are_rejected() {
    let mut p = openai(&["gpt-4o"]);
    p.spec.timeouts.connect = "10d".to_owned();
    p.spec.timeouts.request = "0s".to_owned();
    p.spec.circuit_breaker.open_duration = "soon".to_owned();
    let out = World::default()
        .provider(p)
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .compile();

    let object = provider_ref("openai");
    let error = Severity::Error;
    assert_diagnostic(
        &out,
        &object,
        error,
        reasons::INVALID_SPEC,
        "spec.timeouts.connect",
        "\"10d\": unknown unit",
    );
    assert_diagnostic(
        &out,
        &object,
        error,
        reasons::INVALID_SPEC,
        "spec.timeouts.request",
        "must be longer than 0",
    );
    assert_diagnostic(
        &out,
        &object,
        error,
        reasons::INVALID_SPEC,
        "spec.circuitBreaker.openDuration",
        "\"soon\"",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::INVALID_SPEC),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
}

#[test]
fn headers_the_gateway_sets_itself_cannot_be_overridden() {
    let mut p = openai(&["gpt-4o"]);
    p.spec.headers = BTreeMap::from([
        ("Authorization".to_owned(), "Bearer other".to_owned()),
        ("Host".to_owned(), "evil.example.com".to_owned()),
        ("OpenAI-Organization".to_owned(), "org-1".to_owned()),
    ]);
    let out = World::default()
        .provider(p)
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .compile();

    let object = provider_ref("openai");
    for name in ["Authorization", "Host"] {
        assert_diagnostic(
            &out,
            &object,
            Severity::Error,
            reasons::INVALID_SPEC,
            &format!("spec.headers.{name}"),
            &format!("{name} is set by the gateway"),
        );
    }
    assert_conditions(
        &out,
        &object,
        ("False", reasons::INVALID_SPEC),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
}

#[test]
fn extra_headers_are_compiled_with_lowercase_names() {
    let mut p = openai(&["gpt-4o"]);
    p.spec.headers = BTreeMap::from([("OpenAI-Organization".to_owned(), "org-1".to_owned())]);
    let out = World::default()
        .provider(p)
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .compile();

    assert_clean(&out, &provider_ref("openai"));
    assert_eq!(
        out.config.routing.providers["team-a/openai"].headers,
        BTreeMap::from([("openai-organization".to_owned(), "org-1".to_owned())])
    );
}

#[test]
fn header_auth_style_without_header_name_is_rejected() {
    let mut p = provider("vllm", ProviderType::OpenaiCompatible, &["llama-3"]);
    p.spec.credentials.as_mut().unwrap().auth_style = Some(AuthStyle::Header);
    let out = World::default()
        .provider(p)
        .secret(credential_secret("vllm", "token-vllm"))
        .compile();

    let object = provider_ref("vllm");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.credentials.headerName",
        "headerName is required when authStyle is header",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::INVALID_SPEC),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
}

#[test]
fn header_auth_style_sends_the_credential_in_the_named_header() {
    let mut p = provider("vllm", ProviderType::OpenaiCompatible, &["llama-3"]);
    let creds = p.spec.credentials.as_mut().unwrap();
    creds.auth_style = Some(AuthStyle::Header);
    creds.header_name = Some("X-Upstream-Token".to_owned());
    let out = World::default()
        .provider(p)
        .secret(credential_secret("vllm", "token-vllm"))
        .compile();

    assert_clean(&out, &provider_ref("vllm"));
    assert_eq!(
        out.config.routing.providers["team-a/vllm"].auth,
        Some(CompiledAuth {
            header: "x-upstream-token".to_owned(),
            prefix: String::new(),
        })
    );
}

#[test]
fn zero_max_concurrency_is_rejected() {
    let mut p = openai(&["gpt-4o"]);
    p.spec.max_concurrency = Some(0);
    let out = World::default()
        .provider(p)
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .compile();

    let object = provider_ref("openai");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.maxConcurrency",
        "must be at least 1",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::INVALID_SPEC),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
    assert!(out.config.routing.providers.is_empty());
}

// === RoutePolicy ===

#[test]
fn valid_route_compiles_its_targets_into_tiers_by_priority() {
    let backup = RouteTarget {
        priority: 1,
        ..target_model("openai", "gpt-4o-mini")
    };
    let out = openai_world()
        .route(route(
            "chat",
            &["gpt-4o", "gpt-*"],
            vec![backup, target("openai")],
        ))
        .compile();

    let object = route_ref("chat");
    assert_clean(&out, &object);
    assert_eq!(
        out.conditions(&object)[0].message,
        "routing 2 model name(s) to 2 target(s) in 2 tier(s)"
    );
    assert_eq!(out.objects[&object].ready_targets, Some(2));
    let r = compiled_route(&out, "chat").expect("route is served");
    assert_eq!(r.exact, ["gpt-4o"]);
    assert_eq!(r.globs, ["gpt-*"]);
    assert_eq!(
        r.tiers,
        vec![
            vec![CompiledTarget {
                provider: "team-a/openai".to_owned(),
                model: None,
                weight: 1,
            }],
            vec![CompiledTarget {
                provider: "team-a/openai".to_owned(),
                model: Some("gpt-4o-mini".to_owned()),
                weight: 1,
            }],
        ]
    );
    assert_eq!(r.retry_attempts, 2);
    assert_eq!(r.retry_initial_backoff_ms, 100);
    assert_eq!(r.retry_max_backoff_ms, 2_000);
}

#[test]
fn route_naming_a_missing_provider_reports_provider_not_found() {
    let out = openai_world()
        .route(route(
            "chat",
            &["gpt-4o"],
            vec![target("gone"), target("openai")],
        ))
        .compile();

    let object = route_ref("chat");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::PROVIDER_NOT_FOUND,
        "spec.targets[0].provider",
        "Provider team-a/gone not found",
    );
    assert_conditions(
        &out,
        &object,
        ("True", reasons::DEGRADED),
        ("False", reasons::PROVIDER_NOT_FOUND),
    );
    assert_served(&out, &object);
    let r = compiled_route(&out, "chat").expect("the other target keeps it serving");
    assert_eq!(r.tiers.len(), 1);
    assert_eq!(r.tiers[0].len(), 1);
    assert_eq!(r.tiers[0][0].provider, "team-a/openai");
    assert_eq!(out.objects[&object].ready_targets, Some(1));
}

#[test]
fn route_naming_a_provider_that_is_not_ready_reports_provider_not_ready() {
    let out = World::default()
        .provider(openai(&["gpt-4o"]))
        .route(route("chat", &["gpt-4o"], vec![target("openai")]))
        .compile();

    let object = route_ref("chat");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::PROVIDER_NOT_READY,
        "spec.targets[0].provider",
        "Provider team-a/openai is not Ready",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::PROVIDER_NOT_READY),
        ("False", reasons::PROVIDER_NOT_READY),
    );
    assert_left_out(&out, &object);
    assert!(out.config.routing.routes.is_empty());
}

#[test]
fn route_target_naming_a_model_its_provider_does_not_serve_reports_model_not_found() {
    let out = openai_world()
        .route(route(
            "smart",
            &["smart"],
            vec![
                target_model("openai", "gpt-5"),
                target_model("openai", "gpt-4o"),
            ],
        ))
        .compile();

    let object = route_ref("smart");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::MODEL_NOT_FOUND,
        "spec.targets[0].model",
        "Provider team-a/openai does not serve gpt-5",
    );
    assert_conditions(
        &out,
        &object,
        ("True", reasons::DEGRADED),
        ("False", reasons::MODEL_NOT_FOUND),
    );
    assert_served(&out, &object);
    let r = compiled_route(&out, "smart").expect("served by the valid target");
    assert_eq!(r.tiers[0][0].model.as_deref(), Some("gpt-4o"));
    assert_eq!(r.tiers[0].len(), 1);
}

#[test]
fn route_target_without_a_model_needs_every_exact_name_on_its_provider() {
    let fallback = RouteTarget {
        priority: 1,
        ..target_model("openai", "gpt-4o")
    };
    let out = openai_world()
        .route(route(
            "chat",
            &["gpt-4o", "claude-3-5-sonnet", "gpt-4o-*"],
            vec![target("openai"), fallback],
        ))
        .compile();

    let object = route_ref("chat");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::MODEL_NOT_FOUND,
        "spec.targets[0].model",
        "Provider team-a/openai does not serve claude-3-5-sonnet",
    );
    let d = out.diagnostics_for(&object).next().unwrap();
    assert!(
        !d.message.contains("gpt-4o"),
        "globs and served names are not missing: {d}"
    );
    assert_conditions(
        &out,
        &object,
        ("True", reasons::DEGRADED),
        ("False", reasons::MODEL_NOT_FOUND),
    );
    assert_served(&out, &object);
    let r = compiled_route(&out, "chat").expect("served by the fallback target");
    assert_eq!(r.exact, ["gpt-4o", "claude-3-5-sonnet"]);
    assert_eq!(r.globs, ["gpt-4o-*"]);
    assert_eq!(r.tiers.len(), 1);
    assert_eq!(r.tiers[0][0].model.as_deref(), Some("gpt-4o"));
}

#[test]
fn invalid_globs_are_dropped_while_the_valid_patterns_keep_serving() {
    let out = openai_world()
        .route(route(
            "chat",
            &["gpt-4o", "gpt-[4", "{a,b", "gpt-4o-*"],
            vec![target("openai")],
        ))
        .compile();

    let object = route_ref("chat");
    for (i, pattern) in [(1, "gpt-[4"), (2, "{a,b")] {
        assert_diagnostic(
            &out,
            &object,
            Severity::Error,
            reasons::INVALID_MODEL_PATTERN,
            &format!("spec.models[{i}]"),
            &format!("{pattern:?} is not a valid glob"),
        );
    }
    let conditions = assert_conditions(
        &out,
        &object,
        ("True", reasons::DEGRADED),
        ("True", reasons::RESOLVED),
    );
    assert_served(&out, &object);
    assert!(conditions[0].message.contains("gpt-[4"));
    let r = compiled_route(&out, "chat").expect("valid patterns keep serving");
    assert_eq!(r.exact, ["gpt-4o"]);
    assert_eq!(r.globs, ["gpt-4o-*"]);
}

#[test]
fn route_whose_targets_all_have_weight_zero_reports_no_usable_targets() {
    let drained = |t: RouteTarget| RouteTarget { weight: 0, ..t };
    let out = openai_world()
        .route(route(
            "chat",
            &["gpt-4o"],
            vec![
                drained(target("openai")),
                drained(target_model("openai", "gpt-4o-mini")),
            ],
        ))
        .compile();

    let object = route_ref("chat");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::NO_USABLE_TARGETS,
        "spec.targets",
        "every target has weight 0",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::NO_USABLE_TARGETS),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
    assert!(out.config.routing.routes.is_empty());
}

#[test]
fn route_whose_targets_are_all_unusable_reports_no_usable_targets_and_is_not_served() {
    let out = openai_world()
        .route(route(
            "chat",
            &["gpt-4o"],
            vec![target("gone"), target_model("openai", "gpt-5")],
        ))
        .compile();

    let object = route_ref("chat");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::NO_USABLE_TARGETS,
        "spec.targets",
        "no usable target is left",
    );
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::PROVIDER_NOT_FOUND,
        "spec.targets[0].provider",
        "Provider team-a/gone not found",
    );
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::MODEL_NOT_FOUND,
        "spec.targets[1].model",
        "does not serve gpt-5",
    );
    // Ready names the first problem found: the root cause, not its consequence.
    let conditions = assert_conditions(
        &out,
        &object,
        ("False", reasons::PROVIDER_NOT_FOUND),
        ("False", reasons::PROVIDER_NOT_FOUND),
    );
    assert!(conditions[0].message.contains("no usable target is left"));
    assert_left_out(&out, &object);
    assert!(compiled_route(&out, "chat").is_none());
}

#[test]
fn older_route_policy_keeps_a_contested_model_and_the_newer_reports_model_conflict() {
    // Names sort the other way round, so only the creation time can decide.
    let newer = created(
        route(
            "aa-newer",
            &["gpt-4o", "gpt-4o-mini"],
            vec![target("openai")],
        ),
        3_600,
    );
    let older = created(
        route("zz-older", &["gpt-4o"], vec![target("openai")]),
        7_200,
    );
    let out = openai_world().route(newer).route(older).compile();

    let newer = route_ref("aa-newer");
    assert_diagnostic(
        &out,
        &newer,
        Severity::Error,
        reasons::MODEL_CONFLICT,
        "spec.models[0]",
        "\"gpt-4o\" is already served by RoutePolicy team-a/zz-older",
    );
    assert_conditions(
        &out,
        &newer,
        ("True", reasons::DEGRADED),
        ("True", reasons::RESOLVED),
    );
    assert_served(&out, &newer);
    assert_eq!(
        compiled_route(&out, "aa-newer").map(|r| r.exact.clone()),
        Some(vec!["gpt-4o-mini".to_owned()])
    );

    assert_clean(&out, &route_ref("zz-older"));
    assert_eq!(
        compiled_route(&out, "zz-older").map(|r| r.exact.clone()),
        Some(vec!["gpt-4o".to_owned()])
    );
}

#[test]
fn route_policy_whose_every_model_is_taken_is_not_served() {
    let older = created(route("older", &["gpt-4o"], vec![target("openai")]), 7_200);
    let newer = created(route("newer", &["gpt-4o"], vec![target("openai")]), 60);
    let out = openai_world().route(newer).route(older).compile();

    let object = route_ref("newer");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::MODEL_CONFLICT,
        "spec.models[0]",
        "already served by RoutePolicy team-a/older",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::MODEL_CONFLICT),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
    assert!(compiled_route(&out, "newer").is_none());
}

#[test]
fn route_policy_without_creation_time_loses_conflicts_to_one_that_has_it() {
    let standalone = route("aa-standalone", &["gpt-4o"], vec![target("openai")]);
    let applied = created(route("zz-applied", &["gpt-4o"], vec![target("openai")]), 1);
    let out = openai_world().route(standalone).route(applied).compile();

    assert_clean(&out, &route_ref("zz-applied"));
    assert_diagnostic(
        &out,
        &route_ref("aa-standalone"),
        Severity::Error,
        reasons::MODEL_CONFLICT,
        "spec.models[0]",
        "already served by RoutePolicy team-a/zz-applied",
    );
}

#[test]
fn invalid_older_route_policy_does_not_keep_a_model_from_a_valid_newer_one() {
    let mut older = created(route("older", &["gpt-4o"], vec![target("openai")]), 7_200);
    older.spec.retries = Retries {
        initial_backoff: "5s".to_owned(),
        max_backoff: "1s".to_owned(),
        ..Retries::default()
    };
    let newer = created(route("newer", &["gpt-4o"], vec![target("openai")]), 60);
    let out = openai_world().route(older).route(newer).compile();

    assert_clean(&out, &route_ref("newer"));
    assert_eq!(
        compiled_route(&out, "newer").map(|r| r.exact.clone()),
        Some(vec!["gpt-4o".to_owned()])
    );
    assert_left_out(&out, &route_ref("older"));
    assert_conditions(
        &out,
        &route_ref("older"),
        ("False", reasons::INVALID_SPEC),
        ("True", reasons::RESOLVED),
    );
}

#[test]
fn max_backoff_shorter_than_initial_backoff_is_rejected() {
    let mut r = route("chat", &["gpt-4o"], vec![target("openai")]);
    r.spec.retries.initial_backoff = "2s".to_owned();
    r.spec.retries.max_backoff = "500ms".to_owned();
    let out = openai_world().route(r).compile();

    let object = route_ref("chat");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.retries.maxBackoff",
        "maxBackoff must not be shorter than initialBackoff",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::INVALID_SPEC),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
}

#[test]
fn zero_route_rate_limits_are_rejected() {
    let zeros = [
        Limits {
            requests_per_minute: Some(0),
            ..Limits::default()
        },
        Limits {
            tokens_per_minute: Some(0),
            ..Limits::default()
        },
        Limits {
            max_concurrent: Some(0),
            ..Limits::default()
        },
    ];
    for limits in zeros {
        let mut r = route("chat", &["gpt-4o"], vec![target("openai")]);
        r.spec.rate_limit = Some(limits.clone());
        let out = openai_world().route(r).compile();

        let object = route_ref("chat");
        assert_diagnostic(
            &out,
            &object,
            Severity::Error,
            reasons::INVALID_SPEC,
            "spec.rateLimit",
            "limits must be at least 1",
        );
        assert_left_out(&out, &object);
        assert!(out.config.routing.routes.is_empty());
    }
}

// === ApiKey ===

#[test]
fn valid_api_key_is_served_with_an_id_from_its_name_and_a_short_prefix() {
    let out = keyed_world(api_key("alice")).compile();

    let object = key_ref("alice");
    assert_clean(&out, &object);
    let hash = sha256(ALICE_KEY);
    let outcome = &out.objects[&object];
    let id = &sha256(&format!("apikey:{NS}/alice"))[..24];
    assert_eq!(outcome.key_id.as_deref(), Some(id));
    assert_eq!(super::key_id(&object.namespace, &object.name), id);
    assert_eq!(outcome.key_prefix.as_deref(), Some("tg_live"));
    assert_eq!(outcome.secret_name.as_deref(), Some("alice-key"));
    let entries = compiled_keys(&out, "alice");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].sha256, hash);
    assert_eq!(entries[0].id, id);
    assert_eq!(entries[0].owner, "alice");
    assert_eq!(entries[0].expires_at, None);
}

#[test]
fn key_prefix_never_shows_more_than_a_quarter_of_a_short_key() {
    let key = "abcdefghij0123456789";
    let out = routed_world()
        .api_key(api_key("alice"))
        .secret(key_secret("alice", key))
        .compile();

    assert_eq!(
        out.objects[&key_ref("alice")].key_prefix.as_deref(),
        Some("abcde")
    );
}

#[test]
fn api_key_without_its_secret_reports_secret_not_found() {
    let out = routed_world().api_key(api_key("alice")).compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::SECRET_NOT_FOUND,
        "spec.secretName",
        "Secret team-a/alice-key not found",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::SECRET_NOT_FOUND),
        ("False", reasons::SECRET_NOT_FOUND),
    );
    assert_left_out(&out, &object);
    assert_eq!(
        out.objects[&object].secret_name.as_deref(),
        Some("alice-key")
    );
    assert!(out.config.keys.keys.is_empty());
}

#[test]
fn api_key_secret_without_an_api_key_entry_reports_secret_key_not_found() {
    let mut key = api_key("alice");
    key.spec.secret_name = Some("alice-credentials".to_owned());
    let out = routed_world()
        .api_key(key)
        .secret(string_secret("alice-credentials", &[("token", ALICE_KEY)]))
        .compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::SECRET_KEY_NOT_FOUND,
        "spec.secretName",
        "Secret team-a/alice-credentials has no key \"apiKey\"",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::SECRET_KEY_NOT_FOUND),
        ("False", reasons::SECRET_KEY_NOT_FOUND),
    );
    assert_left_out(&out, &object);
}

#[test]
fn api_key_shorter_than_twenty_characters_reports_invalid_key() {
    let out = routed_world()
        .api_key(api_key("alice"))
        .secret(key_secret("alice", "changeme-0123"))
        .compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_KEY,
        "spec.secretName",
        "shorter than 20 characters",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::INVALID_KEY),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
    assert!(out.config.keys.keys.is_empty());
    assert_never_mentioned(&out, "changeme");
}

#[test]
fn a_generated_key_with_a_broken_checksum_reports_invalid_key() {
    let good = crate::key_format::from_random(&[42u8; 64]).unwrap();
    let out = routed_world()
        .api_key(api_key("alice"))
        .secret(key_secret("alice", &good))
        .compile();
    assert!(out.objects[&key_ref("alice")].served);

    let broken = format!("{}x", &good[..good.len() - 1]);
    let out = routed_world()
        .api_key(api_key("alice"))
        .secret(key_secret("alice", &broken))
        .compile();
    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_KEY,
        "spec.secretName",
        "checksum does not match",
    );
    assert_left_out(&out, &object);
    assert_never_mentioned(&out, &broken);
}

#[test]
fn blank_api_key_reports_invalid_key() {
    let out = routed_world()
        .api_key(api_key("alice"))
        .secret(data_secret("alice-key", &[("apiKey", b"  \n")]))
        .compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_KEY,
        "spec.secretName",
        "the value is empty",
    );
    assert_left_out(&out, &object);
}

#[test]
fn disabled_api_key_is_not_served() {
    let mut key = api_key("alice");
    key.spec.disabled = true;
    let out = keyed_world(key).compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::DISABLED,
        "spec.disabled",
        "the key is disabled",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::DISABLED),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
    assert!(out.config.keys.keys.is_empty());
}

#[test]
fn api_key_at_or_past_its_expiry_reports_expired() {
    for seconds in [-3_600, 0] {
        let mut key = api_key("alice");
        key.spec.expires_at = Some(at(seconds));
        let out = keyed_world(key).compile();

        let object = key_ref("alice");
        assert_diagnostic(
            &out,
            &object,
            Severity::Error,
            reasons::EXPIRED,
            "spec.expiresAt",
            "the key expired at",
        );
        assert_conditions(
            &out,
            &object,
            ("False", reasons::EXPIRED),
            ("True", reasons::RESOLVED),
        );
        assert_left_out(&out, &object);
        assert!(out.config.keys.keys.is_empty());
    }
}

#[test]
fn api_key_expiring_later_is_served_with_its_expiry_in_unix_seconds() {
    let mut key = api_key("alice");
    key.spec.expires_at = Some(at(86_400));
    let out = keyed_world(key).compile();

    assert_clean(&out, &key_ref("alice"));
    let entries = compiled_keys(&out, "alice");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].expires_at, Some(1_750_086_400));
}

#[test]
fn same_key_value_in_two_api_keys_rejects_the_newer_with_key_conflict() {
    let newer = created(api_key("aa-newer"), 60);
    let older = created(api_key("zz-older"), 7_200);
    let out = routed_world()
        .api_key(newer)
        .secret(key_secret("aa-newer", ALICE_KEY))
        .api_key(older)
        .secret(key_secret("zz-older", ALICE_KEY))
        .compile();

    let object = key_ref("aa-newer");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::KEY_CONFLICT,
        "spec.secretName",
        "the key in Secret aa-newer-key is also used by ApiKey team-a/zz-older",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::KEY_CONFLICT),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
    assert_eq!(out.objects[&object].key_id, None);

    assert_clean(&out, &key_ref("zz-older"));
    assert_eq!(out.config.keys.keys.len(), 1);
    assert_eq!(out.config.keys.keys[0].api_key, "team-a/zz-older");
    assert_never_mentioned(&out, ALICE_KEY);
}

#[test]
fn invalid_allowed_models_glob_keeps_the_key_out_of_service() {
    // Dropping the bad entry would leave an empty allow-list, which allows everything.
    for allowed in [vec!["gpt-[4"], vec!["gpt-4o", "gpt-[4"]] {
        let mut key = api_key("alice");
        key.spec.allowed_models = allowed.iter().map(|m| (*m).to_owned()).collect();
        let out = keyed_world(key).compile();

        let object = key_ref("alice");
        let index = allowed.len() - 1;
        assert_diagnostic(
            &out,
            &object,
            Severity::Error,
            reasons::INVALID_MODEL_PATTERN,
            &format!("spec.allowedModels[{index}]"),
            "\"gpt-[4\" is not a valid glob",
        );
        assert_conditions(
            &out,
            &object,
            ("False", reasons::INVALID_MODEL_PATTERN),
            ("True", reasons::RESOLVED),
        );
        assert_left_out(&out, &object);
        assert!(out.config.keys.keys.is_empty(), "{allowed:?}");
    }
}

#[test]
fn allowed_model_that_no_route_serves_warns_unknown_model() {
    let mut key = api_key("alice");
    key.spec.allowed_models = ["gpt-4o", "gpt-5", "claude-*", "o1-preview"]
        .map(str::to_owned)
        .to_vec();
    let out = keyed_world(key)
        .route(route("reasoning", &["o1-*"], vec![target("openai")]))
        .compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Warning,
        reasons::UNKNOWN_MODEL,
        "spec.allowedModels[1]",
        "no RoutePolicy this key can use serves \"gpt-5\"",
    );
    assert_eq!(
        out.diagnostics_for(&object).count(),
        1,
        "globs and models served by a route or a route's glob are not reported: {:#?}",
        out.diagnostics
    );
    let conditions = assert_conditions(
        &out,
        &object,
        ("True", reasons::READY),
        ("True", reasons::RESOLVED),
    );
    assert_served(&out, &object);
    assert!(conditions[0].message.contains("gpt-5"));
    let entries = compiled_keys(&out, "alice");
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].allowed_models,
        ["gpt-4o", "gpt-5", "claude-*", "o1-preview"]
    );
}

#[test]
fn budget_in_a_currency_no_provider_uses_warns_currency_mismatch() {
    let mut key = api_key("alice");
    key.spec.budget = Some(Budget {
        amount: 100.0,
        period: BudgetPeriod::Daily,
        currency: "EUR".to_owned(),
    });
    let out = keyed_world(key).compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Warning,
        reasons::CURRENCY_MISMATCH,
        "spec.budget.currency",
        "no Provider prices in EUR",
    );
    assert_conditions(
        &out,
        &object,
        ("True", reasons::READY),
        ("True", reasons::RESOLVED),
    );
    assert_served(&out, &object);
    assert_eq!(
        compiled_keys(&out, "alice")[0].budget,
        Some(CompiledBudget {
            amount: 100.0,
            period: BudgetPeriod::Daily,
            currency: "EUR".to_owned(),
        })
    );
}

#[test]
fn budget_in_the_providers_currency_compiles_without_warning() {
    let mut key = api_key("alice");
    key.spec.budget = Some(Budget {
        amount: 100.0,
        period: BudgetPeriod::Monthly,
        currency: "USD".to_owned(),
    });
    let out = keyed_world(key).compile();

    assert_clean(&out, &key_ref("alice"));
}

#[test]
fn non_positive_budget_is_rejected() {
    for amount in [0.0, -5.0, f64::NAN] {
        let mut key = api_key("alice");
        key.spec.budget = Some(Budget {
            amount,
            period: BudgetPeriod::Monthly,
            currency: "USD".to_owned(),
        });
        let out = keyed_world(key).compile();

        let object = key_ref("alice");
        assert_diagnostic(
            &out,
            &object,
            Severity::Error,
            reasons::INVALID_SPEC,
            "spec.budget.amount",
            "budget amount must be a positive number",
        );
        assert_left_out(&out, &object);
    }
}

#[test]
fn zero_key_limits_are_rejected() {
    let mut key = api_key("alice");
    key.spec.limits = Some(Limits {
        requests_per_minute: Some(60),
        tokens_per_minute: Some(0),
        max_concurrent: None,
    });
    let out = keyed_world(key).compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.limits",
        "limits must be at least 1",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::INVALID_SPEC),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
}

/// `key` with a rotation policy of one hour's grace.
fn rotated(key: ApiKey) -> ApiKey {
    let mut key = key;
    key.spec.rotation = Some(Rotation {
        generation: 1,
        grace_period: "1h".to_owned(),
    });
    key
}

/// The key Secret of ApiKey `api_key` after a rotation: `value` is current, `previous`
/// accepted until `grace_ends`, as the operator writes it.
fn rotated_secret(api_key: &str, value: &str, previous: &str, grace_ends: Time) -> Secret {
    string_secret(
        &format!("{api_key}-key"),
        &[
            ("apiKey", value),
            (PREVIOUS_KEY_SHA256_SECRET_KEY, &sha256(previous)),
            (PREVIOUS_KEY_EXPIRES_SECRET_KEY, &grace_ends.0.to_string()),
        ],
    )
}

/// Alice rotated from `BOB_KEY` (as her previous key) to `ALICE_KEY`.
fn alice_rotated(key: ApiKey, grace_ends: Time) -> World {
    keyed_world(rotated(key)).secret(rotated_secret("alice", ALICE_KEY, BOB_KEY, grace_ends))
}

#[test]
fn rotated_out_key_within_its_grace_period_is_accepted_under_the_same_id() {
    let out = alice_rotated(api_key("alice"), at(1_800)).compile();

    assert_clean(&out, &key_ref("alice"));
    let entries = compiled_keys(&out, "alice");
    assert_eq!(entries.len(), 2);
    // The id names the ApiKey, not its key: a rotation keeps limits, budget and usage.
    let id = &sha256(&format!("apikey:{NS}/alice"))[..24];
    let current = entries.iter().find(|e| e.sha256 == sha256(ALICE_KEY));
    let previous = entries.iter().find(|e| e.sha256 == sha256(BOB_KEY));
    let (current, previous) = (current.unwrap(), previous.unwrap());
    assert_eq!(current.id, id);
    assert_eq!(previous.id, id);
    assert_eq!(current.expires_at, None);
    assert_eq!(previous.expires_at, Some(now().as_second() + 1_800));
    assert_eq!(previous.owner, current.owner);
    assert_eq!(previous.api_key, current.api_key);
}

#[test]
fn rotated_out_key_stops_when_the_key_itself_expires_first() {
    let mut key = api_key("alice");
    key.spec.expires_at = Some(at(600));
    let out = alice_rotated(key, at(1_800)).compile();

    let previous = compiled_keys(&out, "alice")
        .into_iter()
        .find(|e| e.sha256 == sha256(BOB_KEY))
        .expect("previous key is still in its grace period");
    assert_eq!(previous.expires_at, Some(now().as_second() + 600));
}

#[test]
fn rotated_out_key_past_its_grace_period_is_dropped() {
    let out = alice_rotated(api_key("alice"), at(-1)).compile();

    assert_clean(&out, &key_ref("alice"));
    let entries = compiled_keys(&out, "alice");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].sha256, sha256(ALICE_KEY));
}

#[test]
fn a_previous_key_injected_through_the_status_is_never_accepted() {
    // `apikeys/status` is writable by whoever may patch it: a hash of one's choosing with
    // a far expiry must not become a valid key.
    let mut key = api_key("alice");
    key.status = Some(ApiKeyStatus {
        previous_key: Some(PreviousKey {
            sha256: sha256("tg_live_attacker_chosen_key_000"),
            expires_at: at(10 * 365 * 86_400),
        }),
        ..ApiKeyStatus::default()
    });
    let out = keyed_world(key).compile();

    let entries = compiled_keys(&out, "alice");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].sha256, sha256(ALICE_KEY));
}

#[test]
fn a_previous_key_grace_period_longer_than_the_policy_is_refused() {
    let out = alice_rotated(api_key("alice"), at(30 * 86_400)).compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Warning,
        reasons::INVALID_KEY,
        "spec.secretName",
        "ends after spec.rotation.gracePeriod from now",
    );
    assert_eq!(compiled_keys(&out, "alice").len(), 1);
}

#[test]
fn malformed_previous_key_hash_is_ignored_with_an_invalid_key_warning() {
    let out = keyed_world(rotated(api_key("alice")))
        .secret(string_secret(
            "alice-key",
            &[
                ("apiKey", ALICE_KEY),
                (PREVIOUS_KEY_SHA256_SECRET_KEY, "NOT-A-HASH"),
                (PREVIOUS_KEY_EXPIRES_SECRET_KEY, &at(60).0.to_string()),
            ],
        ))
        .compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Warning,
        reasons::INVALID_KEY,
        "spec.secretName",
        "is not a SHA-256 hex digest",
    );
    assert_conditions(
        &out,
        &object,
        ("True", reasons::READY),
        ("True", reasons::RESOLVED),
    );
    let entries = compiled_keys(&out, "alice");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].sha256, sha256(ALICE_KEY));
}

#[test]
fn previous_key_used_by_an_older_api_key_rejects_the_newer_with_key_conflict() {
    let older = created(api_key("zz-older"), 7_200);
    let newer = rotated(created(api_key("aa-newer"), 60));
    let out = routed_world()
        .api_key(newer)
        .secret(rotated_secret("aa-newer", BOB_KEY, ALICE_KEY, at(1_800)))
        .api_key(older)
        .secret(key_secret("zz-older", ALICE_KEY))
        .compile();

    let object = key_ref("aa-newer");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::KEY_CONFLICT,
        "spec.secretName",
        "the previous key in Secret aa-newer-key is also used by ApiKey team-a/zz-older",
    );
    assert_left_out(&out, &object);
    assert_clean(&out, &key_ref("zz-older"));
}

#[test]
fn compiled_keys_are_sorted_by_hash() {
    let out = routed_world()
        .api_key(rotated(api_key("alice")))
        .secret(rotated_secret(
            "alice",
            ALICE_KEY,
            "tg_live_carol_0000000000000000",
            at(60),
        ))
        .api_key(api_key("bob"))
        .secret(key_secret("bob", BOB_KEY))
        .compile();

    let hashes: Vec<&str> = out
        .config
        .keys
        .keys
        .iter()
        .map(|k| k.sha256.as_str())
        .collect();
    assert_eq!(hashes.len(), 3);
    assert!(hashes.is_sorted(), "{hashes:?}");
}

#[test]
fn key_value_of_a_disabled_older_api_key_does_not_block_a_newer_one() {
    let mut older = created(api_key("zz-older"), 7_200);
    older.spec.disabled = true;
    let newer = created(api_key("aa-newer"), 60);
    let out = routed_world()
        .api_key(older)
        .secret(key_secret("zz-older", ALICE_KEY))
        .api_key(newer)
        .secret(key_secret("aa-newer", ALICE_KEY))
        .compile();

    assert_clean(&out, &key_ref("aa-newer"));
    assert_left_out(&out, &key_ref("zz-older"));
    assert_eq!(out.config.keys.keys.len(), 1);
}

// === Whole compilations ===

/// A provider, a route and a key that compile cleanly.
fn healthy_world() -> World {
    let mut key = api_key("alice");
    key.spec.allowed_models = vec!["gpt-4o".to_owned()];
    keyed_world(key)
}

#[test]
fn one_broken_object_does_not_change_how_the_others_compile() {
    let baseline = healthy_world().compile();
    assert!(
        baseline.diagnostics.is_empty(),
        "{:#?}",
        baseline.diagnostics
    );

    let mut disabled = api_key("broken");
    disabled.spec.disabled = true;
    let cases = [
        (
            provider_ref("broken"),
            healthy_world().provider(provider("broken", ProviderType::Openai, &["gpt-4o"])),
        ),
        (
            route_ref("broken"),
            healthy_world().route(route("broken", &["mistral-large"], vec![target("nowhere")])),
        ),
        (
            key_ref("broken"),
            healthy_world()
                .api_key(disabled)
                .secret(key_secret("broken", BOB_KEY)),
        ),
    ];
    for (broken, world) in cases {
        let out = world.compile();

        assert_eq!(out.config, baseline.config, "{broken} changed the config");
        assert_left_out(&out, &broken);
        assert!(!out.diagnostics.is_empty());
        assert!(
            out.diagnostics.iter().all(|d| d.object == broken),
            "{:#?}",
            out.diagnostics
        );
        let mut others = out.objects.clone();
        others.remove(&broken);
        assert_eq!(others, baseline.objects, "{broken} changed other outcomes");
        for object in baseline.objects.keys() {
            assert_eq!(out.conditions(object), baseline.conditions(object));
        }
    }
}

#[test]
fn route_cannot_use_a_provider_from_another_namespace() {
    let mut elsewhere = route("chat", &["gpt-4o"], vec![target("openai")]);
    elsewhere.metadata.namespace = Some("team-b".to_owned());
    let out = openai_world().route(elsewhere).compile();

    let object = ObjectRef::new(Kind::RoutePolicy, "team-b", "chat");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::PROVIDER_NOT_FOUND,
        "spec.targets[0].provider",
        "Provider team-b/openai not found",
    );
    assert_left_out(&out, &object);
}

#[test]
fn objects_and_secrets_without_a_namespace_compile_in_the_default_namespace() {
    let mut p = openai(&["gpt-4o"]);
    p.metadata.namespace = None;
    let mut secret = credential_secret("openai", OPENAI_TOKEN);
    secret.metadata.namespace = None;
    let out = World::default().provider(p).secret(secret).compile();

    assert_clean(
        &out,
        &ObjectRef::new(Kind::Provider, DEFAULT_NAMESPACE, "openai"),
    );
    assert_eq!(
        out.config.credentials.providers["default/openai"],
        OPENAI_TOKEN
    );
}

/// Objects that compete with one another, so that input order could matter.
fn crowded_world() -> World {
    let mut expired = api_key("expired");
    expired.spec.expires_at = Some(at(-10));
    World::default()
        .provider(openai(&["gpt-4o", "gpt-4o-mini"]))
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .provider(provider(
            "anthropic",
            ProviderType::Anthropic,
            &["claude-3-5-sonnet"],
        ))
        .secret(credential_secret("anthropic", "sk-ant-123"))
        .provider(provider(
            "vllm",
            ProviderType::OpenaiCompatible,
            &["llama-3"],
        ))
        .route(created(
            route("chat", &["gpt-4o", "gpt-*"], vec![target("openai")]),
            500,
        ))
        .route(created(
            route(
                "rival",
                &["gpt-4o", "claude-3-5-sonnet"],
                vec![target("anthropic"), target_model("openai", "gpt-4o")],
            ),
            400,
        ))
        .route(route("local", &["llama-3"], vec![target("vllm")]))
        .route(route(
            "standalone",
            &["gpt-*", "mini"],
            vec![target_model("openai", "gpt-4o-mini")],
        ))
        .api_key(created(api_key("alice"), 300))
        .secret(key_secret("alice", ALICE_KEY))
        .api_key(created(api_key("copycat"), 200))
        .secret(key_secret("copycat", ALICE_KEY))
        .api_key(rotated(created(api_key("bob"), 100)))
        .secret(rotated_secret(
            "bob",
            BOB_KEY,
            "tg_live_bob_previous_0000000",
            at(60),
        ))
        .api_key(expired)
        .secret(key_secret("expired", "tg_live_expired_00000000000"))
}

#[test]
fn compile_gives_the_same_result_whatever_the_input_order() {
    let world = crowded_world();
    let first = world.compile();
    for reason in [reasons::MODEL_CONFLICT, reasons::KEY_CONFLICT] {
        assert!(
            first.diagnostics.iter().any(|d| d.reason == reason),
            "the world should contain a {reason}"
        );
    }
    assert!(!first.config.keys.keys.is_empty());

    let mut shuffled = world.clone();
    shuffled.resources.providers.reverse();
    shuffled.resources.route_policies.rotate_left(1);
    shuffled.resources.route_policies.swap(0, 2);
    shuffled.resources.api_keys.reverse();
    shuffled.resources.api_keys.rotate_left(1);
    shuffled.secrets.reverse();
    assert_ne!(
        shuffled
            .resources
            .route_policies
            .iter()
            .map(|r| r.metadata.name.clone())
            .collect::<Vec<_>>(),
        world
            .resources
            .route_policies
            .iter()
            .map(|r| r.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    let second = shuffled.compile();

    assert_eq!(second.config, first.config);
    assert_eq!(
        serde_json::to_string(&second.config.routing).unwrap(),
        serde_json::to_string(&first.config.routing).unwrap()
    );
    assert_eq!(second.diagnostics, first.diagnostics);
    assert_eq!(second.objects, first.objects);
}

#[test]
fn unparseable_base_url_is_rejected_without_echoing_it() {
    let mut p = openai(&["gpt-4o"]);
    p.spec.base_url = Some("https://svc:hunter2@bad host/v1".to_owned());
    let out = World::default()
        .provider(p)
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .compile();

    let object = provider_ref("openai");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.baseUrl",
        "not a valid URL",
    );
    assert_left_out(&out, &object);
    assert_never_mentioned(&out, "hunter2");
}

#[test]
fn repeated_retry_classes_are_compiled_once_in_their_first_order() {
    use crate::v1alpha1::RetryOn;
    let mut r = route("chat", &["gpt-4o"], vec![target("openai")]);
    r.spec.retries.retry_on = vec![
        RetryOn::ConnectError,
        RetryOn::Timeout,
        RetryOn::ConnectError,
        RetryOn::Timeout,
    ];
    let out = openai_world().route(r).compile();
    let compiled = compiled_route(&out, "chat").expect("chat is served");
    assert_eq!(compiled.retry_on, [RetryOn::ConnectError, RetryOn::Timeout]);
}

// === Guardrails ===

fn guardrail(detector: crate::v1alpha1::Detector) -> crate::v1alpha1::Guardrail {
    crate::v1alpha1::Guardrail {
        name: None,
        detector,
        pattern: None,
        terms: Vec::new(),
        limit: None,
        action: crate::v1alpha1::GuardrailAction::Block,
        apply_to: vec![crate::v1alpha1::GuardrailTarget::Request],
    }
}

#[test]
fn route_guardrails_compile_with_default_names() {
    use crate::v1alpha1::{Detector, GuardrailAction};
    let mut policy = route("chat", &["gpt-4o"], vec![target("openai")]);
    let mut custom = guardrail(Detector::Regex);
    custom.name = Some("ticket".into());
    custom.pattern = Some(r"TCK-\d+".into());
    custom.action = GuardrailAction::Redact;
    let mut size = guardrail(Detector::MaxPromptBytes);
    size.limit = Some(1000);
    policy.spec.guardrails = vec![guardrail(Detector::Email), custom, size];
    let out = openai_world().route(policy).compile();
    assert_clean(&out, &route_ref("chat"));
    let compiled = compiled_route(&out, "chat").expect("served");
    let names: Vec<_> = compiled
        .guardrails
        .iter()
        .map(|g| g.name.as_str())
        .collect();
    assert_eq!(names, ["email", "ticket", "maxPromptBytes"]);
    assert_eq!(compiled.guardrails[1].action, GuardrailAction::Redact);
}

#[test]
fn route_with_an_invalid_guardrail_is_left_out_with_invalid_spec_and_others_keep_serving() {
    use crate::v1alpha1::{Detector, GuardrailAction};
    let mut bad = route("strict", &["gpt-4o"], vec![target("openai")]);
    let mut regex = guardrail(Detector::Regex);
    regex.pattern = Some("(unclosed".into());
    let mut size = guardrail(Detector::MaxMessages);
    size.limit = Some(5);
    size.action = GuardrailAction::Redact;
    bad.spec.guardrails = vec![regex, size];
    let good = route("mini", &["gpt-4o-mini"], vec![target("openai")]);
    let out = openai_world().route(bad).route(good).compile();
    let strict = route_ref("strict");
    assert_diagnostic(
        &out,
        &strict,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.guardrails[0]",
        "invalid pattern",
    );
    assert_diagnostic(
        &out,
        &strict,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.guardrails[1]",
        "cannot redact",
    );
    assert_left_out(&out, &strict);
    assert_served(&out, &route_ref("mini"));
}

#[test]
fn duplicate_guardrail_names_are_invalid() {
    use crate::v1alpha1::Detector;
    let mut policy = route("chat", &["gpt-4o"], vec![target("openai")]);
    policy.spec.guardrails = vec![guardrail(Detector::Email), guardrail(Detector::Email)];
    let out = openai_world().route(policy).compile();
    assert_diagnostic(
        &out,
        &route_ref("chat"),
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.guardrails[1].name",
        "used twice",
    );
    assert_left_out(&out, &route_ref("chat"));
}

#[test]
fn api_key_guardrails_compile_and_an_invalid_one_keeps_the_key_out() {
    use crate::v1alpha1::Detector;
    let mut key = api_key("alice");
    key.spec.guardrails = vec![guardrail(Detector::Secret)];
    let out = keyed_world(key.clone()).compile();
    assert_served(&out, &key_ref("alice"));
    assert_eq!(compiled_keys(&out, "alice")[0].guardrails[0].name, "secret");

    let mut terms = guardrail(Detector::BlockedTerms);
    terms.terms = vec!["  ".into()];
    key.spec.guardrails = vec![terms];
    let out = keyed_world(key).compile();
    assert_diagnostic(
        &out,
        &key_ref("alice"),
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.guardrails[0]",
        "blockedTerms",
    );
    assert_left_out(&out, &key_ref("alice"));
    assert_served(&out, &route_ref("chat"));
}

#[test]
fn strategy_options_compile_and_out_of_range_ones_keep_the_route_out() {
    use crate::v1alpha1::{Strategy, StrategyOptions};
    let mut tuned = route("tuned", &["gpt-4o"], vec![target("openai")]);
    tuned.spec.strategy = Strategy::Adaptive;
    tuned.spec.strategy_options = Some(StrategyOptions {
        exploration_percent: 0,
        memory: 20,
        latency_weight: 100,
        cost_weight: 200,
    });
    let mut wild = route("wild", &["gpt-4o-mini"], vec![target("openai")]);
    wild.spec.strategy = Strategy::LeastLatency;
    wild.spec.strategy_options = Some(StrategyOptions {
        memory: 0,
        ..Default::default()
    });
    let out = openai_world().route(tuned).route(wild).compile();
    assert_clean(&out, &route_ref("tuned"));
    let compiled = compiled_route(&out, "tuned").unwrap();
    assert_eq!(compiled.strategy_options.memory, 20);
    assert_eq!(compiled.strategy_options.cost_exponent(), 2.0);
    assert_eq!(compiled.strategy_options.exploration(), 0.0);
    assert_diagnostic(
        &out,
        &route_ref("wild"),
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.strategyOptions",
        "memory between 1 and 100",
    );
    assert_left_out(&out, &route_ref("wild"));

    // Options on a weighted route are accepted with a warning: they do nothing there.
    let mut weighted = route("chat", &["gpt-4o"], vec![target("openai")]);
    weighted.spec.strategy_options = Some(StrategyOptions::default());
    let out = openai_world().route(weighted).compile();
    assert_diagnostic(
        &out,
        &route_ref("chat"),
        Severity::Warning,
        reasons::INVALID_SPEC,
        "spec.strategyOptions",
        "no effect",
    );
    assert_served(&out, &route_ref("chat"));
}

#[test]
fn default_strategy_options_are_left_out_of_compiled_configuration() {
    let out = routed_world().compile();
    let text = serde_json::to_string(compiled_route(&out, "chat").unwrap()).unwrap();
    assert!(!text.contains("strategyOptions"), "{text}");
    let back: CompiledRoute = serde_json::from_str(&text).unwrap();
    assert_eq!(back.strategy_options, Default::default());
    assert_eq!(back.strategy_options.ewma_alpha(), 2.0 / 6.0);
    assert_eq!(back.strategy_options.outcome_decay(), 0.8);
}

mod tenancy;

#[test]
fn an_api_key_whose_secret_name_can_never_exist_is_invalid_alone() {
    // 250 characters: `<name>-key` is 254, one over the API's limit for Secret names.
    let long = format!("a{}", "b".repeat(249));
    let out = keyed_world(api_key("alice"))
        .api_key(api_key(&long))
        .secret(key_secret(&long, BOB_KEY))
        .compile();
    let object = key_ref(&long);
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.secretName",
        "254 characters) is not a valid Secret name",
    );
    assert_left_out(&out, &object);
    // The others are untouched.
    assert_clean(&out, &key_ref("alice"));
    // A short spec.secretName fixes it; a bad one is named as such.
    let mut fixed = api_key(&long);
    fixed.spec.secret_name = Some("long-key".to_owned());
    let out = routed_world()
        .api_key(fixed.clone())
        .secret(string_secret("long-key", &[("apiKey", BOB_KEY)]))
        .compile();
    assert_clean(&out, &object);
    fixed.spec.secret_name = Some("Bad_Name".to_owned());
    let out = routed_world().api_key(fixed).compile();
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.secretName",
        "spec.secretName (8 characters)",
    );
}
