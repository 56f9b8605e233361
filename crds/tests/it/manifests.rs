//! Loading manifests as users write them for standalone mode and `render`.

use std::path::Path;

use tollgate_api::manifests::{LoadError, Loaded, load_path, load_str};

fn load(text: &str) -> (Loaded, Vec<LoadError>) {
    let mut loaded = Loaded::default();
    let mut errors = Vec::new();
    load_str(Path::new("test.yaml"), text, &mut loaded, &mut errors);
    (loaded, errors)
}

#[test]
fn multi_document_files_yield_every_kind_and_skip_foreign_ones() {
    let (loaded, errors) = load(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {name: m}\nspec: {type: mock, models: [{name: a}]}\n\
         ---\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {apiKey: x}\n\
         ---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(loaded.resources.providers.len(), 1);
    assert_eq!(loaded.secrets.len(), 1);
    assert_eq!(loaded.skipped.len(), 1);
    assert_eq!(loaded.skipped[0].1, "Deployment");
}

#[test]
fn every_bad_document_is_reported_with_its_position_and_the_good_ones_still_load() {
    let (loaded, errors) = load(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {name: bad}\nspec: {type: gemini, models: []}\n\
         ---\napiVersion: tollgate.dev/v1alpha1\nkind: Gizmo\nmetadata: {name: g}\n\
         ---\nkind: Provider\n\
         ---\napiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: ok}\nspec: {owner: me}\n",
    );
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(text.len(), 3, "{text:#?}");
    assert!(
        text[0].contains("document 1")
            && text[0].contains("Provider bad")
            && text[0].contains("gemini"),
        "{}",
        text[0]
    );
    assert!(
        text[1].contains("document 2") && text[1].contains("unknown kind \"Gizmo\""),
        "{}",
        text[1]
    );
    assert!(
        text[2].contains("document 3") && text[2].contains("apiVersion and kind are required"),
        "{}",
        text[2]
    );
    assert_eq!(loaded.resources.api_keys.len(), 1);
}

#[test]
fn invalid_yaml_is_reported_once_instead_of_hanging_or_panicking() {
    let (_, errors) = load("apiVersion: [unclosed\n");
    assert_eq!(errors.len(), 1);
}

#[test]
fn a_missing_path_is_an_io_error() {
    let errors = load_path(Path::new("/nonexistent/tollgate")).unwrap_err();
    assert!(matches!(errors[0], LoadError::Io { .. }));
}
