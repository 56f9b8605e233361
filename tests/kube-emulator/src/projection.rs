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

use crate::selector::LabelSelector;
use crate::{Core, Emulator};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;
use std::{fmt, fs};

/// How often the projection polls the store.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Name of the symlink to the current version.
const DATA_LINK: &str = "..data";

/// Makes timestamped directory names unique within the process.
static VERSION_SEQ: AtomicU64 = AtomicU64::new(0);

/// File name to contents.
type Payload = BTreeMap<String, Vec<u8>>;

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
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// What is on disk now (`None` before the first write).
    current: Option<Payload>,
    /// Number of versions written.
    writes: u64,
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
        let selector = LabelSelector::parse(label_selector)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let shared = Arc::new(Shared {
            core: emulator.core.clone(),
            namespace: namespace.to_string(),
            selector,
            dir: dir.into(),
            state: Mutex::default(),
        });
        shared.sync()?;
        let (stop, stopped) = mpsc::channel::<()>();
        let poller = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kube-emulator-projection".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(POLL_INTERVAL) {
                    if let Err(e) = poller.sync() {
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
    /// poll. Returns whether a new version was written.
    pub fn sync(&self) -> io::Result<bool> {
        self.shared.sync()
    }

    /// How many versions have been written (the first one included).
    pub fn writes(&self) -> u64 {
        self.shared.lock().writes
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

    /// Writes a new version if the selected data changed. The state lock is
    /// held from reading the store to writing the files, so concurrent syncs
    /// (poller and [`Projection::sync`]) never write an older payload last.
    fn sync(&self) -> io::Result<bool> {
        let mut state = self.lock();
        let payload = self.collect();
        if state.current.as_ref() == Some(&payload) {
            return Ok(false);
        }
        write_version(&self.dir, &payload)?;
        state.current = Some(payload);
        state.writes += 1;
        Ok(true)
    }

    /// The files the selected ConfigMaps and Secrets project.
    fn collect(&self) -> Payload {
        let store = self.core.store();
        let selectors = crate::selector::Selectors {
            labels: self.selector.clone(),
            fields: Default::default(),
        };
        let mut payload = Payload::new();
        for (plural, string_field, base64_field) in [
            ("configmaps", Some("data"), "binaryData"),
            ("secrets", None, "data"),
        ] {
            let Some(def) = store.resource("", "v1", plural) else {
                continue;
            };
            for obj in store.list(def, Some(&self.namespace), &selectors) {
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
        }
        // Keys that would collide with the bookkeeping entries are never projected.
        payload.retain(|key, _| !key.starts_with("..") && !key.contains('/'));
        payload
    }
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
