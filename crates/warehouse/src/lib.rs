//! The warehouse: where every sink that stores events in a database writes, and what
//! reconciliation (and the dashboards) read. One schema, on SQLite (the embedded default, one
//! file, no setup) or PostgreSQL, behind one type.
//!
//! # Contract for analysts (stable; additions only)
//!
//! `events`, one row per event id:
//!
//! | column | SQLite | PostgreSQL | meaning |
//! |---|---|---|---|
//! | `id` | TEXT PRIMARY KEY | TEXT PRIMARY KEY | UUIDv7, the idempotency key |
//! | `name` | TEXT | TEXT | event name |
//! | `schema` | TEXT | TEXT | `"<name>/<version>"` |
//! | `source` | TEXT | TEXT | `client` or `server` |
//! | `site` | TEXT | TEXT | site key |
//! | `ts` | INTEGER | BIGINT | capture time, ms since the Unix epoch |
//! | `received_at` | INTEGER | BIGINT | relay receive time, ms since the Unix epoch |
//! | `anon_id`, `user_id`, `session_id`, `device_id` | TEXT | TEXT | identities (nullable but `anon_id`) |
//! | `seq` | INTEGER | BIGINT | per-device sequence number (client events) |
//! | `props` | TEXT (JSON) | JSONB | properties |
//! | `context` | TEXT (JSON) | JSONB | url, referrer, title, attribution |
//! | `logged_at` | INTEGER | BIGINT | when the log took it (loader writes only), ms; else NULL |
//! | `stored_at` | INTEGER | BIGINT | when the warehouse write stored it, ms since the Unix epoch |
//!
//! `agent_counters`, the latest counters each device reported (`device_id` primary key,
//! `site`, `received_at`, `enqueued`, `sent`, `acked`, `retried`, `pending`, `dropped` as a
//! JSON object by reason, `degraded`).
//!
//! # Writes
//!
//! [`Warehouse::write`] stores a batch in one transaction: events `ON CONFLICT (id) DO
//! NOTHING` (a re-delivery after a crash stores nothing twice), counters upserted when newer.
//! On PostgreSQL the events of a batch go by binary `COPY` into a temporary table and from
//! there into `events` with one `INSERT … SELECT … ON CONFLICT (id) DO NOTHING`: a few round
//! trips per batch, not one per row. That was 1.07–1.22× the rate of the one-statement
//! `unnest` insert it replaced at 2,000–10,000 events per batch (even at 500); with the daily
//! rollups' step (below) a write is 0.79× that insert, which keeps no rollups; measure with
//! `cargo run --release -p trueup-warehouse --example pg_insert`. SQLite commits with
//! `synchronous = FULL`.
//!
//! The same transaction updates the daily rollups from the events that were new (see
//! `src/rollup.rs`; its `rollup_*` tables are the warehouse's own, not part of the contract
//! above): every read below comes from them, so a dashboard's 30 days cost the days'
//! rows, not the events'. A warehouse from before them has them built from its events when
//! first opened for writing; opened read-only before that, it says so.

use std::collections::BTreeMap;
use std::path::Path;

mod rollup;

pub use rollup::lag_bucket;
use rollup::{Delta, STORED_COLUMNS, Stored, day_name, day_of};

#[cfg(test)]
mod oracle;

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::Type;
use rusqlite::{OpenFlags, params};
use rustc_hash::FxHashMap;

/// The warehouse failed; nothing of the batch was stored.
#[derive(Debug, thiserror::Error)]
pub enum WarehouseError {
    /// SQLite reported an error.
    #[error("warehouse (SQLite): {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL reported an error.
    #[error("warehouse (PostgreSQL): {0}")]
    Postgres(#[from] postgres::Error),
    /// The connection string is not usable.
    #[error("warehouse: {0}")]
    Config(String),
}

/// One event's columns.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub schema: &'a str,
    pub source: &'a str,
    pub site: &'a str,
    pub ts: i64,
    pub received_at: i64,
    pub anon_id: &'a str,
    pub user_id: Option<&'a str>,
    pub session_id: Option<&'a str>,
    pub device_id: Option<&'a str>,
    pub seq: Option<i64>,
    /// A JSON object.
    pub props: &'a str,
    /// A JSON object.
    pub context: &'a str,
    /// When the log (Kafka, JetStream) took it, ms since the epoch; `None` when it came
    /// straight from a relay.
    pub logged_at: Option<i64>,
}

/// One device's counters.
#[derive(Debug, Clone, PartialEq)]
pub struct CountersRow<'a> {
    pub device_id: &'a str,
    pub site: &'a str,
    pub received_at: i64,
    pub enqueued: i64,
    pub sent: i64,
    pub acked: i64,
    pub retried: i64,
    pub pending: i64,
    /// A JSON object, reason → count.
    pub dropped: &'a str,
    pub degraded: Option<&'a str>,
}

/// Counters as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCounters {
    pub enqueued: i64,
    pub sent: i64,
    pub acked: i64,
    pub retried: i64,
    pub pending: i64,
    /// JSON object, reason → count.
    pub dropped: String,
}

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    schema TEXT NOT NULL,
    source TEXT NOT NULL,
    site TEXT NOT NULL,
    ts INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    anon_id TEXT NOT NULL,
    user_id TEXT,
    session_id TEXT,
    device_id TEXT,
    seq INTEGER,
    props TEXT NOT NULL,
    context TEXT NOT NULL,
    logged_at INTEGER,
    stored_at INTEGER
);
CREATE INDEX IF NOT EXISTS events_name_ts ON events (name, ts);
CREATE TABLE IF NOT EXISTS agent_counters (
    device_id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    enqueued INTEGER NOT NULL,
    sent INTEGER NOT NULL,
    acked INTEGER NOT NULL,
    retried INTEGER NOT NULL,
    pending INTEGER NOT NULL,
    dropped TEXT NOT NULL,
    degraded TEXT
);
";

const POSTGRES_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    schema TEXT NOT NULL,
    source TEXT NOT NULL,
    site TEXT NOT NULL,
    ts BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    anon_id TEXT NOT NULL,
    user_id TEXT,
    session_id TEXT,
    device_id TEXT,
    seq BIGINT,
    props JSONB NOT NULL,
    context JSONB NOT NULL,
    logged_at BIGINT,
    stored_at BIGINT
);
-- Warehouses created before the pipeline timestamps existed.
ALTER TABLE events ADD COLUMN IF NOT EXISTS logged_at BIGINT;
ALTER TABLE events ADD COLUMN IF NOT EXISTS stored_at BIGINT;
CREATE INDEX IF NOT EXISTS events_name_ts ON events (name, ts);
CREATE TABLE IF NOT EXISTS agent_counters (
    device_id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    enqueued BIGINT NOT NULL,
    sent BIGINT NOT NULL,
    acked BIGINT NOT NULL,
    retried BIGINT NOT NULL,
    pending BIGINT NOT NULL,
    dropped JSONB NOT NULL,
    degraded TEXT
);
";

/// The session's staging table for a batch of events (PostgreSQL): `COPY` fills it, one
/// `INSERT … SELECT … ON CONFLICT (id) DO NOTHING` moves it into `events`, and the commit
/// empties it. JSON columns are text here and cast (so validated) by the insert.
const EVENTS_IN: &str = "
CREATE TEMPORARY TABLE IF NOT EXISTS events_in (
    id TEXT, name TEXT, schema TEXT, source TEXT, site TEXT, ts BIGINT, received_at BIGINT,
    anon_id TEXT, user_id TEXT, session_id TEXT, device_id TEXT, seq BIGINT,
    props TEXT, context TEXT, logged_at BIGINT
) ON COMMIT DELETE ROWS;
";

/// `events_in`'s column types, in order, for the binary `COPY`.
const EVENTS_IN_TYPES: [Type; 15] = [
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
];

/// An open warehouse.
pub enum Warehouse {
    /// The embedded one.
    Sqlite(rusqlite::Connection),
    /// A PostgreSQL database.
    Postgres(postgres::Client),
}

impl Warehouse {
    /// Opens (or creates) the SQLite warehouse file, for writing.
    pub fn open_sqlite(path: &Path) -> Result<Warehouse, WarehouseError> {
        let conn = rusqlite::Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SQLITE_SCHEMA)?;
        // Warehouses created before the pipeline timestamps existed.
        let has: bool = conn.query_row(
            "SELECT count(*) > 0 FROM pragma_table_info('events') WHERE name = 'stored_at'",
            [],
            |r| r.get(0),
        )?;
        if !has {
            conn.execute_batch(
                "ALTER TABLE events ADD COLUMN logged_at INTEGER;
                 ALTER TABLE events ADD COLUMN stored_at INTEGER;",
            )?;
        }
        let mut conn = conn;
        rollup::ensure_sqlite(&mut conn)?;
        Ok(Warehouse::Sqlite(conn))
    }

    /// Opens an existing SQLite warehouse for reading only.
    pub fn open_sqlite_read_only(path: &Path) -> Result<Warehouse, WarehouseError> {
        let conn = rusqlite::Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        if !rollup::sqlite_has_rollups(&conn)? {
            return Err(WarehouseError::Config(format!(
                "{} has no daily rollups yet (written by an older trueup, or being built now): \
                 open it once for writing (start the relay or the loader on it) and retry",
                path.display()
            )));
        }
        Ok(Warehouse::Sqlite(conn))
    }

    /// Connects to PostgreSQL (`postgres://user:password@host/db`) and creates the tables if
    /// they are missing. No TLS: connect over loopback or a private network, or through a
    /// local proxy.
    pub fn connect_postgres(url: &str) -> Result<Warehouse, WarehouseError> {
        let config: postgres::Config = url
            .parse()
            .map_err(|e| WarehouseError::Config(format!("invalid PostgreSQL URL: {e}")))?;
        let mut client = config.connect(postgres::NoTls)?;
        client.batch_execute(POSTGRES_SCHEMA)?;
        client.batch_execute(EVENTS_IN)?;
        rollup::ensure_postgres(&mut client)?;
        Ok(Warehouse::Postgres(client))
    }

    /// Stores a batch in one transaction (see the module docs). Returns the events that
    /// were new.
    pub fn write(
        &mut self,
        events: &[EventRow],
        counters: &[CountersRow],
    ) -> Result<u64, WarehouseError> {
        match self {
            Warehouse::Sqlite(conn) => write_sqlite(conn, events, counters),
            Warehouse::Postgres(client) => write_postgres(client, events, counters),
        }
    }

    /// The latest counters of every device (of `site`, or all).
    pub fn agent_counters(
        &mut self,
        site: Option<&str>,
    ) -> Result<Vec<StoredCounters>, WarehouseError> {
        Ok(match self {
            Warehouse::Sqlite(conn) => {
                let mut stmt = conn.prepare_cached(
                    "SELECT enqueued, sent, acked, retried, pending, dropped FROM agent_counters
                     WHERE (?1 IS NULL OR site = ?1)",
                )?;
                stmt.query_map(params![site], |r| {
                    Ok(StoredCounters {
                        enqueued: r.get(0)?,
                        sent: r.get(1)?,
                        acked: r.get(2)?,
                        retried: r.get(3)?,
                        pending: r.get(4)?,
                        dropped: r.get(5)?,
                    })
                })?
                .collect::<Result<_, _>>()?
            }
            Warehouse::Postgres(client) => client
                .query(
                    "SELECT enqueued, sent, acked, retried, pending, dropped::text FROM agent_counters
                     WHERE ($1::text IS NULL OR site = $1)",
                    &[&site],
                )?
                .iter()
                .map(|r| StoredCounters {
                    enqueued: r.get(0),
                    sent: r.get(1),
                    acked: r.get(2),
                    retried: r.get(3),
                    pending: r.get(4),
                    dropped: r.get(5),
                })
                .collect(),
        })
    }
}

/// The pipeline stages whose lag [`Warehouse::lag_counts`] measures, from the event's stamps:
/// capture (`ts`, the browser's or the backend's clock) to accepted by a relay
/// (`received_at`), accepted to in the log (`logged_at`, scale-out only), log to stored
/// (`stored_at`), accepted to stored, and capture to stored.
pub const LAG_STAGES: [&str; 5] = [
    "capture_to_accepted",
    "accepted_to_log",
    "log_to_warehouse",
    "accepted_to_warehouse",
    "capture_to_warehouse",
];

/// The reads, all from the daily rollups (see `src/rollup.rs`): a dashboard's 30 days cost
/// the days' rows, not the events'. `from_ms` counts from its UTC day.
impl Warehouse {
    /// Events called `event` since `from_ms`, per UTC day of capture: (client, server).
    pub fn events_per_day(
        &mut self,
        event: &str,
        site: Option<&str>,
        from_ms: i64,
    ) -> Result<BTreeMap<String, (u64, u64)>, WarehouseError> {
        let rows: Vec<(i64, String, i64)> = self.rows3(
            "SELECT day, source, sum(events) FROM rollup_events
             WHERE name = $1 AND day >= $2 AND ($3 IS NULL OR site = $3) GROUP BY day, source",
            event,
            day_of(from_ms),
            site,
        )?;
        let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (day, source, n) in rows {
            let entry = out.entry(day_name(day)).or_default();
            match source.as_str() {
                "client" => entry.0 += count(n),
                _ => entry.1 += count(n),
            }
        }
        Ok(out)
    }

    /// Client events stored (of `site`, or all).
    pub fn client_events(&mut self, site: Option<&str>) -> Result<u64, WarehouseError> {
        self.total(
            "SELECT coalesce(sum(events), 0) FROM rollup_events
             WHERE source = 'client' AND ($1 IS NULL OR site = $1)",
            site,
        )
    }

    /// `seq` numbers missing in the client events' streams (a device's events on a site;
    /// seqs start at 1; each gap counts at most a million, so one forged seq cannot drown the
    /// figure). The sum of [`Warehouse::seq_gaps_per_day`] over every day.
    pub fn seq_gaps(&mut self, site: Option<&str>) -> Result<u64, WarehouseError> {
        self.total(
            "SELECT coalesce(sum(gaps), 0) FROM rollup_seq_gaps WHERE ($1 IS NULL OR site = $1)",
            site,
        )
    }

    /// Per UTC day of capture since `from_ms`: the `seq` numbers missing before that day's
    /// client events in their streams (see [`Warehouse::seq_gaps`]).
    pub fn seq_gaps_per_day(
        &mut self,
        site: Option<&str>,
        from_ms: i64,
    ) -> Result<BTreeMap<String, u64>, WarehouseError> {
        let rows: Vec<(i64, i64)> = self.rows2(
            "SELECT day, sum(gaps) FROM rollup_seq_gaps
             WHERE day >= $1 AND ($2 IS NULL OR site = $2) GROUP BY day",
            day_of(from_ms),
            site,
        )?;
        Ok(rows
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(d, n)| (day_name(d), count(n)))
            .collect())
    }

    /// For one of [`LAG_STAGES`], over the events captured since `from_ms`: how many events
    /// had a lag in each bucket (ms, the bucket's lower end, see [`lag_bucket`]), ascending —
    /// a distribution of a few thousand rows a day from which any percentile follows, exact
    /// below 256 ms and within 0.8 % above. Events without the stage's stamps are left out.
    pub fn lag_counts(
        &mut self,
        stage: &str,
        site: Option<&str>,
        from_ms: i64,
    ) -> Result<Vec<(i64, u64)>, WarehouseError> {
        if !LAG_STAGES.contains(&stage) {
            return Err(WarehouseError::Config(format!("unknown lag stage {stage}")));
        }
        let sql = "SELECT lag, sum(events) FROM rollup_lags
                   WHERE stage = $1 AND day >= $2 AND ($3 IS NULL OR site = $3) GROUP BY lag ORDER BY lag";
        let from = day_of(from_ms);
        let rows: Vec<(i64, i64)> = match self {
            Warehouse::Sqlite(conn) => {
                let mut st = conn.prepare_cached(&sqlite_marks(sql))?;
                st.query_map(params![stage, from, site], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?
            }
            Warehouse::Postgres(client) => client
                .query(&pg_casts(sql), &[&stage, &from, &site])?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        };
        Ok(rows.into_iter().map(|(l, n)| (l, count(n))).collect())
    }

    /// Distinct sessions with a client event, per UTC day since `from_ms`.
    pub fn sessions_per_day(
        &mut self,
        site: Option<&str>,
        from_ms: i64,
    ) -> Result<BTreeMap<String, u64>, WarehouseError> {
        let rows: Vec<(i64, i64)> = self.rows2(
            "SELECT day, count(DISTINCT session_id) FROM rollup_sessions
             WHERE day >= $1 AND ($2 IS NULL OR site = $2) GROUP BY day",
            day_of(from_ms),
            site,
        )?;
        Ok(rows
            .into_iter()
            .map(|(d, n)| (day_name(d), count(n)))
            .collect())
    }

    /// The `limit` most frequent client event names since `from_ms`, most frequent first.
    pub fn top_events(
        &mut self,
        site: Option<&str>,
        from_ms: i64,
        limit: u32,
    ) -> Result<Vec<(String, u64)>, WarehouseError> {
        let rows: Vec<(String, i64)> = self.rows2(
            "SELECT name, sum(events) AS n FROM rollup_events
             WHERE source = 'client' AND day >= $1 AND ($2 IS NULL OR site = $2)
             GROUP BY name ORDER BY n DESC, name",
            day_of(from_ms),
            site,
        )?;
        Ok(rows
            .into_iter()
            .take(limit as usize)
            .map(|(n, c)| (n, count(c)))
            .collect())
    }

    /// A funnel over the client events since `from_ms`: for each of `steps`, the sessions
    /// that reached it — a session reaches step 1 when it did it in the window, and step k
    /// when it reached step k − 1 and its first time of step k (in the window) is no earlier
    /// than its time at step k − 1. Sessions only, one pass per step, keeping only the
    /// sessions still in the funnel.
    pub fn funnel(
        &mut self,
        site: Option<&str>,
        from_ms: i64,
        steps: &[String],
    ) -> Result<Vec<u64>, WarehouseError> {
        let from = day_of(from_ms);
        let sql = "SELECT session_id, first_ts FROM rollup_firsts
                   WHERE name = $1 AND day >= $2 AND ($3 IS NULL OR site = $3)";
        let mut reached = Vec::with_capacity(steps.len());
        // The sessions through the step before, with the time they got there.
        let mut at: Option<FxHashMap<String, i64>> = None;
        for step in steps {
            let through: FxHashMap<String, i64> = match &at {
                None => {
                    let mut firsts: FxHashMap<String, i64> = FxHashMap::default();
                    self.each_first(sql, step, from, site, |session, ts| {
                        if let Some(t) = firsts.get_mut(session) {
                            *t = (*t).min(ts);
                        } else {
                            firsts.insert(session.to_string(), ts);
                        }
                    })?;
                    firsts
                }
                Some(before) => {
                    // Only the sessions still in the funnel; keys borrowed from them.
                    let mut firsts: FxHashMap<&str, i64> = FxHashMap::default();
                    self.each_first(sql, step, from, site, |session, ts| {
                        if let Some((key, _)) = before.get_key_value(session) {
                            let t = firsts.entry(key.as_str()).or_insert(ts);
                            *t = (*t).min(ts);
                        }
                    })?;
                    firsts
                        .into_iter()
                        .filter(|(s, t)| before.get(*s).is_some_and(|b| t >= b))
                        .map(|(s, t)| (s.to_string(), t))
                        .collect()
                }
            };
            reached.push(through.len() as u64);
            at = Some(through);
        }
        Ok(reached)
    }

    /// Calls `f` with each (session, first time) row of a funnel step's query (a row per
    /// session and day: a session that spans days comes more than once).
    fn each_first(
        &mut self,
        sql: &str,
        step: &str,
        from: i64,
        site: Option<&str>,
        mut f: impl FnMut(&str, i64),
    ) -> Result<(), WarehouseError> {
        match self {
            Warehouse::Sqlite(conn) => {
                let mut st = conn.prepare_cached(&sqlite_marks(sql))?;
                let mut rows = st.query(params![step, from, site])?;
                while let Some(r) = rows.next()? {
                    let session = r.get_ref(0)?.as_str().map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            0,
                            rusqlite::types::Type::Text,
                            e.into(),
                        )
                    })?;
                    f(session, r.get(1)?);
                }
            }
            Warehouse::Postgres(client) => {
                for r in client.query(&pg_casts(sql), &[&step, &from, &site])? {
                    f(r.get(0), r.get(1));
                }
            }
        }
        Ok(())
    }

    /// A single count of a query with a site filter as `$1`.
    fn total(&mut self, sql: &str, site: Option<&str>) -> Result<u64, WarehouseError> {
        Ok(count(match self {
            Warehouse::Sqlite(conn) => {
                conn.query_row(&sqlite_marks(sql), params![site], |r| r.get(0))?
            }
            Warehouse::Postgres(client) => client.query_one(&pg_casts(sql), &[&site])?.get(0),
        }))
    }

    /// Two-column rows of a query with a day as `$1` and a site filter as `$2`.
    fn rows2<A, B>(
        &mut self,
        sql: &str,
        day: i64,
        site: Option<&str>,
    ) -> Result<Vec<(A, B)>, WarehouseError>
    where
        A: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a>,
        B: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a>,
    {
        Ok(match self {
            Warehouse::Sqlite(conn) => {
                let mut st = conn.prepare_cached(&sqlite_marks(sql))?;
                st.query_map(params![day, site], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?
            }
            Warehouse::Postgres(client) => client
                .query(&pg_casts(sql), &[&day, &site])?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        })
    }

    /// Three-column rows of a query with a key as `$1`, a day as `$2` and a site filter as
    /// `$3`.
    fn rows3<A, B, C>(
        &mut self,
        sql: &str,
        key: &str,
        day: i64,
        site: Option<&str>,
    ) -> Result<Vec<(A, B, C)>, WarehouseError>
    where
        A: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a>,
        B: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a>,
        C: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a>,
    {
        Ok(match self {
            Warehouse::Sqlite(conn) => {
                let mut st = conn.prepare_cached(&sqlite_marks(sql))?;
                st.query_map(params![key, day, site], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<Result<_, _>>()?
            }
            Warehouse::Postgres(client) => client
                .query(&pg_casts(sql), &[&key, &day, &site])?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
        })
    }
}

/// A read's SQL for SQLite: `$n` becomes `?n`.
fn sqlite_marks(sql: &str) -> String {
    sql.replace('$', "?")
}

/// A read's SQL for PostgreSQL: the site parameter (`$n IS NULL`) is typed, sums are
/// `bigint`.
fn pg_casts(sql: &str) -> String {
    let mut out = sql.to_string();
    for n in 1..=3 {
        out = out.replace(&format!("(${n} IS NULL"), &format!("(${n}::text IS NULL"));
    }
    out.replace("sum(events)", "sum(events)::bigint")
        .replace("sum(gaps)", "sum(gaps)::bigint")
}

/// A count read back (signed in both databases; negative means corrupt: 0).
fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn write_sqlite(
    conn: &mut rusqlite::Connection,
    events: &[EventRow],
    counters: &[CountersRow],
) -> Result<u64, WarehouseError> {
    let tx = conn.transaction()?;
    let mut new = 0;
    let stored_at = now_ms();
    let mut delta = Delta::default();
    {
        let mut ev = tx.prepare_cached(
            "INSERT INTO events
             (id, name, schema, source, site, ts, received_at, anon_id, user_id, session_id, device_id, seq, props, context, logged_at, stored_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
             ON CONFLICT (id) DO NOTHING",
        )?;
        for e in events {
            let inserted = ev.execute(params![
                e.id,
                e.name,
                e.schema,
                e.source,
                e.site,
                e.ts,
                e.received_at,
                e.anon_id,
                e.user_id,
                e.session_id,
                e.device_id,
                e.seq,
                e.props,
                e.context,
                e.logged_at,
                stored_at
            ])?;
            if inserted > 0 {
                new += 1;
                delta.add(&Stored {
                    site: e.site.into(),
                    name: e.name.into(),
                    source: e.source.into(),
                    ts: e.ts,
                    received_at: e.received_at,
                    logged_at: e.logged_at,
                    stored_at: Some(stored_at),
                    session_id: e.session_id.map(Into::into),
                    device_id: e.device_id.map(Into::into),
                    seq: e.seq,
                });
            }
        }
        let mut up = tx.prepare_cached(
            "INSERT INTO agent_counters
             (device_id, site, received_at, enqueued, sent, acked, retried, pending, dropped, degraded)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (device_id) DO UPDATE SET
               site = excluded.site, received_at = excluded.received_at, enqueued = excluded.enqueued,
               sent = excluded.sent, acked = excluded.acked, retried = excluded.retried,
               pending = excluded.pending, dropped = excluded.dropped, degraded = excluded.degraded
             WHERE excluded.received_at >= agent_counters.received_at",
        )?;
        for c in counters {
            up.execute(params![
                c.device_id,
                c.site,
                c.received_at,
                c.enqueued,
                c.sent,
                c.acked,
                c.retried,
                c.pending,
                c.dropped,
                c.degraded
            ])?;
        }
    }
    rollup::apply_sqlite(&tx, &delta)?;
    tx.commit()?;
    Ok(new)
}

fn write_postgres(
    client: &mut postgres::Client,
    events: &[EventRow],
    counters: &[CountersRow],
) -> Result<u64, WarehouseError> {
    let mut tx = client.transaction()?;
    let mut new = 0;
    if !events.is_empty() {
        let sink = tx.copy_in("COPY events_in FROM STDIN (FORMAT binary)")?;
        let mut w = BinaryCopyInWriter::new(sink, &EVENTS_IN_TYPES);
        for e in events {
            w.write(&[
                &e.id,
                &e.name,
                &e.schema,
                &e.source,
                &e.site,
                &e.ts,
                &e.received_at,
                &e.anon_id,
                &e.user_id,
                &e.session_id,
                &e.device_id,
                &e.seq,
                &e.props,
                &e.context,
                &e.logged_at,
            ])?;
        }
        w.finish()?;
        let stored = tx.query(
            &format!(
                "INSERT INTO events
                 (id, name, schema, source, site, ts, received_at, anon_id, user_id, session_id, device_id, seq, props, context, logged_at, stored_at)
                 SELECT id, name, schema, source, site, ts, received_at, anon_id, user_id, session_id, device_id, seq,
                        props::jsonb, context::jsonb, logged_at, $1::BIGINT
                 FROM events_in
                 ON CONFLICT (id) DO NOTHING
                 RETURNING {STORED_COLUMNS}"
            ),
            &[&now_ms()],
        )?;
        new = stored.len() as u64;
        let mut delta = Delta::default();
        for r in &stored {
            delta.add(&rollup::stored_postgres(r, 0));
        }
        rollup::apply_postgres(&mut tx, &delta)?;
    }
    for c in counters {
        tx.execute(
            "INSERT INTO agent_counters
             (device_id, site, received_at, enqueued, sent, acked, retried, pending, dropped, degraded)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text::jsonb, $10)
             ON CONFLICT (device_id) DO UPDATE SET
               site = excluded.site, received_at = excluded.received_at, enqueued = excluded.enqueued,
               sent = excluded.sent, acked = excluded.acked, retried = excluded.retried,
               pending = excluded.pending, dropped = excluded.dropped, degraded = excluded.degraded
             WHERE excluded.received_at >= agent_counters.received_at",
            &[
                &c.device_id,
                &c.site,
                &c.received_at,
                &c.enqueued,
                &c.sent,
                &c.acked,
                &c.retried,
                &c.pending,
                &c.dropped,
                &c.degraded,
            ],
        )?;
    }
    tx.commit()?;
    Ok(new)
}

/// Milliseconds since the Unix epoch (the `stored_at` of a write).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev<'a>(id: &'a str, device: &'a str, seq: i64, ts: i64) -> EventRow<'a> {
        EventRow {
            id,
            name: "signup",
            schema: "event/1",
            source: "client",
            site: "s",
            ts,
            received_at: ts + 5,
            anon_id: "a",
            user_id: None,
            session_id: Some("x"),
            device_id: Some(device),
            seq: Some(seq),
            props: r#"{"k":1}"#,
            context: "{}",
            logged_at: None,
        }
    }

    fn counters(received_at: i64, enqueued: i64) -> CountersRow<'static> {
        CountersRow {
            device_id: "d1",
            site: "s",
            received_at,
            enqueued,
            sent: 1,
            acked: 1,
            retried: 0,
            pending: 0,
            dropped: r#"{"queue_full":2}"#,
            degraded: None,
        }
    }

    /// A warehouse file from before the stage times gets the columns, keeps its rows, and
    /// new writes carry `logged_at` (when given) and `stored_at`.
    #[test]
    fn an_older_sqlite_warehouse_gets_the_stage_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite");
        let old = rusqlite::Connection::open(&path).unwrap();
        let old_schema =
            SQLITE_SCHEMA.replace(",\n    logged_at INTEGER,\n    stored_at INTEGER", "");
        assert_ne!(old_schema, SQLITE_SCHEMA);
        old.execute_batch(&old_schema).unwrap();
        old.execute_batch(
            "INSERT INTO events (id, name, schema, source, site, ts, received_at, anon_id, props, context) \
             VALUES ('old', 'n', 'event/1', 'client', 's', 1, 2, 'a', '{}', '{}');",
        )
        .unwrap();
        assert!(
            old.prepare("SELECT stored_at FROM events").is_err(),
            "the old shape"
        );
        drop(old);
        let mut w = Warehouse::open_sqlite(&path).unwrap();
        let mut e = ev("new", "d1", 1, 10);
        e.logged_at = Some(20);
        let before = now_ms();
        assert_eq!(w.write(&[e], &[]).unwrap(), 1);
        let Warehouse::Sqlite(c) = &w else {
            unreachable!()
        };
        let rows: Vec<(String, Option<i64>, Option<i64>)> = c
            .prepare("SELECT id, logged_at, stored_at FROM events ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(rows[1], ("old".to_string(), None, None));
        assert_eq!((rows[0].0.as_str(), rows[0].1), ("new", Some(20)));
        assert!(rows[0].2.unwrap() >= before);
        // Opening it again changes nothing.
        drop(w);
        Warehouse::open_sqlite(&path).unwrap();
    }

    /// The same writes and reads on either database give the same answers.
    fn exercise(mut w: Warehouse) {
        let day = 1_764_324_000_000; // 2025-11-28T10:00Z
        let batch = [
            ev("e1", "d1", 1, day),
            ev("e2", "d1", 3, day),
            ev("e3", "d2", 1, day + 86_400_000),
        ];
        assert_eq!(w.write(&batch, &[counters(10, 5)]).unwrap(), 3);
        // Re-delivery stores nothing twice; older counters do not overwrite newer ones.
        assert_eq!(w.write(&batch[..2], &[counters(5, 99)]).unwrap(), 0);
        let per_day = w.events_per_day("signup", Some("s"), 0).unwrap();
        assert_eq!(
            per_day.into_iter().collect::<Vec<_>>(),
            vec![
                ("2025-11-28".to_string(), (2, 0)),
                ("2025-11-29".to_string(), (1, 0))
            ]
        );
        assert_eq!(w.client_events(None).unwrap(), 3);
        assert_eq!(w.client_events(Some("other")).unwrap(), 0);
        assert_eq!(w.seq_gaps(None).unwrap(), 1, "seq 2 of d1 is missing");
        let c = w.agent_counters(Some("s")).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].enqueued, 5);
        assert!(c[0].dropped.contains("queue_full"));
    }

    #[test]
    fn sqlite_writes_once_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        exercise(Warehouse::open_sqlite(&dir.path().join("w.sqlite")).unwrap());
    }

    /// A fresh schema `{prefix}_{pid}` on the PostgreSQL at `url`: its name, an admin
    /// connection (to drop it) and a URL whose connections use it.
    pub(crate) fn pg_schema(url: &str, prefix: &str) -> (String, postgres::Client, String) {
        let schema = format!("{prefix}_{}", std::process::id());
        let mut admin = postgres::Client::connect(url, postgres::NoTls).unwrap();
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
            ))
            .unwrap();
        let sep = if url.contains('?') { '&' } else { '?' };
        let scoped = format!("{url}{sep}options=-csearch_path%3D{schema}");
        (schema, admin, scoped)
    }

    /// Against the real PostgreSQL of `.ci/postgres` (`TRUEUP_TEST_POSTGRES`), in a schema of
    /// its own.
    #[test]
    fn postgres_writes_once_and_reads_back() {
        let Ok(url) = std::env::var("TRUEUP_TEST_POSTGRES") else {
            eprintln!("TRUEUP_TEST_POSTGRES not set: skipped (.ci/run sets it)");
            return;
        };
        let (schema, mut admin, scoped) = pg_schema(&url, "wh_test");
        exercise(Warehouse::connect_postgres(&scoped).unwrap());
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .unwrap();
    }
}
