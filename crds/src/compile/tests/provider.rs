//! Providers: credentials, endpoints and auth, sections per type, models, prices,
//! durations and headers.

use super::*;
use crate::v1alpha1::{BetaPolicy, OpenAiApi};

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
        let allowed = crate::compile::compile_with(
            &world.resources,
            &store,
            now(),
            crate::compile::CompileOptions {
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
        betas: Default::default(),
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
            cache_write_per_million: None,
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

#[test]
fn apis_are_compiled_for_openai_style_providers_and_refused_elsewhere() {
    let mut p = openai(&["gpt-4o"]);
    p.spec.apis = Some(vec![OpenAiApi::ChatCompletions, OpenAiApi::Responses]);
    let out = World::default()
        .provider(p)
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .compile();
    let compiled = &out.config.routing.providers["team-a/openai"];
    assert!(compiled.serves(OpenAiApi::Responses));
    assert!(
        !compiled.serves(OpenAiApi::Embeddings),
        "only what it lists"
    );

    let mut p = openai(&["gpt-4o"]);
    p.spec.provider_type = ProviderType::Anthropic;
    p.spec.apis = Some(vec![OpenAiApi::Responses]);
    let out = World::default()
        .provider(p)
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .compile();
    assert!(
        out.diagnostics
            .iter()
            .any(|d| d.field.as_deref() == Some("spec.apis")),
        "{:?}",
        out.diagnostics
    );
}

#[test]
fn unset_apis_default_by_type() {
    for (kind, responses) in [
        (ProviderType::Openai, true),
        (ProviderType::AzureOpenAi, false),
        (ProviderType::OpenaiCompatible, false),
    ] {
        assert_eq!(
            OpenAiApi::defaults(kind).contains(&OpenAiApi::Responses),
            responses,
            "{kind:?}"
        );
        assert!(OpenAiApi::defaults(kind).contains(&OpenAiApi::ChatCompletions));
    }
}

#[test]
fn beta_policies_allow_by_pattern_and_deny_wins() {
    let policy = BetaPolicy {
        allow: vec!["*".to_owned()],
        deny: vec![
            "mcp-client-*".to_owned(),
            "context-1m-2025-08-07".to_owned(),
        ],
    };
    assert!(policy.allows("context-management-2025-06-27"));
    assert!(!policy.allows("mcp-client-2025-04-04"));
    assert!(!policy.allows("context-1m-2025-08-07"));
    let narrow = BetaPolicy {
        allow: vec![
            "prompt-caching-*".to_owned(),
            "interleaved-thinking-2025-05-14".to_owned(),
        ],
        deny: Vec::new(),
    };
    assert!(narrow.allows("prompt-caching-2024-07-31"));
    assert!(narrow.allows("interleaved-thinking-2025-05-14"));
    assert!(!narrow.allows("interleaved-thinking-2025-05-15"));
    assert!(BetaPolicy::default().allows("anything-at-all"));
}
