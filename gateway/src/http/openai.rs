//! The OpenAI-style endpoints: `POST /v1/chat/completions`, `/v1/completions`,
//! `/v1/embeddings`, `/v1/responses`, and the ones forwarded as they are
//! (`/v1/moderations`, `/v1/images/generations`, `/v1/audio/speech`,
//! `/v1/audio/transcriptions`), served by the shared pipeline (`pipeline.rs`) with errors
//! in OpenAI's shape.

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

pub async fn moderations(state: State<Arc<AppState>>, request: Request) -> Response {
    handle(
        state,
        request,
        Operation::Moderations,
        ApiError::into_response,
    )
    .await
}

pub async fn image_generations(state: State<Arc<AppState>>, request: Request) -> Response {
    handle(
        state,
        request,
        Operation::ImageGenerations,
        ApiError::into_response,
    )
    .await
}

pub async fn audio_speech(state: State<Arc<AppState>>, request: Request) -> Response {
    handle(
        state,
        request,
        Operation::AudioSpeech,
        ApiError::into_response,
    )
    .await
}

pub async fn audio_transcriptions(state: State<Arc<AppState>>, request: Request) -> Response {
    handle(
        state,
        request,
        Operation::AudioTranscriptions,
        ApiError::into_response,
    )
    .await
}
