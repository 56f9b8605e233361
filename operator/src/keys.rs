//! ApiKey lifecycle decisions (pure): create the key Secret once, rotate on request with a
//! grace period, and recover from a rotation interrupted half-way.
//!
//! The key is written only into a Secret owned by its ApiKey (garbage-collected with it),
//! for the client application; gateways only ever get its SHA-256. A rotation writes the
//! new key, the old key's hash and the end of its grace period into that Secret in one
//! write, so an interruption can never lose the old key while clients still use it, and
//! nothing a user can write through `apikeys/status` makes a hash valid.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time},
};
use kube::ResourceExt;
use tollgate_api::{
    compile::secret_name,
    key_format,
    parts::sha256_hex,
    v1alpha1::{
        API_KEY_SECRET_KEY, ApiKey, PREVIOUS_KEY_EXPIRES_SECRET_KEY,
        PREVIOUS_KEY_SHA256_SECRET_KEY, PreviousKey,
    },
};

use crate::desired::{MANAGED_BY, MANAGED_BY_VALUE};

/// Label on key Secrets naming their ApiKey.
pub const API_KEY_LABEL: &str = "tollgate.dev/api-key";

/// Annotation on key Secrets: the `spec.rotation.generation` their key was issued for,
/// written with the key itself, so issuing a key and recording its generation are one
/// write.
pub const KEY_GENERATION: &str = "tollgate.dev/key-generation";

/// What to do about one ApiKey's Secret.
#[derive(Clone, PartialEq)]
pub enum KeyAction {
    /// Nothing: the Secret holds the current key.
    Keep,
    /// No Secret yet: create it with a new key.
    Create(Secret),
    /// Rotate: replace the Secret with this one (carrying the live `resourceVersion`),
    /// which holds the new key and `previous`; then show both in the status.
    Rotate {
        /// The Secret with the new key.
        secret: Secret,
        /// The old key, valid for the grace period (`None` when it is 0).
        previous: Option<PreviousKey>,
        /// `spec.rotation.generation` being served.
        generation: i64,
    },
    /// The Secret exists but belongs to something else: never overwritten.
    Conflict(String),
}

impl std::fmt::Debug for KeyAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a key.
        match self {
            Self::Keep => f.write_str("Keep"),
            Self::Create(s) => write!(f, "Create({})", s.name_any()),
            Self::Rotate {
                secret, generation, ..
            } => write!(f, "Rotate({}, generation {generation})", secret.name_any()),
            Self::Conflict(m) => write!(f, "Conflict({m})"),
        }
    }
}

/// A new key from random bytes; `random` is called until it yields enough usable bytes.
pub fn new_key(mut random: impl FnMut() -> [u8; key_format::bytes_needed()]) -> String {
    loop {
        if let Some(key) = key_format::from_random(&random()) {
            return key;
        }
    }
}

/// The operating system's random bytes.
pub fn os_random() -> [u8; key_format::bytes_needed()] {
    let mut bytes = [0u8; key_format::bytes_needed()];
    getrandom::fill(&mut bytes).expect("the operating system provides random bytes");
    bytes
}

/// Whether `secret` was created for `key` (owned by this very ApiKey, by uid).
pub fn owned_by(secret: &Secret, key: &ApiKey) -> bool {
    let uid = key.metadata.uid.as_deref();
    uid.is_some()
        && secret
            .owner_references()
            .iter()
            .any(|o| o.kind == "ApiKey" && Some(o.uid.as_str()) == uid)
}

/// The plaintext key a Secret holds, if any.
pub fn secret_key(secret: &Secret) -> Option<String> {
    let data = secret.data.as_ref()?.get(API_KEY_SECRET_KEY)?;
    let text = std::str::from_utf8(&data.0).ok()?.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// What a key Secret records of rotations: the generation its key was issued for and the
/// previous key still in its grace period, for the ApiKey's status.
pub fn recorded_rotation(secret: &Secret) -> (Option<i64>, Option<PreviousKey>) {
    let data = secret.data.as_ref();
    let text = |k: &str| {
        data.and_then(|d| d.get(k))
            .and_then(|v| std::str::from_utf8(&v.0).ok())
            .map(str::trim)
    };
    let previous = match (
        text(PREVIOUS_KEY_SHA256_SECRET_KEY),
        text(PREVIOUS_KEY_EXPIRES_SECRET_KEY).and_then(|t| t.parse::<Timestamp>().ok()),
    ) {
        (Some(sha256), Some(until)) => Some(PreviousKey {
            sha256: sha256.to_owned(),
            expires_at: Time(until),
        }),
        _ => None,
    };
    (issued_generation(secret), previous)
}

/// The `spec.rotation.generation` a key was issued for.
pub fn issued_generation(secret: &Secret) -> Option<i64> {
    secret.annotations().get(KEY_GENERATION)?.parse().ok()
}

/// The Secret that hands `plaintext`, issued for rotation `generation`, to the client
/// application; with the previous key's hash and grace period when it still works.
pub fn key_secret_with(
    key: &ApiKey,
    plaintext: &str,
    generation: i64,
    previous: Option<&PreviousKey>,
) -> Secret {
    let mut secret = key_secret(key, plaintext, generation);
    if let (Some(p), Some(data)) = (previous, secret.data.as_mut()) {
        data.insert(
            PREVIOUS_KEY_SHA256_SECRET_KEY.to_owned(),
            ByteString(p.sha256.as_bytes().to_vec()),
        );
        data.insert(
            PREVIOUS_KEY_EXPIRES_SECRET_KEY.to_owned(),
            ByteString(p.expires_at.0.to_string().into_bytes()),
        );
    }
    secret
}

/// The value of [`API_KEY_LABEL`] for `key`: its name when that is a valid label value
/// (at most 63 characters), otherwise its first characters and its key id, so a long
/// name never makes the Secret invalid. The label marks key Secrets for the operator's
/// watch; ownership is decided by the ownerReference uid, never by this value.
pub fn api_key_label(key: &ApiKey) -> String {
    let name = key.name_any();
    if name.len() <= 63 {
        return name;
    }
    let ns = key
        .namespace()
        .unwrap_or_else(|| tollgate_api::compile::DEFAULT_NAMESPACE.to_owned());
    let id = tollgate_api::compile::key_id(&ns, &name);
    let head = name[..63 - id.len() - 1].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{head}-{id}")
}

/// The Secret that hands `plaintext`, issued for rotation `generation`, to the client
/// application.
pub fn key_secret(key: &ApiKey, plaintext: &str, generation: i64) -> Secret {
    let name = key.name_any();
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(key)),
            namespace: key.namespace(),
            annotations: Some(BTreeMap::from([(
                KEY_GENERATION.to_owned(),
                generation.to_string(),
            )])),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned()),
                (API_KEY_LABEL.to_owned(), api_key_label(key)),
            ])),
            owner_references: Some(vec![OwnerReference {
                api_version: "tollgate.dev/v1alpha1".to_owned(),
                kind: "ApiKey".to_owned(),
                name,
                uid: key.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            API_KEY_SECRET_KEY.to_owned(),
            ByteString(plaintext.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// The Secret a Create or Rotate action writes.
pub fn action_secret(action: &KeyAction) -> Option<&Secret> {
    match action {
        KeyAction::Create(secret) | KeyAction::Rotate { secret, .. } => Some(secret),
        KeyAction::Keep | KeyAction::Conflict(_) => None,
    }
}

/// Decides what to do about `key`'s Secret (`live`: the Secret of that name, if any).
pub fn key_action(
    key: &ApiKey,
    live: Option<&Secret>,
    now: Timestamp,
    random: impl FnMut() -> [u8; key_format::bytes_needed()],
) -> KeyAction {
    let wanted = key.spec.rotation.as_ref().map(|r| r.generation);
    let Some(live) = live else {
        return KeyAction::Create(key_secret(key, &new_key(random), wanted.unwrap_or(0)));
    };
    if !owned_by(live, key) {
        return KeyAction::Conflict(format!(
            "Secret {} exists and was not created for this ApiKey; delete it or set spec.secretName to a free name",
            live.name_any()
        ));
    }
    let status = key.status.as_ref();
    // The generation the key in the Secret was issued for (its annotation; older Secrets:
    // the status), 0 when never rotated.
    let served = issued_generation(live)
        .or(status.and_then(|s| s.rotated_generation))
        .unwrap_or(0);
    let current = secret_key(live);
    let current_hash = current.as_deref().map(|k| sha256_hex(k.as_bytes()));
    let rotate = |previous: Option<PreviousKey>, generation: i64| {
        let mut secret = key_secret_with(key, &new_key(random), generation, previous.as_ref());
        secret.metadata.resource_version = live.metadata.resource_version.clone();
        KeyAction::Rotate {
            secret,
            previous,
            generation,
        }
    };
    match (wanted, current_hash) {
        // The Secret lost its key (edited by hand): issue a new one, nothing to keep.
        (_, None) => rotate(None, wanted.unwrap_or(served)),
        (Some(generation), Some(hash)) if generation != served => {
            let grace = key
                .spec
                .rotation
                .as_ref()
                .and_then(|r| tollgate_api::duration::parse(&r.grace_period).ok())
                .unwrap_or_default();
            let previous = (!grace.is_zero()).then(|| PreviousKey {
                sha256: hash,
                expires_at: Time(now + grace),
            });
            rotate(previous, generation)
        }
        _ => KeyAction::Keep,
    }
}

#[cfg(test)]
mod tests {
    use tollgate_api::v1alpha1::{ApiKeySpec, ApiKeyStatus, Rotation};

    use super::*;

    fn api_key(rotation: Option<i64>, status: Option<ApiKeyStatus>) -> ApiKey {
        let mut spec: ApiKeySpec =
            serde_json::from_value(serde_json::json!({"owner": "team-a"})).unwrap();
        spec.rotation = rotation.map(|generation| Rotation {
            generation,
            grace_period: "1h".into(),
        });
        let mut key = ApiKey::new("app", spec);
        key.metadata.namespace = Some("apps".into());
        key.metadata.uid = Some("uid-1".into());
        key.status = status;
        key
    }

    fn counter() -> impl FnMut() -> [u8; 64] {
        let mut n = 0u8;
        move || {
            n = n.wrapping_add(1);
            [n; 64].map(|b| b.wrapping_mul(3) % 200)
        }
    }

    fn now() -> Timestamp {
        "2026-11-22T10:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_new_key_gets_an_owned_secret_with_a_generated_key() {
        let key = api_key(None, None);
        let KeyAction::Create(secret) = key_action(&key, None, now(), counter()) else {
            panic!()
        };
        assert_eq!(secret.name_any(), "app-key");
        assert_eq!(secret.namespace().as_deref(), Some("apps"));
        let owner = &secret.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("ApiKey", "uid-1", Some(true))
        );
        let plaintext = secret_key(&secret).unwrap();
        assert_eq!(key_format::shape(&plaintext), key_format::Shape::Generated);
        // Debug output never shows the key.
        let shown = format!("{:?}", key_action(&key, None, now(), counter()));
        assert!(!shown.contains("tg_"), "{shown}");
    }

    #[test]
    fn an_existing_secret_is_kept_and_a_foreign_one_is_never_overwritten() {
        let key = api_key(None, None);
        let secret = key_secret(&key, "tg_existing_key_value_000000000000", 0);
        assert_eq!(
            key_action(&key, Some(&secret), now(), counter()),
            KeyAction::Keep
        );
        let mut foreign = secret.clone();
        foreign.metadata.owner_references = None;
        assert!(matches!(
            key_action(&key, Some(&foreign), now(), counter()),
            KeyAction::Conflict(m) if m.contains("app-key")
        ));
        // Same name, but made for an earlier ApiKey of that name (another uid).
        let mut other = api_key(None, None);
        other.metadata.uid = Some("uid-0".into());
        assert!(matches!(
            key_action(&other, Some(&secret), now(), counter()),
            KeyAction::Conflict(_)
        ));
    }

    #[test]
    fn rotation_issues_a_new_key_and_keeps_the_old_one_for_the_grace_period() {
        let status = ApiKeyStatus {
            rotated_generation: Some(1),
            ..ApiKeyStatus::default()
        };
        let key = api_key(Some(2), Some(status));
        let old = "tg_existing_key_value_000000000000";
        let mut live = key_secret(&key, old, 1);
        live.metadata.resource_version = Some("41".into());
        let KeyAction::Rotate {
            secret,
            previous,
            generation,
        } = key_action(&key, Some(&live), now(), counter())
        else {
            panic!()
        };
        assert_eq!(generation, 2);
        let previous = previous.unwrap();
        assert_eq!(previous.sha256, sha256_hex(old.as_bytes()));
        assert_eq!(
            previous.expires_at.0,
            "2026-11-22T11:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_ne!(secret_key(&secret).unwrap(), old);
        assert_eq!(
            secret.metadata.resource_version.as_deref(),
            Some("41"),
            "replaced only if unchanged since read"
        );
        // Already served: nothing to do.
        let mut done = key.clone();
        done.status.as_mut().unwrap().rotated_generation = Some(2);
        assert_eq!(
            key_action(&done, Some(&secret), now(), counter()),
            KeyAction::Keep
        );
    }

    #[test]
    fn a_key_created_with_a_rotation_generation_is_not_rotated_again() {
        let key = api_key(Some(4), None);
        let KeyAction::Create(secret) = key_action(&key, None, now(), counter()) else {
            panic!()
        };
        assert_eq!(secret.annotations()[KEY_GENERATION], "4");
        assert_eq!(
            key_action(&key, Some(&secret), now(), counter()),
            KeyAction::Keep
        );
    }

    #[test]
    fn a_zero_grace_period_keeps_nothing_of_the_old_key() {
        let mut key = api_key(Some(1), None);
        key.spec.rotation.as_mut().unwrap().grace_period = "0s".into();
        let live = key_secret(&key, "tg_existing_key_value_000000000000", 0);
        assert!(matches!(
            key_action(&key, Some(&live), now(), counter()),
            KeyAction::Rotate {
                previous: None,
                generation: 1,
                ..
            }
        ));
    }

    #[test]
    fn a_rotation_writes_the_previous_key_into_the_secret_in_the_same_write() {
        let key = api_key(Some(3), None);
        let old = "tg_existing_key_value_000000000000";
        let live = key_secret(&key, old, 2);
        let KeyAction::Rotate {
            secret, previous, ..
        } = key_action(&key, Some(&live), now(), counter())
        else {
            panic!()
        };
        let data = secret.data.as_ref().unwrap();
        let previous = previous.unwrap();
        assert_eq!(
            data[PREVIOUS_KEY_SHA256_SECRET_KEY].0,
            sha256_hex(old.as_bytes()).into_bytes()
        );
        assert_eq!(
            data[PREVIOUS_KEY_EXPIRES_SECRET_KEY].0,
            previous.expires_at.0.to_string().into_bytes()
        );
        // A status that claims a previous key changes nothing: the Secret is the record.
        let mut forged = key.clone();
        forged.status = Some(ApiKeyStatus {
            rotated_generation: Some(3),
            previous_key: Some(PreviousKey {
                sha256: "0".repeat(64),
                expires_at: Time("2030-01-01T00:00:00Z".parse().unwrap()),
            }),
            ..ApiKeyStatus::default()
        });
        let KeyAction::Rotate { previous, .. } = key_action(&forged, Some(&live), now(), counter())
        else {
            panic!()
        };
        assert_eq!(previous.unwrap().sha256, sha256_hex(old.as_bytes()));
    }

    #[test]
    fn a_secret_that_lost_its_key_gets_a_new_one() {
        let key = api_key(None, None);
        let mut live = key_secret(&key, "x", 0);
        live.data = Some(BTreeMap::new());
        assert!(matches!(
            key_action(&key, Some(&live), now(), counter()),
            KeyAction::Rotate { previous: None, .. }
        ));
    }
}
