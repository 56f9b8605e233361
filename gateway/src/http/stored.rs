//! The Responses API's stored responses: `GET` and `DELETE /v1/responses/{id}` and
//! `GET /v1/responses/{id}/input_items`, for the key's owner only
//! (`crate::stored_responses`), sent to the Provider that stores the response with its
//! credential. A retrieved response passes the response guardrails of the route it was
//! created through, as it did when it was created.

use std::{sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{Path, Request, State},
    response::{IntoResponse, Response},
};
use http::{Method, header};

use super::{AppState, auth::authenticate_client, guardrails, request_id};
use crate::{
    dialects::Dialect,
    error::ApiError,
    relay,
    stored_responses::{Owner, scope_of},
};

/// `GET` / `DELETE /v1/responses/{id}`.
pub async fn response(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    serve(&state, &id, "", request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v1/responses/{id}/input_items`.
pub async fn input_items(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    serve(&state, &id, "/input_items", request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn serve(
    state: &AppState,
    id: &str,
    tail: &str,
    request: Request,
) -> Result<Response, ApiError> {
    let snapshot = state.snapshot()?;
    let (parts, _) = request.into_parts();
    let request_id = request_id(&parts.headers);
    let key = authenticate_client(state, &parts, &snapshot)?;
    let not_found = || ApiError::ResponseNotFound(id.chars().take(128).collect());
    let owner = state.stored.owner(id).await.map_err(|e| {
        tracing::warn!(error = %e, "stored-response records unreadable");
        ApiError::UpstreamUnavailable(
            "The gateway cannot check who owns this response right now; retry later.".into(),
        )
    })?;
    // Another owner's response is as unknown as one never stored.
    let Some(Owner {
        scope: _,
        provider,
        route,
    }) = owner.filter(|o| o.scope == scope_of(&key))
    else {
        return Err(not_found());
    };
    let provider = snapshot.provider(&provider).ok_or_else(not_found)?;
    let (Some(adapter), Some(client)) = (provider.adapter, provider.client.as_ref()) else {
        return Err(not_found());
    };
    let base = adapter
        .responses_base(&provider.config)
        .ok_or_else(not_found)?;
    let mut url = format!("{base}/responses/{id}{tail}");
    // Pagination of input items (`after`, `limit`, `order`, `include`).
    if let Some(query) = parts.uri.query().filter(|_| !tail.is_empty()) {
        url.push('?');
        url.push_str(query);
    }
    let headers = crate::providers::headers(
        adapter,
        &provider.config,
        provider.credential.as_deref(),
        &request_id,
    );
    let timeout = Duration::from_millis(provider.config.request_timeout_ms);
    let method = if parts.method == Method::DELETE {
        reqwest::Method::DELETE
    } else {
        reqwest::Method::GET
    };
    let sent = tokio::time::timeout(
        timeout,
        client.request(method, &url).headers(headers).send(),
    )
    .await;
    let upstream = match sent {
        Ok(Ok(r)) => r,
        Err(_) => return Err(ApiError::UpstreamTimeout),
        Ok(Err(_)) => {
            return Err(ApiError::Upstream(format!(
                "The upstream provider {} could not be reached.",
                provider.config.id
            )));
        }
    };
    let deadline = std::time::Instant::now() + timeout;
    let status = upstream.status();
    if !status.is_success() {
        let secrets = provider.secrets();
        let conversion = relay::Conversion::passthrough(Dialect::Responses);
        return relay::upstream_error(upstream, deadline, &conversion, &secrets)
            .await
            .map_err(|_| ApiError::UpstreamTimeout);
    }
    if parts.method == Method::DELETE {
        state.stored.forget(id).await;
    }
    let body = upstream
        .bytes()
        .await
        .map_err(|_| ApiError::Upstream("The upstream answer broke off.".into()))?;
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    // What the model said passes the response rules again; input items are the owner's
    // own requests.
    match snapshot.route_by_id(&route) {
        Some(route) if parts.method == Method::GET && tail.is_empty() => {
            guardrails::apply_response(state, &snapshot, route, &key, &request_id, response).await
        }
        _ => Ok(response),
    }
}
