//! The OpenAI-style endpoints: `POST /v1/chat/completions`, `/v1/completions` and
//! `/v1/embeddings`. Each authenticates, resolves the route, checks the key may use the
//! model, and forwards.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    response::Response,
};

use super::{AppState, auth::authenticate, read_body, request_id};
use crate::{
    error::ApiError,
    proxy::{Forward, forward},
    request::parse_head,
    upstream::Operation,
};

pub async fn chat_completions(
    state: State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    handle(state, request, Operation::ChatCompletions).await
}

pub async fn completions(
    state: State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    handle(state, request, Operation::Completions).await
}

pub async fn embeddings(
    state: State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    handle(state, request, Operation::Embeddings).await
}

async fn handle(
    State(state): State<Arc<AppState>>,
    request: Request,
    operation: Operation,
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
    forward(Forward {
        snapshot: &snapshot,
        route,
        head: &head,
        body,
        request_id: request_id(&parts.headers),
        operation,
        breakers: &state.breakers,
    })
    .await
}
