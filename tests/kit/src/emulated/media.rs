//! OpenAI's moderations, image generations, text to speech and transcriptions, emulated
//! as the real API answers and refuses them: unknown parameters and missing required ones
//! are 400s, transcriptions take only multipart uploads, speech answers with audio bytes
//! (in several chunks, so relays are seen to stream) or with `speech.audio.*` events,
//! image and transcription models report token usage (`gpt-image-*`,
//! `gpt-4o-*transcribe`) or none / seconds (`dall-e-*`, `whisper-1`) as OpenAI's do.

use axum::{body::Body, response::Response};
use serde_json::{Value, json};

use super::{openai_error, reply, sse, tokens, unknown_field, unknown_parameter, unparsable};

/// OpenAI's refusal of a body that is not an object or has a field beyond `known`.
fn refused(req: &Value, known: &[&str]) -> Option<Response> {
    if !req.is_object() {
        return Some(unparsable());
    }
    let field = unknown_field(req, known)?;
    Some(openai_error(
        400,
        &format!("Unrecognized request argument supplied: {field}"),
        "invalid_request_error",
        None,
        None,
    ))
}

const MODERATION_FIELDS: &[&str] = &["model", "input"];

/// `POST /v1/moderations`: every input unflagged, except one containing "kill".
pub(super) fn moderations(req: &Value) -> Response {
    if let Some(refused) = refused(req, MODERATION_FIELDS) {
        return refused;
    }
    let texts: Vec<String> = match &req["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .or_else(|| i["text"].as_str().map(str::to_owned))
                    .unwrap_or_default()
            })
            .collect(),
        _ => {
            return openai_error(
                400,
                "'input' is a required property",
                "invalid_request_error",
                Some("input"),
                None,
            );
        }
    };
    let results: Vec<Value> = texts
        .iter()
        .map(|t| {
            let violent = t.contains("kill");
            json!({
                "flagged": violent,
                "categories": {"violence": violent, "harassment": false, "self-harm": false},
                "category_scores": {"violence": if violent { 0.97 } else { 0.001 }, "harassment": 0.001, "self-harm": 0.0},
                "category_applied_input_types": {"violence": ["text"], "harassment": ["text"], "self-harm": ["text"]}
            })
        })
        .collect();
    reply(
        200,
        json!({"id": "modr-emulated", "model": req["model"].as_str().unwrap_or("omni-moderation-latest"), "results": results}),
    )
}

const IMAGE_FIELDS: &[&str] = &[
    "prompt",
    "model",
    "n",
    "quality",
    "response_format",
    "size",
    "style",
    "user",
    "background",
    "moderation",
    "output_compression",
    "output_format",
    "partial_images",
    "stream",
];

/// A 1×1 PNG, base64.
const PNG: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=";

/// `POST /v1/images/generations`.
pub(super) fn images(req: &Value) -> Response {
    if let Some(refused) = unknown_parameter(req, IMAGE_FIELDS) {
        return refused;
    }
    let Some(prompt) = req["prompt"].as_str() else {
        return openai_error(
            400,
            "Missing required parameter: 'prompt'.",
            "invalid_request_error",
            Some("prompt"),
            Some("missing_required_parameter"),
        );
    };
    let model = req["model"].as_str().unwrap_or("dall-e-2");
    let tokens_model = model.starts_with("gpt-image");
    let streamed = req["stream"].as_bool().unwrap_or(false);
    if streamed && !tokens_model {
        return openai_error(
            400,
            &format!("Streaming is not supported for model '{model}'."),
            "invalid_request_error",
            Some("stream"),
            None,
        );
    }
    let n = req["n"].as_u64().unwrap_or(1).clamp(1, 10);
    let usage = json!({
        "input_tokens": tokens(prompt),
        "output_tokens": 1056 * n,
        "total_tokens": tokens(prompt) + 1056 * n,
        "input_tokens_details": {"text_tokens": tokens(prompt), "image_tokens": 0}
    });
    if streamed {
        let mut events = vec![(
            Some("image_generation.partial_image".to_owned()),
            json!({"type": "image_generation.partial_image", "b64_json": PNG, "partial_image_index": 0, "created_at": 1_700_000_000, "size": "1024x1024", "quality": "low", "background": "opaque", "output_format": "png"}).to_string(),
        )];
        events.push((
            Some("image_generation.completed".to_owned()),
            json!({"type": "image_generation.completed", "b64_json": PNG, "created_at": 1_700_000_000, "size": "1024x1024", "quality": "low", "background": "opaque", "output_format": "png", "usage": usage}).to_string(),
        ));
        return sse(events);
    }
    let data: Vec<Value> = (0..n)
        .map(|_| json!({"b64_json": PNG, "revised_prompt": prompt}))
        .collect();
    let mut answer = json!({"created": 1_700_000_000, "data": data});
    if tokens_model {
        answer["usage"] = usage;
    }
    // OpenAI pretty-prints its JSON answers.
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_string_pretty(&answer).unwrap()))
        .unwrap()
}

const SPEECH_FIELDS: &[&str] = &[
    "model",
    "input",
    "voice",
    "instructions",
    "response_format",
    "speed",
    "stream_format",
];

/// The audio "spoken" for `input`: an MP3-looking header, then bytes derived from the
/// text (1 KiB per character, so that a sentence is a few hundred kilobytes).
pub fn speech_audio(input: &str) -> Vec<u8> {
    let mut audio = b"ID3\x04\x00\x00\x00\x00\x00\x00".to_vec();
    for (i, b) in input.bytes().enumerate() {
        audio.extend((0..1024u32).map(|j| b.wrapping_add((i as u32 + j) as u8)));
    }
    audio
}

/// `POST /v1/audio/speech`: audio bytes, streamed in 16 KiB chunks, or `speech.audio.*`
/// events for `stream_format: "sse"`.
pub(super) fn speech(req: &Value) -> Response {
    if let Some(refused) = refused(req, SPEECH_FIELDS) {
        return refused;
    }
    let (Some(input), Some(_voice)) = (req["input"].as_str(), req["voice"].as_str()) else {
        return openai_error(
            400,
            "'input' and 'voice' are required properties",
            "invalid_request_error",
            None,
            None,
        );
    };
    if input.chars().count() > 4096 {
        return openai_error(
            400,
            "[{'type': 'string_too_long', 'loc': ('body', 'input'), 'msg': 'String should have at most 4096 characters'}]",
            "invalid_request_error",
            Some("input"),
            None,
        );
    }
    let audio = speech_audio(input);
    if req["stream_format"].as_str() == Some("sse") {
        let mut events: Vec<(Option<String>, String)> = audio
            .chunks(4096)
            .map(|c| {
                (
                    None,
                    json!({"type": "speech.audio.delta", "audio": base64(c)}).to_string(),
                )
            })
            .collect();
        events.push((None, json!({"type": "speech.audio.done", "usage": {"input_tokens": tokens(input), "output_tokens": audio.len() as u64 / 1024, "total_tokens": tokens(input) + audio.len() as u64 / 1024}}).to_string()));
        return sse(events);
    }
    let content_type = match req["response_format"].as_str().unwrap_or("mp3") {
        "opus" => "audio/opus",
        "aac" => "audio/aac",
        "flac" => "audio/flac",
        "wav" => "audio/wav",
        "pcm" => "audio/pcm",
        _ => "audio/mpeg",
    };
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        audio.chunks(16 * 1024).map(|c| Ok(c.to_vec())).collect();
    Response::builder()
        .header("content-type", content_type)
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap()
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

const TRANSCRIPTION_FIELDS: &[&str] = &[
    "file",
    "model",
    "language",
    "prompt",
    "response_format",
    "temperature",
    "timestamp_granularities[]",
    "stream",
    "include[]",
    "chunking_strategy",
];

/// `POST /v1/audio/transcriptions`: a multipart form with a `file` and a `model`; the
/// transcript names the file's size and echoes the prompt, so tests see what arrived.
pub(super) async fn transcriptions(
    content_type: Option<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(boundary) = content_type
        .as_deref()
        .and_then(|c| multer::parse_boundary(c).ok())
    else {
        return openai_error(
            400,
            "Invalid Content-Type header: expected multipart/form-data.",
            "invalid_request_error",
            None,
            None,
        );
    };
    let source = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut form = multer::Multipart::new(source, boundary);
    let mut fields: Vec<(String, Option<String>, axum::body::Bytes)> = Vec::new();
    loop {
        match form.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or_default().to_owned();
                let file = field.file_name().map(str::to_owned);
                match field.bytes().await {
                    Ok(data) => fields.push((name, file, data)),
                    Err(e) => {
                        return openai_error(
                            400,
                            &e.to_string(),
                            "invalid_request_error",
                            None,
                            None,
                        );
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                return openai_error(400, &e.to_string(), "invalid_request_error", None, None);
            }
        }
    }
    if let Some((name, ..)) = fields
        .iter()
        .find(|(n, ..)| !TRANSCRIPTION_FIELDS.contains(&n.as_str()))
    {
        return openai_error(
            400,
            &format!("Unrecognized request argument supplied: {name}"),
            "invalid_request_error",
            None,
            None,
        );
    }
    let text = |name: &str| {
        fields
            .iter()
            .find(|(n, f, _)| n == name && f.is_none())
            .map(|(_, _, d)| String::from_utf8_lossy(d).into_owned())
    };
    let Some((_, file_name, audio)) = fields.iter().find(|(n, f, _)| n == "file" && f.is_some())
    else {
        return openai_error(
            400,
            "You must provide a file.",
            "invalid_request_error",
            Some("file"),
            None,
        );
    };
    let Some(model) = text("model") else {
        return openai_error(
            400,
            "you must provide a model parameter",
            "invalid_request_error",
            Some("model"),
            None,
        );
    };
    let mut transcript = format!(
        "emulated transcript of {} bytes from {}",
        audio.len(),
        file_name.as_deref().unwrap_or_default()
    );
    if let Some(prompt) = text("prompt") {
        transcript.push_str(&format!(" (prompt: {prompt})"));
    }
    let token_usage = model.contains("transcribe");
    let usage = if token_usage {
        json!({"type": "tokens", "input_tokens": audio.len() as u64 / 100 + 1, "output_tokens": tokens(&transcript), "total_tokens": audio.len() as u64 / 100 + 1 + tokens(&transcript)})
    } else {
        json!({"type": "duration", "seconds": audio.len() as u64 / 16_000 + 1})
    };
    if text("stream").as_deref() == Some("true") {
        if !token_usage {
            return openai_error(
                400,
                &format!("Streaming is not supported for model '{model}'."),
                "invalid_request_error",
                Some("stream"),
                None,
            );
        }
        let mut events: Vec<(Option<String>, String)> = transcript
            .split(' ')
            .map(|w| {
                (
                    None,
                    json!({"type": "transcript.text.delta", "delta": format!("{w} ")}).to_string(),
                )
            })
            .collect();
        events.push((
            None,
            json!({"type": "transcript.text.done", "text": transcript, "usage": usage}).to_string(),
        ));
        return sse(events);
    }
    match text("response_format").as_deref().unwrap_or("json") {
        "text" => Response::builder()
            .header("content-type", "text/plain; charset=utf-8")
            .body(Body::from(format!("{transcript}\n")))
            .unwrap(),
        "json" | "verbose_json" => reply(200, json!({"text": transcript, "usage": usage})),
        other => openai_error(
            400,
            &format!("response_format '{other}' is not supported by the emulator"),
            "invalid_request_error",
            Some("response_format"),
            None,
        ),
    }
}
