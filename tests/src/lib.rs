//! Shared harness for Tollgate's cross-crate tests: paths, the CRD schemas as committed,
//! and a client-side validator that checks objects the way the API server would (OpenAPI
//! schema with unknown fields rejected, plus the CEL `x-kubernetes-validations` rules).
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::{Map, Value, json};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The committed CRD files (`crds/*.yaml`) parsed to JSON, by kind.
pub fn committed_crds() -> BTreeMap<String, Value> {
    let dir = repo_root().join("crds");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("crds/ is readable") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("CRD file is readable");
        let crd: Value =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let kind = crd["spec"]["names"]["kind"]
            .as_str()
            .expect("CRD names a kind")
            .to_owned();
        out.insert(kind, crd);
    }
    out
}

/// Every YAML document in a file (or every `*.yaml` under a directory), with its origin.
pub fn yaml_documents(path: &Path) -> Vec<(String, Value)> {
    let mut files = Vec::new();
    if path.is_dir() {
        let mut stack = vec![path.to_owned()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("readable dir") {
                let p = entry.expect("dir entry").path();
                if p.is_dir() {
                    stack.push(p);
                } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                    files.push(p);
                }
            }
        }
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable file");
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} doc {}: {e}", file.display(), i + 1));
            if !value.is_null() {
                docs.push((format!("{} (document {})", file.display(), i + 1), value));
            }
        }
    }
    docs
}

/// Validates objects against the committed CRDs as the API server would on create.
pub struct CrdValidator {
    kinds: BTreeMap<String, KindValidator>,
    cel: kube_cel::Validator,
}

impl std::fmt::Debug for CrdValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrdValidator")
            .field("kinds", &self.kinds.keys().collect::<Vec<_>>())
            .finish()
    }
}

struct KindValidator {
    schema: jsonschema::Validator,
    cel: kube_cel::CompiledSchema,
    api_version: String,
}

/// RFC 1123 subdomain, as the API server requires of object names.
fn valid_name(name: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(ok_char)
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

impl CrdValidator {
    /// Builds validators from the committed CRDs.
    pub fn from_committed() -> Self {
        let mut kinds = BTreeMap::new();
        for (kind, crd) in committed_crds() {
            let version = &crd["spec"]["versions"][0];
            let schema = &version["schema"]["openAPIV3Schema"];
            let api_version = format!(
                "{}/{}",
                crd["spec"]["group"].as_str().unwrap(),
                version["name"].as_str().unwrap()
            );
            let cel = kube_cel::compile_schema(schema);
            assert!(
                !cel.has_errors(),
                "{kind}: CEL rules do not compile: {:?}",
                cel.compilation_errors()
            );
            let json_schema = to_json_schema(schema);
            let validator = jsonschema::options()
                .with_draft(jsonschema::Draft::Draft4)
                .should_validate_formats(true)
                .build(&json_schema)
                .unwrap_or_else(|e| panic!("{kind}: schema does not build: {e}"));
            kinds.insert(
                kind,
                KindValidator {
                    schema: validator,
                    cel,
                    api_version,
                },
            );
        }
        Self {
            kinds,
            cel: kube_cel::Validator::new(),
        }
    }

    /// Whether `kind` is one of the CRDs.
    pub fn knows(&self, kind: &str) -> bool {
        self.kinds.contains_key(kind)
    }

    /// All problems with `object`, empty when the API server would accept it.
    pub fn validate(&self, object: &Value) -> Vec<String> {
        let kind = object["kind"].as_str().unwrap_or_default();
        let Some(v) = self.kinds.get(kind) else {
            return vec![format!("no CRD for kind {kind:?}")];
        };
        let mut problems = Vec::new();
        if object["apiVersion"].as_str() != Some(v.api_version.as_str()) {
            problems.push(format!("apiVersion must be {}", v.api_version));
        }
        match object["metadata"]["name"].as_str() {
            Some(name) if valid_name(name) => {}
            other => problems.push(format!(
                "metadata.name {other:?} is not a valid RFC 1123 name"
            )),
        }
        // apiVersion, kind and metadata are checked above (the API server owns their
        // schema); the CRD schema covers the rest.
        let mut body = object.clone();
        if let Some(map) = body.as_object_mut() {
            for owned in ["apiVersion", "kind", "metadata"] {
                map.remove(owned);
            }
        }
        for error in v.schema.iter_errors(&body) {
            problems.push(format!("{}: {error}", error.instance_path()));
        }
        if problems.is_empty()
            && let Err(errors) = self.cel.validate_compiled(&v.cel, &body, None)
        {
            for e in errors {
                problems.push(format!("{}: {} (rule {})", e.field_path, e.message, e.rule));
            }
        }
        problems
    }
}

/// Converts a CRD's OpenAPI v3 schema into JSON Schema (draft 4) for validation:
/// `nullable` becomes a `null` type, and objects with `properties` reject unknown fields,
/// as `kubectl apply --validate=strict` does.
pub fn to_json_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let v = match k.as_str() {
                    "properties" => Value::Object(
                        v.as_object()
                            .unwrap()
                            .iter()
                            .map(|(p, s)| (p.clone(), to_json_schema(s)))
                            .collect(),
                    ),
                    "items" | "additionalProperties" if v.is_object() => to_json_schema(v),
                    // Kubernetes-only keywords mean nothing to JSON Schema.
                    k if k.starts_with("x-kubernetes-") => continue,
                    "nullable" => continue,
                    _ => v.clone(),
                };
                out.insert(k.clone(), v);
            }
            if map.get("nullable") == Some(&Value::Bool(true))
                && let Some(t) = map.get("type").cloned()
            {
                out.insert("type".into(), json!([t, "null"]));
            }
            let preserve =
                map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            if map.contains_key("properties")
                && !map.contains_key("additionalProperties")
                && !preserve
            {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// Problems that make a CRD schema non-structural (the API server rejects such CRDs):
/// every node needs a `type` (or `x-kubernetes-int-or-string`/`preserve-unknown-fields`),
/// `properties` and `additionalProperties` exclude each other, and no `$ref`,
/// `definitions`, or logic junctors carrying types.
pub fn structural_problems(schema: &Value, path: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(map) = schema.as_object() else {
        return vec![format!("{path}: not an object")];
    };
    let typed = map.contains_key("type")
        || map.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        || map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if !typed {
        problems.push(format!("{path}: no type"));
    }
    for banned in [
        "$ref",
        "definitions",
        "$defs",
        "$schema",
        "id",
        "patternProperties",
        "dependencies",
        "additionalItems",
    ] {
        if map.contains_key(banned) {
            problems.push(format!(
                "{path}: {banned} is not allowed in a structural schema"
            ));
        }
    }
    if map.contains_key("properties") && map.contains_key("additionalProperties") {
        problems.push(format!(
            "{path}: properties and additionalProperties are mutually exclusive"
        ));
    }
    if let Some(t) = map.get("type")
        && !t.is_string()
    {
        problems.push(format!("{path}: type must be a single string"));
    }
    for junctor in ["anyOf", "oneOf", "allOf", "not"] {
        if let Some(v) = map.get(junctor) {
            for (i, branch) in v.as_array().into_iter().flatten().enumerate() {
                for key in [
                    "type",
                    "default",
                    "nullable",
                    "description",
                    "additionalProperties",
                ] {
                    if branch.get(key).is_some() {
                        problems.push(format!(
                            "{path}.{junctor}[{i}]: {key} is not allowed inside a logical junctor"
                        ));
                    }
                }
            }
        }
    }
    if let Some(props) = map.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            problems.extend(structural_problems(sub, &format!("{path}.{name}")));
        }
    }
    if let Some(items) = map.get("items") {
        problems.extend(structural_problems(items, &format!("{path}[]")));
    }
    if let Some(ap) = map.get("additionalProperties").filter(|v| v.is_object()) {
        problems.extend(structural_problems(ap, &format!("{path}{{}}")));
    }
    problems
}

/// The Python interpreter of the test tools' virtualenv: `$TOLLGATE_PYTHON`, else
/// `.venv/bin/python` at the repo root (created by `tests/run.sh`).
pub fn tools_python() -> PathBuf {
    std::env::var_os("TOLLGATE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"))
}

/// Runs `kubernetes-validate --strict` on files; returns (success, combined output).
/// Panics with a how-to when the tool is not installed: a missing tool must not pass.
pub fn kubernetes_validate(files: &[PathBuf]) -> (bool, String) {
    let python = tools_python();
    let output = Command::new(&python)
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; run `bash tests/run.sh` (it installs the test tools into .venv)", python.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if text.contains("No module named kubernetes_validate") {
        panic!(
            "kubernetes-validate is not installed for {}; run `bash tests/run.sh`",
            python.display()
        );
    }
    (output.status.success(), text)
}
