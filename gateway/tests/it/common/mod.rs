//! What the gateway's tests share: the harness of `tollgate-testkit` (the gateway binary on
//! free ports, real Redis servers, a scriptable upstream), the example keys, and an OTLP
//! receiver.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub use tollgate_testkit::{
    client, content_type,
    gateway::Gateway,
    metric,
    ports::free_port,
    redis, upstream,
    wait::{eventually, eventually_value},
};

pub mod otlp;

/// The example local-development key (allowed `demo-*`).
pub const DEV_KEY: &str = "tg_localDevKeyForTheMockProviderOnly00000003";
/// The example search-team key (allowed `chat-default`, `text-embedding-3-small`).
pub const SEARCH_KEY: &str = "tg_exampleSearchTeamKeyDoNotUseInProduction01";

/// The repository's `examples/` directory.
pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// `key`'s `/v1/usage` on `gw`, once it counts `requests` requests.
pub async fn usage_after(gw: &Gateway, key: &str, requests: u64) -> serde_json::Value {
    eventually_value(
        || async {
            client()
                .get(gw.url("/v1/usage"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        },
        |v: &serde_json::Value| v["current"]["requests"] == requests,
    )
    .await
}
