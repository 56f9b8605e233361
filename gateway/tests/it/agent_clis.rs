//! The coding agents and SDKs people run, installed from npm (`tests/clients`), driven
//! through the gateway against emulated upstreams that refuse what the real APIs refuse:
//! Codex CLI (`codex exec`, which speaks only the Responses API), Claude Code
//! (`claude -p`, with its betas and `?beta=true`) and the Vercel AI SDK's default
//! provider (`openai(model)`, the Responses API), and the official `openai` SDK for Node
//! (`responses.create`, streamed, a tool round trip), for an upstream that serves the
//! Responses API, a chat-only one and Anthropic.

use crate::responses_api::{self, KEY};

use std::{path::PathBuf, process::Command};

use serde_json::Value;
use tollgate_testkit::emulated;

fn clients() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/clients")
}

fn bin(name: &str) -> PathBuf {
    let path = clients().join("node_modules/.bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `bash tests/run.sh` to install the clients",
        path.display()
    );
    path
}

/// Runs `command` off the async runtime (the emulated upstreams run on it) and returns its
/// stdout, asserting it succeeded.
async fn run(mut command: Command) -> String {
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "failed:\n{stdout}\n{stderr}");
    stdout
}

#[tokio::test]
async fn codex_exec_answers_through_every_kind_of_upstream() {
    let bed = responses_api::bed("").await;
    for model in responses_api::MODELS {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(
            home.path().join("config.toml"),
            format!(
                "model = \"{model}\"\nmodel_provider = \"tollgate\"\n\n[model_providers.tollgate]\nname = \"Tollgate\"\nbase_url = \"{}/v1\"\nenv_key = \"TOLLGATE_API_KEY\"\nwire_api = \"responses\"\n",
                bed.gw.base
            ),
        )
        .unwrap();
        let work = tempfile::tempdir().unwrap();
        let mut codex = Command::new(bin("codex"));
        codex
            .args(["exec", "--skip-git-repo-check", "Say hello to the gateway"])
            .current_dir(work.path())
            .env("CODEX_HOME", home.path())
            .env("TOLLGATE_API_KEY", KEY)
            .env("NO_COLOR", "1");
        let out = run(codex).await;
        assert!(
            out.contains("emulated reply to:"),
            "{model}: codex printed {out}"
        );
    }
    // Codex keeps no state upstream (`store: false`) and its Responses requests passed
    // through as they were to the upstream that serves the API.
    let sent = bed.native.received();
    assert!(!sent.is_empty());
    for request in &sent {
        assert_eq!(request.path_and_query, "/v1/responses");
        assert_eq!(request.json()["store"], false);
        assert_eq!(request.json()["model"], "gpt-5-emulated");
    }
    assert_eq!(bed.native.stored(), 0);
    assert!(
        bed.chat_only
            .received()
            .iter()
            .all(|r| r.path_and_query == "/v1/chat/completions")
    );
    assert!(
        bed.anthropic
            .received()
            .iter()
            .all(|r| r.path_and_query.starts_with("/v1/messages"))
    );
}

#[tokio::test]
async fn claude_code_answers_through_anthropic_and_translated_upstreams() {
    let bed = responses_api::bed("").await;
    for model in ["claude", "gpt-chat"] {
        let home = tempfile::tempdir().unwrap();
        let mut claude = Command::new(bin("claude"));
        claude
            .args(["-p", "Say hello to the gateway"])
            .current_dir(home.path())
            .env("HOME", home.path())
            .env("ANTHROPIC_BASE_URL", &bed.gw.base)
            .env("ANTHROPIC_API_KEY", KEY)
            .env("ANTHROPIC_MODEL", model)
            .env("ANTHROPIC_SMALL_FAST_MODEL", model)
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .env("DISABLE_AUTOUPDATER", "1")
            .env("NO_COLOR", "1");
        let out = run(claude).await;
        assert!(
            out.contains("emulated reply to:"),
            "{model}: claude printed {out}"
        );
    }
    // What Claude Code sent Anthropic went with its version and betas, as the API needs.
    let sent = bed.anthropic.received();
    assert!(!sent.is_empty());
    for request in &sent {
        assert!(
            request.path_and_query.starts_with("/v1/messages"),
            "{}",
            request.path_and_query
        );
        assert!(emulated::header(request, "anthropic-version").is_some());
    }
}

#[tokio::test]
async fn the_vercel_ai_sdk_default_provider_works_for_every_kind_of_upstream() {
    let bed = responses_api::bed("").await;
    for model in responses_api::MODELS {
        let mut node = Command::new("node");
        node.arg(clients().join("ai_sdk_client.mjs"))
            .args([bed.gw.base.as_str(), KEY, model])
            .current_dir(clients());
        let out: Value = serde_json::from_str(run(node).await.trim()).unwrap();
        assert_eq!(
            out["text"], "emulated reply to: Hello from the AI SDK",
            "{model}: {out}"
        );
        assert_eq!(
            out["streamed"], "emulated reply to: Stream please",
            "{model}: {out}"
        );
        assert!(out["input_tokens"].as_u64().unwrap() > 0, "{model}: {out}");
        assert!(
            out["streamed_output_tokens"].as_u64().unwrap() > 0,
            "{model}: {out}"
        );
    }
}

#[tokio::test]
async fn the_official_openai_node_sdk_calls_the_responses_api_for_every_kind_of_upstream() {
    let bed = responses_api::bed("").await;
    for model in responses_api::MODELS {
        let mut node = Command::new("node");
        node.arg(clients().join("openai_node_client.mjs"))
            .args([bed.gw.base.as_str(), KEY, model])
            .current_dir(clients());
        let out: Value = serde_json::from_str(run(node).await.trim()).unwrap();
        assert_eq!(
            out["text"], "emulated reply to: Hello from Node",
            "{model}: {out}"
        );
        assert_eq!(out["status"], "completed", "{model}: {out}");
        assert!(out["input_tokens"].as_u64().unwrap() > 0, "{model}: {out}");
        assert_eq!(
            out["streamed"], "emulated reply to: Stream please",
            "{model}: {out}"
        );
        assert_eq!(out["final"], out["streamed"], "{model}: {out}");
        assert_eq!(out["ordered"], true, "{model}: {out}");
        assert_eq!(out["call"], "get_weather", "{model}: {out}");
        assert!(out["arguments"]["city"].is_string(), "{model}: {out}");
        assert_eq!(
            out["answer"], "the tool said: sunny in Paris",
            "{model}: {out}"
        );
        assert_eq!(out["not_found"], "model_not_found", "{model}: {out}");
    }
}
