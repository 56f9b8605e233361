//! The Dockerfile, checked as far as a machine without a Docker engine allows: its
//! structure (named targets, non-root distroless runtime, OCI labels, no HEALTHCHECK, no
//! secrets in the context) and that its build commands name packages and binaries that
//! exist. The commands themselves were run outside Docker (see docs/install.md).

use std::{collections::BTreeSet, process::Command};

use serde_json::Value;
use tollgate_tests::repo_root;

/// One build stage: its base, name and instructions (keyword, arguments).
#[derive(Debug)]
struct Stage {
    from: String,
    name: String,
    instructions: Vec<(String, String)>,
}

fn stages() -> Vec<Stage> {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    // Join continuation lines, drop comments.
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || trimmed.is_empty() && current.is_empty() {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            logical.push(std::mem::take(&mut current));
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical.into_iter().filter(|l| !l.is_empty()) {
        let (keyword, args) = line.split_once(' ').unwrap_or((&line, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            let parts: Vec<&str> = args.split_whitespace().collect();
            let name = match parts.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => name.to_string(),
                _ => String::new(),
            };
            stages.push(Stage {
                from: parts[0].to_owned(),
                name,
                instructions: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push((keyword, args.to_owned()));
        }
    }
    stages
}

fn stage<'a>(stages: &'a [Stage], name: &str) -> &'a Stage {
    stages
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no stage {name}"))
}

/// Instructions of a stage including those of the stages it is built FROM.
fn inherited<'a>(stages: &'a [Stage], name: &str) -> Vec<&'a (String, String)> {
    let s = stage(stages, name);
    let mut out = match stages.iter().find(|p| p.name == s.from) {
        Some(parent) => inherited(stages, &parent.name),
        None => Vec::new(),
    };
    out.extend(s.instructions.iter());
    out
}

fn base_image<'a>(stages: &'a [Stage], name: &str) -> &'a str {
    let s = stage(stages, name);
    match stages.iter().find(|p| p.name == s.from) {
        Some(parent) => base_image(stages, &parent.name),
        None => &s.from,
    }
}

#[test]
fn targets_gateway_and_operator_run_distroless_as_non_root() {
    let stages = stages();
    for target in ["gateway", "operator"] {
        assert!(
            base_image(&stages, target).starts_with("gcr.io/distroless/cc-debian12:nonroot"),
            "{target}: {}",
            base_image(&stages, target)
        );
        let all = inherited(&stages, target);
        let user = all
            .iter()
            .rev()
            .find(|(k, _)| k == "USER")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let uid: u32 = user.split(':').next().unwrap().parse().unwrap_or(0);
        assert!(uid >= 1000, "{target} runs as {user:?}, not a non-root uid");
        let entry = all.iter().find(|(k, _)| k == "ENTRYPOINT").unwrap();
        assert!(entry.1.contains(&format!("tollgate-{target}")));
        // Only the binary comes in, from the build stage.
        for (k, v) in &stage(&stages, target).instructions {
            if k == "COPY" {
                assert!(v.starts_with("--from=builder "), "{target}: COPY {v}");
                assert!(
                    v.contains(&format!("target/release/tollgate-{target}")),
                    "{target}: COPY {v}"
                );
            }
            assert_ne!(k, "ADD", "{target}: ADD {v}");
            assert_ne!(k, "HEALTHCHECK", "probes belong to Kubernetes");
        }
        let labels: String = all
            .iter()
            .filter(|(k, _)| k == "LABEL")
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        for label in [
            "org.opencontainers.image.source",
            "org.opencontainers.image.licenses",
            "org.opencontainers.image.version",
            "org.opencontainers.image.title",
            "org.opencontainers.image.description",
        ] {
            assert!(labels.contains(label), "{target} lacks {label}");
        }
    }
    // No HEALTHCHECK anywhere.
    assert!(
        !stages
            .iter()
            .flat_map(|s| &s.instructions)
            .any(|(k, _)| k == "HEALTHCHECK")
    );
}

#[test]
fn dependencies_build_in_their_own_layer_before_the_sources_arrive() {
    let stages = stages();
    let builder = stage(&stages, "builder");
    let steps: Vec<String> = builder
        .instructions
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let cook = steps
        .iter()
        .position(|s| s.contains("cargo chef cook"))
        .expect("cargo chef cook");
    let sources = steps
        .iter()
        .position(|s| s == "COPY . .")
        .expect("COPY . .");
    let build = steps
        .iter()
        .position(|s| s.contains("cargo build --release"))
        .expect("cargo build");
    assert!(cook < sources && sources < build, "{steps:?}");
    // Only the recipe (Cargo manifests) comes in before cooking.
    assert!(
        steps[..cook]
            .iter()
            .all(|s| !s.starts_with("COPY") || s.contains("recipe.json"))
    );
    for s in &steps {
        if s.contains("cargo") && !s.contains("install") {
            assert!(s.contains("--locked") || s.contains("prepare"), "{s}");
        }
    }
}

#[test]
fn build_commands_name_packages_and_binaries_that_exist() {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(out.status.success());
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages: BTreeSet<String> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    let bins: BTreeSet<String> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .filter(|t| t["kind"].as_array().unwrap().contains(&Value::from("bin")))
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    let rust_version = meta["packages"][0]["rust_version"]
        .as_str()
        .unwrap_or("1.0")
        .to_owned();
    let stages = stages();
    let mut named = 0;
    for (k, v) in stages.iter().flat_map(|s| &s.instructions) {
        if k != "RUN" || !v.contains("cargo") {
            continue;
        }
        let words: Vec<&str> = v.split_whitespace().collect();
        for pair in words.windows(2) {
            match pair[0] {
                "-p" => {
                    assert!(packages.contains(pair[1]), "{v}: no package {}", pair[1]);
                    named += 1;
                }
                "--bin" => assert!(bins.contains(pair[1]), "{v}: no binary {}", pair[1]),
                _ => {}
            }
        }
    }
    assert!(named >= 4, "the build names its packages");
    // The toolchain is at least the workspace's rust-version.
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let image_version = text
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION");
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap()).collect() };
    assert!(
        parse(image_version) >= parse(&rust_version),
        "{image_version} < {rust_version}"
    );
}

#[test]
fn no_secrets_reach_the_build_context() {
    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
    let patterns: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for needed in [".git", "target", ".venv", "**/*.pem", "**/*.key", "**/.env"] {
        assert!(patterns.contains(needed), ".dockerignore lacks {needed}");
    }
    for (k, v) in stages().iter().flat_map(|s| &s.instructions) {
        if k == "COPY" || k == "ADD" {
            for secretish in [".env", ".pem", ".key", "id_rsa", ".kube", "credentials"] {
                assert!(!v.contains(secretish), "{k} {v}");
            }
        }
        assert!(
            !(k == "ARG" || k == "ENV")
                || !v.to_ascii_lowercase().contains("token")
                    && !v.to_ascii_lowercase().contains("password"),
            "{k} {v}"
        );
    }
}
