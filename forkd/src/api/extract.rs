//! Request pieces every handler module shares: the body as JSON (every
//! rejection a JSON error), a VM id from the path, and blocking work on
//! tokio's blocking pool.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::Path;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::types::parse_vm_id;

/// Runs blocking registry work off the async executor.
pub(super) async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("request worker failed: {e}")))?
}

pub(super) fn parse_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError::BadRequest(format!("cannot read the body: {e}")))?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest(
            "the request body is empty; a JSON object is expected".into(),
        ));
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))
}

pub(super) fn vm_path(path: Result<Path<String>, PathRejection>) -> Result<u64, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    parse_vm_id(&id).ok_or(ApiError::NoSuchVm(id))
}
