//! The committed CRDs are valid apiextensions.k8s.io/v1 objects with structural schemas,
//! documented fields, and the names, columns and subresources `kubectl` users rely on.

use serde_json::{Value, json};
use tollgate_tests::{committed_crds, kubernetes_validate, repo_root, structural_problems};

#[test]
fn committed_crds_pass_kubernetes_validate_strictly() {
    let files: Vec<_> = ["providers", "routepolicies", "apikeys"]
        .iter()
        .map(|p| repo_root().join(format!("crds/tollgate.dev_{p}.yaml")))
        .collect();
    let (ok, output) = kubernetes_validate(&files);
    assert!(ok, "{output}");
    assert_eq!(
        output
            .matches("passed for resource customresourcedefinition")
            .count(),
        3,
        "{output}"
    );
}

#[test]
fn kubernetes_validate_rejects_a_broken_crd() {
    let mut crd = committed_crds().remove("ApiKey").unwrap();
    crd["spec"]["scope"] = json!(42);
    crd["spec"]["versions"][0]["served"] = json!("sometimes");
    let path =
        std::env::temp_dir().join(format!("tollgate-broken-crd-{}.yaml", std::process::id()));
    std::fs::write(&path, serde_yaml::to_string(&crd).unwrap()).unwrap();
    let (ok, output) = kubernetes_validate(std::slice::from_ref(&path));
    let _ = std::fs::remove_file(&path);
    assert!(!ok, "a CRD with a numeric scope must be rejected: {output}");
}

#[test]
fn every_crd_schema_is_structural() {
    for (kind, crd) in committed_crds() {
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let problems = structural_problems(schema, kind.as_str());
        assert!(problems.is_empty(), "{problems:#?}");
    }
}

#[test]
fn the_structural_check_catches_untyped_and_ref_nodes() {
    let schema = json!({
        "type": "object",
        "properties": {
            "a": { "description": "no type" },
            "b": { "$ref": "#/definitions/x", "type": "object" },
            "c": { "type": "object", "properties": {}, "additionalProperties": { "type": "string" } },
            "d": { "type": "string", "anyOf": [{ "type": "string" }] }
        }
    });
    let problems = structural_problems(&schema, "root");
    assert_eq!(problems.len(), 4, "{problems:#?}");
}

fn undocumented(schema: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            let p = format!("{path}.{name}");
            if p != ".metadata" && p != ".apiVersion" && p != ".kind" {
                let described = sub
                    .get("description")
                    .and_then(Value::as_str)
                    .is_some_and(|d| !d.trim().is_empty());
                if !described {
                    out.push(p.clone());
                }
            }
            undocumented(sub, &p, out);
        }
    }
    if let Some(items) = schema.get("items") {
        undocumented(items, &format!("{path}[]"), out);
    }
}

#[test]
fn every_field_has_a_description_for_kubectl_explain() {
    for (kind, crd) in committed_crds() {
        let mut missing = Vec::new();
        undocumented(
            &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"],
            "",
            &mut missing,
        );
        assert!(
            missing.is_empty(),
            "{kind}: fields without a description: {missing:#?}"
        );
    }
}

#[test]
fn crds_have_short_names_the_tollgate_category_status_and_informative_columns() {
    let crds = committed_crds();
    for (kind, short) in [
        ("Provider", "tgp"),
        ("RoutePolicy", "tgr"),
        ("ApiKey", "tgk"),
    ] {
        let crd = &crds[kind];
        assert_eq!(crd["spec"]["scope"], "Namespaced", "{kind}");
        assert_eq!(crd["spec"]["names"]["shortNames"], json!([short]), "{kind}");
        assert_eq!(
            crd["spec"]["names"]["categories"],
            json!(["tollgate"]),
            "{kind}"
        );
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert_eq!(
            version["subresources"]["status"],
            json!({}),
            "{kind} has a status subresource"
        );
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert!(
            columns.contains(&"Ready") && columns.contains(&"Age"),
            "{kind}: {columns:?}"
        );
        let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
        assert!(
            status["conditions"].is_object() && status["observedGeneration"].is_object(),
            "{kind}"
        );
        assert_eq!(status["conditions"]["x-kubernetes-list-type"], "map");
    }
    let key_columns = crds["ApiKey"]["spec"]["versions"][0]["additionalPrinterColumns"].to_string();
    for column in ["Owner", "RPM", "Spend", "Budget"] {
        assert!(
            key_columns.contains(column),
            "ApiKey lacks a {column} column"
        );
    }
}
