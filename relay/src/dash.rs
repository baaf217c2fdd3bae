//! The dashboards, on the admin listener only (never on the public address): the pages and
//! their files (`/dash/…`, compiled into the binary from `relay/dash/`), the JSON API behind
//! every chart (`/api/v1/…`), and the login that turns the admin token into a session
//! cookie for a browser.
//!
//! Authentication is the admin listener's ([`crate::health::guard`]): with an admin token
//! configured, every page and API call needs it, as `Authorization: Bearer <token>` (tools)
//! or as the `trueup_admin` cookie that `POST /login` sets after comparing the submitted
//! token in constant time (`HttpOnly`, `SameSite=Strict`, path `/`; every API call is a GET,
//! so a cross-site form can only log someone in with a token it already knows). Without a
//! token configured, the admin listener is open (bind it to loopback or a private network).

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use trueup_reconcile::dashboards;
use trueup_reconcile::quality::{self, WINDOWS};

use crate::health::{AdminState, sink_views};
use crate::time::now_ms;

/// The session cookie's name.
pub const COOKIE: &str = "trueup_admin";

/// What the pages may load: their own files only (uPlot draws with inline styles).
const CSP: &str = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
                   frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The dashboards' files, compiled in: (name under /dash/, MIME type, bytes).
const FILES: &[(&str, &str, &[u8])] = &[
    ("quality", HTML, include_bytes!("../dash/quality.html")),
    ("business", HTML, include_bytes!("../dash/business.html")),
    ("behaviour", HTML, include_bytes!("../dash/behaviour.html")),
    ("dash.js", JS, include_bytes!("../dash/dash.js")),
    ("quality.js", JS, include_bytes!("../dash/quality.js")),
    ("business.js", JS, include_bytes!("../dash/business.js")),
    ("behaviour.js", JS, include_bytes!("../dash/behaviour.js")),
    ("dash.css", CSS, include_bytes!("../dash/dash.css")),
    (
        "vendor/uPlot.iife.min.js",
        JS,
        include_bytes!("../dash/vendor/uPlot.iife.min.js"),
    ),
    (
        "vendor/uPlot.min.css",
        CSS,
        include_bytes!("../dash/vendor/uPlot.min.css"),
    ),
    (
        "vendor/LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../dash/vendor/LICENSE"),
    ),
];

/// Whether a request presents the admin token (always, when none is configured): as
/// `Authorization: Bearer <token>`, or as the session cookie, which holds the token in hex
/// (a token may hold characters a cookie cannot). Compared in constant time.
pub(crate) fn authorized(token: Option<&str>, headers: &axum::http::HeaderMap) -> bool {
    let Some(token) = token else {
        return true;
    };
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    {
        return bool::from(bearer.ct_eq(token.as_bytes()));
    }
    let want = hex(token);
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .filter_map(|c| {
            c.trim_ascii()
                .strip_prefix(COOKIE.as_bytes())?
                .strip_prefix(b"=")
        })
        .any(|presented| bool::from(presented.ct_eq(want.as_bytes())))
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// `GET /dash/` and `/dash`: the quality page (the others come with their data).
pub async fn index() -> Redirect {
    Redirect::to("/dash/quality")
}

/// `GET /dash/{*file}`: a page or one of its files.
pub async fn file(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, mime, body)) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static(mime)),
                (
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(CSP),
                ),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such dashboard file\n").into_response(),
    }
}

/// The `?days=` of an API call.
#[derive(Deserialize)]
pub struct Window {
    days: Option<String>,
}

/// The window asked for, or the message saying what is allowed.
fn window(w: &Window) -> Result<u32, String> {
    let Some(raw) = w.days.as_deref() else {
        return Ok(7);
    };
    match raw.parse::<u32>() {
        Ok(d) if WINDOWS.contains(&d) => Ok(d),
        _ => Err(format!("days must be one of {WINDOWS:?}, got {raw:?}")),
    }
}

fn api_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "error": code, "message": message })),
    )
        .into_response()
}

/// `GET /api/v1/quality?days=1|7|30`: the data-quality report (see
/// [`trueup_reconcile::quality`]) with the sinks' backlog and lag.
pub async fn quality_api(State(st): State<AdminState>, Query(w): Query<Window>) -> Response {
    let days = match window(&w) {
        Ok(d) => d,
        Err(m) => return api_error(StatusCode::BAD_REQUEST, "invalid_query", &m),
    };
    match report(&st, move |cfg, stores| {
        quality::quality(&cfg.reconcile, stores, days, now_ms())
    })
    .await
    {
        Ok(mut body) => {
            body["sinks"] = serde_json::to_value(sink_views(&st)).unwrap_or_default();
            axum::Json(body).into_response()
        }
        Err(r) => r,
    }
}

/// Runs a report on the blocking pool (they read databases) and answers it as JSON.
async fn report<T: serde::Serialize + Send + 'static>(
    st: &AdminState,
    f: impl FnOnce(&crate::Config, &trueup_reconcile::Stores) -> T + Send + 'static,
) -> Result<serde_json::Value, Response> {
    let cfg = st.cfg.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let stores = cfg.reconcile_stores().map_err(|e| e.to_string())?;
        serde_json::to_value(f(&cfg, &stores)).map_err(|e| e.to_string())
    })
    .await;
    match outcome {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(api_error(StatusCode::INTERNAL_SERVER_ERROR, "config", &e)),
        Err(e) => Err(api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("the report failed: {e}"),
        )),
    }
}

/// `GET /api/v1/business?days=1|7|30`: the business report (see
/// [`trueup_reconcile::dashboards::business`]).
pub async fn business_api(State(st): State<AdminState>, Query(w): Query<Window>) -> Response {
    let days = match window(&w) {
        Ok(d) => d,
        Err(m) => return api_error(StatusCode::BAD_REQUEST, "invalid_query", &m),
    };
    match report(&st, move |cfg, stores| {
        dashboards::business(&cfg.reconcile, stores, days, now_ms())
    })
    .await
    {
        Ok(v) => axum::Json(v).into_response(),
        Err(r) => r,
    }
}

/// `GET /api/v1/behaviour?days=1|7|30`: the behaviour report with its measured loss (see
/// [`trueup_reconcile::dashboards::behaviour`]).
pub async fn behaviour_api(State(st): State<AdminState>, Query(w): Query<Window>) -> Response {
    let days = match window(&w) {
        Ok(d) => d,
        Err(m) => return api_error(StatusCode::BAD_REQUEST, "invalid_query", &m),
    };
    match report(&st, move |cfg, stores| {
        dashboards::behaviour(&cfg.reconcile, &cfg.dashboard, stores, days, now_ms())
    })
    .await
    {
        Ok(v) => axum::Json(v).into_response(),
        Err(r) => r,
    }
}

/// The login form, with a message above it.
pub(crate) fn login_page(status: StatusCode, message: &str) -> Response {
    let message = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>trueup · sign in</title><link rel=\"icon\" href=\"data:,\">\
         <link rel=\"stylesheet\" href=\"/dash/dash.css\"></head>\
         <body class=\"login\" data-state=\"login\"><main><h1>trueup dashboards</h1>\
         <p data-login-message>{message}</p>\
         <form method=\"post\" action=\"/login\"><label>Admin token \
         <input type=\"password\" name=\"token\" autocomplete=\"current-password\" required autofocus></label>\
         <button type=\"submit\">Sign in</button></form></main></body></html>"
    );
    let mut resp = (status, Html(body)).into_response();
    resp.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    resp
}

/// `GET /login`.
pub async fn login_form(State(st): State<AdminState>) -> Response {
    if st.token.is_none() {
        return Redirect::to("/dash/quality").into_response();
    }
    login_page(
        StatusCode::OK,
        "Sign in with the relay's admin token (admin_token, admin_token_file or TRUEUP_ADMIN_TOKEN).",
    )
}

/// The login form's fields.
#[derive(Deserialize)]
pub struct Login {
    token: String,
}

/// `POST /login`: the right token sets the session cookie and goes to the dashboards; a
/// wrong one answers 401 with the form again.
pub async fn login(State(st): State<AdminState>, Form(f): Form<Login>) -> Response {
    let Some(token) = st.token.as_deref() else {
        return Redirect::to("/dash/quality").into_response();
    };
    if !bool::from(f.token.as_bytes().ct_eq(token.as_bytes())) {
        return login_page(StatusCode::UNAUTHORIZED, "That is not the admin token.");
    }
    // The cookie is the token (in hex): every relay behind one admin token accepts it, and
    // changing the token signs every browser out.
    let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", hex(token));
    let mut resp = Redirect::to("/dash/quality").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("hex is a valid header value"),
    );
    resp
}

/// `POST /logout`: clears the cookie.
pub async fn logout() -> Response {
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("trueup_admin=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    resp
}
