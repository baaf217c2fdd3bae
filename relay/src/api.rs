//! The relay's whole-request errors and how each maps to an HTTP answer.
//!
//! Every error answers with [`trueup_protocol::ErrorBody`] JSON: a stable code and a short
//! message. Internal details are logged, never sent to clients.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use trueup_protocol::ErrorBody;

/// A request the relay refuses as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body cannot be read as a batch.
    #[error("{code}: {message}")]
    BadRequest {
        /// Stable code.
        code: &'static str,
        /// Detail.
        message: String,
    },
    /// 401: the server path without a valid secret.
    #[error("unauthorized")]
    Unauthorized,
    /// 403: unknown site key or an Origin the site does not allow.
    #[error("{code}: {message}")]
    Forbidden {
        /// Stable code.
        code: &'static str,
        /// Detail.
        message: String,
    },
    /// 413: body, decompressed body or event count over the limit.
    #[error("{code}: {message}")]
    TooLarge {
        /// Stable code.
        code: &'static str,
        /// Detail.
        message: String,
    },
    /// 415: a content type other than JSON or text/plain.
    #[error("unsupported content type")]
    UnsupportedMediaType,
    /// 429: rate limited.
    #[error("rate limited ({scope})")]
    RateLimited {
        /// `ip` or `site`.
        scope: &'static str,
        /// Seconds to wait.
        retry_after: u64,
    },
    /// 503: spool full, storage failing, or shutting down.
    #[error("{code}")]
    Unavailable {
        /// Stable code.
        code: &'static str,
        /// Seconds to wait.
        retry_after: u64,
    },
}

impl ApiError {
    pub(crate) fn bad(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::TooLarge {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Forbidden {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. }
            | ApiError::Forbidden { code, .. }
            | ApiError::TooLarge { code, .. } => code,
            ApiError::Unauthorized => "unauthorized",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Unavailable { code, .. } => code,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        metrics::counter!("trueup_requests_rejected_total", "code" => self.code()).increment(1);
        let message = match &self {
            ApiError::BadRequest { message, .. }
            | ApiError::Forbidden { message, .. }
            | ApiError::TooLarge { message, .. } => message.clone(),
            ApiError::Unauthorized => {
                "a valid server secret is required (Authorization: Bearer …)".into()
            }
            ApiError::UnsupportedMediaType => {
                "send the batch as text/plain or application/json".into()
            }
            ApiError::RateLimited { scope, .. } => {
                format!("too many requests for this {scope}; retry later")
            }
            ApiError::Unavailable { code, .. } => match *code {
                "shutting_down" => "the relay is restarting; retry later".into(),
                "spool_full" => "the relay is saturated; retry later".into(),
                "busy" => "the relay is reading too many requests at once; retry".into(),
                "storage_full" => "the relay's disk is full; retry later".into(),
                _ => "the relay cannot store events right now; retry later".into(),
            },
        };
        let body = ErrorBody {
            error: self.code().to_string(),
            message,
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if let ApiError::RateLimited { retry_after, .. }
        | ApiError::Unavailable { retry_after, .. } = self
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
