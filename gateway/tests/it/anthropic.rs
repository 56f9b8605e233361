//! Anthropic in both directions: OpenAI clients calling Anthropic models (translated
//! requests, answers and streams), and Anthropic clients on `/v1/messages` calling
//! Anthropic (untouched), OpenAI-style upstreams and the mock (translated).

use crate::common;

use bytes::Bytes;
use common::{
    DEV_KEY, Gateway, client, examples,
    upstream::{Reply, Upstream},
};
use futures_util::StreamExt;
use serde_json::{Value, json};

const KEY: &str = "tg_anthropicTestsClientKey000000000000001";
const TOKEN: &str = "sk-ant-upstream-token";

fn start(kind: &str, base_url: &str) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let extra = if kind == "anthropic" {
        "  anthropic: {version: \"2023-06-01\"}\n"
    } else {
        ""
    };
    let text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: up, labels: {{tollgate.dev/credential: 'true'}}}}\nstringData: {{token: {TOKEN}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: client-key}}\nstringData: {{apiKey: {KEY}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: client}}\nspec: {{owner: tests}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: up}}\nspec:\n  type: {kind}\n  baseUrl: {base_url}\n\
         \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n{extra}  models: [{{name: smart, upstreamName: upstream-smart-2025}}]\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: smart}}\nspec:\n  models: [smart]\n  targets: [{{provider: up}}]\n  retries: {{attempts: 0}}\n"
    );
    std::fs::write(dir.path().join("config.yaml"), text).unwrap();
    let gw = Gateway::start(&["--resources", dir.path().to_str().unwrap()]);
    (gw, dir)
}

async fn call(gw: &Gateway, path: &str, body: Value) -> reqwest::Response {
    client()
        .post(gw.url(path))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn anthropic_message(text: &str) -> Value {
    json!({
        "id": "msg_01", "type": "message", "role": "assistant", "model": "upstream-smart-2025",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 11, "output_tokens": 3},
    })
}

fn anthropic_event(name: &str, data: Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

#[tokio::test]
async fn an_openai_chat_call_reaches_anthropic_translated_and_comes_back_as_a_chat_completion() {
    let up = Upstream::start().await;
    let (gw, _dir) = start("anthropic", &up.base_url());
    up.script([Reply::Json(200, anthropic_message("Bonjour"), vec![])]);
    let resp = call(
        &gw,
        "/v1/chat/completions",
        json!({"model": "smart", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], "smart");
    assert_eq!(answer["choices"][0]["message"]["content"], "Bonjour");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer["usage"]["total_tokens"], 14);

    let seen = &up.received()[0];
    assert_eq!(seen.path_and_query, "/v1/messages");
    assert_eq!(seen.headers["x-api-key"], TOKEN);
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
    let sent = seen.json();
    assert_eq!(sent["model"], "upstream-smart-2025");
    assert_eq!(sent["system"], "Be brief.");
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    );
    assert_eq!(sent["max_tokens"], 4096);
}

#[tokio::test]
async fn an_anthropic_stream_becomes_openai_chunks_with_usage_and_done() {
    let up = Upstream::start().await;
    let (gw, _dir) = start("anthropic", &up.base_url());
    let feed = up.stream();
    for (name, data) in [
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 7, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping", json!({"type": "ping"})),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ] {
        feed.send(anthropic_event(name, data)).unwrap();
    }
    drop(feed);
    let resp = call(
        &gw,
        "/v1/chat/completions",
        json!({"model": "smart", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    let payloads: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap())
        .collect();
    assert_eq!(*payloads.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Hello");
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "stop"
    );
    assert_eq!(
        chunks[chunks.len() - 1]["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9})
    );
    assert_eq!(up.received()[0].json()["stream"], true);
}

#[tokio::test]
async fn anthropic_errors_reach_openai_clients_in_openai_shape() {
    let up = Upstream::start().await;
    let (gw, _dir) = start("anthropic", &up.base_url());
    up.script([Reply::Json(400, json!({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: too large"}}), vec![])]);
    let resp = call(
        &gw,
        "/v1/chat/completions",
        json!({"model": "smart", "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["message"], "max_tokens: too large");
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn anthropic_clients_reach_anthropic_with_their_bytes_untouched_but_the_model_renamed() {
    let up = Upstream::start().await;
    let (gw, _dir) = start("anthropic", &up.base_url());
    up.script([Reply::Json(200, anthropic_message("Hi there"), vec![])]);
    let request = json!({"model": "smart", "max_tokens": 20, "messages": [{"role": "user", "content": "Hello"}]});
    let resp = call(&gw, "/v1/messages", request.clone()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        anthropic_message("Hi there"),
        "relayed as the upstream sent it"
    );
    let mut sent = up.received()[0].json();
    assert_eq!(sent["model"], "upstream-smart-2025");
    sent["model"] = json!("smart");
    assert_eq!(sent, request);
}

#[tokio::test]
async fn anthropic_clients_reach_openai_style_upstreams_through_translation() {
    let up = Upstream::start().await;
    let (gw, _dir) = start("openaiCompatible", &up.base_url());
    let resp = call(
        &gw,
        "/v1/messages",
        json!({"model": "smart", "max_tokens": 20, "system": "Be kind.", "messages": [{"role": "user", "content": "Hello"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let message: Value = resp.json().await.unwrap();
    assert_eq!(message["type"], "message");
    assert_eq!(message["model"], "smart");
    assert_eq!(
        message["content"],
        json!([{"type": "text", "text": "upstream says hi"}])
    );
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(
        message["usage"],
        json!({"input_tokens": 5, "output_tokens": 2})
    );
    let seen = &up.received()[0];
    assert_eq!(seen.path_and_query, "/v1/chat/completions");
    assert_eq!(
        seen.json()["messages"][0],
        json!({"role": "system", "content": "Be kind."})
    );

    // Streaming: OpenAI chunks upstream, Anthropic events to the client.
    let feed = up.stream();
    for data in [
        r#"{"id":"c1","choices":[{"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
        r#"{"id":"c1","choices":[{"delta":{"content":"Yo"},"finish_reason":null}]}"#,
        r#"{"id":"c1","choices":[{"delta":{},"finish_reason":"stop"}]}"#,
        r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#,
        "[DONE]",
    ] {
        feed.send(Bytes::from(format!("data: {data}\n\n"))).unwrap();
    }
    drop(feed);
    let resp = call(&gw, "/v1/messages", json!({"model": "smart", "max_tokens": 20, "stream": true, "messages": [{"role": "user", "content": "Hi"}]})).await;
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert!(text.contains("\"text\":\"Yo\""));
    assert_eq!(
        up.received()[1].json()["stream_options"],
        json!({"include_usage": true})
    );
}

#[tokio::test]
async fn messages_on_the_mock_and_errors_come_in_anthropic_shape() {
    let gw = Gateway::start(&["--resources", examples().to_str().unwrap()]);
    let resp = client()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", DEV_KEY)
        .json(&json!({"model": "demo-chat", "max_tokens": 50, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let message: Value = resp.json().await.unwrap();
    assert_eq!(message["type"], "message");
    assert!(
        message["content"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("[mock ")
    );
    assert_eq!(message["usage"]["output_tokens"], 24);

    let resp = client()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", "tg_nope_nope_nope_nope_nope")
        .json(&json!({"model": "demo-chat", "max_tokens": 5, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "authentication_error");

    let resp = client()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", DEV_KEY)
        .json(&json!({"model": "nope", "max_tokens": 5, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["type"],
        "not_found_error"
    );
}
