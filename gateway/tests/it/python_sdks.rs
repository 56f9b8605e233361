//! The official Python SDKs work against the gateway. `openai`: chat, streamed chat with
//! usage, embeddings (base64, as the SDK requests them), legacy completions, model listing,
//! and its error classes for 404, 403 and 401. `anthropic`: messages, a streamed message,
//! and its error classes for 404 and 401.

use crate::common;

use std::{path::PathBuf, process::Command};

use common::{DEV_KEY, Gateway, examples};
use serde_json::Value;

fn python() -> PathBuf {
    std::env::var_os("TOLLGATE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

fn run_client(script: &str, gw: &Gateway, key: &str) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/clients")
        .join(script);
    let out = Command::new(python())
        .arg(&script)
        .args([gw.base.as_str(), key])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; run `bash tests/run.sh` to install the SDKs",
                python().display()
            )
        });
    assert!(
        out.status.success(),
        "{} failed:\n{}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the client prints JSON")
}

#[test]
fn the_official_openai_sdk_completes_every_call() {
    let gw = Gateway::start(&["--resources", examples().to_str().unwrap()]);
    let out = run_client("openai_client.py", &gw, DEV_KEY);

    assert!(
        out["chat"]["content"]
            .as_str()
            .unwrap()
            .starts_with("[mock "),
        "{out}"
    );
    assert_eq!(out["chat"]["finish_reason"], "stop");
    assert!(out["chat"]["total_tokens"].as_u64().unwrap() > 24);

    assert_eq!(out["stream"]["completion_tokens"], 24);
    assert!(
        out["stream"]["chunks"].as_u64().unwrap() >= 26,
        "role + 24 tokens + finish + usage"
    );
    assert_eq!(
        out["stream"]["content"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count(),
        24
    );

    assert_eq!(out["embeddings"]["count"], 2);
    assert_eq!(out["embeddings"]["dims"], 256);
    assert!(!out["completion"]["text"].as_str().unwrap().is_empty());
    assert_eq!(
        out["models"],
        serde_json::json!(["demo-chat", "demo-embed"])
    );

    assert_eq!(out["errors"]["not_found"], "model_not_found");
    assert_eq!(out["errors"]["permission"], "model_not_allowed");
    assert_eq!(out["errors"]["auth"], "invalid_api_key");
}

#[test]
fn the_official_anthropic_sdk_sends_messages_and_streams() {
    let gw = Gateway::start(&["--resources", examples().to_str().unwrap()]);
    let out = run_client("anthropic_client.py", &gw, DEV_KEY);
    assert!(
        out["message"]["text"]
            .as_str()
            .unwrap()
            .starts_with("[mock "),
        "{out}"
    );
    assert_eq!(out["message"]["stop_reason"], "end_turn");
    assert_eq!(out["message"]["output_tokens"], 24);
    assert_eq!(
        out["stream"]["text"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count(),
        24,
        "{out}"
    );
    assert_eq!(out["stream"]["stop_reason"], "end_turn");
    assert_eq!(out["stream"]["output_tokens"], 24);
    assert_eq!(out["errors"]["not_found"], 404);
    assert_eq!(out["errors"]["auth"], 401);
}
