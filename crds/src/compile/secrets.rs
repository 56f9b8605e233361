//! The Secrets `compile` may read, indexed by namespace and name.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;

/// Secret data by `(namespace, name)`, with `stringData` merged over `data` as the API
/// server does. Never printed.
#[derive(Clone, Default)]
pub struct SecretStore {
    secrets: BTreeMap<(String, String), BTreeMap<String, Vec<u8>>>,
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
            store.secrets.insert((namespace, name), data);
        }
        store
    }

    /// Adds or replaces one Secret's data.
    pub fn insert(&mut self, namespace: &str, name: &str, data: BTreeMap<String, Vec<u8>>) {
        self.secrets
            .insert((namespace.to_owned(), name.to_owned()), data);
    }

    /// Looks up `key` of Secret `namespace/name`.
    pub fn get(&self, namespace: &str, name: &str, key: &str) -> Lookup<'_> {
        match self.secrets.get(&(namespace.to_owned(), name.to_owned())) {
            None => Lookup::NoSecret,
            Some(data) => data.get(key).map_or(Lookup::NoKey, |v| Lookup::Found(v)),
        }
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
