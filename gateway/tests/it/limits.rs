//! Per-key limits and budgets through the real gateway: requests, tokens and concurrency
//! per key and route, budgets that concurrent spending cannot overshoot, OpenAI's
//! rate-limit headers (on streams too), and usage taken from answers and streams.

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::{
    Gateway, client, eventually, metric,
    upstream::{Reply, Upstream, completion},
};
use futures_util::StreamExt;
use serde_json::{Value, json};

const KEY: &str = "tg_limitsTestsClientKey0000000000000000001";

/// A gateway with one openaiCompatible provider at `upstream` (prices per million tokens
/// as given), a route `chat` serving `gpt-4o` with `route_extra`, and a key with `key_spec`.
fn start(
    upstream: &Upstream,
    prices: (f64, f64),
    key_spec: &str,
    route_extra: &str,
) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: up, labels: {{tollgate.dev/credential: 'true'}}}}\nstringData: {{token: sk-up}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: client-key}}\nstringData: {{apiKey: {KEY}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: client}}\nspec:\n  owner: team-a\n{key_spec}---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: up}}\nspec:\n  type: openaiCompatible\n  baseUrl: {}\n\
         \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n\
         \x20 models: [{{name: gpt-4o, pricing: {{inputPerMillion: {}, outputPerMillion: {}}}}}]\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: chat}}\nspec:\n  models: [gpt-4o]\n  targets: [{{provider: up}}]\n  retries: {{attempts: 0}}\n{route_extra}",
        upstream.base_url(),
        prices.0,
        prices.1
    );
    std::fs::write(dir.path().join("config.yaml"), text).unwrap();
    let gw = Gateway::start(&["--resources", dir.path().to_str().unwrap()]);
    (gw, dir)
}

async fn chat(gw: &Gateway, extra: Value) -> reqwest::Response {
    let mut body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn requests_per_minute_are_enforced_with_openai_rate_limit_headers() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(&up, (0.0, 0.0), "  limits: {requestsPerMinute: 2}\n", "");
    let first = chat(&gw, json!({})).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-ratelimit-limit-requests"], "2");
    assert_eq!(first.headers()["x-ratelimit-remaining-requests"], "1");
    assert!(first.headers().contains_key("x-ratelimit-reset-requests"));
    assert_eq!(chat(&gw, json!({})).await.status(), 200);

    let refused = chat(&gw, json!({})).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused.headers()["retry-after"],
        "30",
        "one request refills every 30 s at 2/min"
    );
    assert_eq!(refused.headers()["x-ratelimit-remaining-requests"], "0");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(
        up.received().len(),
        2,
        "refused requests never reach the upstream"
    );
    assert!(
        gw.metrics()
            .await
            .contains(r#"tollgate_limit_rejections_total{limit="requests",scope="key"} 1"#)
    );
}

#[tokio::test]
async fn route_wide_limits_apply_to_every_key() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(&up, (0.0, 0.0), "", "  rateLimit: {requestsPerMinute: 1}\n");
    assert_eq!(chat(&gw, json!({})).await.status(), 200);
    let refused = chat(&gw, json!({})).await;
    assert_eq!(refused.status(), 429);
    assert!(refused.text().await.unwrap().contains("this route"));
}

#[tokio::test]
async fn token_reservations_are_refunded_to_the_actual_usage() {
    let up = Upstream::start().await;
    // Each request reserves about 1000 tokens (max_tokens) but uses 7 (the upstream's usage).
    let (gw, _dir) = start(&up, (0.0, 0.0), "  limits: {tokensPerMinute: 2500}\n", "");
    for i in 0..10 {
        let resp = chat(&gw, json!({"max_tokens": 1000})).await;
        assert_eq!(
            resp.status(),
            200,
            "request {i}: refunds keep the minute's allowance available"
        );
    }
    // A request whose reservation does not fit right now is refused.
    let big = chat(&gw, json!({"max_tokens": 2490})).await;
    assert_eq!(big.status(), 429);
    assert_eq!(
        big.json::<Value>().await.unwrap()["error"]["message"],
        "Rate limit reached: too many tokens per minute for this API key."
    );
}

#[tokio::test]
async fn a_budget_is_never_overspent_and_exhaustion_is_insufficient_quota() {
    let up = Upstream::start().await;
    // $1000 per million tokens = $0.001 per token; each answer uses 5 + 2 tokens = $0.007.
    let (gw, _dir) = start(
        &up,
        (1000.0, 1000.0),
        "  budget: {amount: 0.05, period: daily}\n",
        "",
    );
    let mut admitted = 0;
    let refused = loop {
        let resp = chat(&gw, json!({"max_tokens": 5})).await;
        if resp.status() != 200 {
            break resp;
        }
        admitted += 1;
        assert!(admitted < 50, "the budget never ran out");
    };
    assert_eq!(refused.status(), 429);
    assert!(
        refused.headers().contains_key("retry-after"),
        "a daily budget resets at midnight UTC"
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_quota");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("budget")
    );
    let metrics = gw.metrics().await;
    let spent = metric(&metrics, "tollgate_cost_total{");
    assert!(spent <= 0.05 + 1e-9, "spent {spent} of a 0.05 budget");
    assert!(
        (spent - admitted as f64 * 0.007).abs() < 1e-9,
        "cost settles to the actual usage: {spent} for {admitted}"
    );
    assert_eq!(
        metric(&metrics, "tollgate_tokens_total{") as u64,
        admitted * 7
    );
}

#[tokio::test]
async fn concurrency_leases_cover_streams_and_are_released_when_the_client_disconnects() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(&up, (0.0, 0.0), "  limits: {maxConcurrent: 1}\n", "");
    let feed = up.stream();
    feed.send(Bytes::from_static(
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n",
    ))
    .unwrap();
    let streaming = chat(&gw, json!({"stream": true})).await;
    assert_eq!(streaming.status(), 200);
    let mut body = streaming.bytes_stream();
    assert!(body.next().await.is_some());

    let refused = chat(&gw, json!({})).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused.json::<Value>().await.unwrap()["error"]["message"],
        "Too many concurrent requests for this API key."
    );

    // The client walks away mid-stream: the upstream call is cancelled, the lease is
    // released and the tokens seen are billed.
    drop(body);
    assert!(
        eventually(Duration::from_secs(5), || async {
            feed.send(Bytes::from_static(b": ping\n\n")).is_err()
        })
        .await,
        "the upstream stream is dropped promptly"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            chat(&gw, json!({})).await.status() == 200
        })
        .await
    );
    assert!(
        metric(
            &gw.metrics().await,
            r#"tollgate_tokens_total{route="default/chat",provider="default/up",model="gpt-4o",owner="team-a",kind="output"}"#
        ) >= 1.0
    );
    drop(feed);
}

#[tokio::test]
async fn stream_usage_is_requested_for_accounting_but_only_shown_when_the_client_asked() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(&up, (0.0, 0.0), "  limits: {tokensPerMinute: 100000}\n", "");
    let feed = up.stream();
    for data in [
        r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}],"usage":null}"#,
        r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#,
        r#"{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":40,"completion_tokens":2,"total_tokens":42}}"#,
        "[DONE]",
    ] {
        feed.send(Bytes::from(format!("data: {data}\n\n"))).unwrap();
    }
    drop(feed);
    let resp = chat(&gw, json!({"stream": true})).await;
    assert!(
        resp.headers().contains_key("x-ratelimit-remaining-tokens"),
        "rate-limit headers on streams too"
    );
    let text = resp.text().await.unwrap();
    assert!(
        !text.contains("prompt_tokens"),
        "the injected usage chunk is not shown: {text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_eq!(
        up.received()[0].json()["stream_options"],
        json!({"include_usage": true})
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"tollgate_tokens_total{route="default/chat",provider="default/up",model="gpt-4o",owner="team-a",kind="input"}"#
        ),
        40.0
    );
    assert_eq!(
        metric(
            &metrics,
            r#"tollgate_tokens_total{route="default/chat",provider="default/up",model="gpt-4o",owner="team-a",kind="output"}"#
        ),
        2.0
    );
}

#[tokio::test]
async fn unlimited_keys_are_not_throttled_and_their_usage_is_still_counted() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(&up, (2.0, 8.0), "", "");
    up.script([Reply::Json(200, completion("gpt-4o", "x"), vec![])]);
    let resp = chat(&gw, json!({})).await;
    assert_eq!(resp.status(), 200);
    assert!(!resp.headers().contains_key("x-ratelimit-limit-requests"));
    let metrics = gw.metrics().await;
    assert_eq!(metric(&metrics, "tollgate_tokens_total{") as u64, 7);
    let cost = metric(&metrics, "tollgate_cost_total{");
    assert!(
        (cost - (5.0 * 2.0 + 2.0 * 8.0) / 1e6).abs() < 1e-12,
        "{cost}"
    );
}
