//! API errors: each one knows its HTTP status and becomes `{"error": "..."}`.

use crate::fork::envelope::EnvelopeError;
use crate::fork::host::HostForkError;
use crate::fork::hosted::HostedError;
use crate::fork::ForkError;
use crate::vmm::memory::MemoryError;
use crate::vmm::VmError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::types::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, missing / wrong-typed / unknown fields, bad sizes.
    #[error("{0}")]
    BadRequest(String),
    /// A TCP request without the right bearer token.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("no VM with id '{0}'")]
    NoSuchVm(String),
    #[error("no route for {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// The VM is in a state that does not allow the request.
    #[error("{0}")]
    Conflict(String),
    #[error("cannot boot the guest")]
    Boot(#[source] VmError),
    #[error("cannot fork {vm}")]
    Fork {
        vm: String,
        #[source]
        source: HostForkError,
    },
    #[error("the VM limit ({0}) is reached; DELETE a VM first")]
    TooManyVms(usize),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A placement naming unknown hosts or counts that do not add up.
    #[error("placement: {0}")]
    Placement(String),
    #[error("no family {0} on this host")]
    NoSuchFamily(u64),
    #[error("cannot host the family's clones")]
    Hosted(#[source] HostedError),
    #[error("this daemon has no cluster token (--token-file) and no peers: it cannot {0}")]
    NoCluster(&'static str),
    /// A well-formed request this host cannot carry out (e.g. a clone
    /// onto its parent's host, an unknown destination).
    #[error("{0}")]
    Unprocessable(String),
    /// Another daemon this request needed refused or did not answer.
    #[error("{0}")]
    BadGateway(String),
    #[error("no migration of '{0}' on this host")]
    NoSuchMigration(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NoSuchVm(_) | ApiError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Boot(e) => match e {
                VmError::Boot(_)
                | VmError::BadVcpus(_)
                | VmError::Memory(MemoryError::BadSize(_)) => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::Fork { source, .. } => match source {
                HostForkError::BadClones { .. }
                | HostForkError::Fork(ForkError::BadClones { .. }) => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                e if e.is_refusal() => StatusCode::CONFLICT,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::TooManyVms(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Placement(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NoSuchFamily(_) => StatusCode::NOT_FOUND,
            ApiError::NoCluster(_) => StatusCode::CONFLICT,
            ApiError::Hosted(e) => match e {
                HostedError::Envelope(EnvelopeError::Mac) => StatusCode::FORBIDDEN,
                HostedError::Envelope(EnvelopeError::CpuMismatch { .. }) => StatusCode::CONFLICT,
                HostedError::Envelope(EnvelopeError::Kvm(_)) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            },
            ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::NoSuchMigration(_) => StatusCode::NOT_FOUND,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!("api: {}", crate::errors::chain(&self));
        }
        (
            status,
            Json(ErrorBody {
                error: crate::errors::chain(&self),
            }),
        )
            .into_response()
    }
}
