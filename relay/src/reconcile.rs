//! Scheduled reconciliation: every `reconcile.interval_secs`, compare client analytics with
//! the system of record (see the `trueup-reconcile` crate), publish the latest figures as
//! Prometheus gauges on the admin listener, and log a warning the first time a day's gap
//! moves beyond its trailing average.
//!
//! It runs on the blocking pool and only reads (the warehouse, the spool's tally, the truth
//! database), so a slow truth database delays the next figures, never ingestion. A failed
//! run is logged (WARN: the figures are stale, nothing is lost) and counted in
//! `trueup_reconcile_errors_total`; the gauges keep their last values, and
//! `trueup_reconcile_last_success_timestamp_seconds` says how old they are.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use trueup_reconcile::{Report, reconcile};

use crate::config::Config;
use crate::time::now_ms;

/// Runs the reconciliation every `interval_secs` until `stop`; the first run comes after
/// at most 10 s, leaving the app that owns the truth database time to create it when both
/// start together.
pub async fn run_schedule(cfg: Arc<Config>, stop: CancellationToken) {
    let interval = Duration::from_secs(cfg.reconcile.interval_secs);
    let mut warned: BTreeSet<(String, String)> = BTreeSet::new();
    tokio::select! {
        _ = tokio::time::sleep(interval.min(Duration::from_secs(10))) => {}
        _ = stop.cancelled() => return,
    }
    loop {
        let run_cfg = cfg.clone();
        let run = tokio::task::spawn_blocking(move || {
            let stores = run_cfg
                .reconcile_stores()
                .map_err(|e| trueup_reconcile::ReconcileError::Config(e.to_string()))?;
            reconcile(&run_cfg.reconcile, &stores, now_ms())
        });
        // A slow truth database must not hold up shutdown: the run is read-only, abandon it.
        let outcome = tokio::select! {
            outcome = run => outcome,
            _ = stop.cancelled() => return,
        };
        match outcome {
            Ok(Ok(report)) => {
                publish(&report);
                for (m, d) in report.moved() {
                    if warned.insert((m.name.clone(), d.day.clone())) {
                        tracing::warn!(
                            metric = %m.name,
                            day = %d.day,
                            gap_pct = d.gap_pct.unwrap_or_default(),
                            trailing_gap_pct = d.trailing_gap_pct.unwrap_or_default(),
                            alert_points = report.alert_points,
                            "the measurement gap moved beyond its trailing average"
                        );
                    }
                }
            }
            Ok(Err(e)) => {
                metrics::counter!("trueup_reconcile_errors_total").increment(1);
                tracing::warn!(error = %e, "reconciliation failed; the published gaps are stale");
            }
            Err(e) => {
                metrics::counter!("trueup_reconcile_errors_total").increment(1);
                tracing::warn!(error = %e, "reconciliation task failed");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Sets the gauges from a report: each metric's figures for today (still filling up), whether
/// the latest complete day's gap moved, and loss by stage.
pub fn publish(report: &Report) {
    for (m, d) in report.latest() {
        let name = m.name.clone();
        metrics::gauge!("trueup_reconcile_actual", "metric" => name.clone()).set(d.actual as f64);
        metrics::gauge!("trueup_reconcile_tracked", "metric" => name.clone()).set(d.tracked as f64);
        metrics::gauge!("trueup_reconcile_server", "metric" => name.clone()).set(d.server as f64);
        // A day without conversions has no gap: publish 0 rather than a stale value.
        metrics::gauge!("trueup_reconcile_gap_percent", "metric" => name.clone())
            .set(d.gap_pct.unwrap_or(0.0));
        metrics::gauge!("trueup_reconcile_unknown_attribution_percent", "metric" => name)
            .set(d.unknown_pct.unwrap_or(0.0));
    }
    for (m, d) in report.latest_complete() {
        metrics::gauge!("trueup_reconcile_gap_moved", "metric" => m.name.clone()).set(if d.moved {
            1.0
        } else {
            0.0
        });
    }
    let l = &report.loss;
    for (stage, n) in [
        ("created", l.created),
        ("stored", l.stored),
        ("sent", l.sent),
        ("accepted_by_relay", l.accepted_by_relay),
        ("in_warehouse", l.in_warehouse),
    ] {
        metrics::gauge!("trueup_loss_stage_events", "stage" => stage).set(n as f64);
    }
    metrics::gauge!("trueup_loss_duplicates_removed").set(l.duplicates_removed as f64);
    metrics::gauge!("trueup_loss_pending_events").set(l.pending as f64);
    metrics::gauge!("trueup_loss_seq_gaps").set(l.seq_gaps as f64);
    metrics::gauge!("trueup_loss_rejected_by_relay").set(l.rejected_by_relay as f64);
    for (reason, n) in &l.dropped {
        metrics::gauge!("trueup_loss_dropped_events", "reason" => reason.clone()).set(*n as f64);
    }
    metrics::gauge!("trueup_reconcile_last_success_timestamp_seconds")
        .set(report.generated_at_ms as f64 / 1000.0);
}
