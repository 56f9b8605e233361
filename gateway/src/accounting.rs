//! Usage accounting for one request: what was reserved at admission, what the answer
//! actually used, and settling the difference exactly once, when the answer is complete
//! or abandoned (a client that disconnects mid-stream is still billed for what it got).

use std::sync::Arc;

use serde_json::Value;

use crate::{
    limits::store::{AnyReservation, Limits},
    metrics::{Metrics, TokenLabels},
    pricing::Pricing,
};

pub use crate::pricing::Usage;

/// Reads usage from a complete answer in either dialect (OpenAI `usage.prompt_tokens`,
/// Anthropic `usage.input_tokens`).
pub fn usage_from_body(body: &[u8]) -> Option<Usage> {
    // Only `usage` is built into a value; the rest of the answer (the long part) is
    // skipped over without allocating.
    #[derive(serde::Deserialize)]
    struct Answer<'a> {
        #[serde(borrow, default)]
        usage: Option<&'a serde_json::value::RawValue>,
    }
    let answer: Answer<'_> = serde_json::from_slice(body).ok()?;
    let usage: Value = serde_json::from_str(answer.usage?.get()).ok()?;
    usage_from_value(&usage)
}

/// Reads a `usage` object in either dialect.
pub fn usage_from_value(u: &Value) -> Option<Usage> {
    if !u.is_object() {
        return None;
    }
    let prompt = u["prompt_tokens"].as_u64().or_else(|| {
        u["input_tokens"].as_u64().map(|i| {
            // Saturating: the numbers come from the upstream.
            i.saturating_add(u["cache_read_input_tokens"].as_u64().unwrap_or(0))
                .saturating_add(u["cache_creation_input_tokens"].as_u64().unwrap_or(0))
        })
    })?;
    let completion = u["completion_tokens"]
        .as_u64()
        .or_else(|| u["output_tokens"].as_u64())
        .unwrap_or(0);
    // OpenAI chat: `prompt_tokens_details`; the Responses API: `input_tokens_details`;
    // Anthropic: `cache_read_input_tokens` and `cache_creation_input_tokens`.
    let cached = u["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .or_else(|| u["input_tokens_details"]["cached_tokens"].as_u64())
        .or_else(|| u["cache_read_input_tokens"].as_u64())
        .unwrap_or(0);
    let cache_write = u["cache_creation_input_tokens"].as_u64().unwrap_or(0);
    Some(Usage {
        prompt,
        completion,
        cached: cached.min(prompt),
        cache_write: cache_write.min(prompt - cached.min(prompt)),
    })
}

/// Settles a request's reservation once; dropping it settles too.
#[derive(Debug)]
pub struct Accounting {
    /// Limits to settle with; `None` when no limit or budget applies.
    limits: Option<(Arc<Limits>, AnyReservation)>,
    /// Where usage is recorded (shared counters when Redis is configured).
    store: Arc<crate::usage::Usage>,
    key_id: String,
    metrics: Arc<Metrics>,
    route: String,
    owner: String,
    provider: Option<String>,
    model: String,
    /// Prices of the model that answered.
    pricing: Pricing,
    /// Usage reported by the answer.
    reported: Option<Usage>,
    /// Usage estimated from what was relayed, for answers cut before their usage arrived.
    estimated: Usage,
    settled: bool,
    /// Span that receives the usage and cost (the request's, or the stream's).
    span: tracing::Span,
    /// Where the settled usage is shown to the access log line, if still waiting.
    report: Option<Arc<UsageReport>>,
}

/// Usage and cost of a settled request, for its access log line.
#[derive(Debug, Default)]
pub struct UsageReport(std::sync::Mutex<Option<(u64, u64, f64)>>);

impl UsageReport {
    /// Input tokens, output tokens and cost, once settled.
    pub fn get(&self) -> Option<(u64, u64, f64)> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Accounting {
    /// Accounting for a request; `limits` holds its admission reservation, if any, and
    /// `store` receives its usage.
    pub fn new(
        limits: Option<(Arc<Limits>, AnyReservation)>,
        store: Arc<crate::usage::Usage>,
        metrics: Arc<Metrics>,
        key_id: &str,
        route: &str,
        owner: &str,
    ) -> Self {
        Self {
            limits,
            store,
            key_id: key_id.to_owned(),
            metrics,
            route: route.to_owned(),
            owner: owner.to_owned(),
            provider: None,
            model: String::new(),
            pricing: Pricing::default(),
            reported: None,
            estimated: Usage::default(),
            settled: false,
            span: tracing::Span::current(),
            report: None,
        }
    }

    /// Records which provider and model answered and its prices; `prompt_estimate` stands in for the
    /// prompt size until the answer reports its usage.
    pub fn answered_by(
        &mut self,
        provider: &str,
        model: &str,
        pricing: Pricing,
        prompt_estimate: u64,
    ) {
        self.provider = Some(provider.to_owned());
        self.model = model.to_owned();
        self.pricing = pricing;
        self.estimated.prompt = prompt_estimate;
    }

    /// Records usage and cost on `span` when settled (a stream's span outlives the
    /// request's).
    pub fn trace_into(&mut self, span: tracing::Span) {
        self.span = span;
    }

    /// Shows the settled usage to `report` (the access log line reads it).
    pub fn report_to(&mut self, report: Arc<UsageReport>) {
        self.report = Some(report);
    }

    /// Records usage reported by the answer.
    pub fn report(&mut self, usage: Usage) {
        self.reported = Some(usage);
    }

    /// Counts one relayed output piece (about one token) toward the estimate.
    pub fn relayed_piece(&mut self) {
        self.estimated.completion += 1;
    }

    fn settle(&mut self) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        // No provider answered: nothing was used, everything is refunded.
        let usage = match (&self.provider, self.reported) {
            (None, _) => Usage::default(),
            (Some(_), Some(u)) => u,
            (Some(_), None) => self.estimated,
        };
        let cost = self.pricing.cost(&usage);
        if let Some((limits, reservation)) = self.limits.take() {
            limits.settle(
                reservation,
                usage.prompt.saturating_add(usage.completion),
                cost,
            );
        }
        if let Some(provider) = &self.provider {
            use crate::telemetry::attr;
            self.span.record(attr::RESPONSE_MODEL, self.model.as_str());
            self.span.record(attr::INPUT_TOKENS, usage.prompt as i64);
            self.span
                .record(attr::OUTPUT_TOKENS, usage.completion as i64);
            self.span.record("tollgate.cost", cost);
            if let Some(report) = &self.report {
                *report.0.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((usage.prompt, usage.completion, cost));
            }
            self.store.record(&self.key_id, &usage, cost);
            let labels = |kind: &'static str| TokenLabels {
                route: self.route.clone(),
                provider: provider.clone(),
                model: self.model.clone(),
                owner: self.owner.clone(),
                kind,
            };
            self.metrics
                .tokens
                .get_or_create(&labels("input"))
                .inc_by(usage.prompt);
            self.metrics
                .tokens
                .get_or_create(&labels("output"))
                .inc_by(usage.completion);
            // Parts of the input, priced apart (never added to `input` twice).
            for (kind, tokens) in [
                ("cached_input", usage.cached),
                ("cache_write", usage.cache_write),
            ] {
                if tokens > 0 {
                    self.metrics
                        .tokens
                        .get_or_create(&labels(kind))
                        .inc_by(tokens);
                }
            }
            self.metrics
                .cost
                .get_or_create(&labels("total"))
                .inc_by(cost);
        }
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        self.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_either_dialect() {
        assert_eq!(
            usage_from_body(
                br#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#
            ),
            Some(Usage {
                prompt: 3,
                completion: 4,
                ..Default::default()
            })
        );
        assert_eq!(
            usage_from_body(
                br#"{"usage":{"input_tokens":3,"output_tokens":4,"cache_read_input_tokens":2}}"#
            ),
            Some(Usage {
                prompt: 5,
                completion: 4,
                cached: 2,
                cache_write: 0,
            })
        );
        // Cached input in each dialect's place, and Anthropic's cache writes.
        for (body, cached, written) in [
            (&br#"{"usage":{"prompt_tokens":10,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":4}}}"#[..], 4, 0),
            (br#"{"usage":{"input_tokens":10,"output_tokens":1,"input_tokens_details":{"cached_tokens":6}}}"#, 6, 0),
            (br#"{"usage":{"input_tokens":1,"output_tokens":1,"cache_read_input_tokens":3,"cache_creation_input_tokens":5}}"#, 3, 5),
            // An upstream claiming more cached tokens than input is held to the input.
            (br#"{"usage":{"prompt_tokens":2,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":9}}}"#, 2, 0),
        ] {
            let u = usage_from_body(body).unwrap();
            assert_eq!((u.cached, u.cache_write), (cached, written), "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(
            usage_from_body(br#"{"usage":{"prompt_tokens":8,"total_tokens":8}}"#),
            Some(Usage {
                prompt: 8,
                completion: 0,
                ..Default::default()
            })
        );
        assert_eq!(usage_from_body(br#"{"usage":null}"#), None);
        assert_eq!(usage_from_body(b"not json"), None);
    }
}
