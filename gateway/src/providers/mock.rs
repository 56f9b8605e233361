//! The built-in `mock` provider: deterministic OpenAI-style answers with configurable
//! latency and streaming pace, for demos, local development and load tests.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tollgate_api::config::CompiledMock;

/// What a mock call answers.
#[derive(Debug, Clone)]
pub struct MockAnswer {
    /// Completion pieces, one per output token.
    pub tokens: Vec<String>,
    /// Estimated prompt tokens.
    pub prompt_tokens: u64,
}

/// Builds the deterministic answer for a request body: the configured reply, or a short
/// text tagged with the body's digest, cut or repeated to `completion_tokens` words.
pub fn answer(settings: &CompiledMock, body: &[u8], prompt_tokens: u64) -> MockAnswer {
    let text = match &settings.reply {
        Some(reply) => reply.clone(),
        None => {
            let digest: [u8; 32] = Sha256::digest(body).into();
            let tag: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
            format!(
                "[mock {tag}] This is a deterministic answer from the Tollgate mock provider. The quick brown fox jumps over the lazy dog."
            )
        }
    };
    let words: Vec<&str> = text.split_whitespace().collect();
    let words = if words.is_empty() { vec!["ok"] } else { words };
    let n = settings.completion_tokens.max(1) as usize;
    let tokens = (0..n)
        .map(|i| {
            let word = words[i % words.len()];
            if i + 1 < n {
                format!("{word} ")
            } else {
                word.to_owned()
            }
        })
        .collect();
    MockAnswer {
        tokens,
        prompt_tokens,
    }
}

fn usage(answer: &MockAnswer) -> Value {
    let completion = answer.tokens.len() as u64;
    json!({
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": answer.prompt_tokens + completion,
    })
}

/// Which OpenAI object a mock answer is shaped as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `chat.completion` / `chat.completion.chunk`.
    Chat,
    /// `text_completion` (legacy completions).
    Completion,
}

/// A complete, non-streamed answer.
pub fn completion(shape: Shape, answer: &MockAnswer, id: &str, model: &str, created: i64) -> Value {
    let text = answer.tokens.concat();
    let (object, choice) = match shape {
        Shape::Chat => (
            "chat.completion",
            json!({
                "index": 0,
                "message": { "role": "assistant", "content": text, "refusal": null },
                "logprobs": null,
                "finish_reason": "stop",
            }),
        ),
        Shape::Completion => (
            "text_completion",
            json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": "stop" }),
        ),
    };
    json!({
        "id": id,
        "object": object,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(answer),
        "system_fingerprint": "tollgate-mock",
    })
}

/// The SSE body of a streamed answer: (for chat) a role chunk, one chunk per token, a
/// finish chunk, the usage chunk when asked for, and `[DONE]`, paced by the settings.
pub fn stream(
    shape: Shape,
    answer: MockAnswer,
    settings: &CompiledMock,
    id: String,
    model: String,
    created: i64,
    include_usage: bool,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let interval = Duration::from_millis(settings.chunk_interval_ms);
    let usage_value = include_usage.then(|| usage(&answer));
    let object = match shape {
        Shape::Chat => "chat.completion.chunk",
        Shape::Completion => "text_completion",
    };
    let chunk = move |piece: Option<&str>, finish: Option<&str>| -> Value {
        let choice = match shape {
            Shape::Chat => {
                let delta = match piece {
                    Some(text) => json!({ "content": text }),
                    None if finish.is_none() => json!({ "role": "assistant", "content": "" }),
                    None => json!({}),
                };
                json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish })
            }
            Shape::Completion => {
                json!({ "index": 0, "text": piece.unwrap_or_default(), "logprobs": null, "finish_reason": finish })
            }
        };
        let mut c = json!({
            "id": id,
            "object": object,
            "created": created,
            "model": model,
            "system_fingerprint": "tollgate-mock",
            "choices": [choice],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let mut frames = Vec::with_capacity(answer.tokens.len() + 4);
    if shape == Shape::Chat {
        frames.push(sse(&chunk(None, None)));
    }
    for token in &answer.tokens {
        frames.push(sse(&chunk(Some(token), None)));
    }
    let mut finish = chunk(None, Some("stop"));
    frames.push(sse(&finish));
    if let Some(u) = usage_value {
        // The usage chunk has no choices, per OpenAI's stream_options contract.
        finish["choices"] = json!([]);
        finish["usage"] = u;
        frames.push(sse(&finish));
    }
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));

    let count = frames.len();
    stream::iter(frames.into_iter().enumerate()).then(move |(i, frame)| async move {
        // Pace between content chunks only; the first chunk goes out at once.
        if i > 0 && i + 2 < count && !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        frame
    })
}

/// An embeddings request without a usable `input`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("`input` must be a non-empty string or array")]
pub struct NoInput;

/// Deterministic embeddings for `input` (a string, or an array of strings or token
/// arrays): one unit vector of `dimensions` per input, derived from its digest, encoded as
/// floats or, when asked, base64 little-endian f32 (what the official SDKs request).
pub fn embeddings(request: &Value, model: &str) -> Result<Value, NoInput> {
    use base64::Engine;
    let inputs: Vec<String> = match &request["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) if !items.is_empty() => {
            if items.iter().all(Value::is_number) {
                vec![Value::Array(items.clone()).to_string()]
            } else {
                items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                    .collect()
            }
        }
        _ => return Err(NoInput),
    };
    let dimensions = request["dimensions"].as_u64().unwrap_or(256).clamp(1, 4096) as usize;
    let base64 = request["encoding_format"].as_str() == Some("base64");
    let mut prompt_tokens = 0u64;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            prompt_tokens += (text.len() as u64).div_ceil(4).max(1);
            let vector = unit_vector(text, dimensions);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();
    Ok(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": { "prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens },
    }))
}

fn unit_vector(text: &str, dimensions: usize) -> Vec<f32> {
    let mut values = Vec::with_capacity(dimensions);
    let mut block = 0u32;
    while values.len() < dimensions {
        let digest: [u8; 32] = Sha256::new()
            .chain_update(block.to_le_bytes())
            .chain_update(text.as_bytes())
            .finalize()
            .into();
        values.extend(
            digest
                .chunks(2)
                .map(|p| f32::from(u16::from_le_bytes([p[0], p[1]])) / 32768.0 - 1.0),
        );
        block += 1;
    }
    values.truncate(dimensions);
    let norm = values
        .iter()
        .map(|v| v * v)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    values.iter().map(|v| v / norm).collect()
}

/// One `data:` SSE frame.
pub fn sse(value: &Value) -> Bytes {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut out, value).expect("a JSON value serialises");
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(tokens: u32) -> CompiledMock {
        CompiledMock {
            latency_ms: 0,
            chunk_interval_ms: 0,
            completion_tokens: tokens,
            reply: None,
        }
    }

    #[test]
    fn answers_are_deterministic_per_prompt_and_sized_by_completion_tokens() {
        let a = answer(&settings(5), b"hello", 2);
        let b = answer(&settings(5), b"hello", 2);
        let c = answer(&settings(5), b"other", 2);
        assert_eq!(a.tokens, b.tokens);
        assert_ne!(a.tokens, c.tokens);
        assert_eq!(a.tokens.len(), 5);
    }

    #[tokio::test]
    async fn streams_end_with_usage_then_done_when_usage_is_requested() {
        let a = answer(&settings(3), b"x", 1);
        let frames: Vec<Bytes> = stream(
            Shape::Chat,
            a,
            &settings(3),
            "id".into(),
            "m".into(),
            0,
            true,
        )
        .collect()
        .await;
        let text: Vec<String> = frames
            .iter()
            .map(|f| String::from_utf8(f.to_vec()).unwrap())
            .collect();
        assert_eq!(
            text.len(),
            1 + 3 + 1 + 1 + 1,
            "role, tokens, finish, usage, done"
        );
        assert_eq!(text.last().unwrap(), "data: [DONE]\n\n");
        let usage: Value =
            serde_json::from_str(text[text.len() - 2].trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], 3);
        let token: Value =
            serde_json::from_str(text[1].trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(
            token["usage"],
            Value::Null,
            "earlier chunks carry usage: null"
        );
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors_in_float_or_base64() {
        let floats = embeddings(&json!({"input": ["a", "b"], "dimensions": 8}), "e").unwrap();
        assert_eq!(floats["data"].as_array().unwrap().len(), 2);
        let v: Vec<f32> = serde_json::from_value(floats["data"][0]["embedding"].clone()).unwrap();
        assert_eq!(v.len(), 8);
        assert!((v.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4);
        let b64 = embeddings(
            &json!({"input": "a", "dimensions": 8, "encoding_format": "base64"}),
            "e",
        )
        .unwrap();
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64["data"][0]["embedding"].as_str().unwrap())
            .unwrap();
        let decoded: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(decoded, v);
        assert!(embeddings(&json!({"input": []}), "e").is_err());
    }

    #[tokio::test]
    async fn streams_without_usage_have_no_usage_chunk() {
        let a = answer(&settings(2), b"x", 1);
        let frames: Vec<Bytes> = stream(
            Shape::Chat,
            a,
            &settings(2),
            "id".into(),
            "m".into(),
            0,
            false,
        )
        .collect()
        .await;
        assert_eq!(frames.len(), 1 + 2 + 1 + 1);
        assert!(
            !frames
                .iter()
                .any(|f| String::from_utf8_lossy(f).contains("usage"))
        );
    }
}
