//! The controller: watches the three kinds (and only the Secrets they need), and on any
//! change, after a debounce, runs one reconcile of everything:
//!
//! 1. ApiKey lifecycle: create missing key Secrets, rotate on request ([`crate::keys`]);
//! 2. compile every object with `tollgate_api::compile` (pure);
//! 3. publish revocations for key hashes the served configuration loses, before it
//!    changes, so every gateway refuses them at once (when Redis is configured);
//! 4. server-side apply the generated ConfigMap and Secrets that changed, delete shards no
//!    longer needed ([`crate::desired`]);
//! 5. patch the status of every object whose status changed, with an Event when `Ready`
//!    changes ([`crate::status`]), including `Propagated` from the gateways' reports.
//!
//! Compiling everything at once is what the gateway needs (one consistent configuration)
//! and what makes bursts cheap: 1,000 ApiKeys applied together cause one compile and one
//! write per changed object. Only the leader writes; standbys keep their caches warm.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    hash::Hash,
    sync::Arc,
    time::Duration,
};

use futures_util::{StreamExt, future::BoxFuture};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, Store},
        watcher,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tollgate_api::{
    compile::{
        CompileOptions, CompileOutput, DEFAULT_NAMESPACE, Resources, SecretStore, compile_with,
    },
    diagnostics::{Diagnostic, Kind, ObjectRef, Severity, condition_types, reasons},
    parts,
    redis_conn::SharedConn,
    v1alpha1::CREDENTIAL_LABEL,
    v1alpha1::{ApiKey, Provider, RoutePolicy},
};
use tracing::Instrument;

use crate::{
    desired::{self, DesiredObject, LiveObjects, MANAGED_BY, MANAGED_BY_VALUE, Naming},
    keys::{self, API_KEY_LABEL, KeyAction},
    leader::Fence,
    metrics::Metrics,
    publish::{self, Holds},
    status,
};

/// The field manager of every write.
pub const MANAGER: &str = "tollgate-operator";

/// The field manager of the propagation record on the generated ConfigMap.
pub const PROPAGATION_MANAGER: &str = "tollgate-operator-propagation";

/// Writes to the API server in flight at once (key Secrets, statuses): 10,000 ApiKeys
/// are not written one round trip at a time.
pub const WRITE_CONCURRENCY: usize = 16;

/// What one key step changed.
enum KeyOutcome {
    Unchanged,
    Conflict(String),
    /// The API refused the write for reasons of this object alone: reported on it, the
    /// rest of the reconcile goes on.
    Refused(String),
    Written {
        secret: Box<Secret>,
        writes: usize,
    },
}

/// What step 2 of a reconcile made: the compile output, its split into parts, and the
/// objects that carry them.
struct Compiled {
    out: CompileOutput,
    split: parts::SplitConfig,
    objects: Vec<DesiredObject>,
}

/// What step 1 leaves for the rest of the reconcile.
#[derive(Default)]
struct KeySecrets {
    /// `(reason, message)` by ApiKey whose Secret could not be written.
    conflicts: BTreeMap<ObjectRef, (&'static str, String)>,
    /// Secrets of keys held until the gateways serve them, by (namespace, name): what
    /// the compile reads instead of the live Secret.
    held: BTreeMap<(String, String), Secret>,
    /// ApiKeys whose first key is held: `Ready` False, `KeyPending`, with this message.
    pending: BTreeMap<ObjectRef, String>,
}

/// Whether an API error refuses one object's write for good (until that object, its
/// namespace or a policy changes), rather than failing transiently: 400 (an admission
/// webhook's denial), 403 (a quota, a terminating namespace, no permission in that
/// namespace), 404 (the namespace is gone), 422 (invalid). Retrying the whole reconcile
/// would not help, and must not hold back every other object.
fn refused_for_good(error: &kube::Error) -> Option<String> {
    match error {
        kube::Error::Api(s) if matches!(s.code, 400 | 403 | 404 | 422) => {
            Some(format!("{} ({} {})", s.message, s.code, s.reason))
        }
        _ => None,
    }
}

/// A cache of one kind, possibly over several namespaces.
#[allow(missing_debug_implementations)]
pub struct Cache<K: Resource<DynamicType = ()> + Clone + 'static> {
    stores: Vec<Store<K>>,
}

impl<K> Cache<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// Every object.
    pub fn all(&self) -> Vec<K> {
        self.stores
            .iter()
            .flat_map(|s| s.state())
            .map(|o| (*o).clone())
            .collect()
    }

    async fn ready(&self) {
        for s in &self.stores {
            let _ = s.wait_until_ready().await;
        }
    }
}

/// What of an object a compile reads, hashed: an event that leaves it unchanged (a
/// status write, the operator's own or anyone's; a resync) triggers no reconcile.
pub type Fingerprint<K> = fn(&K) -> u64;

/// The fingerprints of every watched object by kind, namespace and name, shared by the
/// watches and the reconciler: what the operator writes is recorded here before it is
/// written (and again as the API returned it), so the watch event of its own write
/// changes nothing and triggers no reconcile.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    prints: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
    statuses: Arc<std::sync::Mutex<std::collections::HashMap<String, WrittenStatus>>>,
}

/// A status this replica wrote, kept until the cache shows it: a reconcile that runs
/// before the watch has brought back its own status writes (10,000 of them take a
/// while) starts from what it wrote, not from the older status, and writes nothing again.
#[derive(Debug, Clone)]
struct WrittenStatus {
    generation: Option<i64>,
    resource_version: Option<String>,
    status: Value,
}

/// `Kind/namespace/name/uid`: a status belongs to one incarnation of an object.
fn status_key<K: Resource<DynamicType = ()>>(o: &K) -> String {
    format!(
        "{}/{}",
        seen_key(o),
        o.meta().uid.as_deref().unwrap_or_default()
    )
}

/// `Kind/namespace/name`.
fn seen_key<K: Resource<DynamicType = ()>>(o: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        o.meta().namespace.as_deref().unwrap_or_default(),
        o.meta().name.as_deref().unwrap_or_default()
    )
}

impl Seen {
    /// Records `print` for `key`; returns whether it differs from what was recorded.
    fn record(&self, key: String, print: u64) -> bool {
        self.prints.lock().expect("seen lock").insert(key, print) != Some(print)
    }

    fn forget(&self, key: &str) {
        self.prints.lock().expect("seen lock").remove(key);
    }

    /// Records the status this replica just wrote to `object` (as the API returned it).
    fn wrote_status<K: Resource<DynamicType = ()> + Serialize>(&self, object: &K) {
        let status = serde_json::to_value(object)
            .ok()
            .and_then(|mut v| v.get_mut("status").map(Value::take));
        if let Some(status) = status {
            self.statuses.lock().expect("seen lock").insert(
                status_key(object),
                WrittenStatus {
                    generation: object.meta().generation,
                    resource_version: object.meta().resource_version.clone(),
                    status,
                },
            );
        }
    }

    /// Replaces the status of cached objects that do not show this replica's last write
    /// yet by that write (`usage`, which has its own writer, stays the cache's). Entries
    /// the cache has caught up with, or whose object changed generation, are dropped.
    fn overlay_statuses<K>(&self, objects: &mut [K])
    where
        K: Resource<DynamicType = ()> + Serialize + DeserializeOwned,
    {
        let mut written = self.statuses.lock().expect("seen lock");
        if written.is_empty() {
            return;
        }
        for object in objects.iter_mut() {
            let key = status_key(object);
            let Some(w) = written.get(&key) else {
                continue;
            };
            if w.resource_version == object.meta().resource_version
                || w.generation != object.meta().generation
            {
                written.remove(&key);
                continue;
            }
            let Ok(mut value) = serde_json::to_value(&*object) else {
                continue;
            };
            let usage = value
                .get_mut("status")
                .and_then(|s| s.get_mut("usage"))
                .map(Value::take);
            let mut status = w.status.clone();
            if let (Some(usage), Some(map)) = (usage, status.as_object_mut()) {
                map.insert("usage".to_owned(), usage);
            }
            value["status"] = status;
            if let Ok(updated) = serde_json::from_value(value) {
                *object = updated;
            }
        }
    }

    /// Records an object this operator writes (before the write, as it will be; after
    /// it, as the API returned it).
    fn wrote<K: Resource<DynamicType = ()>>(&self, object: &K, fingerprint: Fingerprint<K>) {
        self.record(seen_key(object), fingerprint(object));
    }
}

fn hash_of(parts: impl Serialize) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(&serde_json::to_vec(&parts).unwrap_or_default());
    h.finish()
}

/// The metadata every compile reads: labels, annotations, owners, deletion.
fn meta_parts(m: &kube::api::ObjectMeta) -> Value {
    json!([
        m.labels,
        m.annotations,
        m.owner_references,
        m.deletion_timestamp,
        m.finalizers
    ])
}

/// Tollgate resources: their spec (by `metadata.generation`, which only spec changes
/// bump) and metadata; never their status.
fn spec_fingerprint<K: Resource>(o: &K) -> u64 {
    hash_of((o.meta().generation, meta_parts(o.meta())))
}

/// Secrets: their data and metadata.
fn secret_fingerprint(o: &Secret) -> u64 {
    hash_of((&o.data, meta_parts(&o.metadata)))
}

/// ConfigMaps: their data and metadata, except the propagation record (the operator's
/// own bookkeeping, which no compile reads).
fn configmap_fingerprint(o: &ConfigMap) -> u64 {
    let mut meta = o.metadata.clone();
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(status::PROPAGATION_ANNOTATION);
    }
    hash_of((&o.data, &o.binary_data, meta_parts(&meta)))
}

/// Starts a reflector on `api`, notifying `notify` on every change that matters to a
/// compile (by `fingerprint`), on deletions, and when the initial list is in (so a
/// re-list never triggers a compile on half-replaced state).
/// What every watch shares: whom to wake, where to count, what was seen, how many relist.
#[derive(Clone)]
struct WatchShared {
    notify: Arc<Notify>,
    metrics: Arc<Metrics>,
    seen: Seen,
    relisting: Arc<std::sync::atomic::AtomicUsize>,
    failed_at: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    fingerprint: Fingerprint<K>,
    shared: WatchShared,
) -> Watched<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    let (store, writer) = reflector::store::<K>();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|o: &mut K| o.managed_fields_mut().clear())
        .reflect(writer);
    let WatchShared {
        notify,
        metrics,
        seen,
        relisting,
        failed_at,
    } = shared;
    let task = tokio::spawn(async move {
        use std::sync::atomic::Ordering::SeqCst;
        let mut stream = std::pin::pin!(stream);
        // Between `Init` and `InitDone` this cache is being replaced by a fresh list
        // (the first one, or a relist after 410 Gone): counted in `relisting`.
        let mut listing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(o)) => {
                    if seen.record(seen_key(&o), fingerprint(&o)) {
                        metrics.change_seen(what);
                        notify.notify_one();
                    } else {
                        metrics.change_ignored(what);
                    }
                }
                Ok(watcher::Event::InitApply(o)) => {
                    seen.record(seen_key(&o), fingerprint(&o));
                }
                Ok(watcher::Event::Delete(o)) => {
                    seen.forget(&seen_key(&o));
                    metrics.change_seen(what);
                    notify.notify_one();
                }
                Ok(watcher::Event::InitDone) => {
                    if std::mem::take(&mut listing) {
                        relisting.fetch_sub(1, SeqCst);
                    }
                    metrics.change_seen(what);
                    notify.notify_one();
                }
                Ok(watcher::Event::Init) => {
                    if !std::mem::replace(&mut listing, true) {
                        relisting.fetch_add(1, SeqCst);
                    }
                }
                Err(e) => {
                    // Until it resumes or relists (after a backoff), this cache may be
                    // behind without anything saying so.
                    *failed_at.lock().expect("failed_at lock") = Some(std::time::Instant::now());
                    tracing::warn!(error = %e, watch = what, "watch failed; retrying with backoff")
                }
            }
        }
    });
    (store, task)
}

fn apis<K>(client: &Client, namespaces: &[String]) -> Vec<Api<K>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    if namespaces.iter().any(|n| n == "*") {
        vec![Api::all(client.clone())]
    } else {
        namespaces
            .iter()
            .map(|n| Api::namespaced(client.clone(), n))
            .collect()
    }
}

/// A watch and the cache it fills.
type Watched<K> = (Store<K>, tokio::task::JoinHandle<()>);

/// The watches the controller keeps.
#[allow(missing_debug_implementations)]
pub struct Watches {
    /// Providers.
    pub providers: Cache<Provider>,
    /// RoutePolicies.
    pub routes: Cache<RoutePolicy>,
    /// ApiKeys.
    pub keys: Cache<ApiKey>,
    /// Key Secrets this operator created (by label).
    pub key_secrets: Cache<Secret>,
    /// Generated ConfigMaps in the gateway namespace (by label).
    pub generated_maps: Store<ConfigMap>,
    /// Generated Secrets in the gateway namespace (by label).
    pub generated_secrets: Store<Secret>,
    /// Credential Secrets: only those labelled `tollgate.dev/credential=true` (a Secret
    /// consents to Tollgate by its label; the operator reads no other Secret). Watched
    /// from the start, by standbys too, so a new leader starts warm.
    pub credentials: Cache<Secret>,
    /// Fingerprints of what the watches and the reconciler last saw or wrote.
    pub seen: Seen,
    /// Watches whose cache is being replaced by a fresh list right now.
    relisting: Arc<std::sync::atomic::AtomicUsize>,
    /// When a watch last failed.
    failed_at: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Watches {
    /// Starts every watch.
    pub fn start(
        client: &Client,
        namespaces: &[String],
        naming: &Naming,
        notify: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut tasks = Vec::new();
        let seen = Seen::default();
        let relisting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failed_at = Arc::new(std::sync::Mutex::new(None));
        let shared = WatchShared {
            notify,
            metrics,
            seen: seen.clone(),
            relisting: relisting.clone(),
            failed_at: failed_at.clone(),
        };
        macro_rules! kind_cache {
            ($k:ty, $cfg:expr, $what:expr, $print:expr) => {{
                let mut stores = Vec::new();
                for api in apis::<$k>(client, namespaces) {
                    let (store, task) = reflect(api, $cfg, $what, $print, shared.clone());
                    stores.push(store);
                    tasks.push(task);
                }
                Cache { stores }
            }};
        }
        let providers = kind_cache!(
            Provider,
            watcher::Config::default(),
            "providers",
            spec_fingerprint
        );
        let routes = kind_cache!(
            RoutePolicy,
            watcher::Config::default(),
            "routepolicies",
            spec_fingerprint
        );
        let keys = kind_cache!(
            ApiKey,
            watcher::Config::default(),
            "apikeys",
            spec_fingerprint
        );
        let key_secrets = kind_cache!(
            Secret,
            watcher::Config::default()
                .labels(&format!("{MANAGED_BY}={MANAGED_BY_VALUE},{API_KEY_LABEL}")),
            "key secrets",
            secret_fingerprint
        );
        let credentials = kind_cache!(
            Secret,
            watcher::Config::default().labels(&format!("{CREDENTIAL_LABEL}=true")),
            "credential secrets",
            secret_fingerprint
        );
        let gateway_namespace = naming.namespace.as_str();
        let generated = watcher::Config::default().labels(&naming.selector());
        let (generated_maps, task) = reflect(
            Api::<ConfigMap>::namespaced(client.clone(), gateway_namespace),
            generated.clone(),
            "generated configmaps",
            configmap_fingerprint,
            shared.clone(),
        );
        tasks.push(task);
        let (generated_secrets, task) = reflect(
            Api::<Secret>::namespaced(client.clone(), gateway_namespace),
            generated,
            "generated secrets",
            secret_fingerprint,
            shared.clone(),
        );
        tasks.push(task);
        Self {
            relisting,
            failed_at,
            providers,
            routes,
            keys,
            key_secrets,
            generated_maps,
            generated_secrets,
            credentials,
            seen,
            tasks,
        }
    }

    /// Whether some watch is relisting (its cache is about to be replaced after a
    /// watch expired, e.g. an API server restart): no decision is taken from a view
    /// that is known to be stale; the reconcile waits for the fresh list.
    /// A watch that failed counts as relisting for [`WATCH_SETTLE`] (kube's watcher backs
    /// off before it resumes or relists), so a failure that needs no relist holds
    /// reconciles back only that long.
    pub fn relisting(&self) -> bool {
        self.relisting.load(std::sync::atomic::Ordering::SeqCst) > 0
            || self
                .failed_at
                .lock()
                .expect("failed_at lock")
                .is_some_and(|t| t.elapsed() < WATCH_SETTLE)
    }

    /// Waits until every cache holds its initial list.
    pub async fn ready(&self) {
        self.providers.ready().await;
        self.routes.ready().await;
        self.keys.ready().await;
        self.key_secrets.ready().await;
        self.credentials.ready().await;
        let _ = self.generated_maps.wait_until_ready().await;
        let _ = self.generated_secrets.wait_until_ready().await;
    }
}

impl Drop for Watches {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A failed reconcile step.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A Kubernetes API call failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The error.
        source: kube::Error,
    },
    /// The configuration cannot be written.
    #[error("{0}")]
    Config(String),
    /// Shared state in Redis that must change before the configuration cannot be written.
    #[error("{0}")]
    Redis(String),
    /// The cluster changed under a decision (an object gone between two calls); the
    /// reconcile is retried.
    #[error("{0}")]
    Raced(String),
    /// This replica no longer holds the Lease: it stopped writing, mid-reconcile.
    #[error("stopped writing: this replica no longer holds the lease")]
    NotLeading,
    /// The reconcile took longer than `--reconcile-timeout` (an API call that never
    /// answers); it was abandoned and is retried.
    #[error("the reconcile did not finish within {0:?}; abandoned")]
    TimedOut(Duration),
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ReconcileError {
    let what = what.into();
    move |source| ReconcileError::Kube { what, source }
}

/// What one reconcile did, for logs, metrics and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Configuration hash now applied.
    pub config_hash: String,
    /// Objects written in the gateway namespace (applied or deleted).
    pub config_writes: usize,
    /// Status patches.
    pub status_writes: usize,
    /// Key Secrets created or rotated.
    pub key_writes: usize,
    /// Key Secret writes the API refused for good (reported on their ApiKeys).
    pub refused_writes: usize,
    /// Key hashes revoked.
    pub revoked: usize,
    /// When the next reconcile is due even without changes (an expiry, a grace period
    /// ending, or gateways still catching up).
    pub wake_in: Option<Duration>,
}

/// The reconciler: everything one reconcile needs.
#[allow(missing_debug_implementations)]
pub struct Reconciler {
    /// Kubernetes client.
    pub client: Client,
    /// Generated objects' names.
    pub naming: Naming,
    /// Redis, when configured.
    pub redis: Option<SharedConn>,
    /// Deadline of Redis calls.
    pub redis_timeout: Duration,
    /// Events.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Checked before every write: only the Lease holder writes.
    pub fence: Fence,
    /// How objects are compiled (`--allow-link-local-upstreams`).
    pub compile_options: CompileOptions,
    /// Where its own writes are recorded, so their watch events trigger nothing.
    pub seen: Seen,
    /// New and rotated keys held until the gateways serve them ([`crate::publish`]).
    pub holds: Holds,
    /// Longest a new key is held (`--key-publish-wait`; 0: written at once).
    pub key_publish_wait: Duration,
}

/// The input of one reconcile, read from the caches.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Providers.
    pub providers: Vec<Provider>,
    /// RoutePolicies.
    pub routes: Vec<RoutePolicy>,
    /// ApiKeys.
    pub keys: Vec<ApiKey>,
    /// Key Secrets by (namespace, name).
    pub key_secrets: BTreeMap<(String, String), Secret>,
    /// Credential Secrets.
    pub credentials: Vec<Secret>,
    /// Generated objects now in the gateway namespace.
    pub generated_maps: Vec<ConfigMap>,
    /// Generated Secrets now in the gateway namespace.
    pub generated_secrets: Vec<Secret>,
}

impl Snapshot {
    /// Reads every cache.
    pub async fn read(w: &Watches) -> Self {
        Self {
            credentials: w.credentials.all(),
            providers: w.providers.all(),
            routes: w.routes.all(),
            keys: w.keys.all(),
            key_secrets: w
                .key_secrets
                .all()
                .into_iter()
                .map(|s| ((s.namespace().unwrap_or_default(), s.name_any()), s))
                .collect(),
            generated_maps: w
                .generated_maps
                .state()
                .iter()
                .map(|o| (**o).clone())
                .collect(),
            generated_secrets: w
                .generated_secrets
                .state()
                .iter()
                .map(|o| (**o).clone())
                .collect(),
        }
    }
}

/// The configuration the generated objects hold now, if they form a consistent set.
fn live_config(snapshot: &Snapshot, naming: &Naming) -> Option<parts::AssembledConfig> {
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for cm in &snapshot.generated_maps {
        if !naming.owns_config_map(&cm.name_any()) {
            continue;
        }
        for (k, v) in cm.data.iter().flatten() {
            files.insert(k.clone(), v.as_bytes().to_vec());
        }
    }
    for s in &snapshot.generated_secrets {
        for (k, v) in s.data.iter().flatten() {
            files.insert(k.clone(), v.0.clone());
        }
    }
    if files.is_empty() {
        return None;
    }
    parts::assemble(&files).ok()
}

/// Serialises a status for a merge patch of `/status`: `usage` is left to the usage
/// refresher, and fields the previous status had but the new one lacks are removed.
fn status_patch<S: Serialize>(next: &S, previous: Option<&S>, owned_elsewhere: &[&str]) -> Value {
    let mut value = serde_json::to_value(next).unwrap_or(Value::Null);
    let before = previous.and_then(|p| serde_json::to_value(p).ok());
    if let (Value::Object(map), Some(Value::Object(old))) = (&mut value, before) {
        for k in old.keys() {
            if !map.contains_key(k) {
                map.insert(k.clone(), Value::Null);
            }
        }
    }
    if let Value::Object(map) = &mut value {
        for k in owned_elsewhere {
            map.remove(*k);
        }
    }
    json!({ "status": value })
}

impl Reconciler {
    /// Fails unless this replica may write now (see [`Fence`]).
    fn may_write(&self) -> Result<(), ReconcileError> {
        if self.fence.holds() {
            Ok(())
        } else {
            Err(ReconcileError::NotLeading)
        }
    }

    async fn event<K: Resource<DynamicType = ()>>(&self, object: &K, note: &status::EventNote) {
        if self.may_write().is_err() {
            return;
        }
        let event = Event {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.clone(),
            note: Some(note.note.clone()),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(error = %e, "could not record an Event");
        }
    }

    /// Carries out one key action; returns what changed.
    /// Creates `secret`, recorded first as this operator's own write.
    async fn create_recorded(
        &self,
        secrets: &Api<Secret>,
        params: &PostParams,
        secret: &Secret,
    ) -> Result<Secret, kube::Error> {
        self.seen.wrote(secret, secret_fingerprint);
        secrets.create(params, secret).await
    }

    async fn key_step(
        &self,
        key: &ApiKey,
        action: KeyAction,
    ) -> Result<KeyOutcome, ReconcileError> {
        let ns = key
            .namespace()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        let secret_name = tollgate_api::compile::secret_name(key);
        let secrets = Api::<Secret>::namespaced(self.client.clone(), &ns);
        let params = PostParams {
            field_manager: Some(MANAGER.to_owned()),
            ..PostParams::default()
        };
        let issued = |secret: &Secret, note: &str| {
            let prefix = keys::secret_key(secret)
                .map(|k| tollgate_api::compile::key_prefix(&k))
                .unwrap_or_default();
            format!("issued key {prefix}… into Secret {secret_name}{note}")
        };
        if !matches!(action, KeyAction::Keep | KeyAction::Conflict(_)) {
            self.may_write()?;
        }
        match action {
            KeyAction::Keep => Ok(KeyOutcome::Unchanged),
            KeyAction::Conflict(message) => Ok(KeyOutcome::Conflict(message)),
            KeyAction::Create(secret) => {
                match self.create_recorded(&secrets, &params, &secret).await {
                    Ok(created) => {
                        self.metrics.api_write("Secret", "create");
                        self.seen.wrote(&created, secret_fingerprint);
                        let note = issued(&created, "");
                        self.event(
                            key,
                            &status::EventNote {
                                warning: false,
                                reason: "KeyIssued".to_owned(),
                                note,
                            },
                        )
                        .await;
                        Ok(KeyOutcome::Written {
                            secret: Box::new(created),
                            writes: 1,
                        })
                    }
                    // Exists, though the cache did not show it: it may be ours (the cache is
                    // behind, after a relist) or somebody else's. Only the Secret itself,
                    // read now, tells: ours by ownerReference uid is used as it is. Any
                    // other 409 (a conflict, not AlreadyExists) says nothing: retried.
                    Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "AlreadyExists" => {
                        // Listed by name, not read with `get`: the chart grants list,
                        // watch, create and update on Secrets where ApiKeys live, and
                        // nothing more.
                        let by_name =
                            ListParams::default().fields(&format!("metadata.name={secret_name}"));
                        let live = secrets
                            .list(&by_name)
                            .await
                            .map_err(kube_err(format!(
                                "reading Secret {ns}/{secret_name}, which already exists"
                            )))?
                            .items
                            .into_iter()
                            .next();
                        // Deleted meanwhile: the next reconcile creates it.
                        let Some(mut live) = live else {
                            return Err(ReconcileError::Raced(format!(
                                "Secret {ns}/{secret_name} already existed, then was gone"
                            )));
                        };
                        if keys::owned_by(&live, key) {
                            // Ours. If its labels were removed the watch cannot see it:
                            // put them back, so later reconciles find it in the cache.
                            let labels = live.metadata.labels.clone().unwrap_or_default();
                            let label = keys::api_key_label(key);
                            if labels.get(MANAGED_BY).map(String::as_str) == Some(MANAGED_BY_VALUE)
                                && labels.get(API_KEY_LABEL) == Some(&label)
                            {
                                return Ok(KeyOutcome::Written {
                                    secret: Box::new(live),
                                    writes: 0,
                                });
                            }
                            // An update (the verb the chart grants), guarded by the
                            // resourceVersion just listed.
                            let labels = live.metadata.labels.get_or_insert_with(BTreeMap::new);
                            labels.insert(MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned());
                            labels.insert(API_KEY_LABEL.to_owned(), label);
                            let repaired = secrets
                                .replace(&secret_name, &params, &live)
                                .await
                                .map_err(kube_err(format!(
                                    "restoring the labels of Secret {ns}/{secret_name}"
                                )))?;
                            self.metrics.api_write("Secret", "replace");
                            self.seen.wrote(&repaired, secret_fingerprint);
                            return Ok(KeyOutcome::Written {
                                secret: Box::new(repaired),
                                writes: 1,
                            });
                        }
                        Ok(KeyOutcome::Conflict(format!(
                            "Secret {secret_name} exists and was not created for this ApiKey; delete it or set spec.secretName to a free name"
                        )))
                    }
                    Err(e) => match refused_for_good(&e) {
                        Some(why) => Ok(KeyOutcome::Refused(format!(
                            "the API refused to create Secret {secret_name}: {why}"
                        ))),
                        None => Err(kube_err(format!("creating Secret {ns}/{secret_name}"))(e)),
                    },
                }
            }
            KeyAction::Rotate {
                secret, previous, ..
            } => {
                // One write holds the new key and the old key's grace period (see `keys`).
                self.seen.wrote(&secret, secret_fingerprint);
                let written = match secrets.replace(&secret_name, &params, &secret).await {
                    Ok(written) => written,
                    // The old key keeps working; the rotation waits for the object.
                    Err(e) => match refused_for_good(&e) {
                        Some(why) => {
                            return Ok(KeyOutcome::Refused(format!(
                                "the API refused to write the rotated key into Secret {secret_name}: {why}; the previous key keeps working"
                            )));
                        }
                        None => {
                            return Err(kube_err(format!(
                                "writing the rotated key into Secret {ns}/{secret_name}"
                            ))(e));
                        }
                    },
                };
                self.metrics.api_write("Secret", "replace");
                self.seen.wrote(&written, secret_fingerprint);
                let grace = match &previous {
                    Some(p) => format!("; the previous key works until {}", p.expires_at.0),
                    None => "; the previous key stopped working".to_owned(),
                };
                let note = issued(&written, &grace);
                self.event(
                    key,
                    &status::EventNote {
                        warning: false,
                        reason: "KeyRotated".to_owned(),
                        note,
                    },
                )
                .await;
                Ok(KeyOutcome::Written {
                    secret: Box::new(written),
                    writes: 1,
                })
            }
        }
    }

    /// Holds a new or rotated key until the gateways serve it ([`crate::publish`]), or
    /// says to write it now (with why).
    fn hold_or_publish(
        &self,
        key: &ApiKey,
        live: Option<&Secret>,
        action: KeyAction,
        view: &publish::View,
    ) -> (KeyAction, publish::Decision) {
        let (Some(uid), Some(secret)) = (key.metadata.uid.as_deref(), keys::action_secret(&action))
        else {
            return (action, publish::Decision::Publish(publish::Why::NoReports));
        };
        if matches!(view, publish::View::Off) || self.key_publish_wait.is_zero() {
            return (action, publish::Decision::Publish(publish::Why::NoReports));
        }
        let basis = publish::Basis {
            secret_version: live.and_then(|s| s.metadata.resource_version.clone()),
            generation: keys::issued_generation(secret).unwrap_or(0),
        };
        let key_hash = keys::secret_key(secret)
            .map(|k| tollgate_api::parts::sha256_hex(k.as_bytes()))
            .unwrap_or_default();
        let action = self.holds.hold(uid, action, key_hash, basis);
        let decision =
            self.holds
                .decide(uid, view, self.key_publish_wait, std::time::Instant::now());
        (action, decision)
    }

    /// Step 1: key Secrets, [`WRITE_CONCURRENCY`] at a time. New and rotated keys are
    /// written only once the gateways serve them; until then they are compiled from
    /// memory ([`crate::publish`]).
    async fn key_lifecycle(
        &self,
        snapshot: &mut Snapshot,
        now: Timestamp,
        report: &mut Report,
    ) -> Result<KeySecrets, ReconcileError> {
        let uids: BTreeSet<&str> = snapshot
            .keys
            .iter()
            .filter_map(|k| k.metadata.uid.as_deref())
            .collect();
        self.holds.retain(&uids);
        // Key Secrets written by earlier reconciles that the cache does not show yet.
        self.holds
            .overlay(&snapshot.keys, &mut snapshot.key_secrets);
        let mut work: Vec<(usize, KeyAction)> = snapshot
            .keys
            .iter()
            .enumerate()
            // A Secret name the API can never accept is compile's to report.
            .filter(|(_, key)| tollgate_api::compile::secret_name_problem(key).is_none())
            .filter_map(|(i, key)| {
                let ns = key
                    .namespace()
                    .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
                let live = snapshot
                    .key_secrets
                    .get(&(ns, tollgate_api::compile::secret_name(key)));
                match keys::key_action(key, live, now, keys::os_random) {
                    KeyAction::Keep => None,
                    action => Some((i, action)),
                }
            })
            .collect();
        let issuing = work.iter().any(|(_, a)| keys::action_secret(a).is_some());
        let view = if issuing && !self.key_publish_wait.is_zero() {
            self.holds.view(&self.gateway_reports().await)
        } else {
            publish::View::Off
        };
        let mut out = KeySecrets::default();
        let mut publishing = BTreeMap::new();
        work.retain_mut(|(i, action)| {
            let key = &snapshot.keys[*i];
            if keys::action_secret(action).is_none() {
                return true;
            }
            let ns = key
                .namespace()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
            let name = tollgate_api::compile::secret_name(key);
            let live = snapshot.key_secrets.get(&(ns.clone(), name.clone()));
            let (decided, decision) =
                self.hold_or_publish(key, live, std::mem::replace(action, KeyAction::Keep), &view);
            match decision {
                publish::Decision::Publish(why) => {
                    *action = decided;
                    publishing.insert(*i, why);
                    true
                }
                publish::Decision::Hold { .. } => {
                    let creating = matches!(decided, KeyAction::Create(_));
                    if let Some(secret) = keys::action_secret(&decided) {
                        out.held.insert((ns.clone(), name.clone()), secret.clone());
                    }
                    // No gateway count in the message: it would rewrite the status as
                    // each gateway catches up (the propagation record shows them).
                    if creating {
                        out.pending.insert(
                            ObjectRef::new(Kind::ApiKey, &ns, &key.name_any()),
                            format!(
                                "the new key is written into Secret {name} once every live gateway serves it (at most {}s after it was issued)",
                                self.key_publish_wait.as_secs()
                            ),
                        );
                    }
                    false
                }
            }
        });
        let keys_now = snapshot.keys.clone();
        let steps: Vec<BoxFuture<'_, (usize, Result<KeyOutcome, ReconcileError>)>> = work
            .into_iter()
            .map(|(i, action)| {
                let key = &keys_now[i];
                let step: BoxFuture<'_, _> =
                    Box::pin(async move { (i, self.key_step(key, action).await) });
                step
            })
            .collect();
        let outcomes: Vec<(usize, Result<KeyOutcome, ReconcileError>)> =
            futures_util::stream::iter(steps)
                .buffer_unordered(WRITE_CONCURRENCY)
                .collect()
                .await;
        let mut first_error = None;
        for (i, outcome) in outcomes {
            let key = &mut snapshot.keys[i];
            let ns = key
                .namespace()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
            match outcome {
                Ok(KeyOutcome::Unchanged) => {}
                Ok(KeyOutcome::Conflict(message)) => {
                    out.conflicts.insert(
                        ObjectRef::new(Kind::ApiKey, &ns, &key.name_any()),
                        (reasons::SECRET_CONFLICT, message),
                    );
                }
                Ok(KeyOutcome::Refused(message)) => {
                    report.refused_writes += 1;
                    out.conflicts.insert(
                        ObjectRef::new(Kind::ApiKey, &ns, &key.name_any()),
                        (reasons::SECRET_REFUSED, message),
                    );
                }
                Ok(KeyOutcome::Written { secret, writes }) => {
                    report.key_writes += writes;
                    if let Some(uid) = key.metadata.uid.as_deref() {
                        self.holds.release(uid, &secret);
                    }
                    if let Some(why) = publishing.get(&i) {
                        self.metrics.key_published(why.label());
                        if *why == publish::Why::Waited {
                            tracing::warn!(
                                api_key = %format!("{ns}/{}", key.name_any()),
                                wait_secs = self.key_publish_wait.as_secs(),
                                "key written before every live gateway reported serving it (--key-publish-wait ran out); clients may be refused until their configuration updates"
                            );
                        }
                    }
                    snapshot
                        .key_secrets
                        .insert((ns, secret.name_any()), *secret);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        self.metrics.keys_held(self.holds.len());
        match first_error {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Copies the budget spend and usage of ApiKeys whose key id changes (an upgrade to
    /// longer ids) to the new id, so that no budget restarts. Fails the reconcile (so the
    /// configuration is not switched) when Redis cannot be written.
    async fn move_key_state(
        &self,
        live: &tollgate_api::config::KeysConfig,
        new: &tollgate_api::config::KeysConfig,
        now: Timestamp,
    ) -> Result<(), ReconcileError> {
        let changes = tollgate_api::key_migration::id_changes(live, new);
        if changes.is_empty() {
            return Ok(());
        }
        let Some(conn) = &self.redis else {
            tracing::info!(
                keys = changes.len(),
                "key ids change; no Redis, so no state to move"
            );
            return Ok(());
        };
        self.may_write()?;
        let copied = tollgate_api::key_migration::copy_state(
            conn.clone(),
            &changes,
            now,
            self.redis_timeout,
        )
        .await
        .map_err(|e| ReconcileError::Redis(format!("moving key state to new key ids: {e}")))?;
        tracing::info!(
            keys = changes.len(),
            copied,
            "moved budget spend and usage to the new key ids"
        );
        Ok(())
    }

    /// The configuration hash each live gateway reports serving.
    async fn gateway_reports(&self) -> publish::Reports {
        use tollgate_api::heartbeat::{CONFIG, LIVE_WITHIN_SECS, SEEN};
        let Some(mut conn) = self.redis.clone() else {
            return publish::Reports::Off;
        };
        let now = Timestamp::now().as_millisecond();
        let work = async {
            let live: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(SEEN)
                .arg(now - (LIVE_WITHIN_SECS * 1000) as i64)
                .arg("+inf")
                .query_async(&mut conn)
                .await?;
            if live.is_empty() {
                return Ok::<_, redis::RedisError>(Vec::new());
            }
            let hashes: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(CONFIG)
                .arg(&live)
                .query_async(&mut conn)
                .await?;
            Ok(hashes.into_iter().map(Option::unwrap_or_default).collect())
        };
        match tokio::time::timeout(self.redis_timeout, work).await {
            Ok(Ok(hashes)) => publish::Reports::Live(hashes),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not read the gateways' configuration reports; propagation statuses keep their last value");
                publish::Reports::Unknown
            }
            Err(_) => {
                tracing::warn!(
                    "reading the gateways' configuration reports timed out; propagation statuses keep their last value"
                );
                publish::Reports::Unknown
            }
        }
    }

    /// Gateways live now and how many serve `hash`, from their Redis reports.
    async fn propagation<'h>(&self, hash: &'h str) -> status::Propagation<'h> {
        match self.gateway_reports().await {
            publish::Reports::Off => status::Propagation::Off,
            publish::Reports::Unknown => status::Propagation::Unknown,
            publish::Reports::Live(hashes) => {
                let serving = hashes.iter().filter(|h| *h == hash).count();
                let live = hashes.len();
                self.metrics.gateways(serving, live);
                status::Propagation::Known {
                    hash,
                    serving,
                    live,
                }
            }
        }
    }

    /// Step 5, globally: the gateways' progress on the latest configuration, on the
    /// generated ConfigMap, when it changed (one write per configuration, state or
    /// gateway count; none while the reports cannot be read). Its own field manager, so
    /// the configuration's apply never removes it.
    async fn record_propagation(
        &self,
        snapshot: &Snapshot,
        propagation: status::Propagation<'_>,
        now: Timestamp,
    ) -> Result<bool, ReconcileError> {
        let Some(record) = status::Record::of(propagation, now) else {
            return Ok(false);
        };
        let name = self.naming.config_map();
        let previous = snapshot
            .generated_maps
            .iter()
            .find(|cm| cm.name_any() == name)
            .and_then(|cm| {
                cm.annotations()
                    .get(status::PROPAGATION_ANNOTATION)
                    .cloned()
            });
        if record.same_as(previous.as_deref()) {
            return Ok(false);
        }
        let ns = &self.naming.namespace;
        let patch = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": ns,
                "annotations": {
                    status::PROPAGATION_ANNOTATION: serde_json::to_string(&record).unwrap_or_default(),
                },
            },
        });
        self.may_write()?;
        let written = Api::<ConfigMap>::namespaced(self.client.clone(), ns)
            .patch(
                &name,
                &PatchParams::apply(PROPAGATION_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(kube_err(format!(
                "recording propagation on ConfigMap {ns}/{name}"
            )))?;
        self.seen.wrote(&written, configmap_fingerprint);
        self.metrics.api_write("ConfigMap", "apply");
        Ok(true)
    }

    /// Step 5 for one kind.
    async fn write_status<K, S>(
        &self,
        object: &K,
        update: Option<status::Update<S>>,
        previous: Option<&S>,
        owned_elsewhere: &[&str],
    ) -> Result<bool, ReconcileError>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + Serialize
            + DeserializeOwned
            + Debug,
        S: Serialize,
    {
        let Some(update) = update else {
            return Ok(false);
        };
        let ns = object
            .namespace()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        let api = Api::<K>::namespaced(self.client.clone(), &ns);
        let patch = status_patch(&update.status, previous, owned_elsewhere);
        self.may_write()?;
        match api
            .patch_status(
                &object.name_any(),
                &PatchParams {
                    field_manager: Some(MANAGER.to_owned()),
                    ..PatchParams::default()
                },
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(written) => self.seen.wrote_status(&written),
            // Deleted meanwhile: nothing to report on.
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(false),
            Err(e) => {
                return Err(kube_err(format!(
                    "updating the status of {} {ns}/{}",
                    K::kind(&()),
                    object.name_any()
                ))(e));
            }
        }
        self.metrics.api_write(&K::kind(&()), "patch-status");
        if let Some(note) = &update.event {
            self.event(object, note).await;
        }
        Ok(true)
    }

    /// One reconcile of everything in `snapshot`, in the order that keeps every step
    /// safe if a later one fails: key Secrets, compile, revocations, generated objects,
    /// statuses (validate → build → apply → status).
    pub async fn reconcile(&self, mut snapshot: Snapshot) -> Result<Report, ReconcileError> {
        let now = Timestamp::now();
        let mut report = Report::default();
        // 1. Key Secrets.
        let key_secrets = self.key_lifecycle(&mut snapshot, now, &mut report).await?;
        // 2. Compile.
        let live_now = live_config(&snapshot, &self.naming);
        let Compiled {
            out,
            split,
            objects,
        } = self.compile(&snapshot, &key_secrets, live_now.as_ref(), now)?;
        report.config_hash = split.config_hash.clone();
        // 3. Revocations, and key state moved to changed key ids, before the
        //    configuration changes.
        if let Some(live) = &live_now {
            self.revoke(live, &out, now, &mut report).await?;
        }
        // 4. Generated objects.
        self.write_config(&snapshot, objects, &split, &out, &mut report)
            .await?;
        // 5. Status, from what this replica last wrote where the cache is behind.
        self.write_statuses(&mut snapshot, &out, &split, now, &mut report)
            .await?;
        self.metrics.observe_compile(&out, &split.config_hash);
        report.wake_in = self.next_wake(&snapshot, now, &report);
        Ok(report)
    }

    /// Step 2: compiles the objects (key Secrets from what step 1 decided) and splits
    /// the configuration into the objects gateways mount. Too many key or routing shards:
    /// the keys or RoutePolicies not served yet are left out (and told why), so what is
    /// served keeps updating and every status is still written.
    fn compile(
        &self,
        snapshot: &Snapshot,
        key_secrets: &KeySecrets,
        live_now: Option<&parts::AssembledConfig>,
        now: Timestamp,
    ) -> Result<Compiled, ReconcileError> {
        let resources = Resources {
            providers: snapshot.providers.clone(),
            route_policies: snapshot.routes.clone(),
            api_keys: snapshot.keys.clone(),
        };
        // Only key Secrets owned by their ApiKey (by uid): a labelled Secret someone else
        // made never becomes a served key. A key held until the gateways serve it is
        // compiled from memory.
        let owned = snapshot.keys.iter().filter_map(|key| {
            let id = (
                key.namespace()
                    .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
                tollgate_api::compile::secret_name(key),
            );
            if let Some(held) = key_secrets.held.get(&id) {
                return Some(held);
            }
            let secret = snapshot.key_secrets.get(&id)?;
            keys::owned_by(secret, key).then_some(secret)
        });
        let secrets = SecretStore::new(snapshot.credentials.iter().chain(owned), DEFAULT_NAMESPACE);
        let mut out = compile_with(&resources, &secrets, now, self.compile_options);
        apply_conflicts(&mut out, &key_secrets.conflicts);
        apply_pending(&mut out, &key_secrets.pending);
        let config_error = |e: &dyn std::fmt::Display| ReconcileError::Config(e.to_string());
        let mut split = parts::split(&out.config).map_err(|e| config_error(&e))?;
        // Too many key or routing shards: the keys or RoutePolicies not served yet are
        // left out (and told why), so what is served keeps updating and every status is
        // still written.
        let (mut left_keys, mut left_routes) = (None, None);
        let objects = loop {
            match desired::desired_objects(&split, &self.naming) {
                Err(desired::DesiredError::TooManyShards(need, max)) if left_keys.is_none() => {
                    let served: BTreeSet<&str> = live_now
                        .iter()
                        .flat_map(|l| l.config.keys.keys.iter().map(|k| k.sha256.as_str()))
                        .collect();
                    let left = leave_out_new_keys(&mut out, &served, need, max);
                    left_keys = Some(left);
                    tracing::warn!(
                        keys = left,
                        need,
                        max,
                        "the keys need more shards than the gateways mount; keys not served yet are left out (ConfigTooLarge)"
                    );
                }
                Err(desired::DesiredError::TooManyRoutingShards(need, max))
                    if left_routes.is_none() =>
                {
                    let served: BTreeSet<&str> = live_now
                        .iter()
                        .flat_map(|l| l.config.routing.routes.iter().map(|r| r.id.as_str()))
                        .collect();
                    let left = leave_out_new_routes(&mut out, &served, need, max);
                    left_routes = Some(left);
                    tracing::warn!(
                        route_policies = left,
                        need,
                        max,
                        "the Providers and routes need more ConfigMaps than the gateways mount; RoutePolicies not served yet are left out (ConfigTooLarge)"
                    );
                }
                other => break other.map_err(|e| config_error(&e))?,
            }
            split = parts::split(&out.config).map_err(|e| config_error(&e))?;
        };
        self.metrics.keys_left_out(left_keys.unwrap_or(0));
        self.metrics.routes_left_out(left_routes.unwrap_or(0));
        Ok(Compiled {
            out,
            split,
            objects,
        })
    }

    /// Step 3: revokes the keys the new configuration drops (only the lease holder
    /// publishes), after moving key state to changed key ids.
    async fn revoke(
        &self,
        live: &parts::AssembledConfig,
        out: &CompileOutput,
        now: Timestamp,
        report: &mut Report,
    ) -> Result<(), ReconcileError> {
        self.move_key_state(&live.config.keys, &out.config.keys, now)
            .await?;
        let served: BTreeSet<&str> = out
            .config
            .keys
            .keys
            .iter()
            .map(|k| k.sha256.as_str())
            .collect();
        let gone: Vec<String> = live
            .config
            .keys
            .keys
            .iter()
            .filter(|k| !served.contains(k.sha256.as_str()))
            .map(|k| k.sha256.clone())
            .collect();
        if !gone.is_empty() {
            report.revoked = gone.len();
            // Revocations are writes too: only the lease holder publishes them.
            self.may_write()?;
            match &self.redis {
                Some(conn) => {
                    match tollgate_api::revocation::publish(conn.clone(), &gone, self.redis_timeout)
                        .await
                    {
                        Ok(()) => {
                            self.metrics.revoked(gone.len());
                            tracing::info!(keys = gone.len(), "published key revocations");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not publish key revocations; gateways stop accepting the keys when their configuration updates")
                        }
                    }
                }
                None => tracing::info!(
                    keys = gone.len(),
                    "keys leave the configuration (no Redis: gateways stop accepting them when their configuration updates)"
                ),
            }
        }
        Ok(())
    }

    /// Step 4: writes the generated objects that differ from the live ones (compared by
    /// content, so hand edits are repaired; only this release's objects), deletes those no
    /// longer needed, and starts the wait of held keys the configuration now serves.
    async fn write_config(
        &self,
        snapshot: &Snapshot,
        objects: Vec<DesiredObject>,
        split: &parts::SplitConfig,
        out: &CompileOutput,
        report: &mut Report,
    ) -> Result<(), ReconcileError> {
        let mut live: LiveObjects = BTreeMap::new();
        for cm in &snapshot.generated_maps {
            if !self.naming.owns_config_map(&cm.name_any()) {
                continue;
            }
            let files = cm
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.as_str(), v.as_bytes()));
            live.insert(
                ("ConfigMap", cm.name_any()),
                desired::live_hash(files, cm.metadata.annotations.as_ref()),
            );
        }
        for s in &snapshot.generated_secrets {
            if !self.naming.owns_secret(&s.name_any()) {
                continue;
            }
            let files = s
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.as_str(), v.0.as_slice()));
            live.insert(
                ("Secret", s.name_any()),
                desired::live_hash(files, s.metadata.annotations.as_ref()),
            );
        }
        let plan = desired::plan(objects, &live, &self.naming);
        let ns = &self.naming.namespace;
        let apply = PatchParams::apply(MANAGER).force();
        for object in &plan.apply {
            self.may_write()?;
            match object {
                DesiredObject::ConfigMap(cm) => {
                    self.seen.wrote(cm, configmap_fingerprint);
                    let written = Api::<ConfigMap>::namespaced(self.client.clone(), ns)
                        .patch(&cm.name_any(), &apply, &Patch::Apply(cm))
                        .await
                        .map_err(kube_err(format!(
                            "applying ConfigMap {ns}/{}",
                            cm.name_any()
                        )))?;
                    self.seen.wrote(&written, configmap_fingerprint);
                }
                DesiredObject::Secret(s) => {
                    self.seen.wrote(s, secret_fingerprint);
                    let written = Api::<Secret>::namespaced(self.client.clone(), ns)
                        .patch(&s.name_any(), &apply, &Patch::Apply(s))
                        .await
                        .map_err(kube_err(format!("applying Secret {ns}/{}", s.name_any())))?;
                    self.seen.wrote(&written, secret_fingerprint);
                }
            }
            self.metrics.api_write(object.kind(), "apply");
            report.config_writes += 1;
        }
        for (kind, name) in &plan.delete {
            self.may_write()?;
            let deleted = match *kind {
                "ConfigMap" => Api::<ConfigMap>::namespaced(self.client.clone(), ns)
                    .delete(name, &DeleteParams::default())
                    .await
                    .map(|_| ()),
                _ => Api::<Secret>::namespaced(self.client.clone(), ns)
                    .delete(name, &DeleteParams::default())
                    .await
                    .map(|_| ()),
            };
            match deleted {
                Ok(()) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(kube_err(format!("deleting {kind} {ns}/{name}"))(e)),
            }
            self.metrics.api_write(kind, "delete");
            report.config_writes += 1;
        }
        if !plan.is_empty() {
            tracing::info!(config_hash = %&split.config_hash[..16], writes = report.config_writes, "configuration written");
        }
        // The configuration is in place: held keys it serves wait for the gateways from
        // here.
        let served: BTreeSet<&str> = if self.holds.is_empty() {
            BTreeSet::new()
        } else {
            out.config
                .keys
                .keys
                .iter()
                .map(|k| k.sha256.as_str())
                .collect()
        };
        self.holds.written(&split.config_hash, &served);
        Ok(())
    }

    /// Step 5: the propagation record and every object's status, written only where it
    /// changed.
    async fn write_statuses(
        &self,
        snapshot: &mut Snapshot,
        out: &CompileOutput,
        split: &parts::SplitConfig,
        now: Timestamp,
        report: &mut Report,
    ) -> Result<(), ReconcileError> {
        self.seen.overlay_statuses(&mut snapshot.providers);
        self.seen.overlay_statuses(&mut snapshot.routes);
        self.seen.overlay_statuses(&mut snapshot.keys);
        let propagation = self.propagation(&split.config_hash).await;
        // Look again while gateways catch up, and now and then while none reports or
        // the reports cannot be read.
        let every = tollgate_api::heartbeat::EVERY_SECS;
        report.wake_in = match propagation {
            status::Propagation::Known { serving, live, .. } if serving < live => {
                Some(Duration::from_secs(every))
            }
            status::Propagation::Known { live: 0, .. } | status::Propagation::Unknown => {
                Some(Duration::from_secs(3 * every))
            }
            _ => None,
        };
        report.status_writes +=
            usize::from(self.record_propagation(snapshot, propagation, now).await?);
        let propagated = propagation;
        let mut writes: Vec<BoxFuture<'_, Result<bool, ReconcileError>>> = Vec::new();
        for p in &snapshot.providers {
            let update = status::provider(p, out, propagated, now);
            writes.push(Box::pin(self.write_status(
                p,
                update,
                p.status.as_ref(),
                &[],
            )));
        }
        for r in &snapshot.routes {
            let update = status::route_policy(r, out, propagated, now);
            writes.push(Box::pin(self.write_status(
                r,
                update,
                r.status.as_ref(),
                &[],
            )));
        }
        for k in &snapshot.keys {
            let ns = k
                .namespace()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
            let rotation = snapshot
                .key_secrets
                .get(&(ns, tollgate_api::compile::secret_name(k)))
                .filter(|s| keys::owned_by(s, k))
                .map(keys::recorded_rotation);
            let update = status::api_key(k, out, propagated, rotation, now);
            writes.push(Box::pin(self.write_status(
                k,
                update,
                k.status.as_ref(),
                &["usage"],
            )));
        }
        let writes: Vec<Result<bool, ReconcileError>> = futures_util::stream::iter(writes)
            .buffer_unordered(WRITE_CONCURRENCY)
            .collect()
            .await;
        for w in writes {
            report.status_writes += usize::from(w?);
        }
        Ok(())
    }

    /// When to reconcile again without an event: while gateways catch up (already in
    /// `report`), at the next expiry or end of a grace period, to retry Secret writes the
    /// API refused (a quota raised or a webhook fixed sends no event), and often while
    /// keys are held (a client is waiting for each).
    fn next_wake(&self, snapshot: &Snapshot, now: Timestamp, report: &Report) -> Option<Duration> {
        let next = next_deadline(snapshot, now);
        let next = match (next, report.refused_writes > 0) {
            (Some(n), true) => Some(n.min(REFUSED_RETRY)),
            (None, true) => Some(REFUSED_RETRY),
            (n, false) => n,
        };
        // While keys are held, look often: a client is waiting for each.
        let next = match (next, self.holds.is_empty()) {
            (n, true) => n,
            (Some(n), false) => Some(n.min(publish::CHECK_EVERY)),
            (None, false) => Some(publish::CHECK_EVERY),
        };
        match (report.wake_in, next) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Leaves the keys `served` does not hold out of the configuration, reporting each on its
/// ApiKey (`Ready` False, `ConfigTooLarge`, hence a Warning Event); returns how many.
fn leave_out_new_keys(
    out: &mut CompileOutput,
    served: &BTreeSet<&str>,
    need: usize,
    max: usize,
) -> usize {
    let message = format!(
        "not served: the keys need {need} key shards but gateways mount {max}; raise --max-key-shards and the chart's keyShards together (keys already served keep working)"
    );
    let mut left = Vec::new();
    out.config.keys.keys.retain(|k| {
        let keep = served.contains(k.sha256.as_str());
        if !keep {
            left.push(k.api_key.clone());
        }
        keep
    });
    too_large(out, Kind::ApiKey, &left, &message)
}

/// Leaves the routes `served` does not hold out of the configuration, reporting each on
/// its RoutePolicy (`Ready` False, `ConfigTooLarge`, hence a Warning Event); returns how
/// many.
fn leave_out_new_routes(
    out: &mut CompileOutput,
    served: &BTreeSet<&str>,
    need: usize,
    max: usize,
) -> usize {
    let message = format!(
        "not served: the Providers and routes need {need} routing ConfigMaps but gateways mount {max}; raise --max-routing-shards and the chart's routingShards together (routes already served keep working)"
    );
    let mut left = Vec::new();
    out.config.routing.routes.retain(|r| {
        let keep = served.contains(r.id.as_str());
        if !keep {
            left.push(r.id.clone());
        }
        keep
    });
    too_large(out, Kind::RoutePolicy, &left, &message)
}

/// Reports the objects `left` (`namespace/name` ids) out of the configuration:
/// `Ready` False, `ConfigTooLarge`, with `message`; returns how many.
fn too_large(out: &mut CompileOutput, kind: Kind, left: &[String], message: &str) -> usize {
    for id in left {
        let Some((namespace, name)) = id.split_once('/') else {
            continue;
        };
        let object = ObjectRef::new(kind, namespace, name);
        if let Some(o) = out.objects.get_mut(&object) {
            o.served = false;
        }
        out.diagnostics.push(Diagnostic {
            object,
            severity: Severity::Error,
            condition: condition_types::READY,
            reason: reasons::CONFIG_TOO_LARGE,
            message: message.to_owned(),
            field: None,
        });
    }
    left.len()
}

/// How long after a watch failure reconciles wait for it to resume or relist.
pub const WATCH_SETTLE: Duration = Duration::from_secs(5);

/// How soon Secret writes the API refused for good are tried again.
const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// Reports ApiKeys whose Secret could not be written (name taken, or refused by the
/// API), replacing the "not found" compile saw. A conflicting Secret is never served; a
/// refused rotation leaves the previous key, which compile read, serving.
fn apply_conflicts(
    out: &mut CompileOutput,
    conflicts: &BTreeMap<ObjectRef, (&'static str, String)>,
) {
    for (object, (reason, message)) in conflicts {
        out.diagnostics
            .retain(|d| !(&d.object == object && d.reason == reasons::SECRET_NOT_FOUND));
        out.diagnostics.push(Diagnostic {
            object: object.clone(),
            severity: Severity::Error,
            condition: condition_types::RESOLVED_REFS,
            reason,
            message: message.clone(),
            field: Some("spec.secretName".to_owned()),
        });
        if *reason != reasons::SECRET_CONFLICT {
            continue;
        }
        if let Some(o) = out.objects.get_mut(object) {
            o.served = false;
        }
        // Never served: the Secret of that name is not this ApiKey's.
        let id = format!("{}/{}", object.namespace, object.name);
        out.config.keys.keys.retain(|k| k.api_key != id);
    }
}

/// ApiKeys whose first key is held until the gateways serve it: `Ready` False with
/// `KeyPending` (their Secret does not exist yet); the key stays in the configuration.
fn apply_pending(out: &mut CompileOutput, pending: &BTreeMap<ObjectRef, String>) {
    for (object, message) in pending {
        let Some(o) = out.objects.get_mut(object) else {
            continue;
        };
        if !o.served {
            continue;
        }
        o.served = false;
        out.diagnostics.push(Diagnostic {
            object: object.clone(),
            severity: Severity::Error,
            condition: condition_types::READY,
            reason: reasons::KEY_PENDING,
            message: message.clone(),
            field: None,
        });
    }
}

/// Time until the next key expiry or grace-period end after `now`. Grace periods are
/// read from the key Secrets, which record them (the status only shows them, and its
/// writes trigger no reconcile).
fn next_deadline(snapshot: &Snapshot, now: Timestamp) -> Option<Duration> {
    snapshot
        .keys
        .iter()
        .flat_map(|k| {
            let expiry = k.spec.expires_at.as_ref().map(|t| t.0);
            let ns = k
                .namespace()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
            let grace = snapshot
                .key_secrets
                .get(&(ns, tollgate_api::compile::secret_name(k)))
                .filter(|secret| keys::owned_by(secret, k))
                .and_then(|secret| keys::recorded_rotation(secret).1)
                .map(|p| p.expires_at.0);
            [expiry, grace]
        })
        .flatten()
        .filter(|t| *t > now)
        .min()
        .map(|t| {
            let d = t.duration_since(now);
            Duration::from_millis(d.as_millis().max(0) as u64) + Duration::from_millis(100)
        })
}

/// Events go out as this controller, from this replica.
pub fn reporter(identity: &str) -> Reporter {
    Reporter {
        controller: MANAGER.to_owned(),
        instance: Some(identity.to_owned()),
    }
}

/// Runs the debounced reconcile loop until `shutdown`; only while `leading`.
pub async fn run_loop(
    reconciler: Reconciler,
    watches: Arc<Watches>,
    notify: Arc<Notify>,
    mut leading: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    timing: LoopTiming,
) {
    let mut wake: Option<tokio::time::Instant> = None;
    let mut failures = 0u32;
    // Without leader election nobody sends on `leading`, and a closed channel is always
    // "changed": stop listening to it rather than reconciling in a loop.
    let mut election = true;
    loop {
        let sleep_until = wake.unwrap_or_else(|| tokio::time::Instant::now() + timing.resync);
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep_until(sleep_until) => {}
            changed = leading.changed(), if election => {
                if changed.is_err() {
                    election = false;
                    continue;
                }
            }
            _ = shutdown.wait_for(|s| *s) => return,
        }
        // Trailing debounce, bounded so a steady stream of changes cannot starve us.
        let started = tokio::time::Instant::now();
        while started.elapsed() < timing.max_debounce {
            if tokio::time::timeout(timing.debounce, notify.notified())
                .await
                .is_err()
            {
                break;
            }
        }
        if *shutdown.borrow() {
            return;
        }
        if !*leading.borrow() {
            // Keys held for the gateways are the leader's: the next one decides afresh.
            reconciler.holds.clear();
            reconciler.metrics.keys_held(0);
            wake = None;
            continue;
        }
        // No revocation, no dropping of a served object, no status from a cache that is
        // being relisted: its `InitDone` triggers the reconcile (checked again in 1 s).
        if watches.relisting() {
            tracing::info!("a watch is relisting; the reconcile waits for its fresh list");
            reconciler.metrics.reconcile_deferred();
            wake = Some(tokio::time::Instant::now() + Duration::from_secs(1));
            continue;
        }
        let snapshot = Snapshot::read(&watches).await;
        let timer = std::time::Instant::now();
        let span = tracing::info_span!(
            "reconcile",
            otel.status_code = tracing::field::Empty,
            "tollgate.providers" = snapshot.providers.len() as i64,
            "tollgate.route_policies" = snapshot.routes.len() as i64,
            "tollgate.api_keys" = snapshot.keys.len() as i64,
            "tollgate.config_hash" = tracing::field::Empty,
            "tollgate.config_writes" = tracing::field::Empty,
            "tollgate.status_writes" = tracing::field::Empty,
            "tollgate.key_writes" = tracing::field::Empty,
            "tollgate.revoked" = tracing::field::Empty,
            "error.type" = tracing::field::Empty,
        );
        let outcome =
            tokio::time::timeout(timing.reconcile_timeout, reconciler.reconcile(snapshot))
                .instrument(span.clone())
                .await
                .unwrap_or(Err(ReconcileError::TimedOut(timing.reconcile_timeout)));
        match &outcome {
            Ok(r) => {
                span.record(
                    "tollgate.config_hash",
                    &r.config_hash[..r.config_hash.len().min(16)],
                );
                span.record("tollgate.config_writes", r.config_writes as i64);
                span.record("tollgate.status_writes", r.status_writes as i64);
                span.record("tollgate.key_writes", r.key_writes as i64);
                span.record("tollgate.revoked", r.revoked as i64);
            }
            Err(e) => {
                span.record("otel.status_code", "error");
                span.record("error.type", e.to_string());
            }
        }
        drop(span);
        match outcome {
            Ok(report) => {
                failures = 0;
                reconciler.metrics.reconciled(true, timer.elapsed());
                let writes = report.config_writes + report.status_writes + report.key_writes;
                if writes > 0 {
                    tracing::info!(
                        took_ms = timer.elapsed().as_millis() as u64,
                        config_writes = report.config_writes,
                        status_writes = report.status_writes,
                        key_writes = report.key_writes,
                        revoked = report.revoked,
                        "reconciled"
                    );
                } else {
                    tracing::debug!(?report, "reconciled");
                }
                wake = report.wake_in.map(|d| tokio::time::Instant::now() + d);
            }
            Err(e) => {
                failures += 1;
                reconciler.metrics.reconciled(false, timer.elapsed());
                let backoff = Duration::from_millis(500 * 2u64.pow(failures.min(6)))
                    .min(Duration::from_secs(30));
                tracing::warn!(error = %e, retry_in = ?backoff, "reconcile failed");
                wake = Some(tokio::time::Instant::now() + backoff);
            }
        }
    }
}

/// Timing of the loop.
#[derive(Debug, Clone, Copy)]
pub struct LoopTiming {
    /// Quiet time before compiling.
    pub debounce: Duration,
    /// Longest postponement.
    pub max_debounce: Duration,
    /// Reconcile at least this often.
    pub resync: Duration,
    /// Longest one reconcile may take before it is abandoned and retried.
    pub reconcile_timeout: Duration,
}

#[cfg(test)]
mod tests {
    use tollgate_api::{compile::ObjectOutcome, config::CompiledKey, parts::sha256_hex};

    use super::*;

    #[test]
    fn route_policies_beyond_the_mounted_routing_shards_are_left_out_and_served_ones_stay() {
        let naming = Naming {
            namespace: "tollgate".into(),
            prefix: "tollgate-gateway".into(),
            max_key_shards: 16,
            max_routing_shards: 1,
        };
        let mut yaml = String::from(
            "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {name: mock, namespace: default}\nspec: {type: mock, models: [{name: demo-chat}]}\n",
        );
        for i in 0..2500 {
            yaml.push_str(&format!(
                "---\napiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: route-{i:04}, namespace: default}}\nspec: {{models: [team-{i:04}-chat], targets: [{{provider: mock, model: demo-chat}}]}}\n"
            ));
        }
        let mut loaded = tollgate_api::manifests::Loaded::default();
        let mut errors = Vec::new();
        tollgate_api::manifests::load_str(
            std::path::Path::new("routes.yaml"),
            &yaml,
            &mut loaded,
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let mut out = tollgate_api::compile::compile(
            &loaded.resources,
            &SecretStore::new([], DEFAULT_NAMESPACE),
            Timestamp::now(),
        );
        let split = parts::split(&out.config).unwrap();
        let Err(desired::DesiredError::TooManyRoutingShards(need, max)) =
            desired::desired_objects(&split, &naming)
        else {
            panic!("2,500 routes need more than one routing shard");
        };
        // The first 1,000 were served before.
        let before: Vec<String> = (0..1000).map(|i| format!("default/route-{i:04}")).collect();
        let served: BTreeSet<&str> = before.iter().map(String::as_str).collect();
        assert_eq!(leave_out_new_routes(&mut out, &served, need, max), 1500);
        let split = parts::split(&out.config).unwrap();
        assert!(desired::desired_objects(&split, &naming).is_ok());
        let left = ObjectRef::new(Kind::RoutePolicy, "default", "route-2024");
        assert!(!out.objects[&left].served);
        let ready = out.conditions(&left);
        assert_eq!(
            (ready[0].status, ready[0].reason),
            ("False", reasons::CONFIG_TOO_LARGE)
        );
        assert!(
            ready[0].message.contains("--max-routing-shards"),
            "{}",
            ready[0].message
        );
        let kept = ObjectRef::new(Kind::RoutePolicy, "default", "route-0012");
        assert_eq!(out.conditions(&kept)[0].status, "True");
    }

    #[test]
    fn keys_beyond_the_mounted_shards_are_left_out_and_told_why_and_served_keys_stay() {
        let naming = Naming {
            namespace: "tollgate".into(),
            prefix: "tollgate-gateway".into(),
            max_key_shards: 2,
            max_routing_shards: 4,
        };
        let mut out = CompileOutput::default();
        for i in 0..6000 {
            let sha256 = sha256_hex(format!("key-{i}").as_bytes());
            out.config.keys.keys.push(CompiledKey {
                id: sha256[..24].to_owned(),
                sha256,
                api_key: format!("default/key-{i}"),
                owner: format!("team-{}-with-a-longer-owner-name", i % 7),
                team: None,
                allowed_models: vec!["gpt-*".into(), "claude-*".into()],
                shared_routes_from: Vec::new(),
                limits: None,
                budget: None,
                expires_at: None,
                guardrails: Vec::new(),
            });
            out.objects.insert(
                ObjectRef::new(Kind::ApiKey, "default", &format!("key-{i}")),
                ObjectOutcome {
                    served: true,
                    ..ObjectOutcome::default()
                },
            );
        }
        out.config.keys.keys.sort_by(|a, b| a.sha256.cmp(&b.sha256));
        let split = parts::split(&out.config).unwrap();
        let Err(desired::DesiredError::TooManyShards(need, max)) =
            desired::desired_objects(&split, &naming)
        else {
            panic!("6,000 keys need more than two shards here");
        };
        // The first 1,000 keys were served before.
        let before: Vec<String> = (0..1000)
            .map(|i| sha256_hex(format!("key-{i}").as_bytes()))
            .collect();
        let served: BTreeSet<&str> = before.iter().map(String::as_str).collect();
        assert_eq!(leave_out_new_keys(&mut out, &served, need, max), 5000);
        let split = parts::split(&out.config).unwrap();
        assert!(desired::desired_objects(&split, &naming).is_ok());
        assert_eq!(out.config.keys.keys.len(), 1000);
        let left = ObjectRef::new(Kind::ApiKey, "default", "key-4321");
        assert!(!out.objects[&left].served);
        let d = out.diagnostics_for(&left).next().unwrap();
        assert_eq!(d.reason, reasons::CONFIG_TOO_LARGE);
        assert!(
            d.message.contains("raise --max-key-shards"),
            "{}",
            d.message
        );
        let ready = out.conditions(&left);
        assert_eq!(
            (ready[0].status, ready[0].reason),
            ("False", reasons::CONFIG_TOO_LARGE)
        );
        let kept = ObjectRef::new(Kind::ApiKey, "default", "key-12");
        assert!(out.objects[&kept].served && out.diagnostics_for(&kept).next().is_none());
    }
}
