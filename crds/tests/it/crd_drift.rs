//! The CRD YAML committed in `crds/` is exactly what the Rust types generate.

use std::path::Path;

#[test]
fn committed_crd_yaml_matches_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stale = Vec::new();
    for (file, crd) in tollgate_api::crd::all() {
        let want = tollgate_api::crd::to_yaml(&crd);
        let have = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        if have != want {
            stale.push(file);
        }
    }
    assert!(
        stale.is_empty(),
        "{stale:?} differ from the Rust types; regenerate with `cargo run -p tollgate-api --bin tollgate-crdgen` and commit"
    );
}

#[test]
fn every_kind_is_generated_into_its_own_file() {
    let files: Vec<&str> = tollgate_api::crd::all().iter().map(|(f, _)| *f).collect();
    assert_eq!(
        files,
        [
            "tollgate.dev_providers.yaml",
            "tollgate.dev_routepolicies.yaml",
            "tollgate.dev_apikeys.yaml"
        ]
    );
}
