//! Guardrails on routes and keys: detectors, patterns and their limits.

use super::*;

fn guardrail(detector: crate::v1alpha1::Detector) -> crate::v1alpha1::Guardrail {
    crate::v1alpha1::Guardrail {
        name: None,
        detector,
        pattern: None,
        terms: Vec::new(),
        limit: None,
        action: crate::v1alpha1::GuardrailAction::Block,
        apply_to: vec![crate::v1alpha1::GuardrailTarget::Request],
    }
}

#[test]
fn route_guardrails_compile_with_default_names() {
    use crate::v1alpha1::{Detector, GuardrailAction};
    let mut policy = route("chat", &["gpt-4o"], vec![target("openai")]);
    let mut custom = guardrail(Detector::Regex);
    custom.name = Some("ticket".into());
    custom.pattern = Some(r"TCK-\d+".into());
    custom.action = GuardrailAction::Redact;
    let mut size = guardrail(Detector::MaxPromptBytes);
    size.limit = Some(1000);
    policy.spec.guardrails = vec![guardrail(Detector::Email), custom, size];
    let out = openai_world().route(policy).compile();
    assert_clean(&out, &route_ref("chat"));
    let compiled = compiled_route(&out, "chat").expect("served");
    let names: Vec<_> = compiled
        .guardrails
        .iter()
        .map(|g| g.name.as_str())
        .collect();
    assert_eq!(names, ["email", "ticket", "maxPromptBytes"]);
    assert_eq!(compiled.guardrails[1].action, GuardrailAction::Redact);
}

#[test]
fn route_with_an_invalid_guardrail_is_left_out_with_invalid_spec_and_others_keep_serving() {
    use crate::v1alpha1::{Detector, GuardrailAction};
    let mut bad = route("strict", &["gpt-4o"], vec![target("openai")]);
    let mut regex = guardrail(Detector::Regex);
    regex.pattern = Some("(unclosed".into());
    let mut size = guardrail(Detector::MaxMessages);
    size.limit = Some(5);
    size.action = GuardrailAction::Redact;
    bad.spec.guardrails = vec![regex, size];
    let good = route("mini", &["gpt-4o-mini"], vec![target("openai")]);
    let out = openai_world().route(bad).route(good).compile();
    let strict = route_ref("strict");
    assert_diagnostic(
        &out,
        &strict,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.guardrails[0]",
        "invalid pattern",
    );
    assert_diagnostic(
        &out,
        &strict,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.guardrails[1]",
        "cannot redact",
    );
    assert_left_out(&out, &strict);
    assert_served(&out, &route_ref("mini"));
}

#[test]
fn duplicate_guardrail_names_are_invalid() {
    use crate::v1alpha1::Detector;
    let mut policy = route("chat", &["gpt-4o"], vec![target("openai")]);
    policy.spec.guardrails = vec![guardrail(Detector::Email), guardrail(Detector::Email)];
    let out = openai_world().route(policy).compile();
    assert_diagnostic(
        &out,
        &route_ref("chat"),
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.guardrails[1].name",
        "used twice",
    );
    assert_left_out(&out, &route_ref("chat"));
}

#[test]
fn api_key_guardrails_compile_and_an_invalid_one_keeps_the_key_out() {
    use crate::v1alpha1::Detector;
    let mut key = api_key("alice");
    key.spec.guardrails = vec![guardrail(Detector::Secret)];
    let out = keyed_world(key.clone()).compile();
    assert_served(&out, &key_ref("alice"));
    assert_eq!(compiled_keys(&out, "alice")[0].guardrails[0].name, "secret");

    let mut terms = guardrail(Detector::BlockedTerms);
    terms.terms = vec!["  ".into()];
    key.spec.guardrails = vec![terms];
    let out = keyed_world(key).compile();
    assert_diagnostic(
        &out,
        &key_ref("alice"),
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.guardrails[0]",
        "blockedTerms",
    );
    assert_left_out(&out, &key_ref("alice"));
    assert_served(&out, &route_ref("chat"));
}

#[test]
fn strategy_options_compile_and_out_of_range_ones_keep_the_route_out() {
    use crate::v1alpha1::{Strategy, StrategyOptions};
    let mut tuned = route("tuned", &["gpt-4o"], vec![target("openai")]);
    tuned.spec.strategy = Strategy::Adaptive;
    tuned.spec.strategy_options = Some(StrategyOptions {
        exploration_percent: 0,
        memory: 20,
        latency_weight: 100,
        cost_weight: 200,
    });
    let mut wild = route("wild", &["gpt-4o-mini"], vec![target("openai")]);
    wild.spec.strategy = Strategy::LeastLatency;
    wild.spec.strategy_options = Some(StrategyOptions {
        memory: 0,
        ..Default::default()
    });
    let out = openai_world().route(tuned).route(wild).compile();
    assert_clean(&out, &route_ref("tuned"));
    let compiled = compiled_route(&out, "tuned").unwrap();
    assert_eq!(compiled.strategy_options.memory, 20);
    assert_eq!(compiled.strategy_options.cost_exponent(), 2.0);
    assert_eq!(compiled.strategy_options.exploration(), 0.0);
    assert_diagnostic(
        &out,
        &route_ref("wild"),
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.strategyOptions",
        "memory between 1 and 100",
    );
    assert_left_out(&out, &route_ref("wild"));

    // Options on a weighted route are accepted with a warning: they do nothing there.
    let mut weighted = route("chat", &["gpt-4o"], vec![target("openai")]);
    weighted.spec.strategy_options = Some(StrategyOptions::default());
    let out = openai_world().route(weighted).compile();
    assert_diagnostic(
        &out,
        &route_ref("chat"),
        Severity::Warning,
        reasons::INVALID_SPEC,
        "spec.strategyOptions",
        "no effect",
    );
    assert_served(&out, &route_ref("chat"));
}

#[test]
fn default_strategy_options_are_left_out_of_compiled_configuration() {
    let out = routed_world().compile();
    let text = serde_json::to_string(compiled_route(&out, "chat").unwrap()).unwrap();
    assert!(!text.contains("strategyOptions"), "{text}");
    let back: CompiledRoute = serde_json::from_str(&text).unwrap();
    assert_eq!(back.strategy_options, Default::default());
    assert_eq!(back.strategy_options.ewma_alpha(), 2.0 / 6.0);
    assert_eq!(back.strategy_options.outcome_decay(), 0.8);
}
