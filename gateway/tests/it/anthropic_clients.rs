//! What Anthropic-native clients such as Claude Code send beyond the body: their
//! `anthropic-version`, the `anthropic-beta` features their bodies need, and query
//! parameters (`/v1/messages?beta=true`), forwarded to Anthropic targets as sent, under the
//! Provider's beta policy; against an emulated Anthropic API that refuses a beta-only field
//! without its beta, as the real one does.

use crate::{common, responses_api};

use common::{Gateway, client};
use serde_json::{Value, json};
use tollgate_testkit::emulated::{self, CONTEXT_MANAGEMENT_BETA};

/// A second Anthropic Provider on the same upstream whose policy refuses the
/// context-management beta.
fn strict(url: &str) -> String {
    format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: strict}}\nspec:\n  type: anthropic\n  baseUrl: {url}\n\
         \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n  anthropic: {{version: '2023-01-01', betas: {{deny: ['context-management-*']}}}}\n\
         \x20 models: [{{name: claude-strict, upstreamName: claude-emulated}}]\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: strict}}\nspec:\n  models: [claude-strict]\n  targets: [{{provider: strict}}]\n  retries: {{attempts: 0}}\n---\n"
    )
}

async fn messages(gw: &Gateway, path: &str, betas: Option<&str>, body: Value) -> (u16, Value) {
    let mut req = client()
        .post(gw.url(path))
        .header("x-api-key", responses_api::KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&body);
    if let Some(betas) = betas {
        req = req.header("anthropic-beta", betas);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A request shaped like Claude Code's: a system block, a user turn, and the
/// context-management field that exists only with its beta.
fn claude_code_body(model: &str) -> Value {
    json!({
        "model": model,
        "max_tokens": 64,
        "system": [{"type": "text", "text": "You are Claude Code."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
    })
}

#[tokio::test]
async fn a_claude_code_request_reaches_anthropic_with_its_betas_version_and_query() {
    let bed = responses_api::bed("").await;
    let betas = format!("claude-code-20250219,{CONTEXT_MANAGEMENT_BETA}");
    let (status, answer) = messages(
        &bed.gw,
        "/v1/messages?beta=true",
        Some(&betas),
        claude_code_body("claude"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["content"][0]["text"], "emulated reply to: hi");
    let sent = bed.anthropic.received().pop().unwrap();
    assert_eq!(sent.path_and_query, "/v1/messages?beta=true");
    assert_eq!(
        emulated::header(&sent, "anthropic-beta").as_deref(),
        Some(betas.as_str())
    );
    assert_eq!(
        emulated::header(&sent, "anthropic-version").as_deref(),
        Some("2023-06-01")
    );
    assert_eq!(
        emulated::header(&sent, "x-api-key").as_deref(),
        Some(emulated::API_KEY),
        "the Provider's credential, not the client's key"
    );
}

#[tokio::test]
async fn without_its_beta_the_upstream_refuses_the_field_and_the_client_hears_why() {
    let bed = responses_api::bed("").await;
    let (status, error) = messages(&bed.gw, "/v1/messages", None, claude_code_body("claude")).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["type"], "error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("context_management: Extra inputs are not permitted"),
        "{error}"
    );
}

#[tokio::test]
async fn a_beta_the_provider_denies_is_refused_before_the_upstream() {
    let upstream = emulated::Emulated::start(emulated::Flavor::Anthropic).await;
    let bed = responses_api::bed(&strict(&upstream.base_url())).await;
    let (status, error) = messages(
        &bed.gw,
        "/v1/messages",
        Some(CONTEXT_MANAGEMENT_BETA),
        claude_code_body("claude-strict"),
    )
    .await;
    assert_eq!(status, 400, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("anthropic-beta"),
        "{error}"
    );
    assert!(
        upstream.received().is_empty(),
        "refused before the upstream"
    );
    // A beta the policy allows passes, and the client's version replaces the Provider's.
    let (status, answer) = messages(
        &bed.gw,
        "/v1/messages",
        Some("interleaved-thinking-2025-05-14"),
        json!({"model": "claude-strict", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let sent = upstream.received().pop().unwrap();
    assert_eq!(
        emulated::header(&sent, "anthropic-version").as_deref(),
        Some("2023-06-01")
    );
}

#[tokio::test]
async fn a_translated_call_uses_the_providers_version_and_no_client_betas() {
    let bed = responses_api::bed("").await;
    let resp = client()
        .post(bed.gw.url("/v1/chat/completions"))
        .bearer_auth(responses_api::KEY)
        .header("anthropic-beta", CONTEXT_MANAGEMENT_BETA)
        .json(&json!({"model": "claude", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sent = bed.anthropic.received().pop().unwrap();
    assert_eq!(emulated::header(&sent, "anthropic-beta"), None);
    assert_eq!(
        emulated::header(&sent, "anthropic-version").as_deref(),
        Some("2023-06-01")
    );
    assert_eq!(sent.path_and_query, "/v1/messages");
}

#[tokio::test]
async fn count_tokens_is_answered_by_anthropic_or_estimated_and_marked_as_such() {
    let bed = responses_api::bed("").await;
    let body = |model: &str| json!({"model": model, "system": "Be brief.", "messages": [{"role": "user", "content": "How many tokens is this?"}]});
    let (status, counted) = messages(
        &bed.gw,
        "/v1/messages/count_tokens?beta=true",
        Some(CONTEXT_MANAGEMENT_BETA),
        body("claude"),
    )
    .await;
    assert_eq!(status, 200, "{counted}");
    assert!(counted["input_tokens"].as_u64().unwrap() > 0, "{counted}");
    let sent = bed.anthropic.received().pop().unwrap();
    assert_eq!(sent.path_and_query, "/v1/messages/count_tokens?beta=true");
    assert_eq!(
        sent.json()["model"],
        "claude-emulated",
        "the upstream's name for the model"
    );
    assert_eq!(
        emulated::header(&sent, "anthropic-beta").as_deref(),
        Some(CONTEXT_MANAGEMENT_BETA)
    );

    // A model no Anthropic target serves: an estimate, said to be one.
    let resp = client()
        .post(bed.gw.url("/v1/messages/count_tokens"))
        .header("x-api-key", responses_api::KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&body("gpt-chat"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-tollgate-estimate"], "true");
    let estimate: Value = resp.json().await.unwrap();
    assert!(estimate["input_tokens"].as_u64().unwrap() > 0);
    assert!(
        bed.chat_only.received().is_empty(),
        "nothing is sent to count"
    );

    // The key and the model are checked as for messages.
    let (status, _) = messages(&bed.gw, "/v1/messages/count_tokens", None, body("nope")).await;
    assert_eq!(status, 404);
    let resp = client()
        .post(bed.gw.url("/v1/messages/count_tokens"))
        .json(&body("claude"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn count_tokens_counts_against_request_limits_and_is_measured() {
    const COUNTER: &str = "tg_countTokensLimitedKey00000000000000001";
    let bed = responses_api::bed(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: counter-key}}\nstringData: {{apiKey: {COUNTER}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: counter}}\nspec: {{owner: counters, limits: {{requestsPerMinute: 3, tokensPerMinute: 10}}}}\n---\n"
    ))
    .await;
    let count = || async {
        let resp = client()
            .post(bed.gw.url("/v1/messages/count_tokens"))
            .header("x-api-key", COUNTER)
            .header("anthropic-version", "2023-06-01")
            .json(&json!({"model": "claude", "messages": [{"role": "user", "content": "How many tokens is this sentence, counted upstream?"}]}))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap())
    };
    // Counting reserves no tokens: a 10-token-a-minute key counts longer prompts.
    for _ in 0..3 {
        let (status, counted) = count().await;
        assert_eq!(status, 200, "{counted}");
    }
    // The fourth in the minute is refused, in Anthropic's shape, without an upstream call.
    let (status, refused) = count().await;
    assert_eq!(status, 429, "{refused}");
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["error"]["type"], "rate_limit_error", "{refused}");
    let calls = bed
        .anthropic
        .received()
        .iter()
        .filter(|r| r.path_and_query.starts_with("/v1/messages/count_tokens"))
        .count();
    assert_eq!(calls, 3);
    let metrics = bed.gw.metrics().await;
    assert_eq!(
        common::metric(
            &metrics,
            "tollgate_requests_total{operation=\"count_tokens\",route=\"default/claude\",provider=\"none\",status=\"429\"}"
        ),
        1.0,
        "{metrics}"
    );
}
