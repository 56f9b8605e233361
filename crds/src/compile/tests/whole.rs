//! Whole compilations: several objects at once, ordering, hashes and round trips.

use super::{
    api_key::{rotated, rotated_secret},
    *,
};

/// A provider, a route and a key that compile cleanly.
fn healthy_world() -> World {
    let mut key = api_key("alice");
    key.spec.allowed_models = vec!["gpt-4o".to_owned()];
    keyed_world(key)
}

#[test]
fn one_broken_object_does_not_change_how_the_others_compile() {
    let baseline = healthy_world().compile();
    assert!(
        baseline.diagnostics.is_empty(),
        "{:#?}",
        baseline.diagnostics
    );

    let mut disabled = api_key("broken");
    disabled.spec.disabled = true;
    let cases = [
        (
            provider_ref("broken"),
            healthy_world().provider(provider("broken", ProviderType::Openai, &["gpt-4o"])),
        ),
        (
            route_ref("broken"),
            healthy_world().route(route("broken", &["mistral-large"], vec![target("nowhere")])),
        ),
        (
            key_ref("broken"),
            healthy_world()
                .api_key(disabled)
                .secret(key_secret("broken", BOB_KEY)),
        ),
    ];
    for (broken, world) in cases {
        let out = world.compile();

        assert_eq!(out.config, baseline.config, "{broken} changed the config");
        assert_left_out(&out, &broken);
        assert!(!out.diagnostics.is_empty());
        assert!(
            out.diagnostics.iter().all(|d| d.object == broken),
            "{:#?}",
            out.diagnostics
        );
        let mut others = out.objects.clone();
        others.remove(&broken);
        assert_eq!(others, baseline.objects, "{broken} changed other outcomes");
        for object in baseline.objects.keys() {
            assert_eq!(out.conditions(object), baseline.conditions(object));
        }
    }
}

#[test]
fn route_cannot_use_a_provider_from_another_namespace() {
    let mut elsewhere = route("chat", &["gpt-4o"], vec![target("openai")]);
    elsewhere.metadata.namespace = Some("team-b".to_owned());
    let out = openai_world().route(elsewhere).compile();

    let object = ObjectRef::new(Kind::RoutePolicy, "team-b", "chat");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::PROVIDER_NOT_FOUND,
        "spec.targets[0].provider",
        "Provider team-b/openai not found",
    );
    assert_left_out(&out, &object);
}

#[test]
fn objects_and_secrets_without_a_namespace_compile_in_the_default_namespace() {
    let mut p = openai(&["gpt-4o"]);
    p.metadata.namespace = None;
    let mut secret = credential_secret("openai", OPENAI_TOKEN);
    secret.metadata.namespace = None;
    let out = World::default().provider(p).secret(secret).compile();

    assert_clean(
        &out,
        &ObjectRef::new(Kind::Provider, DEFAULT_NAMESPACE, "openai"),
    );
    assert_eq!(
        out.config.credentials.providers["default/openai"],
        OPENAI_TOKEN
    );
}

/// Objects that compete with one another, so that input order could matter.
fn crowded_world() -> World {
    let mut expired = api_key("expired");
    expired.spec.expires_at = Some(at(-10));
    World::default()
        .provider(openai(&["gpt-4o", "gpt-4o-mini"]))
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .provider(provider(
            "anthropic",
            ProviderType::Anthropic,
            &["claude-3-5-sonnet"],
        ))
        .secret(credential_secret("anthropic", "sk-ant-123"))
        .provider(provider(
            "vllm",
            ProviderType::OpenaiCompatible,
            &["llama-3"],
        ))
        .route(created(
            route("chat", &["gpt-4o", "gpt-*"], vec![target("openai")]),
            500,
        ))
        .route(created(
            route(
                "rival",
                &["gpt-4o", "claude-3-5-sonnet"],
                vec![target("anthropic"), target_model("openai", "gpt-4o")],
            ),
            400,
        ))
        .route(route("local", &["llama-3"], vec![target("vllm")]))
        .route(route(
            "standalone",
            &["gpt-*", "mini"],
            vec![target_model("openai", "gpt-4o-mini")],
        ))
        .api_key(created(api_key("alice"), 300))
        .secret(key_secret("alice", ALICE_KEY))
        .api_key(created(api_key("copycat"), 200))
        .secret(key_secret("copycat", ALICE_KEY))
        .api_key(rotated(created(api_key("bob"), 100)))
        .secret(rotated_secret(
            "bob",
            BOB_KEY,
            "tg_live_bob_previous_0000000",
            at(60),
        ))
        .api_key(expired)
        .secret(key_secret("expired", "tg_live_expired_00000000000"))
}

#[test]
fn compile_gives_the_same_result_whatever_the_input_order() {
    let world = crowded_world();
    let first = world.compile();
    for reason in [reasons::MODEL_CONFLICT, reasons::KEY_CONFLICT] {
        assert!(
            first.diagnostics.iter().any(|d| d.reason == reason),
            "the world should contain a {reason}"
        );
    }
    assert!(!first.config.keys.keys.is_empty());

    let mut shuffled = world.clone();
    shuffled.resources.providers.reverse();
    shuffled.resources.route_policies.rotate_left(1);
    shuffled.resources.route_policies.swap(0, 2);
    shuffled.resources.api_keys.reverse();
    shuffled.resources.api_keys.rotate_left(1);
    shuffled.secrets.reverse();
    assert_ne!(
        shuffled
            .resources
            .route_policies
            .iter()
            .map(|r| r.metadata.name.clone())
            .collect::<Vec<_>>(),
        world
            .resources
            .route_policies
            .iter()
            .map(|r| r.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    let second = shuffled.compile();

    assert_eq!(second.config, first.config);
    assert_eq!(
        serde_json::to_string(&second.config.routing).unwrap(),
        serde_json::to_string(&first.config.routing).unwrap()
    );
    assert_eq!(second.diagnostics, first.diagnostics);
    assert_eq!(second.objects, first.objects);
}

#[test]
fn unparseable_base_url_is_rejected_without_echoing_it() {
    let mut p = openai(&["gpt-4o"]);
    p.spec.base_url = Some("https://svc:hunter2@bad host/v1".to_owned());
    let out = World::default()
        .provider(p)
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .compile();

    let object = provider_ref("openai");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::INVALID_SPEC,
        "spec.baseUrl",
        "not a valid URL",
    );
    assert_left_out(&out, &object);
    assert_never_mentioned(&out, "hunter2");
}

#[test]
fn repeated_retry_classes_are_compiled_once_in_their_first_order() {
    use crate::v1alpha1::RetryOn;
    let mut r = route("chat", &["gpt-4o"], vec![target("openai")]);
    r.spec.retries.retry_on = vec![
        RetryOn::ConnectError,
        RetryOn::Timeout,
        RetryOn::ConnectError,
        RetryOn::Timeout,
    ];
    let out = openai_world().route(r).compile();
    let compiled = compiled_route(&out, "chat").expect("chat is served");
    assert_eq!(compiled.retry_on, [RetryOn::ConnectError, RetryOn::Timeout]);
}
