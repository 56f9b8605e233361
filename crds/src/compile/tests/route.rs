//! RoutePolicies: targets and tiers, missing or unready providers, model patterns and
//! conflicts between policies, retries and limits.

use super::*;

#[test]
fn valid_route_compiles_its_targets_into_tiers_by_priority() {
    let backup = RouteTarget {
        priority: 1,
        ..target_model("openai", "gpt-4o-mini")
    };
    let out = openai_world()
        .route(route(
            "chat",
            &["gpt-4o", "gpt-*"],
            vec![backup, target("openai")],
        ))
        .compile();

    let object = route_ref("chat");
    assert_clean(&out, &object);
    assert_eq!(
        out.conditions(&object)[0].message,
        "routing 2 model name(s) to 2 target(s) in 2 tier(s)"
    );
    assert_eq!(out.objects[&object].ready_targets, Some(2));
    let r = compiled_route(&out, "chat").expect("route is served");
    assert_eq!(r.exact, ["gpt-4o"]);
    assert_eq!(r.globs, ["gpt-*"]);
    assert_eq!(
        r.tiers,
        vec![
            vec![CompiledTarget {
                provider: "team-a/openai".to_owned(),
                model: None,
                weight: 1,
            }],
            vec![CompiledTarget {
                provider: "team-a/openai".to_owned(),
                model: Some("gpt-4o-mini".to_owned()),
                weight: 1,
            }],
        ]
    );
    assert_eq!(r.retry_attempts, 2);
    assert_eq!(r.retry_initial_backoff_ms, 100);
    assert_eq!(r.retry_max_backoff_ms, 2_000);
}

#[test]
fn route_naming_a_missing_provider_reports_provider_not_found() {
    let out = openai_world()
        .route(route(
            "chat",
            &["gpt-4o"],
            vec![target("gone"), target("openai")],
        ))
        .compile();

    let object = route_ref("chat");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::PROVIDER_NOT_FOUND,
        "spec.targets[0].provider",
        "Provider team-a/gone not found",
    );
    assert_conditions(
        &out,
        &object,
        ("True", reasons::DEGRADED),
        ("False", reasons::PROVIDER_NOT_FOUND),
    );
    assert_served(&out, &object);
    let r = compiled_route(&out, "chat").expect("the other target keeps it serving");
    assert_eq!(r.tiers.len(), 1);
    assert_eq!(r.tiers[0].len(), 1);
    assert_eq!(r.tiers[0][0].provider, "team-a/openai");
    assert_eq!(out.objects[&object].ready_targets, Some(1));
}

#[test]
fn route_naming_a_provider_that_is_not_ready_reports_provider_not_ready() {
    let out = World::default()
        .provider(openai(&["gpt-4o"]))
        .route(route("chat", &["gpt-4o"], vec![target("openai")]))
        .compile();

    let object = route_ref("chat");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::PROVIDER_NOT_READY,
        "spec.targets[0].provider",
        "Provider team-a/openai is not Ready",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::PROVIDER_NOT_READY),
        ("False", reasons::PROVIDER_NOT_READY),
    );
    assert_left_out(&out, &object);
    assert!(out.config.routing.routes.is_empty());
}

#[test]
fn route_target_naming_a_model_its_provider_does_not_serve_reports_model_not_found() {
    let out = openai_world()
        .route(route(
            "smart",
            &["smart"],
            vec![
                target_model("openai", "gpt-5"),
                target_model("openai", "gpt-4o"),
            ],
        ))
        .compile();

    let object = route_ref("smart");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::MODEL_NOT_FOUND,
        "spec.targets[0].model",
        "Provider team-a/openai does not serve gpt-5",
    );
    assert_conditions(
        &out,
        &object,
        ("True", reasons::DEGRADED),
        ("False", reasons::MODEL_NOT_FOUND),
    );
    assert_served(&out, &object);
    let r = compiled_route(&out, "smart").expect("served by the valid target");
    assert_eq!(r.tiers[0][0].model.as_deref(), Some("gpt-4o"));
    assert_eq!(r.tiers[0].len(), 1);
}

#[test]
fn route_target_without_a_model_needs_every_exact_name_on_its_provider() {
    let fallback = RouteTarget {
        priority: 1,
        ..target_model("openai", "gpt-4o")
    };
    let out = openai_world()
        .route(route(
            "chat",
            &["gpt-4o", "claude-3-5-sonnet", "gpt-4o-*"],
            vec![target("openai"), fallback],
        ))
        .compile();

    let object = route_ref("chat");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::MODEL_NOT_FOUND,
        "spec.targets[0].model",
        "Provider team-a/openai does not serve claude-3-5-sonnet",
    );
    let d = out.diagnostics_for(&object).next().unwrap();
    assert!(
        !d.message.contains("gpt-4o"),
        "globs and served names are not missing: {d}"
    );
    assert_conditions(
        &out,
        &object,
        ("True", reasons::DEGRADED),
        ("False", reasons::MODEL_NOT_FOUND),
    );
    assert_served(&out, &object);
    let r = compiled_route(&out, "chat").expect("served by the fallback target");
    assert_eq!(r.exact, ["gpt-4o", "claude-3-5-sonnet"]);
    assert_eq!(r.globs, ["gpt-4o-*"]);
    assert_eq!(r.tiers.len(), 1);
    assert_eq!(r.tiers[0][0].model.as_deref(), Some("gpt-4o"));
}

#[test]
fn invalid_globs_are_dropped_while_the_valid_patterns_keep_serving() {
    let out = openai_world()
        .route(route(
            "chat",
            &["gpt-4o", "gpt-[4", "{a,b", "gpt-4o-*"],
            vec![target("openai")],
        ))
        .compile();

    let object = route_ref("chat");
    for (i, pattern) in [(1, "gpt-[4"), (2, "{a,b")] {
        assert_diagnostic(
            &out,
            &object,
            Severity::Error,
            reasons::INVALID_MODEL_PATTERN,
            &format!("spec.models[{i}]"),
            &format!("{pattern:?} is not a valid glob"),
        );
    }
    let conditions = assert_conditions(
        &out,
        &object,
        ("True", reasons::DEGRADED),
        ("True", reasons::RESOLVED),
    );
    assert_served(&out, &object);
    assert!(conditions[0].message.contains("gpt-[4"));
    let r = compiled_route(&out, "chat").expect("valid patterns keep serving");
    assert_eq!(r.exact, ["gpt-4o"]);
    assert_eq!(r.globs, ["gpt-4o-*"]);
}

#[test]
fn route_whose_targets_all_have_weight_zero_reports_no_usable_targets() {
    let drained = |t: RouteTarget| RouteTarget { weight: 0, ..t };
    let out = openai_world()
        .route(route(
            "chat",
            &["gpt-4o"],
            vec![
                drained(target("openai")),
                drained(target_model("openai", "gpt-4o-mini")),
            ],
        ))
        .compile();

    let object = route_ref("chat");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::NO_USABLE_TARGETS,
        "spec.targets",
        "every target has weight 0",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::NO_USABLE_TARGETS),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
    assert!(out.config.routing.routes.is_empty());
}

#[test]
fn route_whose_targets_are_all_unusable_reports_no_usable_targets_and_is_not_served() {
    let out = openai_world()
        .route(route(
            "chat",
            &["gpt-4o"],
            vec![target("gone"), target_model("openai", "gpt-5")],
        ))
        .compile();

    let object = route_ref("chat");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::NO_USABLE_TARGETS,
        "spec.targets",
        "no usable target is left",
    );
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::PROVIDER_NOT_FOUND,
        "spec.targets[0].provider",
        "Provider team-a/gone not found",
    );
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::MODEL_NOT_FOUND,
        "spec.targets[1].model",
        "does not serve gpt-5",
    );
    // Ready names the first problem found: the root cause, not its consequence.
    let conditions = assert_conditions(
        &out,
        &object,
        ("False", reasons::PROVIDER_NOT_FOUND),
        ("False", reasons::PROVIDER_NOT_FOUND),
    );
    assert!(conditions[0].message.contains("no usable target is left"));
    assert_left_out(&out, &object);
    assert!(compiled_route(&out, "chat").is_none());
}

#[test]
fn older_route_policy_keeps_a_contested_model_and_the_newer_reports_model_conflict() {
    // Names sort the other way round, so only the creation time can decide.
    let newer = created(
        route(
            "aa-newer",
            &["gpt-4o", "gpt-4o-mini"],
            vec![target("openai")],
        ),
        3_600,
    );
    let older = created(
        route("zz-older", &["gpt-4o"], vec![target("openai")]),
        7_200,
    );
    let out = openai_world().route(newer).route(older).compile();

    let newer = route_ref("aa-newer");
    assert_diagnostic(
        &out,
        &newer,
        Severity::Error,
        reasons::MODEL_CONFLICT,
        "spec.models[0]",
        "\"gpt-4o\" is already served by RoutePolicy team-a/zz-older",
    );
    assert_conditions(
        &out,
        &newer,
        ("True", reasons::DEGRADED),
        ("True", reasons::RESOLVED),
    );
    assert_served(&out, &newer);
    assert_eq!(
        compiled_route(&out, "aa-newer").map(|r| r.exact.clone()),
        Some(vec!["gpt-4o-mini".to_owned()])
    );

    assert_clean(&out, &route_ref("zz-older"));
    assert_eq!(
        compiled_route(&out, "zz-older").map(|r| r.exact.clone()),
        Some(vec!["gpt-4o".to_owned()])
    );
}

#[test]
fn route_policy_whose_every_model_is_taken_is_not_served() {
    let older = created(route("older", &["gpt-4o"], vec![target("openai")]), 7_200);
    let newer = created(route("newer", &["gpt-4o"], vec![target("openai")]), 60);
    let out = openai_world().route(newer).route(older).compile();

    let object = route_ref("newer");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::MODEL_CONFLICT,
        "spec.models[0]",
        "already served by RoutePolicy team-a/older",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::MODEL_CONFLICT),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
    assert!(compiled_route(&out, "newer").is_none());
}

#[test]
fn route_policy_without_creation_time_loses_conflicts_to_one_that_has_it() {
    let standalone = route("aa-standalone", &["gpt-4o"], vec![target("openai")]);
    let applied = created(route("zz-applied", &["gpt-4o"], vec![target("openai")]), 1);
    let out = openai_world().route(standalone).route(applied).compile();

    assert_clean(&out, &route_ref("zz-applied"));
    assert_diagnostic(
        &out,
        &route_ref("aa-standalone"),
        Severity::Error,
        reasons::MODEL_CONFLICT,
        "spec.models[0]",
        "already served by RoutePolicy team-a/zz-applied",
    );
}

#[test]
fn invalid_older_route_policy_does_not_keep_a_model_from_a_valid_newer_one() {
    let mut older = created(route("older", &["gpt-4o"], vec![target("openai")]), 7_200);
    older.spec.retries = Retries {
        initial_backoff: "5s".to_owned(),
        max_backoff: "1s".to_owned(),
        ..Retries::default()
    };
    let newer = created(route("newer", &["gpt-4o"], vec![target("openai")]), 60);
    let out = openai_world().route(older).route(newer).compile();

    assert_clean(&out, &route_ref("newer"));
    assert_eq!(
        compiled_route(&out, "newer").map(|r| r.exact.clone()),
        Some(vec!["gpt-4o".to_owned()])
    );
    assert_left_out(&out, &route_ref("older"));
    assert_conditions(
        &out,
        &route_ref("older"),
        ("False", reasons::INVALID_SPEC),
        ("True", reasons::RESOLVED),
    );
}

#[test]
fn max_backoff_shorter_than_initial_backoff_is_rejected() {
    let mut r = route("chat", &["gpt-4o"], vec![target("openai")]);
    r.spec.retries.initial_backoff = "2s".to_owned();
    r.spec.retries.max_backoff = "500ms".to_owned();
    let out = openai_world().route(r).compile();

    let object = route_ref("chat");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.retries.maxBackoff",
        "maxBackoff must not be shorter than initialBackoff",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::INVALID_SPEC),
        ("True", reasons::RESOLVED),
    );
    assert_left_out(&out, &object);
}

#[test]
fn zero_route_rate_limits_are_rejected() {
    let zeros = [
        Limits {
            requests_per_minute: Some(0),
            ..Limits::default()
        },
        Limits {
            tokens_per_minute: Some(0),
            ..Limits::default()
        },
        Limits {
            max_concurrent: Some(0),
            ..Limits::default()
        },
    ];
    for limits in zeros {
        let mut r = route("chat", &["gpt-4o"], vec![target("openai")]);
        r.spec.rate_limit = Some(limits.clone());
        let out = openai_world().route(r).compile();

        let object = route_ref("chat");
        assert_diagnostic(
            &out,
            &object,
            Severity::Error,
            reasons::INVALID_SPEC,
            "spec.rateLimit",
            "limits must be at least 1",
        );
        assert_left_out(&out, &object);
        assert!(out.config.routing.routes.is_empty());
    }
}
