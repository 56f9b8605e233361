//! The request pipeline every generation endpoint shares (OpenAI's chat completions,
//! completions and embeddings, Anthropic's messages), top to bottom:
//!
//! 1. **auth** — the key (`auth::authenticate_client`);
//! 2. **body** — read within the memory budget and the deadline, its head parsed;
//! 3. **route** — the key's route for the model, and whether the key may use it;
//! 4. **guardrails** — request rules (`guardrails::apply`), before anything reads the
//!    content;
//! 5. **admission** — every limit and budget checked and reserved at once
//!    (`admission::admit`);
//! 6. **cache** — a stored answer, when the route caches (`caching::lookup`);
//! 7. **forward** — the targets tried in order (`proxy::forward`);
//! 8. **settle** — response rules, content recording, storing in the cache, quota
//!    headers; the usage settles when the answer is complete (`accounting.rs`).
//!
//! The span, metrics and access line around it are `observe.rs`'s.

use std::{sync::Arc, time::Instant};

use crate::targets::Route;
use axum::{
    extract::{Request, State},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use tracing::Instrument;

use super::{
    AppState, admission, auth::authenticate_client, caching, caching::CachePlan, guardrails,
    observe, read_body, request_id,
};
use crate::{
    accounting::{Accounting, UsageReport},
    dialects::Operation,
    error::ApiError,
    limits::Quota,
    memory::Share,
    proxy::{Forward, Timing, forward},
    relay,
    request::{RequestHead, estimate_prompt_tokens, parse_head_for},
    snapshot::{Key, Snapshot},
    telemetry,
};

/// Serves one request to `operation` and renders errors with `render` (OpenAI's or
/// Anthropic's shape); `observe` records it.
pub(super) async fn handle(
    State(state): State<Arc<AppState>>,
    request: Request,
    operation: Operation,
    render: fn(ApiError) -> Response,
) -> Response {
    let started = Instant::now();
    let request_id = request_id(request.headers());
    let mut seen = observe::Seen::default();
    let timing = Timing::default();
    let usage = Arc::new(UsageReport::default());
    let incoming = telemetry::extract(request.headers());
    let span = observe::request_span(&request, operation, &request_id, &incoming);
    let result = serve(
        &state,
        request,
        operation,
        Context {
            started,
            request_id: &request_id,
            timing: &timing,
            trace: &incoming,
            usage: &usage,
        },
        &mut seen,
    )
    .instrument(span.clone())
    .await;
    let response = result.unwrap_or_else(render);
    observe::finish(
        &state,
        observe::Answered {
            operation,
            request_id: &request_id,
            started,
            timing: &timing,
            usage: &usage,
            seen,
            span: &span,
            incoming: &incoming,
        },
        response,
    )
}

/// What `serve` needs besides the request: when it started, its id, where upstream time
/// is added up, and the caller's trace context.
struct Context<'a> {
    started: Instant,
    request_id: &'a str,
    timing: &'a Timing,
    trace: &'a opentelemetry::Context,
    usage: &'a Arc<UsageReport>,
}

/// One request through every stage; each stage's function says what it owns.
async fn serve(
    state: &AppState,
    request: Request,
    operation: Operation,
    cx: Context<'_>,
    seen: &mut observe::Seen,
) -> Result<Response, ApiError> {
    if operation == Operation::CountTokens {
        return count_tokens(state, request, cx, seen).await;
    }
    // What this request holds of the gateway-wide memory budget, returned when the
    // response head is sent (streams hold none).
    let share = state.memory.share();
    let (mut call, body) = receive(state, request, operation, &share, seen).await?;
    let stored = continuing(state, &call, operation).await?;
    let body = guard(state, &mut call, body, cx.request_id, &share)?;
    let prompt_estimate = estimate_prompt_tokens(&body);
    let Admitted {
        accounting,
        quota,
        cache,
    } = admit(state, &call, operation, &body, prompt_estimate, &cx, &share).await?;
    if let Some(hit) = from_cache(state, &call, operation, &cache, cx.request_id).await? {
        // Nothing is generated: the accounting refunds the reservation when dropped.
        drop(accounting);
        return Ok(with_quota(hit, quota));
    }
    let Call {
        snapshot,
        key,
        head,
        route,
        ..
    } = &call;
    // Whether the request fits its targets' context windows and output limits.
    let need = operation
        .is_chat()
        .then(|| crate::proxy::need(route, head, &body))
        .flatten();
    let response = forward(
        Forward {
            snapshot,
            route,
            head,
            body,
            request_id: cx.request_id.to_owned(),
            max_response_bytes: state.max_response_bytes,
            operation,
            health: &state.config.health,
            metrics: &state.metrics,
            started: cx.started,
            prompt_estimate,
            timing: cx.timing,
            trace: cx.trace,
            // Streamed answers pass the response rules as they are relayed.
            answers: head
                .stream
                .then(|| guardrails::answer_rules(state, snapshot, route, key, cx.request_id))
                .flatten(),
            stored,
            anthropic: (operation == Operation::Messages)
                .then(|| crate::providers::anthropic::ClientHints::of(&call.parts)),
            need,
            form: call.form.as_ref(),
        },
        Some(accounting),
    )
    .await?;
    let response = settle(state, &call, operation, cache, response, cx.request_id).await?;
    Ok(with_quota(response, quota))
}

/// A request once it is known who asks, for what, and on which route (its body travels
/// apart: each stage may replace it).
struct Call {
    snapshot: Arc<Snapshot>,
    parts: http::request::Parts,
    key: Arc<Key>,
    head: RequestHead,
    route: Arc<Route>,
    /// A multipart upload, as read (its body travels as this, re-encoded per attempt).
    form: Option<crate::multipart::Form>,
}

/// Stages 1–3, **auth**, **body**, **route**: the key, the body read within the memory
/// budget and the deadline (a multipart upload within its own limit, read as a form),
/// the route for its model, and the key's right to that model.
async fn receive(
    state: &AppState,
    request: Request,
    operation: Operation,
    share: &Share,
    seen: &mut observe::Seen,
) -> Result<(Call, Bytes), ApiError> {
    let snapshot = state.snapshot()?;
    let (parts, body) = request.into_parts();
    let key = authenticate_client(state, &parts, &snapshot)?;
    seen.key_id = Some(key.entry.id.clone());
    seen.owner = Some(key.entry.owner.clone());
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let upload = operation == Operation::AudioTranscriptions;
    let body = read_body(
        body,
        declared,
        if upload {
            state.max_upload_bytes
        } else {
            state.max_body_bytes
        },
        state.body_read_timeout,
        share,
    )
    .await?;
    let (head, body, form) = if upload {
        // The parser copies the parts out of the body as it reads them.
        share.grow(body.len(), "reading its form")?;
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let form = crate::multipart::Form::parse(body, content_type).await?;
        (form.head(), Bytes::new(), Some(form))
    } else {
        (
            parse_head_for(&body, operation.default_model())?,
            body,
            None,
        )
    };
    let route = snapshot
        .route_for(&key, &head.model)
        .ok_or_else(|| ApiError::ModelNotFound(head.model.clone()))?
        .clone();
    // The route id is bounded by configuration; the requested name only goes to logs.
    seen.route = Some(route.id.clone());
    seen.model = Some(head.model.clone());
    if !key.may_use(&head.model) {
        return Err(ApiError::ModelNotAllowed(head.model.clone()));
    }
    Ok((
        Call {
            snapshot,
            parts,
            key,
            head,
            route,
            form,
        },
        body,
    ))
}

/// For the Responses API, what the stored-response records say: the key's owner scope
/// and, when the request continues a stored response (`previous_response_id`), the
/// Provider holding it, after checking that this key's owner stored it. Another owner's
/// response, or one never stored through this gateway, is not found (OpenAI's 400); when
/// the records cannot be read the request is refused rather than let through unchecked.
async fn continuing(
    state: &AppState,
    call: &Call,
    operation: Operation,
) -> Result<Option<crate::proxy::Stored>, ApiError> {
    if operation != Operation::Responses {
        return Ok(None);
    }
    let scope = crate::stored_responses::scope_of(&call.key);
    let pinned = match call.head.previous_response_id.as_deref() {
        None => None,
        Some(id) => {
            let owner = state.stored.owner(id).await.map_err(|e| {
                tracing::warn!(error = %e, "stored-response records unreadable");
                ApiError::UpstreamUnavailable(
                    "The gateway cannot check who owns previous_response_id right now; retry later."
                        .to_owned(),
                )
            })?;
            match owner {
                Some(owner) if owner.scope == scope => {
                    if !call
                        .route
                        .tiers
                        .iter()
                        .flatten()
                        .any(|t| t.provider == owner.provider)
                    {
                        let shown: String = id.chars().take(128).collect();
                        return Err(ApiError::bad_request(
                            format!(
                                "previous_response_id '{shown}' is stored by a Provider this model's route does not send to: continue it with a model routed to the Provider that stored it (one that speaks the Responses API), or send the whole conversation in `input`."
                            ),
                            Some("previous_response_id"),
                        ));
                    }
                    Some(owner.provider)
                }
                _ => {
                    let shown: String = id.chars().take(128).collect();
                    return Err(ApiError::PreviousResponseNotFound(shown));
                }
            }
        }
    };
    Ok(Some(crate::proxy::Stored {
        store: state.stored.clone(),
        scope,
        pinned,
    }))
}

/// Stage 4, **guardrails**: the request rules, before anything else reads the content (a
/// blocked request reaches no limit, cache or upstream, and redacted text is all that the
/// cache key, traces and upstream see); the content recorded when the route opts in. An
/// upload's text prompt passes the same rules.
fn guard(
    state: &AppState,
    call: &mut Call,
    body: Bytes,
    request_id: &str,
    share: &Share,
) -> Result<Bytes, ApiError> {
    if let Some(prompt) = call.form.as_ref().and_then(|f| f.text("prompt")) {
        let doc = Bytes::from(serde_json::json!({ "prompt": prompt }).to_string());
        let checked = guardrails::apply(
            state,
            &call.snapshot,
            &call.route,
            &call.key,
            request_id,
            doc.clone(),
            share,
        )?;
        if checked != doc {
            let redacted = serde_json::from_slice::<serde_json::Value>(&checked)
                .ok()
                .and_then(|v| v["prompt"].as_str().map(str::to_owned))
                .unwrap_or_default();
            if let Some(form) = call.form.as_mut() {
                form.set_text("prompt", redacted);
            }
        }
    }
    if call.form.is_some() {
        // The upload's only body is its form.
        return Ok(body);
    }
    let body = guardrails::apply(
        state,
        &call.snapshot,
        &call.route,
        &call.key,
        request_id,
        body,
        share,
    )?;
    if call.route.record_content {
        share.reserve_trees(&body, 1, "recording its content")?;
        let input = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.get("messages")
                    .or_else(|| v.get("prompt"))
                    .or_else(|| v.get("input"))
                    .cloned()
            })
            .map(|m| m.to_string())
            .unwrap_or_default();
        tracing::Span::current().record("gen_ai.input.messages", input.as_str());
    }
    Ok(body)
}

/// What admission grants: the accounting to settle, the quota to report, and the cache
/// plan.
struct Admitted {
    accounting: Accounting,
    quota: Option<Quota>,
    cache: CachePlan,
}

/// Stage 5, **admission**: one check-and-reserve of every limit that applies, before any
/// upstream call (the reservation settles to the actual usage when the answer is done);
/// then the cache plan, and the memory the attempts may need for the body.
async fn admit(
    state: &AppState,
    call: &Call,
    operation: Operation,
    body: &Bytes,
    prompt_estimate: u64,
    cx: &Context<'_>,
    share: &Share,
) -> Result<Admitted, ApiError> {
    let Call {
        snapshot,
        key,
        head,
        route,
        parts,
        ..
    } = call;
    let admitted = admission::admit(
        state,
        snapshot,
        route,
        key,
        head,
        operation,
        prompt_estimate,
        cx.request_id,
    )
    .instrument(tracing::info_span!("admission"))
    .await?;
    let mut accounting = admitted.accounting;
    // Usage and cost go on the request's span (a stream's moves them to its own).
    accounting.trace_into(tracing::Span::current());
    accounting.report_to(cx.usage.clone());
    // Moderations, images and audio are never cached.
    let cache = if operation.is_raw() {
        CachePlan::Bypass
    } else {
        caching::plan(state, route, key, operation, &parts.headers, body, share)?
    };
    // What attempts may make of the body: a target of another dialect holds the parsed
    // body and its translation at once; an edited copy is one more body.
    let work = crate::proxy::body_work(snapshot, route, head, operation);
    if work.translates {
        share.reserve_trees(body, 2, "translating it")?;
    }
    if work.edits {
        share.grow(body.len(), "an edited copy of it")?;
    }
    if let Some(form) = &call.form {
        share.grow(form.len(), "re-encoding its form")?;
    }
    Ok(Admitted {
        accounting,
        quota: admitted.quota,
        cache,
    })
}

/// Stage 6, **cache**: a stored answer, when the route caches and has one, passed through
/// this key's and route's response rules (the entry may come from another key, or
/// predate a rule).
async fn from_cache(
    state: &AppState,
    call: &Call,
    operation: Operation,
    cache: &CachePlan,
    request_id: &str,
) -> Result<Option<Response>, ApiError> {
    let Call {
        snapshot,
        key,
        head,
        route,
        ..
    } = call;
    let lookup = caching::lookup(state, route, cache)
        .instrument(tracing::info_span!("cache lookup"))
        .await;
    let Some(hit) = lookup else {
        return Ok(None);
    };
    if !guardrails::checks_responses(snapshot, route, key) {
        return Ok(Some(hit));
    }
    let hit = match guardrails::answer_rules(state, snapshot, route, key, request_id) {
        Some(rules) if head.stream && relay::is_event_stream(&hit) => {
            guardrails::apply_to_stored_stream(hit, rules, operation).await?
        }
        _ => guardrails::apply_response(state, snapshot, route, key, request_id, hit).await?,
    };
    Ok(Some(hit))
}

/// Stage 8, **settle**: complete answers pass the response rules before they are
/// recorded, cached or returned (a stream request answered with a whole body too); the
/// answer is recorded when the route opts in, and stored when the cache plan says so.
/// (The usage settles in `accounting.rs` when the answer is complete.)
async fn settle(
    state: &AppState,
    call: &Call,
    operation: Operation,
    cache: CachePlan,
    response: Response,
    request_id: &str,
) -> Result<Response, ApiError> {
    let Call {
        snapshot,
        key,
        head,
        route,
        ..
    } = call;
    // Moderations, images and audio answers are relayed as they come, unread (no text
    // for the response rules, nothing recorded).
    if operation.is_raw() {
        return Ok(response);
    }
    let guarded_in_relay = head.stream && relay::is_event_stream(&response);
    let response = if !guarded_in_relay && guardrails::checks_responses(snapshot, route, key) {
        guardrails::apply_response(state, snapshot, route, key, request_id, response).await?
    } else {
        response
    };
    // A non-streamed answer is whole in memory already: record it when the route opts in.
    let response = if route.record_content && !head.stream {
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        tracing::Span::current().record(
            "gen_ai.output.messages",
            String::from_utf8_lossy(&bytes).as_ref(),
        );
        Response::from_parts(parts, axum::body::Body::from(bytes))
    } else {
        response
    };
    Ok(caching::store(state, route, cache, response).await)
}

/// The `x-ratelimit-*` headers, set before the body starts so streams carry them too.
fn with_quota(mut response: Response, quota: Option<Quota>) -> Response {
    if let Some(quota) = quota {
        admission::quota_headers(response.headers_mut(), &quota);
    }
    response
}

/// Anthropic's `POST /v1/messages/count_tokens`: the key, the body and the route as for
/// messages, the request guardrails too (the prompt reaches an upstream), admission (the
/// call counts against request limits; it reserves no tokens and costs nothing), then the
/// count from the first Anthropic target of the route that serves the model, with the
/// client's version, betas and query string. A route without one gets an estimate from
/// the text of the request, marked `x-tollgate-estimate: true`.
async fn count_tokens(
    state: &AppState,
    request: Request,
    cx: Context<'_>,
    seen: &mut observe::Seen,
) -> Result<Response, ApiError> {
    let operation = Operation::CountTokens;
    let share = state.memory.share();
    let (mut call, body) = receive(state, request, operation, &share, seen).await?;
    let body = guard(state, &mut call, body, cx.request_id, &share)?;
    let admitted = admission::admit(
        state,
        &call.snapshot,
        &call.route,
        &call.key,
        &call.head,
        operation,
        0,
        cx.request_id,
    )
    .instrument(tracing::info_span!("admission"))
    .await?;
    // Nothing is generated: dropping the accounting returns the reservation.
    drop(admitted.accounting);
    let hints = crate::providers::anthropic::ClientHints::of(&call.parts);
    let target = call.route.targets.iter().flatten().find_map(|t| {
        let provider = t.provider.as_ref()?;
        let adapter = provider.adapter?;
        (adapter.dialect() == crate::dialects::Dialect::Anthropic)
            .then_some(())
            .and_then(|()| Some((provider.clone(), t.model(&call.head.model)?)))
    });
    let response = match target {
        None => {
            let tokens = crate::request::text_tokens_estimate(&body).unwrap_or(1);
            let mut response =
                axum::Json(serde_json::json!({"input_tokens": tokens})).into_response();
            response.headers_mut().insert(
                "x-tollgate-estimate",
                http::HeaderValue::from_static("true"),
            );
            response
        }
        Some((provider, model)) => {
            crate::proxy::count_tokens(&provider, &model, &call.head, body, &hints, cx.request_id)
                .await?
        }
    };
    Ok(with_quota(response, admitted.quota))
}
