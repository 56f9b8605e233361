//! Where the configuration comes from, and reloading it atomically.
//!
//! Two sources: the compiled files the operator mounts (`--config-dir`) and, standalone,
//! Tollgate manifests compiled in process (`--resources`). Both are polled. A poll first
//! compares the files' metadata (size, modification time, inode: kubelet's `..data`
//! symlink swap changes the inode), which costs a few `stat` calls however large the
//! configuration; only when that differs, and at least every [`VERIFY_EVERY`] anyway, are
//! the contents read and hashed. A change in content loads a new [`Snapshot`] that
//! replaces the old one in one atomic pointer swap. A source that fails to load is logged
//! and counted, and the last good snapshot keeps serving.

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
    compile::{CompileOptions, DEFAULT_NAMESPACE, SecretStore, compile_with},
    diagnostics::Severity,
    manifests, parts,
};

use crate::{metrics::ReloadLabels, snapshot::Snapshot};

/// How often a poll reads and hashes the contents even when the metadata looks unchanged
/// (a tool that restores timestamps can hide an edit from `stat`).
pub const VERIFY_EVERY: Duration = Duration::from_secs(30);

/// What a look at the source saw: a cheap hash of the files' metadata and the hash of
/// their contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    stat: u64,
    content: String,
}

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
    /// Breakers and routing statistics: they outlive snapshots, which hold handles to
    /// them.
    pub health: Arc<crate::targets::Health>,
    /// Loads by result (`success`, `rejected`); also exported as a metric.
    pub reloads: Family<ReloadLabels, Counter>,
    /// Receives the hashes of keys that a newly loaded configuration no longer accepts,
    /// to publish their revocation to the other replicas.
    pub removed_keys: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Vec<[u8; 32]>>>,
    /// The last rejection, for /readyz.
    pub last_error: std::sync::Mutex<Option<String>>,
    /// What an update still arriving waits for (cleared once it loads), for /readyz.
    pub waiting_for: std::sync::Mutex<Option<String>>,
    /// Notified after each new configuration is swapped in (the heartbeat reports it at
    /// once, so the operator can hand out keys it holds without waiting for a round).
    pub loaded: tokio::sync::Notify,
}

impl ConfigState {
    /// Incomplete sets seen so far (an update still arriving).
    pub fn pending(&self) -> u64 {
        self.reloads
            .get_or_create(&ReloadLabels { result: "pending" })
            .get()
    }

    /// What the update still arriving waits for, if one is.
    pub fn waiting_for(&self) -> Option<String> {
        self.waiting_for
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

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
    /// Fingerprint of the raw inputs, to detect changes cheaply.
    pub fingerprint: Fingerprint,
}

impl Source {
    /// The input files with their metadata (symlinks followed).
    fn list(&self) -> Result<Vec<(PathBuf, std::fs::Metadata)>, String> {
        let mut out = Vec::new();
        match self {
            Self::ConfigDirs(dirs) => {
                for dir in dirs {
                    list_dir_files(dir, false, &mut out)?;
                }
            }
            Self::Resources(path) if path.is_dir() => list_dir_files(path, true, &mut out)?,
            Self::Resources(path) => {
                let meta =
                    std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
                out.push((path.clone(), meta));
            }
        }
        Ok(out)
    }

    /// A hash of the inputs' names and metadata.
    fn stat(files: &[(PathBuf, std::fs::Metadata)]) -> u64 {
        use std::{hash::Hasher, os::unix::fs::MetadataExt};
        let mut h = std::hash::DefaultHasher::new();
        for (path, meta) in files {
            h.write(path.as_os_str().as_encoded_bytes());
            for n in [meta.len(), meta.ino(), meta.dev()] {
                h.write_u64(n);
            }
            for n in [
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ctime(),
                meta.ctime_nsec(),
            ] {
                h.write_i64(n);
            }
        }
        h.finish()
    }

    /// Reads every input file and returns their content hash and contents.
    fn read_inputs(
        files: &[(PathBuf, std::fs::Metadata)],
    ) -> Result<(String, BTreeMap<String, Vec<u8>>), String> {
        let mut contents = BTreeMap::new();
        for (path, _) in files {
            let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            contents.insert(path.display().to_string(), bytes);
        }
        let files = contents;
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

    /// Loads the source if it differs from `previous`; `verify` reads and hashes the
    /// contents even when the metadata is unchanged.
    pub fn load_if_changed(
        &self,
        previous: Option<&Fingerprint>,
        verify: bool,
        health: &crate::targets::Health,
    ) -> Outcome {
        let read = self.list().and_then(|listed| {
            let stat = Self::stat(&listed);
            if !verify && previous.is_some_and(|p| p.stat == stat) {
                return Ok(None);
            }
            Self::read_inputs(&listed)
                .map(|(content, files)| Some((Fingerprint { stat, content }, files)))
        });
        let (fingerprint, files) = match read {
            Ok(Some(read)) => read,
            Ok(None) => return Outcome::Unchanged(None),
            Err(error) => {
                return Outcome::Rejected {
                    fingerprint: None,
                    error,
                };
            }
        };
        if previous.is_some_and(|p| p.content == fingerprint.content) {
            return Outcome::Unchanged(Some(fingerprint));
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
                match parts::assemble(&by_name) {
                    Ok(a) => Ok(Snapshot::new(a.config, a.config_hash, health)),
                    // Still arriving: kubelet has not mounted every listed part yet.
                    Err(e) if e.is_pending() => {
                        return Outcome::Pending {
                            fingerprint,
                            waiting_for: e.to_string(),
                        };
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            Self::Resources(_) => compile_resources(&files, health),
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
    /// Inputs unchanged since the last attempt (with their new fingerprint when only
    /// their metadata changed).
    Unchanged(Option<Fingerprint>),
    /// A new good configuration.
    Loaded(Loaded),
    /// A configuration still arriving: the manifest lists a part that is not mounted
    /// yet. Not an error; the current configuration keeps serving until it arrives.
    Pending {
        /// Fingerprint of the incomplete inputs (retried when they change).
        fingerprint: Fingerprint,
        /// What is missing.
        waiting_for: String,
    },
    /// Inputs that do not make a configuration (their fingerprint, when they could be
    /// read, so the same bad inputs are not retried and re-logged every tick).
    Rejected {
        /// Fingerprint of the rejected inputs.
        fingerprint: Option<Fingerprint>,
        /// Why.
        error: String,
    },
}

/// Compiles manifests, logging every diagnostic.
fn compile_resources(
    files: &BTreeMap<String, Vec<u8>>,
    health: &crate::targets::Health,
) -> Result<Snapshot, String> {
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
    let options = CompileOptions {
        allow_link_local_upstreams: crate::egress::allow_link_local(),
    };
    let out = compile_with(&loaded.resources, &secrets, jiff::Timestamp::now(), options);
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
    Ok(Snapshot::new(out.config, split.config_hash, health))
}

/// Lists the regular files of a directory (following symlinks, skipping dot-entries such
/// as kubelet's `..data`), recursing when `recursive` and keeping YAML only then.
fn list_dir_files(
    dir: &Path,
    recursive: bool,
    out: &mut Vec<(PathBuf, std::fs::Metadata)>,
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
        // `metadata` follows symlinks: kubelet mounts files as links into `..data`. A link
        // whose file is gone is one kubelet is about to remove (it swaps `..data` first,
        // then deletes the links of files the new version lacks): not an input.
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        if meta.is_dir() {
            if recursive {
                list_dir_files(&path, recursive, out)?;
            }
            continue;
        }
        if recursive && !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        out.push((path, meta));
    }
    Ok(())
}

/// Loads once now; returns the fingerprint of what was loaded, if anything.
pub async fn load_initial(source: &Source, state: &ConfigState) -> Option<Fingerprint> {
    reload(source, state, None, true).await
}

/// Polls `source` every `interval` forever, swapping in each good new configuration.
pub async fn watch(
    source: Source,
    state: Arc<ConfigState>,
    interval: Duration,
    mut fingerprint: Option<Fingerprint>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut verified = tokio::time::Instant::now();
    loop {
        ticker.tick().await;
        let verify = verified.elapsed() >= VERIFY_EVERY;
        if verify {
            verified = tokio::time::Instant::now();
        }
        if let Some(f) = reload(&source, &state, fingerprint.as_ref(), verify).await {
            fingerprint = Some(f);
        }
    }
}

async fn reload(
    source: &Source,
    state: &ConfigState,
    previous: Option<&Fingerprint>,
    verify: bool,
) -> Option<Fingerprint> {
    let started = std::time::Instant::now();
    let src = source.clone();
    let previous_owned = previous.cloned();
    let health = state.health.clone();
    // File reads and compilation are blocking work; keep them off the request threads.
    let outcome = tokio::task::spawn_blocking(move || {
        src.load_if_changed(previous_owned.as_ref(), verify, &health)
    })
    .await
    .unwrap_or_else(|join| Outcome::Rejected {
        fingerprint: None,
        error: format!("configuration loader crashed: {join}"),
    });
    match outcome {
        Outcome::Unchanged(fingerprint) => fingerprint,
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
            *state.waiting_for.lock().unwrap_or_else(|e| e.into_inner()) = None;
            state.loaded.notify_one();
            // Read, compile, index and swap: what a reload costs.
            let load_ms = started.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(config_hash = %&hash[..16], keys, load_ms, "configuration loaded");
            Some(loaded.fingerprint)
        }
        Outcome::Pending {
            fingerprint,
            waiting_for,
        } => {
            state
                .reloads
                .get_or_create(&ReloadLabels { result: "pending" })
                .inc();
            tracing::info!(%waiting_for, "configuration update still arriving; serving the current one until it is complete");
            *state.waiting_for.lock().unwrap_or_else(|e| e.into_inner()) = Some(waiting_for);
            Some(fingerprint)
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

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {name: mock}\nspec: {type: mock, models: [{name: demo}]}\n";

    #[test]
    fn polls_read_contents_only_when_metadata_changes_and_reload_only_on_new_content() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.yaml");
        std::fs::write(&file, CONFIG).unwrap();
        let source = Source::Resources(dir.path().to_owned());
        let Outcome::Loaded(first) = source.load_if_changed(None, false, &Default::default())
        else {
            panic!("the first look loads");
        };
        let fp = first.fingerprint;

        // Nothing touched: answered from metadata alone.
        assert!(matches!(
            source.load_if_changed(Some(&fp), false, &Default::default()),
            Outcome::Unchanged(None)
        ));

        // Rewritten with the same bytes: contents read, nothing reloaded, and the new
        // metadata remembered.
        std::thread::sleep(Duration::from_millis(10));
        std::fs::write(&file, CONFIG).unwrap();
        let Outcome::Unchanged(Some(touched)) =
            source.load_if_changed(Some(&fp), false, &Default::default())
        else {
            panic!("same content after a rewrite is unchanged");
        };
        assert_eq!(touched.content, fp.content);
        assert_ne!(touched.stat, fp.stat);

        // New content, even with the old modification time restored: ctime still moves.
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        std::fs::write(&file, CONFIG.replace("demo", "demo-2")).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert!(matches!(
            source.load_if_changed(Some(&touched), false, &Default::default()),
            Outcome::Loaded(_)
        ));

        // A forced verification reads the contents whatever the metadata says.
        assert!(matches!(
            source.load_if_changed(Some(&touched), true, &Default::default()),
            Outcome::Loaded(_)
        ));
    }

    /// Writes `split`'s parts into `dir` as kubelet mounts them (by file name).
    fn mount(dir: &Path, split: &parts::SplitConfig) {
        for part in &split.parts {
            std::fs::write(dir.join(&part.file), &part.bytes).unwrap();
        }
    }

    #[tokio::test]
    async fn a_part_not_mounted_yet_is_waited_for_not_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let credentials = |secret: &str| tollgate_api::config::GatewayConfig {
            credentials: serde_json::from_value(
                serde_json::json!({"providers": {"ml/openai": secret}}),
            )
            .unwrap(),
            ..Default::default()
        };
        let old = parts::split(&credentials("sk-old")).unwrap();
        let new = parts::split(&credentials("sk-new")).unwrap();
        mount(dir.path(), &old);
        let source = Source::ConfigDirs(vec![dir.path().to_owned()]);
        let state = ConfigState::default();
        let fp = reload(&source, &state, None, false).await;
        assert_eq!(state.succeeded(), 1);

        // Kubelet has the new ConfigMap (manifest) but not yet the new credentials
        // Secret: the part it lists is missing. Not an error: the old one keeps serving.
        std::fs::write(dir.path().join(parts::MANIFEST_FILE), &new.parts[0].bytes).unwrap();
        let fp = reload(&source, &state, fp.as_ref(), false).await;
        let serving = state.current.load_full().unwrap();
        assert_eq!(serving.config_hash, old.config_hash);
        assert_eq!((state.pending(), state.rejected()), (1, 0));
        assert_eq!(state.last_error(), None);
        assert!(state.waiting_for().unwrap().contains("credentials-"));

        // The Secret arrives: the new configuration loads.
        mount(dir.path(), &new);
        reload(&source, &state, fp.as_ref(), false).await;
        let serving = state.current.load_full().unwrap();
        assert_eq!(serving.config_hash, new.config_hash);
        assert_eq!(state.waiting_for(), None);

        // A link kubelet has not removed yet, to a file the new version lacks: ignored.
        std::os::unix::fs::symlink(
            dir.path().join("..gone/keys-000-0123456789abcdef.json"),
            dir.path().join("keys-000-0123456789abcdef.json"),
        )
        .unwrap();
        reload(&source, &state, None, true).await;
        assert_eq!(state.rejected(), 0, "{:?}", state.last_error());

        // A damaged part under its expected name is rejected, and named.
        let file = &new.parts[2].file;
        std::fs::write(
            dir.path().join(file),
            String::from_utf8(new.parts[2].bytes.clone())
                .unwrap()
                .replace("sk-new", "sk-bad"),
        )
        .unwrap();
        reload(&source, &state, None, true).await;
        assert_eq!(state.rejected(), 1);
        assert!(state.last_error().unwrap().contains(file.as_str()));
    }
}
