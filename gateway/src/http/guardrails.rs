//! Applies the route's and the key's guardrails: to a request body before anything else
//! sees it (admission, cache key, upstream), and to a complete answer before it is cached
//! and returned. Blocks, redacts or only records hits.

use std::sync::Arc;

use axum::{body::Body, response::Response};
use bytes::Bytes;
use tollgate_api::{
    config::CompiledRoute,
    guardrails::{Guardrails, Verdict},
};

use super::AppState;
use crate::{
    error::ApiError,
    snapshot::{Guards, Key, Snapshot},
    stream_guard::AnswerRules,
};

/// Which side of the exchange is checked.
#[derive(Clone, Copy)]
enum Side {
    Request,
    Response,
}

/// The route's list, then the key's, for `side`.
fn lists<'a>(
    snapshot: &'a Snapshot,
    route: &CompiledRoute,
    key: &'a Key,
    side: Side,
) -> Vec<&'a Arc<Guardrails>> {
    let pick = |g: &'a Guards| match side {
        Side::Request => g.request.as_ref(),
        Side::Response => g.response.as_ref(),
    };
    snapshot
        .route_guardrails(&route.id)
        .and_then(pick)
        .into_iter()
        .chain(pick(&key.guardrails))
        .filter(|g| !g.is_empty())
        .collect()
}

/// Runs `lists` over the parsed `doc`; `None` when nothing needs to change.
fn run(
    state: &AppState,
    route: &CompiledRoute,
    key: &Key,
    request_id: &str,
    lists: Vec<&Arc<Guardrails>>,
    mut doc: serde_json::Value,
    side: Side,
) -> Result<Option<Bytes>, Verdict> {
    let mut verdict = Verdict::default();
    for list in lists {
        match side {
            Side::Request => list.check(&mut doc, &mut verdict),
            Side::Response => list.check_response(&mut doc, &mut verdict),
        }
        if verdict.blocked.is_some() {
            break;
        }
    }
    let on = match side {
        Side::Request => "request",
        Side::Response => "response",
    };
    for hit in &verdict.hits {
        state
            .metrics
            .guardrail_hit(&route.id, &key.entry.id, request_id, hit, on);
    }
    if verdict.blocked.is_some() {
        return Err(verdict);
    }
    if !verdict.redacted {
        return Ok(None);
    }
    Ok(serde_json::to_vec(&doc).ok().map(Bytes::from))
}

/// The rules that check this route's and key's answers, for a streamed answer; `None`
/// when there are none.
pub(super) fn answer_rules(
    state: &AppState,
    snapshot: &Snapshot,
    route: &CompiledRoute,
    key: &Key,
    request_id: &str,
) -> Option<Arc<AnswerRules>> {
    let lists: Vec<Arc<Guardrails>> = lists(snapshot, route, key, Side::Response)
        .into_iter()
        .cloned()
        .collect();
    (!lists.is_empty()).then(|| {
        Arc::new(AnswerRules {
            lists,
            route: route.id.clone(),
            key_id: key.entry.id.clone(),
            request_id: request_id.to_owned(),
            metrics: state.metrics.clone(),
        })
    })
}

/// The body to forward: the original bytes when no rule redacted anything, a re-encoded
/// body otherwise; or the error of a blocking rule. Hits are counted and logged by rule
/// name only, never with the matched text.
pub(super) fn apply(
    state: &AppState,
    snapshot: &Snapshot,
    route: &CompiledRoute,
    key: &Key,
    request_id: &str,
    body: Bytes,
    share: &crate::memory::Share,
) -> Result<Bytes, ApiError> {
    let lists = lists(snapshot, route, key, Side::Request);
    if lists.is_empty() {
        return Ok(body);
    }
    // The rules read a parsed tree; a redaction re-encodes it (at most the body's size).
    share.reserve_trees(&body, 1, "this route's guardrails")?;
    // The head parser skims what it does not need; what the rules cannot read is refused
    // rather than forwarded unchecked (a lone surrogate escape, nesting too deep).
    let doc = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            format!("The request body could not be checked by this route's guardrails: {e}"),
            None,
        )
    })?;
    match run(state, route, key, request_id, lists, doc, Side::Request) {
        Ok(redacted) => Ok(redacted.unwrap_or(body)),
        Err(verdict) => {
            let blocked = verdict.blocked.expect("set when refused");
            Err(ApiError::GuardrailBlocked {
                rule: blocked.rule,
                detector: blocked.detector.as_str(),
            })
        }
    }
}

/// Whether any rule checks the answers of this route and key.
pub(super) fn checks_responses(snapshot: &Snapshot, route: &CompiledRoute, key: &Key) -> bool {
    !lists(snapshot, route, key, Side::Response).is_empty()
}

/// A complete, successful answer (fresh or from the cache) with `response` rules
/// applied: unchanged, redacted, or withheld (502) by a blocking rule or when it cannot
/// be read. Other answers pass untouched.
pub(super) async fn apply_response(
    state: &AppState,
    snapshot: &Snapshot,
    route: &CompiledRoute,
    key: &Key,
    request_id: &str,
    response: Response,
) -> Result<Response, ApiError> {
    let lists = lists(snapshot, route, key, Side::Response);
    if lists.is_empty() || !response.status().is_success() {
        return Ok(response);
    }
    let (mut parts, body) = response.into_parts();
    // A non-streamed answer is whole in memory already.
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|_| ApiError::Internal(request_id.to_owned()))?;
    // An answer the rules cannot read is withheld, not returned unchecked.
    let Ok(doc) = serde_json::from_slice(&bytes) else {
        return Err(ApiError::Upstream(
            "The upstream answer is not JSON, so this route's response guardrails could not check it."
                .to_owned(),
        ));
    };
    match run(state, route, key, request_id, lists, doc, Side::Response) {
        Ok(None) => Ok(Response::from_parts(parts, Body::from(bytes))),
        Ok(Some(redacted)) => {
            parts.headers.remove(http::header::CONTENT_LENGTH);
            Ok(Response::from_parts(parts, Body::from(redacted)))
        }
        Err(verdict) => {
            let blocked = verdict.blocked.expect("set when refused");
            Err(ApiError::GuardrailBlockedAnswer {
                rule: blocked.rule,
                detector: blocked.detector.as_str(),
            })
        }
    }
}

/// A stored stream (a cache hit) passed through the response rules as a whole.
pub(super) async fn apply_to_stored_stream(
    response: Response,
    rules: Arc<AnswerRules>,
    operation: crate::dialects::Operation,
) -> Result<Response, ApiError> {
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|_| ApiError::Internal(rules.request_id.clone()))?;
    let guard = crate::stream_guard::StreamGuard::new(rules, operation.client_dialect());
    let out = crate::stream_guard::guard_whole(&bytes, guard);
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Ok(Response::from_parts(parts, Body::from(out)))
}
