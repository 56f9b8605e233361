//! The gateway configuration the benchmarks serve: standalone manifests, one Provider per
//! answer shape of the mock upstream, one RoutePolicy per model, and a client key with
//! limits and a budget so admission does its full work.

use std::{fmt::Write as _, fs, net::SocketAddr, path::Path};

/// The client key every scenario uses.
pub fn bench_key() -> String {
    key_from_seed(0)
}

/// A well-formed client key (`tg_…` with its checksum) derived from `seed`.
pub fn key_from_seed(seed: u64) -> String {
    // splitmix64: deterministic bytes, so runs use the same keys.
    let mut state = seed.wrapping_add(0x5eed_0f70_116a_7e00);
    let mut random = Vec::with_capacity(256);
    while random.len() < 256 {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        random.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    tollgate_api::key_format::from_random(&random).expect("256 bytes make a key")
}

/// Models and the mock upstream path each is served from.
/// The last field picks the upstream protocol: HTTP/2 (h2c) for the long streams, so
/// 10,000 of them share a few connections instead of needing 10,000 file descriptors
/// more than the gateway's limit allows here.
pub const MODELS: &[(&str, &str, &str)] = &[
    // ~1 KB answer at once.
    ("bench-small", "small/0/0/0", "http1"),
    // ~10 KB answer at once.
    ("bench-large", "large/0/0/0", "http1"),
    // Answers after one second.
    ("bench-slow", "small/1000/0/0", "http1"),
    // 20 chunks, 5 ms apart.
    ("bench-stream", "small/0/20/5", "http1"),
    // 100 chunks, 2 s apart: streams that stay open (and, 10,000 at once, still relay
    // 5,000 chunks a second).
    ("bench-long-stream", "small/0/100/2000", "http2"),
];

/// Audio models, the mock upstream path each is served from, and the API its Provider
/// declares: `bench-speech` answers 256 chunks of 64 KiB (16 MiB).
pub const MEDIA: &[(&str, &str, &str)] = &[
    ("bench-speech", "small/0/256/0", "audioSpeech"),
    ("bench-transcribe", "small/0/0/0", "audioTranscriptions"),
];

/// Routes (model names) serving `bench-small` from two targets, by routing strategy.
pub const ROUTING_STRATEGIES: &[(&str, &str)] = &[
    ("bench-route-weighted", "weighted"),
    ("bench-route-least-latency", "leastLatency"),
    ("bench-route-adaptive", "adaptive"),
];

/// Writes the benchmark configuration into `dir`: providers pointing at `upstream`,
/// routes (`bench-cached` serves `bench-small` through the response cache,
/// `bench-guarded` behind guardrails, `bench-route-*` from two targets per routing
/// strategy), and the
/// client key.
pub fn write(dir: &Path, upstream: SocketAddr) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    let mut y = String::new();
    for (model, path, version) in MODELS {
        let _ = write!(
            y,
            r#"apiVersion: tollgate.dev/v1alpha1
kind: Provider
metadata: {{ name: {model} }}
spec:
  type: openaiCompatible
  baseUrl: http://{upstream}/{path}/v1
  httpVersion: {version}
  models:
    - name: {model}
      pricing: {{ inputPerMillion: 0.15, outputPerMillion: 0.60 }}
  timeouts: {{ connect: 2s, request: 300s, streamIdle: 60s }}
---
apiVersion: tollgate.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: {model} }}
spec:
  models: [{model}]
  targets: [{{ provider: {model} }}]
---
"#
        );
    }
    y.push_str(
        r#"apiVersion: tollgate.dev/v1alpha1
kind: RoutePolicy
metadata: { name: bench-cached }
spec:
  models: [bench-cached]
  targets: [{ provider: bench-small, model: bench-small }]
  cache: { ttl: 1h, scope: owner }
---
"#,
    );
    // `bench-speech` (16 MiB of audio per answer) and `bench-transcribe` (uploads), from
    // an OpenAI-compatible server that declares those APIs.
    for (model, path, api) in MEDIA {
        let _ = write!(
            y,
            "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{ name: {model} }}\n\
             spec:\n  type: openaiCompatible\n  baseUrl: http://{upstream}/{path}/v1\n  apis: [{api}]\n\
             \x20 models:\n    - name: {model}\n      pricing: {{ inputPerMillion: 2.5, outputPerMillion: 10 }}\n\
             \x20 timeouts: {{ connect: 2s, request: 300s, streamIdle: 60s }}\n---\n\
             apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: {model} }}\n\
             spec:\n  models: [{model}]\n  targets: [{{ provider: {model} }}]\n---\n"
        );
    }
    // `bench-route-<strategy>`: `bench-small` from two providers (the same upstream) under
    // each routing strategy.
    let _ = write!(
        y,
        "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{ name: bench-small-twin }}\n\
         spec:\n  type: openaiCompatible\n  baseUrl: http://{upstream}/small/0/0/0/v1\n\
         \x20 models:\n    - name: bench-small\n      pricing: {{ inputPerMillion: 0.30, outputPerMillion: 1.20 }}\n\
         \x20 timeouts: {{ connect: 2s, request: 300s, streamIdle: 60s }}\n---\n"
    );
    for (name, strategy) in ROUTING_STRATEGIES {
        let options = if *strategy == "adaptive" {
            // Price weighed in too: the whole score is computed.
            "  strategyOptions: { costWeight: 50 }\n"
        } else {
            ""
        };
        let _ = write!(
            y,
            "apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: {name} }}\n\
             spec:\n  models: [{name}]\n  strategy: {strategy}\n{options}\
             \x20 targets: [{{ provider: bench-small, model: bench-small }}, {{ provider: bench-small-twin, model: bench-small }}]\n---\n"
        );
    }
    // `bench-guarded`: `bench-small` behind every guardrail detector.
    let _ = write!(
        y,
        "apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: bench-guarded }}\n\
         spec:\n  models: [bench-guarded]\n  targets: [{{ provider: bench-small, model: bench-small }}]\n\
         \x20 guardrails: {}\n---\n",
        crate::guardrails::RULES
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    );
    y.push_str(&api_key("bench", &bench_key()));
    fs::write(dir.join("bench.yaml"), y)?;
    Ok(())
}

/// An ApiKey with generous limits and budget (admission runs, nothing is refused), and
/// the Secret holding its plaintext key (standalone mode).
fn api_key(name: &str, key: &str) -> String {
    format!(
        r#"apiVersion: tollgate.dev/v1alpha1
kind: ApiKey
metadata: {{ name: {name} }}
spec:
  owner: bench
  limits: {{ requestsPerMinute: 1000000000, tokensPerMinute: 1000000000000, maxConcurrent: 100000 }}
  budget: {{ amount: 1000000000, period: monthly }}
---
apiVersion: v1
kind: Secret
metadata: {{ name: {name}-key }}
stringData: {{ apiKey: {key} }}
---
"#
    )
}

/// Writes `count` more keys into `dir/keys.yaml`; `generation` changes their owners so
/// each call makes a new configuration of the same size.
pub fn write_many_keys(dir: &Path, count: usize, generation: u32) -> anyhow::Result<()> {
    let mut y = String::with_capacity(count * 420);
    for i in 0..count {
        let _ = write!(
            y,
            r#"apiVersion: tollgate.dev/v1alpha1
kind: ApiKey
metadata: {{ name: team-{i} }}
spec:
  owner: team-{owner}
  allowedModels: [bench-small, bench-cached]
  limits: {{ requestsPerMinute: 600 }}
---
apiVersion: v1
kind: Secret
metadata: {{ name: team-{i}-key }}
stringData: {{ apiKey: {key} }}
---
"#,
            owner = (i as u32 + generation) % 500,
            key = key_from_seed(i as u64 + 1),
        );
    }
    let tmp = dir.join(".keys.yaml.tmp");
    fs::write(&tmp, y)?;
    // Atomic replace: the gateway never reads half a file.
    fs::rename(tmp, dir.join("keys.yaml"))?;
    Ok(())
}

/// Compiles the manifests in `resources` the way the operator does and publishes the
/// configuration files in `out` the way kubelet updates a mounted volume: a new
/// directory, then one atomic swap of the `..data` link the files point through.
pub fn render(resources: &Path, out: &Path, generation: u32) -> anyhow::Result<()> {
    use tollgate_api::{
        compile::{DEFAULT_NAMESPACE, SecretStore, compile},
        manifests, parts,
    };
    let loaded = manifests::load_path(resources).map_err(|errors| {
        anyhow::anyhow!(
            "{}",
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    let secrets = SecretStore::new(&loaded.secrets, DEFAULT_NAMESPACE);
    let compiled = compile(&loaded.resources, &secrets, jiff::Timestamp::now());
    let split = parts::split(&compiled.config)?;
    fs::create_dir_all(out)?;
    let data = format!("..data-{generation}");
    let data_dir = out.join(&data);
    fs::create_dir_all(&data_dir)?;
    for part in &split.parts {
        fs::write(data_dir.join(&part.file), &part.bytes)?;
        let link = out.join(&part.file);
        if fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{}", part.file), &link)?;
        }
    }
    let tmp = out.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&data, &tmp)?;
    fs::rename(&tmp, out.join("..data"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_well_formed_and_distinct() {
        let a = key_from_seed(1);
        assert!(matches!(
            tollgate_api::key_format::shape(&a),
            tollgate_api::key_format::Shape::Generated
        ));
        assert_ne!(a, key_from_seed(2));
    }
}
