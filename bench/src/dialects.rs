//! What preparing the upstream body costs, in process, per path through the canonical
//! model: the same-dialect passthrough (the fast path), a passthrough with the model
//! renamed (one edited copy), and a translation to the other dialect (parse, canonical
//! request, render). Each is measured against the parse every request pays anyway
//! (`request::parse_head`), in the same run.

use std::{hint::black_box, time::Instant};

use bytes::Bytes;
use tollgate_api::{config::CompiledProvider, v1alpha1::ProviderType};
use tollgate_gateway::{dialects::Operation, providers, request::parse_head};

/// Prepares an upstream body from a client's.
type Prepare = dyn Fn(&Bytes) -> anyhow::Result<Bytes>;

/// One measured path.
#[derive(Debug)]
pub struct Measured {
    /// What it is.
    pub label: &'static str,
    /// Mean CPU time per request of `parse_head` alone on the same body, in ns.
    pub baseline_ns: f64,
    /// Mean CPU time per request of `parse_head` plus the body preparation, in ns.
    pub ns: f64,
    /// Whether the prepared body is the client's own buffer (no copy at all).
    pub same_buffer: bool,
}

/// An Anthropic Messages body like [`crate::load::chat_body`]'s chat.
pub fn messages_body(model: &str, stream: bool) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "model": model,
            "system": "You are a helpful assistant that answers briefly.",
            "messages": [
                {"role": "user", "content": "Summarise the benefits of connection pooling in two sentences."}
            ],
            "max_tokens": 200,
            "temperature": 0,
            "stream": stream,
        })
        .to_string(),
    )
}

/// Each path against its baseline (`parse_head` alone on the same body), in ns per
/// request.
pub fn measure(iterations: u32) -> anyhow::Result<Vec<Measured>> {
    let openai = providers::adapter(ProviderType::Openai)
        .ok_or_else(|| anyhow::anyhow!("no OpenAI adapter"))?;
    let anthropic = providers::adapter(ProviderType::Anthropic)
        .ok_or_else(|| anyhow::anyhow!("no Anthropic adapter"))?;
    let chat = crate::load::chat_body("bench-small", false);
    let messages = messages_body("bench-small", false);

    let time = |body: &Bytes, prepare: &dyn Fn(&Bytes) -> anyhow::Result<Bytes>| {
        let run = |n: u32| -> anyhow::Result<f64> {
            let started = Instant::now();
            for _ in 0..n {
                black_box(prepare(black_box(body))?);
            }
            Ok(started.elapsed().as_secs_f64() * 1e9 / f64::from(n.max(1)))
        };
        run(iterations / 10 + 1)?;
        run(iterations)
    };
    let parse_only = |body: &Bytes| -> anyhow::Result<Bytes> {
        parse_head(body).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(body.clone())
    };
    let provider = |kind: &str| -> anyhow::Result<CompiledProvider> {
        Ok(serde_json::from_value(serde_json::json!({
            "id": "bench/up", "type": kind, "baseUrl": "http://127.0.0.1:1/v1", "models": {},
            "currency": "USD", "connectTimeoutMs": 1000, "requestTimeoutMs": 1000,
            "streamIdleTimeoutMs": 1000, "circuitFailureThreshold": 5, "circuitOpenMs": 1000,
        }))?)
    };
    let (openai_provider, anthropic_provider) = (provider("openai")?, provider("anthropic")?);
    let prepare = |adapter: &'static dyn providers::Adapter,
                   provider: &CompiledProvider,
                   operation: Operation,
                   model: &'static str| {
        let provider = provider.clone();
        move |body: &Bytes| -> anyhow::Result<Bytes> {
            let head = parse_head(body).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            Ok(providers::request_body(adapter, &provider, operation, &head, body, model)?.bytes)
        }
    };
    let paths: [(&str, &Bytes, Box<Prepare>); 4] = [
        (
            "passthrough (OpenAI → OpenAI)",
            &chat,
            Box::new(prepare(
                openai,
                &openai_provider,
                Operation::ChatCompletions,
                "bench-small",
            )),
        ),
        (
            "passthrough, model renamed",
            &chat,
            Box::new(prepare(
                openai,
                &openai_provider,
                Operation::ChatCompletions,
                "gpt-4o-mini-2024-07-18",
            )),
        ),
        (
            "translated (Anthropic → OpenAI)",
            &messages,
            Box::new(prepare(
                openai,
                &openai_provider,
                Operation::Messages,
                "bench-small",
            )),
        ),
        (
            "translated (OpenAI → Anthropic)",
            &chat,
            Box::new(prepare(
                anthropic,
                &anthropic_provider,
                Operation::ChatCompletions,
                "bench-small",
            )),
        ),
    ];
    let mut out = Vec::new();
    for (label, body, path) in &paths {
        let prepared = path(body)?;
        out.push(Measured {
            label,
            baseline_ns: time(body, &parse_only)?,
            ns: time(body, path.as_ref())?,
            same_buffer: prepared.as_ptr() == body.as_ptr() && prepared.len() == body.len(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_plain_passthrough_sends_the_clients_own_buffer() {
        let measured = super::measure(10).unwrap();
        let same: Vec<bool> = measured.iter().map(|m| m.same_buffer).collect();
        assert_eq!(same, [true, false, false, false], "{measured:?}");
        assert!(measured.iter().all(|m| m.ns > 0.0 && m.baseline_ns > 0.0));
    }
}
