//! Client authentication: `Authorization: Bearer <key>` or `x-api-key: <key>`, looked up by
//! SHA-256 in the snapshot. Every failure is the same 401, except a generated-looking key
//! with a wrong checksum, which is told apart (it reveals nothing) so typos are obvious.

use std::sync::Arc;

use http::{HeaderMap, header};

use crate::{
    error::ApiError,
    revocation::Revocations,
    snapshot::{Key, Snapshot, key_hash},
};

/// The key presented by the client, if any.
fn presented(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, token) = value.trim().split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim());
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// [`authenticate`], throttled per client address: an address past its allowance of
/// failures gets 429 before any lookup, and each failure counts against it.
pub fn authenticate_client(
    state: &super::AppState,
    parts: &http::request::Parts,
    snapshot: &Snapshot,
) -> Result<Arc<Key>, ApiError> {
    let client = parts.extensions.get::<super::ClientAddr>().map(|c| c.0);
    if let Some(ip) = client
        && let Some(wait) = state.auth_throttle.check(ip)
    {
        return Err(ApiError::AuthThrottled(wait));
    }
    let key = authenticate(&parts.headers, snapshot, &state.revocations);
    if key.is_err()
        && let Some(ip) = client
    {
        state.auth_throttle.failed(ip);
    }
    key
}

/// The configuration and the calling key of a bodiless request (`GET /v1/models`,
/// `/v1/usage`), through [`authenticate_client`].
pub fn calling_key(
    state: &super::AppState,
    request: axum::extract::Request,
) -> Result<(Arc<Snapshot>, Arc<Key>), ApiError> {
    let snapshot = state.snapshot()?;
    let (parts, _) = request.into_parts();
    let key = authenticate_client(state, &parts, &snapshot)?;
    Ok((snapshot, key))
}

/// The calling key, or 401 for a missing, unknown, revoked or expired one.
pub fn authenticate(
    headers: &HeaderMap,
    snapshot: &Snapshot,
    revocations: &Revocations,
) -> Result<Arc<Key>, ApiError> {
    let token = presented(headers)
        .filter(|t| !t.is_empty())
        .ok_or(ApiError::Unauthorized)?;
    if tollgate_api::key_format::shape(token) == tollgate_api::key_format::Shape::BadChecksum {
        // Refused without a lookup, with the same answer as any other bad key; the
        // operator's log says why (never the key itself).
        tracing::debug!("a presented key failed its checksum (mistyped or truncated)");
        return Err(ApiError::Unauthorized);
    }
    let hash = key_hash(token);
    let key = snapshot.key_by_hash(&hash).ok_or(ApiError::Unauthorized)?;
    if revocations.is_revoked(&hash) {
        return Err(ApiError::Unauthorized);
    }
    if let Some(expires_at) = key.entry.expires_at
        && jiff::Timestamp::now().as_second() >= expires_at
    {
        return Err(ApiError::Unauthorized);
    }
    Ok(key.clone())
}
