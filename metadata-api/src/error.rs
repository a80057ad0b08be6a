//! The one error type of the HTTP API: a precise status and a JSON body a client can act on.

use std::time::Duration;

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;

use crate::{range::RangeError, store::StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("a valid bearer token is required")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("no such stream")]
    NotFound,
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid range: {0}")]
    Range(#[from] RangeError),
    #[error("{0}")]
    RangeNotSatisfiable(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    UnsupportedMedia(String),
    #[error("ingest budget exhausted ({budget}); retry later")]
    Throttled {
        budget: &'static str,
        retry_after: Duration,
    },
    #[error("authentication is unavailable; retry later")]
    AuthUnavailable,
    #[error("the request body did not arrive in time ({0:?} for its size)")]
    BodyTimeout(Duration),
    #[error("storage is unavailable; retry later")]
    Unavailable(#[source] object_store::Error),
    #[error("internal error")]
    Internal(String),
}

#[derive(Debug, Serialize)]
struct Body {
    error: &'static str,
    message: String,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::BadRequest(_) | Self::Range(_) => StatusCode::BAD_REQUEST,
            Self::RangeNotSatisfiable(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMedia(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Unavailable(_) | Self::AuthUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound => "not_found",
            Self::BadRequest(_) => "bad_request",
            Self::Range(_) => "bad_range",
            Self::RangeNotSatisfiable(_) => "range_not_satisfiable",
            Self::Conflict(_) => "conflict",
            Self::TooLarge(_) => "too_large",
            Self::UnsupportedMedia(_) => "unsupported_media_type",
            Self::Throttled { .. } => "throttled",
            Self::BodyTimeout(_) => "body_timeout",
            Self::Unavailable(_) | Self::AuthUnavailable => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    pub fn bad(msg: impl Into<String>) -> Self {
        Self::BadRequest(msg.into())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. } => Self::Conflict(e.to_string()),
            StoreError::BeyondFinal { .. } => Self::RangeNotSatisfiable(e.to_string()),
            StoreError::FinalLength { .. } => Self::Conflict(e.to_string()),
            StoreError::Corrupt { .. } => Self::Internal(e.to_string()),
            StoreError::Storage(source) => Self::Unavailable(source),
        }
    }
}
impl From<crate::kube_auth::AuthError> for ApiError {
    fn from(e: crate::kube_auth::AuthError) -> Self {
        use crate::kube_auth::AuthError;
        match e {
            AuthError::Unauthenticated => Self::Unauthorized,
            AuthError::Forbidden(why) => Self::Forbidden(why),
            AuthError::Unavailable => Self::AuthUnavailable,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // Logged once, here. Client mistakes at debug, our failures at warn/error.
        match &self {
            Self::Unavailable(source) => tracing::warn!(error = %source, "Storage call failed."),
            Self::Internal(detail) => tracing::error!(%detail, "Internal error."),
            other => tracing::debug!(status = status.as_u16(), error = %other, "Request refused."),
        }
        let body = Body {
            error: self.code(),
            message: self.to_string(),
        };
        let mut resp = (status, Json(body)).into_response();
        match &self {
            Self::Throttled { retry_after, .. } => {
                resp.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(*retry_after)),
                );
            }
            Self::Unavailable(_) | Self::AuthUnavailable => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            }
            Self::Unauthorized => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }
}

/// Whole seconds, rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}
