//! Every gateway metric in the catalogue (docs/metrics.md) moves as expected for a
//! scripted sequence of requests, with exactly the catalogue's labels, and no label ever
//! carries a key, a prompt or a value a client made up.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use common::{
    Gateway, client,
    redis::Redis,
    upstream::{Reply, Upstream},
};
use serde_json::{Value, json};

const KEY: &str = "tg_metricsTestKey00000000000000000000000001";
const LIMITED: &str = "tg_metricsLimitedKey000000000000000000000002";
const PROMPT: &str = "a prompt that must never show up in metrics";

/// The gateway rows of the catalogue: name → (type, labels).
fn catalogue() -> BTreeMap<String, (String, Vec<String>)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .unwrap();
    let gateway = text.split("## Operator").next().unwrap();
    gateway
        .lines()
        .filter(|l| l.starts_with("| `tollgate_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells[1].trim_matches('`').to_owned();
            let labels = cells[3]
                .split(',')
                .map(|c| c.trim().trim_matches('`').to_owned())
                .filter(|c| !c.is_empty())
                .collect();
            (name, (cells[2].to_owned(), labels))
        })
        .collect()
}

/// Samples of the exposition: (family, labels, value).
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut map = BTreeMap::new();
            // Label values here never contain `",` (checked below by what we send).
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once("=\"").unwrap();
                map.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
            }
            (name.to_owned(), map, value.parse().unwrap())
        })
        .collect()
}

fn config(dir: &std::path::Path, upstream: &Upstream) {
    let text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: up, labels: {{tollgate.dev/credential: 'true'}}}}\nstringData: {{token: sk-upstream-secret}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: up}}\nspec:\n  type: openaiCompatible\n  baseUrl: {}\n\
         \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n\
         \x20 models: [{{name: gpt-4o, pricing: {{inputPerMillion: 1000, outputPerMillion: 2000}}}}]\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: chat}}\nspec:\n  models: [gpt-4o]\n  targets: [{{provider: up}}]\n  retries: {{attempts: 0}}\n  cache: {{ttl: 1m}}\n\
         \x20 guardrails: [{{name: watch, detector: blockedTerms, terms: [prompt], action: log}}]\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: main}}\nspec: {{owner: team-a}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: main-key}}\nstringData: {{apiKey: {KEY}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: limited}}\nspec: {{owner: team-b, limits: {{requestsPerMinute: 1}}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: limited-key}}\nstringData: {{apiKey: {LIMITED}}}\n",
        upstream.base_url()
    );
    std::fs::write(dir.join("config.yaml"), text).unwrap();
}

async fn chat(gw: &Gateway, key: &str, extra: Value) -> u16 {
    let mut body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": PROMPT}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let _ = resp.bytes().await;
    status
}

#[tokio::test]
async fn every_catalogued_metric_moves_with_its_labels_and_no_label_leaks() {
    let redis = Redis::start();
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), &upstream);
    let gw = Gateway::start(&[
        "--resources",
        dir.path().to_str().unwrap(),
        "--redis-url",
        &redis.url(),
    ]);

    // 1. answered, 2. the same again from the cache, 3. streamed, 4. refused by a limit,
    // 5. the upstream fails, 6. a model nobody serves.
    assert_eq!(chat(&gw, KEY, json!({})).await, 200);
    assert_eq!(chat(&gw, KEY, json!({})).await, 200);
    let feed = upstream.stream();
    for data in [
        r#"{"id":"s","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#,
        r#"{"id":"s","object":"chat.completion.chunk","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#,
        "[DONE]",
    ] {
        feed.send(Bytes::from(format!("data: {data}\n\n"))).unwrap();
    }
    drop(feed);
    assert_eq!(
        chat(&gw, KEY, json!({"stream": true, "temperature": 0.5})).await,
        200
    );
    assert_eq!(chat(&gw, LIMITED, json!({"temperature": 0.1})).await, 200);
    assert_eq!(chat(&gw, LIMITED, json!({"temperature": 0.2})).await, 429);
    upstream.script([Reply::Json(
        500,
        json!({"error": {"message": "boom"}}),
        vec![],
    )]);
    assert_eq!(chat(&gw, KEY, json!({"temperature": 0.3})).await, 502);
    let invented = "made-up-model-7f3a9c";
    assert_eq!(chat(&gw, KEY, json!({"model": invented})).await, 404);

    let text = gw.metrics().await;
    let all = samples(&text);
    let catalogue = catalogue();
    assert!(catalogue.len() >= 15, "{catalogue:?}");
    let value = |family: &str, want: &[(&str, &str)]| -> f64 {
        all.iter()
            .filter(|(n, l, _)| {
                n == family
                    && want
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.2)
            .sum()
    };

    // Every catalogued metric has samples, with exactly its labels (histograms: `le` on
    // buckets), and nothing is exported that the catalogue does not list.
    let mut exported = BTreeSet::new();
    for (name, labels, _) in &all {
        let family = ["_bucket", "_count", "_sum", "_created"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| catalogue.get(*f).is_some_and(|(t, _)| t == "histogram"))
            .unwrap_or(name);
        let (kind, want) = catalogue
            .get(family)
            .unwrap_or_else(|| panic!("{family} is exported but not in docs/metrics.md"));
        let mut got: Vec<String> = labels.keys().filter(|k| *k != "le").cloned().collect();
        got.sort();
        let mut want = want.clone();
        want.sort();
        assert_eq!(got, want, "labels of {name}");
        if kind == "histogram" && name.ends_with("_bucket") {
            assert!(labels.contains_key("le"));
        }
        exported.insert(family.to_owned());
    }
    let missing: Vec<&String> = catalogue
        .keys()
        .filter(|k| !exported.contains(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "catalogued but never exported: {missing:?}"
    );

    // Each moved as the sequence implies.
    let route = ("route", "default/chat");
    assert_eq!(
        value("tollgate_requests_total", &[route, ("status", "200")]),
        4.0
    );
    assert_eq!(
        value("tollgate_requests_total", &[route, ("status", "429")]),
        1.0
    );
    assert_eq!(
        value("tollgate_requests_total", &[route, ("status", "502")]),
        1.0
    );
    assert_eq!(
        value(
            "tollgate_requests_total",
            &[("route", "none"), ("status", "404")]
        ),
        1.0
    );
    assert_eq!(
        value("tollgate_request_duration_seconds_count", &[route]),
        6.0
    );
    assert_eq!(value("tollgate_request_overhead_seconds_count", &[]), 7.0);
    assert_eq!(
        value("tollgate_stream_time_to_first_byte_seconds_count", &[route]),
        1.0
    );
    assert_eq!(
        value(
            "tollgate_upstream_attempts_total",
            &[("provider", "default/up"), ("outcome", "success")]
        ),
        3.0
    );
    assert_eq!(
        value(
            "tollgate_upstream_attempts_total",
            &[("provider", "default/up"), ("outcome", "server_error")]
        ),
        1.0
    );
    // Two answers of 5 + 2 tokens and a stream of 5 + 1, for team-a; one of 5 + 2 for
    // team-b. The cache hit is not billed again.
    assert_eq!(
        value(
            "tollgate_tokens_total",
            &[("owner", "team-a"), ("kind", "input"), ("model", "gpt-4o")]
        ),
        10.0
    );
    assert_eq!(
        value(
            "tollgate_tokens_total",
            &[("owner", "team-a"), ("kind", "output")]
        ),
        3.0
    );
    let cost = value("tollgate_cost_total", &[("owner", "team-a")]);
    assert!(
        (cost - (10.0 * 1000.0 + 3.0 * 2000.0) / 1e6).abs() < 1e-9,
        "{cost}"
    );
    assert_eq!(
        value("tollgate_cache_lookups_total", &[route, ("result", "hit")]),
        1.0
    );
    // Misses: the first answer, the limited key's, and the failed one (a stream is
    // looked up too).
    let misses = value("tollgate_cache_lookups_total", &[route, ("result", "miss")]);
    assert!((3.0..=4.0).contains(&misses), "{misses}");
    // The log-only rule fires on every request that reached the route (the 404 did not).
    assert_eq!(
        value(
            "tollgate_guardrail_hits_total",
            &[route, ("rule", "watch"), ("action", "log")]
        ),
        6.0
    );
    assert_eq!(
        value(
            "tollgate_limit_rejections_total",
            &[("limit", "requests"), ("scope", "key")]
        ),
        1.0
    );
    assert!(all.iter().any(|(n, l, v)| n == "tollgate_circuit_state"
        && l["target"].contains("default/up")
        && *v == 0.0));
    assert_eq!(value("tollgate_redis_up", &[]), 1.0);
    // Only the limited key needs admission: two calls.
    assert_eq!(
        value(
            "tollgate_redis_call_duration_seconds_count",
            &[("operation", "admit"), ("result", "ok")]
        ),
        2.0
    );
    assert!(
        value(
            "tollgate_redis_call_duration_seconds_count",
            &[("operation", "cache_get")]
        ) >= 1.0
    );
    assert_eq!(value("tollgate_config_info", &[]), 1.0);
    assert_eq!(
        value("tollgate_config_reloads_total", &[("result", "success")]),
        1.0
    );
    assert_eq!(value("tollgate_config_keys", &[]), 2.0);
    // Nothing in flight at scrape time; the default budget is 256 MiB.
    assert_eq!(value("tollgate_inflight_request_bytes", &[]), 0.0);
    assert_eq!(
        value("tollgate_inflight_request_bytes_limit", &[]),
        256.0 * 1024.0 * 1024.0
    );

    // No key, key id, prompt, upstream credential or invented model name in any label.
    let key_ids = [
        tollgate_api::compile::key_id("default", "main"),
        tollgate_api::compile::key_id("default", "limited"),
    ];
    for leak in [
        KEY,
        LIMITED,
        PROMPT,
        "sk-upstream-secret",
        invented,
        &key_ids[0],
        &key_ids[1],
    ] {
        assert!(!text.contains(leak), "{leak} appears in /metrics");
    }
}
