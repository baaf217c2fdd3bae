//! Reconciliation: how far client analytics is from the truth, published like an error rate.
//!
//! Client-side events are behavioural signals and are lossy (ad blockers, closed tabs,
//! flaky networks). Business metrics come from the systems of record and are exact. For each
//! metric declared in the configuration and each UTC day, this crate compares:
//!
//! - **actual**: what the system of record knows, counted by the metric's own SQL in the
//!   truth database (SQLite or PostgreSQL, see [`truth`]);
//! - **tracked**: the client events of the metric's `event` name in the warehouse
//!   (`source = 'client'`, stored once per id, so duplicates never inflate it);
//! - **server**: the same event emitted by the backend through the server path, when it does
//!   (it should equal *actual*; a difference means the emitter lost or the truth SQL differs);
//!
//! and reports `gap % = (actual − tracked) / actual × 100` and the share of the day's
//! conversions with unknown attribution. A complete day (not today, whose late events are
//! still arriving) whose gap moves more than `alert_points` from the average of its trailing
//! days is marked `moved` ([`Report::moved`]; the relay logs each one as a warning).
//!
//! **Loss by stage** ([`LossByStage`]) follows client events down the path from the agents'
//! own counters (the latest each device reported, in the warehouse's `agent_counters`), the
//! relay's tally (the spool's `tally` table: events stored and retries answered duplicate)
//! and the warehouse itself: created in page → stored in queue → sent → accepted by the
//! relay → in the warehouse, with duplicates removed, events still pending, drops by reason,
//! and `seq` gaps (events a tab numbered that never arrived).
//!
//! Nothing here writes: the warehouse, the spool and the truth database are opened
//! read-only. The day of a client event is the UTC day of its capture time `ts`; the truth
//! SQL must use UTC days too, or the rows near midnight move between days.

#![deny(missing_docs)]

pub mod dashboards;
pub mod day;
pub mod quality;
pub mod truth;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use trueup_protocol::Counters;
use trueup_warehouse::{StoredCounters, Warehouse, WarehouseError};

pub use truth::{TruthDay, TruthDb};

/// What can go wrong; every variant says which part failed and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The `[reconcile]` configuration is incomplete or invalid.
    #[error("reconcile configuration: {0}")]
    Config(String),
    /// The truth database could not be read, or a metric's SQL failed or returned bad rows.
    #[error("metric {metric}: truth database: {detail}")]
    Truth {
        /// The metric whose query failed.
        metric: String,
        /// What went wrong.
        detail: String,
    },
    /// The warehouse or the spool could not be read.
    #[error("reading {what}: {detail}")]
    Store {
        /// Which file.
        what: String,
        /// What went wrong.
        detail: String,
    },
}

/// The `[reconcile]` section of the relay's configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcileConfig {
    /// The system-of-record database: `sqlite:<path>` or
    /// `postgres://user:password@host:port/db`. Required when metrics are declared.
    pub truth: Option<String>,
    /// Only count the warehouse's events of this site key (all sites when unset).
    pub site: Option<String>,
    /// How many days to report, ending today (UTC).
    pub days: u32,
    /// How many earlier days the trailing average of a gap covers.
    pub trailing_days: u32,
    /// A day whose gap differs from its trailing average by more than this many percentage
    /// points is marked `moved` and logged as a warning.
    pub alert_points: f64,
    /// The relay runs the reconciliation every this many seconds and publishes the latest
    /// figures as Prometheus gauges; 0 turns the schedule off.
    pub interval_secs: u64,
    /// The metrics to reconcile.
    pub metrics: Vec<MetricConfig>,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            truth: None,
            site: None,
            days: 7,
            trailing_days: 7,
            alert_points: 5.0,
            interval_secs: 3600,
            metrics: Vec::new(),
        }
    }
}

/// The longest window `days` and `trailing_days` may each cover (ten years).
pub const MAX_DAYS: u32 = 3660;

/// One business metric: the analytics event that should count it, and the SQL that counts it
/// in the system of record.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricConfig {
    /// The metric's name in reports and gauges, e.g. `signups`.
    pub name: String,
    /// The event name the page tracks for it, e.g. `signup_completed`.
    pub event: String,
    /// SQL run on the truth database, returning one row per UTC day with columns `day`
    /// (`YYYY-MM-DD` text), `actual` (integer) and optionally `unknown_attribution` (integer)
    /// and `value` (a number, e.g. the day's revenue).
    pub truth_sql: String,
    /// What `value` is, for the business dashboard (e.g. `revenue (USD)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_label: Option<String>,
    /// SQL returning the conversions by attribution source: columns `day`, `source` (text,
    /// NULL when unknown) and `conversions` (integer), for the business dashboard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution_sql: Option<String>,
}

/// The `[dashboard]` section: what the behaviour dashboard shows.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DashboardConfig {
    /// The client event counted as a page view.
    pub page_event: String,
    /// The funnel's steps, in order (client event names); empty: no funnel.
    pub funnel: Vec<String>,
    /// The business metric the client events' loss is measured against (default: the first
    /// metric in `[[reconcile.metrics]]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_reference: Option<String>,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        DashboardConfig {
            page_event: "page_view".into(),
            funnel: Vec::new(),
            loss_reference: None,
        }
    }
}

/// The most steps a funnel may have.
pub const MAX_FUNNEL_STEPS: usize = 10;

impl DashboardConfig {
    /// Checks it against the metrics; the error names the field to fix.
    pub fn validate(&self, reconcile: &ReconcileConfig) -> Result<(), ReconcileError> {
        if self.page_event.is_empty() {
            return Err(ReconcileError::Config(
                "dashboard.page_event must not be empty".into(),
            ));
        }
        if self.funnel.len() == 1 || self.funnel.len() > MAX_FUNNEL_STEPS {
            return Err(ReconcileError::Config(format!(
                "dashboard.funnel needs 2 to {MAX_FUNNEL_STEPS} events (or none), it has {}",
                self.funnel.len()
            )));
        }
        if let Some(bad) = self.funnel.iter().find(|e| e.is_empty()) {
            return Err(ReconcileError::Config(format!(
                "dashboard.funnel: empty event name {bad:?}"
            )));
        }
        if let Some(r) = &self.loss_reference
            && !reconcile.metrics.iter().any(|m| &m.name == r)
        {
            return Err(ReconcileError::Config(format!(
                "dashboard.loss_reference = {r:?} is not a metric in [[reconcile.metrics]]"
            )));
        }
        Ok(())
    }
}

impl ReconcileConfig {
    /// Checks the configuration; the error names the field to fix.
    pub fn validate(&self) -> Result<(), ReconcileError> {
        if !(1..=MAX_DAYS).contains(&self.days) || self.trailing_days > MAX_DAYS {
            return Err(ReconcileError::Config(format!(
                "days must be 1..={MAX_DAYS} and trailing_days 0..={MAX_DAYS}"
            )));
        }
        if self.metrics.is_empty() {
            return Ok(());
        }
        let truth = self.truth.as_deref().ok_or_else(|| {
            ReconcileError::Config(
                "metrics are declared but `truth` (the system-of-record database) is not set"
                    .into(),
            )
        })?;
        TruthDb::parse(truth)?;
        if !(self.alert_points.is_finite() && self.alert_points >= 0.0) {
            return Err(ReconcileError::Config(
                "alert_points must be a number ≥ 0".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for m in &self.metrics {
            let valid = |s: &str| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            };
            if !valid(&m.name) {
                return Err(ReconcileError::Config(format!(
                    "metric name {:?}: use letters, digits, '_' or '-'",
                    m.name
                )));
            }
            if m.event.is_empty() || m.truth_sql.trim().is_empty() {
                return Err(ReconcileError::Config(format!(
                    "metric {}: event and truth_sql are required",
                    m.name
                )));
            }
            if !names.insert(m.name.as_str()) {
                return Err(ReconcileError::Config(format!(
                    "metric {} is declared twice",
                    m.name
                )));
            }
        }
        Ok(())
    }
}

/// One metric on one day.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DayRow {
    /// The UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// What the system of record counted.
    pub actual: u64,
    /// What client analytics counted (distinct client events in the warehouse).
    pub tracked: u64,
    /// Server events of the same name in the warehouse (from the emitter).
    pub server: u64,
    /// `(actual − tracked) / actual × 100`; `None` when `actual` is 0.
    pub gap_pct: Option<f64>,
    /// Conversions with unknown attribution, when the truth SQL reports them.
    pub unknown_attribution: Option<u64>,
    /// `unknown_attribution / actual × 100`.
    pub unknown_pct: Option<f64>,
    /// The average gap of the trailing days that have one.
    pub trailing_gap_pct: Option<f64>,
    /// The gap moved more than `alert_points` from the trailing average (complete days only).
    pub moved: bool,
}

/// One metric over the reported days.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricReport {
    /// The metric's name.
    pub name: String,
    /// The client event that counts it.
    pub event: String,
    /// One row per reported day, oldest first.
    pub days: Vec<DayRow>,
}

/// Where client events were lost on their way, from the agents' counters, the relay's tally
/// and the warehouse (all time, for the configured site).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LossByStage {
    /// Devices that reported counters.
    pub devices: u64,
    /// Events `track()` gave an id and a seq to (the agents' `enqueued`).
    pub created: u64,
    /// Of those, events that were kept in a queue (created minus the drops that happen
    /// before storing: consent withheld, storage unavailable).
    pub stored: u64,
    /// Events sent at least once (send attempts minus re-sends).
    pub sent: u64,
    /// Events the agents saw acknowledged.
    pub acked: u64,
    /// Distinct client events the relay stored (its tally).
    pub accepted_by_relay: u64,
    /// Distinct client events in the warehouse.
    pub in_warehouse: u64,
    /// Retries the relay answered `duplicate` and did not store again.
    pub duplicates_removed: u64,
    /// Events still queued in browsers.
    pub pending: u64,
    /// Events the agents gave up, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Client events the relay rejected at ingest (kept in its dead-letter store).
    pub rejected_by_relay: u64,
    /// Numbers missing below each tab stream's highest `seq` in the warehouse: events created
    /// in a page that have not arrived (yet).
    pub seq_gaps: u64,
    /// Devices whose latest counters break `enqueued = acked + dropped + pending`.
    pub identity_violations: u64,
}

/// The result of one reconciliation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// When it ran, ms since the Unix epoch.
    pub generated_at_ms: i64,
    /// The site it was restricted to, if any.
    pub site: Option<String>,
    /// The percentage points a gap may move before it is marked.
    pub alert_points: f64,
    /// The metrics.
    pub metrics: Vec<MetricReport>,
    /// Loss by stage of client events.
    pub loss: LossByStage,
}

/// The files reconciliation reads besides the truth database.
#[derive(Debug, Clone)]
pub struct Stores {
    /// The warehouse: the embedded one or PostgreSQL.
    pub warehouse: WarehouseStore,
    /// The relay's spool (`<data_dir>/spool.sqlite`), for its tally; skipped when missing.
    pub spool: Option<PathBuf>,
}

/// Where the warehouse is.
#[derive(Debug, Clone)]
pub enum WarehouseStore {
    /// The embedded warehouse file (`<data_dir>/warehouse.sqlite`).
    Sqlite(PathBuf),
    /// A PostgreSQL warehouse (the relay's `postgres` sink), by connection URL.
    Postgres(String),
}

impl WarehouseStore {
    /// How it is named in errors (a PostgreSQL URL without its password).
    fn label(&self) -> String {
        match self {
            WarehouseStore::Sqlite(p) => p.display().to_string(),
            WarehouseStore::Postgres(url) => truth::redact(url),
        }
    }

    fn open(&self) -> Result<Warehouse, ReconcileError> {
        let err = |e: WarehouseError| ReconcileError::Store {
            what: self.label(),
            detail: e.to_string(),
        };
        match self {
            WarehouseStore::Sqlite(path) => {
                if !path.exists() {
                    return Err(store_error(
                        path,
                        "no such file (has the relay run with this data_dir?)",
                    ));
                }
                Warehouse::open_sqlite_read_only(path).map_err(err)
            }
            WarehouseStore::Postgres(url) => Warehouse::connect_postgres(url).map_err(err),
        }
    }
}

fn store_error(what: &Path, e: impl fmt::Display) -> ReconcileError {
    ReconcileError::Store {
        what: what.display().to_string(),
        detail: e.to_string(),
    }
}

fn open_read_only(path: &Path) -> Result<Connection, ReconcileError> {
    if !path.exists() {
        return Err(store_error(
            path,
            "no such file (has the relay run with this data_dir?)",
        ));
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| store_error(path, e))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| store_error(path, e))?;
    Ok(conn)
}

/// Runs the reconciliation as of `now_ms` (ms since the Unix epoch).
pub fn reconcile(
    cfg: &ReconcileConfig,
    stores: &Stores,
    now_ms: i64,
) -> Result<Report, ReconcileError> {
    cfg.validate()?;
    let mut warehouse = stores.warehouse.open()?;
    let site = cfg.site.as_deref();
    let all_days = day::window(now_ms, cfg.days + cfg.trailing_days);
    let first = day::start_ms(&all_days[0]).expect("window days are valid");
    let mut metrics = Vec::with_capacity(cfg.metrics.len());
    if !cfg.metrics.is_empty() {
        let truth = TruthDb::parse(cfg.truth.as_deref().expect("validated"))?;
        for m in &cfg.metrics {
            let actual = truth.query(&m.name, &m.truth_sql)?;
            let counted = warehouse
                .events_per_day(&m.event, site, first)
                .map_err(|e| wh_error(stores, e))?;
            metrics.push(metric_report(m, &all_days, cfg, &actual, &counted));
        }
    }
    let loss = loss_by_stage(&mut warehouse, stores, site)?;
    Ok(Report {
        generated_at_ms: now_ms,
        site: cfg.site.clone(),
        alert_points: cfg.alert_points,
        metrics,
        loss,
    })
}

fn pct(part: f64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part / whole as f64 * 100.0)
}

fn metric_report(
    m: &MetricConfig,
    all_days: &[String],
    cfg: &ReconcileConfig,
    actual: &BTreeMap<String, TruthDay>,
    counted: &BTreeMap<String, (u64, u64)>,
) -> MetricReport {
    let mut rows: Vec<DayRow> = all_days
        .iter()
        .map(|d| {
            let truth = actual.get(d).copied().unwrap_or_default();
            let (tracked, server) = counted.get(d).copied().unwrap_or_default();
            DayRow {
                day: d.clone(),
                actual: truth.actual,
                tracked,
                server,
                gap_pct: pct(truth.actual as f64 - tracked as f64, truth.actual),
                unknown_attribution: truth.unknown_attribution,
                unknown_pct: truth
                    .unknown_attribution
                    .and_then(|u| pct(u as f64, truth.actual)),
                trailing_gap_pct: None,
                moved: false,
            }
        })
        .collect();
    let trailing = cfg.trailing_days as usize;
    // Today is still filling up (pending events arrive late): it gets a trailing average
    // but is never judged as moved.
    let complete = rows.len().saturating_sub(1);
    for i in trailing..rows.len() {
        let earlier: Vec<f64> = rows[i - trailing..i]
            .iter()
            .filter_map(|r| r.gap_pct)
            .collect();
        // One earlier day is an anecdote, not an average.
        if earlier.len() >= 2 {
            let avg = earlier.iter().sum::<f64>() / earlier.len() as f64;
            rows[i].trailing_gap_pct = Some(avg);
            rows[i].moved = i < complete
                && rows[i]
                    .gap_pct
                    .is_some_and(|g| (g - avg).abs() > cfg.alert_points);
        }
    }
    MetricReport {
        name: m.name.clone(),
        event: m.event.clone(),
        days: rows.split_off(trailing),
    }
}

fn wh_error(stores: &Stores, e: WarehouseError) -> ReconcileError {
    ReconcileError::Store {
        what: stores.warehouse.label(),
        detail: e.to_string(),
    }
}

/// A count read from SQLite (an INTEGER is signed; negative means corrupt: 0).
fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The drops that happen before an event is kept in a queue.
const DROPPED_BEFORE_STORING: [&str; 2] = ["consent", "storage_unavailable"];

fn loss_by_stage(
    warehouse: &mut Warehouse,
    stores: &Stores,
    site: Option<&str>,
) -> Result<LossByStage, ReconcileError> {
    let mut loss = LossByStage::default();
    let rows = warehouse
        .agent_counters(site)
        .map_err(|e| wh_error(stores, e))?;
    for row in rows {
        let StoredCounters {
            enqueued,
            sent,
            acked,
            retried,
            pending,
            dropped,
        } = row;
        // Counters come from anonymous browsers: never trust them to be small or sane.
        let dropped: BTreeMap<String, u64> = serde_json::from_str(&dropped).unwrap_or_default();
        let counters = Counters {
            device_id: String::new(),
            enqueued: count(enqueued),
            sent: count(sent),
            acked: count(acked),
            retried: count(retried),
            pending: count(pending),
            dropped,
            degraded: None,
        };
        let before_storing = DROPPED_BEFORE_STORING
            .iter()
            .filter_map(|r| counters.dropped.get(*r))
            .fold(0u64, |a, b| a.saturating_add(*b));
        loss.devices += 1;
        loss.created = loss.created.saturating_add(counters.enqueued);
        loss.stored = loss
            .stored
            .saturating_add(counters.enqueued.saturating_sub(before_storing));
        loss.sent = loss
            .sent
            .saturating_add(counters.sent.saturating_sub(counters.retried));
        loss.acked = loss.acked.saturating_add(counters.acked);
        loss.pending = loss.pending.saturating_add(counters.pending);
        if !counters.identity_holds() {
            loss.identity_violations += 1;
        }
        for (reason, n) in counters.dropped {
            let total = loss.dropped.entry(reason).or_default();
            *total = total.saturating_add(n);
        }
    }
    loss.in_warehouse = warehouse
        .client_events(site)
        .map_err(|e| wh_error(stores, e))?;
    loss.seq_gaps = warehouse.seq_gaps(site).map_err(|e| wh_error(stores, e))?;
    if let Some(spool_path) = stores.spool.as_deref().filter(|p| p.exists()) {
        let spool = open_read_only(spool_path)?;
        let has_tally: Option<String> = spool
            .query_row(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'tally'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| store_error(spool_path, e))?;
        if has_tally.is_some() {
            let (accepted, duplicates, rejected): (i64, i64, i64) = spool
                .query_row(
                    "SELECT coalesce(sum(accepted), 0), coalesce(sum(duplicates), 0),
                            coalesce(sum(rejected), 0)
                     FROM tally WHERE source = 'client' AND (?1 IS NULL OR site = ?1)",
                    params![site],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .map_err(|e| store_error(spool_path, e))?;
            loss.accepted_by_relay = count(accepted);
            loss.duplicates_removed = count(duplicates);
            loss.rejected_by_relay = count(rejected);
        }
    }
    Ok(loss)
}

impl Report {
    /// The latest reported day of each metric (today), for gauges.
    pub fn latest(&self) -> impl Iterator<Item = (&MetricReport, &DayRow)> {
        self.metrics
            .iter()
            .filter_map(|m| m.days.last().map(|d| (m, d)))
    }

    /// The latest complete day (yesterday) of each metric, whose `moved` is meaningful.
    pub fn latest_complete(&self) -> impl Iterator<Item = (&MetricReport, &DayRow)> {
        self.metrics.iter().filter_map(|m| {
            let n = m.days.len();
            (n >= 2).then(|| (m, &m.days[n - 2]))
        })
    }

    /// Every (metric, day) whose gap moved beyond its trailing average.
    pub fn moved(&self) -> impl Iterator<Item = (&MetricReport, &DayRow)> {
        self.metrics
            .iter()
            .flat_map(|m| m.days.iter().filter(|d| d.moved).map(move |d| (m, d)))
    }
}

fn opt_pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"))
}

impl fmt::Display for Report {
    /// The table the `reconcile` command prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<12} {:<16} {:>8} {:>8} {:>8} {:>8} {:>10} {:>9}  moved",
            "day", "metric", "actual", "tracked", "server", "gap %", "unknown %", "trail %"
        )?;
        for m in &self.metrics {
            for d in &m.days {
                writeln!(
                    f,
                    "{:<12} {:<16} {:>8} {:>8} {:>8} {:>8} {:>10} {:>9}  {}",
                    d.day,
                    m.name,
                    d.actual,
                    d.tracked,
                    d.server,
                    opt_pct(d.gap_pct),
                    opt_pct(d.unknown_pct),
                    opt_pct(d.trailing_gap_pct),
                    if d.moved { "MOVED" } else { "" }
                )?;
            }
        }
        let l = &self.loss;
        writeln!(f)?;
        writeln!(
            f,
            "loss by stage (client events, {} devices): created {} → stored {} → sent {} → accepted by relay {} → in warehouse {}",
            l.devices, l.created, l.stored, l.sent, l.accepted_by_relay, l.in_warehouse
        )?;
        let dropped: Vec<String> = l.dropped.iter().map(|(r, n)| format!("{r} {n}")).collect();
        writeln!(
            f,
            "acked {}, pending {}, dropped {} [{}], rejected by relay {}, duplicates removed {}, seq gaps {}, counter identity broken on {} devices",
            l.acked,
            l.pending,
            l.dropped.values().sum::<u64>(),
            dropped.join(", "),
            l.rejected_by_relay,
            l.duplicates_removed,
            l.seq_gaps,
            l.identity_violations
        )
    }
}
