//! The client-facing API of a standalone gateway running the examples: authentication,
//! model access, errors, the mock provider (plain and streamed), and protocol hygiene.

use crate::common;

use common::{DEV_KEY, Gateway, SEARCH_KEY, client, examples};
use serde_json::{Value, json};

fn standalone() -> Gateway {
    Gateway::start(&["--resources", examples().to_str().unwrap()])
}

async fn chat(gw: &Gateway, key: &str, body: Value) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn assert_openai_error(body: &Value, code: &str) {
    let error = &body["error"];
    assert_eq!(error["code"], code, "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(error.as_object().unwrap().contains_key("param"), "{body}");
}

#[tokio::test]
async fn readyz_reports_the_loaded_config_and_livez_answers() {
    let gw = standalone();
    let ready: Value = client()
        .get(gw.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["keys"], 5);
    assert_eq!(ready["configHash"].as_str().unwrap().len(), 64);
    let live = client().get(gw.url("/livez")).send().await.unwrap();
    assert_eq!(live.status(), 200);
}

#[tokio::test]
async fn models_lists_only_what_the_calling_key_may_use() {
    let gw = standalone();
    let ids = |key: &'static str| {
        let url = gw.url("/v1/models");
        async move {
            let body: Value = client()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(body["object"], "list");
            let mut ids: Vec<String> = body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned())
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(ids(DEV_KEY).await, ["demo-chat", "demo-embed"]);
    assert_eq!(
        ids(SEARCH_KEY).await,
        ["chat-default", "text-embedding-3-small"]
    );
}

#[tokio::test]
async fn missing_unknown_and_malformed_keys_get_the_same_401() {
    let gw = standalone();
    let body = json!({"model": "demo-chat", "messages": []});
    let mut answers = Vec::new();
    for auth in [
        None,
        Some("Bearer tg_not_a_real_key_at_all_000000"),
        Some("Basic Zm9vOmJhcg=="),
        Some("Bearer "),
    ] {
        let mut req = client().post(gw.url("/v1/chat/completions")).json(&body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401);
        let b: Value = resp.json().await.unwrap();
        assert_openai_error(&b, "invalid_api_key");
        answers.push(b);
    }
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "every 401 is identical"
    );
    assert!(
        !gw.logs().contains("tg_not_a_real_key"),
        "presented keys are never logged"
    );
}

#[tokio::test]
async fn x_api_key_header_authenticates_like_bearer() {
    let gw = standalone();
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .header("x-api-key", DEV_KEY)
        .json(&json!({"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_model_outside_the_keys_allow_list_is_403_and_an_unknown_model_404() {
    let gw = standalone();
    let resp = chat(&gw, DEV_KEY, json!({"model": "gpt-4o", "messages": []})).await;
    assert_eq!(resp.status(), 403);
    assert_openai_error(&resp.json().await.unwrap(), "model_not_allowed");
    let resp = chat(
        &gw,
        DEV_KEY,
        json!({"model": "no-such-model", "messages": []}),
    )
    .await;
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_openai_error(&body, "model_not_found");
    assert_eq!(body["error"]["param"], "model");
}

#[tokio::test]
async fn malformed_requests_get_400_with_a_useful_message() {
    let gw = standalone();
    for (raw, needle) in [
        ("{not json", "not valid JSON"),
        (r#"{"messages":[]}"#, "model parameter"),
        ("", "empty"),
    ] {
        let resp = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(DEV_KEY)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{raw}");
        let body: Value = resp.json().await.unwrap();
        assert_openai_error(&body, "invalid_request");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(needle),
            "{body}"
        );
    }
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_and_long_prompts_under_it_pass() {
    let gw = Gateway::start(&[
        "--resources",
        examples().to_str().unwrap(),
        "--max-body-bytes",
        "4096",
    ]);
    let long = "x".repeat(3000);
    let resp = chat(
        &gw,
        DEV_KEY,
        json!({"model": "demo-chat", "messages": [{"role": "user", "content": long}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let too_long = "x".repeat(5000);
    let resp = chat(
        &gw,
        DEV_KEY,
        json!({"model": "demo-chat", "messages": [{"role": "user", "content": too_long}]}),
    )
    .await;
    assert_eq!(resp.status(), 413);
    assert_openai_error(&resp.json().await.unwrap(), "request_too_large");
}

#[tokio::test]
async fn mock_chat_answers_in_openai_shape_deterministically() {
    let gw = standalone();
    let body = json!({"model": "demo-chat", "messages": [{"role": "user", "content": "Say hi"}]});
    let first: Value = chat(&gw, DEV_KEY, body.clone()).await.json().await.unwrap();
    let second: Value = chat(&gw, DEV_KEY, body).await.json().await.unwrap();
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(first["model"], "demo-chat");
    assert_eq!(first["choices"][0]["message"]["role"], "assistant");
    assert_eq!(first["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        first["choices"][0]["message"]["content"],
        second["choices"][0]["message"]["content"]
    );
    assert_eq!(
        first["usage"]["completion_tokens"], 24,
        "the example mock answers 24 tokens"
    );
    let u = &first["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + 24)
    );
}

/// Parses an SSE body into its `data:` payloads.
fn sse_data(text: &str) -> Vec<String> {
    assert!(text.ends_with("\n\n"), "events end with a blank line");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("data frame").to_owned())
        .collect()
}

#[tokio::test]
async fn streamed_chat_relays_sse_chunks_ending_in_done_with_usage_only_when_asked() {
    let gw = standalone();
    let resp = chat(&gw, DEV_KEY, json!({"model": "demo-chat", "stream": true, "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = sse_data(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c.get("usage").is_none())
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!text.is_empty());
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );

    let resp = chat(
        &gw,
        DEV_KEY,
        json!({"model": "demo-chat", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let events = sse_data(&resp.text().await.unwrap());
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 24);
}

#[tokio::test]
async fn request_ids_are_honoured_and_echoed_or_generated() {
    let gw = standalone();
    let resp = client()
        .get(gw.url("/v1/models"))
        .bearer_auth(DEV_KEY)
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "abc-123");
    let resp = client()
        .get(gw.url("/v1/models"))
        .bearer_auth(DEV_KEY)
        .send()
        .await
        .unwrap();
    let generated = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(
        generated.starts_with("req_") && generated.len() > 10,
        "{generated}"
    );
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
}

#[tokio::test]
async fn unknown_paths_get_an_openai_style_404() {
    let gw = standalone();
    let resp = client()
        .get(gw.url("/v1/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_openai_error(&resp.json().await.unwrap(), "unknown_url");
}

#[tokio::test]
async fn cors_is_closed_by_default_and_open_only_to_configured_origins() {
    let closed = standalone();
    let resp = client()
        .request(reqwest::Method::OPTIONS, closed.url("/v1/models"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());

    let open = Gateway::start(&[
        "--resources",
        examples().to_str().unwrap(),
        "--cors-origins",
        "https://app.example.com",
    ]);
    let preflight = |origin: &'static str| {
        let url = open.url("/v1/models");
        async move {
            client()
                .request(reqwest::Method::OPTIONS, url)
                .header("origin", origin)
                .header("access-control-request-method", "GET")
                .send()
                .await
                .unwrap()
        }
    };
    let allowed = preflight("https://app.example.com").await;
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let other = preflight("https://evil.example.com").await;
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn clients_that_trickle_headers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::start(&[
        "--resources",
        examples().to_str().unwrap(),
        "--header-read-timeout",
        "300ms",
    ]);
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    socket
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the connection is closed once the header deadline passes"
    );
}

#[tokio::test]
async fn bodies_that_arrive_too_slowly_get_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::start(&[
        "--resources",
        examples().to_str().unwrap(),
        "--body-read-timeout",
        "300ms",
    ]);
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {DEV_KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\""
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        socket.read_to_end(&mut response),
    )
    .await;
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
}

#[tokio::test]
async fn every_answer_reports_the_gateways_own_overhead_and_logs_it() {
    let gw = standalone();
    let started = std::time::Instant::now();
    let resp = chat(
        &gw,
        DEV_KEY,
        json!({"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let total_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(resp.status(), 200);
    let overhead: f64 = resp.headers()["x-tollgate-overhead-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The mock provider waits 20 ms before answering: upstream time, not overhead.
    assert!(overhead >= 0.0, "{overhead}");
    assert!(
        overhead + 20.0 <= total_ms,
        "overhead {overhead} ms excludes the upstream's 20 ms (total {total_ms} ms)"
    );
    // Errors carry it too, in either API shape.
    let resp = chat(
        &gw,
        "tg_unknown_key_000000000000000000",
        json!({"model": "demo-chat", "messages": []}),
    )
    .await;
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().contains_key("x-tollgate-overhead-ms"));
    let resp = client()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", "tg_unknown_key_000000000000000000")
        .json(&json!({"model": "demo-chat", "max_tokens": 5, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().contains_key("x-tollgate-overhead-ms"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["type"], "error", "Anthropic's shape: {body}");

    // The access line: one JSON object per request with the figures.
    let line = common::eventually_value(
        || async {
            gw.logs()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v["message"] == "request" && v["status"] == 200)
        },
        Option::is_some,
    )
    .await
    .expect("an access line");
    let logs = gw.logs();
    for field in [
        "request_id",
        "key_id",
        "owner",
        "route",
        "provider",
        "model",
        "latency_ms",
        "overhead_ms",
        "attempts",
        "input_tokens",
        "output_tokens",
        "cost",
    ] {
        assert!(!line[field].is_null(), "access line lacks {field}: {line}");
    }
    assert_eq!(line["attempts"], 1);
    assert!(line["overhead_ms"].as_f64().unwrap() <= line["latency_ms"].as_f64().unwrap());
    assert!(!logs.contains(DEV_KEY), "keys are never logged");
}
