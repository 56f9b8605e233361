//! Hostile and broken clients through the real gateway binary, table-driven: each case
//! gets its documented status (or a closed connection), and the gateway keeps serving.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use common::{Gateway, client};

const KEY: &str = "tg_localDevKeyForTheMockProviderOnly00000003";

fn gateway() -> Gateway {
    Gateway::start(&[
        "--resources",
        common::examples().to_str().unwrap(),
        "--max-body-bytes",
        "65536",
        "--header-read-timeout",
        "1s",
        "--body-read-timeout",
        "1s",
    ])
}

/// The gateway's address, from its URL.
fn addr(gw: &Gateway) -> String {
    gw.url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// Sends raw bytes, then reads the answer (until the server closes or `patience` ends);
/// returns the status code, or `None` when the connection closed without an answer.
fn raw(gw: &Gateway, parts: &[(&[u8], Duration)], patience: Duration) -> Option<u16> {
    let mut stream = TcpStream::connect(addr(gw)).unwrap();
    stream.set_read_timeout(Some(patience)).unwrap();
    for (bytes, pause) in parts {
        // Writes may fail once the server gave up on us: that is an answer too.
        if stream.write_all(bytes).is_err() {
            break;
        }
        std::thread::sleep(*pause);
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace().nth(1).and_then(|s| s.parse().ok())
}

fn request_head(length: Option<usize>, content_type: &str) -> String {
    let mut head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\nContent-Type: {content_type}\r\n"
    );
    match length {
        Some(n) => head.push_str(&format!("Content-Length: {n}\r\n\r\n")),
        None => head.push_str("Transfer-Encoding: chunked\r\n\r\n"),
    }
    head
}

#[tokio::test]
async fn broken_bodies_get_their_documented_status() {
    let gw = gateway();
    let nested = format!(
        r#"{{"model":"demo-chat","messages":[{{"role":"user","content":"hi","x":{}{}}}]}}"#,
        "[".repeat(20_000),
        "]".repeat(20_000)
    );
    let too_big = format!(
        r#"{{"model":"demo-chat","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(70_000)
    );
    let mut invalid_utf8 =
        br#"{"model":"demo-chat","messages":[{"role":"user","content":"#.to_vec();
    invalid_utf8.extend_from_slice(b"\"\xff\xfe\"}]}");
    let ok = br#"{"model":"demo-chat","messages":[{"role":"user","content":"hi"}]}"#.to_vec();
    let cases: Vec<(&str, Vec<u8>, &str, u16)> = vec![
        ("valid", ok.clone(), "application/json", 200),
        (
            "JSON nested 20,000 deep (the limit is 128, on every route)",
            nested.into_bytes(),
            "application/json",
            400,
        ),
        (
            "larger than --max-body-bytes",
            too_big.into_bytes(),
            "application/json",
            413,
        ),
        ("invalid UTF-8", invalid_utf8, "application/json", 400),
        ("empty", Vec::new(), "application/json", 400),
        (
            "not JSON",
            b"model=demo-chat".to_vec(),
            "application/json",
            400,
        ),
        ("a JSON array", b"[1,2,3]".to_vec(), "application/json", 400),
        (
            "model twice",
            br#"{"model":"demo-chat","model":"x","messages":[]}"#.to_vec(),
            "application/json",
            400,
        ),
        (
            "model not a string",
            br#"{"model":7,"messages":[]}"#.to_vec(),
            "application/json",
            400,
        ),
        // Clients that mislabel a JSON body are served: the body decides.
        ("JSON sent as text/plain", ok.clone(), "text/plain", 200),
    ];
    for (case, body, content_type, expected) in cases {
        let resp = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert_eq!(status, expected, "{case}: {text}");
        if expected != 200 {
            let v: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("{case}: an OpenAI-style JSON error: {text}"));
            assert!(v["error"]["message"].is_string(), "{case}: {text}");
        }
    }
    assert_eq!(gw.chat_status(KEY, "demo-chat").await, 200, "still serving");
}

#[tokio::test]
async fn slow_and_chunked_clients_get_their_documented_answer() {
    let gw = gateway();
    let body = br#"{"model":"demo-chat","messages":[{"role":"user","content":"hi"}]}"#;
    let head = request_head(Some(body.len()), "application/json");

    // Chunked upload without a length: served.
    let chunked = format!(
        "{}{:x}\r\n{}\r\n0\r\n\r\n",
        request_head(None, "application/json"),
        body.len(),
        std::str::from_utf8(body).unwrap()
    );
    assert_eq!(
        raw(
            &gw,
            &[(chunked.as_bytes(), Duration::ZERO)],
            Duration::from_secs(5)
        ),
        Some(200),
        "chunked body"
    );

    // Slowloris headers: half a request line, then silence past --header-read-timeout.
    let started = Instant::now();
    let answer = raw(
        &gw,
        &[(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n",
            Duration::ZERO,
        )],
        Duration::from_secs(5),
    );
    assert!(
        answer.is_none() || answer == Some(408),
        "slow headers are cut off: {answer:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "cut off near the 1 s header deadline, not at the client's patience: {:?}",
        started.elapsed()
    );

    // Slow body: the headers promise a body that trickles in past --body-read-timeout.
    let answer = raw(
        &gw,
        &[
            (head.as_bytes(), Duration::ZERO),
            (&body[..10], Duration::from_millis(1500)),
            (&body[10..], Duration::ZERO),
        ],
        Duration::from_secs(5),
    );
    assert_eq!(answer, Some(408), "slow body");

    // A body shorter than its Content-Length, then silence: 408, not a hang.
    let answer = raw(
        &gw,
        &[
            (head.as_bytes(), Duration::ZERO),
            (&body[..20], Duration::ZERO),
        ],
        Duration::from_secs(5),
    );
    assert_eq!(answer, Some(408), "truncated body");

    assert_eq!(gw.chat_status(KEY, "demo-chat").await, 200, "still serving");
}
