//! Probes: `/livez` (the process answers) and `/readyz` (a configuration is loaded and
//! the gateway is not draining), with details as JSON.

use std::sync::{Arc, atomic::Ordering};

use axum::{Json, extract::State, response::IntoResponse};
use http::StatusCode;
use serde_json::json;

use super::AppState;
use crate::limits::store::FailureMode;

pub async fn livez() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

pub async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let snapshot = state.config.current.load_full();
    let draining = state.draining.load(Ordering::Relaxed);
    // With failClosed, a replica that cannot reach Redis cannot serve limited requests.
    let redis_blocks =
        state.limits.redis_state() == Some(false) && state.limits.mode() == FailureMode::FailClosed;
    let (status, code) = match (&snapshot, draining) {
        (_, true) => ("draining", StatusCode::SERVICE_UNAVAILABLE),
        (None, false) => ("notReady", StatusCode::SERVICE_UNAVAILABLE),
        (Some(_), false) if redis_blocks => ("notReady", StatusCode::SERVICE_UNAVAILABLE),
        (Some(_), false) => ("ready", StatusCode::OK),
    };
    let body = json!({
        "status": status,
        "configHash": snapshot.as_ref().map(|s| s.config_hash.clone()),
        "keys": snapshot.as_ref().map(|s| s.key_count()),
        "reloads": {
            "succeeded": state.config.succeeded(),
            "failed": state.config.rejected(),
            "pending": state.config.pending(),
        },
        "lastError": state.config.last_error(),
        // An update that has not fully arrived (kubelet still syncing one of the mounted
        // objects): the current configuration keeps serving.
        "waitingFor": state.config.waiting_for(),
        "redis": match state.limits.redis_state() {
            None => json!(null),
            Some(up) => json!({ "reachable": up, "failureMode": state.limits.mode().as_str() }),
        },
    });
    (code, Json(body))
}
