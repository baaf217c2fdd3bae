//! The pipeline part (`--pipeline kafka|nats`, instead of the usual phases): what the scale-out
//! path sustains on this machine, and how fresh the warehouse is at a fixed rate.
//!
//! Each measurement runs on a **fresh pipeline**: the log (tansu with in-memory storage from
//! `--tansu` or `TRUEUP_TANSU`, or `nats-server -js` with file storage), one release relay
//! whose only sink is that log (`kind = "kafka"` / `"nats"`, the sink's defaults), and one
//! loader (`trueup-relay load`, `batch_size` 5000 and `max_wait_ms` 100: the defaults) writing
//! to a PostgreSQL schema of its own (`--postgres URL`, else `TRUEUP_TEST_POSTGRES`; created
//! empty, dropped at the end), or to the SQLite warehouse when no PostgreSQL is given (the
//! output says which). Fresh, so that nothing of an earlier phase is in the log, the table or
//! the loader's one-minute summaries. All servers listen on loopback.
//!
//! 1. **Sustained throughput.** A warm-up closed loop (`--warmup-seconds`), a wait until the
//!    loader has stored all of it, then the closed loop at full speed for `--seconds`
//!    (`--connections`, batches of `--events-per-batch`/`--batch`). Reported: the events/s the
//!    relay accepted; the events/s the loader stored in the same window (the delta of its
//!    `trueup_loader_stored_total` read just before and just after the load); the time from
//!    the end of the load until the loader had stored every accepted event, and the
//!    end-to-end rate over the window plus that time. The relay answers once its spool has the
//!    batch, so when the log or the loader is slower, the relay's spool holds the difference;
//!    the measured events' stages from the warehouse (capture→accepted, accepted→log,
//!    log→write) show where it waited.
//! 2. **Freshness at a fixed rate**, per `--rate` (default 20,000 events/s): a warm-up open
//!    loop at that rate, a wait until it is stored, then the open loop for `--seconds`
//!    (batches scheduled at fixed intervals across the connections). Reported: the rate
//!    achieved (events answered as accepted over the phase, from its first scheduled send to
//!    its last answer) against the offered one, and the send lag (how late batches went out:
//!    a relay that answers slower than the schedule delays the connection's next batch);
//!    "held" means no failed request and at least 98 % of the offered rate.
//!
//!    **Tracked → warehouse latency, per event, computed exactly from the warehouse.** Every
//!    event's `ts` is its generation time (the load generator sets it when it builds the
//!    batch, just before sending). The warehouse stores, per event, `received_at` (the relay's
//!    acknowledgement), `logged_at` (when the log took it: Kafka's `CreateTime` set by the
//!    relay's producer, or JetStream's publish time) and `stored_at` (the loader's write: one
//!    value per warehouse transaction, taken before the insert). A row becomes visible to
//!    readers only when that transaction commits, a little after `stored_at`. To bracket the
//!    commit, a thread of its own polls the loader's `trueup_loader_stored_total` every
//!    [`POLL`] during the phase and the drain after it, noting each reading's send and
//!    receive times; the loader adds a write's rows to the counter right after the commit.
//!    After the run, the warehouse's writes (`stored_at` values, in order, with their row
//!    counts) are put against those readings: the write that brought the count to `C`
//!    committed after `stored_at` and after the last reading below `C` was sent, and before
//!    the first reading at or above `C` was received. Each event of the phase (its device ids
//!    name the phase) is then counted with `commit − ts` at both ends of that bracket; the
//!    bracket's width is the resolution (one poll interval plus a request; the measured
//!    largest interval is printed). `stored_at − ts` (the write began) and the stages
//!    (capture→accepted, accepted→log, log→write, write→committed) are reported too, and next
//!    to them the loader's own `capture_to_warehouse` p50/p95 from its `/metrics` (a summary
//!    over its last minute, read after the drain: the warm-up and this phase, as the loader
//!    measured them when each write returned). Clocks: one machine, one wall clock; `ts` has
//!    millisecond resolution.
//!
//! CPU time (from `/proc/<pid>/stat`) over each measured window: the relay, the loader, the
//! log's server, PostgreSQL's server processes serving the loader (found by its
//! `application_name`) and PostgreSQL's background processes (WAL writer, checkpointer, …:
//! the postmaster's children that serve no client), and the benchmark itself (load generator
//! and poller). Everything shares the machine's cores. The JSON also has the whole machine's
//! busy time over the window (`/proc/stat`), a check that nothing else ran meanwhile; it is
//! sampled at each timer tick, so it reads low for work that runs just after timers fire (the
//! open loop's), unlike the per-process times, which the kernel keeps exactly.
//!
//! Checks: every request answered 200 with all its events accepted, the warehouse holds
//! exactly the events accepted (the loader's duplicates, if any, are absorbed and counted),
//! every process exits cleanly on SIGTERM. Bounded: every load by `--seconds` (the open loop
//! may overrun by 10 s), every wait for the loader by [`DRAIN_TIMEOUT`], the poller by the
//! same; processes are stopped and the schema dropped at the end of each measurement, also
//! when it fails.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::time::Instant;

use crate::load::{self, Expect, Load, PhaseResult, Target};
use crate::pg::{PgScratch, cpu_between};
use crate::procs::{self, LoaderProc, LogKind, LogProc, RelayProc, RelaySetup};
use crate::{COLLECT_PATH, READY_TIMEOUT, phase_json};

/// Longest wait for the loader to store what was accepted.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the loader's stored count is read while latency is measured.
const POLL: Duration = Duration::from_millis(20);
/// The loader's `batch_size` and `max_wait_ms` (its defaults, written out so that the
/// output names what ran).
const LOADER_BATCH_SIZE: u64 = 5_000;
const LOADER_MAX_WAIT_MS: u64 = 100;
/// `application_name` of the loader's PostgreSQL connection.
const PG_APP: &str = "trueup-bench-loader";
/// How long the loader and the log may take to stop after SIGTERM.
const STOP_OTHERS: Duration = Duration::from_secs(15);
/// Share of the offered rate that counts as held.
const HELD: f64 = 0.98;

/// What the pipeline part needs from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    pub log: LogKind,
    /// tansu or nats-server.
    pub log_bin: PathBuf,
    pub relay_bin: PathBuf,
    pub postgres: Option<String>,
    pub connections: usize,
    pub events_per_batch: usize,
    pub seconds: u64,
    pub warmup_seconds: u64,
    /// Offered rates of the fixed-rate measurements, events/s.
    pub rates: Vec<u64>,
    pub client_threads: u64,
}

impl Settings {
    fn load(&self, phase: usize, seconds: u64) -> Load {
        Load {
            connections: self.connections,
            events_per_batch: self.events_per_batch,
            duration: Duration::from_secs(seconds),
            phase,
            max_batches: None,
        }
    }
}

/// Where the loader writes, and how the benchmark reads it back.
enum Store {
    Postgres(PgScratch),
    Sqlite(PathBuf),
}

/// One event's stage times from the warehouse, ms since the epoch.
struct EventTimes {
    ts: i64,
    received_at: i64,
    logged_at: Option<i64>,
    stored_at: Option<i64>,
}

impl Store {
    async fn create(postgres: Option<&str>, dir: &Path, label: &str) -> anyhow::Result<Store> {
        Ok(match postgres {
            Some(url) => Store::Postgres(PgScratch::create(url, dir, label, PG_APP).await?),
            None => Store::Sqlite(dir.join("loader-data").join("warehouse.sqlite")),
        })
    }

    /// The `[loader]` lines that say where to write.
    fn loader_toml(&self) -> String {
        match self {
            Store::Postgres(pg) => format!(
                "to = \"postgres\"\nsecret_file = {}\n",
                toml_str(&pg.url_file.display().to_string())
            ),
            Store::Sqlite(path) => format!(
                "to = \"warehouse\"\npath = {}\n",
                toml_str(&path.display().to_string())
            ),
        }
    }

    fn sqlite(path: &Path) -> anyhow::Result<rusqlite::Connection> {
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("open {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(conn)
    }

    async fn rows(&self) -> anyhow::Result<u64> {
        match self {
            Store::Postgres(pg) => pg.rows().await,
            Store::Sqlite(path) => {
                let n: i64 =
                    Store::sqlite(path)?
                        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
                Ok(n as u64)
            }
        }
    }

    /// The warehouse's writes in order: (`stored_at`, rows).
    async fn writes(&self) -> anyhow::Result<Vec<(i64, u64)>> {
        let sql = |t: &str| {
            format!(
                "SELECT stored_at, count(*) FROM {t} WHERE stored_at IS NOT NULL \
                 GROUP BY stored_at ORDER BY stored_at"
            )
        };
        match self {
            Store::Postgres(pg) => Ok(pg
                .client
                .query(&sql(&format!("{}.events", pg.schema)), &[])
                .await?
                .iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1) as u64))
                .collect()),
            Store::Sqlite(path) => {
                let conn = Store::sqlite(path)?;
                let mut stmt = conn.prepare(&sql("events"))?;
                let rows = stmt
                    .query_map([], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            }
        }
    }

    /// Calls `f` with the stage times of every event whose `device_id` starts with `prefix`,
    /// reading in chunks (the memory used does not grow with the phase).
    async fn each_event(&self, prefix: &str, mut f: impl FnMut(EventTimes)) -> anyhow::Result<()> {
        let select = |t: &str| {
            format!(
                "SELECT ts, received_at, logged_at, stored_at FROM {t} WHERE device_id LIKE '{prefix}%'"
            )
        };
        match self {
            Store::Postgres(pg) => {
                let c = &pg.client;
                c.batch_execute(&format!(
                    "BEGIN READ ONLY; DECLARE bench_events NO SCROLL CURSOR FOR {}",
                    select(&format!("{}.events", pg.schema))
                ))
                .await?;
                let read = async {
                    loop {
                        let rows = c.query("FETCH 50000 FROM bench_events", &[]).await?;
                        if rows.is_empty() {
                            return Ok::<_, anyhow::Error>(());
                        }
                        for r in rows {
                            f(EventTimes {
                                ts: r.try_get(0)?,
                                received_at: r.try_get(1)?,
                                logged_at: r.try_get(2)?,
                                stored_at: r.try_get(3)?,
                            });
                        }
                    }
                }
                .await;
                c.batch_execute("ROLLBACK").await?;
                read
            }
            Store::Sqlite(path) => {
                let conn = Store::sqlite(path)?;
                let mut stmt = conn.prepare(&select("events"))?;
                let mut rows = stmt.query([])?;
                while let Some(r) = rows.next()? {
                    f(EventTimes {
                        ts: r.get(0)?,
                        received_at: r.get(1)?,
                        logged_at: r.get(2)?,
                        stored_at: r.get(3)?,
                    });
                }
                Ok(())
            }
        }
    }

    async fn cpu_backends(&self) -> Vec<(u32, Duration)> {
        match self {
            Store::Postgres(pg) => pg.backend_cpu().await,
            Store::Sqlite(_) => Vec::new(),
        }
    }

    async fn cpu_background(&self) -> Option<Duration> {
        match self {
            Store::Postgres(pg) => pg.background_cpu().await,
            Store::Sqlite(_) => None,
        }
    }

    /// Drops the PostgreSQL schema.
    async fn finish(self) -> anyhow::Result<()> {
        match self {
            Store::Postgres(pg) => pg.drop_schema().await,
            Store::Sqlite(_) => Ok(()),
        }
    }
}

/// A TOML basic string (JSON's escaping is valid TOML for these ASCII paths and URLs).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// One fresh pipeline: its directory, warehouse, log, relay and loader.
struct Run {
    _dir: tempfile::TempDir,
    store: Store,
    log: LogProc,
    relay: RelayProc,
    loader: LoaderProc,
    target: Target,
}

impl Run {
    async fn start(s: &Settings, label: &str) -> anyhow::Result<Run> {
        let dir = tempfile::Builder::new()
            .prefix("trueup-bench-pipeline-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let store = Store::create(s.postgres.as_deref(), dir.path(), label).await?;
        match Run::start_processes(s, dir.path(), &store).await {
            Ok((log, relay, loader, target)) => Ok(Run {
                _dir: dir,
                store,
                log,
                relay,
                loader,
                target,
            }),
            Err(e) => {
                // The processes started so far are stopped as they drop.
                if let Err(d) = store.finish().await {
                    eprintln!("cannot drop the PostgreSQL schema: {d:#}");
                }
                Err(e)
            }
        }
    }

    async fn start_processes(
        s: &Settings,
        dir: &Path,
        store: &Store,
    ) -> anyhow::Result<(LogProc, RelayProc, LoaderProc, Target)> {
        let log = match s.log {
            LogKind::Kafka => LogProc::start_tansu(&s.log_bin, dir, READY_TIMEOUT).await?,
            LogKind::Nats => LogProc::start_nats(&s.log_bin, dir, READY_TIMEOUT).await?,
        };
        let (sink, source) = match s.log {
            LogKind::Kafka => (
                format!("kind = \"kafka\"\nbrokers = \"{}\"\n", log.addr),
                format!("from = \"kafka\"\nbrokers = \"{}\"\n", log.addr),
            ),
            LogKind::Nats => (
                format!("kind = \"nats\"\nurl = \"nats://{}\"\n", log.addr),
                format!("from = \"nats\"\nurl = \"nats://{}\"\n", log.addr),
            ),
        };
        let relay = RelayProc::start_with(
            &s.relay_bin,
            RelaySetup {
                extra_config: format!("\n[[sinks]]\nname = \"log\"\n{sink}"),
                dir: None,
                label: "pipeline",
            },
            READY_TIMEOUT,
        )
        .await?;
        let config = format!(
            "# Written by trueup-bench: the loader of the pipeline part.\n\
             admin_listen = \"127.0.0.1:0\"\ndata_dir = {}\n\n[loader]\n{source}{}\
             batch_size = {LOADER_BATCH_SIZE}\nmax_wait_ms = {LOADER_MAX_WAIT_MS}\n",
            toml_str(&dir.join("loader-data").display().to_string()),
            store.loader_toml(),
        );
        let loader = LoaderProc::start(&s.relay_bin, dir, &config, READY_TIMEOUT).await?;
        let target = Target::new(relay.addr, COLLECT_PATH, Expect::RelayAccepted)?;
        Ok((log, relay, loader, target))
    }

    /// Fails if any process of the pipeline has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.relay.exited() {
            bail!("the relay exited ({st}):\n{}", self.relay.log_tail(30));
        }
        if let Some(st) = self.loader.exited() {
            bail!("the loader exited ({st}):\n{}", self.loader.log_tail(30));
        }
        if let Some(st) = self.log.exited() {
            bail!("the log's server exited ({st}):\n{}", self.log.log_tail(30));
        }
        Ok(())
    }

    /// Polls the loader's stored count until it reaches `n`, for at most [`DRAIN_TIMEOUT`].
    /// Returns how long it took (`None`: it did not get there) and the last count.
    async fn wait_stored(&mut self, n: u64) -> anyhow::Result<(Option<Duration>, u64)> {
        let started = Instant::now();
        let mut last = 0;
        while started.elapsed() < DRAIN_TIMEOUT {
            match self.loader.stored().await {
                Ok(k) if k >= n => return Ok((Some(started.elapsed()), k)),
                Ok(k) => last = k,
                Err(e) => {
                    self.check_alive()?;
                    eprintln!("  reading the loader's count: {e:#}");
                }
            }
            tokio::time::sleep(POLL).await;
        }
        Ok((None, last))
    }

    async fn cpu(&self) -> CpuReading {
        CpuReading {
            at: Instant::now(),
            relay: procs::cpu_time(self.relay.pid()),
            loader: procs::cpu_time(self.loader.pid()),
            log: procs::cpu_time(self.log.pid()),
            bench: procs::cpu_time(std::process::id()),
            pg_backends: self.store.cpu_backends().await,
            pg_background: self.store.cpu_background().await,
            machine: procs::machine_busy_time(),
        }
    }

    /// Stops the relay, the loader and the log (SIGTERM), drops the schema; what did not
    /// go cleanly is added to `problems`.
    async fn finish(mut self, problems: &mut Vec<String>) {
        let (status, ok) = crate::stop_relay(&mut self.relay);
        if !ok {
            problems.push(format!("relay exit: {status}"));
            eprintln!("relay log (last lines):\n{}", self.relay.log_tail(20));
        }
        match self.loader.stop(STOP_OTHERS) {
            Ok((st, false)) if st.success() => {}
            Ok((st, killed)) => {
                // A panic's message is the line after "panicked at".
                let log = self.loader.log_tail(200);
                let panic = log
                    .lines()
                    .skip_while(|l| !l.contains("panicked at"))
                    .nth(1)
                    .map_or(String::new(), |m| format!(": panicked: {}", m.trim()));
                problems.push(format!(
                    "loader exit on SIGTERM: {st}{}{panic}",
                    if killed { " (killed)" } else { "" }
                ));
            }
            Err(e) => problems.push(format!("loader exit: {e:#}")),
        }
        // A log server's exit status on SIGTERM is its own affair; only a hang is noted.
        match self.log.stop(STOP_OTHERS) {
            Ok((_, false)) => {}
            Ok((st, true)) => problems.push(format!("log server killed after SIGTERM ({st})")),
            Err(e) => problems.push(format!("log server exit: {e:#}")),
        }
        if let Err(e) = self.store.finish().await {
            problems.push(format!("cannot drop the PostgreSQL schema: {e:#}"));
        }
    }
}

/// CPU times read at one moment.
struct CpuReading {
    at: Instant,
    relay: Option<Duration>,
    loader: Option<Duration>,
    log: Option<Duration>,
    bench: Option<Duration>,
    pg_backends: Vec<(u32, Duration)>,
    pg_background: Option<Duration>,
    machine: Option<Duration>,
}

/// CPU used between two readings.
#[derive(Debug, Clone, Copy)]
pub struct CpuUse {
    pub elapsed: Duration,
    pub relay: Option<Duration>,
    pub loader: Option<Duration>,
    pub log: Option<Duration>,
    /// PostgreSQL's processes serving the loader (`None`: SQLite).
    pub pg_backends: Option<Duration>,
    pub pg_background: Option<Duration>,
    /// The benchmark: load generator and poller.
    pub bench: Option<Duration>,
    /// The whole machine: the above and anything else running meanwhile (tick-sampled).
    pub machine: Option<Duration>,
}

impl CpuUse {
    fn between(a: &CpuReading, b: &CpuReading, postgres: bool) -> CpuUse {
        let d = |x: Option<Duration>, y: Option<Duration>| Some(y?.saturating_sub(x?));
        CpuUse {
            elapsed: b.at - a.at,
            relay: d(a.relay, b.relay),
            loader: d(a.loader, b.loader),
            log: d(a.log, b.log),
            pg_backends: postgres.then(|| cpu_between(&a.pg_backends, &b.pg_backends)),
            pg_background: d(a.pg_background, b.pg_background),
            bench: d(a.bench, b.bench),
            machine: d(a.machine, b.machine),
        }
    }

    fn parts(&self, log: LogKind) -> [(&'static str, Option<Duration>); 6] {
        [
            ("relay", self.relay),
            ("loader", self.loader),
            (
                match log {
                    LogKind::Kafka => "tansu",
                    LogKind::Nats => "nats-server",
                },
                self.log,
            ),
            ("pg loader backends", self.pg_backends),
            ("pg background", self.pg_background),
            ("bench", self.bench),
        ]
    }

    fn cores(&self, c: Option<Duration>) -> Option<f64> {
        let s = self.elapsed.as_secs_f64();
        c.filter(|_| s > 0.0).map(|c| c.as_secs_f64() / s)
    }

    fn total_cores(&self) -> f64 {
        self.parts(LogKind::Kafka)
            .iter()
            .filter_map(|(_, c)| self.cores(*c))
            .sum()
    }

    fn text(&self, log: LogKind) -> String {
        let mut out: Vec<String> = self
            .parts(log)
            .iter()
            .filter_map(|(name, c)| {
                Some(format!(
                    "{name} {:.2} s ({:.2} cores)",
                    (*c)?.as_secs_f64(),
                    self.cores(*c)?
                ))
            })
            .collect();
        out.push(format!("total {:.2} cores", self.total_cores()));
        out.join(", ")
    }

    fn json(&self, log: LogKind) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("seconds".into(), json!(self.elapsed.as_secs_f64()));
        for (name, c) in self.parts(log) {
            let key = match name {
                "tansu" | "nats-server" => "log".to_string(),
                n => n.replace(' ', "_"),
            };
            m.insert(
                key,
                json!({ "cpu_seconds": c.map(|c| c.as_secs_f64()), "cores": self.cores(c) }),
            );
        }
        m.insert("total_cores".into(), json!(self.total_cores()));
        m.insert(
            "machine_busy_cores_tick_sampled".into(),
            json!(self.cores(self.machine)),
        );
        serde_json::Value::Object(m)
    }
}

/// The sustained-throughput measurement.
pub struct Sustained {
    pub warmup: PhaseResult,
    pub result: PhaseResult,
    /// The loader's stored count just before and just after the load.
    pub stored_before: u64,
    pub stored_after: u64,
    /// From the end of the load until everything accepted was stored (`None`: not within
    /// [`DRAIN_TIMEOUT`]).
    pub drain: Option<Duration>,
    pub relay_spool_depth_at_end: Option<u64>,
    pub accepted: u64,
    pub rows: Option<u64>,
    pub duplicates: Option<f64>,
    pub cpu_window: CpuUse,
    pub cpu_drain: Option<CpuUse>,
    /// The stages of the measured events (no commit bracket: nothing is polled here), to
    /// show where the backlog waited.
    pub stages: Option<Latency>,
    pub problems: Vec<String>,
}

impl Sustained {
    pub fn stored_per_sec(&self) -> f64 {
        per_sec(
            self.stored_after.saturating_sub(self.stored_before),
            self.result.elapsed,
        )
    }

    /// Events accepted in the window over the window plus the drain.
    pub fn end_to_end_per_sec(&self) -> Option<f64> {
        Some(per_sec(
            self.result.accepted,
            self.result.elapsed + self.drain?,
        ))
    }
}

/// One reading of the loader's stored count.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// When the request was sent and its answer received, µs since the epoch.
    sent_us: i64,
    received_us: i64,
    stored: u64,
}

/// Bracketed latencies, µs.
pub struct Latency {
    /// Events of the phase found in the warehouse.
    pub events: u64,
    /// Events whose write no reading covered (the poller stopped first).
    pub unbracketed: u64,
    /// Events with a stage time missing.
    pub incomplete: u64,
    /// `commit − ts`, lower and upper end of the bracket.
    pub committed_lo: Histogram<u64>,
    pub committed_hi: Histogram<u64>,
    /// `stored_at − ts`.
    pub write_began: Histogram<u64>,
    pub capture_to_accepted: Histogram<u64>,
    pub accepted_to_log: Histogram<u64>,
    pub log_to_write: Histogram<u64>,
    /// Upper end of `commit − stored_at`.
    pub write_to_committed: Histogram<u64>,
    /// Intervals between readings, µs (their maximum bounds the bracket's width).
    pub poll_intervals: Histogram<u64>,
    pub samples: usize,
}

fn histogram() -> Histogram<u64> {
    // Up to an hour, in µs, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn ms(h: &Histogram<u64>, q: f64) -> Option<f64> {
    (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
}

/// The fixed-rate measurement.
pub struct Fixed {
    pub rate: u64,
    pub warmup: PhaseResult,
    pub result: PhaseResult,
    pub stored_before: u64,
    pub stored_after: u64,
    pub drain: Option<Duration>,
    pub accepted: u64,
    pub rows: Option<u64>,
    pub duplicates: Option<f64>,
    pub latency: Option<Latency>,
    /// `trueup_pipeline_lag_seconds` quantiles (stage, quantile) → seconds, loader and relay.
    pub loader_summary: Vec<(String, String, f64)>,
    pub relay_summary: Vec<(String, String, f64)>,
    pub cpu_window: CpuUse,
    pub problems: Vec<String>,
}

impl Fixed {
    pub fn achieved(&self) -> f64 {
        self.result.events_per_sec()
    }

    pub fn held(&self) -> bool {
        self.result.error_count() == 0 && self.achieved() >= HELD * self.rate as f64
    }

    pub fn stored_per_sec(&self) -> f64 {
        per_sec(
            self.stored_after.saturating_sub(self.stored_before),
            self.result.elapsed,
        )
    }

    fn summary(&self, stage: &str, q: &str) -> Option<f64> {
        self.loader_summary
            .iter()
            .chain(&self.relay_summary)
            .find(|(s, k, _)| s == stage && k == q)
            .map(|x| x.2 * 1000.0)
    }
}

fn per_sec(n: u64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Reads the loader's stored count every [`POLL`] on a thread and runtime of its own (so the
/// load generator cannot delay it), until the count reaches `target` (set once known) or
/// `deadline`.
fn spawn_poller(
    admin: SocketAddr,
    target: Arc<AtomicU64>,
    deadline: std::time::Instant,
) -> anyhow::Result<std::thread::JoinHandle<Vec<Sample>>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(std::thread::Builder::new()
        .name("bench-poller".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut samples = Vec::new();
                let mut tick = tokio::time::interval(POLL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while std::time::Instant::now() < deadline {
                    tick.tick().await;
                    let sent_us = now_us();
                    let Ok(text) = procs::get_metrics(admin).await else {
                        continue;
                    };
                    let received_us = now_us();
                    let stored = procs::metric(&text, "trueup_loader_stored_total", &[])
                        .unwrap_or(0.0) as u64;
                    samples.push(Sample {
                        sent_us,
                        received_us,
                        stored,
                    });
                    if stored >= target.load(Ordering::Relaxed) {
                        break;
                    }
                }
                samples
            })
        })?)
}

/// The `trueup_pipeline_lag_seconds` quantiles in a `/metrics` text.
fn lag_summary(text: &str) -> Vec<(String, String, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("trueup_pipeline_lag_seconds{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let label = |k: &str| {
            labels.split(',').find_map(|kv| {
                let (key, v) = kv.split_once('=')?;
                (key == k).then(|| v.trim_matches('"').to_string())
            })
        };
        if let (Some(stage), Some(q), Ok(v)) = (
            label("stage"),
            label("quantile"),
            value.trim().parse::<f64>(),
        ) {
            out.push((stage, q, v));
        }
    }
    out
}

/// Everything the pipeline part measured.
pub struct Report {
    pub settings: Settings,
    pub log_version: String,
    /// "PostgreSQL <version>" or the SQLite fallback.
    pub warehouse: String,
    pub postgres: bool,
    pub sustained: Sustained,
    pub fixed: Vec<Fixed>,
    pub event_bytes: f64,
}

pub async fn run(s: Settings) -> anyhow::Result<Report> {
    let postgres = s.postgres.is_some();
    eprintln!(
        "pipeline: relay -> {} -> loader -> {}",
        s.log.as_str(),
        if postgres {
            "PostgreSQL (a schema of its own)"
        } else {
            "SQLite (no PostgreSQL URL given: --postgres or TRUEUP_TEST_POSTGRES)"
        }
    );
    let mut problems = Vec::new();
    let mut run = Run::start(&s, "pipeline_max").await?;
    let log_version = run.log.version.clone();
    let warehouse = match &run.store {
        Store::Postgres(pg) => format!(
            "PostgreSQL {} (schema {}, dropped after)",
            pg.server_version().await.unwrap_or_else(|| "?".into()),
            pg.schema
        ),
        Store::Sqlite(_) => {
            "SQLite warehouse (no PostgreSQL URL: --postgres or TRUEUP_TEST_POSTGRES)".to_string()
        }
    };
    eprintln!(
        "  {} on {}, relay on {}, loader admin {}",
        log_version, run.log.addr, run.relay.addr, run.loader.admin
    );
    let sustained = sustained(&s, &mut run).await;
    run.finish(&mut problems).await;
    let mut sustained = sustained?;
    sustained.problems.append(&mut problems);

    let mut fixed = Vec::new();
    for (i, &rate) in s.rates.iter().enumerate() {
        let mut run = Run::start(&s, &format!("pipeline_{rate}")).await?;
        let f = fixed_rate(&s, &mut run, rate, 50 + 2 * i).await;
        let mut problems = Vec::new();
        run.finish(&mut problems).await;
        let mut f = f?;
        f.problems.append(&mut problems);
        fixed.push(f);
    }
    Ok(Report {
        event_bytes: sustained.result.bytes_per_event(),
        settings: s,
        log_version,
        warehouse,
        postgres,
        sustained,
        fixed,
    })
}

/// Device ids of the priming batch (see [`prime`]).
const PRIME_PHASE: usize = 99;

/// One batch through the pipeline, waited for: the stream or topic, the consumer and the
/// loader's first write exist before the warm-up, whose first events would otherwise wait
/// for them (and, being in the loader's one-minute summary, distort it). Returns the events
/// accepted.
async fn prime(s: &Settings, run: &mut Run) -> anyhow::Result<u64> {
    let one = Load {
        connections: 1,
        max_batches: Some(1),
        ..s.load(PRIME_PHASE, 10)
    };
    let r = load::closed_loop(&run.target, one).await?;
    anyhow::ensure!(
        r.accepted > 0,
        "the priming batch was not accepted: {:?}",
        r.errors
    );
    let started = Instant::now();
    settle(run, r.accepted, "priming batch").await?;
    eprintln!(
        "  primed: one batch through the pipeline in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(r.accepted)
}

async fn warm_up_closed(
    s: &Settings,
    run: &mut Run,
    phase: usize,
    before: u64,
) -> anyhow::Result<PhaseResult> {
    if s.warmup_seconds == 0 {
        return Ok(PhaseResult::empty());
    }
    eprintln!("  warm-up: {} s closed loop", s.warmup_seconds);
    let w = load::closed_loop(&run.target, s.load(phase, s.warmup_seconds)).await?;
    settle(run, before + w.accepted, "warm-up").await?;
    Ok(w)
}

/// Waits until the loader has stored `n` events in all, so that a measurement starts with
/// nothing in flight.
async fn settle(run: &mut Run, n: u64, what: &str) -> anyhow::Result<()> {
    run.check_alive()?;
    let (took, got) = run.wait_stored(n).await?;
    match took {
        Some(t) => {
            eprintln!("  {what}: everything stored {:.1} s later", t.as_secs_f64());
            Ok(())
        }
        None => bail!(
            "{what}: the loader stored {got} of {n} events within {} s:\n{}",
            DRAIN_TIMEOUT.as_secs(),
            run.loader.log_tail(20)
        ),
    }
}

fn note_errors(r: &PhaseResult, what: &str, problems: &mut Vec<String>) {
    if r.error_count() > 0 {
        problems.push(format!("{what}: {} failed requests", r.error_count()));
    }
}

async fn check_rows(run: &Run, accepted: u64, problems: &mut Vec<String>) -> Option<u64> {
    match run.store.rows().await {
        Ok(n) => {
            if n != accepted {
                problems.push(format!("warehouse rows {n} != accepted {accepted}"));
            }
            Some(n)
        }
        Err(e) => {
            problems.push(format!("cannot count the warehouse rows: {e:#}"));
            None
        }
    }
}

async fn duplicates(run: &Run) -> Option<f64> {
    let text = run.loader.metrics().await.ok()?;
    Some(procs::metric(&text, "trueup_loader_duplicates_total", &[]).unwrap_or(0.0))
}

async fn sustained(s: &Settings, run: &mut Run) -> anyhow::Result<Sustained> {
    eprintln!("sustained throughput: fresh pipeline");
    let primed = prime(s, run).await?;
    let warmup = warm_up_closed(s, run, 40, primed).await?;
    let mut problems = Vec::new();
    note_errors(&warmup, "sustained warm-up", &mut problems);
    eprintln!(
        "  closed loop: {} connections, {} s",
        s.connections, s.seconds
    );
    let stored_before = run.loader.stored().await?;
    let cpu0 = run.cpu().await;
    let mut result = load::closed_loop(&run.target, s.load(41, s.seconds)).await?;
    let cpu1 = run.cpu().await;
    let stored_after = run.loader.stored().await?;
    let relay_spool_depth_at_end = run.relay.spool_depth().await.ok();
    run.check_alive()?;
    let cpu_window = CpuUse::between(&cpu0, &cpu1, run.store_is_pg());
    result.server_cpu = cpu_window.relay;
    result.client_cpu = cpu_window.bench;
    note_errors(&result, "sustained closed loop", &mut problems);
    let accepted = primed + warmup.accepted + result.accepted;
    eprintln!(
        "  relay accepted {:.0} events/s; loader stored {:.0} events/s in the same window; \
         relay spool depth at the end {}",
        result.events_per_sec(),
        per_sec(stored_after.saturating_sub(stored_before), result.elapsed),
        relay_spool_depth_at_end.map_or("?".into(), |d| d.to_string())
    );
    let (drain, got) = run.wait_stored(accepted).await?;
    let cpu2 = run.cpu().await;
    let cpu_drain = drain.map(|_| CpuUse::between(&cpu1, &cpu2, run.store_is_pg()));
    match drain {
        Some(d) => eprintln!(
            "  everything stored {:.1} s after the load",
            d.as_secs_f64()
        ),
        None => problems.push(format!(
            "the loader stored {got} of {accepted} accepted events within {} s of the load",
            DRAIN_TIMEOUT.as_secs()
        )),
    }
    let rows = check_rows(run, accepted, &mut problems).await;
    let stages = match latency(&run.store, &[], "dev-41-").await {
        Ok(l) => Some(l),
        Err(e) => {
            problems.push(format!("cannot read the events' times back: {e:#}"));
            None
        }
    };
    Ok(Sustained {
        warmup,
        result,
        stored_before,
        stored_after,
        drain,
        relay_spool_depth_at_end,
        accepted,
        rows,
        duplicates: duplicates(run).await,
        cpu_window,
        cpu_drain,
        stages,
        problems,
    })
}

impl Run {
    fn store_is_pg(&self) -> bool {
        matches!(self.store, Store::Postgres(_))
    }
}

async fn fixed_rate(s: &Settings, run: &mut Run, rate: u64, phase: usize) -> anyhow::Result<Fixed> {
    let rps = rate as f64 / s.events_per_batch as f64;
    eprintln!("fixed rate {rate} events/s ({rps:.0} batches/s): fresh pipeline");
    let mut problems = Vec::new();
    let primed = prime(s, run).await?;
    let warmup = if s.warmup_seconds > 0 {
        eprintln!("  warm-up: {} s open loop at that rate", s.warmup_seconds);
        let w = load::open_loop(&run.target, s.load(phase, s.warmup_seconds), rps).await?;
        settle(run, primed + w.accepted, "warm-up").await?;
        w
    } else {
        PhaseResult::empty()
    };
    note_errors(&warmup, "fixed-rate warm-up", &mut problems);
    eprintln!("  open loop: {} s", s.seconds);
    let stored_before = run.loader.stored().await?;
    let target = Arc::new(AtomicU64::new(u64::MAX));
    // The load, its possible overrun (10 s), then the drain.
    let deadline = std::time::Instant::now() + Duration::from_secs(s.seconds + 10) + DRAIN_TIMEOUT;
    let poller = spawn_poller(run.loader.admin, target.clone(), deadline)?;
    let cpu0 = run.cpu().await;
    let measured = load::open_loop(&run.target, s.load(phase + 1, s.seconds), rps).await;
    let cpu1 = run.cpu().await;
    let stored_after = run.loader.stored().await.unwrap_or(0);
    let end_us = now_us();
    let accepted = primed + warmup.accepted + measured.as_ref().map_or(0, |r| r.accepted);
    target.store(accepted, Ordering::Relaxed);
    let samples = tokio::task::spawn_blocking(move || poller.join())
        .await
        .context("the poller task")?
        .map_err(|_| anyhow::anyhow!("the poller panicked"))?;
    let mut result = measured?;
    run.check_alive()?;
    let cpu_window = CpuUse::between(&cpu0, &cpu1, run.store_is_pg());
    result.server_cpu = cpu_window.relay;
    result.client_cpu = cpu_window.bench;
    note_errors(&result, "fixed-rate open loop", &mut problems);
    let drain = samples
        .iter()
        .find(|x| x.stored >= accepted)
        .map(|x| Duration::from_micros(x.received_us.saturating_sub(end_us).max(0) as u64));
    if drain.is_none() {
        problems.push(format!(
            "the loader stored {} of {accepted} accepted events within {} s of the load",
            samples.last().map_or(0, |x| x.stored),
            DRAIN_TIMEOUT.as_secs()
        ));
    }
    let loader_summary = lag_summary(&run.loader.metrics().await.unwrap_or_default());
    let relay_summary = lag_summary(&run.relay.metrics().await.unwrap_or_default());
    let rows = check_rows(run, accepted, &mut problems).await;
    let latency = match latency(&run.store, &samples, &format!("dev-{}-", phase + 1)).await {
        Ok(l) => Some(l),
        Err(e) => {
            problems.push(format!("cannot read the events' times back: {e:#}"));
            None
        }
    };
    if let Some(l) = &latency {
        if l.events != result.accepted {
            problems.push(format!(
                "{} events of the phase in the warehouse, {} accepted",
                l.events, result.accepted
            ));
        }
        if l.unbracketed > 0 {
            problems.push(format!(
                "{} events written after the poller stopped",
                l.unbracketed
            ));
        }
    }
    let f = Fixed {
        rate,
        warmup,
        result,
        stored_before,
        stored_after,
        drain,
        accepted,
        rows,
        duplicates: duplicates(run).await,
        latency,
        loader_summary,
        relay_summary,
        cpu_window,
        problems,
    };
    eprintln!(
        "  achieved {:.0} events/s ({}); committed p50 {} ms, p95 {} ms (upper ends)",
        f.achieved(),
        if f.held() { "held" } else { "NOT held" },
        f.latency
            .as_ref()
            .and_then(|l| ms(&l.committed_hi, 0.5))
            .map_or("?".into(), |v| format!("{v:.1}")),
        f.latency
            .as_ref()
            .and_then(|l| ms(&l.committed_hi, 0.95))
            .map_or("?".into(), |v| format!("{v:.1}"))
    );
    Ok(f)
}

/// Each write's commit bracket, µs: `stored_at` → (committed after, committed before). The
/// write that brought the loader's count to `C` committed after its `stored_at` and after the
/// last reading below `C` was sent, and before the first reading at or above `C` came back;
/// a write no reading reached is left out.
fn brackets(writes: &[(i64, u64)], samples: &[Sample]) -> HashMap<i64, (i64, i64)> {
    let mut out = HashMap::new();
    let mut cum = 0;
    let mut j = 0;
    for &(stored_at, n) in writes {
        cum += n;
        while j < samples.len() && samples[j].stored < cum {
            j += 1;
        }
        let Some(hit) = samples.get(j) else {
            break;
        };
        let after = match j.checked_sub(1) {
            Some(p) => samples[p].sent_us.max(stored_at * 1000),
            None => stored_at * 1000,
        };
        out.insert(stored_at, (after, hit.received_us));
    }
    out
}

/// Puts the warehouse's writes against the poller's readings and counts every event of the
/// phase (see the module's note).
async fn latency(store: &Store, samples: &[Sample], prefix: &str) -> anyhow::Result<Latency> {
    let bracket = brackets(&store.writes().await?, samples);
    let mut l = Latency {
        events: 0,
        unbracketed: 0,
        incomplete: 0,
        committed_lo: histogram(),
        committed_hi: histogram(),
        write_began: histogram(),
        capture_to_accepted: histogram(),
        accepted_to_log: histogram(),
        log_to_write: histogram(),
        write_to_committed: histogram(),
        poll_intervals: histogram(),
        samples: samples.len(),
    };
    for w in samples.windows(2) {
        l.poll_intervals
            .saturating_record(w[1].received_us.saturating_sub(w[0].sent_us).max(0) as u64);
    }
    let us = |d: i64| d.max(0) as u64;
    store
        .each_event(prefix, |e| {
            l.events += 1;
            let ts = e.ts * 1000;
            l.capture_to_accepted
                .saturating_record(us(e.received_at * 1000 - ts));
            let (Some(logged), Some(stored)) = (e.logged_at, e.stored_at) else {
                l.incomplete += 1;
                return;
            };
            l.accepted_to_log
                .saturating_record(us((logged - e.received_at) * 1000));
            l.log_to_write
                .saturating_record(us((stored - logged) * 1000));
            l.write_began.saturating_record(us(stored * 1000 - ts));
            match bracket.get(&stored) {
                Some(&(after, before)) => {
                    l.committed_lo.saturating_record(us(after - ts));
                    l.committed_hi.saturating_record(us(before - ts));
                    l.write_to_committed
                        .saturating_record(us(before - stored * 1000));
                }
                None => l.unbracketed += 1,
            }
        })
        .await?;
    Ok(l)
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or("?".into(), |v| format!("{v:.1}"))
}

fn thousands(v: f64) -> String {
    let digits = (v.round().max(0.0) as u64).to_string();
    let head = digits.len() % 3;
    let mut out = digits[..head].to_string();
    for chunk in digits.as_bytes()[head..].chunks(3) {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(std::str::from_utf8(chunk).expect("ASCII digits"));
    }
    out
}

fn hist_json(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "p50": ms(h, 0.50),
        "p95": ms(h, 0.95),
        "p99": ms(h, 0.99),
        "max": (!h.is_empty()).then(|| h.max() as f64 / 1000.0),
    })
}

/// The machine and the checkout the figures come from.
fn machine() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string());
    let mem_kib: Option<u64> = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    json!({
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "cpu_model": model,
        "memory_bytes": mem_kib.map(|k| k * 1024),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "commit": git(&["rev-parse", "--short=7", "HEAD"]),
        "uncommitted_changes": git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty()),
    })
}

impl Report {
    pub fn passed(&self) -> bool {
        self.sustained.problems.is_empty() && self.fixed.iter().all(|f| f.problems.is_empty())
    }

    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let s = &self.settings;
        let mut o = String::new();
        let m = machine();
        let _ = writeln!(
            o,
            "trueup pipeline benchmark: relay -> {} ({}) -> loader -> {}",
            s.log.as_str(),
            self.log_version,
            self.warehouse
        );
        let _ = writeln!(
            o,
            "  {} CPUs, commit {}; batches of {} events (~{:.0} B each), {} connections; loader batch_size {LOADER_BATCH_SIZE}, max_wait_ms {LOADER_MAX_WAIT_MS}; a fresh pipeline per measurement",
            m["cpus"],
            m["commit"].as_str().unwrap_or("?"),
            s.events_per_batch,
            self.event_bytes,
            s.connections
        );
        let u = &self.sustained;
        let _ = writeln!(
            o,
            "sustained (closed loop, {} s)     : relay accepted {} events/s (answers p50 {:.1} ms, p99 {:.1} ms); loader stored {} events/s in the same window",
            s.seconds,
            thousands(u.result.events_per_sec()),
            u.result.latency_ms(0.5),
            u.result.latency_ms(0.99),
            thousands(u.stored_per_sec())
        );
        let _ = writeln!(
            o,
            "sustained drain                  : {}; relay spool depth at the end of the load {}; duplicates absorbed {}",
            match (u.drain, u.end_to_end_per_sec()) {
                (Some(d), Some(r)) => format!(
                    "everything accepted stored {:.1} s after the load (end to end {} events/s over {:.1} s)",
                    d.as_secs_f64(),
                    thousands(r),
                    (u.result.elapsed + d).as_secs_f64()
                ),
                _ => format!("NOT everything stored within {} s", DRAIN_TIMEOUT.as_secs()),
            },
            u.relay_spool_depth_at_end
                .map_or("?".into(), |d| d.to_string()),
            u.duplicates.map_or("?".into(), |d| d.to_string())
        );
        if let Some(l) = &u.stages {
            let stage =
                |h: &Histogram<u64>| format!("{}/{}", opt_ms(ms(h, 0.5)), opt_ms(ms(h, 0.95)));
            let _ = writeln!(
                o,
                "sustained stages p50/p95 ms      : capture->accepted {}, accepted->log {}, log->write {}, capture->write {} (where the backlog waited)",
                stage(&l.capture_to_accepted),
                stage(&l.accepted_to_log),
                stage(&l.log_to_write),
                stage(&l.write_began)
            );
        }
        let _ = writeln!(
            o,
            "sustained cpu, load window       : {}",
            u.cpu_window.text(s.log)
        );
        if let Some(c) = &u.cpu_drain {
            let _ = writeln!(o, "sustained cpu, drain after it    : {}", c.text(s.log));
        }
        for f in &self.fixed {
            let label = format!("at {} ev/s", thousands(f.rate as f64));
            let _ = writeln!(
                o,
                "{label:<16} offered/achieved : {} / {} events/s ({}); send lag p50 {:.1} ms, p99 {:.1} ms; relay answers p50 {:.1} ms, p99 {:.1} ms; loader stored {} events/s in the window, the rest {} after",
                thousands(f.rate as f64),
                thousands(f.achieved()),
                if f.held() { "held" } else { "NOT held" },
                f.result.send_lag.value_at_quantile(0.5) as f64 / 1000.0,
                f.result.send_lag.value_at_quantile(0.99) as f64 / 1000.0,
                f.result.latency_ms(0.5),
                f.result.latency_ms(0.99),
                thousands(f.stored_per_sec()),
                f.drain.map_or("not within the timeout".into(), |d| format!(
                    "{:.2} s",
                    d.as_secs_f64()
                ))
            );
            if let Some(l) = &f.latency {
                let range = |q: f64| {
                    format!(
                        "{}–{}",
                        opt_ms(ms(&l.committed_lo, q)),
                        opt_ms(ms(&l.committed_hi, q))
                    )
                };
                let _ = writeln!(
                    o,
                    "{label:<16} tracked->warehouse: committed p50 {} ms, p95 {} ms, p99 {} ms, max {} ms  ({} events, each from its ts to its write's commit, bracketed by the loader's committed count polled every {} ms: {} readings, largest gap {} ms)",
                    range(0.5),
                    range(0.95),
                    range(0.99),
                    opt_ms(
                        (!l.committed_hi.is_empty()).then(|| l.committed_hi.max() as f64 / 1000.0)
                    ),
                    l.events,
                    POLL.as_millis(),
                    l.samples,
                    opt_ms(
                        (!l.poll_intervals.is_empty())
                            .then(|| l.poll_intervals.max() as f64 / 1000.0)
                    ),
                );
                let _ = writeln!(
                    o,
                    "{label:<16} write began       : p50 {} ms, p95 {} ms (stored_at − ts, exact to 1 ms)",
                    opt_ms(ms(&l.write_began, 0.5)),
                    opt_ms(ms(&l.write_began, 0.95))
                );
                let stage =
                    |h: &Histogram<u64>| format!("{}/{}", opt_ms(ms(h, 0.5)), opt_ms(ms(h, 0.95)));
                let _ = writeln!(
                    o,
                    "{label:<16} stages p50/p95 ms : capture->accepted {}, accepted->log {}, log->write {}, write->committed {} (upper end)",
                    stage(&l.capture_to_accepted),
                    stage(&l.accepted_to_log),
                    stage(&l.log_to_write),
                    stage(&l.write_to_committed)
                );
            }
            let _ = writeln!(
                o,
                "{label:<16} loader's summary  : capture_to_warehouse p50 {} ms, p95 {} ms; log_to_warehouse p50 {} ms, p95 {} ms (its /metrics, last minute: warm-up + this phase); relay capture_to_accepted p50 {} ms, p95 {} ms",
                opt_ms(f.summary("capture_to_warehouse", "0.5")),
                opt_ms(f.summary("capture_to_warehouse", "0.95")),
                opt_ms(f.summary("log_to_warehouse", "0.5")),
                opt_ms(f.summary("log_to_warehouse", "0.95")),
                opt_ms(f.summary("capture_to_accepted", "0.5")),
                opt_ms(f.summary("capture_to_accepted", "0.95")),
            );
            let _ = writeln!(
                o,
                "{label:<16} cpu, load window  : {}",
                f.cpu_window.text(s.log)
            );
        }
        let problems: Vec<&String> = self
            .sustained
            .problems
            .iter()
            .chain(self.fixed.iter().flat_map(|f| &f.problems))
            .collect();
        if problems.is_empty() {
            let _ = writeln!(
                o,
                "checks           : OK (every request accepted whole; warehouse rows = accepted in each pipeline: {}; clean exits)",
                std::iter::once(self.sustained.accepted)
                    .chain(self.fixed.iter().map(|f| f.accepted))
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        } else {
            let _ = writeln!(o, "checks           : FAILED");
            for p in problems {
                let _ = writeln!(o, "error  pipeline: {p}");
            }
        }
        for (name, r) in std::iter::once(("sustained", &self.sustained.result))
            .chain(self.fixed.iter().map(|f| ("fixed rate", &f.result)))
        {
            for (kind, n) in &r.errors {
                let _ = writeln!(o, "error  {name}: {n} x {kind}");
            }
        }
        o
    }

    pub fn json(&self) -> serde_json::Value {
        let s = &self.settings;
        let u = &self.sustained;
        let summary = |v: &[(String, String, f64)]| {
            let mut m = serde_json::Map::new();
            for (stage, q, val) in v {
                m.entry(stage.clone())
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                    .expect("an object")
                    .insert(q.clone(), json!(val * 1000.0));
            }
            serde_json::Value::Object(m)
        };
        json!({
            "mode": "pipeline",
            "machine": machine(),
            "config": {
                "log": s.log.as_str(),
                "log_version": self.log_version,
                "warehouse": if self.postgres { "postgres" } else { "sqlite" },
                "warehouse_detail": self.warehouse,
                "seconds": s.seconds,
                "warmup_seconds": s.warmup_seconds,
                "connections": s.connections,
                "events_per_batch": s.events_per_batch,
                "event_bytes": self.event_bytes,
                "client_threads": s.client_threads,
                "rates": s.rates,
                "loader_batch_size": LOADER_BATCH_SIZE,
                "loader_max_wait_ms": LOADER_MAX_WAIT_MS,
                "poll_ms": POLL.as_millis() as u64,
            },
            "sustained": {
                "relay": phase_json(&u.result),
                "relay_accepted_events_per_sec": u.result.events_per_sec(),
                "loader_stored_in_window": u.stored_after.saturating_sub(u.stored_before),
                "loader_stored_events_per_sec": u.stored_per_sec(),
                "drain_seconds": u.drain.map(|d| d.as_secs_f64()),
                "end_to_end_events_per_sec": u.end_to_end_per_sec(),
                "relay_spool_depth_at_end": u.relay_spool_depth_at_end,
                "accepted": u.accepted,
                "warehouse_rows": u.rows,
                "loader_duplicates": u.duplicates,
                "cpu_window": u.cpu_window.json(s.log),
                "cpu_drain": u.cpu_drain.map(|c| c.json(s.log)),
                "stages_ms": u.stages.as_ref().map(|l| json!({
                    "capture_to_accepted": hist_json(&l.capture_to_accepted),
                    "accepted_to_log": hist_json(&l.accepted_to_log),
                    "log_to_write": hist_json(&l.log_to_write),
                    "capture_to_write": hist_json(&l.write_began),
                })),
                "warmup_errors": u.warmup.errors,
                "problems": u.problems,
            },
            "fixed": self.fixed.iter().map(|f| json!({
                "offered_events_per_sec": f.rate,
                "achieved_events_per_sec": f.achieved(),
                "held": f.held(),
                "send_lag_ms": {
                    "p50": f.result.send_lag.value_at_quantile(0.5) as f64 / 1000.0,
                    "p99": f.result.send_lag.value_at_quantile(0.99) as f64 / 1000.0,
                },
                "relay": phase_json(&f.result),
                "loader_stored_events_per_sec_in_window": f.stored_per_sec(),
                "drain_seconds": f.drain.map(|d| d.as_secs_f64()),
                "accepted": f.accepted,
                "warehouse_rows": f.rows,
                "loader_duplicates": f.duplicates,
                "tracked_to_warehouse_ms": f.latency.as_ref().map(|l| json!({
                    "method": "per event from the warehouse: commit - ts, the commit bracketed between stored_at / the last loader count reading below the write's cumulative count and the first reading at or above it",
                    "events": l.events,
                    "unbracketed": l.unbracketed,
                    "incomplete": l.incomplete,
                    "committed_lower": hist_json(&l.committed_lo),
                    "committed_upper": hist_json(&l.committed_hi),
                    "write_began": hist_json(&l.write_began),
                    "stages": {
                        "capture_to_accepted": hist_json(&l.capture_to_accepted),
                        "accepted_to_log": hist_json(&l.accepted_to_log),
                        "log_to_write": hist_json(&l.log_to_write),
                        "write_to_committed_upper": hist_json(&l.write_to_committed),
                    },
                    "resolution": {
                        "poll_ms": POLL.as_millis() as u64,
                        "readings": l.samples,
                        "gap_ms": hist_json(&l.poll_intervals),
                    },
                })),
                "loader_summary_ms": summary(&f.loader_summary),
                "relay_summary_ms": summary(&f.relay_summary),
                "cpu_window": f.cpu_window.json(s.log),
                "warmup_errors": f.warmup.errors,
                "problems": f.problems,
            })).collect::<Vec<_>>(),
            "passed": self.passed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(sent_ms: i64, stored: u64) -> Sample {
        Sample {
            sent_us: sent_ms * 1000,
            received_us: sent_ms * 1000 + 500,
            stored,
        }
    }

    #[test]
    fn each_write_is_bracketed_by_the_readings_around_its_count() {
        // Writes of 10 (before polling), 5 and 5 rows, then one no reading reached.
        let writes = [(1_000, 10), (1_030, 5), (1_050, 5), (1_090, 7)];
        let samples = [
            sample(1_020, 10),
            sample(1_040, 15),
            sample(1_060, 15),
            sample(1_080, 20),
        ];
        let b = brackets(&writes, &samples);
        // Counted already at the first reading: after its stored_at, before that reading.
        assert_eq!(b[&1_000], (1_000_000, 1_020_500));
        // Count 15 first seen at 1_040; the reading before (sent 1_020) showed 10.
        assert_eq!(b[&1_030], (1_030_000, 1_040_500));
        // Count 20 first seen at 1_080; the last reading below it was sent at 1_060.
        assert_eq!(b[&1_050], (1_060_000, 1_080_500));
        assert!(!b.contains_key(&1_090));
    }

    #[test]
    fn summaries_are_read_by_stage_and_quantile() {
        let text = "# TYPE trueup_pipeline_lag_seconds summary\n\
            trueup_pipeline_lag_seconds{stage=\"capture_to_warehouse\",quantile=\"0.5\"} 0.04\n\
            trueup_pipeline_lag_seconds{stage=\"capture_to_warehouse\",quantile=\"0.95\"} 0.1\n\
            trueup_pipeline_lag_seconds_sum{stage=\"capture_to_warehouse\"} 12\n";
        let v = lag_summary(text);
        assert_eq!(
            v,
            vec![
                ("capture_to_warehouse".into(), "0.5".into(), 0.04),
                ("capture_to_warehouse".into(), "0.95".into(), 0.1),
            ]
        );
    }

    #[test]
    fn thousands_are_separated() {
        for (v, s) in [
            (0.0, "0"),
            (999.4, "999"),
            (1_000.0, "1,000"),
            (1_234_567.0, "1,234,567"),
        ] {
            assert_eq!(thousands(v), s);
        }
    }
}
