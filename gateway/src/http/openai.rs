//! The OpenAI-style endpoints: `POST /v1/chat/completions`, `/v1/completions`,
//! `/v1/embeddings` and `/v1/responses`, served by the shared pipeline (`pipeline.rs`) with errors in OpenAI's
//! shape.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    response::{IntoResponse, Response},
};

use super::{AppState, pipeline::handle};
use crate::{dialects::Operation, error::ApiError};

pub async fn chat_completions(state: State<Arc<AppState>>, request: Request) -> Response {
    handle(
        state,
        request,
        Operation::ChatCompletions,
        ApiError::into_response,
    )
    .await
}

pub async fn completions(state: State<Arc<AppState>>, request: Request) -> Response {
    handle(
        state,
        request,
        Operation::Completions,
        ApiError::into_response,
    )
    .await
}

pub async fn responses(state: State<Arc<AppState>>, request: Request) -> Response {
    handle(
        state,
        request,
        Operation::Responses,
        ApiError::into_response,
    )
    .await
}

pub async fn embeddings(state: State<Arc<AppState>>, request: Request) -> Response {
    handle(
        state,
        request,
        Operation::Embeddings,
        ApiError::into_response,
    )
    .await
}
