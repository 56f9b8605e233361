//! Reading Tollgate and Secret manifests from YAML files, as users `kubectl apply` them.
//! Used by the gateway's standalone mode, `tollgate-operator render` and the tests.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;

use crate::{
    compile::Resources,
    v1alpha1::{API_VERSION, ApiKey, Provider, RoutePolicy},
};

/// A problem with one document.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A document is not valid YAML or does not fit its kind's schema.
    #[error("{path} (document {doc}): {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based document number within the file.
        doc: usize,
        /// What is wrong.
        message: String,
    },
}

/// The objects found, plus any Secrets.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// Tollgate objects.
    pub resources: Resources,
    /// Secrets (credentials and client keys).
    pub secrets: Vec<Secret>,
    /// Documents of other kinds, skipped: `(path, kind)`.
    pub skipped: Vec<(PathBuf, String)>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

/// Loads every `*.yaml`/`*.yml` file under `path` (a file or a directory, recursively, in
/// name order). Every document is read; all problems are returned together.
pub fn load_path(path: &Path) -> Result<Loaded, Vec<LoadError>> {
    let mut files = Vec::new();
    if let Err(e) = collect(path, &mut files) {
        return Err(vec![e]);
    }
    let mut loaded = Loaded::default();
    let mut errors = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => load_str(&file, &text, &mut loaded, &mut errors),
            Err(source) => errors.push(LoadError::Io { path: file, source }),
        }
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(errors)
    }
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_owned(),
        source,
    };
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for entry in entries {
            let name = entry
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            // Kubelet's `..data` links and editor droppings.
            if name.starts_with('.') {
                continue;
            }
            if entry.is_dir()
                || matches!(
                    entry.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml")
                )
            {
                collect(&entry, out)?;
            }
        }
        Ok(())
    } else {
        std::fs::metadata(path).map_err(io)?;
        out.push(path.to_owned());
        Ok(())
    }
}

/// Parses the documents of one YAML text into `loaded`, appending problems to `errors`.
pub fn load_str(path: &Path, text: &str, loaded: &mut Loaded, errors: &mut Vec<LoadError>) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let invalid = |message: String| LoadError::Invalid {
            path: path.to_owned(),
            doc: i + 1,
            message,
        };
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            // A syntax error ends the file: the parser cannot resynchronise, and the
            // document iterator would yield the same error forever.
            Err(e) => {
                errors.push(invalid(e.to_string()));
                break;
            }
        };
        let meta: TypeMeta = match serde_yaml::from_value(value.clone()) {
            Ok(m) => m,
            Err(e) => {
                errors.push(invalid(e.to_string()));
                continue;
            }
        };
        let name = name_of(&value);
        let result = match (meta.api_version.as_str(), meta.kind.as_str()) {
            (API_VERSION, "Provider") => {
                parse::<Provider>(value).map(|o| loaded.resources.providers.push(o))
            }
            (API_VERSION, "RoutePolicy") => {
                parse::<RoutePolicy>(value).map(|o| loaded.resources.route_policies.push(o))
            }
            (API_VERSION, "ApiKey") => {
                parse::<ApiKey>(value).map(|o| loaded.resources.api_keys.push(o))
            }
            (v, k) if v.starts_with("tollgate.dev/") => Err(format!(
                "unknown kind {k:?} of {v}; expected Provider, RoutePolicy or ApiKey of {API_VERSION}"
            )),
            ("v1", "Secret") => parse::<Secret>(value).map(|o| loaded.secrets.push(o)),
            ("", _) | (_, "") => Err("apiVersion and kind are required".to_owned()),
            (_, k) => {
                loaded.skipped.push((path.to_owned(), k.to_owned()));
                Ok(())
            }
        };
        if let Err(message) = result {
            errors.push(invalid(format!("{} {name}: {message}", meta.kind)));
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(value: serde_yaml::Value) -> Result<T, String> {
    serde_yaml::from_value(value).map_err(|e| e.to_string())
}

fn name_of(value: &serde_yaml::Value) -> String {
    value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .map_or_else(|| "(unnamed)".to_owned(), str::to_owned)
}
