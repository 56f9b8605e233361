//! Anthropic's `POST /v1/messages`, for Anthropic-native clients. Errors come in
//! Anthropic's shape (`{"type":"error","error":{"type","message"}}`).

use std::sync::Arc;

use axum::{
    Json,
    extract::{Request, State},
    response::{IntoResponse, Response},
};

use super::{AppState, pipeline::handle};
use crate::{dialects::Operation, error::ApiError, translate};

pub async fn messages(state: State<Arc<AppState>>, request: Request) -> Response {
    handle(state, request, Operation::Messages, anthropic_error).await
}

/// `POST /v1/messages/count_tokens`.
pub async fn count_tokens(state: State<Arc<AppState>>, request: Request) -> Response {
    handle(state, request, Operation::CountTokens, anthropic_error).await
}

/// An error in Anthropic's shape.
fn anthropic_error(error: ApiError) -> Response {
    let status = error.status();
    let mut response = (
        status,
        Json(translate::openai_error_to_anthropic(
            &error.body(),
            status.as_u16(),
        )),
    )
        .into_response();
    // Keep headers such as Retry-After that the OpenAI rendering adds.
    let openai = error.into_response();
    for (name, value) in openai.headers() {
        if name != http::header::CONTENT_TYPE && name != http::header::CONTENT_LENGTH {
            response.headers_mut().insert(name.clone(), value.clone());
        }
    }
    response
}
