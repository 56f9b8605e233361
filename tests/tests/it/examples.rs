//! The shipped examples are valid for the API server and compile without diagnostics; the
//! deliberately broken fixtures are rejected, each for its stated reason.

use tollgate_api::{
    compile::{DEFAULT_NAMESPACE, SecretStore, compile},
    manifests,
};
use tollgate_tests::{CrdValidator, kubernetes_validate, repo_root, yaml_documents};

#[test]
fn every_example_object_is_accepted_by_the_crd_schemas() {
    let validator = CrdValidator::from_committed();
    let docs = yaml_documents(&repo_root().join("examples"));
    let mut checked = 0;
    for (origin, doc) in &docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if validator.knows(kind) {
            let problems = validator.validate(doc);
            assert!(problems.is_empty(), "{origin}: {problems:#?}");
            checked += 1;
        }
    }
    assert!(
        checked >= 8,
        "expected the examples to hold at least 8 Tollgate objects, found {checked}"
    );
}

#[test]
fn examples_compile_without_any_diagnostic() {
    let loaded = manifests::load_path(&repo_root().join("examples")).expect("examples load");
    let secrets = SecretStore::new(&loaded.secrets, DEFAULT_NAMESPACE);
    let out = compile(&loaded.resources, &secrets, jiff::Timestamp::UNIX_EPOCH);
    let rendered: Vec<String> = out.diagnostics.iter().map(ToString::to_string).collect();
    assert!(rendered.is_empty(), "{rendered:#?}");

    let c = &out.config;
    assert_eq!(
        c.routing.providers.len(),
        5,
        "mock, openai and anthropic; two mocks of the tenancy example"
    );
    assert_eq!(
        c.routing.routes.len(),
        8,
        "five, and three of the tenancy example"
    );
    assert_eq!(
        c.keys.keys.len(),
        5,
        "three, and two of the tenancy example"
    );
    assert_eq!(
        c.credentials.providers.len(),
        2,
        "the mock needs no credential"
    );
    let chat = c
        .routing
        .routes
        .iter()
        .find(|r| r.id == "default/chat-default")
        .expect("chat-default route");
    assert_eq!(chat.tiers.len(), 2, "a weighted tier and a fallback tier");
    assert_eq!(chat.guardrails.len(), 6, "the example guardrails compile");
    assert_eq!(
        chat.tiers[0].iter().map(|t| t.weight).collect::<Vec<_>>(),
        [80, 20]
    );
    assert!(
        out.objects.values().all(|o| o.served),
        "every example object is served"
    );
}

#[test]
fn example_secrets_and_other_built_in_objects_pass_kubernetes_validate() {
    let files: Vec<_> = [
        "provider-openai.yaml",
        "provider-anthropic.yaml",
        "standalone/apikey-secrets.yaml",
    ]
    .iter()
    .map(|f| repo_root().join("examples").join(f))
    .collect();
    let (ok, output) = kubernetes_validate(&files);
    assert!(ok, "{output}");
    assert!(
        output.contains("passed for resource secret/openai-credentials"),
        "{output}"
    );
}

/// Each fixture's first line is `# expect: <text>`, text that must appear in one of the
/// problems reported for it.
#[test]
fn every_broken_fixture_is_rejected_for_its_stated_reason() {
    let validator = CrdValidator::from_committed();
    let dir = repo_root().join("tests/fixtures/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 15, "expected at least 15 broken fixtures");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} must start with `# expect: …`", file.display()));
        let docs = yaml_documents(&file);
        assert_eq!(docs.len(), 1, "{}: one object per fixture", file.display());
        let problems = validator.validate(&docs[0].1);
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "{}: expected a problem mentioning {expect:?}, got {problems:#?}",
            file.display()
        );
    }
}

#[test]
fn a_valid_example_broken_by_one_field_fails_validation() {
    let validator = CrdValidator::from_committed();
    let (_, mut doc) =
        yaml_documents(&repo_root().join("examples/routepolicy-demo.yaml")).remove(0);
    assert!(validator.validate(&doc).is_empty());
    doc["spec"]["targets"][0]["weight"] = serde_json::json!(-3);
    let problems = validator.validate(&doc);
    assert!(
        problems.iter().any(|p| p.contains("weight")),
        "{problems:#?}"
    );
}

#[test]
fn edge_case_fixtures_are_accepted_by_the_crd_schemas() {
    let validator = CrdValidator::from_committed();
    let docs = yaml_documents(&repo_root().join("tests/fixtures/valid"));
    assert!(docs.len() >= 6);
    for (origin, doc) in &docs {
        let problems = validator.validate(doc);
        assert!(problems.is_empty(), "{origin}: {problems:#?}");
    }
}
