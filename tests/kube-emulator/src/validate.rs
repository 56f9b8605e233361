//! Request-body normalisation and the subset of API-server validation the
//! emulator enforces.
//!
//! Validation is deliberately limited to rules an operator can break by
//! accident and that a real cluster enforces for every object: name syntax,
//! label syntax, ConfigMap/Secret key syntax, base64 payloads and the 1 MiB
//! ConfigMap/Secret size limit. There is no OpenAPI schema or CEL validation.

use crate::error::ApiError;
use crate::registry::ResourceDef;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value};

/// ConfigMap and Secret payloads are limited to 1 MiB.
const MAX_DATA_BYTES: usize = 1024 * 1024;

/// Checks a request body against the URL it was sent to and fills in
/// `apiVersion`/`kind`. Server-side apply bodies must carry both.
pub(crate) fn check_body(
    def: &ResourceDef,
    body: &mut Value,
    url_namespace: Option<&str>,
    url_name: Option<&str>,
    require_type_meta: bool,
) -> Result<(), ApiError> {
    let Some(obj) = body.as_object_mut() else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    let want_av = def.api_version();
    for (field, want) in [
        ("apiVersion", want_av.as_str()),
        ("kind", def.kind.as_str()),
    ] {
        match obj.get(field).and_then(Value::as_str) {
            Some(got) if got != want => {
                return Err(ApiError::bad_request(format!(
                    "{field} {got:?} in the request body does not match the request URL ({want:?})"
                )));
            }
            Some(_) => {}
            None if require_type_meta => {
                return Err(ApiError::bad_request(format!(
                    "Object '{field}' is missing in the apply request body"
                )));
            }
            None => {
                obj.insert(field.into(), Value::String(want.to_string()));
            }
        }
    }
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        return Err(ApiError::bad_request("metadata must be an object"));
    }
    if let (Some(want), Some(got)) = (url_namespace, meta["namespace"].as_str())
        && def.namespaced
        && want != got
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    if let (Some(want), Some(got)) = (url_name, meta["name"].as_str())
        && want != got
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({got}) does not match the name on the URL ({want})"
        )));
    }
    Ok(())
}

/// Folds a Secret's write-only `stringData` into base64 `data`, as the API
/// server does; `stringData` wins over `data` for the same key.
pub(crate) fn fold_string_data(def: &ResourceDef, obj: &mut Value) {
    if !def.is_core("secrets") {
        return;
    }
    let Some(map) = obj.as_object_mut() else {
        return;
    };
    let Some(string_data) = map.remove("stringData") else {
        return;
    };
    let Value::Object(string_data) = string_data else {
        return;
    };
    let data = map
        .entry("data")
        .or_insert_with(|| Value::Object(Map::new()));
    if !data.is_object() {
        *data = Value::Object(Map::new());
    }
    if let Value::Object(data) = data {
        for (k, v) in string_data {
            let text = v.as_str().map_or_else(|| v.to_string(), str::to_string);
            data.insert(k, Value::String(BASE64.encode(text)));
        }
    }
}

/// Validates a complete object about to be stored.
pub(crate) fn validate_object(def: &ResourceDef, obj: &Value) -> Result<(), ApiError> {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let mut causes = Vec::new();
    let name_ok = if def.is_core("namespaces") {
        is_dns_label(name)
    } else {
        is_dns_subdomain(name)
    };
    if !name_ok {
        causes.push(format!(
            "metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 {} must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
            if def.is_core("namespaces") { "label" } else { "subdomain" }
        ));
    }
    if let Some(labels) = obj["metadata"].get("labels").filter(|l| !l.is_null()) {
        match labels.as_object() {
            None => causes.push("metadata.labels: Invalid value: must be a map of strings".into()),
            Some(labels) => {
                for (k, v) in labels {
                    if !is_qualified_name(k) {
                        causes.push(format!("metadata.labels: Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (at most 63 characters)"));
                    }
                    match v.as_str() {
                        Some(v) if is_label_value(v) => {}
                        _ => causes.push(format!("metadata.labels: Invalid value: {v}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (at most 63 characters)")),
                    }
                }
            }
        }
    }
    if let Some(annotations) = obj["metadata"].get("annotations").filter(|a| !a.is_null())
        && !annotations
            .as_object()
            .is_some_and(|m| m.values().all(Value::is_string))
    {
        causes.push("metadata.annotations: Invalid value: must be a map of strings".into());
    }
    if def.is_core("configmaps") || def.is_core("secrets") {
        check_payload(def, obj, &mut causes)?;
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(&def.kind, name, &causes))
    }
}

/// ConfigMap `data`/`binaryData` and Secret `data`: key syntax, value types,
/// base64 and total size.
fn check_payload(def: &ResourceDef, obj: &Value, causes: &mut Vec<String>) -> Result<(), ApiError> {
    let mut total = 0usize;
    for (field, base64) in [("data", def.is_core("secrets")), ("binaryData", true)] {
        if field == "binaryData" && def.is_core("secrets") {
            continue;
        }
        let Some(map) = obj.get(field).filter(|v| !v.is_null()) else {
            continue;
        };
        let Some(map) = map.as_object() else {
            return Err(ApiError::bad_request(format!(
                "{field} must be a map of strings"
            )));
        };
        for (key, value) in map {
            if !is_config_key(key) {
                causes.push(format!("{field}[{key}]: Invalid value: {key:?}: a valid config key must consist of alphanumeric characters, '-', '_' or '.'"));
            }
            let Some(text) = value.as_str() else {
                return Err(ApiError::bad_request(format!(
                    "{field}[{key}] must be a string"
                )));
            };
            total += if base64 {
                BASE64
                    .decode(text)
                    .map_err(|e| {
                        ApiError::bad_request(format!("{field}[{key}]: illegal base64 data: {e}"))
                    })?
                    .len()
            } else {
                text.len()
            };
        }
    }
    if total > MAX_DATA_BYTES {
        causes.push(format!(
            "data: Too long: must have at most {MAX_DATA_BYTES} bytes"
        ));
    }
    Ok(())
}

fn is_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// RFC 1123 label: at most 63 of `[a-z0-9-]`, alphanumeric at both ends.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(is_alnum)
        && s.ends_with(is_alnum)
        && s.chars().all(|c| is_alnum(c) || c == '-')
}

/// RFC 1123 subdomain: at most 253 of `[a-z0-9.-]`, alphanumeric at both ends.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.starts_with(is_alnum)
        && s.ends_with(is_alnum)
        && s.chars().all(|c| is_alnum(c) || c == '-' || c == '.')
}

/// `[prefix/]name` where name is a label value that is not empty.
fn is_qualified_name(s: &str) -> bool {
    let name = match s.rsplit_once('/') {
        Some((prefix, name)) => {
            if !is_dns_subdomain(prefix) {
                return false;
            }
            name
        }
        None => s,
    };
    !name.is_empty() && is_label_value(name)
}

/// Empty, or at most 63 of `[A-Za-z0-9-_.]` with alphanumeric ends.
fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
}

/// ConfigMap/Secret keys: `[-._a-zA-Z0-9]+`, at most 253, not `.`, not
/// starting with `..`.
fn is_config_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && !s.starts_with("..")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_and_labels() {
        assert!(is_dns_subdomain("a.b-c1"));
        assert!(!is_dns_subdomain("Upper"));
        assert!(!is_dns_subdomain("-a"));
        assert!(!is_dns_label("a.b"));
        assert!(is_qualified_name("tollgate.dev/shard"));
        assert!(!is_qualified_name("a/b/c"));
        assert!(is_label_value(""));
        assert!(!is_label_value(&"a".repeat(64)));
        assert!(!is_label_value("a:b"));
    }

    #[test]
    fn secret_string_data_is_folded() {
        let def = ResourceDef::namespaced("v1", "secrets", "Secret");
        let mut s = json!({"data": {"a": "eA=="}, "stringData": {"b": "hi", "a": "y"}});
        fold_string_data(&def, &mut s);
        assert_eq!(s, json!({"data": {"a": "eQ==", "b": "aGk="}}));
    }

    #[test]
    fn payload_rules() {
        let def = ResourceDef::namespaced("v1", "secrets", "Secret");
        let ok = json!({"metadata": {"name": "s"}, "data": {"k.txt": "aGk="}});
        assert!(validate_object(&def, &ok).is_ok());
        let bad64 = json!({"metadata": {"name": "s"}, "data": {"k": "%%%"}});
        assert_eq!(validate_object(&def, &bad64).unwrap_err().code, 400);
        let badkey = json!({"metadata": {"name": "s"}, "data": {"a/b": ""}});
        assert_eq!(validate_object(&def, &badkey).unwrap_err().code, 422);
        let cm = ResourceDef::namespaced("v1", "configmaps", "ConfigMap");
        let big = json!({"metadata": {"name": "c"}, "data": {"k": "x".repeat(MAX_DATA_BYTES + 1)}});
        assert_eq!(validate_object(&cm, &big).unwrap_err().reason, "Invalid");
    }
}
