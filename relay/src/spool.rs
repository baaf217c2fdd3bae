//! The durable spool: where accepted events wait, fsync'd, until the sink has them.
//!
//! # Promise
//!
//! A batch is answered 2xx only after every event the answer calls `accepted` or `duplicate`
//! is in the spool file and the spool file is fsync'd. An event the spool has accepted stays
//! there until the forwarder has delivered it to the sink and the sink has acknowledged it.
//! An event id is stored at most once while it is remembered (see *Dedupe*).
//!
//! # On disk
//!
//! One SQLite database, `<data_dir>/spool.sqlite`, in WAL mode with `synchronous = FULL`, so
//! every commit fsyncs the WAL before it returns. Tables:
//!
//! - `spool(pos INTEGER PRIMARY KEY AUTOINCREMENT, kind, site, received_at, body)`: records
//!   waiting for the sink, in arrival order. `kind` 0 is an event (`body` is its JSON as
//!   received and validated), 1 is an agent's counters (`body` is their JSON).
//!   AUTOINCREMENT means a `pos` is never reused, so "delete up to pos" is always safe.
//! - `seen(id BLOB PRIMARY KEY)`: the 16 bytes of every event id stored, for dedupe.
//! - `sink_cursor(name, pos)`: per configured sink, the last position it has taken (delivered
//!   or dead-lettered). A record is deleted from `spool` only once every configured sink's
//!   cursor has passed it, in the same transaction that moves the cursor, so a restart
//!   resumes each sink exactly where it was. A sink new to this spool starts at 0: it gets
//!   the oldest record still spooled. Cursors of sinks no longer configured are dropped at
//!   open.
//! - `dead_letter(...)`: events rejected at ingest (invalid) or by a sink (permanently; `sink`
//!   says which), with the reason and the raw event. Never deleted by the relay.
//! - `tally(day, site, source, accepted, duplicates, rejected)`: per UTC day of receipt and
//!   per source (`client`, `server`), the events stored, the retries answered `duplicate` and
//!   the events rejected at ingest, updated in the same transaction as the writes, so
//!   reconciliation can report what the relay accepted, rejected and what dedupe removed.
//!   Never deleted by the relay.
//!
//! # Group commit
//!
//! One writer thread owns the only read-write connection. Requests send it jobs through a
//! bounded channel; it takes every job waiting (up to `max_group_requests`), runs them in
//! one transaction, commits (one fsync for all of them), then answers each job. Under load,
//! many requests share one fsync; idle, a request waits for its own. Because the dedupe
//! insert (`seen`) and the spool insert happen in the same transaction, a crash keeps both
//! or neither: an event can never be marked seen without being spooled.
//!
//! # Dedupe
//!
//! An id is answered `duplicate` when it is in `seen`. Rows of `seen` are pruned when the
//! time inside the UUIDv7 id is older than `dedupe_retention_secs`; since events whose `ts`
//! is older than `limits.max_past_secs` are rejected and the config requires the retention
//! to be longer, a legitimate retry is always caught. (A client that forges an old id with a
//! recent `ts` can have it stored twice, after the retention; the warehouse's unique `id`
//! still stores it once.)
//!
//! # Crash
//!
//! After `kill -9`, SQLite's WAL recovery keeps every committed transaction and drops the one
//! in flight, whose requests were never answered; their senders retry with the same ids.
//! Records that the sink acknowledged but whose deletion did not commit are delivered again:
//! delivery to the sink is at-least-once, and sinks dedupe by event id (the warehouse's
//! `id` is unique).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use rusqlite::{Connection, OpenFlags, params};
use tokio::sync::{Notify, mpsc, oneshot};
use uuid::Uuid;

use crate::time::now_ms;

/// An event to store.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Its id (the dedupe key).
    pub id: Uuid,
    /// The site it was sent for.
    pub site: String,
    /// Its JSON, as received and validated.
    pub body: String,
}

/// Something the relay could not deliver, kept with why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// `ingest` (rejected by validation) or `sink` (rejected by a sink).
    pub stage: &'static str,
    /// The sink that rejected it (stage `sink`).
    pub sink: Option<String>,
    /// The site, when known.
    pub site: Option<String>,
    /// A stable reason code.
    pub reason: String,
    /// Human-readable detail.
    pub detail: String,
    /// The event's id, when readable.
    pub event_id: Option<Uuid>,
    /// The raw event (truncated to 64 KiB).
    pub raw: String,
}

/// Whether an event was new or already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Stored now.
    New,
    /// Stored earlier; not stored again.
    Duplicate,
}

/// What a spooled record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// An event's JSON.
    Event,
    /// An agent's counters' JSON.
    Counters,
}

/// One record waiting in the spool.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its position; records are delivered in this order.
    pub pos: i64,
    /// What it is.
    pub kind: RecordKind,
    /// The site.
    pub site: String,
    /// When the relay received it, milliseconds since the Unix epoch.
    pub received_at: i64,
    /// The JSON.
    pub body: String,
}

/// The spool failed; the request must not be acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    /// SQLite reported an error (I/O error, corruption, ...).
    #[error("spool storage error: {0}")]
    Storage(String),
    /// The disk, or the spool file's cap (`spool.max_file_bytes`), is full.
    #[error("spool storage full: {0}")]
    Full(String),
    /// The writer has stopped (shutting down).
    #[error("spool is closed")]
    Closed,
}

impl From<rusqlite::Error> for SpoolError {
    fn from(e: rusqlite::Error) -> Self {
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
            SpoolError::Full(e.to_string())
        } else {
            SpoolError::Storage(e.to_string())
        }
    }
}

/// One sink's place in the spool, kept current by the writer thread.
#[derive(Debug, Default)]
pub struct SinkProgress {
    /// The sink's name (its cursor's key).
    pub name: String,
    /// The last position the sink has taken (durable: it is what `sink_cursor` holds).
    pub cursor: AtomicI64,
    /// Records after the cursor (waiting for this sink).
    pub backlog_rows: AtomicU64,
    /// Bytes of the records after the cursor.
    pub backlog_bytes: AtomicU64,
    /// Signalled after a commit that stored new records (a permit is kept if no one waits).
    pub new_records: Notify,
}

/// Live figures of the spool, readable without a query.
#[derive(Debug, Default)]
pub struct SpoolStats {
    /// Records waiting.
    pub rows: AtomicU64,
    /// Bytes of record bodies waiting.
    pub bytes: AtomicU64,
    /// Last time the writer thread was alive, ms since the epoch.
    pub last_beat_ms: AtomicI64,
    /// Whether the last transaction committed.
    pub healthy: AtomicBool,
}

struct WriteJob {
    source: &'static str,
    events: Vec<NewEvent>,
    counters: Option<(String, String)>,
    dead: Vec<DeadLetter>,
    reply: oneshot::Sender<Result<Vec<Admission>, SpoolError>>,
}

struct AckJob {
    sink: usize,
    up_to: i64,
    rows: u64,
    bytes: u64,
    dead: Vec<DeadLetter>,
    reply: oneshot::Sender<Result<(), SpoolError>>,
}

enum Job {
    Write(WriteJob),
    Ack(AckJob),
    Prune { before_ms: i64 },
    Beat,
    Shutdown(oneshot::Sender<()>),
}

/// The spool: a handle to the writer thread plus what readers need.
pub struct Spool {
    tx: mpsc::Sender<Job>,
    stats: Arc<SpoolStats>,
    sinks: Vec<Arc<SinkProgress>>,
    path: PathBuf,
    thread: Mutex<Option<JoinHandle<()>>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS spool (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    site TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (id BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sink_cursor (name TEXT PRIMARY KEY, pos INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letter (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at INTEGER NOT NULL,
    stage TEXT NOT NULL,
    site TEXT,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    event_id TEXT,
    raw TEXT NOT NULL,
    sink TEXT
);
CREATE TABLE IF NOT EXISTS tally (
    day TEXT NOT NULL,
    site TEXT NOT NULL,
    source TEXT NOT NULL,
    accepted INTEGER NOT NULL,
    duplicates INTEGER NOT NULL,
    rejected INTEGER NOT NULL,
    PRIMARY KEY (day, site, source)
) WITHOUT ROWID;
";

const MAX_DEAD_RAW: usize = 64 * 1024;

impl Spool {
    /// Opens (or creates) the spool file and starts the writer thread. `sinks` are the
    /// configured sinks' names, in the order [`Spool::sinks`] and [`Spool::ack`] use.
    pub fn open(
        path: &Path,
        max_group_requests: usize,
        sinks: &[String],
    ) -> Result<Spool, SpoolError> {
        Spool::open_capped(path, max_group_requests, sinks, 0)
    }

    /// [`Spool::open`] with the database file capped at about `max_file_bytes` (0: no cap;
    /// SQLite's `max_page_count`): beyond it a transaction fails as if the disk were full.
    pub fn open_capped(
        path: &Path,
        max_group_requests: usize,
        sinks: &[String],
        max_file_bytes: u64,
    ) -> Result<Spool, SpoolError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        if max_file_bytes > 0 {
            let page: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
            let pages = (max_file_bytes / page.max(1) as u64).clamp(1, i64::MAX as u64) as i64;
            conn.pragma_update(None, "max_page_count", pages)?;
        }
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        let progress = open_cursors(&mut conn, sinks)?;
        let (rows, bytes): (i64, i64) = conn.query_row(
            "SELECT count(*), coalesce(sum(length(CAST(body AS BLOB))), 0) FROM spool",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let stats = Arc::new(SpoolStats::default());
        stats.rows.store(rows as u64, Ordering::Relaxed);
        stats.bytes.store(bytes as u64, Ordering::Relaxed);
        stats.healthy.store(true, Ordering::Relaxed);
        stats.last_beat_ms.store(now_ms(), Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(max_group_requests * 4);
        let deleted_up_to = progress
            .iter()
            .map(|p| p.cursor.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        let writer = Writer {
            conn,
            stats: stats.clone(),
            max_group: max_group_requests,
            sinks: progress.clone(),
            deleted_up_to,
        };
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| SpoolError::Storage(e.to_string()))?;
        Ok(Spool {
            tx,
            stats,
            sinks: progress,
            path: path.to_path_buf(),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Each configured sink's place, in the order given to [`Spool::open`].
    pub fn sinks(&self) -> &[Arc<SinkProgress>] {
        &self.sinks
    }

    /// Live figures.
    pub fn stats(&self) -> &SpoolStats {
        &self.stats
    }

    /// Stores events (deduped), an agent's counters and dead letters of one request from
    /// `source` (`client` or `server`) in one durable transaction, shared with whatever other
    /// requests are waiting. Returns, per event in order, whether it was new.
    pub async fn write(
        &self,
        source: &'static str,
        events: Vec<NewEvent>,
        counters: Option<(String, String)>,
        dead: Vec<DeadLetter>,
    ) -> Result<Vec<Admission>, SpoolError> {
        let (reply, rx) = oneshot::channel();
        let job = Job::Write(WriteJob {
            source,
            events,
            counters,
            dead,
            reply,
        });
        self.tx.send(job).await.map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Records that sink number `sink` has taken every record up to `up_to` (inclusive):
    /// `rows` records of `bytes` bytes, of which `dead` it rejected permanently (stored as dead
    /// letters). Moves its durable cursor, and deletes what every sink has now taken.
    pub async fn ack(
        &self,
        sink: usize,
        up_to: i64,
        rows: u64,
        bytes: u64,
        dead: Vec<DeadLetter>,
    ) -> Result<(), SpoolError> {
        let (reply, rx) = oneshot::channel();
        let job = Job::Ack(AckJob {
            sink,
            up_to,
            rows,
            bytes,
            dead,
            reply,
        });
        self.tx.send(job).await.map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Forgets ids whose UUIDv7 time is before `before_ms`.
    pub async fn prune(&self, before_ms: i64) {
        let _ = self.tx.send(Job::Prune { before_ms }).await;
    }

    /// Proves the writer is alive (it stamps `last_beat_ms`).
    pub async fn beat(&self) {
        let _ = self.tx.send(Job::Beat).await;
    }

    /// Finishes the jobs already queued, checkpoints, and stops the writer thread.
    pub async fn close(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Job::Shutdown(done)).await.is_ok() {
            let _ = rx.await;
        }
        let handle = self.thread.lock().expect("not poisoned").take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }

    /// A read-only connection for the forwarder.
    pub fn reader(&self) -> Result<SpoolReader, SpoolError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(SpoolReader { conn })
    }
}

/// Reads spooled records in order.
pub struct SpoolReader {
    conn: Connection,
}

impl SpoolReader {
    /// Up to `limit` records with `pos > after`, in order.
    pub fn read_after(&mut self, after: i64, limit: usize) -> Result<Vec<Record>, SpoolError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT pos, kind, site, received_at, body FROM spool WHERE pos > ?1 ORDER BY pos LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit as i64], |r| {
            Ok(Record {
                pos: r.get(0)?,
                kind: if r.get::<_, i64>(1)? == 1 {
                    RecordKind::Counters
                } else {
                    RecordKind::Event
                },
                site: r.get(2)?,
                received_at: r.get(3)?,
                body: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Dead letters by stage and reason.
    pub fn dead_letter_counts(&mut self) -> Result<Vec<(String, String, u64)>, SpoolError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT stage, reason, count(*) FROM dead_letter GROUP BY stage, reason ORDER BY stage, reason",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

/// Adds columns that earlier versions of the spool did not have.
fn migrate(conn: &Connection) -> Result<(), SpoolError> {
    let has_sink: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('dead_letter') WHERE name = 'sink'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has_sink {
        conn.execute_batch("ALTER TABLE dead_letter ADD COLUMN sink TEXT")?;
    }
    Ok(())
}

/// Loads the configured sinks' cursors (a new sink starts at 0), drops those of sinks no
/// longer configured, deletes what every configured sink has taken, and counts each backlog.
fn open_cursors(
    conn: &mut Connection,
    sinks: &[String],
) -> Result<Vec<Arc<SinkProgress>>, SpoolError> {
    let tx = conn.transaction()?;
    let known: Vec<(String, i64)> = {
        let mut stmt = tx.prepare("SELECT name, pos FROM sink_cursor")?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?
    };
    for (name, pos) in &known {
        if !sinks.contains(name) {
            tracing::warn!(sink = %name, pos, "forgetting the cursor of a sink no longer configured");
            tx.execute("DELETE FROM sink_cursor WHERE name = ?1", params![name])?;
        }
    }
    let mut progress = Vec::with_capacity(sinks.len());
    for name in sinks {
        let cursor = match known.iter().find(|(n, _)| n == name) {
            Some((_, pos)) => *pos,
            None => {
                tx.execute(
                    "INSERT INTO sink_cursor (name, pos) VALUES (?1, 0)",
                    params![name],
                )?;
                0
            }
        };
        let (rows, bytes): (i64, i64) = tx.query_row(
            "SELECT count(*), coalesce(sum(length(CAST(body AS BLOB))), 0) FROM spool WHERE pos > ?1",
            params![cursor],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        progress.push(Arc::new(SinkProgress {
            name: name.clone(),
            cursor: AtomicI64::new(cursor),
            backlog_rows: AtomicU64::new(rows as u64),
            backlog_bytes: AtomicU64::new(bytes as u64),
            new_records: Notify::new(),
        }));
    }
    if let Some(min) = progress
        .iter()
        .map(|p| p.cursor.load(Ordering::Relaxed))
        .min()
    {
        tx.execute("DELETE FROM spool WHERE pos <= ?1", params![min])?;
    }
    tx.commit()?;
    Ok(progress)
}

struct Writer {
    conn: Connection,
    stats: Arc<SpoolStats>,
    max_group: usize,
    sinks: Vec<Arc<SinkProgress>>,
    /// Every record at or below this position has been deleted.
    deleted_up_to: i64,
}

/// What one transaction did, applied to the live figures once it has committed.
struct Outcome {
    admissions: Vec<Vec<Admission>>,
    added_rows: u64,
    added_bytes: u64,
    /// The sinks' cursors after the acks (same order as `Writer::sinks`).
    cursors: Vec<i64>,
    deleted_up_to: i64,
    deleted_rows: u64,
    deleted_bytes: u64,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        while shutdown.is_none() {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            let mut jobs = vec![first];
            while jobs.len() < self.max_group {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            self.stats.last_beat_ms.store(now_ms(), Ordering::Relaxed);
            let mut writes = Vec::new();
            let mut acks = Vec::new();
            let mut prune = None;
            for job in jobs {
                match job {
                    Job::Write(w) => writes.push(w),
                    Job::Ack(a) => acks.push(a),
                    Job::Prune { before_ms } => prune = Some(before_ms),
                    Job::Beat => {}
                    Job::Shutdown(done) => shutdown = Some(done),
                }
            }
            if writes.is_empty() && acks.is_empty() && prune.is_none() {
                continue;
            }
            let started = Instant::now();
            let outcome = self.transaction(&writes, &acks, prune);
            metrics::histogram!("trueup_spool_commit_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!("trueup_spool_commit_requests").record(writes.len() as f64);
            match outcome {
                Ok(o) => self.committed(o, writes, acks),
                // Full: the new events are refused, but the sinks' acks delete records and so
                // make room; they must not wait behind the writes that cannot fit.
                Err(e @ SpoolError::Full(_)) if !writes.is_empty() && !acks.is_empty() => {
                    self.failed(&e, writes, Vec::new());
                    match self.transaction(&[], &acks, prune) {
                        Ok(o) => self.committed(o, Vec::new(), acks),
                        Err(e) => self.failed(&e, Vec::new(), acks),
                    }
                }
                Err(e) => self.failed(&e, writes, acks),
            }
        }
        // Answer what is still queued: those requests get 503 and retry later.
        rx.close();
        while let Ok(job) = rx.try_recv() {
            match job {
                Job::Write(w) => drop(w.reply.send(Err(SpoolError::Closed))),
                Job::Ack(a) => drop(a.reply.send(Err(SpoolError::Closed))),
                Job::Shutdown(done) => drop(done.send(())),
                _ => {}
            }
        }
        if let Err(e) = self.conn.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
            tracing::warn!(error = %e, "spool checkpoint at shutdown failed; WAL replays at next start");
        }
        if let Some(done) = shutdown {
            let _ = done.send(());
        }
    }

    /// One transaction for a group of jobs: the writes, the cursor moves, the deletions.
    /// Applies a committed transaction to the live figures and answers its requests.
    fn committed(&mut self, o: Outcome, writes: Vec<WriteJob>, acks: Vec<AckJob>) {
        self.stats.healthy.store(true, Ordering::Relaxed);
        self.stats.rows.fetch_add(o.added_rows, Ordering::Relaxed);
        self.stats.bytes.fetch_add(o.added_bytes, Ordering::Relaxed);
        // Deletions only remove what an earlier commit added: never an underflow.
        self.stats.rows.fetch_sub(o.deleted_rows, Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_sub(o.deleted_bytes, Ordering::Relaxed);
        self.deleted_up_to = o.deleted_up_to;
        for (p, cursor) in self.sinks.iter().zip(&o.cursors) {
            p.cursor.store(*cursor, Ordering::Relaxed);
            p.backlog_rows.fetch_add(o.added_rows, Ordering::Relaxed);
            p.backlog_bytes.fetch_add(o.added_bytes, Ordering::Relaxed);
        }
        for a in &acks {
            if let Some(p) = self.sinks.get(a.sink) {
                p.backlog_rows.fetch_sub(
                    a.rows.min(p.backlog_rows.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
                p.backlog_bytes.fetch_sub(
                    a.bytes.min(p.backlog_bytes.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
            }
        }
        if o.added_rows > 0 {
            for p in &self.sinks {
                p.new_records.notify_one();
            }
        }
        for (w, adm) in writes.into_iter().zip(o.admissions) {
            let _ = w.reply.send(Ok(adm));
        }
        for a in acks {
            let _ = a.reply.send(Ok(()));
        }
    }

    /// Answers the requests of a transaction that rolled back: nothing of them is stored.
    fn failed(&mut self, e: &SpoolError, writes: Vec<WriteJob>, acks: Vec<AckJob>) {
        self.stats.healthy.store(false, Ordering::Relaxed);
        if matches!(e, SpoolError::Full(_)) {
            metrics::counter!("trueup_spool_full_total").increment(1);
        }
        tracing::error!(error = %e, requests = writes.len(), "spool transaction failed; requests answered 503");
        for w in writes {
            let _ = w.reply.send(Err(e.clone()));
        }
        for a in acks {
            let _ = a.reply.send(Err(e.clone()));
        }
    }

    fn transaction(
        &mut self,
        writes: &[WriteJob],
        acks: &[AckJob],
        prune: Option<i64>,
    ) -> Result<Outcome, SpoolError> {
        let now = now_ms();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut outcome = Outcome {
            admissions: Vec::with_capacity(writes.len()),
            added_rows: 0,
            added_bytes: 0,
            cursors: Vec::new(),
            deleted_up_to: self.deleted_up_to,
            deleted_rows: 0,
            deleted_bytes: 0,
        };
        {
            let mut seen = tx.prepare_cached("INSERT OR IGNORE INTO seen (id) VALUES (?1)")?;
            let mut spool = tx.prepare_cached(
                "INSERT INTO spool (kind, site, received_at, body) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut dead = tx.prepare_cached(
                "INSERT INTO dead_letter (received_at, stage, site, reason, detail, event_id, raw, sink)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            let mut insert_dead = |d: &DeadLetter| -> Result<(), rusqlite::Error> {
                let raw = truncate(&d.raw, MAX_DEAD_RAW);
                dead.execute(params![
                    now,
                    d.stage,
                    d.site,
                    d.reason,
                    d.detail,
                    d.event_id.map(|u| u.to_string()),
                    raw,
                    d.sink
                ])?;
                Ok(())
            };
            // Housekeeping first, so a job group behaves as if the prune came before the writes.
            if let Some(before_ms) = prune {
                let bound = Uuid::new_v7(uuid::Timestamp::from_unix(
                    uuid::NoContext,
                    (before_ms.max(0) / 1000) as u64,
                    ((before_ms.max(0) % 1000) * 1_000_000) as u32,
                ));
                // The lowest UUIDv7 of that millisecond: timestamp bytes, then zeros.
                let mut low = [0u8; 16];
                low[..6].copy_from_slice(&bound.as_bytes()[..6]);
                let n = tx.execute("DELETE FROM seen WHERE id < ?1", params![low.as_slice()])?;
                if n > 0 {
                    tracing::info!(forgotten = n, "pruned dedupe ids past retention");
                }
            }
            // (site, source) -> [accepted, duplicates, rejected] of this transaction.
            let mut tally: Vec<((&str, &str), [i64; 3])> = Vec::new();
            fn count<'a>(
                tally: &mut Vec<((&'a str, &'a str), [i64; 3])>,
                key: (&'a str, &'a str),
                what: usize,
            ) {
                match tally.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, counts)) => counts[what] += 1,
                    None => {
                        let mut counts = [0; 3];
                        counts[what] = 1;
                        tally.push((key, counts));
                    }
                }
            }
            for w in writes {
                let mut adm = Vec::with_capacity(w.events.len());
                for e in &w.events {
                    let new = seen.execute(params![e.id.as_bytes().as_slice()])? == 1;
                    if new {
                        spool.execute(params![0, e.site, now, e.body])?;
                        outcome.added_rows += 1;
                        outcome.added_bytes += e.body.len() as u64;
                        adm.push(Admission::New);
                    } else {
                        adm.push(Admission::Duplicate);
                    }
                    count(&mut tally, (&e.site, w.source), if new { 0 } else { 1 });
                }
                if let Some((site, body)) = &w.counters {
                    spool.execute(params![1, site, now, body])?;
                    outcome.added_rows += 1;
                    outcome.added_bytes += body.len() as u64;
                }
                for d in &w.dead {
                    insert_dead(d)?;
                    count(&mut tally, (d.site.as_deref().unwrap_or(""), w.source), 2);
                }
                outcome.admissions.push(adm);
            }
            let mut add = tx.prepare_cached(
                "INSERT INTO tally (day, site, source, accepted, duplicates, rejected)
                 VALUES (strftime('%Y-%m-%d', ?1 / 1000, 'unixepoch'), ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (day, site, source) DO UPDATE SET
                   accepted = accepted + excluded.accepted,
                   duplicates = duplicates + excluded.duplicates,
                   rejected = rejected + excluded.rejected",
            )?;
            for ((site, source), [accepted, duplicates, rejected]) in tally {
                add.execute(params![now, site, source, accepted, duplicates, rejected])?;
            }
            let mut cursors: Vec<i64> = self
                .sinks
                .iter()
                .map(|p| p.cursor.load(Ordering::Relaxed))
                .collect();
            let mut advance =
                tx.prepare_cached("UPDATE sink_cursor SET pos = ?2 WHERE name = ?1")?;
            for a in acks {
                for d in &a.dead {
                    insert_dead(d)?;
                }
                if let (Some(p), Some(c)) = (self.sinks.get(a.sink), cursors.get_mut(a.sink))
                    && a.up_to > *c
                {
                    *c = a.up_to;
                    advance.execute(params![p.name, a.up_to])?;
                }
            }
            outcome.cursors = cursors;
        }
        let min = outcome
            .cursors
            .iter()
            .copied()
            .min()
            .unwrap_or(self.deleted_up_to);
        outcome.deleted_up_to = self.deleted_up_to.max(min);
        if min > self.deleted_up_to {
            let mut delete = tx.prepare_cached(
                "DELETE FROM spool WHERE pos <= ?1 RETURNING length(CAST(body AS BLOB))",
            )?;
            let mut rows = delete.query(params![min])?;
            while let Some(r) = rows.next()? {
                outcome.deleted_rows += 1;
                outcome.deleted_bytes += r.get::<_, i64>(0)? as u64;
            }
        }
        tx.commit()?;
        Ok(outcome)
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    //! A model-based test: random writes (with repeated ids), acks and restarts are applied to
    //! the real spool and to a plain model (a set of seen ids and a list of pending records);
    //! after every step they must agree on admissions, on what is pending, and on the stats.

    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Write events picked (by index) from a small pool, so duplicates are common.
        Write(Vec<usize>),
        /// Sink k takes the next n records after its cursor.
        Ack(usize, usize),
        /// Close and reopen the spool (a clean restart).
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => prop::collection::vec(0..40usize, 0..8).prop_map(Op::Write),
            3 => (0..2usize, 0..10usize).prop_map(|(k, n)| Op::Ack(k, n)),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        /// Two sinks take records at their own pace: each gets every record once, in order,
        /// across restarts; a record stays spooled until both have it.
        #[test]
        fn spool_agrees_with_a_model(ops in prop::collection::vec(op(), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("spool.sqlite");
                let sinks = ["a".to_string(), "b".to_string()];
                let pool: Vec<Uuid> = (0..40).map(|_| Uuid::now_v7()).collect();
                let mut spool = Spool::open(&path, 8, &sinks).unwrap();
                let mut seen: HashSet<Uuid> = HashSet::new();
                // Every record ever stored, in order, and how many of them each sink took.
                let mut stored: Vec<String> = Vec::new();
                let mut taken = [0usize; 2];
                let (mut accepted, mut duplicates) = (0i64, 0i64);
                for op in ops {
                    match op {
                        Op::Write(picks) => {
                            let events: Vec<NewEvent> = picks
                                .iter()
                                .map(|&i| NewEvent { id: pool[i], site: "s".into(), body: format!("{{\"i\":{i}}}") })
                                .collect();
                            let got = spool.write("client", events.clone(), None, vec![]).await.unwrap();
                            let want: Vec<Admission> = events
                                .iter()
                                .map(|e| {
                                    if seen.insert(e.id) {
                                        stored.push(e.body.clone());
                                        accepted += 1;
                                        Admission::New
                                    } else {
                                        duplicates += 1;
                                        Admission::Duplicate
                                    }
                                })
                                .collect();
                            assert_eq!(got, want);
                        }
                        Op::Ack(k, n) => {
                            let cursor = spool.sinks()[k].cursor.load(Ordering::Relaxed);
                            let records = spool.reader().unwrap().read_after(cursor, n).unwrap();
                            let bodies: Vec<&str> = records.iter().map(|r| r.body.as_str()).collect();
                            let end = (taken[k] + n).min(stored.len());
                            let want: Vec<&str> = stored[taken[k]..end].iter().map(String::as_str).collect();
                            assert_eq!(bodies, want, "sink {k} reads what it has not taken, in order");
                            if let Some(last) = records.last() {
                                let bytes = records.iter().map(|r| r.body.len() as u64).sum();
                                spool.ack(k, last.pos, records.len() as u64, bytes, vec![]).await.unwrap();
                                taken[k] = end;
                            }
                        }
                        Op::Reopen => {
                            spool.close().await;
                            spool = Spool::open(&path, 8, &sinks).unwrap();
                        }
                    }
                    let kept = taken[0].min(taken[1]);
                    let records = spool.reader().unwrap().read_after(0, 1000).unwrap();
                    let bodies: Vec<&str> = records.iter().map(|r| r.body.as_str()).collect();
                    let want: Vec<&str> = stored[kept..].iter().map(String::as_str).collect();
                    assert_eq!(bodies, want, "spooled: what some sink has not taken");
                    assert_eq!(spool.stats().rows.load(Ordering::Relaxed), want.len() as u64);
                    let bytes: u64 = want.iter().map(|b| b.len() as u64).sum();
                    assert_eq!(spool.stats().bytes.load(Ordering::Relaxed), bytes);
                    for (k, p) in spool.sinks().iter().enumerate() {
                        let left = &stored[taken[k]..];
                        assert_eq!(p.backlog_rows.load(Ordering::Relaxed), left.len() as u64, "sink {k} backlog");
                        let bytes: u64 = left.iter().map(|b| b.len() as u64).sum();
                        assert_eq!(p.backlog_bytes.load(Ordering::Relaxed), bytes, "sink {k} backlog bytes");
                    }
                    let tally: (i64, i64) = Connection::open(&path)
                        .unwrap()
                        .query_row(
                            "SELECT coalesce(sum(accepted), 0), coalesce(sum(duplicates), 0) FROM tally",
                            [],
                            |r| Ok((r.get(0)?, r.get(1)?)),
                        )
                        .unwrap();
                    assert_eq!(tally, (accepted, duplicates), "tally of accepted and duplicates");
                }
                spool.close().await;
            });
        }
    }

    #[tokio::test]
    async fn a_sink_added_later_starts_from_the_oldest_record_and_a_removed_one_holds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.sqlite");
        let ev = |i: usize| NewEvent {
            id: Uuid::now_v7(),
            site: "s".into(),
            body: format!("{{\"i\":{i}}}"),
        };
        let spool = Spool::open(&path, 8, &["a".to_string()]).unwrap();
        spool
            .write("client", (0..4).map(ev).collect(), None, vec![])
            .await
            .unwrap();
        let first = spool.reader().unwrap().read_after(0, 2).unwrap();
        spool.ack(0, first[1].pos, 2, 14, vec![]).await.unwrap();
        spool.close().await;
        // "b" is new: it starts from the oldest record still spooled (the 3rd), "a" resumes.
        let spool = Spool::open(&path, 8, &["a".to_string(), "b".to_string()]).unwrap();
        assert_eq!(
            spool.sinks()[0].cursor.load(Ordering::Relaxed),
            first[1].pos
        );
        assert_eq!(spool.sinks()[1].cursor.load(Ordering::Relaxed), 0);
        assert_eq!(spool.sinks()[1].backlog_rows.load(Ordering::Relaxed), 2);
        let rest = spool.reader().unwrap().read_after(0, 10).unwrap();
        assert_eq!(rest.len(), 2);
        spool.ack(0, rest[1].pos, 2, 14, vec![]).await.unwrap();
        assert_eq!(
            spool.stats().rows.load(Ordering::Relaxed),
            2,
            "b has not taken them"
        );
        spool.close().await;
        // Without "b" configured, nothing waits for it: its records go at open.
        let spool = Spool::open(&path, 8, &["a".to_string()]).unwrap();
        assert_eq!(spool.stats().rows.load(Ordering::Relaxed), 0);
        let cursors: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM sink_cursor", [], |r| r.get(0))
            .unwrap();
        assert_eq!(cursors, 1);
        spool.close().await;
    }

    #[tokio::test]
    async fn prune_forgets_only_ids_older_than_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool.sqlite"), 8, &["w".to_string()]).unwrap();
        let old = Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, 1_000_000, 0));
        let new = Uuid::now_v7();
        let ev = |id| NewEvent {
            id,
            site: "s".into(),
            body: "{}".into(),
        };
        spool
            .write("client", vec![ev(old), ev(new)], None, vec![])
            .await
            .unwrap();
        spool.prune(now_ms() - 60_000).await;
        let again = spool
            .write("client", vec![ev(old), ev(new)], None, vec![])
            .await
            .unwrap();
        assert_eq!(again, vec![Admission::New, Admission::Duplicate]);
        spool.close().await;
    }

    #[tokio::test]
    async fn dead_letters_are_kept_with_their_reason() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool.sqlite"), 8, &["w".to_string()]).unwrap();
        let dead = DeadLetter {
            stage: "ingest",
            sink: None,
            site: Some("s".into()),
            reason: "too_large".into(),
            detail: "big".into(),
            event_id: None,
            raw: "é".repeat(MAX_DEAD_RAW),
        };
        spool
            .write("client", vec![], None, vec![dead])
            .await
            .unwrap();
        let counts = spool.reader().unwrap().dead_letter_counts().unwrap();
        assert_eq!(
            counts,
            vec![("ingest".to_string(), "too_large".to_string(), 1)]
        );
        spool.close().await;
    }
}
