//! The CustomResourceDefinition manifests generated from the types.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::v1alpha1::{ApiKey, Provider, RoutePolicy};

/// Every CRD with the file name it is committed under in `crds/`.
pub fn all() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("tollgate.dev_providers.yaml", Provider::crd()),
        ("tollgate.dev_routepolicies.yaml", RoutePolicy::crd()),
        ("tollgate.dev_apikeys.yaml", ApiKey::crd()),
    ]
}

/// The YAML document committed for a CRD.
pub fn to_yaml(crd: &CustomResourceDefinition) -> String {
    let body = serde_yaml::to_string(crd).expect("a CRD always serialises to YAML");
    format!(
        "# Generated from crds/src (crate tollgate-api) by `cargo run -p tollgate-api --bin tollgate-crdgen`.\n\
         # Do not edit: change the Rust types and regenerate.\n{body}"
    )
}
