//! ApiKeys: secrets and key values, expiry and disabling, conflicts, allowed models,
//! budgets and limits, rotation and grace periods.

use super::*;

#[test]
fn valid_api_key_is_served_with_an_id_from_its_name_and_a_short_prefix() {
    let out = keyed_world(api_key("alice")).compile();

    let object = key_ref("alice");
    assert_clean(&out, &object);
    let hash = sha256(ALICE_KEY);
    let outcome = &out.objects[&object];
    let id = &sha256(&format!("apikey:{NS}/alice"))[..24];
    assert_eq!(outcome.key_id.as_deref(), Some(id));
    assert_eq!(crate::compile::key_id(&object.namespace, &object.name), id);
    assert_eq!(outcome.key_prefix.as_deref(), Some("tg_live"));
    assert_eq!(outcome.secret_name.as_deref(), Some("alice-key"));
    let entries = compiled_keys(&out, "alice");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].sha256, hash);
    assert_eq!(entries[0].id, id);
    assert_eq!(entries[0].owner, "alice");
    assert_eq!(entries[0].expires_at, None);
}

#[test]
fn key_prefix_never_shows_more_than_a_quarter_of_a_short_key() {
    let key = "abcdefghij0123456789";
    let out = routed_world()
        .api_key(api_key("alice"))
        .secret(key_secret("alice", key))
        .compile();

    assert_eq!(
        out.objects[&key_ref("alice")].key_prefix.as_deref(),
        Some("abcde")
    );
}

#[test]
fn api_key_without_its_secret_reports_secret_not_found() {
    let out = routed_world().api_key(api_key("alice")).compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::SECRET_NOT_FOUND,
        "spec.secretName",
        "Secret team-a/alice-key not found",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::SECRET_NOT_FOUND),
        ("False", reasons::SECRET_NOT_FOUND),
    );
    assert_left_out(&out, &object);
    assert_eq!(
        out.objects[&object].secret_name.as_deref(),
        Some("alice-key")
    );
    assert!(out.config.keys.keys.is_empty());
}

#[test]
fn api_key_secret_without_an_api_key_entry_reports_secret_key_not_found() {
    let mut key = api_key("alice");
    key.spec.secret_name = Some("alice-credentials".to_owned());
    let out = routed_world()
        .api_key(key)
        .secret(string_secret("alice-credentials", &[("token", ALICE_KEY)]))
        .compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::SECRET_KEY_NOT_FOUND,
        "spec.secretName",
        "Secret team-a/alice-credentials has no key \"apiKey\"",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::SECRET_KEY_NOT_FOUND),
        ("False", reasons::SECRET_KEY_NOT_FOUND),
    );
    assert_left_out(&out, &object);
}

#[test]
fn api_key_shorter_than_twenty_characters_reports_invalid_key() {
    let out = routed_world()
        .api_key(api_key("alice"))
        .secret(key_secret("alice", "changeme-0123"))
        .compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_KEY,
        "spec.secretName",
        "shorter than 20 characters",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::INVALID_KEY),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
    assert!(out.config.keys.keys.is_empty());
    assert_never_mentioned(&out, "changeme");
}

#[test]
fn a_generated_key_with_a_broken_checksum_reports_invalid_key() {
    let good = crate::key_format::from_random(&[42u8; 64]).unwrap();
    let out = routed_world()
        .api_key(api_key("alice"))
        .secret(key_secret("alice", &good))
        .compile();
    assert!(out.objects[&key_ref("alice")].served);

    let broken = format!("{}x", &good[..good.len() - 1]);
    let out = routed_world()
        .api_key(api_key("alice"))
        .secret(key_secret("alice", &broken))
        .compile();
    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_KEY,
        "spec.secretName",
        "checksum does not match",
    );
    assert_left_out(&out, &object);
    assert_never_mentioned(&out, &broken);
}

#[test]
fn blank_api_key_reports_invalid_key() {
    let out = routed_world()
        .api_key(api_key("alice"))
        .secret(data_secret("alice-key", &[("apiKey", b"  \n")]))
        .compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_KEY,
        "spec.secretName",
        "the value is empty",
    );
    assert_left_out(&out, &object);
}

#[test]
fn disabled_api_key_is_not_served() {
    let mut key = api_key("alice");
    key.spec.disabled = true;
    let out = keyed_world(key).compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::DISABLED,
        "spec.disabled",
        "the key is disabled",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::DISABLED),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
    assert!(out.config.keys.keys.is_empty());
}

#[test]
fn api_key_at_or_past_its_expiry_reports_expired() {
    for seconds in [-3_600, 0] {
        let mut key = api_key("alice");
        key.spec.expires_at = Some(at(seconds));
        let out = keyed_world(key).compile();

        let object = key_ref("alice");
        assert_diagnostic(
            &out,
            &object,
            Severity::Error,
            reasons::EXPIRED,
            "spec.expiresAt",
            "the key expired at",
        );
        assert_conditions(
            &out,
            &object,
            ("False", reasons::EXPIRED),
            ("True", reasons::RESOLVED),
        );
        assert_left_out(&out, &object);
        assert!(out.config.keys.keys.is_empty());
    }
}

#[test]
fn api_key_expiring_later_is_served_with_its_expiry_in_unix_seconds() {
    let mut key = api_key("alice");
    key.spec.expires_at = Some(at(86_400));
    let out = keyed_world(key).compile();

    assert_clean(&out, &key_ref("alice"));
    let entries = compiled_keys(&out, "alice");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].expires_at, Some(1_750_086_400));
}

#[test]
fn same_key_value_in_two_api_keys_rejects_the_newer_with_key_conflict() {
    let newer = created(api_key("aa-newer"), 60);
    let older = created(api_key("zz-older"), 7_200);
    let out = routed_world()
        .api_key(newer)
        .secret(key_secret("aa-newer", ALICE_KEY))
        .api_key(older)
        .secret(key_secret("zz-older", ALICE_KEY))
        .compile();

    let object = key_ref("aa-newer");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::KEY_CONFLICT,
        "spec.secretName",
        "the key in Secret aa-newer-key is also used by ApiKey team-a/zz-older",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::KEY_CONFLICT),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
    assert_eq!(out.objects[&object].key_id, None);

    assert_clean(&out, &key_ref("zz-older"));
    assert_eq!(out.config.keys.keys.len(), 1);
    assert_eq!(out.config.keys.keys[0].api_key, "team-a/zz-older");
    assert_never_mentioned(&out, ALICE_KEY);
}

#[test]
fn invalid_allowed_models_glob_keeps_the_key_out_of_service() {
    // Dropping the bad entry would leave an empty allow-list, which allows everything.
    for allowed in [vec!["gpt-[4"], vec!["gpt-4o", "gpt-[4"]] {
        let mut key = api_key("alice");
        key.spec.allowed_models = allowed.iter().map(|m| (*m).to_owned()).collect();
        let out = keyed_world(key).compile();

        let object = key_ref("alice");
        let index = allowed.len() - 1;
        assert_diagnostic(
            &out,
            &object,
            Severity::Error,
            reasons::INVALID_MODEL_PATTERN,
            &format!("spec.allowedModels[{index}]"),
            "\"gpt-[4\" is not a valid glob",
        );
        assert_conditions(
            &out,
            &object,
            ("False", reasons::INVALID_MODEL_PATTERN),
            ("True", reasons::RESOLVED),
        );
        assert_left_out(&out, &object);
        assert!(out.config.keys.keys.is_empty(), "{allowed:?}");
    }
}

#[test]
fn allowed_model_that_no_route_serves_warns_unknown_model() {
    let mut key = api_key("alice");
    key.spec.allowed_models = ["gpt-4o", "gpt-5", "claude-*", "o1-preview"]
        .map(str::to_owned)
        .to_vec();
    let out = keyed_world(key)
        .route(route("reasoning", &["o1-*"], vec![target("openai")]))
        .compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Warning,
        reasons::UNKNOWN_MODEL,
        "spec.allowedModels[1]",
        "no RoutePolicy this key can use serves \"gpt-5\"",
    );
    assert_eq!(
        out.diagnostics_for(&object).count(),
        1,
        "globs and models served by a route or a route's glob are not reported: {:#?}",
        out.diagnostics
    );
    let conditions = assert_conditions(
        &out,
        &object,
        ("True", reasons::READY),
        ("True", reasons::RESOLVED),
    );
    assert_served(&out, &object);
    assert!(conditions[0].message.contains("gpt-5"));
    let entries = compiled_keys(&out, "alice");
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].allowed_models,
        ["gpt-4o", "gpt-5", "claude-*", "o1-preview"]
    );
}

#[test]
fn budget_in_a_currency_no_provider_uses_warns_currency_mismatch() {
    let mut key = api_key("alice");
    key.spec.budget = Some(Budget {
        amount: 100.0,
        period: BudgetPeriod::Daily,
        currency: "EUR".to_owned(),
    });
    let out = keyed_world(key).compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Warning,
        reasons::CURRENCY_MISMATCH,
        "spec.budget.currency",
        "no Provider prices in EUR",
    );
    assert_conditions(
        &out,
        &object,
        ("True", reasons::READY),
        ("True", reasons::RESOLVED),
    );
    assert_served(&out, &object);
    assert_eq!(
        compiled_keys(&out, "alice")[0].budget,
        Some(CompiledBudget {
            amount: 100.0,
            period: BudgetPeriod::Daily,
            currency: "EUR".to_owned(),
        })
    );
}

#[test]
fn budget_in_the_providers_currency_compiles_without_warning() {
    let mut key = api_key("alice");
    key.spec.budget = Some(Budget {
        amount: 100.0,
        period: BudgetPeriod::Monthly,
        currency: "USD".to_owned(),
    });
    let out = keyed_world(key).compile();

    assert_clean(&out, &key_ref("alice"));
}

#[test]
fn non_positive_budget_is_rejected() {
    for amount in [0.0, -5.0, f64::NAN] {
        let mut key = api_key("alice");
        key.spec.budget = Some(Budget {
            amount,
            period: BudgetPeriod::Monthly,
            currency: "USD".to_owned(),
        });
        let out = keyed_world(key).compile();

        let object = key_ref("alice");
        assert_diagnostic(
            &out,
            &object,
            Severity::Error,
            reasons::INVALID_SPEC,
            "spec.budget.amount",
            "budget amount must be a positive number",
        );
        assert_left_out(&out, &object);
    }
}

#[test]
fn zero_key_limits_are_rejected() {
    let mut key = api_key("alice");
    key.spec.limits = Some(Limits {
        requests_per_minute: Some(60),
        tokens_per_minute: Some(0),
        max_concurrent: None,
    });
    let out = keyed_world(key).compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.limits",
        "limits must be at least 1",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::INVALID_SPEC),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
}

/// `key` with a rotation policy of one hour's grace.
pub(super) fn rotated(key: ApiKey) -> ApiKey {
    let mut key = key;
    key.spec.rotation = Some(Rotation {
        generation: 1,
        grace_period: "1h".to_owned(),
    });
    key
}

/// The key Secret of ApiKey `api_key` after a rotation: `value` is current, `previous`
/// accepted until `grace_ends`, as the operator writes it.
pub(super) fn rotated_secret(
    api_key: &str,
    value: &str,
    previous: &str,
    grace_ends: Time,
) -> Secret {
    string_secret(
        &format!("{api_key}-key"),
        &[
            ("apiKey", value),
            (PREVIOUS_KEY_SHA256_SECRET_KEY, &sha256(previous)),
            (PREVIOUS_KEY_EXPIRES_SECRET_KEY, &grace_ends.0.to_string()),
        ],
    )
}

/// Alice rotated from `BOB_KEY` (as her previous key) to `ALICE_KEY`.
fn alice_rotated(key: ApiKey, grace_ends: Time) -> World {
    keyed_world(rotated(key)).secret(rotated_secret("alice", ALICE_KEY, BOB_KEY, grace_ends))
}

#[test]
fn rotated_out_key_within_its_grace_period_is_accepted_under_the_same_id() {
    let out = alice_rotated(api_key("alice"), at(1_800)).compile();

    assert_clean(&out, &key_ref("alice"));
    let entries = compiled_keys(&out, "alice");
    assert_eq!(entries.len(), 2);
    // The id names the ApiKey, not its key: a rotation keeps limits, budget and usage.
    let id = &sha256(&format!("apikey:{NS}/alice"))[..24];
    let current = entries.iter().find(|e| e.sha256 == sha256(ALICE_KEY));
    let previous = entries.iter().find(|e| e.sha256 == sha256(BOB_KEY));
    let (current, previous) = (current.unwrap(), previous.unwrap());
    assert_eq!(current.id, id);
    assert_eq!(previous.id, id);
    assert_eq!(current.expires_at, None);
    assert_eq!(previous.expires_at, Some(now().as_second() + 1_800));
    assert_eq!(previous.owner, current.owner);
    assert_eq!(previous.api_key, current.api_key);
}

#[test]
fn rotated_out_key_stops_when_the_key_itself_expires_first() {
    let mut key = api_key("alice");
    key.spec.expires_at = Some(at(600));
    let out = alice_rotated(key, at(1_800)).compile();

    let previous = compiled_keys(&out, "alice")
        .into_iter()
        .find(|e| e.sha256 == sha256(BOB_KEY))
        .expect("previous key is still in its grace period");
    assert_eq!(previous.expires_at, Some(now().as_second() + 600));
}

#[test]
fn rotated_out_key_past_its_grace_period_is_dropped() {
    let out = alice_rotated(api_key("alice"), at(-1)).compile();

    assert_clean(&out, &key_ref("alice"));
    let entries = compiled_keys(&out, "alice");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].sha256, sha256(ALICE_KEY));
}

#[test]
fn a_previous_key_injected_through_the_status_is_never_accepted() {
    // `apikeys/status` is writable by whoever may patch it: a hash of one's choosing with
    // a far expiry must not become a valid key.
    let mut key = api_key("alice");
    key.status = Some(ApiKeyStatus {
        previous_key: Some(PreviousKey {
            sha256: sha256("tg_live_attacker_chosen_key_000"),
            expires_at: at(10 * 365 * 86_400),
        }),
        ..ApiKeyStatus::default()
    });
    let out = keyed_world(key).compile();

    let entries = compiled_keys(&out, "alice");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].sha256, sha256(ALICE_KEY));
}

#[test]
fn a_previous_key_grace_period_longer_than_the_policy_is_refused() {
    let out = alice_rotated(api_key("alice"), at(30 * 86_400)).compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Warning,
        reasons::INVALID_KEY,
        "spec.secretName",
        "ends after spec.rotation.gracePeriod from now",
    );
    assert_eq!(compiled_keys(&out, "alice").len(), 1);
}

#[test]
fn malformed_previous_key_hash_is_ignored_with_an_invalid_key_warning() {
    let out = keyed_world(rotated(api_key("alice")))
        .secret(string_secret(
            "alice-key",
            &[
                ("apiKey", ALICE_KEY),
                (PREVIOUS_KEY_SHA256_SECRET_KEY, "NOT-A-HASH"),
                (PREVIOUS_KEY_EXPIRES_SECRET_KEY, &at(60).0.to_string()),
            ],
        ))
        .compile();

    let object = key_ref("alice");
    assert_diagnostic(
        &out,
        &object,
        Severity::Warning,
        reasons::INVALID_KEY,
        "spec.secretName",
        "is not a SHA-256 hex digest",
    );
    assert_conditions(
        &out,
        &object,
        ("True", reasons::READY),
        ("True", reasons::RESOLVED),
    );
    let entries = compiled_keys(&out, "alice");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].sha256, sha256(ALICE_KEY));
}

#[test]
fn previous_key_used_by_an_older_api_key_rejects_the_newer_with_key_conflict() {
    let older = created(api_key("zz-older"), 7_200);
    let newer = rotated(created(api_key("aa-newer"), 60));
    let out = routed_world()
        .api_key(newer)
        .secret(rotated_secret("aa-newer", BOB_KEY, ALICE_KEY, at(1_800)))
        .api_key(older)
        .secret(key_secret("zz-older", ALICE_KEY))
        .compile();

    let object = key_ref("aa-newer");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::KEY_CONFLICT,
        "spec.secretName",
        "the previous key in Secret aa-newer-key is also used by ApiKey team-a/zz-older",
    );
    assert_left_out(&out, &object);
    assert_clean(&out, &key_ref("zz-older"));
}

#[test]
fn compiled_keys_are_sorted_by_hash() {
    let out = routed_world()
        .api_key(rotated(api_key("alice")))
        .secret(rotated_secret(
            "alice",
            ALICE_KEY,
            "tg_live_carol_0000000000000000",
            at(60),
        ))
        .api_key(api_key("bob"))
        .secret(key_secret("bob", BOB_KEY))
        .compile();

    let hashes: Vec<&str> = out
        .config
        .keys
        .keys
        .iter()
        .map(|k| k.sha256.as_str())
        .collect();
    assert_eq!(hashes.len(), 3);
    assert!(hashes.is_sorted(), "{hashes:?}");
}

#[test]
fn key_value_of_a_disabled_older_api_key_does_not_block_a_newer_one() {
    let mut older = created(api_key("zz-older"), 7_200);
    older.spec.disabled = true;
    let newer = created(api_key("aa-newer"), 60);
    let out = routed_world()
        .api_key(older)
        .secret(key_secret("zz-older", ALICE_KEY))
        .api_key(newer)
        .secret(key_secret("aa-newer", ALICE_KEY))
        .compile();

    assert_clean(&out, &key_ref("aa-newer"));
    assert_left_out(&out, &key_ref("zz-older"));
    assert_eq!(out.config.keys.keys.len(), 1);
}

#[test]
fn an_api_key_whose_secret_name_can_never_exist_is_invalid_alone() {
    // 250 characters: `<name>-key` is 254, one over the API's limit for Secret names.
    let long = format!("a{}", "b".repeat(249));
    let out = keyed_world(api_key("alice"))
        .api_key(api_key(&long))
        .secret(key_secret(&long, BOB_KEY))
        .compile();
    let object = key_ref(&long);
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.secretName",
        "254 characters) is not a valid Secret name",
    );
    assert_left_out(&out, &object);
    // The others are untouched.
    assert_clean(&out, &key_ref("alice"));
    // A short spec.secretName fixes it; a bad one is named as such.
    let mut fixed = api_key(&long);
    fixed.spec.secret_name = Some("long-key".to_owned());
    let out = routed_world()
        .api_key(fixed.clone())
        .secret(string_secret("long-key", &[("apiKey", BOB_KEY)]))
        .compile();
    assert_clean(&out, &object);
    fixed.spec.secret_name = Some("Bad_Name".to_owned());
    let out = routed_world().api_key(fixed).compile();
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.secretName",
        "spec.secretName (8 characters)",
    );
}
