//! Liveness, readiness, sinks and metrics, served on the admin address only.
//!
//! Liveness comes from heartbeats: the spool writer and every forwarder stamp a time as they
//! loop; a component that has not stamped within [`STALE_MS`] is reported dead. Readiness is
//! separate: the relay is ready when it can take and store events — it is not shutting down,
//! its last spool transaction committed and the spool is under its size limit. A sink that is
//! down does not make the relay unready (events keep being spooled for it, and the spool's
//! size limit answers 503 to clients before the disk fills); `/sinks` says which sink is
//! failing, since when, and how far behind it is.
//!
//! With an admin token configured ([`require_token`]), every endpoint needs it
//! (`Authorization: Bearer <token>`, compared in constant time; otherwise `401` with
//! `WWW-Authenticate`), except that `/healthz` and `/readyz` still answer their status code
//! to anyone, with a bare `ok` / `unavailable` body: load balancers can probe, and only a
//! holder of the token reads the reasons.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

use crate::forwarder::ForwarderHealth;
use crate::spool::{SinkProgress, Spool};
use crate::time::now_ms;

/// A heartbeat older than this means the component is stuck.
pub const STALE_MS: i64 = 10_000;

/// One sink as the admin endpoints see it.
#[derive(Clone)]
pub struct SinkStatus {
    /// Its configured name.
    pub name: String,
    /// Its kind.
    pub kind: &'static str,
    /// Its forwarder's heartbeats and counts.
    pub health: Arc<ForwarderHealth>,
    /// Its cursor and backlog.
    pub progress: Arc<SinkProgress>,
}

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// The spool.
    pub spool: Arc<Spool>,
    /// The sinks, in configuration order.
    pub sinks: Vec<SinkStatus>,
    /// The spool size limit.
    pub spool_max_bytes: u64,
    /// Set during shutdown.
    pub shutting_down: Arc<AtomicBool>,
    /// Renders the metrics.
    pub metrics: PrometheusHandle,
    /// The admin token, when one is configured.
    pub token: Option<Arc<str>>,
    /// The configuration (the dashboards read its stores and metrics).
    pub cfg: Arc<crate::Config>,
}

/// `GET /healthz`: 200 when the spool writer and every forwarder are alive.
pub async fn healthz(State(st): State<AdminState>) -> impl IntoResponse {
    let now = now_ms();
    let writer_age = now - st.spool.stats().last_beat_ms.load(Ordering::Relaxed);
    let mut problems = Vec::new();
    if writer_age > STALE_MS {
        problems.push(format!("spool writer silent for {writer_age} ms"));
    }
    for s in &st.sinks {
        let age = now - s.health.last_beat_ms.load(Ordering::Relaxed);
        if age > STALE_MS {
            problems.push(format!("forwarder of sink {} silent for {age} ms", s.name));
        }
    }
    answer(problems)
}

/// `GET /readyz`: 200 when the relay can take and store events.
pub async fn readyz(State(st): State<AdminState>) -> impl IntoResponse {
    let mut problems = Vec::new();
    if st.shutting_down.load(Ordering::Relaxed) {
        problems.push("shutting down".to_string());
    }
    let stats = st.spool.stats();
    if !stats.healthy.load(Ordering::Relaxed) {
        problems.push("last spool transaction failed".into());
    }
    if stats.bytes.load(Ordering::Relaxed) > st.spool_max_bytes {
        problems.push("spool over its size limit".into());
    }
    answer(problems)
}

/// The admin listener's guard (see the module docs).
pub async fn require_token(
    State(st): State<AdminState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    guard(st.token.as_deref(), true, req, next).await
}

/// The guard of an admin listener with `token` (the relay's and the loader's).
/// `dashboards`: it serves them (`/login`, `/dash/…`: an HTML sign-in page instead of 401 JSON).
pub(crate) async fn guard(
    token: Option<&str>,
    dashboards: bool,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let path = req.uri().path();
    // The sign-in page and its stylesheet (no data in either) are open.
    let open = dashboards && matches!(path, "/login" | "/dash/dash.css");
    if open || crate::dash::authorized(token, req.headers()) {
        return next.run(req).await;
    }
    if dashboards && (path == "/dash" || path.starts_with("/dash/")) {
        return crate::dash::login_page(
            StatusCode::UNAUTHORIZED,
            "The dashboards need the relay's admin token: sign in.",
        );
    }
    let probe = matches!(path, "/healthz" | "/readyz");
    if probe {
        let status = next.run(req).await.status();
        let body = if status.is_success() {
            "ok\n"
        } else {
            "unavailable\n"
        };
        return (status, body).into_response();
    }
    (
        StatusCode::UNAUTHORIZED,
        [(
            axum::http::header::WWW_AUTHENTICATE,
            "Bearer realm=\"trueup-admin\"",
        )],
        Json(serde_json::json!({
            "error": "unauthorized",
            "message": "the admin endpoints need the admin token: Authorization: Bearer <token> (or sign in at /login)",
        })),
    )
        .into_response()
}

pub(crate) fn answer(problems: Vec<String>) -> (StatusCode, String) {
    if problems.is_empty() {
        (StatusCode::OK, "ok\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n")
    }
}

/// One sink in `GET /sinks`.
#[derive(Serialize)]
pub(crate) struct SinkView {
    name: String,
    kind: &'static str,
    /// The last spool position the sink has taken.
    cursor: i64,
    backlog_rows: u64,
    backlog_bytes: u64,
    /// Age of the oldest record the sink has not taken, seconds.
    lag_seconds: f64,
    /// Since when its deliveries fail (ms since the epoch), or null.
    failing_since_ms: Option<i64>,
    last_error: Option<String>,
    delivered: u64,
    retries: u64,
    dead_lettered: u64,
}

/// `GET /sinks`: per sink, its cursor, backlog, lag, failure state and counts since start.
pub async fn sinks(State(st): State<AdminState>) -> impl IntoResponse {
    Json(serde_json::json!({ "sinks": sink_views(&st) }))
}

/// The sinks as `/sinks` and the dashboards show them.
pub(crate) fn sink_views(st: &AdminState) -> Vec<SinkView> {
    st.sinks
        .iter()
        .map(|s| {
            let failing = s.health.failing_since_ms.load(Ordering::Relaxed);
            SinkView {
                name: s.name.clone(),
                kind: s.kind,
                cursor: s.progress.cursor.load(Ordering::Relaxed),
                backlog_rows: s.progress.backlog_rows.load(Ordering::Relaxed),
                backlog_bytes: s.progress.backlog_bytes.load(Ordering::Relaxed),
                lag_seconds: s.health.lag_ms.load(Ordering::Relaxed) as f64 / 1000.0,
                failing_since_ms: (failing > 0).then_some(failing),
                last_error: if failing > 0 {
                    s.health.last_error.lock().ok().and_then(|e| e.clone())
                } else {
                    None
                },
                delivered: s.health.delivered.load(Ordering::Relaxed),
                retries: s.health.retries.load(Ordering::Relaxed),
                dead_lettered: s.health.dead_lettered.load(Ordering::Relaxed),
            }
        })
        .collect()
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics_text(State(st): State<AdminState>) -> impl IntoResponse {
    let stats = st.spool.stats();
    metrics::gauge!("trueup_spool_depth").set(stats.rows.load(Ordering::Relaxed) as f64);
    metrics::gauge!("trueup_spool_bytes").set(stats.bytes.load(Ordering::Relaxed) as f64);
    for s in &st.sinks {
        let labels = [("sink", s.name.clone()), ("kind", s.kind.to_string())];
        metrics::gauge!("trueup_sink_backlog_rows", &labels)
            .set(s.progress.backlog_rows.load(Ordering::Relaxed) as f64);
        metrics::gauge!("trueup_sink_backlog_bytes", &labels)
            .set(s.progress.backlog_bytes.load(Ordering::Relaxed) as f64);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        st.metrics.render(),
    )
}
