//! `POST /v1/chat/completions`.

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    body::Body,
    extract::{Request, State},
    response::{IntoResponse, Response},
};
use http::{HeaderValue, header};
use tollgate_api::v1alpha1::ProviderType;

use super::{AppState, auth::authenticate, read_body, request_id};
use crate::{
    error::ApiError,
    providers::mock,
    request::{estimate_prompt_tokens, parse_head},
};

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let snapshot = state.snapshot()?;
    let (parts, body) = request.into_parts();
    let key = authenticate(&parts.headers, &snapshot)?;
    let body = read_body(body, state.max_body_bytes).await?;
    let head = parse_head(&body)?;
    let route = snapshot
        .route(&head.model)
        .ok_or_else(|| ApiError::ModelNotFound(head.model.clone()))?;
    if !key.may_use(&head.model) {
        return Err(ApiError::ModelNotAllowed(head.model.clone()));
    }

    // Target choice, retries and upstream calls grow here; today the first weighted
    // target of the first tier answers.
    let target = route
        .tiers
        .iter()
        .flatten()
        .find(|t| t.weight > 0)
        .ok_or_else(|| ApiError::Internal(request_id(&parts.headers)))?;
    let provider = snapshot
        .provider(&target.provider)
        .ok_or_else(|| ApiError::Internal(request_id(&parts.headers)))?;
    let ProviderType::Mock = provider.config.provider_type else {
        return Err(ApiError::bad_request(
            format!(
                "The model `{}` is routed to a {} provider, which this gateway build cannot call yet.",
                head.model,
                provider.config.provider_type.as_str()
            ),
            Some("model"),
        ));
    };
    let settings = provider
        .config
        .mock
        .clone()
        .unwrap_or(tollgate_api::config::CompiledMock {
            latency_ms: 0,
            chunk_interval_ms: 0,
            completion_tokens: 16,
            reply: None,
        });

    let id = format!("chatcmpl-{}", request_id(&parts.headers));
    let created = jiff::Timestamp::now().as_second();
    let answer = mock::answer(&settings, &body, estimate_prompt_tokens(&body));
    if settings.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(settings.latency_ms)).await;
    }
    if head.stream {
        let include_usage = head.include_usage();
        let stream = mock::chat_stream(answer, &settings, id, head.model, created, include_usage);
        let mut response = Response::new(Body::from_stream(futures_util::StreamExt::map(
            stream,
            Ok::<_, std::io::Error>,
        )));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        return Ok(response);
    }
    Ok(Json(mock::chat_completion(&answer, &id, &head.model, created)).into_response())
}
