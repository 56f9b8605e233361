//! Drives the emulator over plain HTTP (reqwest), checking the wire-level
//! behaviour kube-rs relies on.

use serde_json::{Value, json};
use std::time::Duration;
use tollgate_kube_emulator::{Emulator, EmulatorOptions, RequestFilter, ResourceDef};

const CM: &str = "/api/v1/namespaces/default/configmaps";
const KEYS: &str = "/apis/tollgate.dev/v1alpha1/namespaces/default/apikeys";
const JSON: &str = "application/json";
const MERGE: &str = "application/merge-patch+json";
const APPLY: &str = "application/apply-patch+yaml";

/// A tiny HTTP client bound to one emulator.
struct Http {
    base: String,
    client: reqwest::Client,
}

impl Http {
    fn new(emu: &Emulator) -> Self {
        Self {
            base: emu.url(),
            client: reqwest::Client::new(),
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            req = req
                .header("content-type", content_type)
                .body(body.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send("GET", path, JSON, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send("POST", path, JSON, Some(&body)).await
    }

    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send("PUT", path, JSON, Some(&body)).await
    }

    async fn patch(&self, path: &str, content_type: &str, body: Value) -> (u16, Value) {
        self.send("PATCH", path, content_type, Some(&body)).await
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        self.send("DELETE", path, JSON, None).await
    }

    async fn watch(&self, path_and_query: &str) -> Watch {
        let resp = self
            .client
            .get(format!("{}{path_and_query}", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        Watch {
            resp,
            buf: Vec::new(),
        }
    }
}

/// Reads newline-delimited watch events.
struct Watch {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Watch {
    /// The next event (bookmarks included), or `None` when the stream ends
    /// or nothing arrives within a second.
    async fn next_any(&mut self) -> Option<Value> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(serde_json::from_slice(&line).unwrap());
            }
            match tokio::time::timeout(Duration::from_secs(1), self.resp.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buf.extend_from_slice(&chunk),
                _ => return None,
            }
        }
    }

    /// The next event that is not a bookmark.
    async fn next_event(&mut self) -> Option<Value> {
        loop {
            let ev = self.next_any().await?;
            if ev["type"] != "BOOKMARK" {
                return Some(ev);
            }
        }
    }

    /// The next non-bookmark event as `(type, name)`.
    async fn next(&mut self) -> Option<(String, String)> {
        let ev = self.next_event().await?;
        let name = ev["object"]["metadata"]["name"]
            .as_str()
            .unwrap_or_default();
        Some((ev["type"].as_str().unwrap().to_string(), name.to_string()))
    }
}

fn cm(name: &str, labels: Value, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": data})
}

fn rv(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn names(list: &Value) -> Vec<&str> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn discovery_documents() {
    let emu = Emulator::start();
    let http = Http::new(&emu);
    let (code, v) = http.get("/version").await;
    assert_eq!((code, v["major"].as_str()), (200, Some("1")));
    let (_, api) = http.get("/api").await;
    assert_eq!(api["versions"], json!(["v1"]));
    let (_, core) = http.get("/api/v1").await;
    let core_names: Vec<&str> = core["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for want in [
        "configmaps",
        "secrets",
        "events",
        "namespaces",
        "namespaces/status",
    ] {
        assert!(
            core_names.contains(&want),
            "{want} missing from {core_names:?}"
        );
    }
    let (_, groups) = http.get("/apis").await;
    let group_names: Vec<&str> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        group_names,
        ["coordination.k8s.io", "events.k8s.io", "tollgate.dev"]
    );
    let (_, tg) = http.get("/apis/tollgate.dev/v1alpha1").await;
    let keys = tg["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "apikeys")
        .unwrap();
    assert_eq!(keys["kind"], "ApiKey");
    assert_eq!(keys["singularName"], "apikey");
    assert_eq!(keys["namespaced"], true);
    assert!(keys["verbs"].as_array().unwrap().contains(&json!("watch")));
    assert!(
        tg["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "apikeys/status")
    );
    let (code, _) = http.get("/apis/nope.dev/v1").await;
    assert_eq!(code, 404);
    // Aggregated discovery.
    let resp = http
        .client
        .get(format!("{}/apis", http.base))
        .header(
            "accept",
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json",
        )
        .send()
        .await
        .unwrap();
    let agg: Value = resp.json().await.unwrap();
    assert_eq!(agg["kind"], "APIGroupDiscoveryList");
    assert_eq!(agg["items"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn create_get_list_and_errors() {
    let emu = Emulator::start();
    let http = Http::new(&emu);
    let (code, created) = http
        .post(CM, cm("a", json!({"app": "x"}), json!({"k": "v"})))
        .await;
    assert_eq!(code, 201);
    let meta = &created["metadata"];
    assert_eq!(meta["namespace"], "default");
    assert_eq!(meta["generation"], 1);
    assert!(meta["uid"].as_str().unwrap().len() == 36);
    assert!(meta["creationTimestamp"].as_str().unwrap().ends_with('Z'));
    assert!(rv(&created) > 0);

    let (code, status) = http.post(CM, cm("a", json!({}), json!({}))).await;
    assert_eq!(code, 409);
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "AlreadyExists");
    assert_eq!(status["code"], 409);

    let (code, generated) = http
        .post(
            CM,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "gen-"}}),
        )
        .await;
    assert_eq!(code, 201);
    let generated_name = generated["metadata"]["name"].as_str().unwrap();
    assert!(generated_name.starts_with("gen-") && generated_name.len() == 9);

    let (code, got) = http.get(&format!("{CM}/a")).await;
    assert_eq!((code, got["data"]["k"].as_str()), (200, Some("v")));
    let (code, missing) = http.get(&format!("{CM}/missing")).await;
    assert_eq!((code, missing["reason"].as_str()), (404, Some("NotFound")));
    assert_eq!(missing["message"], "configmaps \"missing\" not found");

    http.post(
        "/api/v1/namespaces/other/configmaps",
        cm("b", json!({}), json!({})),
    )
    .await;
    let (code, list) = http.get(CM).await;
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "ConfigMapList");
    assert_eq!(list["apiVersion"], "v1");
    assert_eq!(
        list["metadata"]["resourceVersion"],
        emu.resource_version().to_string()
    );
    assert_eq!(names(&list), ["a", generated_name]);
    assert_eq!(list["items"][0]["kind"], "ConfigMap");
    let (_, all) = http.get("/api/v1/configmaps").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 3);

    // Validation and routing errors.
    let (code, bad) = http.post(CM, cm("Upper", json!({}), json!({}))).await;
    assert_eq!((code, bad["reason"].as_str()), (422, Some("Invalid")));
    let (code, _) = http
        .post(CM, cm("l", json!({"k": "a".repeat(64)}), json!({})))
        .await;
    assert_eq!(code, 422);
    let (code, _) = http
        .post(
            "/api/v1/namespaces/other/configmaps",
            json!({"metadata": {"name": "c", "namespace": "default"}}),
        )
        .await;
    assert_eq!(code, 400);
    let (code, _) = http.get("/api/v1/namespaces/default/widgets").await;
    assert_eq!(code, 404);
    let (code, _) = http.get(&format!("{CM}/a/status")).await;
    assert_eq!(code, 404, "ConfigMaps have no status subresource");
}

#[tokio::test]
async fn label_and_field_selectors() {
    let emu = Emulator::start();
    let http = Http::new(&emu);
    http.post(CM, cm("a", json!({"app": "gw", "tier": "edge"}), json!({})))
        .await;
    http.post(CM, cm("b", json!({"app": "gw", "tier": "core"}), json!({})))
        .await;
    http.post(CM, cm("c", json!({"app": "op"}), json!({})))
        .await;
    let q = |sel: &str| format!("{CM}?labelSelector={}", url_encode(sel));
    for (sel, want) in [
        ("app=gw", vec!["a", "b"]),
        ("app==gw,tier!=edge", vec!["b"]),
        ("tier", vec!["a", "b"]),
        ("!tier", vec!["c"]),
        ("tier in (edge, x)", vec!["a"]),
        ("tier notin (edge)", vec!["b", "c"]),
    ] {
        let (code, list) = http.get(&q(sel)).await;
        assert_eq!(code, 200);
        assert_eq!(names(&list), want, "selector {sel}");
    }
    let (_, list) = http
        .get(&format!("{CM}?fieldSelector=metadata.name%3Db"))
        .await;
    assert_eq!(names(&list), ["b"]);
    let (_, list) = http
        .get(&format!(
            "{CM}?fieldSelector=metadata.name!%3Db&labelSelector=app%3Dgw"
        ))
        .await;
    assert_eq!(names(&list), ["a"]);
    let (code, err) = http.get(&q("app in gw")).await;
    assert_eq!((code, err["reason"].as_str()), (400, Some("BadRequest")));
    let (code, _) = http.get(&format!("{CM}?fieldSelector=spec.x%3D1")).await;
    assert_eq!(code, 400);
}

fn url_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn replace_uses_optimistic_concurrency() {
    let emu = Emulator::start();
    let http = Http::new(&emu);
    let (_, created) = http.post(CM, cm("a", json!({}), json!({"k": "1"}))).await;
    let mut next = created.clone();
    next["data"]["k"] = json!("2");
    let (code, replaced) = http.put(&format!("{CM}/a"), next.clone()).await;
    assert_eq!(code, 200);
    assert!(rv(&replaced) > rv(&created));
    assert_eq!(replaced["metadata"]["uid"], created["metadata"]["uid"]);
    // Same stale resourceVersion again: conflict, nothing stored.
    next["data"]["k"] = json!("3");
    let (code, status) = http.put(&format!("{CM}/a"), next).await;
    assert_eq!((code, status["reason"].as_str()), (409, Some("Conflict")));
    assert_eq!(
        emu.get("v1", "configmaps", "default", "a").unwrap()["data"]["k"],
        "2"
    );
    // Without a resourceVersion the update is unconditional.
    let (code, _) = http
        .put(&format!("{CM}/a"), cm("a", json!({}), json!({"k": "4"})))
        .await;
    assert_eq!(code, 200);
    let (code, _) = http
        .put(
            &format!("{CM}/missing"),
            cm("missing", json!({}), json!({})),
        )
        .await;
    assert_eq!(code, 404);
    let (code, _) = http
        .put(&format!("{CM}/a"), cm("b", json!({}), json!({})))
        .await;
    assert_eq!(code, 400, "name in body must match the URL");
}

#[tokio::test]
async fn server_side_apply_create_update_noop_and_removal() {
    let emu = Emulator::start();
    let http = Http::new(&emu);
    let url = format!("{CM}/rendered?&force=true&fieldManager=tollgate");
    let body = cm("rendered", json!({"app": "x"}), json!({"a": "1", "b": "2"}));
    let (code, created) = http.patch(&url, APPLY, body.clone()).await;
    assert_eq!(code, 201, "apply creates a missing object");
    let managers: Vec<&str> = created["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["manager"].as_str().unwrap())
        .collect();
    assert_eq!(managers, ["tollgate"]);
    assert_eq!(
        created["metadata"]["managedFields"][0]["operation"],
        "Apply"
    );

    // Unchanged apply: no write, same resourceVersion, no watch event.
    let before = emu.resource_version();
    let (code, same) = http.patch(&url, APPLY, body.clone()).await;
    assert_eq!(code, 200);
    assert_eq!(
        same["metadata"]["resourceVersion"],
        created["metadata"]["resourceVersion"]
    );
    assert_eq!(emu.resource_version(), before);

    // Another field manager adds a key; the applier later drops "b": only
    // the key it alone owned disappears.
    let (code, _) = http
        .patch(
            &format!("{CM}/rendered?fieldManager=kubectl"),
            MERGE,
            json!({"data": {"c": "3"}}),
        )
        .await;
    assert_eq!(code, 200);
    let (code, updated) = http
        .patch(
            &url,
            APPLY,
            cm("rendered", json!({"app": "x"}), json!({"a": "10"})),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(updated["data"], json!({"a": "10", "c": "3"}));
    assert_eq!(updated["metadata"]["generation"], 3);

    // A YAML body works too; apply bodies need apiVersion and kind.
    let yaml = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: y\ndata:\n  k: v\n";
    let resp = http
        .client
        .patch(format!("{}{CM}/y?fieldManager=m", http.base))
        .header("content-type", APPLY)
        .body(yaml)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let (code, _) = http
        .patch(
            &format!("{CM}/z?fieldManager=m"),
            APPLY,
            json!({"metadata": {"name": "z"}}),
        )
        .await;
    assert_eq!(code, 400);
    let (code, _) = http
        .patch(&format!("{CM}/z"), APPLY, cm("z", json!({}), json!({})))
        .await;
    assert_eq!(code, 400, "fieldManager is required");
    let (code, _) = http
        .patch(&format!("{CM}/rendered?force=true"), MERGE, json!({}))
        .await;
    assert_eq!(code, 422, "force is only for apply");
}

#[tokio::test]
async fn merge_json_and_strategic_patches() {
    let emu = Emulator::start();
    let http = Http::new(&emu);
    http.post(
        CM,
        cm("a", json!({"x": "1"}), json!({"k": "v", "drop": "me"})),
    )
    .await;
    let (code, merged) = http
        .patch(
            &format!("{CM}/a"),
            MERGE,
            json!({"metadata": {"labels": {"y": "2"}}, "data": {"drop": null}}),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(merged["metadata"]["labels"], json!({"x": "1", "y": "2"}));
    assert_eq!(merged["data"], json!({"k": "v"}));
    let (code, strategic) = http
        .patch(
            &format!("{CM}/a"),
            "application/strategic-merge-patch+json",
            json!({"data": {"s": "1"}}),
        )
        .await;
    assert_eq!((code, strategic["data"]["s"].as_str()), (200, Some("1")));
    let (code, patched) = http
        .patch(
            &format!("{CM}/a"),
            "application/json-patch+json",
            json!([{"op": "add", "path": "/data/j", "value": "2"}, {"op": "remove", "path": "/data/k"}]),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(patched["data"], json!({"s": "1", "j": "2"}));
    let (code, _) = http
        .patch(
            &format!("{CM}/a"),
            "application/json-patch+json",
            json!([{"op": "test", "path": "/data/j", "value": "x"}]),
        )
        .await;
    assert_eq!(code, 422);
    let (code, _) = http
        .patch(&format!("{CM}/a"), "text/plain", json!({}))
        .await;
    assert_eq!(code, 415);
    let (code, _) = http.patch(&format!("{CM}/missing"), MERGE, json!({})).await;
    assert_eq!(code, 404);
    // A merge patch carrying a stale resourceVersion is a conflict.
    let (code, _) = http
        .patch(
            &format!("{CM}/a"),
            MERGE,
            json!({"metadata": {"resourceVersion": "1"}, "data": {"z": "1"}}),
        )
        .await;
    assert_eq!(code, 409);
}

#[tokio::test]
async fn status_subresource_and_generation() {
    let emu = Emulator::start();
    let http = Http::new(&emu);
    let key = json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "ApiKey", "metadata": {"name": "k"},
                     "spec": {"owner": "a"}, "status": {"phase": "ignored"}});
    let (code, created) = http.post(KEYS, key).await;
    assert_eq!(code, 201);
    assert_eq!(created.get("status"), None, "status is dropped on create");
    assert_eq!(created["metadata"]["generation"], 1);

    // Status writes change only .status and never the generation.
    let (code, st) = http
        .patch(
            &format!("{KEYS}/k/status"),
            MERGE,
            json!({"spec": {"owner": "evil"}, "status": {"phase": "Ready"}}),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(st["spec"]["owner"], "a");
    assert_eq!(st["status"]["phase"], "Ready");
    assert_eq!(st["metadata"]["generation"], 1);
    let apply_status = json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "ApiKey", "metadata": {"name": "k"},
                              "status": {"phase": "Ready", "observedGeneration": 1}});
    let (code, st) = http
        .patch(
            &format!("{KEYS}/k/status?&force=true&fieldManager=op"),
            APPLY,
            apply_status,
        )
        .await;
    assert_eq!(
        (code, st["status"]["observedGeneration"].as_i64()),
        (200, Some(1))
    );
    let mut replace = st.clone();
    replace["status"] = json!({"phase": "Replaced"});
    replace["spec"]["owner"] = json!("ignored");
    let (code, st) = http.put(&format!("{KEYS}/k/status"), replace).await;
    assert_eq!(code, 200);
    assert_eq!(
        (st["status"]["phase"].as_str(), st["spec"]["owner"].as_str()),
        (Some("Replaced"), Some("a"))
    );

    // Main-resource writes ignore .status; only spec changes bump the generation.
    let (_, main) = http
        .patch(
            &format!("{KEYS}/k"),
            MERGE,
            json!({"metadata": {"labels": {"l": "1"}}, "status": {"phase": "no"}}),
        )
        .await;
    assert_eq!(main["status"]["phase"], "Replaced");
    assert_eq!(main["metadata"]["generation"], 1);
    let (_, main) = http
        .patch(&format!("{KEYS}/k"), MERGE, json!({"spec": {"owner": "b"}}))
        .await;
    assert_eq!(main["metadata"]["generation"], 2);
    let (_, main) = http
        .patch(&format!("{KEYS}/k"), MERGE, json!({"spec": {"owner": "b"}}))
        .await;
    assert_eq!(main["metadata"]["generation"], 2, "no-op patch");
    let (code, _) = http
        .patch(
            &format!("{KEYS}/missing/status"),
            MERGE,
            json!({"status": {}}),
        )
        .await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn secrets_fold_string_data() {
    let emu = Emulator::start();
    let http = Http::new(&emu);
    let (code, s) = http
        .post(
            "/api/v1/namespaces/default/secrets",
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"token": "hi"}}),
        )
        .await;
    assert_eq!(code, 201);
    assert_eq!(s["data"], json!({"token": "aGk="}));
    assert_eq!(s.get("stringData"), None);
    let (code, _) = http
        .post(
            "/api/v1/namespaces/default/secrets",
            json!({"metadata": {"name": "bad"}, "data": {"token": "not base64!"}}),
        )
        .await;
    assert_eq!(code, 400);
}

#[tokio::test]
async fn watch_replays_streams_and_tracks_selector_transitions() {
    let emu = Emulator::start();
    let http = Http::new(&emu);
    http.post(CM, cm("old", json!({"app": "x"}), json!({})))
        .await;
    let (_, list) = http.get(&format!("{CM}?labelSelector=app%3Dx")).await;
    let list_rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    // Changes after the list but before the watch are replayed from history.
    http.post(CM, cm("a", json!({"app": "x"}), json!({}))).await;
    http.post(CM, cm("other", json!({"app": "y"}), json!({})))
        .await;
    let mut w = http
        .watch(&format!(
            "{CM}?&watch=true&timeoutSeconds=5&labelSelector=app%3Dx&allowWatchBookmarks=true&resourceVersion={list_rv}"
        ))
        .await;
    assert_eq!(w.next().await, Some(("ADDED".into(), "a".into())));
    // Live: modify, stop matching, start matching, delete.
    http.patch(&format!("{CM}/a"), MERGE, json!({"data": {"k": "v"}}))
        .await;
    assert_eq!(w.next().await, Some(("MODIFIED".into(), "a".into())));
    http.patch(
        &format!("{CM}/a"),
        MERGE,
        json!({"metadata": {"labels": {"app": "z"}}}),
    )
    .await;
    assert_eq!(w.next().await, Some(("DELETED".into(), "a".into())));
    http.patch(
        &format!("{CM}/other"),
        MERGE,
        json!({"metadata": {"labels": {"app": "x"}}}),
    )
    .await;
    assert_eq!(w.next().await, Some(("ADDED".into(), "other".into())));
    http.delete(&format!("{CM}/old")).await;
    assert_eq!(w.next().await, Some(("DELETED".into(), "old".into())));
    // Writes elsewhere are not seen; a no-op write produces no event.
    http.post(
        "/api/v1/namespaces/elsewhere/configmaps",
        cm("e", json!({"app": "x"}), json!({})),
    )
    .await;
    let before_noop = emu.resource_version();
    http.patch(
        &format!("{CM}/other"),
        MERGE,
        json!({"metadata": {"labels": {"app": "x"}}}),
    )
    .await;
    assert_eq!(
        emu.resource_version(),
        before_noop,
        "no-op writes do not bump the resourceVersion"
    );
    http.patch(&format!("{CM}/other"), MERGE, json!({"data": {"n": "1"}}))
        .await;
    let ev = w.next_event().await.unwrap();
    assert_eq!(
        (ev["type"].as_str(), ev["object"]["data"]["n"].as_str()),
        (Some("MODIFIED"), Some("1"))
    );
    assert_eq!(
        ev["object"]["metadata"]["resourceVersion"],
        emu.resource_version().to_string()
    );

    // Without a resourceVersion the watch starts with the current state.
    let mut fresh = http
        .watch(&format!("{CM}?watch=true&timeoutSeconds=1"))
        .await;
    let mut initial = vec![fresh.next().await.unwrap(), fresh.next().await.unwrap()];
    initial.sort();
    assert_eq!(
        initial,
        [
            ("ADDED".to_string(), "a".to_string()),
            ("ADDED".into(), "other".into())
        ]
    );
    // timeoutSeconds ends the stream.
    let started = std::time::Instant::now();
    assert_eq!(fresh.next().await, None);
    assert!(started.elapsed() < Duration::from_millis(1500));
}

#[tokio::test]
async fn watch_bookmarks_initial_events_and_close() {
    let emu = Emulator::start_with(EmulatorOptions {
        bookmark_interval: Duration::from_millis(100),
        ..EmulatorOptions::default()
    });
    let http = Http::new(&emu);
    http.post(CM, cm("a", json!({}), json!({}))).await;
    let current = emu.resource_version();
    let mut w = http
        .watch(&format!(
            "{CM}?watch=true&allowWatchBookmarks=true&resourceVersion={current}"
        ))
        .await;
    let bm = w.next_any().await.unwrap();
    assert_eq!(bm["type"], "BOOKMARK");
    assert_eq!(
        bm["object"]["metadata"]["resourceVersion"],
        current.to_string()
    );
    assert_eq!(bm["object"]["kind"], "ConfigMap");

    let mut streaming = http
        .watch(&format!("{CM}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true"))
        .await;
    assert_eq!(streaming.next_any().await.unwrap()["type"], "ADDED");
    let end = streaming.next_any().await.unwrap();
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );

    emu.close_watches();
    let mut ended = false;
    for _ in 0..5 {
        if w.next_any().await.is_none() {
            ended = true;
            break;
        }
    }
    assert!(ended, "close_watches ends open watches");
}

#[tokio::test]
async fn watch_from_compacted_resource_version_is_gone() {
    let emu = Emulator::start_with(EmulatorOptions {
        history_limit: 2,
        ..EmulatorOptions::default()
    });
    let http = Http::new(&emu);
    for name in ["a", "b", "c", "d"] {
        http.post(CM, cm(name, json!({}), json!({}))).await;
    }
    let rv_of = |name: &str| {
        emu.get("v1", "configmaps", "default", name)
            .map(|o| rv(&o))
            .unwrap()
    };
    // History holds the last two changes: resuming after "b" still works...
    let mut w = http
        .watch(&format!(
            "{CM}?watch=true&timeoutSeconds=1&resourceVersion={}",
            rv_of("b")
        ))
        .await;
    assert_eq!(w.next().await, Some(("ADDED".into(), "c".into())));
    // ...but not from before it.
    let mut gone = http
        .watch(&format!("{CM}?watch=true&resourceVersion={}", rv_of("a")))
        .await;
    let ev = gone.next_any().await.unwrap();
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(ev["object"]["code"], 410);
    assert_eq!(ev["object"]["reason"], "Expired");
    assert!(gone.next_any().await.is_none());
    emu.compact();
    let mut gone = http
        .watch(&format!("{CM}?watch=true&resourceVersion={}", rv_of("c")))
        .await;
    assert_eq!(gone.next_any().await.unwrap()["object"]["code"], 410);
}

#[tokio::test]
async fn owner_references_finalizers_and_namespace_deletion() {
    let emu = Emulator::start();
    let http = Http::new(&emu);
    let (_, owner) = http
        .post(KEYS, json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "ApiKey", "metadata": {"name": "owner"}, "spec": {}}))
        .await;
    let (_, other) = http
        .post(KEYS, json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "ApiKey", "metadata": {"name": "other"}, "spec": {}}))
        .await;
    let oref = |o: &Value| {
        json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "ApiKey", "name": o["metadata"]["name"],
               "uid": o["metadata"]["uid"], "controller": true})
    };
    let mut child = cm("child", json!({}), json!({}));
    child["metadata"]["ownerReferences"] = json!([oref(&owner)]);
    http.post(CM, child).await;
    let mut grandchild = cm("grandchild", json!({}), json!({}));
    let child_uid =
        emu.get("v1", "configmaps", "default", "child").unwrap()["metadata"]["uid"].clone();
    grandchild["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "child", "uid": child_uid}]);
    http.post(CM, grandchild).await;
    let mut shared = cm("shared", json!({}), json!({}));
    shared["metadata"]["ownerReferences"] = json!([oref(&owner), oref(&other)]);
    http.post(CM, shared).await;

    let (code, deleted) = http.delete(&format!("{KEYS}/owner")).await;
    assert_eq!(
        (code, deleted["metadata"]["name"].as_str()),
        (200, Some("owner"))
    );
    assert!(emu.get("v1", "configmaps", "default", "child").is_none());
    assert!(
        emu.get("v1", "configmaps", "default", "grandchild")
            .is_none(),
        "cascades"
    );
    let shared = emu.get("v1", "configmaps", "default", "shared").unwrap();
    assert_eq!(
        shared["metadata"]["ownerReferences"],
        json!([oref(&other)]),
        "live owner keeps it"
    );
    // Built-in kinds answer an immediate delete with a Success Status.
    let (code, status) = http.delete(&format!("{CM}/shared")).await;
    assert_eq!(
        (code, status["kind"].as_str(), status["status"].as_str()),
        (200, Some("Status"), Some("Success"))
    );
    assert_eq!(status["details"]["name"], "shared");

    // Finalizers hold the object in Terminating until they are removed.
    let mut fin = cm("fin", json!({}), json!({}));
    fin["metadata"]["finalizers"] = json!(["tollgate.dev/cleanup"]);
    http.post(CM, fin).await;
    let (code, terminating) = http.delete(&format!("{CM}/fin")).await;
    assert_eq!(code, 200);
    assert!(terminating["metadata"]["deletionTimestamp"].is_string());
    assert!(emu.get("v1", "configmaps", "default", "fin").is_some());
    http.patch(
        &format!("{CM}/fin"),
        MERGE,
        json!({"metadata": {"finalizers": null}}),
    )
    .await;
    assert!(emu.get("v1", "configmaps", "default", "fin").is_none());

    // Deleting a Namespace deletes its contents.
    http.post("/api/v1/namespaces", json!({"metadata": {"name": "tmp"}}))
        .await;
    http.post(
        "/api/v1/namespaces/tmp/configmaps",
        cm("in-tmp", json!({}), json!({})),
    )
    .await;
    let (code, ns) = http.get("/api/v1/namespaces/tmp").await;
    assert_eq!(
        (code, ns["status"]["phase"].as_str()),
        (200, Some("Active"))
    );
    http.delete("/api/v1/namespaces/tmp").await;
    assert!(emu.list("v1", "configmaps", "tmp").is_empty());
    assert!(
        emu.get("v1", "namespaces", "", "default").is_some(),
        "default namespace exists"
    );
}

#[tokio::test]
async fn fault_injection_and_request_log() {
    let emu = Emulator::start();
    let http = Http::new(&emu);
    emu.fail_next(
        2,
        500,
        RequestFilter::any().method("POST").resource("configmaps"),
    );
    let (code, status) = http.post(CM, cm("a", json!({}), json!({}))).await;
    assert_eq!(
        (code, status["reason"].as_str(), status["code"].as_i64()),
        (500, Some("InternalError"), Some(500))
    );
    // Other requests are unaffected.
    assert_eq!(http.get(CM).await.0, 200);
    assert_eq!(http.post(CM, cm("a", json!({}), json!({}))).await.0, 500);
    assert_eq!(http.post(CM, cm("a", json!({}), json!({}))).await.0, 201);
    assert_eq!(
        emu.list("v1", "configmaps", "default").len(),
        1,
        "failed requests change nothing"
    );

    emu.fail_next(
        1,
        409,
        RequestFilter::writes()
            .resource("apikeys")
            .subresource("status"),
    );
    emu.fail_next(1, 503, RequestFilter::any().watch(true));
    let (code, st) = http
        .patch(&format!("{KEYS}/k/status"), MERGE, json!({}))
        .await;
    assert_eq!((code, st["reason"].as_str()), (409, Some("Conflict")));
    let (code, st) = http.get(&format!("{CM}?watch=true")).await;
    assert_eq!(
        (code, st["reason"].as_str()),
        (503, Some("ServiceUnavailable"))
    );

    let log = emu.requests();
    assert_eq!(log.len(), 6);
    assert_eq!(log[0].method, "POST");
    assert_eq!(log[0].path, CM);
    assert_eq!(log[0].content_type.as_deref(), Some(JSON));
    assert_eq!(log[0].status, 500);
    assert_eq!(log[4].subresource.as_deref(), Some("status"));
    assert!(log[5].watch);
    assert_eq!(emu.write_count(), 4);
    assert_eq!(emu.write_count_for("configmaps"), 3);
    assert_eq!(emu.write_count_for("apikeys"), 1);
    http.patch(
        &format!("{CM}/a?fieldManager=me"),
        APPLY,
        cm("a", json!({}), json!({})),
    )
    .await;
    let applies = emu.requests_matching(&RequestFilter::any().method("patch").name("a"));
    assert_eq!(applies[0].field_manager.as_deref(), Some("me"));
    assert_eq!(applies[0].query, "fieldManager=me");
    emu.reset_log();
    assert_eq!(emu.write_count(), 0);
    emu.fail_next(5, 500, RequestFilter::any());
    emu.clear_faults();
    assert_eq!(http.get(CM).await.0, 200);
}

#[tokio::test]
async fn delayed_and_timed_out_requests_and_user_agent_filters() {
    let emu = Emulator::start();
    let http = Http::new(&emu);
    let started = std::time::Instant::now();
    // A slow server: the request is served, late, while others are answered at once.
    emu.delay_next(
        1,
        Duration::from_millis(400),
        RequestFilter::writes().resource("configmaps"),
    );
    let slow = {
        let http = Http::new(&emu);
        tokio::spawn(async move { http.post(CM, cm("slow", json!({}), json!({}))).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(http.get(CM).await.0, 200, "others are not held up");
    assert!(started.elapsed() < Duration::from_millis(300));
    assert!(emu.get("v1", "configmaps", "default", "slow").is_none());
    assert_eq!(slow.await.unwrap().0, 201);
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(emu.get("v1", "configmaps", "default", "slow").is_some());

    // A timeout: nothing changes, and 504 Timeout comes after the wait.
    let started = std::time::Instant::now();
    emu.time_out_next(
        1,
        Duration::from_millis(300),
        RequestFilter::writes().resource("configmaps"),
    );
    let (code, status) = http.post(CM, cm("late", json!({}), json!({}))).await;
    assert_eq!((code, status["reason"].as_str()), (504, Some("Timeout")));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(emu.get("v1", "configmaps", "default", "late").is_none());

    // Records carry their arrival time (before the wait), in arrival order here.
    let posts = emu.requests_matching(&RequestFilter::writes().resource("configmaps"));
    assert_eq!(posts.len(), 2);
    assert!(posts[1].received_at >= posts[0].received_at);

    // Faults and counts can single out one client by its User-Agent.
    let other = reqwest::Client::builder()
        .user_agent("replica/1 (op-b)")
        .build()
        .unwrap();
    emu.fail_next(1, 500, RequestFilter::any().user_agent("(op-b)"));
    assert_eq!(http.get(CM).await.0, 200);
    let code = other
        .get(format!("{}{CM}", emu.url()))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(code.as_u16(), 500);
    assert_eq!(emu.count(&RequestFilter::any().user_agent("(op-b)")), 1);
}

#[tokio::test]
async fn leases_and_events() {
    let emu = Emulator::start();
    let http = Http::new(&emu);
    let leases = "/apis/coordination.k8s.io/v1/namespaces/default/leases";
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "leader"},
                       "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}});
    assert_eq!(http.post(leases, lease.clone()).await.0, 201);
    assert_eq!(http.post(leases, lease).await.1["reason"], "AlreadyExists");
    let (_, current) = http.get(&format!("{leases}/leader")).await;
    let mut mine = current.clone();
    mine["spec"]["holderIdentity"] = json!("b");
    assert_eq!(http.put(&format!("{leases}/leader"), mine).await.0, 200);
    let mut late = current;
    late["spec"]["holderIdentity"] = json!("c");
    assert_eq!(
        http.put(&format!("{leases}/leader"), late).await.1["reason"],
        "Conflict"
    );

    let events = "/apis/events.k8s.io/v1/namespaces/default/events";
    let ev = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "k.17f"},
                    "eventTime": "2025-01-01T00:00:00.000000Z", "reason": "Compiled", "action": "Reconcile",
                    "reportingController": "tollgate", "reportingInstance": "tollgate", "type": "Normal",
                    "regarding": {"kind": "ApiKey", "name": "k", "namespace": "default"}});
    assert_eq!(http.post(events, ev).await.0, 201);
    let (code, patched) = http
        .patch(
            &format!("{events}/k.17f"),
            MERGE,
            json!({"series": {"count": 2, "lastObservedTime": "2025-01-01T00:00:01.000000Z"}}),
        )
        .await;
    assert_eq!((code, patched["series"]["count"].as_i64()), (200, Some(2)));
    assert_eq!(
        http.post(
            "/api/v1/namespaces/default/events",
            json!({"metadata": {"name": "core.1"}})
        )
        .await
        .0,
        201
    );
}

#[test]
fn direct_api_without_http() {
    let emu = Emulator::start();
    let stored = emu
        .apply_yaml(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n  namespace: ns1\nstringData:\n  k: v\n---\n\
             apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata:\n  name: p\nspec:\n  x: 1\nstatus:\n  phase: Seeded\n---\n",
        )
        .unwrap();
    assert_eq!(stored.len(), 2);
    let secret = emu.get("v1", "secrets", "ns1", "s").unwrap();
    assert_eq!(secret["data"]["k"], "dg==");
    let provider = emu
        .get("tollgate.dev/v1alpha1", "providers", "default", "p")
        .unwrap();
    assert_eq!(
        provider["status"]["phase"], "Seeded",
        "direct writes may seed status"
    );
    let (uid, rv0) = (provider["metadata"]["uid"].clone(), emu.resource_version());

    // Re-applying the same YAML is a no-op; a changed spec is a replace.
    emu.apply_yaml("apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {name: p}\nspec: {x: 1}\nstatus: {phase: Seeded}\n")
        .unwrap();
    assert_eq!(emu.resource_version(), rv0);
    let replaced = emu
        .apply_yaml("apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {name: p}\nspec: {x: 2}\n")
        .unwrap()
        .remove(0);
    assert_eq!(replaced["metadata"]["uid"], uid);
    assert_eq!(replaced["metadata"]["generation"], 2);
    let patched = emu
        .patch_merge(
            "tollgate.dev/v1alpha1",
            "providers",
            "default",
            "p",
            json!({"status": {"phase": "Edited"}}),
        )
        .unwrap();
    assert_eq!(patched["status"]["phase"], "Edited");
    assert_eq!(emu.list("tollgate.dev/v1alpha1", "providers", "").len(), 1);
    assert_eq!(
        emu.list_selected("v1", "secrets", "", "missing")
            .unwrap()
            .len(),
        0
    );
    emu.delete("tollgate.dev/v1alpha1", "providers", "default", "p")
        .unwrap();
    assert!(
        emu.get("tollgate.dev/v1alpha1", "providers", "default", "p")
            .is_none()
    );
    assert_eq!(
        emu.delete("v1", "secrets", "ns1", "nope")
            .unwrap_err()
            .reason,
        "NotFound"
    );
    assert!(
        emu.apply_yaml("apiVersion: v9\nkind: Nope\nmetadata: {name: x}\n")
            .is_err()
    );
    assert_eq!(emu.requests().len(), 0, "direct access is not logged");
    assert!(emu.wait_for_blocking(Duration::from_millis(10), |e| e.resource_version() > 0));
}

#[tokio::test]
async fn registered_kinds_and_crds() {
    let emu = Emulator::start();
    let http = Http::new(&emu);
    emu.register(ResourceDef::cluster_scoped("example.dev/v1", "widgets", "Widget").with_status());
    let (code, _) = http
        .post(
            "/apis/example.dev/v1/widgets",
            json!({"metadata": {"name": "w"}, "spec": {}}),
        )
        .await;
    assert_eq!(code, 201);
    assert_eq!(
        http.post(
            "/apis/example.dev/v1/namespaces/x/widgets",
            json!({"metadata": {"name": "w"}})
        )
        .await
        .0,
        404
    );
    let defs = emu
        .register_crd_yaml(
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: gadgets.example.dev}\n\
             spec:\n  group: example.dev\n  scope: Namespaced\n  names: {kind: Gadget, plural: gadgets, singular: gadget}\n\
             \x20 versions:\n  - {name: v1, served: true, storage: true}\n",
        )
        .unwrap();
    assert_eq!(defs.len(), 1);
    assert!(!defs[0].status_subresource);
    assert_eq!(
        http.post(
            "/apis/example.dev/v1/namespaces/x/gadgets",
            json!({"metadata": {"name": "g"}})
        )
        .await
        .0,
        201
    );

    // The built-in Tollgate kinds agree with the generated CRD manifests.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../crds");
    let builtin = emu.resources();
    for file in [
        "tollgate.dev_apikeys.yaml",
        "tollgate.dev_providers.yaml",
        "tollgate.dev_routepolicies.yaml",
    ] {
        let yaml = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        let probe = Emulator::start();
        for def in probe.register_crd_yaml(&yaml).unwrap() {
            let ours = builtin.iter().find(|d| {
                d.group == def.group && d.version == def.version && d.plural == def.plural
            });
            assert_eq!(ours, Some(&def), "{file}");
        }
    }
}
