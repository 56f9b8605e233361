//! `POST /v1/chat/completions`.

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
    forward(Forward {
        snapshot: &snapshot,
        route,
        head: &head,
        body,
        request_id: request_id(&parts.headers),
        operation: Operation::ChatCompletions,
    })
    .await
}
