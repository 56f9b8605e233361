//! Tenants on one gateway (docs/tenancy.md), attacked the way another team or a key
//! holder would: manifests in a standalone directory, calls over HTTP, and what each
//! team's upstream received.

use crate::common;

use common::{Gateway, client, upstream::Reply, upstream::Upstream, upstream::completion};
use serde_json::{Value, json};

const KEY_A: &str = "tg_tenancyTeamAKey000000000000000000000001";
const KEY_B: &str = "tg_tenancyTeamBKey000000000000000000000002";
const KEY_C: &str = "tg_tenancyTeamCKey000000000000000000000003";
const ATTACKER: &str = "tg_tenancyAttackerChosenKey00000000000004";

/// A Provider `up` in `ns` calling `upstream`, with its labelled credential.
fn provider(ns: &str, upstream: &Upstream, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: up\n  namespace: {ns}\n  labels: {{tollgate.dev/credential: 'true'}}\nstringData: {{token: sk-{ns}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: up, namespace: {ns}}}\nspec:\n  type: openaiCompatible\n  baseUrl: {}\n\
         \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n  models: [{{name: gpt-4o}}, {{name: gpt-4o-mini}}]\n{extra}---\n",
        upstream.base_url()
    )
}

/// A RoutePolicy `name` in `ns` serving `models` (a YAML list) from `ns/up`.
fn route(ns: &str, name: &str, models: &str, extra: &str) -> String {
    format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  models: {models}\n  targets: [{{provider: up}}]\n{extra}---\n"
    )
}

/// An ApiKey `name` in `ns` with its Secret.
fn key(ns: &str, name: &str, value: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-key, namespace: {ns}}}\nstringData: {{apiKey: {value}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n---\n"
    )
}

fn start(manifests: &[String]) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tenants.yaml"), manifests.concat()).unwrap();
    (
        Gateway::start(&["--resources", dir.path().to_str().unwrap()]),
        dir,
    )
}

async fn chat(gw: &Gateway, key: &str, model: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "confidential plan"}]}));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

async fn models(gw: &Gateway, key: &str) -> Vec<String> {
    let body: Value = client()
        .get(gw.url("/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut ids: Vec<String> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Team A serves `gpt-4o*` from its upstream; team B has its own upstream and keys.
struct Teams {
    a: Upstream,
    b: Upstream,
}

impl Teams {
    async fn new() -> Self {
        Self {
            a: Upstream::start().await,
            b: Upstream::start().await,
        }
    }

    fn base(&self) -> Vec<String> {
        vec![
            provider("team-a", &self.a, ""),
            route("team-a", "chat", "['gpt-4o*']", ""),
            key("team-a", "app", KEY_A, "{owner: payments}"),
            provider("team-b", &self.b, ""),
            key("team-b", "app", KEY_B, "{owner: search}"),
        ]
    }
}

#[tokio::test]
async fn an_exact_name_claimed_by_another_team_does_not_take_a_teams_requests() {
    let teams = Teams::new().await;
    let mut manifests = teams.base();
    manifests.push(route("team-b", "hijack", "[gpt-4o]", ""));
    let (gw, _dir) = start(&manifests);

    assert_eq!(chat(&gw, KEY_A, "gpt-4o", &[]).await.0, 200);
    assert_eq!(teams.a.received().len(), 1);
    assert!(
        teams.b.received().is_empty(),
        "team B's upstream saw team A's prompt"
    );
    // Team B's own keys do get its route.
    assert_eq!(chat(&gw, KEY_B, "gpt-4o", &[]).await.0, 200);
    assert_eq!(teams.b.received().len(), 1);
}

#[tokio::test]
async fn a_longer_glob_claimed_by_another_team_does_not_take_a_teams_requests() {
    let teams = Teams::new().await;
    let mut manifests = teams.base();
    manifests.push(route("team-b", "hijack", "['gpt-4o-*']", ""));
    let (gw, _dir) = start(&manifests);

    assert_eq!(chat(&gw, KEY_A, "gpt-4o-mini", &[]).await.0, 200);
    assert_eq!(teams.a.received().len(), 1);
    assert!(teams.b.received().is_empty());
}

#[tokio::test]
async fn claiming_a_name_first_does_not_squat_it_for_other_teams() {
    let teams = Teams::new().await;
    let mut manifests = teams.base();
    // Older than anything of team A's: under global first-claim rules this took the name.
    manifests.push(route("team-b", "squat", "['gpt-4o*']", "").replace(
        "namespace: team-b}",
        "namespace: team-b, creationTimestamp: '2020-01-01T00:00:00Z'}",
    ));
    let (gw, _dir) = start(&manifests);

    assert_eq!(chat(&gw, KEY_A, "gpt-4o", &[]).await.0, 200);
    assert_eq!(teams.a.received().len(), 1);
    assert!(teams.b.received().is_empty());
}

#[tokio::test]
async fn a_key_in_a_namespace_without_routes_reaches_no_other_teams_routes() {
    let teams = Teams::new().await;
    let mut manifests = teams.base();
    manifests.push(route("team-b", "chat", "['gpt-4o*']", ""));
    manifests.push(key("team-c", "stray", KEY_C, "{owner: stray}"));
    let (gw, _dir) = start(&manifests);

    let (status, body) = chat(&gw, KEY_C, "gpt-4o", &[]).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
    assert!(models(&gw, KEY_C).await.is_empty());
    assert!(teams.a.received().is_empty() && teams.b.received().is_empty());
    // Each team lists exactly its own names.
    assert_eq!(models(&gw, KEY_A).await, ["gpt-4o", "gpt-4o-mini"]);
}

/// A platform namespace offering `gpt-4o*` with an owner-scoped cache to teams A and B.
fn platform(up: &Upstream, shared_with: &str) -> Vec<String> {
    vec![
        provider("platform", up, ""),
        route(
            "platform",
            "chat",
            "['gpt-4o*']",
            &format!("  sharedWith: {shared_with}\n  cache: {{ttl: 5m}}\n"),
        ),
        key(
            "team-a",
            "app",
            KEY_A,
            "{owner: shared-name, sharedRoutesFrom: [platform]}",
        ),
        key(
            "team-b",
            "app",
            KEY_B,
            "{owner: shared-name, sharedRoutesFrom: [platform]}",
        ),
    ]
}

#[tokio::test]
async fn an_owner_string_copied_from_another_team_does_not_join_its_cache() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(&platform(&up, "[team-a, team-b]"));

    up.script([Reply::Json(
        200,
        completion("gpt-4o", "team A's private answer"),
        vec![],
    )]);
    let (status, first) = chat(&gw, KEY_A, "gpt-4o", &[]).await;
    assert_eq!(status, 200, "{first}");
    let (_, second) = chat(&gw, KEY_B, "gpt-4o", &[]).await;
    assert_ne!(
        second["choices"][0]["message"]["content"], "team A's private answer",
        "team B read team A's cached answer through a copied owner string"
    );
    assert_eq!(up.received().len(), 2);
}

#[tokio::test]
async fn a_no_cache_request_from_another_team_cannot_overwrite_a_teams_entry() {
    let up = Upstream::start().await;
    let (gw, _dir) = start(&platform(&up, "['*']"));

    up.script([
        Reply::Json(200, completion("gpt-4o", "the real answer"), vec![]),
        Reply::Json(200, completion("gpt-4o", "planted by team B"), vec![]),
    ]);
    assert_eq!(chat(&gw, KEY_A, "gpt-4o", &[]).await.0, 200);
    let (status, _) = chat(&gw, KEY_B, "gpt-4o", &[("cache-control", "no-cache")]).await;
    assert_eq!(status, 200);
    let (_, again) = chat(&gw, KEY_A, "gpt-4o", &[]).await;
    assert_eq!(again["choices"][0]["message"]["content"], "the real answer");
}

#[tokio::test]
async fn explicit_sharing_serves_accepting_keys_and_only_them() {
    let up = Upstream::start().await;
    let mut manifests = platform(&up, "[team-a]");
    // Team C accepts, but the platform does not offer to it.
    manifests.push(key(
        "team-c",
        "app",
        KEY_C,
        "{owner: c, sharedRoutesFrom: [platform]}",
    ));
    let (gw, _dir) = start(&manifests);

    assert_eq!(chat(&gw, KEY_A, "gpt-4o-mini", &[]).await.0, 200);
    assert_eq!(models(&gw, KEY_A).await, ["gpt-4o", "gpt-4o-mini"]);
    assert_eq!(
        up.received()[0].headers["authorization"],
        "Bearer sk-platform"
    );
    // Team B accepted, but was not offered it.
    assert_eq!(chat(&gw, KEY_B, "gpt-4o-mini", &[]).await.0, 404);
    assert!(models(&gw, KEY_B).await.is_empty());
    assert_eq!(chat(&gw, KEY_C, "gpt-4o-mini", &[]).await.0, 404);
    assert_eq!(up.received().len(), 1);
}

#[tokio::test]
async fn a_shared_route_never_shadows_a_teams_own_names() {
    let teams = Teams::new().await;
    let platform_up = Upstream::start().await;
    let mut manifests = teams.base();
    manifests.retain(|m| !m.contains("kind: ApiKey\nmetadata: {name: app, namespace: team-a}"));
    manifests.push(key(
        "team-a",
        "app",
        KEY_A,
        "{owner: payments, sharedRoutesFrom: [platform]}",
    ));
    manifests.push(provider("platform", &platform_up, ""));
    manifests.push(
        "apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: exact, namespace: platform}\n\
         spec:\n  models: [gpt-4o, o3]\n  targets: [{provider: up, model: gpt-4o}]\n  sharedWith: ['*']\n---\n"
            .to_owned(),
    );
    let (gw, _dir) = start(&manifests);

    // Team A's glob beats the platform's exact name; names only the platform serves work.
    assert_eq!(chat(&gw, KEY_A, "gpt-4o", &[]).await.0, 200);
    assert_eq!(teams.a.received().len(), 1);
    assert!(platform_up.received().is_empty());
    assert_eq!(chat(&gw, KEY_A, "o3", &[]).await.0, 200);
    assert_eq!(platform_up.received().len(), 1);
    assert_eq!(models(&gw, KEY_A).await, ["gpt-4o", "gpt-4o-mini", "o3"]);
    let logs = gw.logs();
    assert!(logs.contains("SharedRouteShadowed"), "{logs}");
}

#[tokio::test]
async fn a_route_cannot_borrow_another_teams_provider_unless_it_is_shared() {
    let teams = Teams::new().await;
    let mut manifests = teams.base();
    manifests.push(
        "apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: borrow, namespace: team-b}\nspec:\n  models: [o1]\n  targets: [{provider: up, providerNamespace: team-a, model: gpt-4o}]\n---\n"
            .to_owned(),
    );
    let (gw, _dir) = start(&manifests);
    assert_eq!(chat(&gw, KEY_B, "o1", &[]).await.0, 404);
    assert!(
        teams.a.received().is_empty(),
        "team A's credential was used by team B"
    );

    // Shared on purpose: now it works, billed at team A's Provider.
    let mut manifests = teams.base();
    manifests[0] = provider("team-a", &teams.a, "  sharedWith: [team-b]\n");
    manifests.push(
        "apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: borrow, namespace: team-b}\nspec:\n  models: [o1]\n  targets: [{provider: up, providerNamespace: team-a, model: gpt-4o}]\n---\n"
            .to_owned(),
    );
    let (gw, _dir) = start(&manifests);
    assert_eq!(chat(&gw, KEY_B, "o1", &[]).await.0, 200);
    assert_eq!(
        teams.a.received()[0].headers["authorization"],
        "Bearer sk-team-a"
    );
}

#[tokio::test]
async fn a_provider_pointing_at_an_unmarked_secret_never_sends_it() {
    let up = Upstream::start().await;
    let manifests = [
        // A Secret that never agreed to be a credential (a token of some other system).
        "apiVersion: v1\nkind: Secret\nmetadata: {name: other-system, namespace: team-a}\nstringData: {token: sa-token-of-another-system}\n---\n".to_owned(),
        format!(
            "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: exfil, namespace: team-a}}\nspec:\n  type: openaiCompatible\n  baseUrl: {}\n  credentials: {{secretRef: {{name: other-system, key: token}}}}\n  models: [{{name: gpt-4o}}]\n---\n",
            up.base_url()
        ),
        "apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: chat, namespace: team-a}\nspec:\n  models: [gpt-4o]\n  targets: [{provider: exfil}]\n---\n".to_owned(),
        key("team-a", "app", KEY_A, "{owner: payments}"),
    ];
    let (gw, _dir) = start(&manifests);
    assert_eq!(chat(&gw, KEY_A, "gpt-4o", &[]).await.0, 404);
    assert!(up.received().is_empty());
    let logs = gw.logs();
    assert!(logs.contains("RefNotPermitted"), "{logs}");
    assert!(!logs.contains("sa-token-of-another-system"));
}

#[tokio::test]
async fn names_whose_short_ids_collide_do_not_share_limits() {
    // The first 48 bits of these two ApiKeys' id hashes are equal (a birthday search):
    // with 12-digit ids team B's key used up team A's limit.
    let teams = Teams::new().await;
    let manifests = [
        provider("team-a", &teams.a, ""),
        route("team-a", "chat", "['gpt-4o*']", ""),
        key(
            "team-a",
            "app-3994282",
            KEY_A,
            "{owner: a, limits: {requestsPerMinute: 1}}",
        ),
        provider("team-b", &teams.b, ""),
        route("team-b", "chat", "['gpt-4o*']", ""),
        key(
            "team-b",
            "squat-5233918",
            KEY_B,
            "{owner: b, limits: {requestsPerMinute: 1}}",
        ),
    ];
    let (gw, _dir) = start(&manifests);
    assert_eq!(chat(&gw, KEY_A, "gpt-4o", &[]).await.0, 200);
    assert_eq!(chat(&gw, KEY_B, "gpt-4o", &[]).await.0, 200);
    assert_eq!(
        chat(&gw, KEY_B, "gpt-4o", &[]).await.0,
        429,
        "the limit itself works"
    );
}

#[tokio::test]
async fn a_previous_key_written_into_the_status_is_not_accepted() {
    use sha2::Digest;
    let teams = Teams::new().await;
    let hash: String = sha2::Sha256::digest(ATTACKER.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut manifests = teams.base();
    // A key of one's own, plus a forged rotation record through `apikeys/status`.
    manifests.push(key("team-a", "forged", KEY_C, "{owner: payments}").replace(
        "spec: {owner: payments}\n",
        &format!("spec: {{owner: payments}}\nstatus: {{previousKey: {{sha256: '{hash}', expiresAt: '2099-01-01T00:00:00Z'}}}}\n"),
    ));
    let (gw, _dir) = start(&manifests);
    assert_eq!(
        chat(&gw, KEY_C, "gpt-4o", &[]).await.0,
        200,
        "the key itself works"
    );
    assert_eq!(chat(&gw, ATTACKER, "gpt-4o", &[]).await.0, 401);
    assert_eq!(teams.a.received().len(), 1);
}
