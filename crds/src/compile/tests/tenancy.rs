//! Tenancy (docs/tenancy.md): what one namespace's objects can and cannot do to another's,
//! and sharing that both sides agreed to.

use super::*;
use crate::compile::{patterns, views};

const TEAM_B: &str = "team-b";
const PLATFORM: &str = "platform";

/// `obj` moved to namespace `ns`.
fn in_ns<K: kube::Resource>(ns: &str, mut obj: K) -> K {
    obj.meta_mut().namespace = Some(ns.to_owned());
    obj
}

/// `secret` moved to namespace `ns`.
fn secret_in(ns: &str, mut secret: Secret) -> Secret {
    secret.metadata.namespace = Some(ns.to_owned());
    secret
}

fn ns_ref(kind: Kind, ns: &str, name: &str) -> ObjectRef {
    ObjectRef::new(kind, ns, name)
}

/// Ids of the routes a key of `ns` accepting `shared` resolves `model` to, layer by layer.
fn resolve(out: &CompileOutput, ns: &str, shared: &[&str], model: &str) -> Option<String> {
    let shared: Vec<String> = shared.iter().map(|s| (*s).to_owned()).collect();
    views::layers(&out.config.routing.routes, ns, &shared)
        .into_iter()
        .find_map(|layer| {
            let exact = layer.iter().find(|r| r.exact.iter().any(|e| e == model));
            let glob = || {
                layer
                    .iter()
                    .filter_map(|r| {
                        r.globs
                            .iter()
                            .filter(|g| patterns::any_matches(std::slice::from_ref(*g), model))
                            .map(|g| patterns::specificity(g))
                            .max()
                            .map(|s| (s, *r))
                    })
                    .max_by_key(|(s, _)| *s)
                    .map(|(_, r)| r)
            };
            exact.copied().or_else(glob).map(|r| r.id.clone())
        })
}

/// Team A serves `gpt-4o*` from its own Provider; team B has its own Provider.
fn two_teams() -> World {
    World::default()
        .provider(openai(&["gpt-4o", "gpt-4o-mini"]))
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .route(created(
            route("chat", &["gpt-4o*"], vec![target("openai")]),
            600,
        ))
        .api_key(api_key("alice"))
        .secret(key_secret("alice", ALICE_KEY))
        .provider(in_ns(TEAM_B, openai(&["gpt-4o", "gpt-4o-mini"])))
        .secret(secret_in(
            TEAM_B,
            credential_secret("openai", "sk-team-b-upstream"),
        ))
}

#[test]
fn an_exact_name_in_another_namespace_does_not_take_a_teams_requests() {
    let out = two_teams()
        .route(in_ns(
            TEAM_B,
            route("hijack", &["gpt-4o"], vec![target("openai")]),
        ))
        .compile();

    assert_clean(&out, &route_ref("chat"));
    assert_eq!(
        resolve(&out, NS, &[], "gpt-4o").as_deref(),
        Some("team-a/chat")
    );
    assert_eq!(
        resolve(&out, TEAM_B, &[], "gpt-4o").as_deref(),
        Some("team-b/hijack")
    );
}

#[test]
fn a_longer_glob_in_another_namespace_does_not_take_a_teams_requests() {
    let out = two_teams()
        .route(in_ns(
            TEAM_B,
            route("hijack", &["gpt-4o-*"], vec![target("openai")]),
        ))
        .compile();

    assert_eq!(
        resolve(&out, NS, &[], "gpt-4o-mini").as_deref(),
        Some("team-a/chat")
    );
}

#[test]
fn claiming_a_name_first_in_another_namespace_does_not_squat_it() {
    // Team B's policy is older and claims the very pattern team A uses: per-namespace
    // claims mean both are served, each to its own namespace.
    let out = two_teams()
        .route(in_ns(
            TEAM_B,
            created(route("squat", &["gpt-4o*"], vec![target("openai")]), 7_200),
        ))
        .compile();

    assert_clean(&out, &route_ref("chat"));
    assert_clean(&out, &ns_ref(Kind::RoutePolicy, TEAM_B, "squat"));
    assert_eq!(
        resolve(&out, NS, &[], "gpt-4o").as_deref(),
        Some("team-a/chat")
    );
}

#[test]
fn a_key_in_a_namespace_without_routes_reaches_no_model_and_says_why() {
    let out = two_teams()
        .api_key(in_ns("team-c", api_key("stray")))
        .secret(secret_in("team-c", key_secret("stray", BOB_KEY)))
        .compile();

    let object = ns_ref(Kind::ApiKey, "team-c", "stray");
    let d: Vec<_> = out.diagnostics_for(&object).collect();
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d[0].reason, reasons::NO_ROUTES);
    assert!(d[0].message.contains("team-a"), "{}", d[0].message);
    assert!(
        d[0].message.contains("sharedRoutesFrom"),
        "{}",
        d[0].message
    );
    assert_eq!(resolve(&out, "team-c", &[], "gpt-4o"), None);
}

#[test]
fn a_route_cannot_target_a_provider_of_another_namespace_that_is_not_shared() {
    let mut stolen = target("openai");
    stolen.provider_namespace = Some(NS.to_owned());
    let out = two_teams()
        .route(in_ns(TEAM_B, route("borrow", &["gpt-4o"], vec![stolen])))
        .compile();

    let object = ns_ref(Kind::RoutePolicy, TEAM_B, "borrow");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::REF_NOT_PERMITTED,
        "spec.targets[0].provider",
        "is not shared with namespace team-b",
    );
    assert_conditions(
        &out,
        &object,
        ("False", reasons::REF_NOT_PERMITTED),
        ("False", reasons::REF_NOT_PERMITTED),
    );
    assert_left_out(&out, &object);
}

#[test]
fn a_provider_shared_with_a_namespace_can_be_targeted_from_it() {
    let mut shared = openai(&["gpt-4o"]);
    shared.spec.shared_with = vec![TEAM_B.to_owned()];
    let mut borrowed = target("openai");
    borrowed.provider_namespace = Some(NS.to_owned());
    let out = World::default()
        .provider(shared)
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .route(in_ns(TEAM_B, route("borrow", &["gpt-4o"], vec![borrowed])))
        .compile();

    let object = ns_ref(Kind::RoutePolicy, TEAM_B, "borrow");
    assert_clean(&out, &object);
    assert_eq!(
        out.config.routing.routes[0].tiers[0][0].provider,
        "team-a/openai"
    );
}

/// A platform namespace offering `gpt-4o` to `shared_with`.
fn platform(shared_with: &[&str]) -> World {
    let mut offered = route(
        "platform-chat",
        &["gpt-4o", "gpt-4o-*"],
        vec![target("openai")],
    );
    offered.spec.shared_with = shared_with.iter().map(|s| (*s).to_owned()).collect();
    World::default()
        .provider(in_ns(PLATFORM, openai(&["gpt-4o", "gpt-4o-mini"])))
        .secret(secret_in(
            PLATFORM,
            credential_secret("openai", "sk-platform"),
        ))
        .route(in_ns(PLATFORM, offered))
}

fn accepting(key: ApiKey, from: &[&str]) -> ApiKey {
    let mut key = key;
    key.spec.shared_routes_from = from.iter().map(|s| (*s).to_owned()).collect();
    key
}

#[test]
fn a_shared_route_serves_a_key_that_accepts_it() {
    let out = platform(&["*"])
        .api_key(accepting(api_key("alice"), &[PLATFORM]))
        .secret(key_secret("alice", ALICE_KEY))
        .compile();

    assert_clean(&out, &key_ref("alice"));
    assert_eq!(
        compiled_keys(&out, "alice")[0].shared_routes_from,
        [PLATFORM]
    );
    assert_eq!(
        resolve(&out, NS, &[PLATFORM], "gpt-4o").as_deref(),
        Some("platform/platform-chat")
    );
    assert_eq!(
        out.config.routing.routes[0].shared_with,
        ["*"],
        "the offer is in the configuration gateways read"
    );
}

#[test]
fn a_shared_route_needs_both_the_offer_and_the_acceptance() {
    // Offered, not accepted: the key does not reach it.
    let offered_only = platform(&[NS])
        .api_key(api_key("alice"))
        .secret(key_secret("alice", ALICE_KEY))
        .compile();
    assert_eq!(resolve(&offered_only, NS, &[], "gpt-4o"), None);
    let alice = key_ref("alice");
    let d: Vec<_> = offered_only.diagnostics_for(&alice).collect();
    assert_eq!(d[0].reason, reasons::NO_ROUTES, "{d:#?}");

    // Accepted, offered to someone else: nothing, and the key says so.
    let accepted_only = platform(&[TEAM_B])
        .api_key(accepting(api_key("alice"), &[PLATFORM]))
        .secret(key_secret("alice", ALICE_KEY))
        .compile();
    assert_eq!(resolve(&accepted_only, NS, &[PLATFORM], "gpt-4o"), None);
    assert_diagnostic(
        &accepted_only,
        &key_ref("alice"),
        Severity::Warning,
        reasons::REF_NOT_PERMITTED,
        "spec.sharedRoutesFrom[0]",
        "namespace platform shares no RoutePolicy with namespace team-a",
    );
}

#[test]
fn a_shared_route_never_shadows_a_name_the_keys_namespace_serves() {
    let out = platform(&["*"])
        .provider(openai(&["gpt-4o", "gpt-4o-mini"]))
        .secret(credential_secret("openai", OPENAI_TOKEN))
        .route(route("own", &["gpt-4o*"], vec![target("openai")]))
        .api_key(accepting(api_key("alice"), &[PLATFORM]))
        .secret(key_secret("alice", ALICE_KEY))
        .compile();

    // The platform's exact `gpt-4o` loses to the team's own glob.
    assert_eq!(
        resolve(&out, NS, &[PLATFORM], "gpt-4o").as_deref(),
        Some("team-a/own")
    );
    assert_diagnostic(
        &out,
        &key_ref("alice"),
        Severity::Warning,
        reasons::SHARED_ROUTE_SHADOWED,
        "spec.sharedRoutesFrom",
        "\"gpt-4o\" of RoutePolicy platform/platform-chat",
    );
}

#[test]
fn a_provider_cannot_use_a_secret_that_did_not_consent() {
    // An ordinary Secret of the namespace (a service-account token, say).
    let out = World::default()
        .provider(openai(&["gpt-4o"]))
        .secret(string_secret(
            "openai-credentials",
            &[("token", "eyJhbGciOiJSUzI1NiJ9.service-account-token")],
        ))
        .compile();

    let object = provider_ref("openai");
    assert_diagnostic(
        &out,
        &object,
        Severity::Error,
        reasons::REF_NOT_PERMITTED,
        "spec.credentials.secretRef",
        "does not carry the label tollgate.dev/credential",
    );
    assert_left_out(&out, &object);
    assert!(out.config.credentials.providers.is_empty());
    assert_never_mentioned(&out, "service-account-token");
}

#[test]
fn a_credential_secret_can_name_the_providers_allowed_to_use_it() {
    let mut secret = credential_secret("openai", OPENAI_TOKEN);
    secret.metadata.annotations = Some(BTreeMap::from([(
        crate::v1alpha1::ALLOWED_PROVIDERS_ANNOTATION.to_owned(),
        "anthropic, vllm".to_owned(),
    )]));
    let refused = World::default()
        .provider(openai(&["gpt-4o"]))
        .secret(secret.clone())
        .compile();
    assert_diagnostic(
        &refused,
        &provider_ref("openai"),
        Severity::Error,
        reasons::REF_NOT_PERMITTED,
        "spec.credentials.secretRef",
        "does not name Provider openai",
    );

    secret.metadata.annotations.as_mut().unwrap().insert(
        crate::v1alpha1::ALLOWED_PROVIDERS_ANNOTATION.to_owned(),
        "anthropic,openai".to_owned(),
    );
    let allowed = World::default()
        .provider(openai(&["gpt-4o"]))
        .secret(secret)
        .compile();
    assert_clean(&allowed, &provider_ref("openai"));
}

#[test]
fn names_whose_short_ids_collide_get_distinct_key_ids() {
    // These two names share the first 48 bits of their id hash (found by a birthday
    // search): with 12-digit ids the second team would have shared the first team's
    // limits, budget, usage and key-scoped cache.
    let out = World::default()
        .api_key(in_ns("team-a", api_key("app-3994282")))
        .secret(key_secret("app-3994282", ALICE_KEY))
        .api_key(in_ns(TEAM_B, api_key("squat-5233918")))
        .secret(secret_in(TEAM_B, key_secret("squat-5233918", BOB_KEY)))
        .compile();

    let ids: Vec<&str> = out.config.keys.keys.iter().map(|k| k.id.as_str()).collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(
        ids[0][..12],
        ids[1][..12],
        "the fixture collides in 48 bits"
    );
    assert_ne!(ids[0], ids[1]);
    assert!(ids.iter().all(|id| id.len() == 24));
}

#[test]
fn a_second_api_key_with_the_same_key_id_is_refused() {
    // The same ApiKey twice (two manifests in a standalone directory): one id, so the
    // later one is refused rather than sharing limits and usage.
    let out = routed_world()
        .api_key(created(api_key("alice"), 600))
        .secret(key_secret("alice", ALICE_KEY))
        .api_key(created(api_key("alice"), 60))
        .compile();

    let refused: Vec<_> = out
        .diagnostics
        .iter()
        .filter(|d| d.reason == reasons::KEY_ID_CONFLICT)
        .collect();
    assert_eq!(refused.len(), 1, "{:#?}", out.diagnostics);
    assert_eq!(out.config.keys.keys.len(), 1);
}
