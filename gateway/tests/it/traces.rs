//! OpenTelemetry export, received by an in-test OTLP/HTTP server: the span tree and GenAI
//! attributes of a plain, a streamed, a retried and a cached request, and W3C trace
//! context continued from the client and propagated to the upstream.

use crate::common;

use bytes::Bytes;
use common::{
    Gateway, client,
    otlp::{Receiver, Span},
    upstream::{Reply, Upstream},
};
use serde_json::{Value, json};

const KEY: &str = "tg_tracingTestKey00000000000000000000000001";
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
const PROMPT: &str = "a private prompt";

fn config(dir: &std::path::Path, upstream: &Upstream) {
    let text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: up, labels: {{tollgate.dev/credential: 'true'}}}}\nstringData: {{token: sk-up}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: up}}\nspec:\n  type: openaiCompatible\n  baseUrl: {}\n\
         \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n\
         \x20 models: [{{name: gpt-4o, pricing: {{inputPerMillion: 1000, outputPerMillion: 1000}}}}]\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: chat}}\nspec:\n  models: [gpt-4o]\n  targets: [{{provider: up}}]\n\
         \x20 retries: {{attempts: 1, initialBackoff: 10ms, maxBackoff: 10ms}}\n  cache: {{ttl: 1m}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: main}}\nspec: {{owner: team-a}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: main-key}}\nstringData: {{apiKey: {KEY}}}\n",
        upstream.base_url()
    );
    std::fs::write(dir.join("config.yaml"), text).unwrap();
}

async fn chat(gw: &Gateway, extra: Value, traceparent: Option<&str>) -> u16 {
    let mut body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": PROMPT}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let mut request = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body);
    if let Some(tp) = traceparent {
        request = request.header("traceparent", tp);
    }
    let resp = request.send().await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.bytes().await;
    status
}

fn in_trace<'a>(spans: &'a [Span], trace: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.trace_id == trace).collect()
}

fn named<'a>(spans: &[&'a Span], name: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .copied()
        .filter(|s| s.name == name || s.name.starts_with(&format!("{name} ")))
        .collect()
}

#[tokio::test]
async fn requests_export_span_trees_with_genai_attributes_and_propagate_trace_context() {
    let receiver = Receiver::start().await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), &upstream);
    let endpoint = receiver.endpoint();
    let gw = Gateway::start_with_env(
        &["--resources", dir.path().to_str().unwrap()],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_SERVICE_NAME", "tollgate-test"),
        ],
    );

    // 1. Plain, continuing the client's trace.
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    assert_eq!(chat(&gw, json!({}), Some(&traceparent)).await, 200);
    let spans = receiver
        .wait_for(|s| {
            in_trace(s, CLIENT_TRACE)
                .iter()
                .any(|s| s.name.starts_with("POST "))
        })
        .await;
    let trace = in_trace(&spans, CLIENT_TRACE);
    let request = named(&trace, "POST")[0];
    assert_eq!(request.name, "POST /v1/chat/completions");
    assert_eq!(request.kind, "SPAN_KIND_SERVER");
    assert_eq!(
        request.parent_span_id, CLIENT_SPAN,
        "continues the caller's span"
    );
    assert_eq!(
        request.resource.get("service.name"),
        Some(&common::otlp::Attr::Str("tollgate-test".into()))
    );
    assert_eq!(request.str("gen_ai.operation.name"), Some("chat"));
    assert_eq!(request.str("gen_ai.request.model"), Some("gpt-4o"));
    assert_eq!(request.str("gen_ai.response.model"), Some("gpt-4o"));
    assert_eq!(request.int("gen_ai.usage.input_tokens"), Some(5));
    assert_eq!(request.int("gen_ai.usage.output_tokens"), Some(2));
    assert_eq!(request.str("tollgate.owner"), Some("team-a"));
    assert_eq!(request.str("tollgate.route"), Some("default/chat"));
    assert_eq!(request.str("tollgate.provider"), Some("default/up"));
    assert_eq!(
        request.str("tollgate.key_id"),
        Some(tollgate_api::compile::key_id("default", "main").as_str())
    );
    assert_eq!(request.int("http.response.status_code"), Some(200));
    assert!(
        matches!(request.attributes.get("tollgate.cost"), Some(common::otlp::Attr::Double(c)) if (c - 0.007).abs() < 1e-9)
    );
    assert!(request.attributes.contains_key("tollgate.overhead_ms"));
    for child in ["admission", "cache lookup"] {
        let s = named(&trace, child);
        assert_eq!(s.len(), 1, "{child}");
        assert_eq!(
            s[0].parent_span_id, request.span_id,
            "{child} is a child of the request"
        );
    }
    let attempts = named(&trace, "chat");
    assert_eq!(attempts.len(), 1);
    let attempt = attempts[0];
    assert_eq!(attempt.name, "chat gpt-4o");
    assert_eq!(attempt.kind, "SPAN_KIND_CLIENT");
    assert_eq!(attempt.parent_span_id, request.span_id);
    assert_eq!(attempt.str("gen_ai.provider.name"), Some("openai"));
    assert_eq!(attempt.int("tollgate.attempt"), Some(1));
    assert_eq!(
        attempt.int("tollgate.tier"),
        Some(0),
        "the first tier, not a fallback"
    );
    // The routing decision: the default strategy, and why this target came first.
    assert_eq!(attempt.str("tollgate.strategy"), Some("weighted"));
    assert_eq!(attempt.str("tollgate.route_reason"), Some("weighted"));
    assert_eq!(attempt.int("http.response.status_code"), Some(200));
    // The upstream got the trace, parented on the attempt's span.
    let sent = upstream.received()[0].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(sent, format!("00-{CLIENT_TRACE}-{}-01", attempt.span_id));

    // 2. Streamed: a stream span, child of the attempt, carries the usage.
    let feed = upstream.stream();
    for data in [
        r#"{"id":"s","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#,
        r#"{"id":"s","object":"chat.completion.chunk","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":6,"completion_tokens":1,"total_tokens":7}}"#,
        "[DONE]",
    ] {
        feed.send(Bytes::from(format!("data: {data}\n\n"))).unwrap();
    }
    drop(feed);
    let stream_trace = "11111111111111111111111111111111";
    assert_eq!(
        chat(
            &gw,
            json!({"stream": true}),
            Some(&format!("00-{stream_trace}-{CLIENT_SPAN}-01"))
        )
        .await,
        200
    );
    let spans = receiver
        .wait_for(|s| named(&in_trace(s, stream_trace), "stream").len() == 1)
        .await;
    let trace = in_trace(&spans, stream_trace);
    let stream = named(&trace, "stream")[0];
    let attempt = named(&trace, "chat")[0];
    assert_eq!(stream.parent_span_id, attempt.span_id);
    assert_eq!(stream.int("gen_ai.usage.input_tokens"), Some(6));
    assert_eq!(stream.int("gen_ai.usage.output_tokens"), Some(1));

    // 3. Retried: the first attempt fails, the second says why it is a retry.
    upstream.script([Reply::Json(
        503,
        json!({"error": {"message": "overloaded"}}),
        vec![],
    )]);
    let retry_trace = "22222222222222222222222222222222";
    assert_eq!(
        chat(
            &gw,
            json!({"temperature": 0.3}),
            Some(&format!("00-{retry_trace}-{CLIENT_SPAN}-01"))
        )
        .await,
        200
    );
    let spans = receiver
        .wait_for(|s| {
            named(&in_trace(s, retry_trace), "chat").len() == 2
                && named(&in_trace(s, retry_trace), "POST").len() == 1
        })
        .await;
    let trace = in_trace(&spans, retry_trace);
    let mut attempts = named(&trace, "chat");
    attempts.sort_by_key(|s| s.int("tollgate.attempt"));
    assert_eq!(attempts.len(), 2, "{trace:#?}");
    assert_eq!(attempts[0].str("error.type"), Some("server_error"));
    assert_eq!(
        attempts[0].status_code, 2,
        "a failed attempt is an error span"
    );
    assert_eq!(
        attempts[1].str("tollgate.retry_reason"),
        Some("server_error")
    );
    assert_eq!(attempts[1].int("tollgate.attempt"), Some(2));

    // 4. Cached: the same request again is answered from the cache, with no attempt.
    let cached_trace = "33333333333333333333333333333333";
    assert_eq!(
        chat(
            &gw,
            json!({}),
            Some(&format!("00-{cached_trace}-{CLIENT_SPAN}-01"))
        )
        .await,
        200
    );
    let spans = receiver
        .wait_for(|s| named(&in_trace(s, cached_trace), "POST").len() == 1)
        .await;
    let trace = in_trace(&spans, cached_trace);
    assert_eq!(named(&trace, "POST")[0].str("tollgate.cache"), Some("hit"));
    assert!(
        named(&trace, "chat").is_empty(),
        "no upstream attempt on a hit"
    );

    // Without a traceparent the gateway starts a trace; the access line names it.
    assert_eq!(chat(&gw, json!({"temperature": 0.9}), None).await, 200);
    let line = common::eventually_value(
        || async {
            gw.logs()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v["message"] == "request")
                .nth(4)
        },
        Option::is_some,
    )
    .await
    .expect("the fifth access line");
    let trace_id = line["trace_id"].as_str().unwrap();
    assert_eq!(trace_id.len(), 32);
    assert!(
        receiver
            .wait_for(|s| s.iter().any(|s| s.trace_id == trace_id))
            .await
            .iter()
            .any(|s| s.trace_id == trace_id)
    );

    // Prompts and keys are never recorded.
    let everything = format!("{:?}", receiver.spans());
    assert!(
        !everything.contains(PROMPT) && !everything.contains(KEY) && !everything.contains("sk-up")
    );
}

#[tokio::test]
async fn without_an_endpoint_nothing_is_exported_but_the_callers_trace_still_reaches_the_upstream()
{
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), &upstream);
    let gw = Gateway::start(&["--resources", dir.path().to_str().unwrap()]);
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    assert_eq!(chat(&gw, json!({}), Some(&traceparent)).await, 200);
    let sent = upstream.received()[0].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(sent, traceparent, "passed through unchanged");
    assert!(!gw.logs().contains("exporting traces"));
    // The log is read from the process asynchronously: wait for the line.
    let line = common::eventually_value(
        || async {
            gw.logs()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v["message"] == "request")
        },
        Option::is_some,
    )
    .await
    .expect("an access line");
    assert_eq!(line["trace_id"], CLIENT_TRACE);
}

#[tokio::test]
async fn traces_export_over_grpc_too() {
    let receiver = Receiver::start_grpc().await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), &upstream);
    let endpoint = receiver.endpoint();
    let gw = Gateway::start_with_env(
        &["--resources", dir.path().to_str().unwrap()],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    );
    let trace = "44444444444444444444444444444444";
    assert_eq!(
        chat(
            &gw,
            json!({}),
            Some(&format!("00-{trace}-{CLIENT_SPAN}-01"))
        )
        .await,
        200
    );
    let spans = receiver.wait_for(|s| in_trace(s, trace).len() >= 4).await;
    let in_it = in_trace(&spans, trace);
    let request = named(&in_it, "POST");
    assert_eq!(request.len(), 1, "{spans:#?}");
    assert_eq!(request[0].str("gen_ai.request.model"), Some("gpt-4o"));
    assert_eq!(named(&in_it, "chat").len(), 1);
    assert_eq!(
        request[0].resource.get("service.name"),
        Some(&common::otlp::Attr::Str("tollgate-gateway".into()))
    );
}

#[tokio::test]
async fn prompts_and_completions_are_recorded_only_when_the_route_opts_in() {
    let receiver = Receiver::start().await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), &upstream);
    let path = dir.path().join("config.yaml");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "  cache: {ttl: 1m}\n",
        "  cache: {ttl: 1m}\n  telemetry: {recordContent: true}\n",
    );
    std::fs::write(&path, text).unwrap();
    let endpoint = receiver.endpoint();
    let gw = Gateway::start_with_env(
        &["--resources", dir.path().to_str().unwrap()],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    );
    let trace = "55555555555555555555555555555555";
    assert_eq!(
        chat(
            &gw,
            json!({}),
            Some(&format!("00-{trace}-{CLIENT_SPAN}-01"))
        )
        .await,
        200
    );
    let spans = receiver
        .wait_for(|s| named(&in_trace(s, trace), "POST").len() == 1)
        .await;
    let request = named(&in_trace(&spans, trace), "POST")[0].clone();
    assert!(
        request
            .str("gen_ai.input.messages")
            .is_some_and(|m| m.contains(PROMPT)),
        "{request:#?}"
    );
    // The default upstream answers "upstream says hi" (see common::upstream).
    let output = request
        .str("gen_ai.output.messages")
        .unwrap_or_default()
        .to_owned();
    assert!(output.contains("upstream says hi"), "{output}");
    assert!(!format!("{spans:?}").contains(KEY), "keys still never");
}
