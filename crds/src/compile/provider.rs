//! Provider → [`CompiledProvider`] (+ its credential).

use std::collections::{BTreeMap, BTreeSet};

use super::{
    ObjectOutcome, Report, object_ref,
    secrets::{Consent, Lookup, SecretStore, clean_secret_value},
};
use crate::{
    config::{CompiledAuth, CompiledMock, CompiledModel, CompiledProvider, GatewayConfig},
    diagnostics::{Kind, ObjectRef, reasons},
    duration,
    v1alpha1::{
        ALLOWED_PROVIDERS_ANNOTATION, AuthStyle, CREDENTIAL_LABEL, Provider, ProviderSpec,
        ProviderType,
    },
};

/// Headers the gateway sets itself; a Provider may not override them.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-authorization",
];

/// What RoutePolicies need to know of a Provider.
pub(super) struct KnownProvider {
    /// Whether it compiled.
    pub served: bool,
    /// Namespaces (or `*`) its `sharedWith` opens it to.
    pub shared_with: Vec<String>,
}

/// Which Providers exist, by id.
pub(super) type KnownProviders = BTreeMap<String, KnownProvider>;

/// A `sharedWith` list, validated: warns about the object's own namespace (always
/// allowed) and drops it.
pub(super) fn shared_with(object: &ObjectRef, list: &[String], report: &mut Report) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, ns) in list.iter().enumerate() {
        if *ns == object.namespace {
            report.warning(
                object,
                reasons::INVALID_SPEC,
                &format!("spec.sharedWith[{i}]"),
                "the object's own namespace needs no sharing",
            );
        } else if !out.contains(ns) {
            out.push(ns.clone());
        }
    }
    out
}

pub(super) fn compile_all(
    providers: &[Provider],
    secrets: &SecretStore,
    options: super::CompileOptions,
    config: &mut GatewayConfig,
    report: &mut Report,
    objects: &mut BTreeMap<ObjectRef, ObjectOutcome>,
) -> KnownProviders {
    let mut known = KnownProviders::new();
    for p in providers {
        let object = object_ref(Kind::Provider, p);
        let id = format!("{}/{}", object.namespace, object.name);
        let compiled = compile_one(&id, &object, &p.spec, secrets, options, report);
        let served = compiled.is_some();
        let mut outcome = ObjectOutcome {
            served,
            generation: p.metadata.generation,
            ..Default::default()
        };
        if let Some((provider, credential)) = compiled {
            outcome.model_count = Some(provider.models.len() as u32);
            outcome.summary = format!(
                "serving {} model(s) via {}",
                provider.models.len(),
                p.spec.provider_type.as_str()
            );
            if let Some(credential) = credential {
                config.credentials.providers.insert(id.clone(), credential);
            }
            config.routing.providers.insert(id.clone(), provider);
        }
        // Two objects cannot share namespace/name, so `insert` only repeats on bad input
        // (the same manifest twice); the last one wins, like `kubectl apply`.
        let shared = shared_with(&object, &p.spec.shared_with, report);
        known.insert(
            id,
            KnownProvider {
                served,
                shared_with: shared,
            },
        );
        objects.insert(object, outcome);
    }
    known
}

fn compile_one(
    id: &str,
    object: &ObjectRef,
    spec: &ProviderSpec,
    secrets: &SecretStore,
    options: super::CompileOptions,
    report: &mut Report,
) -> Option<(CompiledProvider, Option<String>)> {
    let before = report.errors_for(object);
    let kind = spec.provider_type;

    let base_url = base_url(object, spec, options, report);

    // Per-type sections.
    if (kind == ProviderType::AzureOpenAi) != spec.azure.is_some() {
        report.error(
            object,
            reasons::INVALID_SPEC,
            "spec.azure",
            "azure must be set exactly when type is azureOpenAI",
        );
    }
    if let Some(azure) = &spec.azure
        && azure.api_version.trim().is_empty()
    {
        report.error(
            object,
            reasons::INVALID_SPEC,
            "spec.azure.apiVersion",
            "apiVersion must not be empty",
        );
    }
    if spec.anthropic.is_some() && kind != ProviderType::Anthropic {
        report.error(
            object,
            reasons::INVALID_SPEC,
            "spec.anthropic",
            "anthropic settings are only allowed when type is anthropic",
        );
    }
    if spec.apis.is_some()
        && !matches!(
            kind,
            ProviderType::Openai | ProviderType::AzureOpenAi | ProviderType::OpenaiCompatible
        )
    {
        report.error(
            object,
            reasons::INVALID_SPEC,
            "spec.apis",
            "apis is only allowed for openai, azureOpenAI and openaiCompatible",
        );
    }
    if spec.mock.is_some() && kind != ProviderType::Mock {
        report.error(
            object,
            reasons::INVALID_SPEC,
            "spec.mock",
            "mock settings are only allowed when type is mock",
        );
    }

    let (auth, credential) = credentials(object, spec, secrets, report);
    let mock = (kind == ProviderType::Mock)
        .then(|| mock(object, spec, report))
        .flatten();
    let models = models(object, spec, report);

    if spec.currency.len() != 3 || !spec.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        report.error(
            object,
            reasons::INVALID_SPEC,
            "spec.currency",
            format!("{:?} is not an ISO 4217 code such as USD", spec.currency),
        );
    }
    let ms = |field: &str, text: &str, report: &mut Report| -> u64 {
        match duration::parse_millis(text) {
            Ok(0) => {
                report.error(
                    object,
                    reasons::INVALID_SPEC,
                    field,
                    "must be longer than 0",
                );
                0
            }
            Ok(v) => v,
            Err(e) => {
                report.error(object, reasons::INVALID_SPEC, field, e.to_string());
                0
            }
        }
    };
    let connect_timeout_ms = ms("spec.timeouts.connect", &spec.timeouts.connect, report);
    let request_timeout_ms = ms("spec.timeouts.request", &spec.timeouts.request, report);
    let stream_idle_timeout_ms = ms(
        "spec.timeouts.streamIdle",
        &spec.timeouts.stream_idle,
        report,
    );
    let circuit_open_ms = ms(
        "spec.circuitBreaker.openDuration",
        &spec.circuit_breaker.open_duration,
        report,
    );
    if spec.circuit_breaker.failure_threshold == 0 {
        report.error(
            object,
            reasons::INVALID_SPEC,
            "spec.circuitBreaker.failureThreshold",
            "must be at least 1",
        );
    }
    if spec.max_concurrency == Some(0) {
        report.error(
            object,
            reasons::INVALID_SPEC,
            "spec.maxConcurrency",
            "must be at least 1; leave it unset for no limit",
        );
    }
    let headers = headers(object, spec, report);

    if report.errors_for(object) > before {
        return None;
    }
    Some((
        CompiledProvider {
            id: id.to_owned(),
            provider_type: kind,
            base_url,
            auth,
            azure_api_version: spec.azure.as_ref().map(|a| a.api_version.clone()),
            anthropic_version: (kind == ProviderType::Anthropic).then(|| {
                spec.anthropic
                    .as_ref()
                    .map_or_else(|| "2023-06-01".to_owned(), |a| a.version.clone())
            }),
            anthropic_betas: spec
                .anthropic
                .as_ref()
                .map(|a| a.betas.clone())
                .filter(|b| !b.is_default()),
            apis: spec.apis.clone(),
            mock,
            models,
            currency: spec.currency.clone(),
            connect_timeout_ms,
            request_timeout_ms,
            stream_idle_timeout_ms,
            max_concurrency: spec.max_concurrency,
            circuit_failure_threshold: spec.circuit_breaker.failure_threshold,
            circuit_open_ms,
            headers,
            http_version: spec.http_version,
        },
        credential,
    ))
}

fn base_url(
    object: &ObjectRef,
    spec: &ProviderSpec,
    options: super::CompileOptions,
    report: &mut Report,
) -> String {
    let field = "spec.baseUrl";
    let given = spec.base_url.as_deref();
    let text = match (spec.provider_type, given) {
        (ProviderType::Mock, Some(_)) => {
            report.warning(
                object,
                reasons::INVALID_SPEC,
                field,
                "ignored: the mock Provider makes no network calls",
            );
            return String::new();
        }
        (ProviderType::Mock, None) => return String::new(),
        (_, Some(url)) => url,
        (ProviderType::Openai, None) => "https://api.openai.com/v1",
        (ProviderType::Anthropic, None) => "https://api.anthropic.com/v1",
        (kind, None) => {
            report.error(
                object,
                reasons::INVALID_SPEC,
                field,
                format!("baseUrl is required for type {}", kind.as_str()),
            );
            return String::new();
        }
    };
    match url::Url::parse(text) {
        Err(e) => report.error(
            object,
            reasons::INVALID_SPEC,
            field,
            // Not echoed: a malformed URL may still carry a password.
            format!("not a valid URL: {e}"),
        ),
        Ok(u) if !matches!(u.scheme(), "http" | "https") => report.error(
            object,
            reasons::INVALID_SPEC,
            field,
            "the URL scheme must be http or https",
        ),
        Ok(u) if u.host_str().is_none_or(str::is_empty) => {
            report.error(object, reasons::INVALID_SPEC, field, "the URL has no host")
        }
        // Credentials in the URL would end up in logs and traces.
        Ok(u) if !u.username().is_empty() || u.password().is_some() => report.error(
            object,
            reasons::INVALID_SPEC,
            field,
            "the URL must not contain credentials; use spec.credentials",
        ),
        Ok(u) if u.query().is_some() || u.fragment().is_some() => report.error(
            object,
            reasons::INVALID_SPEC,
            field,
            "the URL must not have a query or fragment",
        ),
        Ok(u)
            if !options.allow_link_local_upstreams
                && super::egress::forbidden_host(&u).is_some() =>
        {
            let why = super::egress::forbidden_host(&u).unwrap_or_default();
            report.error(
                object,
                reasons::INVALID_SPEC,
                field,
                format!(
                    "{why}: the gateway never calls such addresses unless it runs with --allow-link-local-upstreams"
                ),
            );
        }
        Ok(_) => {}
    }
    text.trim_end_matches('/').to_owned()
}

fn credentials(
    object: &ObjectRef,
    spec: &ProviderSpec,
    secrets: &SecretStore,
    report: &mut Report,
) -> (Option<CompiledAuth>, Option<String>) {
    let kind = spec.provider_type;
    let Some(creds) = &spec.credentials else {
        if matches!(
            kind,
            ProviderType::Openai | ProviderType::Anthropic | ProviderType::AzureOpenAi
        ) {
            report.error(
                object,
                reasons::INVALID_SPEC,
                "spec.credentials",
                format!("credentials are required for type {}", kind.as_str()),
            );
        }
        return (None, None);
    };
    if kind == ProviderType::Mock {
        report.warning(
            object,
            reasons::INVALID_SPEC,
            "spec.credentials",
            "ignored: the mock Provider needs no credentials",
        );
        return (None, None);
    }
    let style = creds.auth_style.unwrap_or(match kind {
        ProviderType::Anthropic => AuthStyle::XApiKey,
        ProviderType::AzureOpenAi => AuthStyle::ApiKey,
        _ => AuthStyle::Bearer,
    });
    let auth = match style {
        AuthStyle::Bearer => Some(CompiledAuth {
            header: "authorization".into(),
            prefix: "Bearer ".into(),
        }),
        AuthStyle::XApiKey => Some(CompiledAuth {
            header: "x-api-key".into(),
            prefix: String::new(),
        }),
        AuthStyle::ApiKey => Some(CompiledAuth {
            header: "api-key".into(),
            prefix: String::new(),
        }),
        AuthStyle::Header => match creds.header_name.as_deref() {
            Some(h) if is_token(h) => Some(CompiledAuth {
                header: h.to_ascii_lowercase(),
                prefix: String::new(),
            }),
            Some(h) => {
                report.error(
                    object,
                    reasons::INVALID_SPEC,
                    "spec.credentials.headerName",
                    format!("{h:?} is not a valid header name"),
                );
                None
            }
            None => {
                report.error(
                    object,
                    reasons::INVALID_SPEC,
                    "spec.credentials.headerName",
                    "headerName is required when authStyle is header",
                );
                None
            }
        },
    };
    if style != AuthStyle::Header && creds.header_name.is_some() {
        report.warning(
            object,
            reasons::INVALID_SPEC,
            "spec.credentials.headerName",
            "ignored unless authStyle is header",
        );
    }

    let r = &creds.secret_ref;
    let credential = match secrets.credential(&object.namespace, &r.name, &r.key, &object.name) {
        Lookup::NoSecret => {
            report.ref_error(
                object,
                reasons::SECRET_NOT_FOUND,
                "spec.credentials.secretRef",
                format!(
                    "Secret {}/{} not found (credential Secrets must carry the label {CREDENTIAL_LABEL}: \"true\"; Tollgate reads no other Secret)",
                    object.namespace, r.name
                ),
            );
            None
        }
        Lookup::NotPermitted => {
            let why = match secrets.consent(&object.namespace, &r.name) {
                Some(Consent::Providers(_)) => format!(
                    "its annotation {ALLOWED_PROVIDERS_ANNOTATION} does not name Provider {}",
                    object.name
                ),
                _ => format!("it does not carry the label {CREDENTIAL_LABEL}: \"true\""),
            };
            report.ref_error(
                object,
                reasons::REF_NOT_PERMITTED,
                "spec.credentials.secretRef",
                format!(
                    "Secret {}/{} may not be used as this Provider's credential: {why}",
                    object.namespace, r.name
                ),
            );
            None
        }
        Lookup::NoKey => {
            report.ref_error(
                object,
                reasons::SECRET_KEY_NOT_FOUND,
                "spec.credentials.secretRef",
                format!(
                    "Secret {}/{} has no key {:?}",
                    object.namespace, r.name, r.key
                ),
            );
            None
        }
        Lookup::Found(raw) => match clean_secret_value(raw) {
            Ok(v) => Some(v),
            Err(why) => {
                report.ref_error(
                    object,
                    reasons::INVALID_SECRET,
                    "spec.credentials.secretRef",
                    format!(
                        "key {:?} of Secret {}/{}: {why}",
                        r.key, object.namespace, r.name
                    ),
                );
                None
            }
        },
    };
    (auth, credential)
}

fn mock(object: &ObjectRef, spec: &ProviderSpec, report: &mut Report) -> Option<CompiledMock> {
    let m = spec.mock.clone().unwrap_or_default();
    let mut parse = |field: &str, text: &str| match duration::parse_millis(text) {
        Ok(v) => v,
        Err(e) => {
            report.error(object, reasons::INVALID_SPEC, field, e.to_string());
            0
        }
    };
    let latency_ms = parse("spec.mock.latency", &m.latency);
    let chunk_interval_ms = parse("spec.mock.chunkInterval", &m.chunk_interval);
    if m.completion_tokens == 0 {
        report.error(
            object,
            reasons::INVALID_SPEC,
            "spec.mock.completionTokens",
            "must be at least 1",
        );
    }
    Some(CompiledMock {
        latency_ms,
        chunk_interval_ms,
        completion_tokens: m.completion_tokens,
        reply: m.reply,
    })
}

fn models(
    object: &ObjectRef,
    spec: &ProviderSpec,
    report: &mut Report,
) -> BTreeMap<String, CompiledModel> {
    if spec.models.is_empty() {
        report.error(
            object,
            reasons::INVALID_SPEC,
            "spec.models",
            "at least one model is required",
        );
    }
    let mut seen = BTreeSet::new();
    let mut out = BTreeMap::new();
    for (i, m) in spec.models.iter().enumerate() {
        let field = format!("spec.models[{i}]");
        if !seen.insert(m.name.as_str()) {
            report.error(
                object,
                reasons::INVALID_SPEC,
                &field,
                format!("model {:?} is listed twice", m.name),
            );
            continue;
        }
        if super::patterns::is_glob(&m.name) || super::patterns::validate(&m.name).is_err() {
            report.error(
                object,
                reasons::INVALID_SPEC,
                &format!("{field}.name"),
                format!("{:?} is not a valid model name", m.name),
            );
            continue;
        }
        let (input, output, cached, write) = match &m.pricing {
            None => (0.0, 0.0, None, None),
            Some(p) => (
                p.input_per_million,
                p.output_per_million,
                p.cached_input_per_million,
                p.cache_write_per_million,
            ),
        };
        let prices = [Some(input), Some(output), cached, write];
        if prices.iter().flatten().any(|p| !p.is_finite() || *p < 0.0) {
            report.error(
                object,
                reasons::INVALID_SPEC,
                &format!("{field}.pricing"),
                "prices must be finite and not negative",
            );
            continue;
        }
        for (name, value) in [
            ("contextWindow", m.context_window),
            ("maxOutputTokens", m.max_output_tokens),
        ] {
            if value == Some(0) {
                report.error(
                    object,
                    reasons::INVALID_SPEC,
                    &format!("{field}.{name}"),
                    "must be at least 1",
                );
            }
        }
        if m.context_window == Some(0) || m.max_output_tokens == Some(0) {
            continue;
        }
        out.insert(
            m.name.clone(),
            CompiledModel {
                upstream_name: m.upstream_name.clone().unwrap_or_else(|| m.name.clone()),
                input_per_million: input,
                output_per_million: output,
                cached_input_per_million: cached.unwrap_or(input),
                cache_write_per_million: write,
                context_window: m.context_window,
                max_output_tokens: m.max_output_tokens,
            },
        );
    }
    out
}

fn headers(
    object: &ObjectRef,
    spec: &ProviderSpec,
    report: &mut Report,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (name, value) in &spec.headers {
        let field = format!("spec.headers.{name}");
        let lower = name.to_ascii_lowercase();
        if !is_token(name) {
            report.error(
                object,
                reasons::INVALID_SPEC,
                &field,
                format!("{name:?} is not a valid header name"),
            );
        } else if RESERVED_HEADERS.contains(&lower.as_str()) {
            report.error(
                object,
                reasons::INVALID_SPEC,
                &field,
                format!("{name} is set by the gateway; put credentials in spec.credentials"),
            );
        } else if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            report.error(
                object,
                reasons::INVALID_SPEC,
                &field,
                "header values must not contain CR, LF or NUL",
            );
        } else {
            out.insert(lower, value.clone());
        }
    }
    out
}

/// An HTTP token (RFC 9110), as header names must be.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
