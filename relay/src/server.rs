//! Start-up, the two listeners, background tasks and graceful shutdown.
//!
//! Shutdown (SIGTERM or Ctrl-C): new batches get 503 at once; both listeners stop accepting
//! and finish the requests in flight; the forwarder keeps draining the spool to the sink for
//! up to `forwarder.shutdown_drain_secs`; the spool writer finishes its queue and checkpoints.
//! What was not forwarded stays in the spool for the next start.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::forwarder::{self, ForwarderHealth, SinkRunner};
use crate::health::AdminState;
use crate::ingest::AppState;
use crate::limiters::Limiters;
use crate::router::{admin_router, public_router};
use crate::spool::Spool;
use crate::time::now_ms;

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("trueup_request_duration_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("trueup_spool_commit_seconds".into()),
                        &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("trueup_spool_commit_requests".into()),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
                    )
                })
                .expect("bucket lists are non-empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            describe_metrics();
            handle
        })
        .clone()
}

fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "trueup_events_received_total",
        "Events received in batches, by source."
    );
    describe_counter!(
        "trueup_events_accepted_total",
        "Events stored for the first time."
    );
    describe_counter!(
        "trueup_events_duplicate_total",
        "Events already stored (retries)."
    );
    describe_counter!(
        "trueup_events_rejected_total",
        "Invalid events, kept in dead_letter, by reason."
    );
    describe_counter!(
        "trueup_requests_rejected_total",
        "Whole requests refused, by error code."
    );
    describe_counter!(
        "trueup_rate_limited_total",
        "Requests answered 429, by scope."
    );
    describe_counter!(
        "trueup_sink_delivered_total",
        "Records a sink took, by sink and kind (dead letters not included)."
    );
    describe_counter!(
        "trueup_sink_retries_total",
        "Failed sink calls (retried later), by sink and kind."
    );
    describe_counter!(
        "trueup_sink_dead_letters_total",
        "Records a sink rejected permanently (kept in dead_letter), by sink and reason."
    );
    describe_gauge!(
        "trueup_sink_backlog_rows",
        "Records spooled that a sink has not taken yet, by sink and kind."
    );
    describe_gauge!(
        "trueup_sink_backlog_bytes",
        "Bytes of the records a sink has not taken yet, by sink and kind."
    );
    describe_gauge!("trueup_spool_depth", "Records waiting in the spool.");
    describe_gauge!(
        "trueup_spool_bytes",
        "Bytes of records waiting in the spool."
    );
    describe_gauge!(
        "trueup_sink_lag_seconds",
        "Age (since the relay received it) of the oldest record a sink has not taken, by sink."
    );
    describe_gauge!(
        "trueup_reconcile_gap_percent",
        "Today's measurement gap, (actual - tracked) / actual x 100, by metric."
    );
    describe_gauge!(
        "trueup_reconcile_actual",
        "Today's conversions in the system of record, by metric."
    );
    describe_gauge!(
        "trueup_reconcile_tracked",
        "Today's conversions counted by client analytics, by metric."
    );
    describe_gauge!(
        "trueup_reconcile_server",
        "Today's conversions emitted as server events, by metric."
    );
    describe_gauge!(
        "trueup_reconcile_unknown_attribution_percent",
        "Share of today's conversions with unknown attribution, by metric."
    );
    describe_gauge!(
        "trueup_reconcile_gap_moved",
        "1 when the latest complete day's gap moved beyond its trailing average by more than alert_points."
    );
    describe_gauge!(
        "trueup_loss_pending_events",
        "Client events still queued in browsers, from the agents' latest counters."
    );
    describe_gauge!(
        "trueup_loss_rejected_by_relay",
        "Client events the relay rejected at ingest (kept in dead_letter)."
    );
    describe_gauge!(
        "trueup_loss_dropped_events",
        "Client events the agents gave up, by reason."
    );
    describe_gauge!(
        "trueup_loss_stage_events",
        "Client events reaching each stage: created, stored, sent, accepted_by_relay, in_warehouse."
    );
    describe_gauge!(
        "trueup_loss_duplicates_removed",
        "Client retries the relay answered duplicate and did not store again."
    );
    describe_gauge!(
        "trueup_loss_seq_gaps",
        "Sequence numbers missing below each tab stream's highest seq in the warehouse."
    );
    describe_gauge!(
        "trueup_reconcile_last_success_timestamp_seconds",
        "When the published reconciliation figures were computed."
    );
    describe_counter!(
        "trueup_reconcile_errors_total",
        "Scheduled reconciliations that failed (figures stale)."
    );
    describe_histogram!(
        "trueup_pipeline_lag_seconds",
        "Time between pipeline stages of the events, per stage (a summary: quantiles over the last minute): capture_to_accepted (capture in the page to the relay's acknowledgement), accepted_to_log (to the kafka sink's delivery report); the loader adds log_to_warehouse and capture_to_warehouse."
    );
    describe_histogram!(
        "trueup_request_duration_seconds",
        "Request latency on the public listener."
    );
    describe_histogram!(
        "trueup_spool_commit_seconds",
        "Duration of one group commit (with fsync)."
    );
    describe_histogram!(
        "trueup_spool_commit_requests",
        "Requests sharing one group commit."
    );
}

/// A relay whose listeners are bound; `run` serves until `shutdown` is cancelled.
pub struct Relay {
    public: TcpListener,
    admin: TcpListener,
    cfg: Arc<Config>,
}

impl Relay {
    /// Validates the config, creates the data directory and binds both listeners.
    pub async fn bind(mut cfg: Config) -> anyhow::Result<Relay> {
        cfg.validate()?;
        if let Some(path) = &cfg.ready_file {
            // A file left by an earlier run must not be mistaken for this one's.
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot remove the old ready file {}", path.display())
                    });
                }
            }
        }
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("cannot create data_dir {}", cfg.data_dir.display()))?;
        let public = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let admin = TcpListener::bind(cfg.admin_listen)
            .await
            .with_context(|| format!("cannot listen on {} (admin)", cfg.admin_listen))?;
        Ok(Relay {
            public,
            admin,
            cfg: Arc::new(cfg),
        })
    }

    /// The bound public address.
    pub fn public_addr(&self) -> SocketAddr {
        self.public.local_addr().expect("bound")
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound")
    }

    /// Serves until `shutdown` is cancelled, then shuts down gracefully.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let cfg = self.cfg;
        let registry = Arc::new(cfg.schema_registry()?);
        let sink_cfgs = cfg.effective_sinks();
        let mut runners = Vec::with_capacity(sink_cfgs.len());
        for (index, s) in sink_cfgs.iter().enumerate() {
            let health = Arc::new(ForwarderHealth::default());
            health.last_beat_ms.store(now_ms(), Ordering::Relaxed);
            runners.push(SinkRunner {
                index,
                name: s.name.clone(),
                kind: s.kind.as_str(),
                batch_size: s.batch_size(),
                concurrency: s.concurrency,
                sink: crate::sinks::open(&cfg, s).await?,
                health,
            });
        }
        let names: Vec<String> = sink_cfgs.iter().map(|s| s.name.clone()).collect();
        let spool = Arc::new(Spool::open_capped(
            &cfg.spool_path(),
            cfg.spool.max_group_requests,
            &names,
            cfg.spool.max_file_bytes,
        )?);
        let limiters = Arc::new(Limiters::new(&cfg.rate_limit));
        let shutting_down = Arc::new(AtomicBool::new(false));

        let state = AppState {
            cfg: cfg.clone(),
            registry,
            limits: cfg.event_limits(),
            spool: spool.clone(),
            limiters: limiters.clone(),
            sites: Arc::new(
                cfg.sites
                    .iter()
                    .map(|s| (s.key.clone(), s.clone()))
                    .collect::<HashMap<_, _>>(),
            ),
            shutting_down: shutting_down.clone(),
            faults: crate::ingest::Faults::new(&cfg.faults),
            body_budget: crate::ingest::body_budget(&cfg),
        };
        if cfg.faults.fail_ratio > 0.0 || cfg.faults.ack_lost_ratio > 0.0 {
            tracing::warn!(
                fail_ratio = cfg.faults.fail_ratio,
                ack_lost_ratio = cfg.faults.ack_lost_ratio,
                seed = cfg.faults.seed,
                "FAULT INJECTION IS ON: batches will be refused or their answers lost (tests only)"
            );
        }
        let admin_state = AdminState {
            spool: spool.clone(),
            sinks: runners
                .iter()
                .map(|r| crate::health::SinkStatus {
                    name: r.name.clone(),
                    kind: r.kind,
                    health: r.health.clone(),
                    progress: spool.sinks()[r.index].clone(),
                })
                .collect(),
            spool_max_bytes: cfg.spool.max_bytes,
            shutting_down: shutting_down.clone(),
            metrics: metrics_handle(),
            token: cfg.admin_token.as_deref().map(Arc::from),
            cfg: cfg.clone(),
        };

        let forwarder_stop = CancellationToken::new();
        let forwarder_rt =
            forwarder::runtime(&cfg.forwarder).context("cannot start the forwarders' runtime")?;
        let forwarders: Vec<_> = runners
            .into_iter()
            .map(|r| {
                forwarder_rt.spawn(forwarder::run(
                    spool.clone(),
                    r,
                    cfg.forwarder.clone(),
                    forwarder_stop.clone(),
                ))
            })
            .collect();
        let housekeeping_stop = CancellationToken::new();
        let housekeeping = tokio::spawn(housekeeping(
            spool.clone(),
            limiters,
            cfg.spool.dedupe_retention_secs,
            admin_state.metrics.clone(),
            housekeeping_stop.clone(),
        ));

        let reconcile_stop = CancellationToken::new();
        let reconcile = (cfg.reconcile.interval_secs > 0).then(|| {
            tokio::spawn(crate::reconcile::run_schedule(
                cfg.clone(),
                reconcile_stop.clone(),
            ))
        });

        let public_addr = self.public.local_addr()?;
        let admin_addr = self.admin.local_addr()?;
        tracing::info!(
            listen = %public_addr,
            admin_listen = %admin_addr,
            collect = %cfg.collect_url_path(),
            assets = %cfg.assets_url_path(),
            data_dir = %cfg.data_dir.display(),
            "trueup relay listening"
        );
        if let Some(path) = &cfg.ready_file {
            write_ready_file(path, public_addr, admin_addr)?;
        }

        let public_stop = shutdown.clone();
        let flag = shutting_down.clone();
        tokio::spawn(async move {
            public_stop.cancelled().await;
            flag.store(true, Ordering::Relaxed);
            tracing::info!("shutdown: no new connections; finishing requests in flight");
        });
        let public = crate::listen::serve(
            self.public,
            public_router(state),
            crate::listen::ConnLimits {
                max_connections: cfg.limits.max_connections,
                header_read_timeout: Duration::from_secs(cfg.limits.header_read_timeout_secs),
            },
            shutdown.clone(),
        );
        let admin_stop = CancellationToken::new();
        let admin_stop2 = admin_stop.clone();
        let admin = tokio::spawn(async move {
            axum::serve(self.admin, admin_router(admin_state))
                .with_graceful_shutdown(admin_stop2.cancelled_owned())
                .await
        });

        public.await.context("public listener failed")?;
        tracing::info!("shutdown: requests finished; draining the spool to the sinks");
        forwarder_stop.cancel();
        futures_util::future::join_all(forwarders).await;
        drop(forwarder_rt);
        housekeeping_stop.cancel();
        let _ = housekeeping.await;
        reconcile_stop.cancel();
        if let Some(task) = reconcile {
            let _ = task.await;
        }
        spool.close().await;
        admin_stop.cancel();
        let _ = admin.await;
        if let Some(path) = &cfg.ready_file {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!(
            left_in_spool = spool.stats().rows.load(Ordering::Relaxed),
            "shutdown complete"
        );
        Ok(())
    }
}

/// Writes the ready file (see `Config::ready_file`) through a temporary file and a rename, so
/// a reader sees either no file or all of it.
fn write_ready_file(
    path: &std::path::Path,
    public: SocketAddr,
    admin: SocketAddr,
) -> anyhow::Result<()> {
    let body = serde_json::json!({
        "listen": public.to_string(),
        "admin_listen": admin.to_string(),
        "pid": std::process::id(),
    });
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{body}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write the ready file {}", path.display()))
}

/// Heartbeats for the spool writer, limiter clean-up, dedupe pruning, metrics upkeep.
async fn housekeeping(
    spool: Arc<Spool>,
    limiters: Arc<Limiters>,
    retention_secs: u64,
    metrics: PrometheusHandle,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        spool.beat().await;
        if n.is_multiple_of(10) {
            metrics.run_upkeep();
        }
        limiters.report();
        if n.is_multiple_of(60) {
            limiters.shrink();
        }
        if n.is_multiple_of(3600) {
            spool
                .prune(now_ms() - (retention_secs.min(i64::MAX as u64 / 1000) as i64) * 1000)
                .await;
        }
        n += 1;
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
