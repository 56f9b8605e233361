//! Model limits made real: a request that does not fit a model's context window or output
//! limit goes to a target of its route that can hold it (a context-window fallback, shown
//! in the route decision metric), or is refused with OpenAI's `context_length_exceeded`
//! (Anthropic's shape for Anthropic clients) before it reaches any upstream.

use crate::common;

use common::{Gateway, client, metric};
use serde_json::{Value, json};
use tollgate_testkit::emulated::{self, Emulated, Flavor};

const KEY: &str = "tg_modelLimitsTestsClientKey000000000000001";

async fn start() -> (Gateway, Emulated, tempfile::TempDir) {
    let up = Emulated::start(Flavor::ChatOnly).await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: up, labels: {{tollgate.dev/credential: 'true'}}}}\nstringData: {{token: {token}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: client-key}}\nstringData: {{apiKey: {KEY}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: client}}\nspec: {{owner: tests}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: up}}\nspec:\n  type: openaiCompatible\n  baseUrl: {url}\n\
         \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n  models:\n\
         \x20   - {{name: small, upstreamName: small-8k, contextWindow: 1000, maxOutputTokens: 256}}\n\
         \x20   - {{name: large, upstreamName: large-128k, contextWindow: 100000}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: chat}}\nspec:\n  models: [chat]\n\
         \x20 targets: [{{provider: up, model: small, priority: 0}}, {{provider: up, model: large, priority: 1}}]\n  retries: {{attempts: 0}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: only-small}}\nspec:\n  models: [only-small]\n\
         \x20 targets: [{{provider: up, model: small}}]\n",
        token = emulated::API_KEY,
        url = up.base_url(),
    );
    std::fs::write(dir.path().join("config.yaml"), text).unwrap();
    let gw = Gateway::start(&["--resources", dir.path().to_str().unwrap()]);
    (gw, up, dir)
}

async fn chat(gw: &Gateway, model: &str, prompt: &str, max_tokens: Option<u64>) -> (u16, Value) {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": prompt}]});
    if let Some(n) = max_tokens {
        body["max_tokens"] = json!(n);
    }
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn upstream_models(up: &Emulated) -> Vec<String> {
    up.received()
        .iter()
        .map(|r| r.json()["model"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn a_prompt_too_long_for_the_first_target_goes_to_one_whose_window_holds_it() {
    let (gw, up, _dir) = start().await;
    assert_eq!(chat(&gw, "chat", "short question", Some(100)).await.0, 200);
    // About 2,000 tokens: more than the small model's 1,000.
    let long = "word ".repeat(1_600);
    assert_eq!(chat(&gw, "chat", &long, Some(100)).await.0, 200);
    // More output than the small model generates.
    assert_eq!(chat(&gw, "chat", "short", Some(1_000)).await.0, 200);
    assert_eq!(
        upstream_models(&up),
        ["small-8k", "large-128k", "large-128k"]
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "tollgate_route_decisions_total{route=\"default/chat\",provider=\"default/up\",strategy=\"weighted\",reason=\"context_window\"}"
        ),
        2.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_request_no_target_can_hold_is_refused_before_any_upstream() {
    let (gw, up, _dir) = start().await;
    // About 120,000 tokens: beyond every window.
    let huge = "word ".repeat(100_000);
    let (status, error) = chat(&gw, "chat", &huge, Some(100)).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["code"], "context_length_exceeded");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("maximum context length is 100000 tokens"),
        "{message}"
    );

    let (status, error) = chat(&gw, "only-small", "short", Some(1_000)).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["param"], "max_tokens");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 256"),
        "{error}"
    );

    // An Anthropic client hears it in Anthropic's shape.
    let resp = client()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "chat", "max_tokens": 100, "messages": [{"role": "user", "content": huge}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let error: Value = resp.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(up.received().is_empty(), "nothing reached the upstream");
}

#[tokio::test]
async fn an_inline_image_counts_as_an_image_not_as_its_encoded_size() {
    let (gw, up, _dir) = start().await;
    // 400 KB of base64 is one picture (1,600 tokens: more than the small window holds),
    // not 100,000 tokens of text (more than the large window holds).
    let image = format!("data:image/png;base64,{}", "A".repeat(400_000));
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(
            &json!({"model": "chat", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": image}},
        ]}], "max_tokens": 10}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        upstream_models(&up),
        ["large-128k"],
        "1,600 image tokens exceed the small window"
    );
}
