//! Forwarders: one per sink, each draining the spool to its sink, in order, with retries.
//!
//! A forwarder reads the records after its sink's durable cursor (see the spool's docs), hands
//! them to the sink (`concurrency` batches of up to `batch_size` at once), and when all have
//! been taken asks the spool writer to move the cursor past them (and to dead-letter what the
//! sink rejected permanently). On failure it waits (exponential backoff with full jitter, or
//! the sink's Retry-After if longer) and retries the same records: nothing is skipped, so
//! order holds, and a sink that is down holds back nothing but its own cursor. After a restart
//! each forwarder starts from its cursor; what a sink took but whose cursor move did not
//! commit is delivered again, and sinks dedupe by event id.
//!
//! Forwarders run on a runtime of their own ([`runtime`]) whose threads have a lower CPU
//! priority (`forwarder.nice`): when the machine is saturated, collecting (answering the
//! browsers) runs first and forwarding takes what is left, the spool absorbing the difference
//! until its cap answers 503. When it is not saturated, the priority changes nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::ForwarderConfig;
use crate::sinks::{Delivery, Sink};
use crate::spool::{DeadLetter, Record, SinkProgress, Spool, SpoolReader};
use crate::time::now_ms;

/// The forwarders' runtime. Dropping it (also on an async thread, where a plain tokio
/// runtime may not be dropped) stops its threads without waiting for them.
pub struct ForwarderRuntime(Option<tokio::runtime::Runtime>);

impl ForwarderRuntime {
    /// Spawns a task on it; the handle can be awaited from any runtime.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0
            .as_ref()
            .expect("runtime present until drop")
            .spawn(task)
    }
}

impl Drop for ForwarderRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The forwarders' runtime: `cfg.threads` workers (0: one per CPU), and every thread it
/// starts (workers and the blocking pool, where sinks encode and write) at nice `cfg.nice`.
pub fn runtime(cfg: &ForwarderConfig) -> std::io::Result<ForwarderRuntime> {
    let nice = cfg.nice;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .thread_name("forwarder")
        .enable_all()
        .on_thread_start(move || lower_priority(nice));
    if cfg.threads > 0 {
        builder.worker_threads(cfg.threads);
    }
    Ok(ForwarderRuntime(Some(builder.build()?)))
}

/// Sets the calling thread's nice value (on Linux a thread has its own, which is what
/// `setpriority(PRIO_PROCESS, tid)` sets). Failure only costs the priority: logged once.
#[cfg(target_os = "linux")]
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: gettid and setpriority take no pointers; they act on the calling thread.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if rc != 0 {
        static WARNED: std::sync::Once = std::sync::Once::new();
        let err = std::io::Error::last_os_error();
        WARNED.call_once(|| {
            tracing::warn!(nice, error = %err, "cannot lower the forwarders' priority; they run at collection's")
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(nice: i32) {
    if nice != 0 {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                nice,
                "forwarder.nice is applied on Linux only; forwarders run at collection's priority"
            )
        });
    }
}

/// The `sink` and `kind` labels of a sink's metrics.
type Labels = [(&'static str, String); 2];

/// Liveness of a forwarder, and of its sink as seen from it.
#[derive(Debug, Default)]
pub struct ForwarderHealth {
    /// Last loop iteration, ms since the epoch.
    pub last_beat_ms: AtomicI64,
    /// Since when deliveries fail (0 when the last one succeeded).
    pub failing_since_ms: AtomicI64,
    /// Capture-to-now age of the oldest record the sink has not taken, ms (0 when none).
    pub lag_ms: AtomicI64,
    /// Records delivered since start.
    pub delivered: AtomicU64,
    /// Failed attempts since start.
    pub retries: AtomicU64,
    /// Records dead-lettered since start.
    pub dead_lettered: AtomicU64,
    /// The last failure, for `/sinks`.
    pub last_error: std::sync::Mutex<Option<String>>,
}

/// One sink as its forwarder runs it.
pub struct SinkRunner {
    /// Its position in the spool's sink list (see [`Spool::open`]).
    pub index: usize,
    /// Its configured name (metrics label `sink`).
    pub name: String,
    /// Its kind (metrics label `kind`).
    pub kind: &'static str,
    /// Records per sink call.
    pub batch_size: usize,
    /// Sink calls in flight at once.
    pub concurrency: usize,
    /// The sink.
    pub sink: Arc<dyn Sink>,
    /// Its liveness.
    pub health: Arc<ForwarderHealth>,
}

/// Runs until `stop` is cancelled and then the sink has taken everything spooled or
/// `shutdown_drain_secs` pass.
pub async fn run(
    spool: Arc<Spool>,
    runner: SinkRunner,
    cfg: ForwarderConfig,
    stop: CancellationToken,
) {
    let name = runner.name.as_str();
    let Some(progress) = spool.sinks().get(runner.index).cloned() else {
        tracing::error!(
            sink = name,
            "no cursor for this sink; nothing will be forwarded"
        );
        return;
    };
    let reader = match spool.reader() {
        Ok(r) => Arc::new(Mutex::new(r)),
        Err(e) => {
            tracing::error!(sink = name, error = %e, "forwarder cannot open the spool; nothing will be forwarded");
            return;
        }
    };
    let labels: Labels = [
        ("sink", runner.name.clone()),
        ("kind", runner.kind.to_string()),
    ];
    let health = runner.health.clone();
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        health.last_beat_ms.store(now_ms(), Ordering::Relaxed);
        publish_backlog(&labels, &progress, &health);
        if stop.is_cancelled() && drain_deadline.is_none() {
            drain_deadline =
                Some(tokio::time::Instant::now() + Duration::from_secs(cfg.shutdown_drain_secs));
        }
        if drain_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            tracing::warn!(
                sink = name,
                left = progress.backlog_rows.load(Ordering::Relaxed),
                "shutdown drain deadline reached; the rest stays spooled for this sink"
            );
            return;
        }
        let after = progress.cursor.load(Ordering::Relaxed);
        let want = runner.batch_size.saturating_mul(runner.concurrency);
        let records = match read(&reader, after, want).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(sink = name, error = %e, "forwarder cannot read the spool");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if records.is_empty() {
            health.lag_ms.store(0, Ordering::Relaxed);
            metrics::gauge!("trueup_sink_lag_seconds", &labels).set(0.0);
            if stop.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = progress.new_records.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.cancelled() => {}
            }
            continue;
        }
        let oldest = records[0].received_at;
        let last = records.last().map_or(after, |r| r.pos);
        let count = records.len() as u64;
        let bytes: u64 = records.iter().map(|r| r.body.len() as u64).sum();
        let chunks = into_chunks(records, runner.batch_size);
        let attempts = chunks.iter().map(|chunk| {
            deliver_until_taken(
                &runner,
                &cfg,
                &labels,
                chunk.clone(),
                oldest,
                &stop,
                drain_deadline,
            )
        });
        let answers = futures_util::future::join_all(attempts).await;
        if answers.iter().any(Option::is_none) {
            // Shutdown deadline while the sink was failing: its cursor stays where it was.
            return;
        }
        health.failing_since_ms.store(0, Ordering::Relaxed);
        let mut dead = Vec::new();
        for (chunk, answer) in chunks.iter().zip(answers.into_iter().flatten()) {
            dead.extend(dead_letters(&runner.name, chunk, &answer));
        }
        let delivered = count - dead.len() as u64;
        if !dead.is_empty() {
            tracing::error!(
                sink = name,
                count = dead.len(),
                "sink rejected records permanently; kept in dead_letter"
            );
            for d in &dead {
                metrics::counter!("trueup_sink_dead_letters_total", "sink" => runner.name.clone(), "reason" => d.reason.clone())
                    .increment(1);
            }
        }
        let dead_count = dead.len() as u64;
        // Until the cursor move commits, a crash re-delivers these records: sinks dedupe by id.
        match spool.ack(runner.index, last, count, bytes, dead).await {
            Ok(()) => {
                metrics::counter!("trueup_sink_delivered_total", &labels).increment(delivered);
                health.delivered.fetch_add(delivered, Ordering::Relaxed);
                health
                    .dead_lettered
                    .fetch_add(dead_count, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(sink = name, error = %e, "cannot move the sink's cursor; these records will be delivered again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// `records` in consecutive batches of at most `size`, moved, not copied.
fn into_chunks(records: Vec<Record>, size: usize) -> Vec<Arc<Vec<Record>>> {
    let size = size.max(1);
    let mut chunks = Vec::with_capacity(records.len().div_ceil(size));
    let mut it = records.into_iter().peekable();
    while it.peek().is_some() {
        chunks.push(Arc::new(it.by_ref().take(size).collect()));
    }
    chunks
}

fn publish_backlog(labels: &Labels, p: &SinkProgress, h: &ForwarderHealth) {
    metrics::gauge!("trueup_sink_backlog_rows", labels)
        .set(p.backlog_rows.load(Ordering::Relaxed) as f64);
    metrics::gauge!("trueup_sink_backlog_bytes", labels)
        .set(p.backlog_bytes.load(Ordering::Relaxed) as f64);
    metrics::gauge!("trueup_sink_lag_seconds", labels)
        .set(h.lag_ms.load(Ordering::Relaxed) as f64 / 1000.0);
}

/// Hands `records` to the sink until it takes them (retrying with backoff). `None` when the
/// shutdown drain deadline comes first.
async fn deliver_until_taken(
    runner: &SinkRunner,
    cfg: &ForwarderConfig,
    labels: &Labels,
    records: Arc<Vec<Record>>,
    oldest_ms: i64,
    stop: &CancellationToken,
    mut drain_deadline: Option<tokio::time::Instant>,
) -> Option<Delivery> {
    let health = &runner.health;
    let mut failures = 0u32;
    loop {
        health
            .lag_ms
            .store((now_ms() - oldest_ms).max(0), Ordering::Relaxed);
        metrics::gauge!("trueup_sink_lag_seconds", labels)
            .set((now_ms() - oldest_ms).max(0) as f64 / 1000.0);
        let call = runner.sink.deliver(records.clone());
        tokio::pin!(call);
        // A sink call may take long (timeouts, splits): keep the heartbeat going meanwhile.
        let result = loop {
            tokio::select! {
                r = &mut call => break r,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    health.last_beat_ms.store(now_ms(), Ordering::Relaxed);
                }
            }
        };
        match result {
            Ok(d) => return Some(d),
            Err(e) => {
                failures += 1;
                metrics::counter!("trueup_sink_retries_total", labels).increment(1);
                health.retries.fetch_add(1, Ordering::Relaxed);
                let _ = health.failing_since_ms.compare_exchange(
                    0,
                    now_ms(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                if let Ok(mut last) = health.last_error.lock() {
                    *last = Some(e.message.clone());
                }
                let wait = backoff(cfg, failures).max(e.retry_after.unwrap_or_default());
                tracing::warn!(sink = runner.name, error = %e, failures, retry_in_ms = wait.as_millis() as u64, "sink delivery failed; retrying");
                health.last_beat_ms.store(now_ms(), Ordering::Relaxed);
                if drain_deadline.is_some_and(|d| tokio::time::Instant::now() + wait >= d) {
                    tracing::warn!(
                        sink = runner.name,
                        "shutdown drain deadline reached with the sink failing; records stay spooled"
                    );
                    return None;
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled(), if drain_deadline.is_none() => {
                        drain_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(cfg.shutdown_drain_secs));
                    }
                }
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

fn dead_letters(sink: &str, records: &[Record], delivery: &Delivery) -> Vec<DeadLetter> {
    delivery
        .rejected
        .iter()
        .filter_map(|(pos, reason)| records.iter().find(|r| r.pos == *pos).map(|r| (r, reason)))
        .map(|(r, reason)| {
            let (code, detail) = reason.split_once(": ").unwrap_or((reason, ""));
            DeadLetter {
                stage: "sink",
                sink: Some(sink.to_string()),
                site: Some(r.site.clone()),
                reason: code.to_string(),
                detail: detail.to_string(),
                event_id: serde_json::from_str::<serde_json::Value>(&r.body)
                    .ok()
                    .and_then(|v| v.get("id")?.as_str()?.parse().ok()),
                raw: r.body.clone(),
            }
        })
        .collect()
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
