//! Where the configuration comes from, and reloading it atomically.
//!
//! Two sources: the compiled files the operator mounts (`--config-dir`) and, standalone,
//! Tollgate manifests compiled in process (`--resources`). Both are polled: a change in
//! content (not timestamps, which kubelet's `..data` symlink swap does not preserve) loads
//! a new [`Snapshot`] that replaces the old one in one atomic pointer swap. A source that
//! fails to load is logged and counted, and the last good snapshot keeps serving.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::{counter::Counter, family::Family};
use sha2::{Digest, Sha256};
use tollgate_api::{
    compile::{DEFAULT_NAMESPACE, SecretStore, compile},
    diagnostics::Severity,
    manifests, parts,
};

use crate::{metrics::ReloadLabels, snapshot::Snapshot};

/// A configuration source.
#[derive(Debug, Clone)]
pub enum Source {
    /// Operator-compiled files in one or more directories.
    ConfigDirs(Vec<PathBuf>),
    /// Manifests compiled in process.
    Resources(PathBuf),
}

/// The state of configuration loading, shared with the readiness probe.
#[derive(Debug, Default)]
pub struct ConfigState {
    /// The snapshot being served.
    pub current: ArcSwapOption<Snapshot>,
    /// Loads by result (`success`, `rejected`); also exported as a metric.
    pub reloads: Family<ReloadLabels, Counter>,
    /// Receives the hashes of keys that a newly loaded configuration no longer accepts,
    /// to publish their revocation to the other replicas.
    pub removed_keys: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Vec<[u8; 32]>>>,
    /// The last rejection, for /readyz.
    pub last_error: std::sync::Mutex<Option<String>>,
}

impl ConfigState {
    /// Successful loads so far.
    pub fn succeeded(&self) -> u64 {
        self.reloads
            .get_or_create(&ReloadLabels { result: "success" })
            .get()
    }

    /// Rejected loads so far.
    pub fn rejected(&self) -> u64 {
        self.reloads
            .get_or_create(&ReloadLabels { result: "rejected" })
            .get()
    }

    fn record_error(&self, error: String) {
        self.reloads
            .get_or_create(&ReloadLabels { result: "rejected" })
            .inc();
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    /// The last load error, if the latest attempt failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A loaded configuration and a fingerprint of the inputs it came from.
#[derive(Debug)]
pub struct Loaded {
    /// The snapshot.
    pub snapshot: Snapshot,
    /// Hash of the raw inputs, to detect changes cheaply.
    pub fingerprint: String,
}

impl Source {
    /// Reads every input file and returns their fingerprint and contents.
    fn read_inputs(&self) -> Result<(String, BTreeMap<String, Vec<u8>>), String> {
        let mut files = BTreeMap::new();
        match self {
            Self::ConfigDirs(dirs) => {
                for dir in dirs {
                    read_dir_files(dir, false, &mut files)?;
                }
            }
            Self::Resources(path) if path.is_dir() => read_dir_files(path, true, &mut files)?,
            Self::Resources(path) => {
                let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                files.insert(path.display().to_string(), bytes);
            }
        }
        let mut hasher = Sha256::new();
        for (name, bytes) in &files {
            hasher.update(name.as_bytes());
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        }
        let fingerprint = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok((fingerprint, files))
    }

    /// Loads the source if its fingerprint differs from `previous`.
    pub fn load_if_changed(&self, previous: Option<&str>) -> Outcome {
        let (fingerprint, files) = match self.read_inputs() {
            Ok(read) => read,
            Err(error) => {
                return Outcome::Rejected {
                    fingerprint: None,
                    error,
                };
            }
        };
        if previous == Some(fingerprint.as_str()) {
            return Outcome::Unchanged;
        }
        let snapshot = match self {
            Self::ConfigDirs(_) => {
                // Files are keyed by path; parts are named by file name.
                let by_name = files
                    .into_iter()
                    .filter_map(|(path, bytes)| {
                        Path::new(&path)
                            .file_name()
                            .and_then(|n| n.to_str())
                            .map(|n| (n.to_owned(), bytes))
                    })
                    .collect();
                parts::assemble(&by_name)
                    .map(|a| Snapshot::new(a.config, a.config_hash))
                    .map_err(|e| e.to_string())
            }
            Self::Resources(_) => compile_resources(&files),
        };
        match snapshot {
            Ok(snapshot) => Outcome::Loaded(Loaded {
                snapshot,
                fingerprint,
            }),
            Err(error) => Outcome::Rejected {
                fingerprint: Some(fingerprint),
                error,
            },
        }
    }
}

/// What one load attempt found.
#[derive(Debug)]
pub enum Outcome {
    /// Inputs unchanged since the last attempt.
    Unchanged,
    /// A new good configuration.
    Loaded(Loaded),
    /// Inputs that do not make a configuration (their fingerprint, when they could be
    /// read, so the same bad inputs are not retried and re-logged every tick).
    Rejected {
        /// Fingerprint of the rejected inputs.
        fingerprint: Option<String>,
        /// Why.
        error: String,
    },
}

/// Compiles manifests, logging every diagnostic.
fn compile_resources(files: &BTreeMap<String, Vec<u8>>) -> Result<Snapshot, String> {
    let mut loaded = manifests::Loaded::default();
    let mut errors = Vec::new();
    for (path, bytes) in files {
        let text = std::str::from_utf8(bytes).map_err(|_| format!("{path}: not UTF-8"))?;
        manifests::load_str(Path::new(path), text, &mut loaded, &mut errors);
    }
    if !errors.is_empty() {
        let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
        return Err(all.join("; "));
    }
    let secrets = SecretStore::new(&loaded.secrets, DEFAULT_NAMESPACE);
    let out = compile(&loaded.resources, &secrets, jiff::Timestamp::now());
    for d in &out.diagnostics {
        match d.severity {
            Severity::Error => {
                tracing::warn!(object = %d.object, reason = d.reason, field = d.field.as_deref(), "{}", d.message)
            }
            Severity::Warning => {
                tracing::info!(object = %d.object, reason = d.reason, field = d.field.as_deref(), "{}", d.message)
            }
        }
    }
    let split = parts::split(&out.config).map_err(|e| e.to_string())?;
    Ok(Snapshot::new(out.config, split.config_hash))
}

/// Reads the regular files of a directory (following symlinks, skipping dot-entries such
/// as kubelet's `..data`), recursing when `recursive` and keeping YAML only then.
fn read_dir_files(
    dir: &Path,
    recursive: bool,
    out: &mut BTreeMap<String, Vec<u8>>,
) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        // `metadata` follows symlinks: kubelet mounts files as links into `..data`.
        let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.is_dir() {
            if recursive {
                read_dir_files(&path, recursive, out)?;
            }
            continue;
        }
        if recursive && !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        out.insert(path.display().to_string(), bytes);
    }
    Ok(())
}

/// Loads once now; returns the fingerprint of what was loaded, if anything.
pub async fn load_initial(source: &Source, state: &ConfigState) -> Option<String> {
    reload(source, state, None).await
}

/// Polls `source` every `interval` forever, swapping in each good new configuration.
pub async fn watch(
    source: Source,
    state: Arc<ConfigState>,
    interval: Duration,
    mut fingerprint: Option<String>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if let Some(f) = reload(&source, &state, fingerprint.as_deref()).await {
            fingerprint = Some(f);
        }
    }
}

async fn reload(source: &Source, state: &ConfigState, previous: Option<&str>) -> Option<String> {
    let src = source.clone();
    let previous_owned = previous.map(str::to_owned);
    // File reads and compilation are blocking work; keep them off the request threads.
    let outcome =
        tokio::task::spawn_blocking(move || src.load_if_changed(previous_owned.as_deref()))
            .await
            .unwrap_or_else(|join| Outcome::Rejected {
                fingerprint: None,
                error: format!("configuration loader crashed: {join}"),
            });
    match outcome {
        Outcome::Unchanged => None,
        Outcome::Loaded(loaded) => {
            let hash = loaded.snapshot.config_hash.clone();
            let keys = loaded.snapshot.key_count();
            let previous = state.current.swap(Some(Arc::new(loaded.snapshot)));
            if let (Some(previous), Some(current), Some(tx)) = (
                previous,
                state.current.load_full(),
                state.removed_keys.get(),
            ) {
                let removed: Vec<[u8; 32]> = previous
                    .key_hashes()
                    .filter(|h| current.key_by_hash(h).is_none())
                    .copied()
                    .collect();
                if !removed.is_empty() {
                    let _ = tx.send(removed);
                }
            }
            state
                .reloads
                .get_or_create(&ReloadLabels { result: "success" })
                .inc();
            *state.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
            tracing::info!(config_hash = %&hash[..16], keys, "configuration loaded");
            Some(loaded.fingerprint)
        }
        Outcome::Rejected { fingerprint, error } => {
            let serving = state
                .current
                .load()
                .as_ref()
                .map(|s| s.config_hash[..16].to_owned());
            match serving.as_deref() {
                Some(serving) => {
                    tracing::error!(%error, serving, "configuration rejected; keeping the last good one")
                }
                None => tracing::error!(%error, "configuration rejected; none is being served yet"),
            }
            state.record_error(error);
            fingerprint
        }
    }
}
