//! An in-memory Kubernetes API server emulator for tests.
//!
//! [`Emulator::start`] serves a plain-HTTP Kubernetes API on `127.0.0.1`,
//! on its own thread and tokio runtime, so it works from `#[test]` and
//! `#[tokio::test]` alike. It speaks enough of the API for a kube-rs
//! operator: discovery, list/get/create/replace/delete, merge, JSON and
//! strategic-merge patches, server-side apply, the `status` subresource,
//! label and field selectors, watches with resume, bookmarks and 410 Gone,
//! finalizers and owner-reference garbage collection. See the crate's
//! README for the exact list of what is and is not emulated.
//!
//! Tests can also reach the store directly (no HTTP, not logged):
//! [`Emulator::apply_yaml`], [`Emulator::get`], [`Emulator::list`],
//! [`Emulator::patch_merge`], [`Emulator::delete`]; inspect the request log
//! ([`Emulator::requests`], [`Emulator::write_count`]); inject faults
//! ([`Emulator::fail_next`], [`Emulator::delay_next`], [`Emulator::time_out_next`]);
//! and project ConfigMaps and Secrets into a
//! directory like kubelet does ([`Projection`]).
//!
//! Opt-in cluster lag: per-object projection delays ([`ProjectionOptions`]), a
//! lagging garbage collector and namespace controller
//! ([`EmulatorOptions::gc_delay`]) and a watch cache that is behind
//! ([`Emulator::delay_watches`]).
//!
//! ```no_run
//! use tollgate_kube_emulator::Emulator;
//!
//! let emu = Emulator::start();
//! emu.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\n").unwrap();
//! let cm = emu.get("v1", "configmaps", "default", "x").unwrap();
//! assert_eq!(cm["data"]["a"], "b");
//! // kube-rs: kube::Config::new(emu.url().parse()?) with default_retry = false.
//! ```

mod error;
mod fields;
mod log;
mod patch;
#[cfg(unix)]
mod projection;
pub mod rbac;
mod registry;
mod selector;
mod server;
mod store;
mod validate;
mod watch;

pub use error::ApiError;
pub use log::{RequestFilter, RequestRecord};
#[cfg(unix)]
pub use projection::{Projection, ProjectionOptions};
pub use registry::ResourceDef;
pub use selector::{FieldSelector, LabelSelector};

use log::RequestLog;
use serde::Deserialize;
use serde_json::Value;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use store::{DeleteOpts, Store, Target, Update, WriteOpts};
use tokio::sync::{oneshot, watch as tokio_watch};

/// Tunables of an [`Emulator`].
#[derive(Clone, Debug)]
pub struct EmulatorOptions {
    /// Interval of `BOOKMARK` events on watches that allow them.
    pub bookmark_interval: Duration,
    /// Number of changes kept for resuming watches; older resourceVersions
    /// get 410 Gone.
    pub history_limit: usize,
    /// Watch duration when the request has no `timeoutSeconds`.
    pub default_watch_timeout: Duration,
    /// `None` (the default): garbage collection and namespace deletion are
    /// synchronous. `Some(delay)`: they lag like the controllers of a real
    /// cluster. When an owner is removed, its dependents are deleted `delay`
    /// later by a background task (background propagation, the default;
    /// `Foreground` and `Orphan` deletes still act at once), each level of a
    /// cascade another `delay` later. A deleted Namespace becomes
    /// `Terminating` (`deletionTimestamp`, `status.phase`), creating objects
    /// in it is `403 Forbidden`, and `delay` later its contents are deleted
    /// and it is removed once empty (re-checked every `delay` while
    /// finalizers hold something).
    pub gc_delay: Option<Duration>,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        Self {
            bookmark_interval: Duration::from_secs(1),
            history_limit: 10_000,
            default_watch_timeout: Duration::from_secs(1800),
            gc_delay: None,
        }
    }
}

/// State shared by the HTTP server, the direct API and projections.
#[derive(Debug)]
pub(crate) struct Core {
    store: Mutex<Store>,
    log: Mutex<RequestLog>,
    /// Authorization of HTTP requests, when set (see [`rbac`]).
    rbac: Mutex<Option<rbac::Rbac>>,
    /// Bumped to end every open watch stream.
    close_watches: tokio_watch::Sender<u64>,
    /// How long after its write a change reaches watchers (see [`Emulator::delay_watches`]).
    watch_lag: tokio_watch::Sender<Duration>,
    options: EmulatorOptions,
}

impl Core {
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn log(&self) -> MutexGuard<'_, RequestLog> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn rbac(&self) -> MutexGuard<'_, Option<rbac::Rbac>> {
        self.rbac.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running emulator. The server stops (and open watches end) when it is
/// dropped.
#[derive(Debug)]
pub struct Emulator {
    core: Arc<Core>,
    url: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Emulator {
    /// Starts an emulator with default options on `127.0.0.1:<free port>`.
    ///
    /// # Panics
    /// If no local port can be bound or the server thread cannot start.
    pub fn start() -> Emulator {
        Self::start_with(EmulatorOptions::default())
    }

    /// Starts an emulator with `options`.
    ///
    /// # Panics
    /// If no local port can be bound or the server thread cannot start.
    pub fn start_with(options: EmulatorOptions) -> Emulator {
        let core = Arc::new(Core {
            store: Mutex::new(Store::new(options.history_limit, options.gc_delay)),
            log: Mutex::default(),
            rbac: Mutex::default(),
            close_watches: tokio_watch::channel(0).0,
            watch_lag: tokio_watch::channel(Duration::ZERO).0,
            options,
        });
        let listener =
            std::net::TcpListener::bind(("127.0.0.1", 0)).expect("kube-emulator: bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("kube-emulator: non-blocking listener");
        let addr = listener.local_addr().expect("kube-emulator: local address");
        let app = server::router(core.clone());
        let collector = core.options.gc_delay.is_some().then(|| core.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("kube-emulator-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("kube-emulator: tokio runtime");
                runtime.block_on(async move {
                    if let Some(core) = collector {
                        tokio::spawn(run_collector(core));
                    }
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("kube-emulator: tokio listener");
                    let serve = async move { axum::serve(listener, app).await };
                    tokio::select! {
                        result = serve => {
                            if let Err(e) = result {
                                tracing::error!("kube-emulator server failed: {e}");
                            }
                        }
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime here cancels open connections and watches.
            })
            .expect("kube-emulator: spawn server thread");
        Emulator {
            core,
            url: format!("http://{addr}"),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// A kubeconfig whose current context points at this emulator (plain
    /// HTTP, no credentials, namespace `default`), for operator binaries
    /// started as subprocesses with `KUBECONFIG`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {}\n\
             contexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n    namespace: default\n\
             current-context: emulator\nusers:\n- name: emulator\n  user: {{}}\n",
            self.url
        )
    }

    /// Authorizes every HTTP resource request with `rules` from now on (403 `Forbidden`
    /// when no rule allows it, logged like any answer); `None` allows everything again.
    pub fn enforce_rbac(&self, rules: Option<rbac::Rbac>) {
        *self.core.rbac() = rules;
    }

    // ----- registry -------------------------------------------------------

    /// Serves another resource (replacing a definition with the same
    /// group, version and plural).
    pub fn register(&self, def: ResourceDef) {
        self.core.store().register(def);
    }

    /// Serves every version of the CustomResourceDefinitions in a (multi-document) YAML.
    pub fn register_crd_yaml(&self, yaml: &str) -> Result<Vec<ResourceDef>, ApiError> {
        let mut defs = Vec::new();
        for doc in yaml_documents(yaml)? {
            defs.extend(ResourceDef::from_crd(&doc).map_err(ApiError::bad_request)?);
        }
        let mut store = self.core.store();
        for def in &defs {
            store.register(def.clone());
        }
        Ok(defs)
    }

    /// Every served resource.
    pub fn resources(&self) -> Vec<ResourceDef> {
        self.core.store().resources().cloned().collect()
    }

    fn def(&self, api_version: &str, plural: &str) -> Result<ResourceDef, ApiError> {
        let (group, version) = registry::split_api_version(api_version);
        self.core
            .store()
            .resource(&group, &version, plural)
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    404,
                    "NotFound",
                    format!("resource {plural} in {api_version} is not served"),
                )
            })
    }

    // ----- direct store access ------------------------------------------

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.core.store().rv()
    }

    /// Creates or replaces every object of a multi-document YAML (a `List`
    /// is flattened) and returns the stored objects. Server-side fields
    /// (uid, resourceVersion, generation, creationTimestamp) are filled in,
    /// Secret `stringData` becomes base64 `data`, and `.status` is stored as
    /// given. Namespaced objects without a namespace go to `default`.
    /// CustomResourceDefinitions are registered instead of stored.
    pub fn apply_yaml(&self, yaml: &str) -> Result<Vec<Value>, ApiError> {
        let mut stored = Vec::new();
        for doc in yaml_documents(yaml)? {
            let items = match doc["kind"].as_str() {
                Some("List") => doc["items"].as_array().cloned().unwrap_or_default(),
                _ => vec![doc],
            };
            for item in items {
                stored.push(self.apply_object(item)?);
            }
        }
        Ok(stored)
    }

    /// Creates or replaces one object given as JSON (see [`Emulator::apply_yaml`]).
    pub fn apply_object(&self, mut obj: Value) -> Result<Value, ApiError> {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default().to_string();
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        if api_version.starts_with("apiextensions.k8s.io/") && kind == "CustomResourceDefinition" {
            for def in ResourceDef::from_crd(&obj).map_err(ApiError::bad_request)? {
                self.register(def);
            }
            return Ok(obj);
        }
        let mut store = self.core.store();
        let def = store
            .resource_for_kind(&api_version, &kind)
            .cloned()
            .ok_or_else(|| {
                ApiError::bad_request(format!("no resource serves {kind} in {api_version:?}"))
            })?;
        let ns = if def.namespaced {
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        let opts = WriteOpts::direct();
        if !name.is_empty() && store.get(&def, &ns, &name).is_ok() {
            let (obj, _) =
                store.update(&def, &ns, &name, Target::Main, Update::Replace(obj), &opts)?;
            Ok(obj)
        } else {
            store.create(&def, &ns, obj, &opts, false)
        }
    }

    /// The stored object, if any. `namespace` is ignored for cluster-scoped
    /// resources.
    pub fn get(
        &self,
        api_version: &str,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let def = self.def(api_version, plural).ok()?;
        self.core.store().get(&def, namespace, name).ok()
    }

    /// All objects of a resource in `namespace` (every namespace when
    /// empty), ordered by namespace and name.
    pub fn list(&self, api_version: &str, plural: &str, namespace: &str) -> Vec<Value> {
        self.list_selected(api_version, plural, namespace, "")
            .unwrap_or_default()
    }

    /// Like [`Emulator::list`], filtered by a label selector.
    pub fn list_selected(
        &self,
        api_version: &str,
        plural: &str,
        namespace: &str,
        label_selector: &str,
    ) -> Result<Vec<Value>, ApiError> {
        let def = self.def(api_version, plural)?;
        let selectors = selector::Selectors::parse(Some(label_selector), None)
            .map_err(ApiError::bad_request)?;
        let ns = (!namespace.is_empty()).then_some(namespace);
        Ok(self.core.store().list(&def, ns, &selectors))
    }

    /// Applies a JSON merge patch to the whole object, `.status` included
    /// (like a user or another controller editing it). Generation,
    /// resourceVersion and watch events behave as for an HTTP write.
    pub fn patch_merge(
        &self,
        api_version: &str,
        plural: &str,
        namespace: &str,
        name: &str,
        patch: Value,
    ) -> Result<Value, ApiError> {
        let def = self.def(api_version, plural)?;
        let (obj, _) = self.core.store().update(
            &def,
            namespace,
            name,
            Target::Main,
            Update::Merge(patch),
            &WriteOpts::direct(),
        )?;
        Ok(obj)
    }

    /// Deletes an object like `DELETE` does (finalizers, garbage collection)
    /// and returns its last state.
    pub fn delete(
        &self,
        api_version: &str,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let def = self.def(api_version, plural)?;
        let (last, _) = self
            .core
            .store()
            .delete(&def, namespace, name, &DeleteOpts::default())?;
        Ok(last)
    }

    /// Drops the change history (like an etcd compaction): a watch resuming
    /// from an older resourceVersion gets 410 Gone and must relist.
    pub fn compact(&self) {
        self.core.store().compact();
    }

    /// Ends every open watch stream; clients resume from their last
    /// resourceVersion. Events a stream had not sent yet (see
    /// [`Emulator::delay_watches`]) are lost with it; after [`Emulator::compact`]
    /// the resume gets 410 Gone and the client relists.
    pub fn close_watches(&self) {
        self.core.close_watches.send_modify(|n| *n += 1);
    }

    /// Makes every watch stream, open or future, deliver each change `lag`
    /// after the write that made it, in order, as when the API server's watch
    /// cache is behind. GET and LIST still answer the latest state at once,
    /// and so does the initial state of a watch without a resourceVersion;
    /// changes replayed from a resourceVersion are delayed as well. Bookmarks
    /// never get ahead of the delayed events. A new `lag` (`Duration::ZERO`
    /// ends it) applies at once, also to events already waiting.
    pub fn delay_watches(&self, lag: Duration) {
        self.core.watch_lag.send_replace(lag);
    }

    // ----- request log and faults -----------------------------------------

    /// Every HTTP request answered so far (since the last [`Emulator::reset_log`]).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.core.log().records().to_vec()
    }

    /// The requests selected by `filter`.
    pub fn requests_matching(&self, filter: &RequestFilter) -> Vec<RequestRecord> {
        self.core
            .log()
            .records()
            .iter()
            .filter(|r| filter.matches(r))
            .cloned()
            .collect()
    }

    /// Number of requests selected by `filter`.
    pub fn count(&self, filter: &RequestFilter) -> usize {
        self.core
            .log()
            .records()
            .iter()
            .filter(|r| filter.matches(r))
            .count()
    }

    /// Number of mutating requests (`POST`, `PUT`, `PATCH`, `DELETE`),
    /// including failed and no-op ones.
    pub fn write_count(&self) -> usize {
        self.count(&RequestFilter::writes())
    }

    /// Number of mutating requests on one resource plural.
    pub fn write_count_for(&self, plural: &str) -> usize {
        self.count(&RequestFilter::writes().resource(plural))
    }

    /// Forgets the recorded requests (armed faults stay).
    pub fn reset_log(&self) {
        self.core.log().clear();
    }

    /// Makes the next `n` requests matching `filter` fail with `status_code`
    /// and a matching `Status` body (`500 InternalError`, `409 Conflict`,
    /// `503 ServiceUnavailable`, ...), without touching the store. Faults are
    /// consumed in the order they were armed.
    pub fn fail_next(&self, n: usize, status_code: u16, filter: RequestFilter) {
        self.core
            .log()
            .arm(n, log::FaultAction::Fail(status_code), filter);
    }

    /// Makes the next `n` requests matching `filter` wait `delay` before they are
    /// served normally (a slow API server: the write happens after the delay).
    /// Other requests are served meanwhile.
    pub fn delay_next(&self, n: usize, delay: Duration, filter: RequestFilter) {
        self.core
            .log()
            .arm(n, log::FaultAction::Delay(delay), filter);
    }

    /// Faults armed and not yet taken by a request: 0 once every armed request has
    /// arrived (a delayed one may still be waiting for its answer).
    pub fn armed_faults(&self) -> usize {
        self.core.log().armed()
    }

    /// Makes the next `n` requests matching `filter` time out: nothing changes, and
    /// after `after` the answer is `504 Timeout`, as when the API server's request
    /// deadline passes (kube-rs retries 504 by default). A long `after` is a hang.
    /// These requests are logged when they arrive (with status 504), so a client that
    /// gives up before the answer still shows in [`Emulator::requests`].
    pub fn time_out_next(&self, n: usize, after: Duration, filter: RequestFilter) {
        self.core
            .log()
            .arm(n, log::FaultAction::TimeOut(after), filter);
    }

    /// Refuses every request matching `filter` with `status_code` and `message`, as an
    /// admission step does until its cause goes away: a ResourceQuota (`403`,
    /// `exceeded quota: …`), a validating webhook (`400`, `admission webhook … denied the
    /// request: …`), a terminating namespace (`403`, `… because it is being terminated`).
    /// Lasts until [`Emulator::clear_faults`].
    pub fn refuse(&self, filter: RequestFilter, status_code: u16, message: &'static str) {
        self.core.log().arm(
            usize::MAX,
            log::FaultAction::Refuse(status_code, message),
            filter,
        );
    }

    /// Disarms every pending fault.
    pub fn clear_faults(&self) {
        self.core.log().disarm();
    }

    // ----- waiting --------------------------------------------------------

    /// Waits until `condition` holds, re-checking after every store change
    /// and at least every 50 ms. Returns whether it held before `timeout`.
    /// Needs a tokio runtime with the time driver (e.g. `#[tokio::test]`).
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut condition: impl FnMut(&Emulator) -> bool,
    ) -> bool {
        let mut revision = self.core.store().revision();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if condition(self) {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            let step = (deadline - now).min(Duration::from_millis(50));
            let _ = tokio::time::timeout(step, revision.changed()).await;
        }
    }

    /// Blocking version of [`Emulator::wait_for`] for plain `#[test]`s
    /// (polls every 10 ms). Do not call it on a tokio runtime thread that
    /// must keep driving the code under test.
    pub fn wait_for_blocking(
        &self,
        timeout: Duration,
        mut condition: impl FnMut(&Emulator) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if condition(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The lagging garbage collector and namespace controller
/// ([`EmulatorOptions::gc_delay`]): runs due work, on the server's runtime.
async fn run_collector(core: Arc<Core>) {
    const IDLE: Duration = Duration::from_millis(20);
    loop {
        let now = Instant::now();
        let next = core.store().run_gc(now);
        let wait = next.map_or(IDLE, |due| due.saturating_duration_since(now).min(IDLE));
        tokio::time::sleep(wait).await;
    }
}

/// The non-empty documents of a multi-document YAML string, as JSON.
fn yaml_documents(yaml: &str) -> Result<Vec<Value>, ApiError> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = Value::deserialize(doc)
            .map_err(|e| ApiError::bad_request(format!("invalid YAML: {e}")))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}
