//! `GET /v1/models`: exactly the models the calling key can reach (its namespace's routes
//! and the shared ones it accepts) and may use (its allow-list).

use std::sync::Arc;

use axum::{Json, extract::State};
use serde_json::{Value, json};

use super::{AppState, auth::calling_key};
use crate::error::ApiError;

pub async fn list_models(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
) -> Result<Json<Value>, ApiError> {
    let (snapshot, key) = calling_key(&state, request)?;
    let data: Vec<Value> = snapshot
        .model_names(&key)
        .into_iter()
        .filter(|(name, _)| key.may_use(name))
        .map(|(id, owned_by)| json!({ "id": id, "object": "model", "created": 0, "owned_by": owned_by }))
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}
