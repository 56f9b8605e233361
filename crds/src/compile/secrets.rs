//! The Secrets `compile` may read, indexed by namespace and name, with their consent to
//! serve as Provider credentials (label `tollgate.dev/credential`).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;

use crate::v1alpha1::{ALLOWED_PROVIDERS_ANNOTATION, CREDENTIAL_LABEL};

/// Secret data by `(namespace, name)`, with `stringData` merged over `data` as the API
/// server does, and each Secret's consent to serve as a Provider credential. Never printed.
#[derive(Clone, Default)]
pub struct SecretStore {
    secrets: BTreeMap<(String, String), Stored>,
}

#[derive(Clone, Default)]
struct Stored {
    data: BTreeMap<String, Vec<u8>>,
    consent: Consent,
}

/// Which Providers of its namespace a Secret lets use it as their credential.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Consent {
    /// Not labelled `tollgate.dev/credential: "true"`: no Provider.
    #[default]
    None,
    /// Labelled, without a narrowing annotation: every Provider of the namespace.
    AnyProvider,
    /// Labelled, and `tollgate.dev/allowed-providers` names these Providers.
    Providers(BTreeSet<String>),
}

impl Consent {
    /// Reads the label and annotation of a Secret.
    pub fn of(secret: &Secret) -> Self {
        let labelled = secret
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(CREDENTIAL_LABEL))
            .is_some_and(|v| v == "true");
        if !labelled {
            return Self::None;
        }
        let allowed = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ALLOWED_PROVIDERS_ANNOTATION));
        match allowed {
            None => Self::AnyProvider,
            Some(list) => {
                let names: BTreeSet<String> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect();
                if names.contains("*") {
                    Self::AnyProvider
                } else {
                    Self::Providers(names)
                }
            }
        }
    }

    fn allows(&self, provider: &str) -> bool {
        match self {
            Self::None => false,
            Self::AnyProvider => true,
            Self::Providers(names) => names.contains(provider),
        }
    }
}

impl std::fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretStore")
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// The value.
    Found(&'a [u8]),
    /// No such Secret.
    NoSecret,
    /// The Secret exists without that key.
    NoKey,
    /// The Secret exists but does not consent to this use (credential lookups only).
    NotPermitted,
}

impl SecretStore {
    /// Indexes Secrets; those without a name are skipped, those without a namespace are
    /// put in `default_namespace`.
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a Secret>, default_namespace: &str) -> Self {
        let mut store = Self::default();
        for secret in secrets {
            let Some(name) = secret.metadata.name.clone() else {
                continue;
            };
            let namespace = secret
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| default_namespace.to_owned());
            let mut data: BTreeMap<String, Vec<u8>> = secret
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect();
            for (k, v) in secret.string_data.iter().flatten() {
                data.insert(k.clone(), v.as_bytes().to_vec());
            }
            let consent = Consent::of(secret);
            store
                .secrets
                .insert((namespace, name), Stored { data, consent });
        }
        store
    }

    /// Adds or replaces one Secret's data (with no credential consent).
    pub fn insert(&mut self, namespace: &str, name: &str, data: BTreeMap<String, Vec<u8>>) {
        self.secrets.insert(
            (namespace.to_owned(), name.to_owned()),
            Stored {
                data,
                consent: Consent::None,
            },
        );
    }

    /// Looks up `key` of Secret `namespace/name`.
    pub fn get(&self, namespace: &str, name: &str, key: &str) -> Lookup<'_> {
        match self.secrets.get(&(namespace.to_owned(), name.to_owned())) {
            None => Lookup::NoSecret,
            Some(s) => s.data.get(key).map_or(Lookup::NoKey, |v| Lookup::Found(v)),
        }
    }

    /// Looks up `key` of Secret `namespace/name` as the credential of Provider
    /// `namespace/provider`: only if the Secret consents (see [`Consent`]).
    pub fn credential(&self, namespace: &str, name: &str, key: &str, provider: &str) -> Lookup<'_> {
        match self.secrets.get(&(namespace.to_owned(), name.to_owned())) {
            None => Lookup::NoSecret,
            Some(s) if !s.consent.allows(provider) => Lookup::NotPermitted,
            Some(s) => s.data.get(key).map_or(Lookup::NoKey, |v| Lookup::Found(v)),
        }
    }

    /// Whether the Secret `namespace/name` is known, and with which consent.
    pub fn consent(&self, namespace: &str, name: &str) -> Option<&Consent> {
        self.secrets
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|s| &s.consent)
    }
}

/// Checks a credential or key read from a Secret: UTF-8, trimmed of surrounding
/// whitespace (a trailing newline from `echo | base64` is the usual culprit), non-empty,
/// printable ASCII inside. The error never contains the value.
pub fn clean_secret_value(raw: &[u8]) -> Result<String, &'static str> {
    let text = std::str::from_utf8(raw).map_err(|_| "the value is not valid UTF-8")?;
    let text = text.trim();
    if text.is_empty() {
        return Err("the value is empty");
    }
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the value contains whitespace or non-printable characters");
    }
    Ok(text.to_owned())
}
