//! The forwarder: drains the spool to the sink, in order, with retries.
//!
//! It reads records after the last delivered position, hands them to the sink, and on
//! success asks the spool writer to delete them (and to dead-letter what the sink rejected
//! permanently). On failure it waits (exponential backoff with full jitter, or the sink's
//! Retry-After if longer) and retries the same records: nothing is skipped, so order holds.
//! Its position lives in memory only; after a restart it starts from the oldest record still
//! in the spool, which is exactly what was not yet acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::ForwarderConfig;
use crate::sinks::Sink;
use crate::spool::{DeadLetter, Record, Spool, SpoolReader};
use crate::time::now_ms;

/// Liveness of the forwarder, and of the sink as seen from it.
#[derive(Debug, Default)]
pub struct ForwarderHealth {
    /// Last loop iteration, ms since the epoch.
    pub last_beat_ms: AtomicI64,
    /// Since when deliveries fail (0 when the last one succeeded).
    pub failing_since_ms: AtomicI64,
}

/// Runs until `stop` is cancelled and then the spool is empty or `drain_deadline` passes.
pub async fn run(
    spool: Arc<Spool>,
    sink: Arc<dyn Sink>,
    cfg: ForwarderConfig,
    health: Arc<ForwarderHealth>,
    stop: CancellationToken,
) {
    let reader = match spool.reader() {
        Ok(r) => Arc::new(Mutex::new(r)),
        Err(e) => {
            tracing::error!(error = %e, "forwarder cannot open the spool; nothing will be forwarded");
            return;
        }
    };
    let mut after = 0i64;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        health.last_beat_ms.store(now_ms(), Ordering::Relaxed);
        if stop.is_cancelled() && drain_deadline.is_none() {
            drain_deadline =
                Some(tokio::time::Instant::now() + Duration::from_secs(cfg.shutdown_drain_secs));
        }
        if drain_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            tracing::warn!(
                left = spool.stats().rows.load(Ordering::Relaxed),
                "shutdown drain deadline reached; the rest stays spooled"
            );
            return;
        }
        let records = match read(&reader, after, cfg.batch_size).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "forwarder cannot read the spool");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if records.is_empty() {
            metrics::gauge!("trueup_forward_lag_seconds").set(0.0);
            if stop.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = spool.new_records.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.cancelled() => {}
            }
            continue;
        }
        let lag = (now_ms() - records[0].received_at).max(0) as f64 / 1000.0;
        metrics::gauge!("trueup_forward_lag_seconds").set(lag);
        let records = Arc::new(records);
        let mut failures = 0u32;
        let delivery = loop {
            match sink.deliver(records.clone()).await {
                Ok(d) => break Some(d),
                Err(e) => {
                    failures += 1;
                    metrics::counter!("trueup_sink_errors_total", "sink" => sink.name())
                        .increment(1);
                    let _ = health.failing_since_ms.compare_exchange(
                        0,
                        now_ms(),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    let wait = backoff(&cfg, failures).max(e.retry_after.unwrap_or_default());
                    tracing::warn!(sink = sink.name(), error = %e, failures, retry_in_ms = wait.as_millis() as u64, "sink delivery failed; retrying");
                    health.last_beat_ms.store(now_ms(), Ordering::Relaxed);
                    if drain_deadline.is_some_and(|d| tokio::time::Instant::now() + wait >= d) {
                        tracing::warn!(
                            "shutdown drain deadline reached with the sink failing; records stay spooled"
                        );
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.cancelled(), if drain_deadline.is_none() => {
                            drain_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(cfg.shutdown_drain_secs));
                        }
                    }
                }
            }
        };
        let Some(delivery) = delivery else { return };
        health.failing_since_ms.store(0, Ordering::Relaxed);
        let last = records.last().map_or(after, |r| r.pos);
        let bytes: u64 = records.iter().map(|r| r.body.len() as u64).sum();
        let dead: Vec<DeadLetter> = delivery
            .rejected
            .iter()
            .filter_map(|(pos, reason)| records.iter().find(|r| r.pos == *pos).map(|r| (r, reason)))
            .map(|(r, reason)| dead_letter(r, reason))
            .collect();
        if !dead.is_empty() {
            tracing::error!(
                sink = sink.name(),
                count = dead.len(),
                "sink rejected records permanently; kept in dead_letter"
            );
        }
        metrics::counter!("trueup_forwarded_total", "sink" => sink.name())
            .increment(records.len() as u64);
        // Until the ack commits, a crash re-delivers these records: the sink dedupes by id.
        match spool.ack(last, records.len() as u64, bytes, dead).await {
            Ok(()) => after = last,
            Err(e) => {
                tracing::error!(error = %e, "cannot remove delivered records from the spool; they will be delivered again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn read(
    reader: &Arc<Mutex<SpoolReader>>,
    after: i64,
    limit: usize,
) -> Result<Vec<Record>, crate::spool::SpoolError> {
    let reader = reader.clone();
    tokio::task::spawn_blocking(move || reader.blocking_lock().read_after(after, limit))
        .await
        .map_err(|e| crate::spool::SpoolError::Storage(e.to_string()))?
}

fn dead_letter(r: &Record, reason: &str) -> DeadLetter {
    let (code, detail) = reason.split_once(": ").unwrap_or((reason, ""));
    DeadLetter {
        stage: "sink",
        site: Some(r.site.clone()),
        reason: code.to_string(),
        detail: detail.to_string(),
        event_id: serde_json::from_str::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| v.get("id")?.as_str()?.parse().ok()),
        raw: r.body.clone(),
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(max, initial·2^(n-1))].
fn backoff(cfg: &ForwarderConfig, failures: u32) -> Duration {
    let cap = cfg
        .initial_backoff_ms
        .saturating_mul(1u64 << failures.saturating_sub(1).min(20))
        .min(cfg.max_backoff_ms)
        .max(1);
    Duration::from_millis(rand::rng().random_range(0..=cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let cfg = ForwarderConfig {
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            ..Default::default()
        };
        for n in 1..40 {
            let d = backoff(&cfg, n);
            assert!(d <= Duration::from_millis(1000));
            assert!(d <= Duration::from_millis(100 << (n - 1).min(10)));
        }
        let distinct: std::collections::HashSet<_> = (0..50).map(|_| backoff(&cfg, 5)).collect();
        assert!(distinct.len() > 1, "jitter spreads retries");
    }
}
