use serde_json::{Value, json};

use super::{anthropic, openai_chat};
use crate::canonical::{Event, Finish, OutputFormat, Part, Role, ToolChoice, Usage};

/// A chat request with every field the canonical model carries.
fn rich_chat_request() -> Value {
    json!({
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"q\":1}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
        ],
        "max_tokens": 70,
        "temperature": 1,
        "top_p": 0.5,
        "stop": ["END"],
        "stream": true,
        "tools": [{"type": "function", "function": {"name": "look", "description": "Look", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "look"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "cat", "schema": {"type": "object"}, "strict": true}},
        "user": "u-1",
    })
}

#[test]
fn openai_chat_requests_parse_into_the_canonical_model_and_render_back() {
    let req = openai_chat::parse_request(&rich_chat_request()).unwrap();
    assert_eq!(req.system.as_deref(), Some("Be brief."));
    assert_eq!(
        req.messages.iter().map(|m| m.role).collect::<Vec<_>>(),
        [Role::User, Role::Assistant, Role::Tool]
    );
    assert_eq!(req.tool_choice, Some(ToolChoice::Tool("look".into())));
    assert!(matches!(
        req.output,
        Some(OutputFormat::JsonSchema { strict: true, .. })
    ));
    let back = openai_chat::render_request(&req, "up");
    assert_eq!(back["model"], "up");
    // Numbers keep the form the client wrote.
    assert_eq!(back["temperature"], json!(1));
    assert_eq!(back["top_p"], json!(0.5));
    assert_eq!(
        back["response_format"],
        rich_chat_request()["response_format"]
    );
    assert_eq!(back["stream_options"], json!({"include_usage": true}));
    let messages = back["messages"].as_array().unwrap();
    assert_eq!(
        messages[0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(
        messages[1]["content"][1]["image_url"]["url"],
        "data:image/png;base64,AAAA"
    );
    assert_eq!(
        messages[2]["tool_calls"][0]["function"]["arguments"],
        "{\"q\":1}"
    );
    assert_eq!(
        messages[3],
        json!({"role": "tool", "tool_call_id": "call_1", "content": "a cat"})
    );
}

#[test]
fn anthropic_requests_parse_into_the_canonical_model_and_render_back() {
    let original = json!({
        "model": "claude",
        "system": [{"type": "text", "text": "Be brief."}],
        "max_tokens": 64,
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "tu", "name": "f", "input": {"x": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu", "content": "42"}, {"type": "text", "text": "and?"}]},
        ],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any"},
    });
    let req = anthropic::parse_request(&original).unwrap();
    assert_eq!(req.tool_choice, Some(ToolChoice::Required));
    let back = anthropic::render_request(&req, "claude");
    assert_eq!(back["system"], "Be brief.");
    assert_eq!(back["max_tokens"], 64);
    assert_eq!(
        back["messages"],
        original["messages"]
            .clone()
            .as_array()
            .map(|m| {
                // The string content comes back as a text block.
                let mut m = m.clone();
                m[0]["content"] = json!([{"type": "text", "text": "Hi"}]);
                Value::Array(m)
            })
            .unwrap()
    );
    assert_eq!(back["tools"][0]["input_schema"], json!({"type": "object"}));
}

#[test]
fn thinking_blocks_and_unknown_blocks_are_refused_in_requests_and_dropped_from_answers() {
    let req = json!({"messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm"}]}]});
    assert!(anthropic::parse_request(&req).is_err());
    let answer = anthropic::parse_answer(&json!({
        "id": "msg", "content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "42"}],
        "stop_reason": "end_turn", "usage": {"input_tokens": 3, "output_tokens": 1},
    }));
    assert_eq!(answer.parts[0], Part::Reasoning("hmm".into()));
    let chat = openai_chat::render_answer(&answer, "m", 0);
    assert_eq!(chat["choices"][0]["message"]["content"], "42");
}

#[test]
fn cached_and_reasoning_tokens_are_read_from_both_dialects() {
    let anthropic = anthropic::parse_answer(&json!({"usage": {
        "input_tokens": 10, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 5, "output_tokens": 7,
    }}));
    assert_eq!(
        anthropic.usage,
        Usage {
            input: 115,
            output: 7,
            cached_input: Some(100),
            cache_write: Some(5),
            reasoning: None
        }
    );
    let openai = openai_chat::parse_answer(&json!({"usage": {
        "prompt_tokens": 115, "completion_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 100},
        "completion_tokens_details": {"reasoning_tokens": 3},
    }}));
    assert_eq!(openai.usage.cached_input, Some(100));
    assert_eq!(openai.usage.reasoning, Some(3));
    assert_eq!(openai.usage.total(), 122);
}

#[test]
fn stream_decoders_produce_the_same_canonical_events_for_the_same_answer() {
    let mut from_openai = openai_chat::StreamDecoder::default();
    let mut events_a = Vec::new();
    for data in [
        r#"{"id":"x","choices":[{"delta":{"content":"Hi"},"finish_reason":null}]}"#,
        r#"{"id":"x","choices":[{"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"f","arguments":""}}]},"finish_reason":null}]}"#,
        r#"{"id":"x","choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]},"finish_reason":"tool_calls"}]}"#,
        "[DONE]",
    ] {
        events_a.extend(
            from_openai
                .on_data(data)
                .into_iter()
                .filter(|e| !matches!(e, Event::Start { .. })),
        );
    }
    let mut from_anthropic = anthropic::StreamDecoder::default();
    let mut events_b = Vec::new();
    for (name, data) in [
        (
            "content_block_delta",
            json!({"index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
        ),
        (
            "content_block_start",
            json!({"index": 1, "content_block": {"type": "tool_use", "id": "c", "name": "f"}}),
        ),
        (
            "content_block_delta",
            json!({"index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
        ),
        (
            "message_delta",
            json!({"delta": {"stop_reason": "tool_use"}}),
        ),
        ("message_stop", json!({})),
    ] {
        events_b.extend(
            from_anthropic
                .on_event(name, &data)
                .into_iter()
                .filter(|e| !matches!(e, Event::Usage(_))),
        );
    }
    assert_eq!(events_a, events_b);
    assert!(events_a.contains(&Event::Finish(Some(Finish::ToolCalls))));
}
