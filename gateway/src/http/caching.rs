//! The response cache step of a request: decide, look up, store.

use axum::response::Response;
use tollgate_api::{config::CompiledRoute, v1alpha1::CacheScope};

use super::AppState;
use crate::{cache, dialects::Operation, error::ApiError, metrics::CacheLabels, snapshot::Key};

/// Tells clients whether an answer came from the cache.
pub(super) const CACHE_HEADER: http::HeaderName = http::HeaderName::from_static("x-tollgate-cache");

/// What the cache does for one request.
pub(super) enum CachePlan {
    /// No cache on the route, or the client opted out.
    Bypass,
    /// Look up and/or store under `key`.
    Use {
        key: [u8; 32],
        lookup: bool,
        store: bool,
        ttl: std::time::Duration,
        max_entry_bytes: usize,
    },
}

/// Decides caching: routes with a cache policy (streams included: the stream flag is part
/// of the request, so streamed and whole answers are separate entries), unless the client sends
/// `Cache-Control: no-store` / `x-tollgate-cache: bypass` (neither read nor write) or
/// `Cache-Control: no-cache` (fetch fresh, then store).
pub(super) fn plan(
    state: &AppState,
    route: &CompiledRoute,
    key: &Key,
    operation: Operation,
    headers: &http::HeaderMap,
    body: &[u8],
    share: &crate::memory::Share,
) -> Result<CachePlan, ApiError> {
    let Some(policy) = route.cache.as_ref().filter(|_| state.cache_enabled) else {
        return Ok(CachePlan::Bypass);
    };
    let cache_control = headers
        .get(http::header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let bypass = headers
        .get(CACHE_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("bypass"));
    if bypass || cache_control.contains("no-store") {
        return Ok(CachePlan::Bypass);
    }
    // Every scope but `shared` is within the key's namespace (namespaces and owners hold
    // neither ':' nor '/'), so no free-text field joins two tenants; `shared` is the route's
    // callers, which crosses namespaces only where the route is shared (docs/tenancy.md).
    let scope = match policy.scope {
        CacheScope::Owner => format!("owner:{}/{}", key.namespace, key.entry.owner),
        CacheScope::Key => format!("key:{}", key.entry.id),
        CacheScope::Namespace => format!("namespace:{}", key.namespace),
        CacheScope::Shared => "shared".to_owned(),
    };
    // The key is computed from the parsed body (normalised key order).
    share.reserve_trees(body, 1, "its cache key")?;
    Ok(
        match cache::key(&scope, &route.id, operation.label_str(), body) {
            Some(k) => CachePlan::Use {
                key: k,
                lookup: !cache_control.contains("no-cache"),
                store: true,
                ttl: std::time::Duration::from_millis(policy.ttl_ms),
                max_entry_bytes: policy.max_entry_bytes as usize,
            },
            None => CachePlan::Bypass,
        },
    )
}

/// The cached answer for a request, if the plan allows a lookup and there is one.
pub(super) async fn lookup(
    state: &AppState,
    route: &CompiledRoute,
    plan: &CachePlan,
) -> Option<Response> {
    let CachePlan::Use {
        key, lookup: true, ..
    } = plan
    else {
        return None;
    };
    let hit = state.cache.get(key).await?;
    state
        .metrics
        .cache
        .get_or_create(&CacheLabels {
            route: route.id.clone(),
            result: "hit",
        })
        .inc();
    let mut response = Response::new(axum::body::Body::from(hit.body));
    if let Ok(v) = http::HeaderValue::try_from(hit.content_type) {
        response.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    response
        .headers_mut()
        .insert(CACHE_HEADER, http::HeaderValue::from_static("hit"));
    Some(response)
}

/// Stores a fresh answer when the plan says so, and marks the response `miss` or `bypass`.
pub(super) async fn store(
    state: &AppState,
    route: &CompiledRoute,
    plan: CachePlan,
    mut response: Response,
) -> Response {
    let CachePlan::Use {
        key,
        store,
        ttl,
        max_entry_bytes,
        ..
    } = plan
    else {
        response
            .headers_mut()
            .insert(CACHE_HEADER, http::HeaderValue::from_static("bypass"));
        return response;
    };
    state
        .metrics
        .cache
        .get_or_create(&CacheLabels {
            route: route.id.clone(),
            result: "miss",
        })
        .inc();
    if !store || response.status() != http::StatusCode::OK {
        response
            .headers_mut()
            .insert(CACHE_HEADER, http::HeaderValue::from_static("miss"));
        return response;
    }
    let is_stream = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if is_stream {
        response
            .headers_mut()
            .insert(CACHE_HEADER, http::HeaderValue::from_static("miss"));
        // Without its ending the stream cannot be known complete: relayed, never stored.
        let ending = response.extensions().get::<crate::relay::Ending>().cloned();
        let (parts, body) = response.into_parts();
        let tee = tee_stream(body, ending, state.cache.clone(), key, ttl, max_entry_bytes);
        return Response::from_parts(parts, axum::body::Body::from_stream(tee));
    }
    let (mut parts, body) = response.into_parts();
    // Whole answers are already in memory; this only takes them back.
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    if bytes.len() <= max_entry_bytes {
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_owned();
        state.cache.put(key, bytes.clone(), content_type, ttl);
    }
    parts
        .headers
        .insert(CACHE_HEADER, http::HeaderValue::from_static("miss"));
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// Relays a streamed answer unchanged while keeping a copy, stored for replay once the
/// relay reports it complete (its final event relayed, no error event, no guardrail
/// block) within the size limit.
fn tee_stream(
    body: axum::body::Body,
    ending: Option<crate::relay::Ending>,
    cache: std::sync::Arc<cache::Cache>,
    key: [u8; 32],
    ttl: std::time::Duration,
    max_entry_bytes: usize,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, axum::Error>> + Send + 'static {
    use futures_util::StreamExt;
    let copy: Option<Vec<u8>> = Some(Vec::new());
    futures_util::stream::unfold(
        (body.into_data_stream(), copy),
        move |(mut inner, mut copy)| {
            let cache = cache.clone();
            let ending = ending.clone();
            async move {
                match inner.next().await {
                    Some(Ok(chunk)) => {
                        if let Some(buf) = copy.as_mut() {
                            if buf.len() + chunk.len() > max_entry_bytes {
                                copy = None;
                            } else {
                                buf.extend_from_slice(&chunk);
                            }
                        }
                        Some((Ok(chunk), (inner, copy)))
                    }
                    Some(Err(e)) => Some((Err(e), (inner, None))),
                    None => {
                        if let Some(buf) = copy.take() {
                            let complete = ending.as_ref().and_then(|e| e.get())
                                == Some(crate::relay::StreamEnd::Complete);
                            if complete {
                                cache.put(
                                    key,
                                    bytes::Bytes::from(buf),
                                    "text/event-stream".to_owned(),
                                    ttl,
                                );
                            }
                        }
                        None
                    }
                }
            }
        },
    )
}
