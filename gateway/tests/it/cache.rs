//! The response cache through the real gateway: hits skip the upstream, entries are scoped
//! per key owner by default, clients can opt out, streams and uncached routes bypass.

use crate::common;

use common::{Gateway, client, upstream::Upstream};
use serde_json::{Value, json};

const ALICE: &str = "tg_cacheTestsAliceKey00000000000000000001";
const ALICE_2: &str = "tg_cacheTestsAliceSecondKey000000000000002";
const BOB: &str = "tg_cacheTestsBobKey0000000000000000000003";

fn start(upstream: &Upstream, cache: &str) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let key = |name: &str, owner: &str, value: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-key}}\nstringData: {{apiKey: {value}}}\n---\n\
             apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: {name}}}\nspec: {{owner: {owner}}}\n---\n"
        )
    };
    let text = format!(
        "{}{}{}apiVersion: v1\nkind: Secret\nmetadata: {{name: up, labels: {{tollgate.dev/credential: 'true'}}}}\nstringData: {{token: sk-up}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: up}}\nspec:\n  type: openaiCompatible\n  baseUrl: {}\n\
         \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n  models: [{{name: gpt-4o}}, {{name: gpt-4o-mini}}]\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: cached}}\nspec:\n  models: [gpt-4o]\n  targets: [{{provider: up}}]\n{cache}---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: plain}}\nspec:\n  models: [gpt-4o-mini]\n  targets: [{{provider: up}}]\n",
        key("alice", "team-a", ALICE),
        key("alice-two", "team-a", ALICE_2),
        key("bob", "team-b", BOB),
        upstream.base_url()
    );
    std::fs::write(dir.path().join("config.yaml"), text).unwrap();
    (
        Gateway::start(&["--resources", dir.path().to_str().unwrap()]),
        dir,
    )
}

async fn ask(gw: &Gateway, key: &str, body: &str, headers: &[(&str, &str)]) -> (String, Value) {
    let mut req = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let cache = resp
        .headers()
        .get("x-tollgate-cache")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (cache, resp.json().await.unwrap())
}

const BODY: &str =
    r#"{"model":"gpt-4o","messages":[{"role":"user","content":"What is 2+2?"}],"temperature":0}"#;

#[tokio::test]
async fn a_repeated_request_is_answered_from_the_cache_without_calling_the_upstream() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(&up, "  cache: {ttl: 5m}\n");
    let (first, a) = ask(&gw, ALICE, BODY, &[]).await;
    let (second, b) = ask(&gw, ALICE, BODY, &[]).await;
    assert_eq!((first.as_str(), second.as_str()), ("miss", "hit"));
    assert_eq!(a, b);
    assert_eq!(up.received().len(), 1);
    // Same JSON, other key order and spacing: still a hit.
    let reordered = r#"{ "temperature": 0, "messages": [{"content":"What is 2+2?","role":"user"}], "model": "gpt-4o" }"#;
    assert_eq!(ask(&gw, ALICE, reordered, &[]).await.0, "hit");
    // Any other parameter is another entry.
    assert_eq!(
        ask(
            &gw,
            ALICE,
            &BODY.replace("\"temperature\":0", "\"temperature\":1"),
            &[]
        )
        .await
        .0,
        "miss"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"tollgate_cache_lookups_total{route="default/cached",result="hit"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn entries_are_shared_by_keys_of_one_owner_and_never_across_owners() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(&up, "  cache: {ttl: 5m}\n");
    assert_eq!(ask(&gw, ALICE, BODY, &[]).await.0, "miss");
    assert_eq!(ask(&gw, ALICE_2, BODY, &[]).await.0, "hit", "same owner");
    assert_eq!(
        ask(&gw, BOB, BODY, &[]).await.0,
        "miss",
        "another tenant never sees team-a's answers"
    );
}

#[tokio::test]
async fn key_scope_separates_keys_and_shared_scope_joins_owners() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(&up, "  cache: {ttl: 5m, scope: key}\n");
    assert_eq!(ask(&gw, ALICE, BODY, &[]).await.0, "miss");
    assert_eq!(ask(&gw, ALICE_2, BODY, &[]).await.0, "miss");
    let up = Upstream::start().await;
    let (gw, _dir) = start(&up, "  cache: {ttl: 5m, scope: shared}\n");
    assert_eq!(ask(&gw, ALICE, BODY, &[]).await.0, "miss");
    assert_eq!(ask(&gw, BOB, BODY, &[]).await.0, "hit");
}

#[tokio::test]
async fn clients_can_bypass_or_refresh_the_cache() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(&up, "  cache: {ttl: 5m}\n");
    assert_eq!(
        ask(&gw, ALICE, BODY, &[("cache-control", "no-store")])
            .await
            .0,
        "bypass"
    );
    assert_eq!(
        ask(&gw, ALICE, BODY, &[("x-tollgate-cache", "bypass")])
            .await
            .0,
        "bypass"
    );
    assert_eq!(
        ask(&gw, ALICE, BODY, &[]).await.0,
        "miss",
        "bypassed answers were not stored"
    );
    assert_eq!(
        ask(&gw, ALICE, BODY, &[("cache-control", "no-cache")])
            .await
            .0,
        "miss",
        "no-cache fetches fresh"
    );
    assert_eq!(ask(&gw, ALICE, BODY, &[]).await.0, "hit");
    assert_eq!(up.received().len(), 4);
}

#[tokio::test]
async fn routes_without_a_cache_policy_bypass_the_cache() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(&up, "  cache: {ttl: 5m}\n");
    let plain = BODY.replace("\"gpt-4o\"", "\"gpt-4o-mini\"");
    assert_eq!(ask(&gw, ALICE, &plain, &[]).await.0, "bypass");
    assert_eq!(ask(&gw, ALICE, &plain, &[]).await.0, "bypass");
    assert_eq!(up.received().len(), 2);
}

async fn stream(gw: &Gateway, key: &str) -> (String, String) {
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "tell me"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let cache = resp.headers()["x-tollgate-cache"]
        .to_str()
        .unwrap()
        .to_owned();
    (cache, resp.text().await.unwrap())
}

fn feed_answer(up: &Upstream) {
    let feed = up.stream();
    for data in [
        r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Once"},"finish_reason":null}]}"#,
        r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
        "[DONE]",
    ] {
        feed.send(bytes::Bytes::from(format!("data: {data}\n\n")))
            .unwrap();
    }
}

#[tokio::test]
async fn streamed_answers_are_replayed_as_sse_and_only_within_the_owner() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(&up, "  cache: {ttl: 5m}\n");
    feed_answer(&up);
    let (first, original) = stream(&gw, ALICE).await;
    assert_eq!(first, "miss");
    assert!(original.contains("Once") && original.ends_with("data: [DONE]\n\n"));
    let (second, replay) =
        common::eventually_value(|| async { stream(&gw, ALICE_2).await }, |(c, _)| c == "hit")
            .await;
    assert_eq!(second, "hit");
    assert_eq!(
        replay, original,
        "the replay is the stream as first relayed"
    );
    feed_answer(&up);
    assert_eq!(
        stream(&gw, BOB).await.0,
        "miss",
        "another owner never gets a replay"
    );
    assert_eq!(up.received().len(), 2);
}

#[tokio::test]
async fn a_broken_stream_is_not_stored() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(&up, "  cache: {ttl: 5m}\n");
    up.script([common::upstream::Reply::Broken(vec![
        bytes::Bytes::from_static(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hal\"}}]}\n\n",
        ),
    ])]);
    let (_, text) = stream(&gw, ALICE).await;
    assert!(text.contains("upstream_stream_error"));
    feed_answer(&up);
    assert_eq!(
        stream(&gw, ALICE).await.0,
        "miss",
        "the broken answer was not cached"
    );
}

#[tokio::test]
async fn expired_entries_are_not_served() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(&up, "  cache: {ttl: 200ms}\n");
    assert_eq!(ask(&gw, ALICE, BODY, &[]).await.0, "miss");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(ask(&gw, ALICE, BODY, &[]).await.0, "miss");
}
