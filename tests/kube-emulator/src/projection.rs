//! A tiny "kubelet": projects ConfigMaps and Secrets into a directory.
//!
//! [`Projection`] polls the emulator's store and writes the data keys of
//! every ConfigMap and Secret selected by a label selector in one namespace
//! into a directory, with the same on-disk layout and update protocol as
//! kubelet's `AtomicWriter` (used for ConfigMap, Secret and projected
//! volumes):
//!
//! ```text
//! dir/..2025_01_02_03_04_05.123456789/<key>   the files of one version
//! dir/..data -> ..2025_01_02_03_04_05.123456789
//! dir/<key> -> ..data/<key>
//! ```
//!
//! An update writes a new timestamped directory, atomically swaps `..data`
//! with a `rename` of a temporary symlink, adds links for new keys, removes
//! links of vanished keys and finally deletes the previous timestamped
//! directory. A reader that resolves `dir/<key>` therefore sees either the
//! complete old or the complete new version. Secret values are
//! base64-decoded, ConfigMap `binaryData` too. When several objects carry the
//! same key, ConfigMaps are applied before Secrets and each in name order;
//! the last one wins.
//!
//! Like kubelet, the projection writes from its own cached copy of each
//! object, and [`ProjectionOptions::object_delay`] makes each change of each
//! object reach that copy after its own delay (kubelet's watch-based cache),
//! so one version of the directory may pair a new ConfigMap with an old
//! Secret until the Secret's copy catches up.

use crate::selector::LabelSelector;
use crate::{Core, Emulator};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;
use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use std::{fmt, fs};

/// How often a projection with object delays looks at the store (at most). Each look
/// lists the store under its lock, so looking more often slows a busy emulator down
/// (10,000 objects being written); delays are drawn in seconds, 100 ms is precise enough.
const OBSERVE_INTERVAL: Duration = Duration::from_millis(100);

/// Name of the symlink to the current version.
const DATA_LINK: &str = "..data";

/// Makes timestamped directory names unique within the process.
static VERSION_SEQ: AtomicU64 = AtomicU64::new(0);

/// File name to contents.
type Payload = BTreeMap<String, Vec<u8>>;

/// Options of [`Projection::start_with`]. The default is [`Projection::start`]'s
/// behaviour: no delays, a volume sync every 100 ms.
#[derive(Clone, Debug)]
pub struct ProjectionOptions {
    /// `(min, max)`: each change of each selected object (an update, its
    /// deletion, or it entering or leaving the selector) reaches the
    /// projection's cached copy of that object after its own delay, drawn
    /// uniformly from this range, so objects changed together catch up
    /// independently. Changes of one object stay in order. The state when
    /// the projection starts is not delayed. Default `(0, 0)`.
    pub object_delay: (Duration, Duration),
    /// Per-object ranges that replace `object_delay`, keyed
    /// `configmaps/<name>` or `secrets/<name>` (e.g. a Secret whose copy
    /// lags behind its ConfigMap's). Default empty.
    pub object_delays: BTreeMap<String, (Duration, Duration)>,
    /// Seed of the random number generator drawing the delays (same seed,
    /// same sequence of delays).
    pub seed: u64,
    /// How often the directory is rewritten from the cached copies
    /// (kubelet's volume sync). Default 100 ms.
    pub sync_period: Duration,
}

impl Default for ProjectionOptions {
    fn default() -> Self {
        Self {
            object_delay: (Duration::ZERO, Duration::ZERO),
            object_delays: BTreeMap::new(),
            seed: 1,
            sync_period: Duration::from_millis(100),
        }
    }
}

/// A running projection; stops polling when dropped (the files stay).
pub struct Projection {
    shared: Arc<Shared>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Projection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Projection")
            .field("dir", &self.shared.dir)
            .field("namespace", &self.shared.namespace)
            .finish_non_exhaustive()
    }
}

struct Shared {
    core: Arc<Core>,
    namespace: String,
    selector: LabelSelector,
    dir: PathBuf,
    options: ProjectionOptions,
    state: Mutex<State>,
}

/// Objects are keyed `<plural>/<name>`, so ConfigMaps sort before Secrets.
struct State {
    /// What is on disk now (`None` before the first write).
    current: Option<Payload>,
    /// Number of versions written.
    writes: u64,
    /// The cached copies the directory is written from.
    cache: BTreeMap<String, Value>,
    /// Changes not in the cache yet, per object in order: when they are due
    /// and the new state (`None`: gone).
    pending: BTreeMap<String, VecDeque<(Instant, Option<Value>)>>,
    /// resourceVersion of every object as last observed in the store.
    seen: BTreeMap<String, String>,
    /// The store's resourceVersion at the last observation.
    seen_rv: Option<u64>,
    /// resourceVersions of the cached copies at the last volume sync.
    visible: BTreeMap<String, String>,
    /// xorshift64 state.
    rng: u64,
}

impl State {
    fn new(seed: u64) -> Self {
        Self {
            current: None,
            writes: 0,
            cache: BTreeMap::new(),
            pending: BTreeMap::new(),
            seen: BTreeMap::new(),
            seen_rv: None,
            visible: BTreeMap::new(),
            // xorshift needs a non-zero state.
            rng: if seed == 0 {
                0x9e37_79b9_7f4a_7c15
            } else {
                seed
            },
        }
    }

    /// A delay drawn uniformly from `(min, max)`.
    fn draw(&mut self, (min, max): (Duration, Duration)) -> Duration {
        if max <= min {
            return min;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let span = (max - min).as_nanos();
        let offset = u128::from(self.rng) % (span + 1);
        min + Duration::from_nanos(u64::try_from(offset).unwrap_or(u64::MAX))
    }
}

impl Projection {
    /// Projects the ConfigMaps and Secrets in `namespace` matching
    /// `label_selector` into `dir` (created if needed). The first version is
    /// written before this returns; later changes are picked up within about
    /// 100 ms.
    pub fn start(
        emulator: &Emulator,
        namespace: &str,
        label_selector: &str,
        dir: impl Into<PathBuf>,
    ) -> io::Result<Projection> {
        Self::start_with(
            emulator,
            namespace,
            label_selector,
            dir,
            ProjectionOptions::default(),
        )
    }

    /// Like [`Projection::start`], with per-object delays and a volume sync
    /// period (see [`ProjectionOptions`]). The first version is written from
    /// the current objects before this returns.
    pub fn start_with(
        emulator: &Emulator,
        namespace: &str,
        label_selector: &str,
        dir: impl Into<PathBuf>,
        options: ProjectionOptions,
    ) -> io::Result<Projection> {
        let selector = LabelSelector::parse(label_selector)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let delayed = std::iter::once(&options.object_delay)
            .chain(options.object_delays.values())
            .any(|(_, max)| *max > Duration::ZERO);
        let sync_period = options.sync_period.max(Duration::from_millis(1));
        let shared = Arc::new(Shared {
            core: emulator.core.clone(),
            namespace: namespace.to_string(),
            selector,
            dir: dir.into(),
            state: Mutex::new(State::new(options.seed)),
            options,
        });
        shared.initialize()?;
        let (stop, stopped) = mpsc::channel::<()>();
        let poller = shared.clone();
        // Without delays the store is only read at each volume sync (as
        // `start` always did); with delays more often, so that each change is
        // delayed from about when it happened.
        let tick = if delayed {
            sync_period.min(OBSERVE_INTERVAL)
        } else {
            sync_period
        };
        let thread = std::thread::Builder::new()
            .name("kube-emulator-projection".into())
            .spawn(move || {
                let mut next_sync = Instant::now() + sync_period;
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(tick) {
                    let now = Instant::now();
                    let write = now >= next_sync;
                    if write {
                        next_sync = now + sync_period;
                    }
                    if let Err(e) = poller.update(write) {
                        tracing::warn!(dir = %poller.dir.display(), "projection update failed: {e}");
                    }
                }
            })?;
        Ok(Projection {
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The projected directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Brings the directory up to date now, without waiting for the next
    /// poll: looks at the store and rewrites the directory from the cached
    /// copies. Without object delays that is the current state; changes
    /// whose delay has not passed yet stay invisible. Returns whether a new
    /// version was written.
    pub fn sync(&self) -> io::Result<bool> {
        self.shared.update(true)
    }

    /// How many versions have been written (the first one included).
    pub fn writes(&self) -> u64 {
        self.shared.lock().writes
    }

    /// The objects the directory was last synced from, as
    /// `configmaps/<name>` or `secrets/<name>` → resourceVersion of the
    /// cached copy. A change that does not alter the files (e.g. a label)
    /// still shows here after the next volume sync.
    pub fn visible_versions(&self) -> BTreeMap<String, String> {
        self.shared.lock().visible.clone()
    }
}

impl Drop for Projection {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fills the cache with the current objects and writes the first version.
    fn initialize(&self) -> io::Result<()> {
        let mut state = self.lock();
        let (rv, objects) = self.selected();
        state.seen_rv = Some(rv);
        for (key, obj) in objects {
            state.seen.insert(key.clone(), resource_version(&obj));
            state.cache.insert(key, obj);
        }
        self.write(&mut state)?;
        Ok(())
    }

    /// Observes the store, moves due changes into the cache and, when
    /// `write`, writes a new version if the projected data changed (returning
    /// whether it did). The state lock is held from reading the store to
    /// writing the files, so concurrent updates (poller and
    /// [`Projection::sync`]) never write an older payload last.
    fn update(&self, write: bool) -> io::Result<bool> {
        let mut state = self.lock();
        let now = Instant::now();
        self.observe(&mut state, now);
        let State { pending, cache, .. } = &mut *state;
        pending.retain(|key, changes| {
            while changes.front().is_some_and(|(due, _)| *due <= now) {
                match changes.pop_front().and_then(|(_, change)| change) {
                    Some(obj) => cache.insert(key.clone(), obj),
                    None => cache.remove(key),
                };
            }
            !changes.is_empty()
        });
        if !write {
            return Ok(false);
        }
        self.write(&mut state)
    }

    /// Queues every change of the selected objects since the last look, each
    /// due after its own delay (never before an earlier change of the same object).
    fn observe(&self, state: &mut State, now: Instant) {
        if state.seen_rv == Some(self.core.store().rv()) {
            return;
        }
        let (rv, objects) = self.selected();
        state.seen_rv = Some(rv);
        let gone: Vec<String> = state
            .seen
            .keys()
            .filter(|key| !objects.contains_key(*key))
            .cloned()
            .collect();
        let mut changes: Vec<(String, Option<Value>)> =
            gone.into_iter().map(|key| (key, None)).collect();
        for (key, obj) in objects {
            if state.seen.get(&key) != Some(&resource_version(&obj)) {
                changes.push((key, Some(obj)));
            }
        }
        for (key, change) in changes {
            match &change {
                Some(obj) => state.seen.insert(key.clone(), resource_version(obj)),
                None => state.seen.remove(&key),
            };
            let range = self
                .options
                .object_delays
                .get(&key)
                .unwrap_or(&self.options.object_delay);
            let mut due = now + state.draw(*range);
            let queue = state.pending.entry(key).or_default();
            if let Some((last, _)) = queue.back() {
                due = due.max(*last);
            }
            queue.push_back((due, change));
        }
    }

    /// The store's resourceVersion and the selected ConfigMaps and Secrets,
    /// keyed `<plural>/<name>`.
    fn selected(&self) -> (u64, BTreeMap<String, Value>) {
        let store = self.core.store();
        let selectors = crate::selector::Selectors {
            labels: self.selector.clone(),
            fields: Default::default(),
        };
        let mut objects = BTreeMap::new();
        for plural in ["configmaps", "secrets"] {
            let Some(def) = store.resource("", "v1", plural) else {
                continue;
            };
            for obj in store.list(def, Some(&self.namespace), &selectors) {
                let name = obj["metadata"]["name"].as_str().unwrap_or_default();
                objects.insert(format!("{plural}/{name}"), obj);
            }
        }
        (store.rv(), objects)
    }

    /// Writes a new version from the cache if the projected data changed.
    fn write(&self, state: &mut State) -> io::Result<bool> {
        let payload = collect(&state.cache);
        let changed = state.current.as_ref() != Some(&payload);
        if changed {
            write_version(&self.dir, &payload)?;
            state.current = Some(payload);
            state.writes += 1;
        }
        state.visible = state
            .cache
            .iter()
            .map(|(key, obj)| (key.clone(), resource_version(obj)))
            .collect();
        Ok(changed)
    }
}

fn resource_version(obj: &Value) -> String {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The files the cached ConfigMaps and Secrets project (ConfigMaps first,
/// each kind in name order: the cache's key order).
fn collect(cache: &BTreeMap<String, Value>) -> Payload {
    let mut payload = Payload::new();
    for (key, obj) in cache {
        let (string_field, base64_field) = if key.starts_with("configmaps/") {
            (Some("data"), "binaryData")
        } else {
            (None, "data")
        };
        if let Some(field) = string_field
            && let Some(map) = obj[field].as_object()
        {
            for (key, value) in map {
                if let Some(text) = value.as_str() {
                    payload.insert(key.clone(), text.as_bytes().to_vec());
                }
            }
        }
        if let Some(map) = obj[base64_field].as_object() {
            for (key, value) in map {
                if let Some(bytes) = value.as_str().and_then(|v| BASE64.decode(v).ok()) {
                    payload.insert(key.clone(), bytes);
                }
            }
        }
    }
    // Keys that would collide with the bookkeeping entries are never projected.
    payload.retain(|key, _| !key.starts_with("..") && !key.contains('/'));
    payload
}

/// Writes `payload` as a new version of `dir` with the AtomicWriter protocol.
fn write_version(dir: &Path, payload: &Payload) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let version = create_version_dir(dir)?;
    for (key, bytes) in payload {
        fs::write(dir.join(&version).join(key), bytes)?;
    }
    let data_link = dir.join(DATA_LINK);
    let previous = fs::read_link(&data_link).ok();
    let tmp_link = dir.join("..data_tmp");
    match fs::remove_file(&tmp_link) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    symlink(&version, &tmp_link)?;
    fs::rename(&tmp_link, &data_link)?;
    for key in payload.keys() {
        let link = dir.join(key);
        if fs::symlink_metadata(&link).is_err() {
            symlink(Path::new(DATA_LINK).join(key), &link)?;
        }
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && !payload.contains_key(&name) && entry.file_type()?.is_symlink()
        {
            fs::remove_file(entry.path())?;
        }
    }
    if let Some(previous) = previous
        && previous != Path::new(&version)
    {
        fs::remove_dir_all(dir.join(previous))?;
    }
    Ok(())
}

/// Creates `..<UTC timestamp>.<sequence>` in `dir` and returns its name.
fn create_version_dir(dir: &Path) -> io::Result<String> {
    loop {
        let stamp = jiff::Timestamp::now().strftime("%Y_%m_%d_%H_%M_%S");
        let name = format!(
            "..{stamp}.{:09}",
            VERSION_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        match fs::create_dir(dir.join(&name)) {
            Ok(()) => return Ok(name),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}
