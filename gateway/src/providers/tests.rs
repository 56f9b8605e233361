use std::collections::BTreeMap;

use tollgate_api::config::CompiledAuth;

use super::*;

fn provider(kind: ProviderType) -> CompiledProvider {
    CompiledProvider {
        id: "ns/p".into(),
        provider_type: kind,
        base_url: "https://up.example.com/v1".into(),
        auth: Some(CompiledAuth {
            header: "authorization".into(),
            prefix: "Bearer ".into(),
        }),
        azure_api_version: Some("2024-10-21".into()),
        anthropic_version: None,
        anthropic_betas: None,
        apis: None,
        mock: None,
        models: BTreeMap::new(),
        currency: "USD".into(),
        connect_timeout_ms: 1000,
        request_timeout_ms: 1000,
        stream_idle_timeout_ms: 1000,
        max_concurrency: None,
        circuit_failure_threshold: 5,
        circuit_open_ms: 1000,
        headers: BTreeMap::from([("openai-organization".into(), "org-1".into())]),
        http_version: Default::default(),
    }
}

fn endpoint_of(kind: ProviderType, operation: Operation, model: &str) -> String {
    adapter(kind)
        .unwrap()
        .endpoint(&provider(kind), operation, model)
}

#[test]
fn every_provider_type_but_the_mock_has_an_adapter_of_its_wire_format() {
    assert_eq!(
        adapter(ProviderType::Openai).unwrap().dialect(),
        Dialect::OpenAi
    );
    assert_eq!(
        adapter(ProviderType::OpenaiCompatible).unwrap().dialect(),
        Dialect::OpenAi
    );
    assert_eq!(
        adapter(ProviderType::AzureOpenAi).unwrap().dialect(),
        Dialect::OpenAi
    );
    assert_eq!(
        adapter(ProviderType::Anthropic).unwrap().dialect(),
        Dialect::Anthropic
    );
    assert!(adapter(ProviderType::Mock).is_none());
    let anthropic = adapter(ProviderType::Anthropic).unwrap();
    let a = provider(ProviderType::Anthropic);
    assert!(anthropic.offers(&a, Operation::ChatCompletions));
    assert!(!anthropic.offers(&a, Operation::Embeddings));
    assert!(!anthropic.offers(&a, Operation::Completions));
    assert!(!anthropic.offers(&a, Operation::AudioSpeech));
}

#[test]
fn endpoints_never_translated_go_only_where_the_provider_serves_them() {
    use tollgate_api::v1alpha1::OpenAiApi;
    let raw = [
        (Operation::Moderations, "moderations"),
        (Operation::ImageGenerations, "images/generations"),
        (Operation::AudioSpeech, "audio/speech"),
        (Operation::AudioTranscriptions, "audio/transcriptions"),
    ];
    let openai = adapter(ProviderType::Openai).unwrap();
    for (op, path) in raw {
        // OpenAI serves them all by default; an OpenAI-compatible server only when listed.
        assert!(openai.offers(&provider(ProviderType::Openai), op), "{op:?}");
        assert!(
            !openai.offers(&provider(ProviderType::OpenaiCompatible), op),
            "{op:?}"
        );
        assert_eq!(
            endpoint_of(ProviderType::Openai, op, "m"),
            format!("https://up.example.com/v1/{path}")
        );
        assert!(op.is_raw() && !op.is_chat());
    }
    let mut listed = provider(ProviderType::OpenaiCompatible);
    listed.apis = Some(vec![
        OpenAiApi::ChatCompletions,
        OpenAiApi::AudioTranscriptions,
    ]);
    assert!(openai.offers(&listed, Operation::AudioTranscriptions));
    assert!(!openai.offers(&listed, Operation::AudioSpeech));
    // Not listing the chat APIs does not take them away (they were never gated).
    assert!(openai.offers(&listed, Operation::Embeddings));
    let azure = adapter(ProviderType::AzureOpenAi).unwrap();
    let mut deployment = provider(ProviderType::AzureOpenAi);
    assert!(!azure.offers(&deployment, Operation::ImageGenerations));
    deployment.apis = Some(vec![OpenAiApi::ImageGenerations]);
    assert!(azure.offers(&deployment, Operation::ImageGenerations));
    assert!(
        azure
            .endpoint(&deployment, Operation::ImageGenerations, "img")
            .contains("/openai/deployments/img/images/generations?api-version=")
    );
}

#[test]
fn endpoints_follow_each_wire_format() {
    assert_eq!(
        endpoint_of(ProviderType::Openai, Operation::ChatCompletions, "gpt-4o"),
        "https://up.example.com/v1/chat/completions"
    );
    // An Anthropic client's messages go to an OpenAI-style upstream as chat completions.
    assert_eq!(
        endpoint_of(ProviderType::OpenaiCompatible, Operation::Messages, "m"),
        "https://up.example.com/v1/chat/completions"
    );
    assert_eq!(
        endpoint_of(ProviderType::AzureOpenAi, Operation::Embeddings, "prod-emb"),
        "https://up.example.com/v1/openai/deployments/prod-emb/embeddings?api-version=2024-10-21"
    );
    assert_eq!(
        endpoint_of(
            ProviderType::Anthropic,
            Operation::ChatCompletions,
            "claude"
        ),
        "https://up.example.com/v1/messages"
    );
}

#[test]
fn headers_carry_the_provider_credential_and_extras_marked_sensitive() {
    let openai = provider(ProviderType::Openai);
    let h = headers(&openai::OpenAi, &openai, Some("sk-up"), "req-1");
    assert_eq!(h["authorization"], "Bearer sk-up");
    assert!(h["authorization"].is_sensitive());
    assert_eq!(h["openai-organization"], "org-1");
    assert_eq!(h["x-request-id"], "req-1");
    assert!(!h.contains_key("anthropic-version"));
    let mut claude = provider(ProviderType::Anthropic);
    claude.anthropic_version = Some("2023-06-01".into());
    let h = headers(&anthropic::Anthropic, &claude, Some("sk-ant"), "req-2");
    assert_eq!(h["anthropic-version"], "2023-06-01");
}

#[test]
fn bodies_are_forwarded_byte_for_byte_unless_the_model_is_renamed() {
    let original = Bytes::from_static(br#"{ "model" : "gpt-4o", "messages": [], "zeta": 1 }"#);
    assert_eq!(
        passthrough(&original, "gpt-4o", "gpt-4o").unwrap(),
        original
    );
    let renamed: serde_json::Value =
        serde_json::from_slice(&passthrough(&original, "chat", "gpt-4o-2024").unwrap()).unwrap();
    assert_eq!(renamed["model"], "gpt-4o-2024");
    assert_eq!(renamed["zeta"], 1);
}

fn head(body: &Bytes) -> RequestHead {
    crate::request::parse_head(body).unwrap()
}

#[test]
fn streams_to_openai_style_upstreams_ask_for_usage_and_other_dialects_are_translated() {
    let stream = Bytes::from_static(
        br#"{"model":"chat","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    );
    let body = request_body(
        &openai::OpenAi,
        &provider(ProviderType::Openai),
        Operation::ChatCompletions,
        &head(&stream),
        &stream,
        "gpt-4o",
    )
    .unwrap();
    assert!(body.injected_usage);
    let sent: serde_json::Value = serde_json::from_slice(&body.bytes).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(sent["model"], "gpt-4o");
    // The same call to Anthropic: translated, nothing injected.
    let body = request_body(
        &anthropic::Anthropic,
        &provider(ProviderType::Anthropic),
        Operation::ChatCompletions,
        &head(&stream),
        &stream,
        "claude",
    )
    .unwrap();
    assert!(!body.injected_usage);
    let sent: serde_json::Value = serde_json::from_slice(&body.bytes).unwrap();
    assert_eq!(sent["messages"][0]["content"][0]["text"], "hi");
    assert_eq!(
        sent["max_tokens"],
        crate::dialects::anthropic::DEFAULT_MAX_TOKENS
    );
    // What cannot be translated is a 400 with the reason.
    let n2 = Bytes::from_static(br#"{"model":"chat","n":2,"messages":[]}"#);
    let err = request_body(
        &anthropic::Anthropic,
        &provider(ProviderType::Anthropic),
        Operation::ChatCompletions,
        &head(&n2),
        &n2,
        "claude",
    )
    .unwrap_err();
    assert!(err.to_string().contains("n > 1"), "{err}");
}

#[test]
fn a_same_dialect_call_without_rename_sends_the_clients_own_bytes() {
    // The fast path: no parse, no copy. The bytes sent are the very buffer received.
    let body = Bytes::from(
        br#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#
            .to_vec(),
    );
    let sent = request_body(
        &openai::OpenAi,
        &provider(ProviderType::Openai),
        Operation::ChatCompletions,
        &head(&body),
        &body,
        "gpt-4o",
    )
    .unwrap();
    assert!(!sent.injected_usage);
    assert_eq!(sent.bytes.as_ptr(), body.as_ptr());
    let messages = Bytes::from(br#"{"model":"claude","max_tokens":5,"messages":[]}"#.to_vec());
    let sent = request_body(
        &anthropic::Anthropic,
        &provider(ProviderType::Anthropic),
        Operation::Messages,
        &head(&messages),
        &messages,
        "claude",
    )
    .unwrap();
    assert_eq!(sent.bytes.as_ptr(), messages.as_ptr());
}
