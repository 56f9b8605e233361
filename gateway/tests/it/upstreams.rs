//! Calls to OpenAI-style upstreams through the real gateway binary: byte-for-byte
//! forwarding, credentials, Azure URLs, retries, Retry-After, fallback, error relay,
//! timeouts and streaming without buffering.

use crate::common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    Gateway, client,
    upstream::{Reply, Upstream, completion},
};
use serde_json::{Value, json};

const KEY: &str = "tg_upstreamTestsClientKey00000000000000001";
const UPSTREAM_TOKEN: &str = "sk-upstream-secret-token";

/// Writes a standalone config: provider `up` (openaiCompatible at `upstream`) serving
/// `gpt-4o`, a RoutePolicy `chat` with `route_extra` YAML, and a client key.
fn config(dir: &std::path::Path, providers: &str, route: &str) {
    let text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: up-credentials, labels: {{tollgate.dev/credential: 'true'}}}}\nstringData: {{token: {UPSTREAM_TOKEN}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: client-key}}\nstringData: {{apiKey: {KEY}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: client}}\nspec: {{owner: tests}}\n---\n\
         {providers}---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: chat}}\nspec:\n{route}"
    );
    std::fs::write(dir.join("config.yaml"), text).unwrap();
}

fn provider(name: &str, kind: &str, base_url: &str, extra: &str) -> String {
    format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: {name}}}\nspec:\n  type: {kind}\n  baseUrl: {base_url}\n\
         \x20 credentials: {{secretRef: {{name: up-credentials, key: token}}}}\n  models: [{{name: gpt-4o}}, {{name: renamed, upstreamName: gpt-4o-2024-08-06}}]\n{extra}"
    )
}

fn simple_route(extra: &str) -> String {
    format!("  models: [gpt-4o, renamed]\n  targets: [{{provider: up}}]\n{extra}")
}

async fn start(providers: &str, route: &str) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), providers, route);
    let gw = Gateway::start(&["--resources", dir.path().to_str().unwrap()]);
    (gw, dir)
}

async fn post(gw: &Gateway, body: &str) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

const BODY: &str = r#"{ "model": "gpt-4o",  "messages": [{"role": "user", "content": "hi"}], "temperature": 0.25, "x_extra": [1, 2] }"#;

#[tokio::test]
async fn requests_are_forwarded_byte_for_byte_with_the_provider_credential_only() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(
        &provider("up", "openaiCompatible", &up.base_url(), ""),
        &simple_route(""),
    )
    .await;
    let resp = post(&gw, BODY).await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "upstream says hi"
    );

    let seen = up.received();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path_and_query, "/v1/chat/completions");
    assert_eq!(
        seen[0].body,
        Bytes::from_static(BODY.as_bytes()),
        "the original bytes, untouched"
    );
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {UPSTREAM_TOKEN}")
    );
    let all_headers = format!("{:?}", seen[0].headers);
    assert!(
        !all_headers.contains(KEY),
        "the client's key never goes upstream"
    );
    assert!(seen[0].headers.contains_key("x-request-id"));
    assert!(
        !gw.logs().contains(UPSTREAM_TOKEN),
        "credentials are never logged"
    );
}

#[tokio::test]
async fn a_provider_model_with_another_upstream_name_is_renamed_in_the_body() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(
        &provider("up", "openaiCompatible", &up.base_url(), ""),
        &simple_route(""),
    )
    .await;
    assert_eq!(
        post(&gw, &BODY.replace("gpt-4o", "renamed")).await.status(),
        200
    );
    let sent = up.received()[0].json();
    assert_eq!(sent["model"], "gpt-4o-2024-08-06");
    assert_eq!(sent["temperature"], 0.25);
}

#[tokio::test]
async fn azure_openai_gets_deployment_urls_the_api_version_and_the_api_key_header() {
    let up = Upstream::start().await;
    let base = format!("http://{}", up.addr);
    let (gw, _dir) = start(
        &provider(
            "up",
            "azureOpenAI",
            &base,
            "  azure: {apiVersion: \"2024-10-21\"}\n",
        ),
        &simple_route(""),
    )
    .await;
    assert_eq!(
        post(&gw, &BODY.replace("gpt-4o", "renamed")).await.status(),
        200
    );
    let seen = &up.received()[0];
    assert_eq!(
        seen.path_and_query,
        "/openai/deployments/gpt-4o-2024-08-06/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(seen.headers["api-key"], UPSTREAM_TOKEN);
    assert!(!seen.headers.contains_key("authorization"));
}

#[tokio::test]
async fn server_errors_are_retried_until_an_attempt_succeeds() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(
        &provider("up", "openaiCompatible", &up.base_url(), ""),
        &simple_route("  retries: {attempts: 3, initialBackoff: 10ms, maxBackoff: 50ms}\n"),
    )
    .await;
    up.script([
        Reply::Json(500, json!({"error": {"message": "boom"}}), vec![]),
        Reply::Json(503, json!({"error": {"message": "busy"}}), vec![]),
    ]);
    let resp = post(&gw, BODY).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(up.received().len(), 3);
}

#[tokio::test]
async fn retries_are_bounded_and_the_last_failure_is_reported_as_502() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(
        &provider("up", "openaiCompatible", &up.base_url(), ""),
        &simple_route("  retries: {attempts: 2, initialBackoff: 10ms, maxBackoff: 20ms}\n"),
    )
    .await;
    up.script(
        (0..10).map(|_| Reply::Json(502, json!({"error": {"message": "bad gateway"}}), vec![])),
    );
    let resp = post(&gw, BODY).await;
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_error");
    assert_eq!(
        up.received().len(),
        3,
        "one attempt plus two retries, no more"
    );
}

#[tokio::test]
async fn upstream_429_is_retried_after_its_retry_after_and_relayed_with_it_when_persistent() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(
        &provider("up", "openaiCompatible", &up.base_url(), ""),
        &simple_route("  retries: {attempts: 1, initialBackoff: 1ms, maxBackoff: 1ms}\n"),
    )
    .await;
    let limited = || {
        Reply::Json(
            429,
            json!({"error": {"message": "slow down", "type": "rate_limit_error"}}),
            vec![("retry-after-ms", "300".to_owned())],
        )
    };
    up.script([limited()]);
    let started = Instant::now();
    assert_eq!(post(&gw, BODY).await.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited for Retry-After before retrying the same target"
    );

    up.script([limited(), limited()]);
    let resp = post(&gw, BODY).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
}

#[tokio::test]
async fn when_the_primary_tier_is_unreachable_the_fallback_tier_answers() {
    let up = Upstream::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let providers = format!(
        "{}---\n{}",
        provider(
            "primary",
            "openaiCompatible",
            &format!("http://{dead}/v1"),
            ""
        ),
        provider("fallback", "openaiCompatible", &up.base_url(), "")
    );
    let route = "  models: [gpt-4o]\n  targets: [{provider: primary, priority: 0}, {provider: fallback, priority: 1}]\n  retries: {attempts: 1, initialBackoff: 1ms, maxBackoff: 1ms}\n";
    let (gw, _dir) = start(&providers, route).await;
    let resp = post(&gw, BODY).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(up.received().len(), 1);
}

#[tokio::test]
async fn client_errors_from_the_upstream_are_relayed_unchanged_and_not_retried() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(
        &provider("up", "openaiCompatible", &up.base_url(), ""),
        &simple_route(""),
    )
    .await;
    let error = json!({"error": {"message": "max_tokens is too large", "type": "invalid_request_error", "param": "max_tokens", "code": null}});
    up.script([Reply::Json(400, error.clone(), vec![])]);
    let resp = post(&gw, BODY).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<Value>().await.unwrap(), error);
    assert_eq!(up.received().len(), 1);
}

#[tokio::test]
async fn an_upstream_refusing_the_gateways_credential_is_a_502_not_the_clients_401() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(
        &provider("up", "openaiCompatible", &up.base_url(), ""),
        &simple_route("  retries: {attempts: 0}\n"),
    )
    .await;
    up.script([Reply::Json(
        401,
        json!({"error": {"message": "Incorrect API key provided: sk-upst****"}}),
        vec![],
    )]);
    let resp = post(&gw, BODY).await;
    assert_eq!(resp.status(), 502);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("rejected the gateway's credentials") && !text.contains("sk-upst"),
        "{text}"
    );
}

#[tokio::test]
async fn an_upstream_that_never_answers_times_out_with_504() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(
        &provider(
            "up",
            "openaiCompatible",
            &up.base_url(),
            "  timeouts: {request: 300ms}\n",
        ),
        &simple_route("  retries: {attempts: 0}\n"),
    )
    .await;
    up.script([Reply::Hang]);
    let resp = post(&gw, BODY).await;
    assert_eq!(resp.status(), 504);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "upstream_timeout"
    );
}

#[tokio::test]
async fn streams_are_relayed_chunk_by_chunk_as_they_arrive() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(
        &provider("up", "openaiCompatible", &up.base_url(), ""),
        &simple_route(""),
    )
    .await;
    let feed = up.stream();
    feed.send(Bytes::from_static(
        b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
    ))
    .unwrap();
    let resp = post(
        &gw,
        &BODY.replace("\"temperature\"", "\"stream\": true, \"temperature\""),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    use futures_util::StreamExt;
    // The first chunk reaches the client while the upstream is still streaming: if the
    // gateway buffered, this would wait forever (bounded by the timeout).
    let first = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .expect("first chunk relayed before the stream ended");
    assert!(String::from_utf8_lossy(&first.unwrap().unwrap()).contains("Hel"));
    feed.send(Bytes::from_static(
        b"data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: [DONE]\n\n",
    ))
    .unwrap();
    drop(feed);
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn a_stream_that_goes_silent_ends_with_an_error_event_instead_of_a_silent_cut() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(
        &provider(
            "up",
            "openaiCompatible",
            &up.base_url(),
            "  timeouts: {streamIdle: 300ms}\n",
        ),
        &simple_route(""),
    )
    .await;
    let feed = up.stream();
    feed.send(Bytes::from_static(
        b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
    ))
    .unwrap();
    let resp = post(
        &gw,
        &BODY.replace("\"temperature\"", "\"stream\": true, \"temperature\""),
    )
    .await;
    let text = resp.text().await.unwrap();
    assert!(text.starts_with("data: {\"choices\""), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let event: Value = serde_json::from_str(last.trim_start_matches("data: ")).unwrap();
    assert_eq!(event["error"]["code"], "upstream_stream_error");
    drop(feed);
}

#[tokio::test]
async fn a_default_answer_shape_is_passed_through_for_non_streamed_calls() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(
        &provider("up", "openai", &up.base_url(), ""),
        &simple_route(""),
    )
    .await;
    up.script([Reply::Json(200, completion("gpt-4o", "exact"), vec![])]);
    let answer: Value = post(&gw, BODY).await.json().await.unwrap();
    assert_eq!(answer, completion("gpt-4o", "exact"));
}

#[tokio::test]
async fn embeddings_and_legacy_completions_go_to_their_own_upstream_paths() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(
        &provider("up", "openaiCompatible", &up.base_url(), ""),
        &simple_route(""),
    )
    .await;
    for (path, body) in [
        ("/v1/embeddings", r#"{"model":"gpt-4o","input":"hello"}"#),
        ("/v1/completions", r#"{"model":"gpt-4o","prompt":"hello"}"#),
    ] {
        let resp = client()
            .post(gw.url(path))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    let paths: Vec<String> = up
        .received()
        .iter()
        .map(|r| r.path_and_query.clone())
        .collect();
    assert_eq!(paths, ["/v1/embeddings", "/v1/completions"]);
}

#[tokio::test]
async fn a_failing_upstream_opens_its_circuit_and_a_later_probe_closes_it() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(
        &provider(
            "up",
            "openaiCompatible",
            &up.base_url(),
            "  circuitBreaker: {failureThreshold: 2, openDuration: 500ms}\n",
        ),
        &simple_route("  retries: {attempts: 0}\n"),
    )
    .await;
    up.script([
        Reply::Json(500, json!({"error": {"message": "down"}}), vec![]),
        Reply::Json(500, json!({"error": {"message": "down"}}), vec![]),
    ]);
    assert_eq!(post(&gw, BODY).await.status(), 502);
    assert_eq!(post(&gw, BODY).await.status(), 502);
    // Open: the upstream is not called at all.
    let resp = post(&gw, BODY).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "upstream_unavailable"
    );
    assert_eq!(up.received().len(), 2);
    // After the open duration one probe goes through; its success closes the circuit.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(post(&gw, BODY).await.status(), 200);
    assert_eq!(post(&gw, BODY).await.status(), 200);
    assert_eq!(up.received().len(), 4);
}

#[tokio::test]
async fn an_open_circuit_sends_traffic_to_the_fallback_without_waiting() {
    let up = Upstream::start().await;
    let spare = Upstream::start().await;
    let providers = format!(
        "{}---\n{}",
        provider(
            "primary",
            "openaiCompatible",
            &up.base_url(),
            "  circuitBreaker: {failureThreshold: 1, openDuration: 60s}\n"
        ),
        provider("fallback", "openaiCompatible", &spare.base_url(), "")
    );
    let route = "  models: [gpt-4o]\n  targets: [{provider: primary}, {provider: fallback, priority: 1}]\n  retries: {attempts: 1, initialBackoff: 1ms, maxBackoff: 1ms}\n";
    let (gw, _dir) = start(&providers, route).await;
    up.script([Reply::Json(
        503,
        json!({"error": {"message": "down"}}),
        vec![],
    )]);
    assert_eq!(
        post(&gw, BODY).await.status(),
        200,
        "first request falls back after the 503"
    );
    for _ in 0..3 {
        assert_eq!(post(&gw, BODY).await.status(), 200);
    }
    assert_eq!(up.received().len(), 1, "the open primary is skipped");
    assert_eq!(spare.received().len(), 4);
}

#[tokio::test]
async fn max_concurrency_caps_requests_in_flight_to_a_provider_streams_included() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(
        &provider(
            "up",
            "openaiCompatible",
            &up.base_url(),
            "  maxConcurrency: 1\n",
        ),
        &simple_route("  retries: {attempts: 0}\n"),
    )
    .await;
    let feed = up.stream();
    feed.send(Bytes::from_static(b"data: {}\n\n")).unwrap();
    let streaming = post(
        &gw,
        &BODY.replace("\"temperature\"", "\"stream\": true, \"temperature\""),
    )
    .await;
    assert_eq!(streaming.status(), 200);
    let second = post(&gw, BODY).await;
    assert_eq!(
        second.status(),
        503,
        "the only slot is held by the open stream"
    );
    assert_eq!(
        second.json::<Value>().await.unwrap()["error"]["code"],
        "upstream_unavailable"
    );
    drop(feed);
    let _ = streaming.text().await.unwrap();
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            post(&gw, BODY).await.status() == 200
        })
        .await,
        "the slot is freed when the stream ends"
    );
}

#[tokio::test]
async fn metrics_count_requests_attempts_and_circuit_state_with_bounded_labels() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(
        &provider(
            "up",
            "openaiCompatible",
            &up.base_url(),
            "  circuitBreaker: {failureThreshold: 1, openDuration: 60s}\n",
        ),
        &simple_route("  retries: {attempts: 0}\n"),
    )
    .await;
    assert_eq!(post(&gw, BODY).await.status(), 200);
    up.script([Reply::Json(
        500,
        json!({"error": {"message": "down"}}),
        vec![],
    )]);
    assert_eq!(post(&gw, BODY).await.status(), 502);
    assert_eq!(post(&gw, BODY).await.status(), 503);
    let metrics = gw.metrics().await;
    for line in [
        r#"tollgate_requests_total{operation="chat_completions",route="default/chat",provider="default/up",status="200"} 1"#,
        r#"tollgate_requests_total{operation="chat_completions",route="default/chat",provider="none",status="502"} 1"#,
        r#"tollgate_upstream_attempts_total{provider="default/up",outcome="success"} 1"#,
        r#"tollgate_upstream_attempts_total{provider="default/up",outcome="server_error"} 1"#,
        r#"tollgate_upstream_attempts_total{provider="default/up",outcome="circuit_open"} "#,
        r#"tollgate_circuit_state{target="default/up#gpt-4o"} 1"#,
        r#"tollgate_config_reloads_total{result="success"} 1"#,
        "tollgate_config_keys 1",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    assert!(metrics.contains("tollgate_request_duration_seconds_bucket"));
    assert!(metrics.contains("tollgate_config_info{config_hash="));
    assert!(
        !metrics.contains(KEY) && !metrics.contains(UPSTREAM_TOKEN),
        "no secrets in metrics"
    );
}

#[tokio::test]
async fn each_request_writes_one_access_log_line_without_secrets() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(
        &provider("up", "openaiCompatible", &up.base_url(), ""),
        &simple_route(""),
    )
    .await;
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-request-id", "trace-me-42")
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            gw.logs().contains("trace-me-42")
        })
        .await
    );
    let line = gw
        .logs()
        .lines()
        .find(|l| l.contains("trace-me-42"))
        .unwrap()
        .to_owned();
    let entry: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["target"], "tollgate::access");
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["route"], "default/chat");
    assert_eq!(entry["provider"], "default/up");
    assert_eq!(entry["owner"], "tests");
    assert_eq!(entry["key_id"].as_str().unwrap().len(), 24);
    assert!(!gw.logs().contains(KEY) && !gw.logs().contains(UPSTREAM_TOKEN));
    assert!(!gw.logs().contains("\"hi\""), "prompts are not logged");
}

#[tokio::test]
async fn a_stream_broken_mid_way_ends_with_an_error_event_and_is_not_retried() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(
        &provider("up", "openaiCompatible", &up.base_url(), ""),
        &simple_route(""),
    )
    .await;
    up.script([Reply::Broken(vec![Bytes::from_static(
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
    )])]);
    let resp = post(
        &gw,
        &BODY.replace("\"temperature\"", "\"stream\": true, \"temperature\""),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("Hel"), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let event: Value = serde_json::from_str(last.trim_start_matches("data: ")).unwrap();
    assert_eq!(event["error"]["code"], "upstream_stream_error");
    assert_eq!(
        up.received().len(),
        1,
        "nothing is retried once bytes reached the client"
    );
}

#[tokio::test]
async fn the_route_per_try_timeout_caps_each_attempt() {
    let up = Upstream::start().await;
    let spare = Upstream::start().await;
    let providers = format!(
        "{}---\n{}",
        provider("slow", "openaiCompatible", &up.base_url(), ""),
        provider("spare", "openaiCompatible", &spare.base_url(), "")
    );
    let route = "  models: [gpt-4o]\n  targets: [{provider: slow}, {provider: spare, priority: 1}]\n  retries: {attempts: 1, initialBackoff: 1ms, maxBackoff: 1ms}\n  timeouts: {perTry: 300ms, total: 10s}\n";
    let (gw, _dir) = start(&providers, route).await;
    up.script([Reply::Hang]);
    let started = std::time::Instant::now();
    assert_eq!(post(&gw, BODY).await.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the hung attempt was abandoned after perTry"
    );
    assert_eq!(spare.received().len(), 1);
}

#[tokio::test]
async fn http_version_http2_talks_h2c_to_the_upstream_and_the_default_is_http1() {
    // An h2c-only upstream: HTTP/1.1 requests fail there, so a 200 proves HTTP/2.
    let h2 = Upstream::start_h2c().await;
    let h1 = Upstream::start().await;
    let providers = format!(
        "{}---\n{}",
        provider(
            "up",
            "openaiCompatible",
            &h2.base_url(),
            "  httpVersion: http2\n"
        ),
        provider("plain", "openaiCompatible", &h1.base_url(), ""),
    );
    let route = "  models: [gpt-4o]\n  targets: [{provider: up}]\n";
    let (gw, dir) = start(&providers, route).await;
    let answer = post(&gw, r#"{"model":"gpt-4o","messages":[]}"#).await;
    assert_eq!(answer.status(), 200);
    // Streams too, on the same multiplexed connection.
    let tx = h2.stream();
    tx.send(Bytes::from_static(
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n",
    ))
    .unwrap();
    drop(tx);
    let streamed = post(&gw, r#"{"model":"gpt-4o","messages":[],"stream":true}"#).await;
    assert_eq!(streamed.status(), 200);
    assert!(streamed.text().await.unwrap().contains("\"hi\""));
    let seen: Vec<http::Version> = h2.received().iter().map(|r| r.version).collect();
    assert_eq!(seen, [http::Version::HTTP_2, http::Version::HTTP_2]);

    // The default (`http1`) is HTTP/1.1 with keep-alive.
    config(
        dir.path(),
        &providers,
        "  models: [gpt-4o]\n  targets: [{provider: plain}]\n",
    );
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            post(&gw, r#"{"model":"gpt-4o","messages":[]}"#)
                .await
                .status()
                == 200
                && !h1.received().is_empty()
        })
        .await
    );
    assert!(
        h1.received()
            .iter()
            .all(|r| r.version == http::Version::HTTP_11)
    );
}

#[tokio::test]
async fn no_retry_storm_when_every_upstream_fails_under_concurrent_load() {
    // Two failing targets, retries on, 100 clients at once: attempts stay within
    // 1 + retries per request, and once both circuits open, almost none reach upstream.
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let breaker = "  circuitBreaker: {failureThreshold: 5, openDuration: 60s}\n";
    let providers = format!(
        "{}---\n{}",
        provider("a", "openaiCompatible", &a.base_url(), breaker),
        provider("b", "openaiCompatible", &b.base_url(), breaker),
    );
    let route = "  models: [gpt-4o]\n  targets: [{provider: a}, {provider: b}]\n  retries: {attempts: 2, initialBackoff: 5ms, maxBackoff: 10ms}\n";
    let (gw, _dir) = start(&providers, route).await;
    for up in [&a, &b] {
        up.script(
            (0..1000).map(|_| Reply::Json(500, json!({"error": {"message": "down"}}), vec![])),
        );
    }
    let requests = 100;
    let mut calls = Vec::new();
    for _ in 0..requests {
        let gw = &gw;
        calls.push(async move {
            let resp = post(gw, r#"{"model":"gpt-4o","messages":[]}"#).await;
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.expect("a JSON error body");
            (status, body)
        });
    }
    let answers = futures_util::future::join_all(calls).await;
    for (status, body) in &answers {
        assert!(matches!(status, 502 | 503), "{status} {body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    let attempts = a.received().len() + b.received().len();
    assert!(
        attempts <= requests * 3,
        "attempts bounded by (1 + retries) per request: {attempts}"
    );
    let opened = answers.iter().filter(|(s, _)| *s == 503).count();
    assert!(opened > 0, "the circuits opened");
    // Later requests are not sent at all.
    let before = attempts;
    for _ in 0..20 {
        assert_eq!(
            post(&gw, r#"{"model":"gpt-4o","messages":[]}"#)
                .await
                .status(),
            503
        );
    }
    assert_eq!(
        a.received().len() + b.received().len(),
        before,
        "open circuits shed load"
    );
    eprintln!(
        "{requests} concurrent requests against two failing upstreams: {attempts} upstream attempts, {opened} answered 503 by open circuits"
    );
}

#[tokio::test]
async fn an_upstream_redirect_is_never_followed_and_never_carries_the_credential_away() {
    // The Provider's host answers 302 towards another host (think cloud metadata): that
    // host must see nothing, neither the credential nor the custom header nor the prompt.
    let elsewhere = Upstream::start().await;
    for status in [301, 302, 303, 307, 308] {
        let up = Upstream::start().await;
        up.script([Reply::Json(
            status,
            json!({"moved": true}),
            vec![(
                "location",
                format!("{}/chat/completions", elsewhere.base_url()),
            )],
        )]);
        let (gw, _dir) = start(
            &provider(
                "up",
                "openaiCompatible",
                &up.base_url(),
                "  headers: {x-custom-credential: custom-secret-0001}\n",
            ),
            &simple_route(
                "  retries: {attempts: 2, retryOn: [connectError, timeout, serverError]}\n",
            ),
        )
        .await;
        let resp = post(&gw, BODY).await;
        assert_eq!(resp.status(), 502, "HTTP {status}");
        let body: Value = resp.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("redirect"), "{body}");
        assert!(
            !message.contains(&elsewhere.base_url()),
            "the target is not echoed: {body}"
        );
        assert_eq!(up.received().len(), 1, "a redirect is not retried");
        assert!(
            elsewhere.received().is_empty(),
            "HTTP {status}: the redirect was followed: {:?}",
            elsewhere.received()
        );
        assert!(
            gw.metrics().await.contains("outcome=\"redirect\""),
            "HTTP {status}"
        );
    }
}

/// An upstream that answers every request with `status` and an error body echoing the
/// request's headers (as some servers and proxies do), in its message and elsewhere.
async fn echoing_upstream(status: u16) -> String {
    use axum::{extract::Request, response::IntoResponse};
    let app = axum::Router::new().fallback(move |request: Request| async move {
        let headers: serde_json::Map<String, Value> = request
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or_default())))
            .collect();
        let echoed = format!("{headers:?}");
        let body = json!({
            "error": {"message": format!("rejected; you sent {echoed}"), "type": "invalid_request_error", "code": "echo", "param": null},
            "request_headers": headers,
        });
        (
            http::StatusCode::from_u16(status).unwrap(),
            [("content-type", "application/json")],
            body.to_string(),
        )
            .into_response()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/v1")
}

#[tokio::test]
async fn upstream_errors_never_carry_the_providers_credential_or_headers_to_the_client() {
    const CUSTOM: &str = "custom-header-secret-value-0001";
    for status in [
        301, 302, 400, 401, 403, 404, 409, 413, 418, 422, 429, 500, 501, 503, 505, 529,
    ] {
        let base = echoing_upstream(status).await;
        let (gw, _dir) = start(
            &provider(
                "up",
                "openaiCompatible",
                &base,
                &format!("  headers: {{x-custom-credential: {CUSTOM}}}\n"),
            ),
            &simple_route("  retries: {attempts: 0}\n"),
        )
        .await;
        for stream in [false, true] {
            let body = json!({"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
            let resp = post(&gw, &body.to_string()).await;
            let code = resp.status().as_u16();
            assert!(code >= 400, "HTTP {status} became {code}");
            let text = resp.text().await.unwrap();
            for secret in [UPSTREAM_TOKEN, CUSTOM, &UPSTREAM_TOKEN[..12], &CUSTOM[..16]] {
                assert!(
                    !text.contains(secret),
                    "HTTP {status} (stream {stream}) relayed {secret:?}: {text}"
                );
            }
            let error: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{text}"));
            assert!(error["error"]["message"].is_string(), "{text}");
            assert!(error.get("request_headers").is_none(), "{text}");
        }
    }
}

#[tokio::test]
async fn a_provider_on_a_cloud_metadata_address_is_refused_unless_the_gateway_allows_it() {
    // Never called: the only traffic these tests send stays on this machine.
    let metadata = "http://169.254.169.254/latest";
    let dir = tempfile::tempdir().unwrap();
    config(
        dir.path(),
        &provider("up", "openaiCompatible", metadata, ""),
        &simple_route(""),
    );
    let gw = Gateway::start(&["--resources", dir.path().to_str().unwrap()]);
    let resp = post(&gw, BODY).await;
    assert_eq!(resp.status(), 404, "the route has no usable target");
    assert!(
        gw.logs().contains("--allow-link-local-upstreams"),
        "{}",
        gw.logs()
    );
    let models = |gw: &Gateway| {
        let url = gw.url("/v1/models");
        async move {
            client()
                .get(url)
                .bearer_auth(KEY)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()["data"]
                .as_array()
                .unwrap()
                .len()
        }
    };
    assert_eq!(models(&gw).await, 0);
    let allowed = Gateway::start(&[
        "--resources",
        dir.path().to_str().unwrap(),
        "--allow-link-local-upstreams",
    ]);
    assert_eq!(
        models(&allowed).await,
        2,
        "served when the operator of the gateway says so"
    );
}
