//! ApiKey → [`CompiledKey`] entries (the current key, plus a rotated-out key in its grace
//! period).

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;

use super::{
    ObjectOutcome, Report, compile_limits, object_ref, patterns, precedence,
    secrets::{Lookup, SecretStore, clean_secret_value},
    views::Views,
};
use crate::{
    config::{CompiledBudget, CompiledKey, GatewayConfig},
    diagnostics::{Kind, ObjectRef, reasons},
    parts::sha256_hex,
    v1alpha1::{
        API_KEY_SECRET_KEY, ApiKey, PREVIOUS_KEY_EXPIRES_SECRET_KEY, PREVIOUS_KEY_SHA256_SECRET_KEY,
    },
};

/// Shortest key accepted. Generated keys are far longer; this stops `test`/`changeme`
/// keys written by hand in standalone manifests.
pub const MIN_KEY_LEN: usize = 20;

/// Name of the Secret holding an ApiKey's plaintext key.
pub fn secret_name(key: &ApiKey) -> String {
    key.spec
        .secret_name
        .clone()
        .unwrap_or_else(|| format!("{}-key", key.metadata.name.as_deref().unwrap_or_default()))
}

/// Why `key`'s Secret name could never be created (an RFC 1123 subdomain: at most 253
/// lowercase alphanumerics, `-` and `.`, alphanumeric at both ends), if it could not. The
/// default `<metadata.name>-key` breaks that for names over 249 characters.
pub fn secret_name_problem(key: &ApiKey) -> Option<String> {
    let name = secret_name(key);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    (!valid).then(|| {
        let origin = if key.spec.secret_name.is_some() {
            "spec.secretName"
        } else {
            "the default Secret name `<metadata.name>-key`"
        };
        format!(
            "{origin} ({} characters) is not a valid Secret name: at most 253 lowercase letters, digits, '-' or '.', starting and ending with a letter or digit; set a shorter spec.secretName",
            name.len()
        )
    })
}

/// Hex digits of a key id: 96 bits, so that no name can be searched whose id equals
/// another ApiKey's (which would share its limits, budget, usage and key-scoped cache).
pub const KEY_ID_HEX_DIGITS: usize = 24;

/// Key id of the ApiKey `namespace/name`: the first [`KEY_ID_HEX_DIGITS`] hex digits of
/// the SHA-256 of `apikey:<namespace>/<name>`. Stable across rotations, so a key's limits,
/// budget and usage carry over to its new key; never derived from the key itself.
/// `compile` refuses a second ApiKey with the same id.
pub fn key_id(namespace: &str, name: &str) -> String {
    sha256_hex(format!("apikey:{namespace}/{name}").as_bytes())
        .chars()
        .take(KEY_ID_HEX_DIGITS)
        .collect()
}

/// The first characters of a key, safe to display: at most 7 and never more than a quarter
/// of it.
pub fn key_prefix(key: &str) -> String {
    key.chars().take(7.min(key.len() / 4)).collect()
}

pub(super) fn compile_all(
    keys: &[ApiKey],
    secrets: &SecretStore,
    now: Timestamp,
    config: &mut GatewayConfig,
    report: &mut Report,
    objects: &mut BTreeMap<ObjectRef, ObjectOutcome>,
) {
    let mut ordered: Vec<&ApiKey> = keys.iter().collect();
    ordered.sort_by_key(|k| precedence(*k));

    let currencies: BTreeSet<&str> = config
        .routing
        .providers
        .values()
        .map(|p| p.currency.as_str())
        .collect();
    let mut views = Views::new(&config.routing.routes);

    let mut owners: BTreeMap<String, ObjectRef> = BTreeMap::new();
    let mut ids: BTreeMap<String, ObjectRef> = BTreeMap::new();
    let mut compiled = Vec::new();
    for key in ordered {
        let object = object_ref(Kind::ApiKey, key);
        let secret = secret_name(key);
        let mut outcome = ObjectOutcome {
            generation: key.metadata.generation,
            secret_name: Some(secret.clone()),
            ..Default::default()
        };
        if let Some((entries, prefix)) = compile_one(&object, key, &secret, secrets, now, report) {
            // The same key value in two ApiKeys would make attribution ambiguous.
            let clash = entries
                .iter()
                .find_map(|e| owners.get(&e.sha256).map(|o| (e, o)));
            let id_clash = entries.first().and_then(|e| ids.get(&e.id));
            if let Some(other) = id_clash {
                report.error(
                    &object,
                    reasons::KEY_ID_CONFLICT,
                    "metadata.name",
                    format!(
                        "key id {} is already used by {other}; rename this ApiKey",
                        entries[0].id
                    ),
                );
            } else if let Some((entry, other)) = clash {
                let which = if std::ptr::eq(entry, &entries[0]) {
                    "key"
                } else {
                    "previous key"
                };
                report.error(
                    &object,
                    reasons::KEY_CONFLICT,
                    "spec.secretName",
                    format!(
                        "the {which} in Secret {secret} is also used by {other}; generate a new one"
                    ),
                );
            } else {
                let current = &entries[0];
                outcome.served = true;
                outcome.key_id = Some(current.id.clone());
                outcome.key_prefix = Some(prefix.clone());
                outcome.summary = format!(
                    "key {prefix}… (id {}) accepted for owner {}",
                    current.id, key.spec.owner
                );
                for e in &entries {
                    owners.insert(e.sha256.clone(), object.clone());
                }
                ids.insert(current.id.clone(), object.clone());
                compiled.extend(entries);
            }
        }
        if outcome.served {
            let view = views.get(&object.namespace, &key.spec.shared_routes_from);
            for d in &view.diagnostics {
                report.warning(&object, d.reason, &d.field, d.message.clone());
            }
            for (i, m) in key.spec.allowed_models.iter().enumerate() {
                if !patterns::is_glob(m) && !view.serves(m) {
                    report.warning(
                        &object,
                        reasons::UNKNOWN_MODEL,
                        &format!("spec.allowedModels[{i}]"),
                        format!("no RoutePolicy this key can use serves {m:?}"),
                    );
                }
            }
            if let Some(b) = &key.spec.budget
                && !currencies.is_empty()
                && !currencies.contains(b.currency.as_str())
            {
                report.warning(
                    &object,
                    reasons::CURRENCY_MISMATCH,
                    "spec.budget.currency",
                    format!(
                        "no Provider prices in {}; spend through other currencies is not counted",
                        b.currency
                    ),
                );
            }
        }
        objects.insert(object, outcome);
    }
    compiled.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    config.keys.keys = compiled;
}

/// The key's entries (current first) and its display prefix, or `None` if it is not served.
fn compile_one(
    object: &ObjectRef,
    key: &ApiKey,
    secret: &str,
    secrets: &SecretStore,
    now: Timestamp,
    report: &mut Report,
) -> Option<(Vec<CompiledKey>, String)> {
    let spec = &key.spec;
    let before = report.errors_for(object);

    if spec.owner.trim().is_empty() {
        report.error(
            object,
            reasons::INVALID_SPEC,
            "spec.owner",
            "owner must not be empty",
        );
    }
    if let Some(problem) = secret_name_problem(key) {
        report.error(object, reasons::INVALID_SPEC, "spec.secretName", problem);
    }
    for (i, m) in spec.allowed_models.iter().enumerate() {
        // A broken entry is not dropped: an allow-list that loses entries could become
        // empty, and empty means "every model".
        if let Err(e) = patterns::validate(m) {
            report.error(
                object,
                reasons::INVALID_MODEL_PATTERN,
                &format!("spec.allowedModels[{i}]"),
                e,
            );
        }
    }
    let limits = spec
        .limits
        .as_ref()
        .and_then(|l| compile_limits(object, "spec.limits", l, report));
    let budget = spec.budget.as_ref().and_then(|b| {
        if !b.amount.is_finite() || b.amount <= 0.0 {
            report.error(
                object,
                reasons::INVALID_SPEC,
                "spec.budget.amount",
                "budget amount must be a positive number",
            );
            return None;
        }
        if b.currency.len() != 3 || !b.currency.bytes().all(|c| c.is_ascii_uppercase()) {
            report.error(
                object,
                reasons::INVALID_SPEC,
                "spec.budget.currency",
                format!("{:?} is not an ISO 4217 code such as USD", b.currency),
            );
            return None;
        }
        Some(CompiledBudget {
            amount: b.amount,
            period: b.period,
            currency: b.currency.clone(),
        })
    });
    let guardrails =
        super::guardrails::compile(object, "spec.guardrails", &spec.guardrails, report);
    let expires_at = spec.expires_at.as_ref().map(|t| t.0);
    if spec.disabled {
        report.error(
            object,
            reasons::DISABLED,
            "spec.disabled",
            "the key is disabled",
        );
    } else if let Some(t) = expires_at
        && t <= now
    {
        report.error(
            object,
            reasons::EXPIRED,
            "spec.expiresAt",
            format!("the key expired at {t}"),
        );
    }

    let value = match secrets.get(&object.namespace, secret, API_KEY_SECRET_KEY) {
        Lookup::NoSecret | Lookup::NotPermitted => {
            report.ref_error(
                object,
                reasons::SECRET_NOT_FOUND,
                "spec.secretName",
                format!("Secret {}/{secret} not found", object.namespace),
            );
            None
        }
        Lookup::NoKey => {
            report.ref_error(
                object,
                reasons::SECRET_KEY_NOT_FOUND,
                "spec.secretName",
                format!(
                    "Secret {}/{secret} has no key {API_KEY_SECRET_KEY:?}",
                    object.namespace
                ),
            );
            None
        }
        Lookup::Found(raw) => match clean_secret_value(raw) {
            Ok(v) if v.len() < MIN_KEY_LEN => {
                report.error(
                    object,
                    reasons::INVALID_KEY,
                    "spec.secretName",
                    format!("the key in Secret {secret} is shorter than {MIN_KEY_LEN} characters"),
                );
                None
            }
            Ok(v) if crate::key_format::shape(&v) == crate::key_format::Shape::BadChecksum => {
                report.error(
                    object,
                    reasons::INVALID_KEY,
                    "spec.secretName",
                    format!(
                        "the key in Secret {secret} looks generated but its checksum does not match; it was edited or truncated"
                    ),
                );
                None
            }
            Ok(v) => Some(v),
            Err(why) => {
                report.error(
                    object,
                    reasons::INVALID_KEY,
                    "spec.secretName",
                    format!("the key in Secret {secret}: {why}"),
                );
                None
            }
        },
    };

    if report.errors_for(object) > before {
        return None;
    }
    let value = value?;
    let sha256 = sha256_hex(value.as_bytes());
    let id = key_id(&object.namespace, &object.name);
    let current = CompiledKey {
        sha256,
        id: id.clone(),
        api_key: format!("{}/{}", object.namespace, object.name),
        owner: spec.owner.clone(),
        team: spec.team.clone(),
        allowed_models: spec.allowed_models.clone(),
        shared_routes_from: spec
            .shared_routes_from
            .iter()
            .filter(|ns| **ns != object.namespace)
            .cloned()
            .collect(),
        limits,
        budget,
        expires_at: expires_at.map(|t| t.as_second()),
        guardrails: guardrails.unwrap_or_default(),
    };
    let mut entries = vec![current];

    // A rotated-out key keeps working, with the same identity and policy, until its grace
    // period (or the key's own expiry) ends. Only the key Secret records it (the operator
    // writes it there with the new key); the user-writable status is never trusted.
    if let Some((hash, until)) = previous_key(object, key, secret, secrets, now, report)
        && hash != entries[0].sha256
    {
        let until = match expires_at {
            Some(e) => e.min(until),
            None => until,
        };
        let mut old = entries[0].clone();
        old.sha256 = hash;
        old.expires_at = Some(until.as_second());
        entries.push(old);
    }
    Some((entries, key_prefix(&value)))
}

/// The previous key's hash and the end of its grace period, from the key Secret, while
/// it is still valid. A grace period ending further ahead than `spec.rotation.gracePeriod`
/// from now is refused: no hand-written end date outlives the policy.
fn previous_key(
    object: &ObjectRef,
    key: &ApiKey,
    secret: &str,
    secrets: &SecretStore,
    now: Timestamp,
    report: &mut Report,
) -> Option<(String, Timestamp)> {
    let field = "spec.secretName";
    let text = |k| match secrets.get(&object.namespace, secret, k) {
        Lookup::Found(v) => std::str::from_utf8(v).ok().map(|t| t.trim().to_owned()),
        _ => None,
    };
    let hash = text(PREVIOUS_KEY_SHA256_SECRET_KEY)?;
    let valid_hash = hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !valid_hash {
        report.warning(
            object,
            reasons::INVALID_KEY,
            field,
            format!("{PREVIOUS_KEY_SHA256_SECRET_KEY} in Secret {secret} is not a SHA-256 hex digest; the previous key is not accepted"),
        );
        return None;
    }
    let Some(until) =
        text(PREVIOUS_KEY_EXPIRES_SECRET_KEY).and_then(|t| t.parse::<Timestamp>().ok())
    else {
        report.warning(
            object,
            reasons::INVALID_KEY,
            field,
            format!("{PREVIOUS_KEY_EXPIRES_SECRET_KEY} in Secret {secret} is missing or not an RFC 3339 time; the previous key is not accepted"),
        );
        return None;
    };
    if until <= now {
        return None;
    }
    let grace = key
        .spec
        .rotation
        .as_ref()
        .and_then(|r| crate::duration::parse(&r.grace_period).ok())
        .unwrap_or_default();
    if until > now + grace {
        report.warning(
            object,
            reasons::INVALID_KEY,
            field,
            format!("the previous key's grace period in Secret {secret} ends after spec.rotation.gracePeriod from now; the previous key is not accepted"),
        );
        return None;
    }
    Some((hash, until))
}
