//! The guardrail rule set the benchmark uses, and the in-process measurement of what
//! checking a request costs: the same parse the gateway makes, with and without the
//! compiled rules, over typical prompts.

use std::{hint::black_box, time::Instant};

use tollgate_api::{
    config::CompiledGuardrail,
    guardrails::{Guardrails, Verdict},
    v1alpha1::Guardrail,
};

/// Every detector once (what a strict route would declare), as JSON, which is YAML too.
pub const RULES: &str = r#"[
  {"detector": "email", "action": "redact"},
  {"detector": "phone", "action": "redact"},
  {"detector": "creditCard", "action": "redact"},
  {"detector": "iban", "action": "redact"},
  {"detector": "secret", "action": "block"},
  {"name": "ticket", "detector": "regex", "pattern": "TCK-[0-9]{6}", "action": "redact"},
  {"detector": "promptInjection", "action": "log"},
  {"detector": "blockedTerms", "terms": ["project falcon", "codename orion"], "action": "block"},
  {"detector": "maxMessages", "limit": 200, "action": "block"},
  {"detector": "maxPromptBytes", "limit": 1000000, "action": "block"}
]"#;

/// [`RULES`] compiled the way the gateway does.
pub fn compiled() -> anyhow::Result<Guardrails> {
    let rules: Vec<Guardrail> = serde_json::from_str(RULES)?;
    let compiled: Vec<CompiledGuardrail> = rules
        .into_iter()
        .map(|r| CompiledGuardrail {
            name: r.name.unwrap_or_else(|| r.detector.as_str().to_owned()),
            detector: r.detector,
            pattern: r.pattern,
            terms: r.terms,
            limit: r.limit,
            action: r.action,
            request: true,
            response: false,
        })
        .collect();
    Guardrails::new(&compiled).map_err(anyhow::Error::msg)
}

/// Typical request bodies: `(label, body)`.
pub fn prompts() -> Vec<(&'static str, Vec<u8>)> {
    let prose = "Our quarterly report covers revenue, churn and hiring plans across the \
                 three regions; please keep the tone neutral and cite the tables. ";
    let chat = |content: String| {
        serde_json::json!({
            "model": "bench-guarded",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant that answers briefly."},
                {"role": "user", "content": content}
            ],
            "max_tokens": 200
        })
        .to_string()
        .into_bytes()
    };
    vec![
        (
            "short chat (200 B)",
            chat("Summarise the benefits of connection pooling in two sentences.".to_owned()),
        ),
        (
            "4 KB prompt with PII",
            chat(format!(
                "{}Contact jane.doe@example.com or +44 20 7946 0958, card 4111 1111 1111 1111.",
                prose.repeat(28)
            )),
        ),
        ("32 KB document", chat(prose.repeat(210))),
    ]
}

/// Mean CPU time per request, in microseconds, of parsing alone and of parsing plus the
/// check, for each prompt: `(label, parse µs, parse + check µs)`.
pub fn measure(iterations: u32) -> anyhow::Result<Vec<(&'static str, f64, f64)>> {
    let guardrails = compiled()?;
    let mut out = Vec::new();
    for (label, body) in prompts() {
        let run = |n: u32, check: bool| -> anyhow::Result<f64> {
            let started = Instant::now();
            for _ in 0..n {
                let mut doc: serde_json::Value = serde_json::from_slice(black_box(&body))?;
                if check {
                    let mut verdict = Verdict::default();
                    guardrails.check(&mut doc, &mut verdict);
                    black_box(&verdict);
                }
                black_box(&doc);
            }
            Ok(started.elapsed().as_secs_f64() * 1e6 / f64::from(n.max(1)))
        };
        // Warm caches (and the regex engines' lazy DFAs) first.
        let per = |check: bool| -> anyhow::Result<f64> {
            run(iterations / 10 + 1, check)?;
            run(iterations, check)
        };
        out.push((label, per(false)?, per(true)?));
    }
    Ok(out)
}
