//! The Responses API (`POST /v1/responses`) against three emulated upstreams that refuse
//! what the real APIs refuse: OpenAI, which speaks it (passed through), an
//! OpenAI-compatible server without it (translated to chat completions) and Anthropic
//! (translated to messages). Whole and streamed answers, function tools and their outputs,
//! structured output, stored state, and what a translated target cannot honour.

use crate::common;

use common::{Gateway, client};
use serde_json::{Value, json};
use tollgate_testkit::emulated::{self, Emulated, Flavor};

pub const KEY: &str = "tg_responsesTestsClientKey000000000000001";

/// The three upstreams and a gateway routing `gpt-native`, `gpt-chat` and `claude` to
/// them.
pub struct Bed {
    pub gw: Gateway,
    pub native: Emulated,
    pub chat_only: Emulated,
    pub anthropic: Emulated,
    _dir: tempfile::TempDir,
}

pub async fn bed(extra: &str) -> Bed {
    let native = Emulated::start(Flavor::OpenAi).await;
    let chat_only = Emulated::start(Flavor::ChatOnly).await;
    let anthropic = Emulated::start(Flavor::Anthropic).await;
    let dir = tempfile::tempdir().unwrap();
    let provider = |name: &str, kind: &str, url: &str, model: &str, upstream: &str| {
        format!(
            "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: {name}}}\nspec:\n  type: {kind}\n  baseUrl: {url}\n\
             \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n  models: [{{name: {model}, upstreamName: {upstream}, pricing: {{inputPerMillion: 1, outputPerMillion: 2}}}}]\n---\n\
             apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: {name}}}\nspec:\n  models: [{model}]\n  targets: [{{provider: {name}}}]\n  retries: {{attempts: 0}}\n---\n"
        )
    };
    let text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: up, labels: {{tollgate.dev/credential: 'true'}}}}\nstringData: {{token: {token}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: client-key}}\nstringData: {{apiKey: {KEY}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: client}}\nspec: {{owner: tests}}\n---\n{}{}{}{extra}",
        provider(
            "native",
            "openai",
            &native.base_url(),
            "gpt-native",
            "gpt-5-emulated"
        ),
        provider(
            "chatonly",
            "openaiCompatible",
            &chat_only.base_url(),
            "gpt-chat",
            "llama-emulated"
        ),
        provider(
            "claude",
            "anthropic",
            &anthropic.base_url(),
            "claude",
            "claude-emulated"
        ),
        token = emulated::API_KEY,
    );
    std::fs::write(dir.path().join("config.yaml"), text).unwrap();
    let gw = Gateway::start(&["--resources", dir.path().to_str().unwrap()]);
    Bed {
        gw,
        native,
        chat_only,
        anthropic,
        _dir: dir,
    }
}

pub const MODELS: [&str; 3] = ["gpt-native", "gpt-chat", "claude"];

async fn post(gw: &Gateway, body: &Value) -> reqwest::Response {
    client()
        .post(gw.url("/v1/responses"))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn create(gw: &Gateway, body: Value) -> (u16, Value) {
    let resp = post(gw, &body).await;
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A streamed create: the `(event, data)` pairs, checked to be well formed.
async fn stream(gw: &Gateway, mut body: Value) -> Vec<(String, Value)> {
    body["stream"] = json!(true);
    let resp = post(gw, &body).await;
    assert_eq!(resp.status(), 200);
    assert!(common::content_type(&resp).starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    assert!(!text.contains("[DONE]"), "the Responses API has no [DONE]");
    let mut events = Vec::new();
    for frame in text.split("\n\n").filter(|f| !f.trim().is_empty()) {
        let mut name = None;
        let mut data = String::new();
        for line in frame.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = Some(n.to_owned());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data.push_str(d);
            }
        }
        let data: Value = serde_json::from_str(&data).unwrap();
        let name = name.expect("every Responses event is named");
        assert_eq!(data["type"], name.as_str(), "{frame}");
        assert_eq!(
            data["sequence_number"],
            events.len(),
            "numbered in order: {frame}"
        );
        events.push((name, data));
    }
    events
}

fn output_text(response: &Value) -> String {
    response["output"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["text"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn a_plain_create_works_passed_through_or_translated_for_every_upstream() {
    let bed = bed("").await;
    for model in MODELS {
        let (status, response) = create(
            &bed.gw,
            json!({"model": model, "instructions": "Be brief.", "input": "Say hello", "max_output_tokens": 50}),
        )
        .await;
        assert_eq!(status, 200, "{model}: {response}");
        assert_eq!(response["object"], "response", "{model}");
        assert_eq!(response["status"], "completed", "{model}");
        assert!(
            response["id"].as_str().unwrap().starts_with("resp_"),
            "{model}"
        );
        assert_eq!(
            output_text(&response),
            "emulated reply to: Say hello",
            "{model}"
        );
        let usage = &response["usage"];
        assert!(
            usage["input_tokens"].as_u64().unwrap() > 0,
            "{model}: {usage}"
        );
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap(),
            "{model}"
        );
    }
    // Where each went, in its own dialect, with the upstream model name.
    let native = &bed.native.received()[0];
    assert_eq!(native.path_and_query, "/v1/responses");
    assert_eq!(native.json()["model"], "gpt-5-emulated");
    assert_eq!(native.json()["instructions"], "Be brief.");
    let chat = &bed.chat_only.received()[0];
    assert_eq!(chat.path_and_query, "/v1/chat/completions");
    assert_eq!(
        chat.json()["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(chat.json()["max_tokens"], 50);
    let claude = &bed.anthropic.received()[0];
    assert_eq!(claude.path_and_query, "/v1/messages");
    assert_eq!(claude.json()["system"], "Be brief.");
    assert_eq!(claude.json()["max_tokens"], 50);
}

#[tokio::test]
async fn streams_are_typed_events_ending_with_the_completed_response() {
    let bed = bed("").await;
    for model in MODELS {
        let events = stream(
            &bed.gw,
            json!({"model": model, "input": "Stream a greeting"}),
        )
        .await;
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[0], "response.created", "{model}: {names:?}");
        assert_eq!(names[1], "response.in_progress", "{model}: {names:?}");
        assert_eq!(
            *names.last().unwrap(),
            "response.completed",
            "{model}: {names:?}"
        );
        for expected in [
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
        ] {
            assert!(
                names.contains(&expected),
                "{model}: {expected} missing from {names:?}"
            );
        }
        let deltas: String = events
            .iter()
            .filter(|(n, _)| n == "response.output_text.delta")
            .map(|(_, d)| d["delta"].as_str().unwrap())
            .collect();
        assert_eq!(deltas, "emulated reply to: Stream a greeting", "{model}");
        let completed = &events.last().unwrap().1["response"];
        assert_eq!(output_text(completed), deltas, "{model}");
        assert!(
            completed["usage"]["output_tokens"].as_u64().unwrap() > 0,
            "{model}: {completed}"
        );
    }
}

#[tokio::test]
async fn function_tools_round_trip_through_every_upstream_whole_and_streamed() {
    let bed = bed("").await;
    let tools = json!([{
        "type": "function", "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": true,
    }]);
    for model in MODELS {
        for streamed in [false, true] {
            let first = json!({"model": model, "input": [{"role": "user", "content": "Use get_weather for Paris"}], "tools": tools});
            let response = if streamed {
                let events = stream(&bed.gw, first.clone()).await;
                let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
                assert!(
                    names.contains(&"response.function_call_arguments.delta"),
                    "{model}: {names:?}"
                );
                assert!(
                    names.contains(&"response.function_call_arguments.done"),
                    "{model}: {names:?}"
                );
                events.last().unwrap().1["response"].clone()
            } else {
                let (status, response) = create(&bed.gw, first.clone()).await;
                assert_eq!(status, 200, "{model}: {response}");
                response
            };
            let call = response["output"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["type"] == "function_call")
                .unwrap_or_else(|| panic!("{model}: no call in {response}"))
                .clone();
            assert_eq!(call["name"], "get_weather", "{model}");
            let arguments: Value =
                serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
            assert_eq!(arguments, json!({"city": "emulated"}), "{model}");
            // The whole conversation back, with the tool's output.
            let mut input = first["input"].as_array().unwrap().clone();
            input.push(call.clone());
            input.push(json!({"type": "function_call_output", "call_id": call["call_id"], "output": "18°C and sunny"}));
            let (status, answer) = create(
                &bed.gw,
                json!({"model": model, "input": input, "tools": tools}),
            )
            .await;
            assert_eq!(status, 200, "{model}: {answer}");
            assert_eq!(
                output_text(&answer),
                "the tool said: 18°C and sunny",
                "{model} streamed={streamed}"
            );
        }
    }
}

#[tokio::test]
async fn structured_output_reaches_every_upstream() {
    let bed = bed("").await;
    let format = json!({"type": "json_schema", "name": "person", "strict": true, "schema": {
        "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"], "additionalProperties": false}});
    for model in MODELS {
        let (status, response) = create(
            &bed.gw,
            json!({"model": model, "input": "Invent a person", "text": {"format": format}}),
        )
        .await;
        assert_eq!(status, 200, "{model}: {response}");
        let person: Value = serde_json::from_str(&output_text(&response)).unwrap();
        assert_eq!(person, json!({"name": "emulated", "age": 1}), "{model}");
        assert_eq!(
            response["text"]["format"]["name"], "person",
            "{model}: echoed"
        );
    }
    // Translated to chat completions' response_format.
    let sent = bed.chat_only.received()[0].json();
    assert_eq!(sent["response_format"]["type"], "json_schema");
    assert_eq!(sent["response_format"]["json_schema"]["name"], "person");
    // Anthropic has none: a tool the model must call, with the schema as parameters.
    let sent = bed.anthropic.received()[0].json();
    assert_eq!(
        sent["tool_choice"],
        json!({"type": "tool", "name": "json_answer"})
    );
    assert_eq!(sent["tools"][0]["input_schema"], format["schema"]);

    // Streamed, the tool's call arrives as output text; the client never sees the tool.
    let events = stream(
        &bed.gw,
        json!({"model": "claude", "input": "Invent a person", "text": {"format": format}}),
    )
    .await;
    let (_, completed) = events.last().unwrap();
    assert_eq!(completed["type"], "response.completed");
    assert_eq!(
        serde_json::from_str::<Value>(&output_text(&completed["response"])).unwrap(),
        json!({"name": "emulated", "age": 1})
    );
    assert!(
        events
            .iter()
            .all(|(name, _)| !name.contains("function_call")),
        "{events:?}"
    );

    // A chat completions client with tools of its own: first the tool it asked for, then,
    // after its result, the structured answer.
    let weather = json!({"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}});
    let response_format = json!({"type": "json_schema", "json_schema": {"name": "person", "schema": format["schema"]}});
    let mut messages = vec![json!({"role": "user", "content": "Use get_weather for Paris"})];
    let chat = |messages: &Vec<Value>| {
        client()
            .post(bed.gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&json!({"model": "claude", "messages": messages, "tools": [weather], "response_format": response_format}))
            .send()
    };
    let first: Value = chat(&messages).await.unwrap().json().await.unwrap();
    let call = &first["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather", "{first}");
    assert_eq!(first["choices"][0]["finish_reason"], "tool_calls");
    messages.push(first["choices"][0]["message"].clone());
    messages.push(json!({"role": "tool", "tool_call_id": call["id"], "content": "sunny"}));
    let second: Value = chat(&messages).await.unwrap().json().await.unwrap();
    assert_eq!(second["choices"][0]["finish_reason"], "stop", "{second}");
    let content = second["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(content).unwrap(),
        json!({"name": "emulated", "age": 1})
    );
    assert!(
        second["choices"][0]["message"]["tool_calls"].is_null(),
        "{second}"
    );
    let sent = bed.anthropic.received().last().unwrap().json();
    assert_eq!(sent["tool_choice"], json!({"type": "any"}));
}

#[tokio::test]
async fn stored_state_works_where_the_upstream_keeps_it_and_is_refused_clearly_elsewhere() {
    let bed = bed("").await;
    let (status, first) = create(
        &bed.gw,
        json!({"model": "gpt-native", "input": "Remember: blue"}),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = create(
        &bed.gw,
        json!({"model": "gpt-native", "previous_response_id": first["id"], "input": "What did I say?"}),
    )
    .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(bed.native.stored(), 2);
    // A translated target keeps no state: a clear 400 before anything is sent upstream.
    for model in ["gpt-chat", "claude"] {
        let (status, error) = create(
            &bed.gw,
            json!({"model": model, "previous_response_id": first["id"], "input": "And now?"}),
        )
        .await;
        assert_eq!(status, 400, "{model}: {error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("previous_response_id"), "{message}");
        assert!(message.contains("Responses API"), "{message}");
    }
    assert!(bed.chat_only.received().is_empty());
    assert!(bed.anthropic.received().is_empty());
}

#[tokio::test]
async fn what_a_translated_target_cannot_do_is_refused_with_a_reason() {
    let bed = bed("").await;
    for (body, says) in [
        (
            json!({"model": "gpt-chat", "input": "Search", "tools": [{"type": "web_search"}], "tool_choice": {"type": "web_search"}}),
            "web_search",
        ),
        (
            json!({"model": "claude", "input": [{"type": "item_reference", "id": "msg_1"}]}),
            "item_reference",
        ),
        (
            json!({"model": "claude", "input": [{"type": "computer_call", "id": "c"}]}),
            "computer_call",
        ),
        (json!({"model": "gpt-chat", "input": 42}), "input"),
    ] {
        let (status, error) = create(&bed.gw, body.clone()).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
        assert!(
            error["error"]["message"].as_str().unwrap().contains(says),
            "{error}"
        );
    }
    // Offered, not required, a hosted tool is left out of a translated request (the model
    // answers with what it has) and passes through to the upstream that hosts it; the
    // function tools of a `namespace` are offered one by one.
    for model in MODELS {
        let (status, response) = create(
            &bed.gw,
            json!({"model": model, "input": "Search", "tools": [
                {"type": "web_search"},
                {"type": "namespace", "name": "agents", "tools": [{"type": "function", "name": "spawn", "parameters": {"type": "object"}}]},
            ]}),
        )
        .await;
        assert_eq!(status, 200, "{model}: {response}");
    }
    let native = bed.native.received().pop().unwrap().json();
    assert_eq!(native["tools"][0]["type"], "web_search");
    let chat = bed.chat_only.received().pop().unwrap().json();
    assert_eq!(chat["tools"].as_array().unwrap().len(), 1, "{chat}");
    assert_eq!(chat["tools"][0]["function"]["name"], "spawn");
}

/// A second key, in another namespace, routed to the same Provider.
const OTHER_KEY: &str = "tg_responsesTestsOtherTeamKey000000000001";

fn other_team() -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: other-key, namespace: other}}\nstringData: {{apiKey: {OTHER_KEY}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: other, namespace: other}}\nspec: {{owner: intruders, sharedRoutesFrom: [default]}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: shared, namespace: default}}\nspec:\n  models: [gpt-shared]\n  targets: [{{provider: native, model: gpt-native}}]\n  sharedWith: [other]\n---\n"
    )
}

async fn as_key(
    gw: &Gateway,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client().request(method, gw.url(path)).bearer_auth(key);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_stored_response_is_its_owners_alone_to_read_delete_or_continue() {
    let bed = bed(&other_team()).await;
    let (status, mine) = create(
        &bed.gw,
        json!({"model": "gpt-shared", "input": "My secret plan"}),
    )
    .await;
    assert_eq!(status, 200, "{mine}");
    let id = mine["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/responses/{id}");

    // The owner reads it back, with its input items, through the Provider that stores it.
    let (status, fetched) = as_key(&bed.gw, KEY, reqwest::Method::GET, &path, None).await;
    assert_eq!(status, 200, "{fetched}");
    assert_eq!(fetched["id"], id.as_str());
    let (status, items) = as_key(
        &bed.gw,
        KEY,
        reqwest::Method::GET,
        &format!("{path}/input_items?limit=10"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{items}");
    assert_eq!(items["data"][0]["content"][0]["text"], "My secret plan");

    // Another team that shares the route, hence the Provider and its credential, learns
    // nothing of it: not its content, not that it exists.
    let before = bed.native.received().len();
    for (method, path) in [
        (reqwest::Method::GET, path.clone()),
        (reqwest::Method::GET, format!("{path}/input_items")),
        (reqwest::Method::DELETE, path.clone()),
    ] {
        let (status, error) = as_key(&bed.gw, OTHER_KEY, method.clone(), &path, None).await;
        assert_eq!(status, 404, "{method} {path}: {error}");
        assert_eq!(error["error"]["code"], "response_not_found");
        assert!(!error.to_string().contains("secret plan"));
    }
    let (status, error) = as_key(
        &bed.gw,
        OTHER_KEY,
        reqwest::Method::POST,
        "/v1/responses",
        Some(json!({"model": "gpt-shared", "previous_response_id": id, "input": "What was the plan?"})),
    )
    .await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["code"], "previous_response_not_found");
    assert_eq!(
        bed.native.received().len(),
        before,
        "none of it reached the upstream"
    );

    // Ids never stored here, and anything that is not a response id, are unknown too.
    for bogus in ["resp_neverstored", "..%2F..%2Fmodels", "msg_1"] {
        let (status, _) = as_key(
            &bed.gw,
            KEY,
            reqwest::Method::GET,
            &format!("/v1/responses/{bogus}"),
            None,
        )
        .await;
        assert_eq!(status, 404, "{bogus}");
    }

    // The owner continues, then deletes; after that it is gone for the owner too.
    let (status, next) = as_key(
        &bed.gw,
        KEY,
        reqwest::Method::POST,
        "/v1/responses",
        Some(json!({"model": "gpt-shared", "previous_response_id": id, "input": "Go on"})),
    )
    .await;
    assert_eq!(status, 200, "{next}");
    assert_eq!(
        bed.native.received().last().unwrap().json()["previous_response_id"],
        id.as_str()
    );
    let (status, deleted) = as_key(&bed.gw, KEY, reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(deleted["deleted"], true);
    let (status, _) = as_key(&bed.gw, KEY, reqwest::Method::GET, &path, None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_response_stored_with_store_false_is_not_recorded() {
    let bed = bed("").await;
    let (status, response) = create(
        &bed.gw,
        json!({"model": "gpt-native", "input": "Ephemeral", "store": false}),
    )
    .await;
    assert_eq!(status, 200, "{response}");
    let (status, _) = as_key(
        &bed.gw,
        KEY,
        reqwest::Method::GET,
        &format!("/v1/responses/{}", response["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(status, 404);
}
