//! Splitting a compiled configuration into ConfigMap/Secret parts and putting it back
//! together, as the operator and the gateways do.

use std::collections::BTreeMap;

use tollgate_api::{
    config::{
        CompiledBudget, CompiledKey, CompiledLimits, CompiledModel, CompiledProvider,
        CompiledRoute, CompiledTarget, CredentialsConfig, GatewayConfig, KeysConfig, RoutingConfig,
    },
    parts::{
        self, DEFAULT_MAX_PART_BYTES, MANIFEST_FILE, PartKind, PartsError, ROUTING_FILE,
        SplitConfig, Store, sha256_hex,
    },
    v1alpha1::{BudgetPeriod, ProviderType, RetryOn, Strategy},
};

// === Fixtures ===

const CREDENTIAL: &str = "sk-proj-credential-that-must-stay-secret-31337";

fn provider(id: &str, models: &[&str]) -> CompiledProvider {
    CompiledProvider {
        id: id.to_owned(),
        provider_type: ProviderType::Openai,
        base_url: "https://api.openai.com/v1".to_owned(),
        auth: None,
        azure_api_version: None,
        anthropic_version: None,
        anthropic_betas: None,
        apis: None,
        mock: None,
        models: models
            .iter()
            .map(|m| {
                (
                    (*m).to_owned(),
                    CompiledModel {
                        upstream_name: (*m).to_owned(),
                        input_per_million: 2.5,
                        output_per_million: 10.0,
                        cached_input_per_million: 1.25,
                        cache_write_per_million: None,
                        context_window: Some(128_000),
                        max_output_tokens: None,
                    },
                )
            })
            .collect(),
        currency: "USD".to_owned(),
        connect_timeout_ms: 5_000,
        request_timeout_ms: 600_000,
        stream_idle_timeout_ms: 60_000,
        max_concurrency: Some(64),
        circuit_failure_threshold: 5,
        circuit_open_ms: 30_000,
        headers: BTreeMap::new(),
        http_version: Default::default(),
    }
}

fn route(id: &str, provider: &str, models: &[&str]) -> CompiledRoute {
    CompiledRoute {
        id: id.to_owned(),
        exact: models.iter().map(|m| (*m).to_owned()).collect(),
        globs: vec!["gpt-4o-*".to_owned()],
        strategy: Strategy::Weighted,
        strategy_options: Default::default(),
        tiers: vec![vec![CompiledTarget {
            provider: provider.to_owned(),
            model: None,
            weight: 1,
        }]],
        retry_attempts: 2,
        retry_initial_backoff_ms: 100,
        retry_max_backoff_ms: 2_000,
        retry_on: vec![RetryOn::ConnectError, RetryOn::Timeout],
        per_try_timeout_ms: Some(30_000),
        total_timeout_ms: None,
        cache: None,
        rate_limit: Some(CompiledLimits {
            requests_per_minute: Some(10_000),
            tokens_per_minute: None,
            max_concurrent: None,
        }),
        record_content: false,
        guardrails: Vec::new(),
        shared_with: Vec::new(),
    }
}

/// A key as `compile` would produce it, with limits, a budget and an allow-list.
fn key(i: usize) -> CompiledKey {
    let sha256 = sha256_hex(format!("tg_live_{i:08}_generated_key_material").as_bytes());
    CompiledKey {
        id: sha256[..24].to_owned(),
        sha256,
        api_key: format!("tenant-{:03}/key-{i:05}", i % 200),
        owner: format!("service-{:04}", i % 1_500),
        team: Some(format!("cost-centre-{:02}", i % 40)),
        allowed_models: vec![
            "gpt-4o".to_owned(),
            "gpt-4o-mini".to_owned(),
            "claude-3-5-*".to_owned(),
        ],
        shared_routes_from: Vec::new(),
        limits: Some(CompiledLimits {
            requests_per_minute: Some(600),
            tokens_per_minute: Some(200_000),
            max_concurrent: Some(20),
        }),
        budget: Some(CompiledBudget {
            amount: 250.0,
            period: BudgetPeriod::Monthly,
            currency: "USD".to_owned(),
        }),
        expires_at: Some(1_800_000_000 + i as i64),
        guardrails: Vec::new(),
    }
}

/// A configuration with `keys` keys, sorted by hash as `compile` leaves them.
fn config(keys: usize) -> GatewayConfig {
    let mut keys: Vec<CompiledKey> = (0..keys).map(key).collect();
    keys.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    GatewayConfig {
        routing: RoutingConfig {
            providers: BTreeMap::from([(
                "ml/openai".to_owned(),
                provider("ml/openai", &["gpt-4o", "gpt-4o-mini"]),
            )]),
            routes: vec![route("ml/chat", "ml/openai", &["gpt-4o", "gpt-4o-mini"])],
        },
        credentials: CredentialsConfig {
            providers: BTreeMap::from([("ml/openai".to_owned(), CREDENTIAL.to_owned())]),
        },
        keys: KeysConfig { keys },
    }
}

/// The files a gateway would see mounted.
fn files(split: &SplitConfig) -> BTreeMap<String, Vec<u8>> {
    split
        .parts
        .iter()
        .map(|p| (p.file.clone(), p.bytes.clone()))
        .collect()
}

fn key_parts(split: &SplitConfig) -> Vec<&parts::ConfigPart> {
    split
        .parts
        .iter()
        .filter(|p| p.file.starts_with("keys-"))
        .collect()
}

/// Content hashes by part, named without their hash (`keys-003`, `credentials`).
fn hashes(split: &SplitConfig) -> BTreeMap<String, String> {
    split
        .parts
        .iter()
        .map(|p| (stem(&p.file).to_owned(), p.content_hash.clone()))
        .collect()
}

/// A part's file name without its content hash.
fn stem(file: &str) -> &str {
    match parts::kind_of(file) {
        Some(PartKind::Keys) => &file[..8],
        Some(PartKind::Routing) if file != ROUTING_FILE => &file[..11],
        Some(PartKind::Credentials) => "credentials",
        _ => file,
    }
}

/// The file name of the credentials part.
fn credentials_file(split: &SplitConfig) -> String {
    split
        .parts
        .iter()
        .find(|p| parts::kind_of(&p.file) == Some(PartKind::Credentials))
        .unwrap()
        .file
        .clone()
}

/// Replaces the first occurrence of `from` in `bytes` with `to`.
fn replace_once(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    let text = std::str::from_utf8(bytes).unwrap();
    assert!(text.contains(from), "{from:?} not found");
    text.replacen(from, to, 1).into_bytes()
}

// === Roundtrip and sharding ===

#[test]
fn split_then_assemble_gives_back_the_same_configuration() {
    let original = config(25);
    let split = parts::split(&original).unwrap();

    let assembled = parts::assemble(&files(&split)).unwrap();

    assert_eq!(assembled.config, original);
    assert_eq!(assembled.config_hash, split.config_hash);
    assert_eq!(split.parts[0].file, MANIFEST_FILE);
}

#[test]
fn an_empty_configuration_roundtrips() {
    let original = GatewayConfig::default();
    let split = parts::split(&original).unwrap();

    assert_eq!(parts::assemble(&files(&split)).unwrap().config, original);
}

#[test]
fn ten_thousand_keys_are_sharded_into_a_power_of_two_of_bounded_parts_and_roundtrip() {
    let original = config(10_000);
    let split = parts::split(&original).unwrap();

    for part in &split.parts {
        assert!(
            part.bytes.len() <= DEFAULT_MAX_PART_BYTES,
            "{} is {} bytes",
            part.file,
            part.bytes.len()
        );
    }
    let shards = key_parts(&split);
    let total: usize = shards.iter().map(|p| p.bytes.len()).sum();
    assert!(
        total > DEFAULT_MAX_PART_BYTES,
        "the keys must not fit in one part for this test to mean anything ({total} bytes)"
    );
    assert!(shards.len() > 1);
    assert!(shards.len().is_power_of_two(), "{} shards", shards.len());
    // Named by shard and content.
    for (i, part) in shards.iter().enumerate() {
        assert_eq!(
            part.file,
            format!("keys-{i:03}-{}.json", &part.content_hash[..16])
        );
    }

    let assembled = parts::assemble(&files(&split)).unwrap();
    assert_eq!(assembled.config.keys.keys.len(), 10_000);
    assert_eq!(assembled.config, original);
}

#[test]
fn changing_one_key_rewrites_exactly_one_key_shard() {
    let before = config(10_000);
    let mut after = before.clone();
    let changed = &mut after.keys.keys[4_321];
    changed.limits = Some(CompiledLimits {
        requests_per_minute: Some(60),
        ..CompiledLimits::default()
    });
    let (old, new) = (
        hashes(&parts::split(&before).unwrap()),
        hashes(&parts::split(&after).unwrap()),
    );

    assert_eq!(
        old.keys().collect::<Vec<_>>(),
        new.keys().collect::<Vec<_>>()
    );
    let differing: Vec<&String> = old
        .keys()
        .filter(|file| file.as_str() != MANIFEST_FILE && old[*file] != new[*file])
        .collect();
    assert_eq!(differing.len(), 1, "{differing:?}");
    assert!(differing[0].starts_with("keys-"));
    assert_eq!(old[ROUTING_FILE], new[ROUTING_FILE]);
    assert_eq!(old["credentials"], new["credentials"]);
    assert_ne!(
        parts::split(&before).unwrap().config_hash,
        parts::split(&after).unwrap().config_hash
    );
}

#[test]
fn splitting_the_same_configuration_twice_gives_identical_parts() {
    let config = config(500);

    assert_eq!(
        parts::split(&config).unwrap(),
        parts::split(&config).unwrap()
    );
}

#[test]
fn routing_that_cannot_be_sharded_small_enough_is_reported_as_too_large() {
    // One Provider alone is larger than the limit: no number of shards helps.
    let err = parts::split_with_limit(&config(0), 200).unwrap_err();

    assert!(
        matches!(&err, PartsError::TooLarge { file, limit: 200, .. } if file.starts_with("routing-")),
        "{err:?}"
    );
}

/// `config(0)` with `n` more RoutePolicies, each with a Provider of its own.
fn many_routes(n: usize) -> GatewayConfig {
    let mut config = config(0);
    for i in 0..n {
        let provider_id = format!("team-{i}/upstream");
        config.routing.providers.insert(
            provider_id.clone(),
            provider(&provider_id, &[&format!("model-{i}")]),
        );
        config.routing.routes.push(route(
            &format!("team-{i}/route"),
            &provider_id,
            &[&format!("model-{i}")],
        ));
    }
    config.routing.routes.sort_by(|a, b| a.id.cmp(&b.id));
    config
}

#[test]
fn routing_larger_than_one_part_is_sharded_and_one_change_rewrites_one_shard() {
    let config = many_routes(300);
    let split = parts::split_with_limit(&config, 64 * 1024).unwrap();
    let routing: Vec<&parts::ConfigPart> = split
        .parts
        .iter()
        .filter(|p| parts::kind_of(&p.file) == Some(PartKind::Routing))
        .collect();
    assert!(
        routing.len() > 1 && routing.len().is_power_of_two(),
        "{}",
        routing.len()
    );
    for (i, part) in routing.iter().enumerate() {
        assert_eq!(
            part.file,
            format!("routing-{i:03}-{}.json", &part.content_hash[..16])
        );
        assert_eq!(part.store, Store::ConfigMap);
        assert!(part.bytes.len() <= 64 * 1024);
        assert_eq!(parts::shard_index(&part.file), Some(i));
    }
    assert_eq!(parts::assemble(&files(&split)).unwrap().config, config);

    let mut changed = config.clone();
    changed.routing.routes[123].retry_attempts = 7;
    let after = parts::split_with_limit(&changed, 64 * 1024).unwrap();
    let (old, new) = (hashes(&split), hashes(&after));
    let differing: Vec<&String> = old
        .keys()
        .filter(|f| f.as_str() != MANIFEST_FILE && old[*f] != new[*f])
        .collect();
    assert_eq!(differing.len(), 1, "{differing:?}");
    assert!(differing[0].starts_with("routing-"));
}

// === Refusing inconsistent sets ===

#[test]
fn tampered_part_is_refused_with_hash_mismatch() {
    let split = parts::split(&config(25)).unwrap();
    let expected = split
        .parts
        .iter()
        .find(|p| p.file == ROUTING_FILE)
        .unwrap()
        .content_hash
        .clone();
    let mut files = files(&split);
    let routing = &files[ROUTING_FILE];
    let tampered = replace_once(
        routing,
        "https://api.openai.com/v1",
        "https://evil.example/v1",
    );
    files.insert(ROUTING_FILE.to_owned(), tampered);

    let err = parts::assemble(&files).unwrap_err();

    match err {
        PartsError::HashMismatch {
            file,
            expected: e,
            found,
        } => {
            assert_eq!(file, ROUTING_FILE);
            assert_eq!(e, expected);
            assert_ne!(found, expected);
        }
        other => panic!("expected HashMismatch, got {other:?}"),
    }
}

#[test]
fn part_with_a_forged_content_hash_is_still_refused() {
    let split = parts::split(&config(25)).unwrap();
    let file = credentials_file(&split);
    let part = split.parts.iter().find(|p| p.file == file).unwrap();
    let forged_payload = r#"{"providers":{"ml/openai":"sk-attacker"}}"#;
    let forged = replace_once(
        &replace_once(
            &part.bytes,
            &format!(r#"{{"providers":{{"ml/openai":"{CREDENTIAL}"}}}}"#),
            forged_payload,
        ),
        &part.content_hash,
        &sha256_hex(forged_payload.as_bytes()),
    );
    let mut files = files(&split);
    files.insert(file.clone(), forged);

    let err = parts::assemble(&files).unwrap_err();

    assert!(
        matches!(&err, PartsError::HashMismatch { file: f, .. } if *f == file),
        "{err:?}"
    );
    assert!(!err.is_pending(), "a damaged part is no update in flight");
}

#[test]
fn missing_key_shard_is_refused_with_missing() {
    let split = parts::split(&config(10_000)).unwrap();
    let second = key_parts(&split)[1].file.clone();
    let mut files = files(&split);
    files.remove(&second).expect("there are several shards");

    let err = parts::assemble(&files).unwrap_err();

    assert_eq!(err, PartsError::Missing(second));
    assert!(err.is_pending(), "a part not mounted yet is waited for");
}

#[test]
fn a_shard_and_a_manifest_from_different_changes_never_pair_and_are_waited_for() {
    let old = config(10_000);
    let mut new = old.clone();
    new.keys.keys[4_321].limits = Some(CompiledLimits {
        requests_per_minute: Some(60),
        ..CompiledLimits::default()
    });
    let (old, new) = (parts::split(&old).unwrap(), parts::split(&new).unwrap());
    let changed: Vec<(&str, &str)> = key_parts(&old)
        .iter()
        .zip(key_parts(&new))
        .filter(|(a, b)| a.file != b.file)
        .map(|(a, b)| (a.file.as_str(), b.file.as_str()))
        .collect();
    assert_eq!(changed.len(), 1, "one shard changed, under a new name");
    let (old_file, new_file) = changed[0];
    let old_files = files(&old);
    let new_files = files(&new);
    // The ConfigMap (manifest) updated, the shard's Secret not yet; then the other way.
    let mut manifest_first = old_files.clone();
    manifest_first.insert(MANIFEST_FILE.to_owned(), new_files[MANIFEST_FILE].clone());
    let mut shard_first = old_files.clone();
    shard_first.remove(old_file);
    shard_first.insert(new_file.to_owned(), new_files[new_file].clone());
    for (what, set, missing) in [
        ("new manifest, old shard", manifest_first, new_file),
        ("old manifest, new shard", shard_first, old_file),
    ] {
        let err = parts::assemble(&set).unwrap_err();
        assert_eq!(err, PartsError::Missing(missing.to_owned()), "{what}");
        assert!(err.is_pending(), "{what}");
    }
}

#[test]
fn missing_manifest_is_refused_with_missing() {
    let split = parts::split(&config(1)).unwrap();
    let mut files = files(&split);
    files.remove(MANIFEST_FILE);

    let err = parts::assemble(&files).unwrap_err();

    assert_eq!(err, PartsError::Missing(MANIFEST_FILE.to_owned()));
    assert!(!err.is_pending(), "no manifest: nothing to wait for");
}

#[test]
fn manifest_of_another_configuration_is_refused() {
    let old = config(25);
    let mut new = old.clone();
    new.routing.routes[0].retry_attempts = 5;
    let (old, new) = (parts::split(&old).unwrap(), parts::split(&new).unwrap());
    // kubelet updated the Secrets and the routing part, but not yet the manifest.
    let mut files = files(&new);
    files.insert(MANIFEST_FILE.to_owned(), old.parts[0].bytes.clone());

    let err = parts::assemble(&files).unwrap_err();

    assert!(
        matches!(&err, PartsError::HashMismatch { file, .. } if file == ROUTING_FILE),
        "{err:?}"
    );
}

#[test]
fn manifest_with_an_unknown_schema_version_is_refused() {
    let split = parts::split(&config(1)).unwrap();
    let mut files = files(&split);
    let manifest = replace_once(
        &files[MANIFEST_FILE],
        "\"schemaVersion\": 1",
        "\"schemaVersion\": 2",
    );
    files.insert(MANIFEST_FILE.to_owned(), manifest);

    let err = parts::assemble(&files).unwrap_err();

    assert_eq!(
        err,
        PartsError::Version {
            file: MANIFEST_FILE.to_owned(),
            found: 2,
        }
    );
}

#[test]
fn part_with_an_unknown_schema_version_is_refused() {
    let split = parts::split(&config(1)).unwrap();
    let mut files = files(&split);
    let routing = replace_once(
        &files[ROUTING_FILE],
        "{\"schemaVersion\":1,",
        "{\"schemaVersion\":7,",
    );
    files.insert(ROUTING_FILE.to_owned(), routing);

    let err = parts::assemble(&files).unwrap_err();

    assert_eq!(
        err,
        PartsError::Version {
            file: ROUTING_FILE.to_owned(),
            found: 7,
        }
    );
}

// === Keeping credentials out of ConfigMaps ===

#[test]
fn manifest_and_routing_go_to_config_maps_and_credentials_and_keys_to_secrets() {
    let split = parts::split(&config(10_000)).unwrap();

    for part in &split.parts {
        let expected = if part.file == MANIFEST_FILE || part.file == ROUTING_FILE {
            Store::ConfigMap
        } else {
            assert!(
                parts::kind_of(&part.file).is_some_and(|k| k != PartKind::Routing),
                "unexpected part {}",
                part.file
            );
            Store::Secret
        };
        assert_eq!(part.store, expected, "{}", part.file);
    }
    let manifest: serde_json::Value = serde_json::from_slice(&split.parts[0].bytes).unwrap();
    for entry in manifest["parts"].as_array().unwrap() {
        let file = entry["file"].as_str().unwrap();
        let store = if file == ROUTING_FILE {
            "configMap"
        } else {
            "secret"
        };
        assert_eq!(entry["store"], store, "{file}");
    }
}

#[test]
fn credentials_never_appear_in_config_map_parts() {
    let split = parts::split(&config(25)).unwrap();
    let needle = CREDENTIAL.as_bytes();
    let contains = |bytes: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);

    for part in split.parts.iter().filter(|p| p.store == Store::ConfigMap) {
        assert!(!contains(&part.bytes), "{} holds the credential", part.file);
    }
    let file = credentials_file(&split);
    let credentials = split.parts.iter().find(|p| p.file == file).unwrap();
    assert!(
        contains(&credentials.bytes),
        "the credential must be somewhere"
    );
    assert!(!format!("{:?}", split.parts).contains(CREDENTIAL));
}

#[test]
fn debug_output_of_credentials_hides_their_values() {
    let config = config(1);

    let debug = format!("{:?}", config.credentials);

    assert!(!debug.contains(CREDENTIAL), "{debug}");
    assert!(debug.contains("ml/openai"), "{debug}");
    assert!(!format!("{config:?}").contains(CREDENTIAL));
}
