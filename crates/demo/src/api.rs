//! The shop's JSON API: signup and checkout. Each writes the system of record in one
//! transaction, then — only after the commit — emits the business event through the server
//! emitter. Emitting never fails the request: a full emitter buffer is logged, and the fact
//! stays in the database for a re-emit.
//!
//! Errors answer `{"error": code, "message": text}` (the relay's [`ErrorBody`] shape) with
//! 400 for bad input, 404 for an unknown user, 409 for a taken email or a reused key, 503 for
//! an injected fault; internal details are logged, never sent.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use trueup_emitter::ServerEvent;
use trueup_protocol::ErrorBody;

use crate::AppState;
use crate::attribution;
use crate::db::{self, DbError, NewOrder, NewUser};
use crate::time::{now_ms, parse_rfc3339, to_rfc3339};

/// A request the shop refuses.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not the JSON expected, or a field is invalid.
    #[error("{code}: {message}")]
    BadRequest {
        /// Stable code.
        code: &'static str,
        /// What to fix.
        message: String,
    },
    /// 404: the user does not exist.
    #[error("{0}")]
    UnknownUser(String),
    /// 409: a conflict with what is stored.
    #[error("{code}: {message}")]
    Conflict {
        /// Stable code.
        code: &'static str,
        /// What conflicts.
        message: String,
    },
    /// 415: not JSON.
    #[error("expected Content-Type: application/json")]
    NotJson,
    /// 503: `--flaky-checkout` answered after committing.
    #[error("injected fault")]
    InjectedFault,
    /// 500: logged; the client gets a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> ApiError {
        match e {
            DbError::EmailTaken => ApiError::Conflict {
                code: "email_taken",
                message: "an account with this email already exists".into(),
            },
            DbError::KeyReused => ApiError::Conflict {
                code: "idempotency_key_reused",
                message: "this idempotency key belongs to another order".into(),
            },
            DbError::UnknownUser => ApiError::UnknownUser("no user with this id".into()),
            DbError::Sqlite(e) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        match r {
            JsonRejection::MissingJsonContentType(_) => ApiError::NotJson,
            other => ApiError::bad("invalid_json", other.body_text()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            ApiError::BadRequest { code, message } => (StatusCode::BAD_REQUEST, code, message),
            ApiError::UnknownUser(message) => (StatusCode::NOT_FOUND, "unknown_user", message),
            ApiError::Conflict { code, message } => (StatusCode::CONFLICT, code, message),
            ApiError::NotJson => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not_json",
                "send the body as JSON with Content-Type: application/json".into(),
            ),
            ApiError::InjectedFault => (
                StatusCode::SERVICE_UNAVAILABLE,
                "flaky_checkout",
                "injected fault (--flaky-checkout): retry with the same idempotency key".into(),
            ),
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "something went wrong; try again".into(),
                )
            }
        };
        let body = ErrorBody {
            error: code.to_string(),
            message,
        };
        (status, Json(body)).into_response()
    }
}

/// `Json<T>` whose rejections answer in the shop's error format.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// `POST /api/signup` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignupRequest {
    /// The account's email.
    pub email: String,
    /// The plan chosen, e.g. `pro`.
    pub plan: String,
    /// The agent's anonymous id, if the page has it.
    #[serde(default)]
    pub anon_id: Option<String>,
    /// `trueup.attribution()` at submit time.
    #[serde(default)]
    pub attribution: Option<Value>,
}

/// `POST /api/checkout` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    /// The buyer.
    pub user_id: String,
    /// Chosen by the page once per checkout and sent with every retry of it.
    pub idempotency_key: String,
    /// Amount in the currency's minor unit.
    pub amount_cents: i64,
    /// ISO 4217 code, e.g. `EUR`.
    pub currency: String,
}

fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    email.len() <= 254
        && !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains('@')
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn valid_token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn stored_ms(created_at: &str) -> Result<i64, ApiError> {
    parse_rfc3339(created_at)
        .ok_or_else(|| ApiError::Internal(format!("bad created_at {created_at:?}")))
}

/// The `signup_completed` event of a stored user: keyed by the user id and stamped with its
/// `created_at`, so every emit of it (the first, or a re-emit at start) has the same id.
pub fn signup_event(user: &db::Signup) -> Result<ServerEvent, ApiError> {
    let mut event = ServerEvent::new("signup_completed", &user.id, stored_ms(&user.created_at)?)
        .user_id(&user.id)
        .prop("plan", user.plan.as_str());
    if let Some(anon) = &user.anon_id {
        event = event.anon_id(anon);
    }
    Ok(event)
}

/// The `order_paid` event of a stored order, keyed by the order id.
pub fn order_event(order: &db::Order) -> Result<ServerEvent, ApiError> {
    let mut event = ServerEvent::new("order_paid", &order.id, stored_ms(&order.created_at)?)
        .user_id(&order.user_id)
        .prop("order_id", order.id.as_str())
        .prop("amount", order.amount_cents as f64 / 100.0)
        .prop("currency", order.currency.as_str());
    if let Some(anon) = &order.anon_id {
        event = event.anon_id(anon);
    }
    Ok(event)
}

/// Creates the account, keeps its attribution, then emits `signup_completed`.
pub async fn signup(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<SignupRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let email = req.email.trim().to_lowercase();
    if !valid_email(&email) {
        return Err(ApiError::bad(
            "invalid_email",
            "email must look like name@example.com",
        ));
    }
    let plan = req.plan.trim().to_string();
    if !valid_token(&plan, 64) {
        return Err(ApiError::bad(
            "invalid_plan",
            "plan must be 1 to 64 letters, digits, '-' or '_'",
        ));
    }
    let anon_id = match req.anon_id.map(|a| a.trim().to_string()) {
        Some(a) if a.is_empty() => None,
        Some(a) if !valid_token(&a, 200) => {
            return Err(ApiError::bad(
                "invalid_anon_id",
                "anon_id must be an id of at most 200 characters",
            ));
        }
        other => other,
    };
    let attribution = attribution::from_page(req.attribution.as_ref())
        .map_err(|m| ApiError::bad("invalid_attribution", m))?;
    let created_ms = now_ms();
    let user = NewUser {
        id: uuid::Uuid::now_v7().to_string(),
        email,
        anon_id,
        plan,
        created_at: to_rfc3339(created_ms),
        attribution,
    };
    let stored = user.clone();
    st.db
        .run(move |conn| db::insert_user(conn, &stored))
        .await?;
    tracing::info!(user_id = %user.id, known = user.attribution.known, "signup stored");

    st.emit(signup_event(&db::Signup {
        id: user.id.clone(),
        anon_id: user.anon_id.clone(),
        plan: user.plan.clone(),
        created_at: user.created_at.clone(),
    })?);
    Ok((StatusCode::CREATED, Json(json!({ "user_id": user.id }))))
}

/// Creates the order once per idempotency key, emits `order_paid` (again on a retry: the
/// event id is the same, so the relay stores it once), and answers the order.
pub async fn checkout(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<CheckoutRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if req.user_id.is_empty() || req.user_id.len() > 64 {
        return Err(ApiError::bad("invalid_user_id", "user_id is required"));
    }
    if !valid_token(&req.idempotency_key, 200) || req.idempotency_key.len() < 8 {
        return Err(ApiError::bad(
            "invalid_idempotency_key",
            "idempotency_key must be 8 to 200 letters, digits, '-', '_', '.' or ':'",
        ));
    }
    if !(1..=10_000_000_000).contains(&req.amount_cents) {
        return Err(ApiError::bad(
            "invalid_amount",
            "amount_cents must be a whole number from 1 to 10000000000",
        ));
    }
    if req.currency.len() != 3 || !req.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ApiError::bad(
            "invalid_currency",
            "currency must be an ISO 4217 code like EUR",
        ));
    }
    let new = NewOrder {
        id: uuid::Uuid::now_v7().to_string(),
        user_id: req.user_id,
        idempotency_key: req.idempotency_key,
        amount_cents: req.amount_cents,
        currency: req.currency,
        created_at: to_rfc3339(now_ms()),
    };
    let (order, created) = st
        .db
        .run(move |conn| db::find_or_create_order(conn, &new))
        .await?;
    if created {
        tracing::info!(order_id = %order.id, "order stored");
    }
    st.emit(order_event(&order)?);
    if st.flaky_now() {
        return Err(ApiError::InjectedFault);
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({
            "order_id": order.id,
            "amount_cents": order.amount_cents,
            "currency": order.currency,
            "created_at": order.created_at,
            "created": created,
        })),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_checked_loosely_but_surely() {
        for ok in ["a@shop.example", "first.last+tag@mail.co.uk"] {
            assert!(valid_email(ok), "{ok}");
        }
        for bad in [
            "",
            "a",
            "@shop.example",
            "a@shop",
            "a@.example",
            "a b@shop.example",
            "a@b@c.example",
        ] {
            assert!(!valid_email(bad), "{bad}");
        }
    }

    #[test]
    fn tokens_are_short_plain_ascii() {
        assert!(valid_token("pro", 64));
        assert!(valid_token("018f-aa_b.c:d", 64));
        assert!(!valid_token("", 64));
        assert!(!valid_token("has space", 64));
        assert!(!valid_token(&"x".repeat(65), 64));
    }
}
