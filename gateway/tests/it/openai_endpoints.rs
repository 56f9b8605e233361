//! The OpenAI endpoints forwarded as they are — `/v1/moderations`,
//! `/v1/images/generations`, `/v1/audio/speech` (binary and event-stream answers) and
//! `/v1/audio/transcriptions` (multipart uploads) — against an emulated OpenAI that
//! refuses what the real one refuses: key auth, allow-lists, request limits, usage and
//! spend where the upstream reports tokens, metrics, Providers that do not serve an
//! endpoint, and the uploads and prompts a hostile key holder would send.

use crate::common;

use common::{Gateway, client, metric};
use serde_json::{Value, json};
use tollgate_testkit::emulated::{self, Emulated, Flavor, media};

pub const KEY: &str = "tg_openaiEndpointsTestsClientKey00000000001";
/// Allowed `tts` and `transcribe` only, two requests a minute.
const LIMITED: &str = "tg_openaiEndpointsTestsLimitedKey0000000001";

const IMAGE_PRICES: &str = "{inputPerMillion: 5, outputPerMillion: 40}";
const TRANSCRIBE_PRICES: &str = "{inputPerMillion: 6, outputPerMillion: 10}";

pub struct Bed {
    pub gw: Gateway,
    openai: Emulated,
    compat: Emulated,
    _dir: tempfile::TempDir,
}

pub async fn bed(args: &[&str]) -> Bed {
    let openai = Emulated::start(Flavor::OpenAi).await;
    // An OpenAI-compatible server that declares none of these endpoints.
    let compat = Emulated::start(Flavor::OpenAi).await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: up, labels: {{tollgate.dev/credential: 'true'}}}}\nstringData: {{token: {token}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: client-key}}\nstringData: {{apiKey: {KEY}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: client}}\nspec: {{owner: tests, budget: {{amount: 100, period: monthly}}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: limited-key}}\nstringData: {{apiKey: {LIMITED}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: limited}}\nspec: {{owner: others, allowedModels: [tts, transcribe], limits: {{requestsPerMinute: 2}}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: openai}}\nspec:\n  type: openai\n  baseUrl: {openai}\n\
         \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n  models:\n\
         \x20 - {{name: omni-moderation-latest}}\n\
         \x20 - {{name: gpt-image, upstreamName: gpt-image-1, pricing: {IMAGE_PRICES}}}\n\
         \x20 - {{name: dall-e-2}}\n\
         \x20 - {{name: tts, upstreamName: gpt-4o-mini-tts}}\n\
         \x20 - {{name: transcribe, upstreamName: gpt-4o-transcribe, pricing: {TRANSCRIBE_PRICES}}}\n\
         \x20 - {{name: whisper-1}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: compat}}\nspec:\n  type: openaiCompatible\n  baseUrl: {compat}\n\
         \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n  models: [{{name: tts, upstreamName: gpt-4o-mini-tts}}]\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: media}}\nspec:\n  models: [omni-moderation-latest, dall-e-2, whisper-1]\n  targets: [{{provider: openai}}]\n  retries: {{attempts: 0}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: images}}\nspec:\n  models: [gpt-image]\n  targets: [{{provider: openai}}]\n\
         \x20 guardrails: [{{name: no-keys, detector: secret, action: block}}]\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: transcribe}}\nspec:\n  models: [transcribe]\n  targets: [{{provider: openai}}]\n\
         \x20 guardrails: [{{name: emails, detector: email, action: redact}}]\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: tts}}\nspec:\n  models: [tts]\n\
         \x20 targets: [{{provider: compat, priority: 0}}, {{provider: openai, priority: 1}}]\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: compat-tts}}\nspec:\n  models: [compat-tts]\n  targets: [{{provider: compat, model: tts}}]\n---\n",
        token = emulated::API_KEY,
        openai = openai.base_url(),
        compat = compat.base_url(),
    );
    std::fs::write(dir.path().join("config.yaml"), text).unwrap();
    let mut all = vec!["--resources", dir.path().to_str().unwrap()];
    all.extend_from_slice(args);
    let gw = Gateway::start(&all);
    Bed {
        gw,
        openai,
        compat,
        _dir: dir,
    }
}

async fn post_json(gw: &Gateway, key: &str, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(gw.url(path))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// A multipart body, by hand (hostile ones included): `(name, file name, bytes)`.
fn form(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "----clientBoundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (name, file, data) in parts {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"").as_bytes(),
        );
        if let Some(file) = file {
            body.extend_from_slice(
                format!("; filename=\"{file}\"\r\nContent-Type: audio/wav").as_bytes(),
            );
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn upload(gw: &Gateway, key: &str, content_type: &str, body: Vec<u8>) -> reqwest::Response {
    client()
        .post(gw.url("/v1/audio/transcriptions"))
        .bearer_auth(key)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// The fields of a multipart body the emulated upstream received: `(name, file name,
/// text)`.
async fn fields_of(
    received: &tollgate_testkit::upstream::Received,
) -> Vec<(String, Option<String>, Vec<u8>)> {
    let content_type = emulated::header(received, "content-type").unwrap();
    let boundary = multer::parse_boundary(&content_type).unwrap();
    let body = received.body.clone();
    let source = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut multipart = multer::Multipart::new(source, boundary);
    let mut out = Vec::new();
    while let Some(field) = multipart.next_field().await.unwrap() {
        let name = field.name().unwrap().to_owned();
        let file = field.file_name().map(str::to_owned);
        out.push((name, file, field.bytes().await.unwrap().to_vec()));
    }
    out
}

/// The data of the last event of an event stream.
fn last_event(text: &str) -> Value {
    let data = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .next_back();
    serde_json::from_str(data.expect("an event")).unwrap()
}

fn audio() -> Vec<u8> {
    let mut wav = b"RIFF\x24\x08\x00\x00WAVEfmt ".to_vec();
    wav.extend((0..20_000u32).map(|i| (i % 251) as u8));
    wav
}

#[tokio::test]
async fn each_endpoint_is_passed_through_with_the_upstream_model_and_its_usage_billed() {
    let bed = bed(&[]).await;
    let gw = &bed.gw;

    // Moderations: no model is OpenAI's default, which routes; input as text parts.
    let resp = post_json(
        gw,
        KEY,
        "/v1/moderations",
        &json!({"input": ["hello", {"type": "text", "text": "I will kill the process"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["results"][0]["flagged"], false);
    assert_eq!(answer["results"][1]["flagged"], true);
    let sent = emulated::body_json(bed.openai.received().last().unwrap());
    assert!(
        sent.get("model").is_none(),
        "sent as the client sent it: {sent}"
    );

    // Images, whole: renamed for the upstream, answer relayed with its usage.
    let resp = post_json(
        gw,
        KEY,
        "/v1/images/generations",
        &json!({"model": "gpt-image", "prompt": "a lighthouse", "n": 2, "size": "1024x1024"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(common::content_type(&resp), "application/json");
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["data"].as_array().unwrap().len(), 2);
    let image_usage = answer["usage"].clone();
    assert_eq!(
        emulated::body_json(bed.openai.received().last().unwrap())["model"],
        "gpt-image-1"
    );

    // Images, streamed: the partial and completed events as the upstream sent them.
    let resp = post_json(gw, KEY, "/v1/images/generations", &json!({"model": "gpt-image", "prompt": "a lighthouse", "stream": true, "partial_images": 1})).await;
    assert_eq!(resp.status(), 200);
    assert!(common::content_type(&resp).starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("event: image_generation.partial_image"),
        "{text}"
    );
    let completed: Value = last_event(&text);
    assert_eq!(completed["type"], "image_generation.completed");
    let streamed_usage = completed["usage"].clone();

    // A model without token usage (dall-e-2), no model at all: OpenAI's default.
    let resp = post_json(
        gw,
        KEY,
        "/v1/images/generations",
        &json!({"prompt": "a cat"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.json::<Value>().await.unwrap().get("usage").is_none());

    // Speech: audio bytes, streamed through unchanged, with the upstream's content type.
    let input = "The gateway relays audio as it arrives.";
    let resp = post_json(
        gw,
        KEY,
        "/v1/audio/speech",
        &json!({"model": "tts", "input": input, "voice": "alloy", "response_format": "wav"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(common::content_type(&resp), "audio/wav");
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        media::speech_audio(input).as_slice()
    );
    // As events, when asked.
    let resp = post_json(
        gw,
        KEY,
        "/v1/audio/speech",
        &json!({"model": "tts", "input": "hi", "voice": "alloy", "stream_format": "sse"}),
    )
    .await;
    assert!(common::content_type(&resp).starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    assert!(text.contains("speech.audio.delta") && text.contains("speech.audio.done"));
    // The upstream's refusal, in OpenAI's shape.
    let resp = post_json(
        gw,
        KEY,
        "/v1/audio/speech",
        &json!({"model": "tts", "input": "hi"}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let error: Value = resp.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("voice"),
        "{error}"
    );

    // Transcriptions: the upload re-encoded with the upstream model.
    let wav = audio();
    let (content_type, body) = form(&[
        ("file", Some("meeting.wav"), &wav),
        ("model", None, b"transcribe"),
        ("timestamp_granularities[]", None, b"word"),
        ("timestamp_granularities[]", None, b"segment"),
    ]);
    let resp = upload(gw, KEY, &content_type, body).await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(
        answer["text"],
        format!(
            "emulated transcript of {} bytes from meeting.wav",
            wav.len()
        )
    );
    let transcribe_usage = answer["usage"].clone();
    let fields = fields_of(bed.openai.received().last().unwrap()).await;
    assert_eq!(
        fields.iter().map(|(n, ..)| n.as_str()).collect::<Vec<_>>(),
        [
            "file",
            "model",
            "timestamp_granularities[]",
            "timestamp_granularities[]"
        ]
    );
    assert_eq!(fields[0].2, wav, "the audio arrives byte for byte");
    assert_eq!(fields[1].2, b"gpt-4o-transcribe");
    // As text, and streamed.
    let (content_type, body) = form(&[
        ("file", Some("a.wav"), &wav),
        ("model", None, b"whisper-1"),
        ("response_format", None, b"text"),
    ]);
    let resp = upload(gw, KEY, &content_type, body).await;
    assert_eq!(resp.status(), 200);
    assert!(common::content_type(&resp).starts_with("text/plain"));
    assert!(
        resp.text()
            .await
            .unwrap()
            .starts_with("emulated transcript")
    );
    let (content_type, body) = form(&[
        ("file", Some("a.wav"), &wav),
        ("model", None, b"transcribe"),
        ("stream", None, b"true"),
    ]);
    let resp = upload(gw, KEY, &content_type, body).await;
    assert!(common::content_type(&resp).starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    let done: Value = last_event(&text);
    assert_eq!(done["type"], "transcript.text.done");
    let streamed_transcribe_usage = done["usage"].clone();

    // Spend: the image and transcription tokens at their models' prices.
    let tokens = |u: &Value| {
        (
            u["input_tokens"].as_f64().unwrap(),
            u["output_tokens"].as_f64().unwrap(),
        )
    };
    let mut expected = 0.0;
    for u in [&image_usage, &streamed_usage] {
        let (i, o) = tokens(u);
        expected += (i * 5.0 + o * 40.0) / 1e6;
    }
    for u in [&transcribe_usage, &streamed_transcribe_usage] {
        let (i, o) = tokens(u);
        expected += (i * 6.0 + o * 10.0) / 1e6;
    }
    let usage = common::usage_after(gw, KEY, 11).await;
    let spent = usage["budget"]["spent"].as_f64().unwrap();
    // The unpriced models (moderation, dall-e-2, tts, whisper-1) cost nothing.
    assert!(
        (spent - expected).abs() < 1e-9,
        "spent {spent}, expected {expected}: {usage}"
    );
    let metrics = gw.metrics().await;
    for (operation, count) in [
        ("moderations", 1.0),
        ("images_generations", 3.0),
        ("audio_speech", 3.0),
        ("audio_transcriptions", 3.0),
    ] {
        assert_eq!(
            metric(
                &metrics,
                &format!("tollgate_requests_total{{operation=\"{operation}\"")
            ),
            count,
            "{operation}"
        );
    }
    assert!(
        metric(
            &metrics,
            "tollgate_tokens_total{route=\"default/images\",provider=\"default/openai\",model=\"gpt-image\",owner=\"tests\",kind=\"output\"}"
        ) > 0.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn endpoints_go_only_to_providers_that_declare_them() {
    let bed = bed(&[]).await;
    // `tts` lists the compatible server first; it does not serve speech: skipped, no call.
    let resp = post_json(
        &bed.gw,
        KEY,
        "/v1/audio/speech",
        &json!({"model": "tts", "input": "hi", "voice": "alloy"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        media::speech_audio("hi").as_slice()
    );
    // A route to it alone: a clear refusal, still no call.
    let resp = post_json(
        &bed.gw,
        KEY,
        "/v1/audio/speech",
        &json!({"model": "compat-tts", "input": "hi", "voice": "alloy"}),
    )
    .await;
    assert_eq!(resp.status(), 501);
    let error: Value = resp.json().await.unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("audio_speech") && message.contains("spec.apis"),
        "{message}"
    );
    assert!(
        bed.compat.received().is_empty(),
        "nothing reached the server that does not declare it"
    );
    // Unknown OpenAI paths stay OpenAI-shaped 404s.
    for path in [
        "/v1/images/edits",
        "/v1/audio/translations",
        "/v1/moderations/x",
    ] {
        let resp = post_json(&bed.gw, KEY, path, &json!({"model": "tts"})).await;
        assert_eq!(resp.status(), 404, "{path}");
        let error: Value = resp.json().await.unwrap();
        assert_eq!(
            error["error"]["type"], "invalid_request_error",
            "{path}: {error}"
        );
    }
}

#[tokio::test]
async fn keys_allow_lists_and_request_limits_apply() {
    let bed = bed(&[]).await;
    let gw = &bed.gw;
    let calls = || bed.openai.received().len();
    // No key, a wrong key.
    let resp = client()
        .post(gw.url("/v1/moderations"))
        .json(&json!({"input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = post_json(
        gw,
        "tg_notAKeyAtAll000000000000000000000000000",
        "/v1/audio/speech",
        &json!({"model": "tts", "input": "x", "voice": "alloy"}),
    )
    .await;
    assert_eq!(resp.status(), 401);
    // Outside the key's allow-list, whichever endpoint, the default model included.
    for (path, body) in [
        (
            "/v1/images/generations",
            json!({"model": "gpt-image", "prompt": "x"}),
        ),
        ("/v1/images/generations", json!({"prompt": "x"})),
        ("/v1/moderations", json!({"input": "x"})),
    ] {
        let resp = post_json(gw, LIMITED, path, &body).await;
        assert_eq!(resp.status(), 403, "{path} {body}");
    }
    let wav = audio();
    let (content_type, body) =
        form(&[("file", Some("a.wav"), &wav), ("model", None, b"whisper-1")]);
    assert_eq!(upload(gw, LIMITED, &content_type, body).await.status(), 403);
    assert_eq!(calls(), 0);
    // Two requests a minute, counted across endpoints.
    let resp = post_json(
        gw,
        LIMITED,
        "/v1/audio/speech",
        &json!({"model": "tts", "input": "x", "voice": "alloy"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let (content_type, body) = form(&[
        ("file", Some("a.wav"), &wav),
        ("model", None, b"transcribe"),
    ]);
    assert_eq!(
        upload(gw, LIMITED, &content_type, body.clone())
            .await
            .status(),
        200
    );
    let resp = upload(gw, LIMITED, &content_type, body).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(calls(), 2);
}

#[tokio::test]
async fn hostile_uploads_are_refused_before_any_upstream_call() {
    let bed = bed(&["--max-upload-bytes", "65536"]).await;
    let gw = &bed.gw;
    let wav = audio();
    let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = {
        let mut cases = Vec::new();
        // Two models: the gateway would authorise one while the upstream served the other.
        let (ct, body) = form(&[
            ("model", None, b"whisper-1"),
            ("file", Some("a.wav"), &wav),
            ("model", None, b"transcribe"),
        ]);
        cases.push(("two models", ct, body, 400, "more than once"));
        let (ct, body) = form(&[
            ("file", Some("a.wav"), &vec![7u8; 70_000]),
            ("model", None, b"whisper-1"),
        ]);
        cases.push(("over --max-upload-bytes", ct, body, 413, "65536"));
        let (_, body) = form(&[("file", Some("a.wav"), &wav), ("model", None, b"whisper-1")]);
        cases.push((
            "JSON content type",
            "application/json".to_owned(),
            body.clone(),
            400,
            "multipart/form-data",
        ));
        cases.push((
            "no boundary",
            "multipart/form-data".to_owned(),
            body.clone(),
            400,
            "boundary",
        ));
        cases.push((
            "another boundary",
            "multipart/form-data; boundary=nope".to_owned(),
            body.clone(),
            400,
            "could not be read",
        ));
        let (ct, mut cut) = form(&[("file", Some("a.wav"), &wav), ("model", None, b"whisper-1")]);
        cut.truncate(cut.len() - 30);
        cases.push(("cut short", ct, cut, 400, "could not be read"));
        let (ct, body) = form(&[("model", None, b"whisper-1")]);
        cases.push(("no file", ct, body, 400, "file"));
        let (ct, body) = form(&[("file", Some("a.wav"), &wav)]);
        cases.push(("no model", ct, body, 400, "model"));
        let (ct, body) = form(&[
            ("file", Some("a.wav"), &wav),
            ("model", None, b"no-such-model"),
        ]);
        cases.push(("unrouted model", ct, body, 404, "no-such-model"));
        let (ct, body) = form(&[
            ("file", Some("a.wav"), &wav),
            ("model", None, b"whisper-1"),
            ("prompt\"; filename=\"x", None, b"p"),
        ]);
        cases.push((
            "a text field sent as a file",
            ct,
            body,
            400,
            "Only the `file` part",
        ));
        let (ct, body) = form(&[
            ("file", Some("a.wav"), &wav),
            ("model", None, b"whisper-1"),
            ("bad name", None, b"p"),
        ]);
        cases.push((
            "a name with a space",
            ct,
            body,
            400,
            "not one this API uses",
        ));
        let names: Vec<String> = (0..70).map(|i| format!("f{i}")).collect();
        let mut parts: Vec<(&str, Option<&str>, &[u8])> =
            vec![("file", Some("a.wav"), &wav), ("model", None, b"whisper-1")];
        parts.extend(names.iter().map(|n| (n.as_str(), None, &b"1"[..])));
        let (ct, body) = form(&parts);
        cases.push(("too many parts", ct, body, 400, "parts"));
        cases
    };
    for (what, content_type, body, status, says) in cases {
        let resp = upload(gw, KEY, &content_type, body).await;
        assert_eq!(resp.status(), status, "{what}");
        let error: Value = resp.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{what}: {error}");
    }
    assert!(
        bed.openai.received().is_empty(),
        "no hostile upload reached the upstream"
    );

    // A file name crafted to end its header and add a model part reaches the upstream as
    // a file name, escaped; the model is the one routed.
    let (ct, body) = form(&[
        (
            "file",
            Some("a.wav\"\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ndall-e-2"),
            &wav,
        ),
        ("model", None, b"whisper-1"),
    ]);
    let resp = upload(gw, KEY, &ct, body).await;
    // multer reads the quoted name up to its closing quote: either refused or escaped.
    if resp.status() == 200 {
        let fields = fields_of(bed.openai.received().last().unwrap()).await;
        let models: Vec<_> = fields.iter().filter(|(n, ..)| n == "model").collect();
        assert_eq!(models.len(), 1, "{fields:?}");
        assert_eq!(models[0].2, b"whisper-1");
    } else {
        assert_eq!(resp.status(), 400);
    }

    // Hostile JSON: a duplicated model, a model of another type, an array body.
    for body in [
        r#"{"model":"tts","model":"gpt-image","input":"x","voice":"alloy"}"#,
        r#"{"model":["tts"],"input":"x","voice":"alloy"}"#,
        r#"["tts","x"]"#,
    ] {
        let resp = client()
            .post(gw.url("/v1/audio/speech"))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
    }
}

#[tokio::test]
async fn request_guardrails_read_image_prompts_and_upload_prompts() {
    let bed = bed(&[]).await;
    let gw = &bed.gw;
    // The images route blocks credentials in prompts: nothing reaches the upstream.
    let resp = post_json(gw, KEY, "/v1/images/generations", &json!({"model": "gpt-image", "prompt": "a poster saying sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD"})).await;
    assert_eq!(resp.status(), 400);
    let error: Value = resp.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-keys"),
        "{error}"
    );
    assert!(bed.openai.received().is_empty());
    // The transcription route redacts e-mail addresses in the upload's prompt.
    let wav = audio();
    let (ct, body) = form(&[
        ("file", Some("a.wav"), &wav),
        ("model", None, b"transcribe"),
        ("prompt", None, b"Names: ana@example.com and Bob"),
    ]);
    let resp = upload(gw, KEY, &ct, body).await;
    assert_eq!(resp.status(), 200);
    let text = resp.json::<Value>().await.unwrap()["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        !text.contains("ana@example.com") && text.contains("and Bob"),
        "{text}"
    );
    let fields = fields_of(bed.openai.received().last().unwrap()).await;
    let prompt = &fields.iter().find(|(n, ..)| n == "prompt").unwrap().2;
    assert!(!String::from_utf8_lossy(prompt).contains("ana@example.com"));
}

/// An upstream that breaks or goes silent mid-audio: the client's body ends in an error
/// (a binary answer has no room for an error event), the Provider's only slot is freed,
/// and so is the slot of a client that walks away mid-answer.
#[tokio::test]
async fn audio_cut_short_ends_the_clients_body_and_frees_the_providers_slot() {
    use common::upstream::{Reply, Upstream};
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: up, labels: {{tollgate.dev/credential: 'true'}}}}\nstringData: {{token: sk-up}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: client-key}}\nstringData: {{apiKey: {KEY}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: client}}\nspec: {{owner: tests}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: up}}\nspec:\n  type: openai\n  baseUrl: {}\n\
         \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n  models: [{{name: tts}}]\n  maxConcurrency: 1\n\
         \x20 timeouts: {{streamIdle: 300ms}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: tts}}\nspec:\n  models: [tts]\n  targets: [{{provider: up}}]\n  retries: {{attempts: 0}}\n",
        up.base_url()
    );
    std::fs::write(dir.path().join("config.yaml"), text).unwrap();
    let gw = Gateway::start(&["--resources", dir.path().to_str().unwrap()]);
    let body = json!({"model": "tts", "input": "hi", "voice": "alloy"});
    let speak = || post_json(&gw, KEY, "/v1/audio/speech", &body);
    let slot_free = || async {
        common::eventually(std::time::Duration::from_secs(5), || async {
            // The scriptable upstream answers a chat completion by default: any 2xx will do.
            speak().await.status() == 200
        })
        .await
    };

    // Silent after its first bytes: cut after the idle timeout.
    let feed = up.stream();
    feed.send(bytes::Bytes::from_static(b"ID3\x04partial"))
        .unwrap();
    let resp = speak().await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.bytes().await.is_err(),
        "the client sees the answer cut"
    );
    drop(feed);
    assert!(
        slot_free().await,
        "the slot is freed when the relay gives up"
    );

    // Broken after its first bytes.
    up.script([Reply::Broken(vec![bytes::Bytes::from_static(
        b"ID3\x04partial",
    )])]);
    let resp = speak().await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.bytes().await.is_err(),
        "the client sees the answer cut"
    );
    assert!(
        slot_free().await,
        "the slot is freed when the upstream breaks"
    );

    // A client that walks away mid-answer frees the slot too.
    let feed = up.stream();
    feed.send(bytes::Bytes::from_static(b"ID3\x04partial"))
        .unwrap();
    let resp = speak().await;
    assert_eq!(resp.status(), 200);
    let second = speak().await;
    assert_eq!(
        second.status(),
        503,
        "the only slot is held by the open answer"
    );
    drop(resp);
    assert!(slot_free().await, "the slot is freed when the client goes");
    drop(feed);
}
