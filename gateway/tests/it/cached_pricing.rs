//! Prompt-cache usage billed at its own prices: OpenAI's `cached_tokens` and Anthropic's
//! cache reads at `cachedInputPerMillion`, Anthropic's cache writes at
//! `cacheWritePerMillion`, the rest of the input at the input price, in the key's spend
//! (`/v1/usage`, budgets) and in `tollgate_tokens_total`.

use crate::common;

use common::{Gateway, client, metric};
use serde_json::{Value, json};
use tollgate_testkit::emulated::{self, Emulated, Flavor};

const KEY: &str = "tg_cachedPricingTestsClientKey0000000000001";
const PRICES: &str = "{inputPerMillion: 3, outputPerMillion: 15, cachedInputPerMillion: 0.3, cacheWritePerMillion: 3.75}";

async fn start() -> (Gateway, Emulated, Emulated, tempfile::TempDir) {
    start_with(None).await
}

/// [`start`], with the usage counters in `redis` when given.
async fn start_with(redis: Option<&str>) -> (Gateway, Emulated, Emulated, tempfile::TempDir) {
    let openai = Emulated::start(Flavor::ChatOnly).await;
    let anthropic = Emulated::start(Flavor::Anthropic).await;
    let dir = tempfile::tempdir().unwrap();
    let provider = |name: &str, kind: &str, url: &str| {
        format!(
            "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: {name}}}\nspec:\n  type: {kind}\n  baseUrl: {url}\n\
             \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n  models: [{{name: {name}, pricing: {PRICES}}}]\n---\n\
             apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: {name}}}\nspec: {{models: [{name}], targets: [{{provider: {name}}}]}}\n---\n"
        )
    };
    let text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: up, labels: {{tollgate.dev/credential: 'true'}}}}\nstringData: {{token: {token}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: client-key}}\nstringData: {{apiKey: {KEY}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: client}}\nspec: {{owner: tests, budget: {{amount: 100, period: monthly}}}}\n---\n{}{}",
        provider("gpt", "openaiCompatible", &openai.base_url()),
        provider("claude", "anthropic", &anthropic.base_url()),
        token = emulated::API_KEY,
    );
    std::fs::write(dir.path().join("config.yaml"), text).unwrap();
    let gw = match redis {
        None => Gateway::start(&["--resources", dir.path().to_str().unwrap()]),
        Some(url) => Gateway::with_redis(dir.path(), url, "2s", "failOpen"),
    };
    (gw, openai, anthropic, dir)
}

/// The cost of one answer's usage at [`PRICES`].
fn cost(input: u64, cached: u64, written: u64, output: u64) -> f64 {
    (input as f64 * 3.0 + cached as f64 * 0.3 + written as f64 * 3.75 + output as f64 * 15.0) / 1e6
}

async fn spend_after(gw: &Gateway, requests: u64) -> f64 {
    common::usage_after(gw, KEY, requests).await["budget"]["spent"]
        .as_f64()
        .unwrap()
}

#[tokio::test]
async fn anthropic_cache_writes_and_reads_are_billed_at_their_own_prices() {
    let (gw, _openai, _anthropic, _dir) = start().await;
    cache_writes_and_reads(&gw).await;
}

#[tokio::test]
async fn cache_writes_and_reads_are_counted_in_the_shared_usage_too() {
    let redis = common::redis::Redis::start();
    let (gw, _openai, _anthropic, _dir) = start_with(Some(&redis.url())).await;
    cache_writes_and_reads(&gw).await;
}

/// Two calls of one cacheable prompt through `gw`: the first writes Anthropic's cache,
/// the second reads it; each part is billed at its price and counted apart.
async fn cache_writes_and_reads(gw: &Gateway) {
    let body = json!({
        "model": "claude", "max_tokens": 20,
        "system": [{"type": "text", "text": "You are a careful assistant. ".repeat(200), "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "hi"}],
    });
    let mut expected = 0.0;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let answer: Value = client()
            .post(gw.url("/v1/messages"))
            .header("x-api-key", KEY)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let u = &answer["usage"];
        let n = |f: &str| u[f].as_u64().unwrap();
        expected += cost(
            n("input_tokens"),
            n("cache_read_input_tokens"),
            n("cache_creation_input_tokens"),
            n("output_tokens"),
        );
        seen.push((
            n("cache_creation_input_tokens"),
            n("cache_read_input_tokens"),
        ));
    }
    assert!(
        seen[0].0 > 0 && seen[0].1 == 0,
        "the first call writes the cache: {seen:?}"
    );
    assert!(
        seen[1].0 == 0 && seen[1].1 > 0,
        "the second reads it: {seen:?}"
    );
    let usage = common::usage_after(gw, KEY, 2).await;
    let spent = usage["budget"]["spent"].as_f64().unwrap();
    assert!(
        (spent - expected).abs() < 1e-9,
        "spent {spent}, expected {expected}"
    );
    // The cache's parts of the input, counted apart in /v1/usage.
    let current = &usage["current"];
    assert_eq!(current["cache_write_tokens"], seen[0].0, "{usage}");
    assert_eq!(current["cached_input_tokens"], seen[1].1, "{usage}");
    assert!(
        current["input_tokens"].as_u64().unwrap() > seen[0].0 + seen[1].1,
        "{usage}"
    );
    // Billed at the input price, the same calls would have cost more.
    let metrics = gw.metrics().await;
    assert!(
        metric(
            &metrics,
            "tollgate_tokens_total{route=\"default/claude\",provider=\"default/claude\",model=\"claude\",owner=\"tests\",kind=\"cache_write\"}"
        ) > 0.0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "tollgate_tokens_total{route=\"default/claude\",provider=\"default/claude\",model=\"claude\",owner=\"tests\",kind=\"cached_input\"}"
        ) > 0.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn openai_cached_tokens_are_billed_at_the_cached_price_whole_and_streamed() {
    let (gw, _openai, _anthropic, _dir) = start().await;
    // Long enough for the emulated upstream to report cached tokens (OpenAI caches
    // prompts of 1,024 tokens and more).
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(120);
    let answer: Value = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "gpt", "messages": [{"role": "user", "content": prompt}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let u = &answer["usage"];
    let (input, output) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    let cached = u["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached > 0, "{u}");
    let mut expected = cost(input - cached, cached, 0, output);
    // The same call streamed: the usage chunk carries the cached count too.
    let text = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": prompt}]}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    expected += cost(input - cached, cached, 0, output);
    let spent = spend_after(&gw, 2).await;
    assert!(
        (spent - expected).abs() < 1e-9,
        "spent {spent}, expected {expected}"
    );
}
