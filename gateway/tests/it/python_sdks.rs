//! The official Python SDKs work against the gateway. `openai`: chat, streamed chat with
//! usage, embeddings (base64, as the SDK requests them), legacy completions, model listing,
//! and its error classes for 404, 403 and 401; its Responses calls; moderations, images
//! and audio. `anthropic`: messages, a streamed message, and its error classes for 404 and
//! 401. The OpenAI Agents SDK and pydantic-ai's Responses model, through every kind of
//! upstream.

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
    run_client_with(script, &gw.base, key, &[])
}

/// Runs a client script with extra arguments after the base URL and key, off the async
/// runtime (the emulated upstreams run on it).
async fn run_async(script: &'static str, gw: &Gateway, key: &'static str, args: &[&str]) -> Value {
    let base = gw.base.clone();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_client_with(script, &base, key, &args)
    })
    .await
    .unwrap()
}

fn run_client_with(script: &str, base: &str, key: &str, args: &[&str]) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/clients")
        .join(script);
    let out = Command::new(python())
        .arg(&script)
        .args([base, key])
        .args(args)
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

#[tokio::test]
async fn the_openai_sdk_responses_calls_work_for_every_kind_of_upstream() {
    use crate::responses_api::{KEY, MODELS, bed};
    let bed = bed("").await;
    for model in MODELS {
        let stateful = if model == "gpt-native" {
            "stateful"
        } else {
            ""
        };
        let out = run_async("responses_client.py", &bed.gw, KEY, &[model, stateful]).await;
        assert_eq!(out["create"]["status"], "completed", "{model}: {out}");
        assert_eq!(
            out["create"]["text"], "emulated reply to: Hello from the SDK",
            "{model}"
        );
        assert!(
            out["create"]["input_tokens"].as_u64().unwrap() > 0,
            "{model}"
        );
        assert_eq!(
            out["stream"]["deltas"], "emulated reply to: Stream please",
            "{model}"
        );
        assert_eq!(out["stream"]["final"], out["stream"]["deltas"], "{model}");
        assert_eq!(
            out["tools"]["calls"],
            serde_json::json!(["get_weather"]),
            "{model}"
        );
        assert_eq!(
            out["tools"]["answer"], "the tool said: sunny in emulated",
            "{model}"
        );
        // Anthropic's messages have no structured output: a tool the model must call
        // carries it, and its call comes back as the answer's text.
        assert_eq!(
            out["parsed"],
            serde_json::json!({"name": "emulated", "age": 1}),
            "{model}"
        );
        assert_eq!(out["not_found"], "model_not_found", "{model}");
        if !stateful.is_empty() {
            let stateful = &out["stateful"];
            assert!(
                stateful["follow"]
                    .as_str()
                    .unwrap()
                    .starts_with("emulated reply"),
                "{out}"
            );
            assert_eq!(stateful["fetched"], true, "{out}");
            assert!(stateful["input_items"].as_u64().unwrap() >= 1, "{out}");
            assert_eq!(stateful["deleted"], true, "{out}");
        }
    }
}

#[tokio::test]
async fn the_openai_agents_sdk_runs_a_tool_loop_on_its_default_model_api() {
    use crate::responses_api::{KEY, MODELS, bed};
    let bed = bed("").await;
    for model in MODELS {
        let out = run_async("agents_client.py", &bed.gw, KEY, &[model]).await;
        assert_eq!(
            out["calls"],
            serde_json::json!(["emulated"]),
            "{model}: {out}"
        );
        assert_eq!(
            out["final"], "the tool said: sunny in emulated",
            "{model}: {out}"
        );
    }
    // It spoke the Responses API, passed through to the upstream that serves it.
    assert!(
        bed.native
            .received()
            .iter()
            .all(|r| r.path_and_query == "/v1/responses")
    );
}

#[tokio::test]
async fn the_openai_sdk_calls_moderations_images_and_audio_through_the_gateway() {
    use crate::openai_endpoints::{KEY, bed};
    let bed = bed(&[]).await;
    let out = run_async("media_client.py", &bed.gw, KEY, &[]).await;
    assert_eq!(out["moderation"], serde_json::json!([false, true]), "{out}");
    assert_eq!(out["image"]["count"], 1, "{out}");
    assert_eq!(out["image"]["b64"], true, "{out}");
    assert_eq!(out["image"]["output_tokens"], 1056, "{out}");
    assert_eq!(
        out["image_stream"],
        serde_json::json!([
            "image_generation.partial_image",
            "image_generation.completed"
        ]),
        "{out}"
    );
    assert_eq!(
        out["speech"]["bytes"].as_u64().unwrap() as usize,
        tollgate_testkit::emulated::media::speech_audio("Hello from the SDK").len(),
        "{out}"
    );
    assert_eq!(out["speech"]["head"], "ID3", "{out}");
    assert_eq!(
        out["transcript"], "emulated transcript of 10244 bytes from meeting.wav",
        "{out}"
    );
    assert_eq!(
        out["transcript_stream"]["last"], "transcript.text.done",
        "{out}"
    );
    assert!(
        out["transcript_stream"]["deltas"].as_u64().unwrap() > 1,
        "{out}"
    );
    assert_eq!(out["transcript_stream"]["text"], out["transcript"], "{out}");
    assert!(
        out["transcript_text"]
            .as_str()
            .unwrap()
            .starts_with("emulated transcript of 10244 bytes"),
        "{out}"
    );
    assert_eq!(out["not_found"], "model_not_found", "{out}");
}

#[tokio::test]
async fn pydantic_ai_runs_its_responses_model_through_every_kind_of_upstream() {
    use crate::responses_api::{KEY, MODELS, bed};
    let bed = bed("").await;
    for model in MODELS {
        let out = run_async("pydantic_ai_client.py", &bed.gw, KEY, &[model]).await;
        assert_eq!(
            out["plain"], "emulated reply to: Hello from pydantic-ai",
            "{model}: {out}"
        );
        assert!(out["input_tokens"].as_u64().unwrap() > 0, "{model}: {out}");
        assert_eq!(
            out["tool_calls"],
            serde_json::json!(["get_weather"]),
            "{model}: {out}"
        );
        assert_eq!(
            out["tool_loop"], "the tool said: sunny in emulated",
            "{model}: {out}"
        );
        assert_eq!(
            out["structured"],
            serde_json::json!({"name": "emulated", "age": 1}),
            "{model}: {out}"
        );
        assert_eq!(
            out["streamed"], "emulated reply to: Stream please",
            "{model}: {out}"
        );
    }
}
