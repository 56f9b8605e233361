//! The bodies of the `cargo fuzz` targets under `fuzz/`, here so that an ordinary test
//! (`tests/fuzz_seeds.rs`) runs them over the seed corpora without libFuzzer. Each takes
//! arbitrary bytes, must never panic, and asserts the properties its callers rely on.
//! Not part of the gateway's API.

use std::{collections::BTreeMap, path::Path};

use bytes::Bytes;
use serde_json::Value;
use tollgate_api::{
    compile::{DEFAULT_NAMESPACE, SecretStore},
    key_format::{self, Shape},
    manifests, parts,
};

use crate::{
    accounting, cache,
    dialects::{Client, Dialect},
    providers,
    relay::{Conversion, StreamTranslator},
    request, snapshot, sse, translate,
};

/// Upstream model name the rewrites put into bodies.
const UPSTREAM_MODEL: &str = "fuzz-upstream-model";

// === request ===

/// A client body through everything the gateway does to it before forwarding: the
/// UTF-8/nesting/head checks, the cache key, the model rename and both translations.
pub fn request(data: &[u8]) {
    let _ = accounting::usage_from_body(data);
    let key = cache::key("owner", "ns/route", "chat", data);
    assert_eq!(key, cache::key("owner", "ns/route", "chat", data));
    let Ok(head) = request::parse_head(data) else {
        return;
    };
    assert!(
        std::str::from_utf8(data).is_ok(),
        "accepted a non-UTF-8 body"
    );
    assert!(request::estimate_prompt_tokens(data) >= 1);
    let _ = head.include_usage();

    let original = Bytes::copy_from_slice(data);
    let same = providers::passthrough(&original, &head.model, &head.model).expect("no rewrite");
    assert_eq!(
        same, original,
        "a body without rename must be forwarded as is"
    );
    // The edits copy every other member as it came (a number serde_json's Value cannot
    // hold included), so what the head parser accepted it accepts again, renamed.
    let renamed = providers::passthrough(&original, &head.model, UPSTREAM_MODEL).expect("renamed");
    let again = request::parse_head(&renamed).expect("the renamed body parses as the original did");
    assert_eq!(again.model, UPSTREAM_MODEL);
    assert_eq!(again.stream, head.stream);
    let with_usage =
        providers::passthrough_with_usage(&original, UPSTREAM_MODEL).expect("usage added");
    let again = request::parse_head(&with_usage).expect("the edited body parses");
    assert!(again.include_usage() && again.model == UPSTREAM_MODEL);

    // Values the head skipped (e.g. out-of-range numbers) may still fail a full parse;
    // the gateway answers 400 then. When it succeeds, the rewrites index into it as an
    // object (`v["model"]`, `v["stream_options"]["include_usage"]`).
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    assert!(value.is_object(), "accepted a body that is not an object");
    assert_eq!(value["model"], head.model.as_str());
    assert_eq!(value["stream"].as_bool().unwrap_or(false), head.stream);
    assert!(
        matches!(value["stream_options"], Value::Null | Value::Object(_)),
        "accepted stream_options that is not an object"
    );
    // Where the tree parses, the edits change exactly the edited members.
    let mut injected = value.clone();
    injected["model"] = Value::String(UPSTREAM_MODEL.to_owned());
    injected["stream_options"]["include_usage"] = Value::Bool(true);
    let edited: Value = serde_json::from_slice(&with_usage).expect("edited body is JSON");
    assert_eq!(
        edited, injected,
        "the edits changed more than model and stream_options"
    );

    if let Ok(out) = translate::openai_to_anthropic_request(&value, UPSTREAM_MODEL) {
        check_anthropic_request(&out);
    }
    if let Ok(out) = translate::anthropic_to_openai_request(&value, UPSTREAM_MODEL) {
        check_openai_request(&out);
    }
}

// === sse ===

/// An upstream SSE stream, fed whole and in pseudo-random pieces (the first byte seeds the
/// split), to the parser and to the stream relay in every conversion. Splitting must not
/// change the events, nor what the client receives.
pub fn sse(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let pieces = split(stream, seed);

    let whole = sse::Parser::default()
        .feed(stream)
        .expect("under the size limit");
    let mut parser = sse::Parser::default();
    let mut chunked = Vec::new();
    for piece in &pieces {
        chunked.extend(parser.feed(piece).expect("under the size limit"));
    }
    assert_eq!(whole, chunked, "splitting the stream changed its events");

    for conversion in conversions() {
        let translates = matches!(conversion, Conversion::Translate { .. });
        let passthrough_anthropic = matches!(
            conversion,
            Conversion::Passthrough {
                dialect: Dialect::Anthropic,
                ..
            }
        );
        let whole_out = relay(conversion.clone(), &[stream]);
        let chunked_out = relay(conversion, &pieces);
        let (a, b) = (reparse(&whole_out), reparse(&chunked_out));
        if translates {
            for event in &a {
                assert!(
                    event.data == "[DONE]" || serde_json::from_str::<Value>(&event.data).is_ok(),
                    "a translated event is not JSON: {:?}",
                    event.data
                );
            }
            // `created` is the clock when the relay starts: the only field allowed to differ.
            assert_eq!(without_created(&a), without_created(&b));
        } else {
            assert_eq!(
                whole_out, chunked_out,
                "splitting changed the relayed bytes"
            );
        }
        // Anthropic events are relayed unchanged, multi-line `data:` fields included.
        if passthrough_anthropic {
            assert_eq!(a, whole, "the passthrough changed the events");
        }
    }
}

/// Splits `data` into pieces of 1 to 64 bytes, chosen by `seed`.
fn split(data: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut rng = fastrand::Rng::with_seed(u64::from(seed));
    let mut pieces = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (piece, tail) = rest.split_at(rng.usize(1..=64).min(rest.len()));
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

fn conversions() -> [Conversion; 8] {
    let client = |dialect| Client {
        dialect,
        model: "client-model".into(),
        include_usage: true,
        echo: None,
        answer_tool: None,
    };
    [
        Conversion::passthrough(Dialect::OpenAi),
        Conversion::Passthrough {
            dialect: Dialect::OpenAi,
            strip_usage: true,
        },
        Conversion::passthrough(Dialect::Anthropic),
        Conversion::passthrough(Dialect::Responses),
        Conversion::between(client(Dialect::OpenAi), Dialect::Anthropic, false),
        Conversion::between(client(Dialect::Anthropic), Dialect::OpenAi, false),
        Conversion::between(client(Dialect::Responses), Dialect::OpenAi, false),
        Conversion::between(client(Dialect::Responses), Dialect::Anthropic, false),
    ]
}

fn relay(conversion: Conversion, pieces: &[&[u8]]) -> Vec<u8> {
    let mut translator = StreamTranslator::new(conversion);
    let mut out = Vec::new();
    for piece in pieces {
        out.extend_from_slice(&translator.feed(piece, None).expect("under the size limit"));
    }
    out
}

fn reparse(bytes: &[u8]) -> Vec<sse::Event> {
    let events = sse::Parser::default()
        .feed(bytes)
        .expect("under the size limit");
    assert!(
        bytes.is_empty() || bytes.ends_with(b"\n\n"),
        "relayed bytes end mid-event"
    );
    events
}

fn without_created(events: &[sse::Event]) -> Vec<(Option<String>, Value)> {
    events
        .iter()
        .map(|e| {
            let mut data = serde_json::from_str::<Value>(&e.data)
                .unwrap_or_else(|_| Value::String(e.data.clone()));
            if let Some(o) = data.as_object_mut() {
                o.remove("created");
                // A Responses event's response object carries its creation time too.
                if let Some(Value::Object(r)) = o.get_mut("response") {
                    r.remove("created_at");
                }
            }
            (e.event.clone(), data)
        })
        .collect()
}

// === translate ===

/// Any JSON value through every translation: requests and complete answers both ways,
/// error bodies, and (when it is an array) a stream of events both ways. Every output must
/// serialise to JSON, and translated streams must be well formed.
pub fn translate(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    if let Ok(out) = translate::openai_to_anthropic_request(&value, UPSTREAM_MODEL) {
        check_anthropic_request(&out);
    }
    if let Ok(out) = translate::anthropic_to_openai_request(&value, UPSTREAM_MODEL) {
        check_openai_request(&out);
    }
    let created = data.len() as i64;
    let out = translate::anthropic_to_openai_response(&value, "client-model", created);
    assert_eq!(out["object"], "chat.completion");
    reparses(&out);
    let out = translate::openai_to_anthropic_response(&value, "client-model");
    assert_eq!(out["type"], "message");
    reparses(&out);
    let status = 400 + (data.len() % 200) as u16;
    reparses(&translate::openai_error_to_anthropic(&value, status));
    reparses(&translate::anthropic_error_to_openai(&value));

    // The Responses API: requests to both chat dialects, answers of each dialect as a
    // response object, and a stream of chat chunks as Responses events.
    use crate::dialects::{anthropic, openai_chat, responses};
    if let Ok(request) = responses::parse_request(&value) {
        check_openai_request(&openai_chat::render_request(&request, UPSTREAM_MODEL));
        check_anthropic_request(&anthropic::render_request(&request, UPSTREAM_MODEL));
        reparses(&responses::render_request(&request, UPSTREAM_MODEL));
    }
    let echo = responses::Echo::of(&value, "client-model");
    for answer in [
        openai_chat::parse_answer(&value),
        anthropic::parse_answer(&value),
        responses::parse_answer(&value),
    ] {
        let out = responses::render_answer(&answer, &echo, created);
        assert_eq!(out["object"], "response");
        reparses(&out);
    }

    let events: &[Value] = value.as_array().map_or(&[], Vec::as_slice);
    anthropic_stream_to_openai(events);
    openai_stream_to_anthropic(events);
    openai_stream_to_responses(events, echo);
}

fn openai_stream_to_responses(events: &[Value], echo: crate::dialects::responses::Echo) {
    let mut decoder = crate::dialects::openai_chat::StreamDecoder::default();
    let mut encoder = crate::dialects::responses::StreamEncoder::new(echo, 0);
    let mut sequence = 0;
    let mut terminal = 0;
    let all = events
        .iter()
        .map(|e| match e {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .chain(std::iter::once("[DONE]".to_owned()));
    for data in all {
        for event in decoder.on_data(&data) {
            for (name, out) in encoder.on_event(&event) {
                assert_eq!(out["type"], name.as_str());
                assert_eq!(out["sequence_number"], sequence, "numbered in order");
                sequence += 1;
                if matches!(
                    name.as_str(),
                    "response.completed" | "response.incomplete" | "response.failed"
                ) {
                    terminal += 1;
                }
            }
        }
    }
    assert_eq!(terminal, 1, "exactly one terminal event");
}

fn anthropic_stream_to_openai(events: &[Value]) {
    let mut t = translate::AnthropicToOpenAiStream::new("client-model", 0, true);
    for event in events {
        let name = event["type"].as_str().unwrap_or_default();
        for payload in t.on_event(name, event) {
            if payload == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(&payload).expect("chunks are JSON");
            assert!(
                chunk["object"] == "chat.completion.chunk" || chunk.get("error").is_some(),
                "{chunk}"
            );
        }
        let _ = t.usage();
    }
}

fn openai_stream_to_anthropic(events: &[Value]) {
    let mut t = translate::OpenAiToAnthropicStream::new("client-model");
    let mut out = Vec::new();
    for event in events {
        let data = match event {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let done = data.trim() == "[DONE]";
        out.extend(t.on_data(&data));
        let _ = t.usage();
        if done {
            break;
        }
    }
    out.extend(t.on_data("[DONE]"));
    // After the end, nothing more.
    assert!(t.on_data("[DONE]").is_empty());
    check_anthropic_stream(&out);
}

/// The shape Anthropic clients rely on: one `message_start` first, blocks started and
/// stopped in pairs, and `message_delta` then `message_stop` last.
fn check_anthropic_stream(events: &[(String, Value)]) {
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let body: Vec<&(String, Value)> = events.iter().filter(|(n, _)| n != "error").collect();
    assert!(body.len() >= 3, "{names:?}");
    assert_eq!(body[0].0, "message_start", "{names:?}");
    assert_eq!(body[body.len() - 2].0, "message_delta", "{names:?}");
    assert_eq!(body[body.len() - 1].0, "message_stop", "{names:?}");
    let mut open: Option<&Value> = None;
    let mut next_index = 0u64;
    for (name, data) in &body[1..body.len() - 2] {
        assert_eq!(data["type"], name.as_str());
        match name.as_str() {
            "content_block_start" => {
                assert!(open.is_none(), "a block started inside another: {names:?}");
                assert_eq!(data["index"], next_index, "{names:?}");
                next_index += 1;
                open = Some(&data["index"]);
            }
            "content_block_stop" => {
                assert_eq!(open.take(), Some(&data["index"]), "{names:?}");
            }
            "content_block_delta" => {}
            other => panic!("unexpected {other} mid-stream: {names:?}"),
        }
    }
    assert!(open.is_none(), "a block was left open: {names:?}");
    for (_, data) in events {
        reparses(data);
    }
}

fn check_anthropic_request(out: &Value) {
    assert_eq!(out["model"], UPSTREAM_MODEL);
    assert!(out["max_tokens"].is_u64());
    let messages = out["messages"].as_array().expect("messages");
    // Anthropic requires alternating turns.
    for pair in messages.windows(2) {
        assert_ne!(pair[0]["role"], pair[1]["role"], "turns must alternate");
    }
    for m in messages {
        assert!(m["content"].as_array().is_some_and(|c| !c.is_empty()));
    }
    reparses(out);
}

fn check_openai_request(out: &Value) {
    assert_eq!(out["model"], UPSTREAM_MODEL);
    assert!(out["messages"].is_array());
    reparses(out);
}

/// A value's JSON text parses back.
fn reparses(value: &Value) {
    let text = serde_json::to_string(value).expect("a JSON value serialises");
    serde_json::from_str::<Value>(&text).expect("serialised JSON parses");
}

// === api_key ===

/// Key classification on arbitrary text, and on keys generated from arbitrary random
/// bytes: a generated key verifies, and every single-character change or adjacent swap
/// of it is refused.
pub fn api_key(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let shape = key_format::shape(&text);
    if shape != Shape::Other {
        assert_eq!(text.len(), key_format::KEY_LEN);
        assert!(text.starts_with(key_format::PREFIX));
    }
    let _ = snapshot::key_hash(&text);
    let prefix = tollgate_api::compile::key_prefix(&text);
    assert!(prefix.chars().count() <= 7 && prefix.len() <= text.len());

    let Some(key) = key_format::from_random(data) else {
        return;
    };
    assert_eq!(key.len(), key_format::KEY_LEN);
    assert_eq!(key_format::shape(&key), Shape::Generated);
    let bytes = key.as_bytes();
    // The replacement for each position comes from the input, to vary it across runs.
    let replacements = b"0aZ9_-! \xc3\xa9";
    for i in 0..key_format::KEY_LEN {
        let r = replacements[(i + data.len()) % replacements.len()];
        let c = if r == bytes[i] {
            b'Q' ^ (bytes[i] & 1)
        } else {
            r
        };
        if c == bytes[i] {
            continue;
        }
        let mut typo = bytes.to_vec();
        typo[i] = c;
        let typo = String::from_utf8_lossy(&typo);
        let shape = key_format::shape(&typo);
        assert_ne!(shape, Shape::Generated, "typo at {i} accepted: {typo}");
        if i >= key_format::PREFIX.len() && c.is_ascii_alphanumeric() {
            assert_eq!(shape, Shape::BadChecksum, "typo at {i}: {typo}");
        }
    }
    for i in key_format::PREFIX.len()..key_format::KEY_LEN - 1 {
        if bytes[i] != bytes[i + 1] {
            let mut swapped = bytes.to_vec();
            swapped.swap(i, i + 1);
            let swapped = String::from_utf8(swapped).expect("ASCII");
            assert_eq!(key_format::shape(&swapped), Shape::BadChecksum, "{swapped}");
        }
    }
    assert_eq!(key_format::shape(&key[..key.len() - 1]), Shape::Other);
}

// === compile ===

/// Manifests (YAML, one or more documents) through what standalone mode and the operator
/// do: load, compile, split into parts, reassemble, build the gateway's snapshot. The
/// compiled configuration must be consistent and survive the round trip.
pub fn compile(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut loaded = manifests::Loaded::default();
    let mut errors = Vec::new();
    manifests::load_str(Path::new("fuzz.yaml"), text, &mut loaded, &mut errors);
    let secrets = SecretStore::new(&loaded.secrets, DEFAULT_NAMESPACE);
    let now = jiff::Timestamp::from_second(1_750_000_000).expect("valid");
    let out = tollgate_api::compile::compile(&loaded.resources, &secrets, now);
    let config = &out.config;

    for route in &config.routing.routes {
        assert!(!route.tiers.is_empty(), "route {} has no tier", route.id);
        for target in route.tiers.iter().flatten() {
            let provider = config
                .routing
                .providers
                .get(&target.provider)
                .unwrap_or_else(|| panic!("route {} targets a missing provider", route.id));
            if let Some(model) = &target.model {
                assert!(provider.models.contains_key(model), "{} {model}", route.id);
            }
        }
    }
    let hashes: Vec<&str> = config.keys.keys.iter().map(|k| k.sha256.as_str()).collect();
    assert!(hashes.is_sorted(), "keys are not sorted by hash");
    for hash in &hashes {
        assert!(hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    }
    for object in out.objects.keys() {
        let _ = out.conditions(object);
    }

    let split = parts::split(config).expect("a compiled configuration splits");
    let files: BTreeMap<String, Vec<u8>> = split
        .parts
        .iter()
        .map(|p| (p.file.clone(), p.bytes.clone()))
        .collect();
    let assembled = parts::assemble(&files).expect("split parts reassemble");
    assert_eq!(assembled.config_hash, split.config_hash);
    assert_eq!(
        &assembled.config, config,
        "the round trip changed the config"
    );

    let snapshot = snapshot::Snapshot::new(
        assembled.config,
        assembled.config_hash,
        &crate::targets::Health::default(),
    );
    for route in &config.routing.routes {
        for name in &route.exact {
            let owner = snapshot
                .route_in_namespace(route.namespace(), name)
                .map(|r| r.id.as_str());
            assert_eq!(
                owner,
                Some(route.id.as_str()),
                "{name} is not routed to its owner"
            );
        }
    }
    assert_eq!(snapshot.key_count(), hashes.len());
}
