//! Liveness, readiness and metrics, served on the admin address only.
//!
//! Liveness comes from heartbeats: the spool writer and the forwarder each stamp a time as
//! they loop; a component that has not stamped within [`STALE_MS`] is reported dead.
//! Readiness is separate: the relay is ready when it is not shutting down, its last spool
//! transaction committed, the spool is under its size limit, and the sink has not been
//! failing for longer than [`SINK_FAILING_MS`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::forwarder::ForwarderHealth;
use crate::spool::Spool;
use crate::time::now_ms;

/// A heartbeat older than this means the component is stuck.
pub const STALE_MS: i64 = 10_000;
/// A sink failing for longer than this makes the relay not ready.
pub const SINK_FAILING_MS: i64 = 30_000;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// The spool.
    pub spool: Arc<Spool>,
    /// The forwarder's heartbeats.
    pub forwarder: Arc<ForwarderHealth>,
    /// The spool size limit.
    pub spool_max_bytes: u64,
    /// Set during shutdown.
    pub shutting_down: Arc<AtomicBool>,
    /// Renders the metrics.
    pub metrics: PrometheusHandle,
}

/// `GET /healthz`: 200 when the spool writer and the forwarder are alive.
pub async fn healthz(State(st): State<AdminState>) -> impl IntoResponse {
    let now = now_ms();
    let writer_age = now - st.spool.stats().last_beat_ms.load(Ordering::Relaxed);
    let forwarder_age = now - st.forwarder.last_beat_ms.load(Ordering::Relaxed);
    let mut problems = Vec::new();
    if writer_age > STALE_MS {
        problems.push(format!("spool writer silent for {writer_age} ms"));
    }
    if forwarder_age > STALE_MS {
        problems.push(format!("forwarder silent for {forwarder_age} ms"));
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
    let failing_since = st.forwarder.failing_since_ms.load(Ordering::Relaxed);
    if failing_since > 0 && now_ms() - failing_since > SINK_FAILING_MS {
        problems.push(format!(
            "sink failing for {} s",
            (now_ms() - failing_since) / 1000
        ));
    }
    answer(problems)
}

fn answer(problems: Vec<String>) -> (StatusCode, String) {
    if problems.is_empty() {
        (StatusCode::OK, "ok\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n")
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics_text(State(st): State<AdminState>) -> impl IntoResponse {
    let stats = st.spool.stats();
    metrics::gauge!("trueup_spool_depth").set(stats.rows.load(Ordering::Relaxed) as f64);
    metrics::gauge!("trueup_spool_bytes").set(stats.bytes.load(Ordering::Relaxed) as f64);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        st.metrics.render(),
    )
}
