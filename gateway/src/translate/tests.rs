use serde_json::json;

use super::*;

#[test]
fn system_prompts_become_the_anthropic_system_field_and_turns_alternate() {
    let req = json!({
        "model": "chat",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
            {"role": "user", "content": "Bonjour"},
            {"role": "user", "content": [{"type": "text", "text": "Ça va ?"}]},
        ],
        "temperature": 0.2,
        "stop": "FIN",
    });
    let out = openai_to_anthropic_request(&req, "claude-x").unwrap();
    assert_eq!(out["model"], "claude-x");
    assert_eq!(out["system"], "Be brief.\n\nUse French.");
    assert_eq!(
        out["max_tokens"], DEFAULT_MAX_TOKENS,
        "Anthropic requires max_tokens"
    );
    assert_eq!(
        out["messages"].as_array().unwrap().len(),
        1,
        "consecutive user turns merge"
    );
    assert_eq!(out["messages"][0]["content"].as_array().unwrap().len(), 2);
    assert_eq!(out["stop_sequences"], json!(["FIN"]));
    assert_eq!(out["temperature"], 0.2);
}

#[test]
fn images_tool_calls_and_tool_results_translate_to_blocks() {
    let req = json!({
        "model": "m",
        "max_completion_tokens": 50,
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":\"cat\"}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
        ],
        "tools": [{"type": "function", "function": {"name": "lookup", "description": "Search", "parameters": {"type": "object"}}}],
        "tool_choice": "required",
    });
    let out = openai_to_anthropic_request(&req, "m").unwrap();
    assert_eq!(out["max_tokens"], 50);
    let user = &out["messages"][0]["content"];
    assert_eq!(
        user[1]["source"],
        json!({"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="})
    );
    assert_eq!(
        user[2]["source"],
        json!({"type": "url", "url": "https://example.com/cat.jpg"})
    );
    assert_eq!(
        out["messages"][1]["content"][0],
        json!({"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"q": "cat"}})
    );
    assert_eq!(out["messages"][2]["role"], "user");
    assert_eq!(out["messages"][2]["content"][0]["type"], "tool_result");
    assert_eq!(
        out["tools"][0],
        json!({"name": "lookup", "description": "Search", "input_schema": {"type": "object"}})
    );
    assert_eq!(out["tool_choice"], json!({"type": "any"}));
}

#[test]
fn untranslatable_requests_are_refused_with_a_reason() {
    assert!(openai_to_anthropic_request(&json!({"messages": [], "n": 2}), "m").is_err());
    assert!(
        openai_to_anthropic_request(
            &json!({"messages": [{"role": "alien", "content": "x"}]}),
            "m"
        )
        .is_err()
    );
    assert!(
        openai_to_anthropic_request(
            &json!({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
            "m"
        )
        .is_err()
    );
}

#[test]
fn anthropic_messages_become_openai_completions_with_usage_and_stop_reasons() {
    let msg = json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [{"type": "text", "text": "Hi"}, {"type": "tool_use", "id": "tu_1", "name": "f", "input": {"a": 1}}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 10, "output_tokens": 4, "cache_read_input_tokens": 5},
    });
    let out = anthropic_to_openai_response(&msg, "chat", 7);
    assert_eq!(out["model"], "chat");
    assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(out["choices"][0]["message"]["content"], "Hi");
    assert_eq!(
        out["choices"][0]["message"]["tool_calls"][0]["function"],
        json!({"name": "f", "arguments": "{\"a\":1}"})
    );
    assert_eq!(
        out["usage"],
        json!({"prompt_tokens": 15, "completion_tokens": 4, "total_tokens": 19, "prompt_tokens_details": {"cached_tokens": 5}})
    );
    for (anthropic, openai) in [
        ("end_turn", "stop"),
        ("max_tokens", "length"),
        ("stop_sequence", "stop"),
    ] {
        let m = json!({"content": [], "stop_reason": anthropic, "usage": {}});
        assert_eq!(
            anthropic_to_openai_response(&m, "x", 0)["choices"][0]["finish_reason"],
            openai
        );
    }
}

#[test]
fn anthropic_stream_events_become_openai_chunks_ending_in_usage_and_done() {
    let mut t = AnthropicToOpenAiStream::new("chat", 1, true);
    let mut payloads = Vec::new();
    for (event, data) in [
        (
            "message_start",
            json!({"message": {"id": "msg_1", "usage": {"input_tokens": 12}}}),
        ),
        (
            "content_block_start",
            json!({"index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping", json!({})),
        (
            "content_block_delta",
            json!({"index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
        ),
        (
            "content_block_delta",
            json!({"index": 0, "delta": {"type": "text_delta", "text": "lo"}}),
        ),
        (
            "content_block_start",
            json!({"index": 1, "content_block": {"type": "tool_use", "id": "tu", "name": "f"}}),
        ),
        (
            "content_block_delta",
            json!({"index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
        ),
        (
            "message_delta",
            json!({"delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
        ),
        ("message_stop", json!({})),
    ] {
        payloads.extend(t.on_event(event, &data));
    }
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello");
    assert_eq!(
        chunks[3]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"],
        "f"
    );
    assert_eq!(
        chunks[4]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"],
        "{\"a\":"
    );
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21})
    );
}

#[test]
fn anthropic_requests_become_openai_requests() {
    let req = json!({
        "model": "gpt",
        "system": [{"type": "text", "text": "Be kind."}],
        "max_tokens": 64,
        "stream": true,
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "tu", "name": "f", "input": {"x": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu", "content": [{"type": "text", "text": "42"}]}]},
        ],
        "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": "f"},
    });
    let out = anthropic_to_openai_request(&req, "gpt-4o").unwrap();
    assert_eq!(
        out["messages"][0],
        json!({"role": "system", "content": "Be kind."})
    );
    assert_eq!(out["messages"][1], json!({"role": "user", "content": "Hi"}));
    assert_eq!(
        out["messages"][2]["tool_calls"][0]["function"]["arguments"],
        "{\"x\":1}"
    );
    assert_eq!(
        out["messages"][3],
        json!({"role": "tool", "tool_call_id": "tu", "content": "42"})
    );
    assert_eq!(out["stream_options"], json!({"include_usage": true}));
    assert_eq!(
        out["tool_choice"],
        json!({"type": "function", "function": {"name": "f"}})
    );
    assert_eq!(out["max_tokens"], 64);
}

#[test]
fn openai_completions_become_anthropic_messages() {
    let resp = json!({
        "id": "chatcmpl-1",
        "choices": [{"message": {"role": "assistant", "content": "Yes", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    });
    let out = openai_to_anthropic_response(&resp, "claude-alias");
    assert_eq!(out["type"], "message");
    assert_eq!(out["model"], "claude-alias");
    assert_eq!(out["stop_reason"], "max_tokens");
    assert_eq!(out["content"][0], json!({"type": "text", "text": "Yes"}));
    assert_eq!(out["content"][1]["type"], "tool_use");
    assert_eq!(out["usage"], json!({"input_tokens": 3, "output_tokens": 1}));
}

#[test]
fn openai_chunks_become_anthropic_events_in_protocol_order() {
    let mut t = OpenAiToAnthropicStream::new("claude-alias");
    let mut events = Vec::new();
    for data in [
        r#"{"id":"c1","choices":[{"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
        r#"{"id":"c1","choices":[{"delta":{"content":"Hel"},"finish_reason":null}]}"#,
        r#"{"id":"c1","choices":[{"delta":{"content":"lo"},"finish_reason":null}]}"#,
        r#"{"id":"c1","choices":[{"delta":{},"finish_reason":"stop"}]}"#,
        r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}"#,
        "[DONE]",
    ] {
        events.extend(t.on_data(data));
    }
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(events[5].1["delta"]["stop_reason"], "end_turn");
    assert_eq!(events[5].1["usage"]["output_tokens"], 2);
}

#[test]
fn error_bodies_translate_between_dialects() {
    let openai = json!({"error": {"message": "no such model", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}});
    assert_eq!(
        openai_error_to_anthropic(&openai, 404),
        json!({"type": "error", "error": {"type": "not_found_error", "message": "no such model"}})
    );
    let anthropic =
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
    assert_eq!(
        anthropic_error_to_openai(&anthropic)["error"]["message"],
        "Overloaded"
    );
}
