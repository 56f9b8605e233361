//! `tollgate-operator render`: the offline compile users run before `kubectl apply`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn render(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate-operator"))
        .arg("render")
        .args(args)
        .output()
        .expect("tollgate-operator runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-render-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn rendering_the_examples_succeeds_and_summarises_the_config() {
    let out = render(&["-f", examples().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("5 provider(s), 8 route(s), 5 key entr(ies)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("credentials-") && stdout.contains("Secret"),
        "{stdout}"
    );
    assert_eq!(text(&out.stderr), "", "the examples produce no diagnostics");
}

#[test]
fn a_route_to_a_missing_provider_fails_the_render_with_its_reason_and_keeps_the_rest() {
    let dir = temp_dir("missing-provider");
    std::fs::write(
        dir.join("route.yaml"),
        "apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: chat}\n\
         spec: {models: [gpt-4o], targets: [{provider: nowhere}]}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {name: mock}\n\
         spec: {type: mock, models: [{name: demo}]}\n",
    )
    .unwrap();
    let out = render(&["-f", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("RoutePolicy default/chat"), "{stderr}");
    assert!(stderr.contains("ProviderNotFound"), "{stderr}");
    assert!(
        text(&out.stdout).contains("1 provider(s), 0 route(s)"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn render_output_writes_parts_that_reassemble_into_the_same_config() {
    let dir = temp_dir("output");
    let out = render(&[
        "-f",
        examples().to_str().unwrap(),
        "--output",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        files.insert(
            path.file_name().unwrap().to_str().unwrap().to_owned(),
            std::fs::read(&path).unwrap(),
        );
    }
    // Parts outside the manifest's ConfigMap are named by content.
    let names: Vec<String> = files
        .keys()
        .map(|n| match tollgate_api::parts::kind_of(n) {
            Some(tollgate_api::parts::PartKind::Keys) => n[..8].to_owned(),
            Some(tollgate_api::parts::PartKind::Credentials) => "credentials".to_owned(),
            _ => n.clone(),
        })
        .collect();
    assert_eq!(
        names,
        ["credentials", "keys-000", "manifest.json", "routing.json"]
    );
    let assembled = tollgate_api::parts::assemble(&files).expect("parts reassemble");
    assert_eq!(assembled.config.keys.keys.len(), 5);
    assert_eq!(assembled.config.routing.routes.len(), 8);
    let routing = text(&files["routing.json"]);
    assert!(
        !routing.contains("sk-replace"),
        "credentials stay out of the ConfigMap part"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn diagnostics_as_json_never_contain_secret_values() {
    let dir = temp_dir("secret");
    std::fs::write(
        dir.join("p.yaml"),
        "apiVersion: v1\nkind: Secret\nmetadata: {name: creds, labels: {tollgate.dev/credential: 'true'}}\nstringData: {token: 'not a valid token value'}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {name: vllm}\n\
         spec: {type: openaiCompatible, baseUrl: 'http://vllm:8000/v1', credentials: {secretRef: {name: creds, key: token}}, models: [{name: m}]}\n",
    )
    .unwrap();
    let out = render(&["-f", dir.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    let diagnostic: serde_json::Value =
        serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(diagnostic["reason"], "InvalidSecret");
    assert!(
        !stdout.contains("valid token value") && !text(&out.stderr).contains("valid token value")
    );
}

#[test]
fn malformed_manifests_exit_2_with_the_file_and_document() {
    let dir = temp_dir("malformed");
    std::fs::write(
        dir.join("bad.yaml"),
        "apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: k}\nspec: {owner: [1}\n",
    )
    .unwrap();
    let out = render(&["-f", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("bad.yaml (document 1)") && stderr.contains("nothing compiled"),
        "{stderr}"
    );
}

#[test]
fn help_describes_the_render_options() {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate-operator"))
        .args(["render", "--help"])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    for option in ["--filename", "--output", "--json"] {
        assert!(stdout.contains(option), "{stdout}");
    }
}

#[test]
fn secret_bound_parts_are_written_readable_by_the_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("modes");
    let out = render(&[
        "-f",
        examples().to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_owned();
        let mode = if file.starts_with("credentials-") || file.starts_with("keys-") {
            0o600
        } else {
            continue;
        };
        checked += 1;
        let actual = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(actual, mode, "{file}");
    }
    assert_eq!(checked, 2, "the credentials part and one key shard");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn objects_print_the_configmap_and_secrets_with_secret_data_redacted_unless_asked() {
    let dir = examples();
    let out = render(&[
        "-f",
        dir.to_str().unwrap(),
        "--objects",
        "--namespace",
        "llm",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let names: Vec<(&str, &str)> = docs
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("ConfigMap", "tollgate-gateway-config"),
            ("Secret", "tollgate-gateway-credentials"),
            ("Secret", "tollgate-gateway-keys-00"),
        ]
    );
    assert!(docs.iter().all(|d| d["metadata"]["namespace"] == "llm"));
    let only_value = |doc: &serde_yaml::Value| {
        let data = doc["data"].as_mapping().unwrap();
        assert_eq!(data.len(), 1);
        let (name, value) = data.iter().next().unwrap();
        assert!(name.as_str().unwrap().starts_with("credentials-"));
        value.as_str().unwrap().to_owned()
    };
    let credentials = only_value(&docs[1]);
    assert!(credentials.starts_with("<redacted"), "{credentials}");

    let shown = render(&["-f", dir.to_str().unwrap(), "--objects", "--show-secrets"]);
    let yaml = text(&shown.stdout);
    assert!(!yaml.contains("<redacted"));
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let encoded = only_value(&docs[1]);
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    assert!(String::from_utf8(decoded).unwrap().contains("credentials"));
}
