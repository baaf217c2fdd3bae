//! The loader (`trueup-relay load`): consumes the log the relays' `kafka` sinks write and
//! fills the warehouse.
//!
//! It is a member of a Kafka consumer group (every loader of one warehouse in the same
//! group; the topic's partitions are shared among them). It reads up to `batch_size`
//! messages (or what arrived within `max_wait_ms`), writes them in one warehouse transaction
//! (`ON CONFLICT (id) DO NOTHING`), and only after that transaction has committed commits the
//! consumer's offsets past them. A crash between the two re-reads the batch and the insert
//! stores nothing twice: at-least-once from the log, exactly once in the warehouse. The
//! events the insert found already stored are the duplicates absorbed (a retry that reached
//! another relay, or a re-read after a crash): counted in `trueup_loader_duplicates_total`.
//!
//! A warehouse that is down holds the batch in memory and retries it (backoff up to 10 s);
//! nothing is read further and nothing committed meanwhile. A message that cannot be an
//! event (no trueup headers, unreadable JSON) is counted in `trueup_loader_rejected_total`
//! with its reason, logged with its partition and offset, and skipped.
//!
//! Its admin address serves `/healthz`, `/readyz` (ready once the warehouse is open and the
//! last write succeeded) and `/metrics` (with the admin token, as the relay's).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use rdkafka::Message as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers as _};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use trueup_warehouse::Warehouse;

use crate::config::{Config, LoaderSource, LoaderTarget};
use crate::spool::{Record, RecordKind};
use crate::time::now_ms;
use futures_util::future::join_all;

/// What the admin endpoints read.
#[derive(Clone)]
struct LoaderState {
    /// The last warehouse write succeeded (or none was needed yet).
    healthy: Arc<AtomicBool>,
    /// Last loop iteration, ms since the epoch.
    last_beat_ms: Arc<AtomicI64>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    token: Option<Arc<str>>,
}

/// A loader whose admin listener is bound; [`Loader::run`] consumes until shutdown.
pub struct Loader {
    admin: TcpListener,
    cfg: Arc<Config>,
}

impl Loader {
    /// Validates the configuration and binds the admin listener.
    pub async fn bind(mut cfg: Config) -> anyhow::Result<Loader> {
        cfg.validate()?;
        cfg.loader.validate()?;
        if let Some(path) = &cfg.ready_file {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).context("cannot remove the old ready file"),
            }
        }
        let admin = TcpListener::bind(cfg.admin_listen)
            .await
            .with_context(|| format!("cannot listen on {} (admin)", cfg.admin_listen))?;
        Ok(Loader {
            admin,
            cfg: Arc::new(cfg),
        })
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound")
    }

    /// Consumes and loads until `shutdown` is cancelled (the batch being written is finished
    /// and committed first).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let cfg = self.cfg.clone();
        let lc = &cfg.loader;
        describe_metrics();
        let state = LoaderState {
            healthy: Arc::new(AtomicBool::new(false)),
            last_beat_ms: Arc::new(AtomicI64::new(now_ms())),
            metrics: crate::server::metrics_handle(),
            token: cfg.admin_token.as_deref().map(Arc::from),
        };
        let source = match lc.from {
            LoaderSource::Kafka => Source::Kafka(kafka_consumer(lc)?),
            LoaderSource::Nats => Source::Nats(
                crate::sinks::nats::connect(lc.url.as_deref().unwrap_or_default(), None).await?,
            ),
        };
        // From here on, every way out drops the connection off the async threads.
        let mut db = Some(open_warehouse(&cfg).await?);
        state.healthy.store(true, Ordering::Relaxed);

        let admin_addr = self.admin.local_addr()?;
        let admin_stop = CancellationToken::new();
        let admin = tokio::spawn(serve_admin(self.admin, state.clone(), admin_stop.clone()));
        if let Some(path) = &cfg.ready_file {
            let body = serde_json::json!({
                "admin_listen": admin_addr.to_string(),
                "pid": std::process::id(),
            });
            let tmp = path.with_extension("tmp");
            if let Err(e) =
                std::fs::write(&tmp, format!("{body}\n")).and_then(|()| std::fs::rename(&tmp, path))
            {
                drop_off_runtime(db).await;
                admin_stop.cancel();
                return Err(e)
                    .with_context(|| format!("cannot write the ready file {}", path.display()));
            }
        }
        tracing::info!(
            admin = %admin_addr,
            topic = %lc.topic,
            group = %lc.group,
            to = ?lc.to,
            "loader running"
        );

        let result = match source {
            Source::Kafka(consumer) => consume(&consumer, &mut db, &cfg, &state, &shutdown).await,
            Source::Nats(client) => consume_nats(client, &mut db, &cfg, &state, &shutdown).await,
        };
        drop_off_runtime(db).await;
        admin_stop.cancel();
        let _ = admin.await;
        if let Some(path) = &cfg.ready_file {
            let _ = std::fs::remove_file(path);
        }
        result
    }
}

fn describe_metrics() {
    use metrics::{describe_counter, describe_histogram};
    describe_counter!(
        "trueup_loader_messages_total",
        "Messages read from the log and written to the warehouse (committed)."
    );
    describe_counter!(
        "trueup_loader_stored_total",
        "Events the loader stored that were not in the warehouse yet."
    );
    describe_counter!(
        "trueup_loader_duplicates_total",
        "Events the loader read that the warehouse already had (a retry that reached another relay, or a re-read)."
    );
    describe_counter!(
        "trueup_loader_rejected_total",
        "Messages that cannot be events, by reason (skipped, logged)."
    );
    describe_counter!(
        "trueup_loader_write_errors_total",
        "Warehouse writes that failed (retried)."
    );
    describe_histogram!(
        "trueup_pipeline_lag_seconds",
        "Time between pipeline stages, per stage: capture_to_accepted (relay), accepted_to_log (kafka sink), log_to_warehouse and capture_to_warehouse (loader)."
    );
}

async fn open_warehouse(cfg: &Config) -> anyhow::Result<Warehouse> {
    let lc = cfg.loader.clone();
    let path = lc
        .path
        .clone()
        .unwrap_or_else(|| cfg.data_dir.join("warehouse.sqlite"));
    tokio::task::spawn_blocking(move || -> anyhow::Result<Warehouse> {
        Ok(match lc.to {
            LoaderTarget::Warehouse => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                Warehouse::open_sqlite(&path)
                    .with_context(|| format!("cannot open the warehouse {}", path.display()))?
            }
            LoaderTarget::Postgres => Warehouse::connect_postgres(&lc.postgres_url()?)
                .context("cannot connect to the PostgreSQL warehouse")?,
        })
    })
    .await?
}

/// Drops a warehouse connection on a blocking thread: the PostgreSQL client blocks (on a
/// runtime of its own) when it closes, which may not happen on an async worker.
async fn drop_off_runtime(db: Option<Warehouse>) {
    if let Some(db) = db {
        let _ = tokio::task::spawn_blocking(move || drop(db)).await;
    }
}

/// The log, connected.
enum Source {
    Kafka(Arc<StreamConsumer>),
    Nats(async_nats::Client),
}

/// A consumer-group member subscribed to the topic, committing offsets by hand.
fn kafka_consumer(lc: &crate::config::LoaderConfig) -> anyhow::Result<Arc<StreamConsumer>> {
    let mut kc = crate::sinks::kafka::client_config(
        lc.brokers.as_deref().unwrap_or_default(),
        None,
        &lc.properties,
    );
    // A loader that died leaves the group after this long, and its partitions move on
    // (librdkafka's default is 45 s); `properties` may say otherwise.
    if !lc.properties.contains_key("session.timeout.ms") {
        kc.set("session.timeout.ms", "10000");
    }
    let consumer: StreamConsumer = kc
        .set("group.id", &lc.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("cannot create the Kafka consumer")?;
    consumer
        .subscribe(&[&lc.topic])
        .with_context(|| format!("cannot subscribe to {}", lc.topic))?;
    Ok(Arc::new(consumer))
}

/// Reads batches from the durable pull consumer `group` of the stream, writes them, and
/// acknowledges each message only after the warehouse transaction; until shutdown. The
/// consumer is created if missing (explicit acks, everything from the stream's start); the
/// stream is the relays' to create: until it exists, the loader waits.
async fn consume_nats(
    client: async_nats::Client,
    db: &mut Option<Warehouse>,
    cfg: &Config,
    state: &LoaderState,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
    use futures_util::StreamExt as _;
    let lc = &cfg.loader;
    let js = async_nats::jetstream::new(client);
    let consumer = loop {
        state.last_beat_ms.store(now_ms(), Ordering::Relaxed);
        let found = async {
            let stream = js.get_stream(&lc.stream).await?;
            let c: async_nats::jetstream::consumer::PullConsumer = stream
                .get_or_create_consumer(
                    &lc.group,
                    pull::Config {
                        durable_name: Some(lc.group.clone()),
                        ack_policy: AckPolicy::Explicit,
                        deliver_policy: DeliverPolicy::All,
                        ack_wait: Duration::from_secs(lc.ack_wait_secs),
                        max_ack_pending: (lc.batch_size * 4) as i64,
                        ..Default::default()
                    },
                )
                .await?;
            Ok::<_, async_nats::Error>(c)
        }
        .await;
        match found {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(stream = %lc.stream, error = %e, "the stream or its consumer is not there yet; waiting");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    loop {
        state.last_beat_ms.store(now_ms(), Ordering::Relaxed);
        let fetched = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            f = consumer
                .fetch()
                .max_messages(lc.batch_size)
                .expires(Duration::from_millis(lc.max_wait_ms.max(100)))
                .messages() => f,
        };
        let mut messages = match fetched {
            Ok(m) => m,
            Err(e) => {
                metrics::counter!("trueup_loader_consumer_errors_total").increment(1);
                tracing::warn!(error = %e, "cannot fetch from the stream; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut held = Vec::new();
        let mut batch = Vec::new();
        while let Some(m) = messages.next().await {
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    metrics::counter!("trueup_loader_consumer_errors_total").increment(1);
                    tracing::warn!(error = %e, "the stream consumer reported an error");
                    break;
                }
            };
            let (seq, logged_at) = m
                .info()
                .map(|i| {
                    (
                        i.stream_sequence as i64,
                        Some((i.published.unix_timestamp_nanos() / 1_000_000) as i64),
                    )
                })
                .unwrap_or((0, None));
            let header = |k: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(k))
                    .map(|v| v.as_str().to_string())
            };
            let record = record_from(
                header("trueup-kind").as_deref(),
                header("trueup-site"),
                header("trueup-received-at").and_then(|v| v.parse().ok()),
                std::str::from_utf8(&m.payload).ok(),
                batch.len() as i64,
            );
            match record {
                Ok(record) => batch.push(Loaded {
                    record,
                    partition: 0,
                    offset: seq,
                    logged_at,
                }),
                Err(reason) => {
                    tracing::warn!(
                        sequence = seq,
                        reason,
                        "skipping a message that is not a trueup record"
                    );
                    metrics::counter!("trueup_loader_rejected_total", "reason" => reason)
                        .increment(1);
                }
            }
            held.push(m);
        }
        if held.is_empty() {
            continue;
        }
        if !store_batch(db, Arc::new(batch), cfg, state, shutdown).await? {
            return Ok(());
        }
        // Only now: the warehouse holds them.
        let mut failed = 0u64;
        for r in join_all(held.iter().map(|m| m.ack())).await {
            if r.is_err() {
                failed += 1;
            }
        }
        if failed > 0 {
            // Redelivered after ack_wait, and stored once.
            metrics::counter!("trueup_loader_commit_errors_total").increment(failed);
            tracing::warn!(
                failed,
                "cannot acknowledge messages (redelivered later, stored once)"
            );
        }
        metrics::counter!("trueup_loader_messages_total").increment(held.len() as u64);
    }
}

/// One message, as the warehouse write takes it.
struct Loaded {
    record: Record,
    partition: i32,
    offset: i64,
    /// When the log took it (the message timestamp), ms.
    logged_at: Option<i64>,
}

/// The record a Kafka message carries, or why it cannot be one.
fn record_of(m: &BorrowedMessage<'_>, pos: i64) -> Result<Record, &'static str> {
    let mut kind = None;
    let mut site = None;
    let mut received_at = None;
    if let Some(h) = m.headers() {
        for h in h.iter() {
            let v = h.value.and_then(|v| std::str::from_utf8(v).ok());
            match h.key {
                "trueup-kind" => kind = v,
                "trueup-site" => site = v.map(str::to_string),
                "trueup-received-at" => received_at = v.and_then(|v| v.parse::<i64>().ok()),
                _ => {}
            }
        }
    }
    let body = m.payload_view::<str>().and_then(Result::ok);
    record_from(kind, site, received_at, body, pos)
}

/// The record from a message's trueup headers and payload, or why it cannot be one.
fn record_from(
    kind: Option<&str>,
    site: Option<String>,
    received_at: Option<i64>,
    body: Option<&str>,
    pos: i64,
) -> Result<Record, &'static str> {
    let kind = match kind {
        Some("event") => RecordKind::Event,
        Some("counters") => RecordKind::Counters,
        _ => return Err("no_trueup_kind"),
    };
    let site = site.ok_or("no_trueup_site")?;
    let received_at = received_at.ok_or("no_trueup_received_at")?;
    let body = body.ok_or("payload_not_utf8")?;
    Ok(Record {
        pos,
        kind,
        site,
        received_at,
        body: body.to_string(),
    })
}

/// Reads batches, writes them, commits; until shutdown.
async fn consume(
    consumer: &Arc<StreamConsumer>,
    db: &mut Option<Warehouse>,
    cfg: &Config,
    state: &LoaderState,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let lc = &cfg.loader;
    loop {
        state.last_beat_ms.store(now_ms(), Ordering::Relaxed);
        // The first message of a batch: wait for it (or for shutdown).
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = tokio::time::timeout(Duration::from_secs(1), consumer.recv()) => m,
        };
        let mut batch: Vec<Loaded> = Vec::new();
        let mut rejected: Vec<(i32, i64, &'static str)> = Vec::new();
        type Rejected = Vec<(i32, i64, &'static str)>;
        let take = |m: Result<BorrowedMessage<'_>, rdkafka::error::KafkaError>,
                    batch: &mut Vec<Loaded>,
                    rejected: &mut Rejected| {
            match m {
                Ok(m) => {
                    let pos = batch.len() as i64;
                    match record_of(&m, pos) {
                        Ok(record) => batch.push(Loaded {
                            record,
                            partition: m.partition(),
                            offset: m.offset(),
                            logged_at: m.timestamp().to_millis(),
                        }),
                        Err(reason) => rejected.push((m.partition(), m.offset(), reason)),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the log consumer reported an error");
                    metrics::counter!("trueup_loader_consumer_errors_total").increment(1);
                }
            }
        };
        match first {
            Err(_) => continue, // nothing within a second: beat and wait again
            Ok(m) => take(m, &mut batch, &mut rejected),
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(lc.max_wait_ms);
        while batch.len() + rejected.len() < lc.batch_size {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(m) => take(m, &mut batch, &mut rejected),
                Err(_) => break,
            }
        }
        for (partition, offset, reason) in &rejected {
            tracing::warn!(
                partition,
                offset,
                reason,
                "skipping a message that is not a trueup record"
            );
            metrics::counter!("trueup_loader_rejected_total", "reason" => *reason).increment(1);
        }
        // Offsets to commit: past the highest message of each partition (rejected ones too).
        let mut next: std::collections::BTreeMap<i32, i64> = Default::default();
        for (p, o) in batch
            .iter()
            .map(|l| (l.partition, l.offset))
            .chain(rejected.iter().map(|(p, o, _)| (*p, *o)))
        {
            let e = next.entry(p).or_insert(o + 1);
            *e = (*e).max(o + 1);
        }

        // The warehouse transaction, retried until it commits (or shutdown).
        let messages = batch.len() + rejected.len();
        if !store_batch(db, Arc::new(batch), cfg, state, shutdown).await? {
            return Ok(());
        }

        // Only now: the offsets past what the warehouse holds.
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &next {
            tpl.add_partition_offset(&lc.topic, *p, Offset::Offset(*o))
                .context("an offset to commit")?;
        }
        let c = consumer.clone();
        let committed = tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync))
            .await
            .context("the commit task failed")?;
        match committed {
            Ok(()) => metrics::counter!("trueup_loader_messages_total").increment(messages as u64),
            // After a rebalance the partition is another loader's: it re-reads from the last
            // committed offset, and the warehouse absorbs what this one already stored.
            Err(e) => {
                metrics::counter!("trueup_loader_commit_errors_total").increment(1);
                tracing::warn!(error = %e, "cannot commit offsets (re-read later, stored once)");
            }
        }
    }
}

/// Writes one batch in one warehouse transaction, retried (backoff up to 10 s) until it
/// commits; then counts what was new and what was a duplicate. `false`: shutdown came first
/// (nothing of the batch may be acknowledged to the log then).
async fn store_batch(
    db: &mut Option<Warehouse>,
    batch: Arc<Vec<Loaded>>,
    cfg: &Config,
    state: &LoaderState,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let conn = db
            .take()
            .expect("the warehouse connection is back after each write");
        let b = batch.clone();
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let mut conn = conn;
            let records: Vec<Record> = b.iter().map(|l| l.record.clone()).collect();
            let r = crate::sinks::warehouse::write_logged(&mut conn, &records, |i| b[i].logged_at);
            (conn, r)
        })
        .await
        .context("the warehouse write task failed")?;
        *db = Some(conn);
        match result {
            Ok((delivery, new)) => {
                state.healthy.store(true, Ordering::Relaxed);
                let events = batch
                    .iter()
                    .filter(|l| l.record.kind == RecordKind::Event)
                    .count() as u64;
                let unreadable = delivery.rejected.len() as u64;
                for (pos, reason) in &delivery.rejected {
                    let l = &batch[*pos as usize];
                    tracing::warn!(
                        partition = l.partition,
                        offset = l.offset,
                        reason = %reason,
                        "skipping a message the warehouse cannot read"
                    );
                    metrics::counter!("trueup_loader_rejected_total", "reason" => "unreadable")
                        .increment(1);
                }
                metrics::counter!("trueup_loader_stored_total").increment(new);
                metrics::counter!("trueup_loader_duplicates_total")
                    .increment(events.saturating_sub(new + unreadable));
                record_lags(&batch);
                return Ok(true);
            }
            Err(e) => {
                state.healthy.store(false, Ordering::Relaxed);
                metrics::counter!("trueup_loader_write_errors_total").increment(1);
                tracing::warn!(error = %e, retry_in = ?backoff, "warehouse write failed; retrying the batch");
                // A broken PostgreSQL connection is replaced before the next attempt.
                if let Some(Warehouse::Postgres(c)) = &*db
                    && c.is_closed()
                {
                    match open_warehouse(cfg).await {
                        Ok(fresh) => drop_off_runtime(db.replace(fresh)).await,
                        Err(e) => tracing::warn!(error = %e, "cannot reconnect to the warehouse"),
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                state.last_beat_ms.store(now_ms(), Ordering::Relaxed);
            }
        }
    }
}

#[derive(Deserialize)]
struct Ts {
    ts: i64,
}

fn record_lags(batch: &[Loaded]) {
    let now = now_ms();
    let secs = |ms: i64| ms.max(0) as f64 / 1000.0;
    for l in batch {
        if l.record.kind != RecordKind::Event {
            continue;
        }
        if let Some(logged) = l.logged_at {
            metrics::histogram!("trueup_pipeline_lag_seconds", "stage" => "log_to_warehouse")
                .record(secs(now - logged));
        }
        if let Ok(Ts { ts }) = serde_json::from_str::<Ts>(&l.record.body) {
            metrics::histogram!("trueup_pipeline_lag_seconds", "stage" => "capture_to_warehouse")
                .record(secs(now - ts));
        }
    }
}

async fn serve_admin(listener: TcpListener, state: LoaderState, stop: CancellationToken) {
    let app = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
}

async fn guard(
    State(st): State<LoaderState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    crate::health::guard(st.token.as_deref(), false, req, next).await
}

async fn healthz(State(st): State<LoaderState>) -> impl IntoResponse {
    let age = now_ms() - st.last_beat_ms.load(Ordering::Relaxed);
    crate::health::answer(if age > crate::health::STALE_MS {
        vec![format!("loader loop silent for {age} ms")]
    } else {
        vec![]
    })
}

async fn readyz(State(st): State<LoaderState>) -> impl IntoResponse {
    crate::health::answer(if st.healthy.load(Ordering::Relaxed) {
        vec![]
    } else {
        vec!["the last warehouse write failed".to_string()]
    })
}

async fn metrics_text(State(st): State<LoaderState>) -> impl IntoResponse {
    st.metrics.render()
}
