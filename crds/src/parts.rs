//! Splitting a [`GatewayConfig`] into size-bounded, content-hashed parts and putting it
//! back together.
//!
//! A ConfigMap or Secret holds at most 1 MiB, so the compiled configuration is written as
//! several files:
//!
//! | file | store | holds |
//! |---|---|---|
//! | `manifest.json` | ConfigMap | format version, config hash, every other part's file and hash |
//! | `routing.json`, or `routing-NNN-<hash>.json` when it does not fit in one part | ConfigMap(s) | providers and routes, sharded by the hash of their id |
//! | `credentials-<hash>.json` | Secret | upstream credentials |
//! | `keys-NNN-<hash>.json` | Secret(s) | client key hashes and their policy, sharded by hash |
//!
//! Keys are sharded by the leading bits of their hash into a power-of-two number of shards,
//! so changing one key rewrites one shard. Because kubelet updates each mounted ConfigMap
//! and Secret on its own schedule, a reader only accepts a set of files whose hashes all
//! match the manifest; otherwise it keeps the configuration it has. Parts stored apart
//! from the manifest are named by the first 16 hex digits of their content hash, so a
//! part that has not arrived yet is *missing* ([`PartsError::Missing`]: wait for it),
//! never a different version under the expected name; a file with the expected name and
//! other content is damaged ([`PartsError::HashMismatch`]). An unsharded `routing.json`
//! shares the manifest's ConfigMap, so the two always change together.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::config::{
    CompiledKey, CredentialsConfig, GatewayConfig, KeysConfig, RoutingConfig, SCHEMA_VERSION,
};

/// Largest part written by default: half of the 1 MiB object limit, leaving room for
/// metadata and growth between compilations.
pub const DEFAULT_MAX_PART_BYTES: usize = 512 * 1024;

/// Most key shards a configuration may have (at the default size, several hundred
/// thousand keys).
pub const MAX_KEY_SHARDS: usize = 256;

/// Name of the manifest file.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Name of the routing part.
pub const ROUTING_FILE: &str = "routing.json";
/// Name of the credentials part before its content hash (`credentials-<hash>.json`).
pub const CREDENTIALS_FILE: &str = "credentials";
/// Hex digits of the content hash in a part's file name.
const NAME_HASH_DIGITS: usize = 16;

/// Where a part must be stored.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Store {
    /// A ConfigMap: nothing secret.
    ConfigMap,
    /// A Secret: credentials or key hashes.
    Secret,
}

/// Kind of a part.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum PartKind {
    /// [`RoutingConfig`].
    Routing,
    /// [`CredentialsConfig`].
    Credentials,
    /// One shard of [`KeysConfig`].
    Keys,
}

impl PartKind {
    /// Where parts of this kind are stored.
    pub fn store(self) -> Store {
        match self {
            Self::Routing => Store::ConfigMap,
            Self::Credentials | Self::Keys => Store::Secret,
        }
    }
}

/// One file of the compiled configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct ConfigPart {
    /// File name (also the ConfigMap/Secret data key).
    pub file: String,
    /// Where it must be stored.
    pub store: Store,
    /// SHA-256 of the payload, lowercase hex (empty for the manifest itself).
    pub content_hash: String,
    /// File contents (JSON).
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for ConfigPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigPart")
            .field("file", &self.file)
            .field("store", &self.store)
            .field("content_hash", &self.content_hash)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// The parts of a configuration and the hash that identifies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitConfig {
    /// Hash of the whole configuration (over every part's hash).
    pub config_hash: String,
    /// The manifest first, then routing, credentials and key shards.
    pub parts: Vec<ConfigPart>,
}

/// Why a configuration could not be split or reassembled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartsError {
    /// A part would exceed the size limit and cannot be sharded further.
    #[error("{file} would be {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// The file.
        file: String,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A file is missing from the set being assembled.
    #[error("{0} is listed in the manifest but missing")]
    Missing(String),
    /// A file's content does not match the manifest (usually: an update still propagating).
    #[error("{file} has content hash {found}, the manifest expects {expected}")]
    HashMismatch {
        /// The file.
        file: String,
        /// Hash in the manifest.
        expected: String,
        /// Hash of the file's payload.
        found: String,
    },
    /// The format version is not one this build understands.
    #[error("{file} has schema version {found}; this build reads version {SCHEMA_VERSION}")]
    Version {
        /// The file.
        file: String,
        /// Its version.
        found: u32,
    },
    /// A file is not valid JSON of the expected shape.
    #[error("{file}: {message}")]
    Malformed {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Manifest {
    schema_version: u32,
    config_hash: String,
    parts: Vec<ManifestEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ManifestEntry {
    file: String,
    kind: PartKind,
    store: Store,
    content_hash: String,
    bytes: usize,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvelopeOut<'a> {
    schema_version: u32,
    kind: PartKind,
    shard: usize,
    shards: usize,
    content_hash: &'a str,
    payload: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EnvelopeIn<'a> {
    schema_version: u32,
    kind: PartKind,
    shard: usize,
    shards: usize,
    content_hash: String,
    #[serde(borrow)]
    payload: &'a RawValue,
}

impl PartsError {
    /// Whether the set is only incomplete: a part the manifest lists has not arrived
    /// (kubelet updates each mounted object on its own schedule). Keep the current
    /// configuration and wait; nothing is wrong.
    pub fn is_pending(&self) -> bool {
        matches!(self, Self::Missing(file) if file != MANIFEST_FILE)
    }
}

/// SHA-256 of `bytes` as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest.iter() {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
    }
    out
}

/// Splits with [`DEFAULT_MAX_PART_BYTES`].
pub fn split(config: &GatewayConfig) -> Result<SplitConfig, PartsError> {
    split_with_limit(config, DEFAULT_MAX_PART_BYTES)
}

/// Splits a configuration into parts no larger than `limit` bytes.
pub fn split_with_limit(config: &GatewayConfig, limit: usize) -> Result<SplitConfig, PartsError> {
    let mut parts = shard_routing(&config.routing, limit)?;
    parts.push(make_part(
        PartKind::Credentials,
        0,
        1,
        &config.credentials,
        limit,
    )?);
    parts.extend(shard_keys(&config.keys.keys, limit)?);

    let entries: Vec<ManifestEntry> = parts
        .iter()
        .map(|p| ManifestEntry {
            file: p.file.clone(),
            kind: kind_of(&p.file).expect("parts other than the manifest have a kind"),
            store: p.store,
            content_hash: p.content_hash.clone(),
            bytes: p.bytes.len(),
        })
        .collect();
    let config_hash = config_hash(&entries);
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        config_hash: config_hash.clone(),
        parts: entries,
    };
    let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    parts.insert(
        0,
        ConfigPart {
            file: MANIFEST_FILE.to_owned(),
            store: Store::ConfigMap,
            content_hash: String::new(),
            bytes,
        },
    );
    Ok(SplitConfig { config_hash, parts })
}

/// The kind of the part in `file` (`None`: the manifest, or no part's name).
pub fn kind_of(file: &str) -> Option<PartKind> {
    if file == ROUTING_FILE || (file.starts_with("routing-") && file.ends_with(".json")) {
        Some(PartKind::Routing)
    } else if file.starts_with(CREDENTIALS_FILE) && file.ends_with(".json") {
        Some(PartKind::Credentials)
    } else if file.starts_with("keys-") && file.ends_with(".json") {
        Some(PartKind::Keys)
    } else {
        None
    }
}

/// The shard number of a key or routing shard's file (`keys-NNN-<hash>.json`,
/// `routing-NNN-<hash>.json`).
pub fn shard_index(file: &str) -> Option<usize> {
    let rest = file
        .strip_prefix("keys-")
        .or_else(|| file.strip_prefix("routing-"))?
        .strip_suffix(".json")?;
    rest.split('-').next()?.parse().ok()
}

/// The file name of a part: `routing.json`, else named by its content.
fn file_name(kind: PartKind, shard: usize, shards: usize, content_hash: &str) -> String {
    let short = &content_hash[..NAME_HASH_DIGITS.min(content_hash.len())];
    match kind {
        PartKind::Routing if shards <= 1 => ROUTING_FILE.to_owned(),
        PartKind::Routing => format!("routing-{shard:03}-{short}.json"),
        PartKind::Credentials => format!("{CREDENTIALS_FILE}-{short}.json"),
        PartKind::Keys => format!("keys-{shard:03}-{short}.json"),
    }
}

fn config_hash(entries: &[ManifestEntry]) -> String {
    let mut text = format!("v{SCHEMA_VERSION}\n");
    for e in entries {
        text.push_str(&e.file);
        text.push(' ');
        text.push_str(&e.content_hash);
        text.push('\n');
    }
    sha256_hex(text.as_bytes())
}

fn make_part<T: Serialize>(
    kind: PartKind,
    shard: usize,
    shards: usize,
    payload: &T,
    limit: usize,
) -> Result<ConfigPart, PartsError> {
    let payload = serde_json::to_string(payload).expect("compiled config serialises");
    let content_hash = sha256_hex(payload.as_bytes());
    let raw = RawValue::from_string(payload).expect("serde_json output is valid JSON");
    let envelope = EnvelopeOut {
        schema_version: SCHEMA_VERSION,
        kind,
        shard,
        shards,
        content_hash: &content_hash,
        payload: &raw,
    };
    let bytes = serde_json::to_vec(&envelope).expect("envelope serialises");
    let file = file_name(kind, shard, shards, &content_hash);
    if bytes.len() > limit {
        return Err(PartsError::TooLarge {
            file,
            size: bytes.len(),
            limit,
        });
    }
    Ok(ConfigPart {
        file,
        store: kind.store(),
        content_hash,
        bytes,
    })
}

/// Shard index of a key hash among `shards` (a power of two): its leading 32 bits.
fn shard_of(sha256: &str, shards: usize) -> usize {
    let lead = u32::from_str_radix(sha256.get(..8).unwrap_or("0"), 16).unwrap_or(0);
    ((u64::from(lead) * shards as u64) >> 32) as usize
}

/// The routing part, or, when it does not fit in one, a power-of-two number of shards
/// (Providers and routes by the hash of their id), so one changed object rewrites one.
fn shard_routing(routing: &RoutingConfig, limit: usize) -> Result<Vec<ConfigPart>, PartsError> {
    let mut shards = 1;
    loop {
        let mut buckets = vec![RoutingConfig::default(); shards];
        for (id, provider) in &routing.providers {
            let shard = shard_of(&sha256_hex(id.as_bytes()), shards);
            buckets[shard]
                .providers
                .insert(id.clone(), provider.clone());
        }
        for route in &routing.routes {
            let shard = shard_of(&sha256_hex(route.id.as_bytes()), shards);
            buckets[shard].routes.push(route.clone());
        }
        let made: Result<Vec<ConfigPart>, PartsError> = buckets
            .iter()
            .enumerate()
            .map(|(i, bucket)| make_part(PartKind::Routing, i, shards, bucket, limit))
            .collect();
        match made {
            Ok(parts) => return Ok(parts),
            Err(e) if shards >= MAX_KEY_SHARDS => return Err(e),
            Err(_) => shards *= 2,
        }
    }
}

fn shard_keys(keys: &[CompiledKey], limit: usize) -> Result<Vec<ConfigPart>, PartsError> {
    let mut shards = 1;
    loop {
        let mut buckets: Vec<Vec<CompiledKey>> = vec![Vec::new(); shards];
        for key in keys {
            buckets[shard_of(&key.sha256, shards)].push(key.clone());
        }
        let mut parts = Vec::with_capacity(shards);
        let mut too_large = None;
        for (i, keys) in buckets.into_iter().enumerate() {
            match make_part(PartKind::Keys, i, shards, &KeysConfig { keys }, limit) {
                Ok(part) => parts.push(part),
                Err(e) => {
                    too_large = Some(e);
                    break;
                }
            }
        }
        match too_large {
            None => return Ok(parts),
            Some(e) if shards >= MAX_KEY_SHARDS => return Err(e),
            Some(_) => shards *= 2,
        }
    }
}

/// A configuration put back together from its files.
#[derive(Clone, Debug, PartialEq)]
pub struct AssembledConfig {
    /// The configuration.
    pub config: GatewayConfig,
    /// Its hash, as in the manifest.
    pub config_hash: String,
}

/// Reassembles a configuration from files by name (as mounted from the ConfigMap and
/// Secrets). Fails unless every part listed in the manifest is present with the listed
/// hash; extra files are ignored.
pub fn assemble(files: &BTreeMap<String, Vec<u8>>) -> Result<AssembledConfig, PartsError> {
    let manifest_bytes = files
        .get(MANIFEST_FILE)
        .ok_or_else(|| PartsError::Missing(MANIFEST_FILE.to_owned()))?;
    let manifest: Manifest =
        serde_json::from_slice(manifest_bytes).map_err(|e| malformed(MANIFEST_FILE, e))?;
    if manifest.schema_version != SCHEMA_VERSION {
        return Err(PartsError::Version {
            file: MANIFEST_FILE.to_owned(),
            found: manifest.schema_version,
        });
    }
    if config_hash(&manifest.parts) != manifest.config_hash {
        return Err(PartsError::Malformed {
            file: MANIFEST_FILE.to_owned(),
            message: "configHash does not match the listed parts".to_owned(),
        });
    }
    let mut config = GatewayConfig::default();
    let (mut saw_routing, mut saw_credentials) = (false, false);
    for entry in &manifest.parts {
        let bytes = files
            .get(&entry.file)
            .ok_or_else(|| PartsError::Missing(entry.file.clone()))?;
        let envelope: EnvelopeIn<'_> =
            serde_json::from_slice(bytes).map_err(|e| malformed(&entry.file, e))?;
        if envelope.schema_version != SCHEMA_VERSION {
            return Err(PartsError::Version {
                file: entry.file.clone(),
                found: envelope.schema_version,
            });
        }
        let found = sha256_hex(envelope.payload.get().as_bytes());
        if found != entry.content_hash || envelope.content_hash != entry.content_hash {
            return Err(PartsError::HashMismatch {
                file: entry.file.clone(),
                expected: entry.content_hash.clone(),
                found,
            });
        }
        if envelope.kind != entry.kind || envelope.shard >= envelope.shards.max(1) {
            return Err(PartsError::Malformed {
                file: entry.file.clone(),
                message: "part kind or shard number does not match the manifest".to_owned(),
            });
        }
        let payload = envelope.payload.get();
        match envelope.kind {
            PartKind::Routing => {
                let shard = serde_json::from_str::<RoutingConfig>(payload)
                    .map_err(|e| malformed(&entry.file, e))?;
                config.routing.providers.extend(shard.providers);
                config.routing.routes.extend(shard.routes);
                saw_routing = true;
            }
            PartKind::Credentials => {
                config.credentials = serde_json::from_str::<CredentialsConfig>(payload)
                    .map_err(|e| malformed(&entry.file, e))?;
                saw_credentials = true;
            }
            PartKind::Keys => {
                let shard: KeysConfig =
                    serde_json::from_str(payload).map_err(|e| malformed(&entry.file, e))?;
                config.keys.keys.extend(shard.keys);
            }
        }
    }
    for (saw, what) in [(saw_routing, "routing"), (saw_credentials, "credentials")] {
        if !saw {
            return Err(PartsError::Malformed {
                file: MANIFEST_FILE.to_owned(),
                message: format!("lists no {what} part"),
            });
        }
    }
    config.keys.keys.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    config.routing.routes.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(AssembledConfig {
        config,
        config_hash: manifest.config_hash,
    })
}

fn malformed(file: &str, e: serde_json::Error) -> PartsError {
    PartsError::Malformed {
        file: file.to_owned(),
        message: e.to_string(),
    }
}
