//! Daily rollups: what the dashboards and reconciliation read instead of scanning `events`.
//!
//! Every [`crate::Warehouse::write`] updates them in the transaction that stores the batch,
//! from the events that were new (a re-delivered event changes nothing), so they always equal
//! what a scan of `events` would count. A warehouse from before the rollups gets them built
//! from its events when it is first opened for writing (the same code path, in chunks, in one
//! transaction).
//!
//! | table | key | value |
//! |---|---|---|
//! | `rollup_events` | name, day, source, site | events |
//! | `rollup_sessions` | day, session_id, site | (a client session seen that day) |
//! | `rollup_firsts` | name, day, session_id, site | the session's first `ts` of that event that day |
//! | `rollup_lags` | stage, day, lag bucket (ms, see [`lag_bucket`]), site | events |
//! | `rollup_seqs` | site, device_id, seq | the seq's first `ts` (a device's stream on a site) |
//! | `rollup_seq_gaps` | day, site | seq numbers missing before that day's client events |
//!
//! `day` is the UTC day of capture as days since the Unix epoch. A `seq` gap is counted on
//! the day of the event after it, capped at a million per gap; seqs outside 1..=10⁹ and
//! events without a device are not part of any stream.

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::{OptionalExtension, params};

use crate::{LAG_STAGES, WarehouseError};

/// Milliseconds in a day.
pub(crate) const DAY_MS: i64 = 86_400_000;
/// The highest `seq` a stream counts.
const SEQ_MAX: i64 = 1_000_000_000;
/// The most one gap counts.
const GAP_CAP: i64 = 1_000_000;
/// Events read per chunk when building the rollups of an older warehouse.
const BACKFILL_CHUNK: i64 = 50_000;
/// Serializes the rollup step of concurrent PostgreSQL writers (a `seq` stream's gaps depend
/// on the numbers already stored).
const PG_LOCK: i64 = 0x7472_7565_7570; // "trueup"

const TABLES: &str = "
CREATE TABLE IF NOT EXISTS rollup_events (
    name TEXT NOT NULL, day BIGINT NOT NULL, source TEXT NOT NULL, site TEXT NOT NULL,
    events BIGINT NOT NULL, PRIMARY KEY (name, day, source, site))@;
CREATE TABLE IF NOT EXISTS rollup_sessions (
    day BIGINT NOT NULL, session_id TEXT NOT NULL, site TEXT NOT NULL,
    PRIMARY KEY (day, session_id, site))@;
CREATE TABLE IF NOT EXISTS rollup_firsts (
    name TEXT NOT NULL, day BIGINT NOT NULL, session_id TEXT NOT NULL, site TEXT NOT NULL,
    first_ts BIGINT NOT NULL, PRIMARY KEY (name, day, session_id, site))@;
CREATE TABLE IF NOT EXISTS rollup_lags (
    stage TEXT NOT NULL, day BIGINT NOT NULL, lag BIGINT NOT NULL, site TEXT NOT NULL,
    events BIGINT NOT NULL, PRIMARY KEY (stage, day, lag, site))@;
CREATE TABLE IF NOT EXISTS rollup_seqs (
    site TEXT NOT NULL, device_id TEXT NOT NULL, seq BIGINT NOT NULL, ts BIGINT NOT NULL,
    PRIMARY KEY (site, device_id, seq))@;
CREATE TABLE IF NOT EXISTS rollup_seq_gaps (
    day BIGINT NOT NULL, site TEXT NOT NULL, gaps BIGINT NOT NULL, PRIMARY KEY (day, site))@;
CREATE TABLE IF NOT EXISTS rollup_state (version BIGINT NOT NULL);
";

/// The rollup tables' DDL for SQLite (clustered on their keys).
pub(crate) fn sqlite_schema() -> String {
    TABLES.replace('@', " WITHOUT ROWID")
}

/// The rollup tables' DDL for PostgreSQL.
pub(crate) fn postgres_schema() -> String {
    TABLES.replace('@', "")
}

/// The UTC day (days since the epoch) of a time in ms.
pub(crate) fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// A day as `YYYY-MM-DD` (days outside years -9999..=9999 as the epoch's day).
pub(crate) fn day_name(day: i64) -> String {
    let ts = day
        .checked_mul(86_400)
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    jiff::tz::TimeZone::UTC.to_datetime(ts).date().to_string()
}

/// The columns of a stored event that the rollups count.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub site: String,
    pub name: String,
    pub source: String,
    pub ts: i64,
    pub received_at: i64,
    pub logged_at: Option<i64>,
    pub stored_at: Option<i64>,
    pub session_id: Option<String>,
    pub device_id: Option<String>,
    pub seq: Option<i64>,
}

/// The columns of [`Stored`], in order, as a select list.
pub(crate) const STORED_COLUMNS: &str =
    "site, name, source, ts, received_at, logged_at, stored_at, session_id, device_id, seq";

/// One of [`LAG_STAGES`] for an event, when it has the stage's stamps.
fn lag(stage: &str, e: &Stored) -> Option<i64> {
    let d = |a: Option<i64>, b: Option<i64>| a?.checked_sub(b?);
    match stage {
        "capture_to_accepted" => d(Some(e.received_at), Some(e.ts)),
        "accepted_to_log" => d(e.logged_at, Some(e.received_at)),
        "log_to_warehouse" => d(e.stored_at, e.logged_at),
        "accepted_to_warehouse" => d(e.stored_at, Some(e.received_at)),
        "capture_to_warehouse" => d(e.stored_at, Some(e.ts)),
        _ => None,
    }
}

/// Sub-buckets per power of two of a lag (see [`lag_bucket`]).
const LAG_SUB_BUCKETS_LOG2: u32 = 7;

/// The bucket a lag (ms) is counted in: the lag itself below 256 ms (in either direction: a
/// negative lag is a clock ahead), above that the lag with all but its 8 highest bits
/// cleared, so that any percentile read back is at most 0.8 % below the true lag (at most
/// 128 buckets per power of two: a day of one stage is a few thousand rows, however many
/// events it had).
pub fn lag_bucket(lag: i64) -> i64 {
    let v = lag.unsigned_abs();
    let top = 63 - v.leading_zeros().min(63);
    let bucket = if top <= LAG_SUB_BUCKETS_LOG2 {
        v
    } else {
        let shift = top - LAG_SUB_BUCKETS_LOG2;
        (v >> shift) << shift
    };
    // |lag| ≤ 2^63, and clearing bits never grows it.
    let bucket = i64::try_from(bucket).unwrap_or(i64::MAX);
    if lag < 0 { -bucket } else { bucket }
}

/// A `seq` stream: (site, device).
type Stream = (String, String);

/// What a batch's new events add to the rollups. Keys are in the tables' key order, so
/// writes go in one order in every transaction.
#[derive(Debug, Default)]
pub(crate) struct Delta {
    events: BTreeMap<(String, i64, String, String), i64>,
    sessions: BTreeSet<(i64, String, String)>,
    firsts: BTreeMap<(String, i64, String, String), i64>,
    lags: BTreeMap<(&'static str, i64, i64, String), i64>,
    /// Per stream, its new seqs with their first `ts`.
    streams: BTreeMap<Stream, BTreeMap<i64, i64>>,
}

impl Delta {
    /// Counts one new event.
    pub(crate) fn add(&mut self, e: &Stored) {
        let day = day_of(e.ts);
        let site = &e.site;
        *self
            .events
            .entry((e.name.clone(), day, e.source.clone(), site.clone()))
            .or_default() += 1;
        for stage in LAG_STAGES {
            if let Some(l) = lag(stage, e) {
                *self
                    .lags
                    .entry((stage, day, lag_bucket(l), site.clone()))
                    .or_default() += 1;
            }
        }
        if e.source != "client" {
            return;
        }
        if let Some(session) = &e.session_id {
            self.sessions.insert((day, session.clone(), site.clone()));
            let first = self
                .firsts
                .entry((e.name.clone(), day, session.clone(), site.clone()))
                .or_insert(e.ts);
            *first = (*first).min(e.ts);
        }
        if let (Some(device), Some(seq)) = (&e.device_id, e.seq)
            && (1..=SEQ_MAX).contains(&seq)
        {
            let first = self
                .streams
                .entry((site.clone(), device.clone()))
                .or_default()
                .entry(seq)
                .or_insert(e.ts);
            *first = (*first).min(e.ts);
        }
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// What the rollup tables already hold around a stream's new seqs `lo..=hi`.
#[derive(Debug, Default, Clone, PartialEq)]
struct Around {
    /// The highest stored seq below `lo`.
    before: Option<i64>,
    /// The stored seqs in `lo..=hi` with their first `ts`.
    within: BTreeMap<i64, i64>,
    /// The lowest stored seq above `hi`, with its first `ts`.
    after: Option<(i64, i64)>,
}

impl Around {
    /// Sorts stored (seq, ts) rows of a stream into their places around `lo..=hi`.
    fn from_rows(lo: i64, hi: i64, rows: impl IntoIterator<Item = (i64, i64)>) -> Around {
        let mut a = Around::default();
        for (seq, ts) in rows {
            if seq < lo {
                a.before = a.before.max(Some(seq));
            } else if seq <= hi {
                a.within.insert(seq, ts);
            } else if a.after.is_none_or(|(s, _)| seq < s) {
                a.after = Some((seq, ts));
            }
        }
        a
    }
}

/// The seq rows to store and the gaps it moves, for one stream.
#[derive(Debug, Default, PartialEq)]
struct StreamChange {
    /// (seq, first ts) to insert, or to lower the `ts` of.
    seqs: Vec<(i64, i64)>,
    /// Gap change per day.
    gaps: BTreeMap<i64, i64>,
}

/// The gaps before each seq of an ascending list (the first counted from `base`), by day.
fn gaps_of(
    base: i64,
    list: impl IntoIterator<Item = (i64, i64)>,
    sign: i64,
    out: &mut BTreeMap<i64, i64>,
) {
    let mut prev = base;
    for (seq, ts) in list {
        let gap = (seq - prev - 1).min(GAP_CAP);
        if gap > 0 {
            *out.entry(day_of(ts)).or_default() += sign * gap;
        }
        prev = seq;
    }
}

/// How a stream's new seqs change it: only the gaps from the stored seq before the first new
/// one up to the stored seq after the last can move.
fn stream_change(new: &BTreeMap<i64, i64>, around: &Around) -> StreamChange {
    let mut change = StreamChange::default();
    let mut merged = around.within.clone();
    for (&seq, &ts) in new {
        match merged.get_mut(&seq) {
            Some(t) if *t <= ts => {}
            Some(t) => {
                *t = ts;
                change.seqs.push((seq, ts));
            }
            None => {
                merged.insert(seq, ts);
                change.seqs.push((seq, ts));
            }
        }
    }
    let base = around.before.unwrap_or(0);
    let old = around
        .within
        .iter()
        .map(|(s, t)| (*s, *t))
        .chain(around.after);
    gaps_of(base, old, -1, &mut change.gaps);
    let now = merged.iter().map(|(s, t)| (*s, *t)).chain(around.after);
    gaps_of(base, now, 1, &mut change.gaps);
    change.gaps.retain(|_, n| *n != 0);
    change
}

/// The gap changes of every stream, by (day, site), and the seq rows to store.
#[derive(Debug, Default)]
struct SeqPlan {
    seqs: Vec<(String, String, i64, i64)>,
    gaps: BTreeMap<(i64, String), i64>,
}

impl SeqPlan {
    fn add(&mut self, (site, device): &Stream, change: StreamChange) {
        for (seq, ts) in change.seqs {
            self.seqs.push((site.clone(), device.clone(), seq, ts));
        }
        for (day, n) in change.gaps {
            *self.gaps.entry((day, site.clone())).or_default() += n;
        }
    }
}

fn bounds(new: &BTreeMap<i64, i64>) -> (i64, i64) {
    let lo = new.keys().next().copied().unwrap_or(0);
    let hi = new.keys().next_back().copied().unwrap_or(0);
    (lo, hi)
}

/// Applies a batch's delta inside the SQLite write transaction.
pub(crate) fn apply_sqlite(
    tx: &rusqlite::Transaction,
    delta: &Delta,
) -> Result<(), WarehouseError> {
    if delta.is_empty() {
        return Ok(());
    }
    let mut plan = SeqPlan::default();
    {
        let mut before = tx.prepare_cached(
            "SELECT max(seq) FROM rollup_seqs WHERE site = ?1 AND device_id = ?2 AND seq < ?3",
        )?;
        let mut within = tx.prepare_cached(
            "SELECT seq, ts FROM rollup_seqs WHERE site = ?1 AND device_id = ?2 AND seq BETWEEN ?3 AND ?4",
        )?;
        let mut after = tx.prepare_cached(
            "SELECT seq, ts FROM rollup_seqs WHERE site = ?1 AND device_id = ?2 AND seq > ?3
             ORDER BY seq LIMIT 1",
        )?;
        for (stream, new) in &delta.streams {
            let (site, device) = stream;
            let (lo, hi) = bounds(new);
            let mut rows: Vec<(i64, i64)> = within
                .query_map(params![site, device, lo, hi], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?
                .collect::<Result<_, _>>()?;
            let b: Option<i64> = before.query_row(params![site, device, lo], |r| r.get(0))?;
            rows.extend(b.map(|s| (s, 0)));
            rows.extend(
                after
                    .query_row(params![site, device, hi], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?,
            );
            plan.add(stream, stream_change(new, &Around::from_rows(lo, hi, rows)));
        }
    }
    let mut st = tx.prepare_cached(
        "INSERT INTO rollup_events (name, day, source, site, events) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT DO UPDATE SET events = events + excluded.events",
    )?;
    for ((name, day, source, site), n) in &delta.events {
        st.execute(params![name, day, source, site, n])?;
    }
    let mut st = tx.prepare_cached(
        "INSERT INTO rollup_sessions (day, session_id, site) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
    )?;
    for (day, session, site) in &delta.sessions {
        st.execute(params![day, session, site])?;
    }
    let mut st = tx.prepare_cached(
        "INSERT INTO rollup_firsts (name, day, session_id, site, first_ts) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT DO UPDATE SET first_ts = min(first_ts, excluded.first_ts)",
    )?;
    for ((name, day, session, site), ts) in &delta.firsts {
        st.execute(params![name, day, session, site, ts])?;
    }
    let mut st = tx.prepare_cached(
        "INSERT INTO rollup_lags (stage, day, lag, site, events) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT DO UPDATE SET events = events + excluded.events",
    )?;
    for ((stage, day, lag, site), n) in &delta.lags {
        st.execute(params![stage, day, lag, site, n])?;
    }
    let mut st = tx.prepare_cached(
        "INSERT INTO rollup_seqs (site, device_id, seq, ts) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT DO UPDATE SET ts = min(ts, excluded.ts)",
    )?;
    for (site, device, seq, ts) in &plan.seqs {
        st.execute(params![site, device, seq, ts])?;
    }
    let mut st = tx.prepare_cached(
        "INSERT INTO rollup_seq_gaps (day, site, gaps) VALUES (?1, ?2, ?3)
         ON CONFLICT DO UPDATE SET gaps = gaps + excluded.gaps",
    )?;
    for ((day, site), n) in &plan.gaps {
        st.execute(params![day, site, n])?;
    }
    Ok(())
}

/// Applies a batch's delta inside the PostgreSQL write transaction: a few statements with
/// arrays as parameters, whatever the batch's size.
pub(crate) fn apply_postgres(
    tx: &mut postgres::Transaction,
    delta: &Delta,
) -> Result<(), WarehouseError> {
    if delta.is_empty() {
        return Ok(());
    }
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PG_LOCK])?;
    let mut plan = SeqPlan::default();
    if !delta.streams.is_empty() {
        let streams: Vec<(&Stream, &BTreeMap<i64, i64>)> = delta.streams.iter().collect();
        let sites: Vec<&str> = streams.iter().map(|((s, _), _)| s.as_str()).collect();
        let devices: Vec<&str> = streams.iter().map(|((_, d), _)| d.as_str()).collect();
        let (los, his): (Vec<i64>, Vec<i64>) = streams.iter().map(|(_, n)| bounds(n)).unzip();
        let rows = tx.query(
            "SELECT b.i, s.seq, s.ts
             FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) WITH ORDINALITY
                  AS b(site, device, lo, hi, i)
             CROSS JOIN LATERAL (
               (SELECT seq, ts FROM rollup_seqs r
                WHERE r.site = b.site AND r.device_id = b.device AND r.seq < b.lo
                ORDER BY seq DESC LIMIT 1)
               UNION ALL
               (SELECT seq, ts FROM rollup_seqs r
                WHERE r.site = b.site AND r.device_id = b.device AND r.seq BETWEEN b.lo AND b.hi)
               UNION ALL
               (SELECT seq, ts FROM rollup_seqs r
                WHERE r.site = b.site AND r.device_id = b.device AND r.seq > b.hi
                ORDER BY seq LIMIT 1)) AS s",
            &[&sites, &devices, &los, &his],
        )?;
        let mut found: Vec<Vec<(i64, i64)>> = vec![Vec::new(); streams.len()];
        for r in rows {
            let i: i64 = r.get(0);
            if let Some(list) = usize::try_from(i - 1).ok().and_then(|i| found.get_mut(i)) {
                list.push((r.get(1), r.get(2)));
            }
        }
        for (((stream, new), rows), (lo, hi)) in
            streams.into_iter().zip(found).zip(los.into_iter().zip(his))
        {
            plan.add(stream, stream_change(new, &Around::from_rows(lo, hi, rows)));
        }
    }
    let cols = columns(delta.events.iter().map(|((name, day, source, site), n)| {
        (name.as_str(), *day, source.as_str(), site.as_str(), *n)
    }));
    tx.execute(
        "INSERT INTO rollup_events (name, day, source, site, events)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[])
         ON CONFLICT (name, day, source, site) DO UPDATE SET events = rollup_events.events + excluded.events",
        &[&cols.a, &cols.b, &cols.c, &cols.d, &cols.n],
    )?;
    let (days, sessions, sites): (Vec<i64>, Vec<&str>, Vec<&str>) = unzip3(
        delta
            .sessions
            .iter()
            .map(|(d, s, site)| (*d, s.as_str(), site.as_str())),
    );
    tx.execute(
        "INSERT INTO rollup_sessions (day, session_id, site)
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[]) ON CONFLICT DO NOTHING",
        &[&days, &sessions, &sites],
    )?;
    let cols = columns(delta.firsts.iter().map(|((name, day, session, site), ts)| {
        (name.as_str(), *day, session.as_str(), site.as_str(), *ts)
    }));
    tx.execute(
        "INSERT INTO rollup_firsts (name, day, session_id, site, first_ts)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[])
         ON CONFLICT (name, day, session_id, site)
         DO UPDATE SET first_ts = least(rollup_firsts.first_ts, excluded.first_ts)",
        &[&cols.a, &cols.b, &cols.c, &cols.d, &cols.n],
    )?;
    let cols = columns(
        delta
            .lags
            .iter()
            .map(|((stage, day, lag, site), n)| (*stage, *day, *lag, site.as_str(), *n)),
    );
    tx.execute(
        "INSERT INTO rollup_lags (stage, day, lag, site, events)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[])
         ON CONFLICT (stage, day, lag, site) DO UPDATE SET events = rollup_lags.events + excluded.events",
        &[&cols.a, &cols.b, &cols.c, &cols.d, &cols.n],
    )?;
    if !plan.seqs.is_empty() {
        let cols = columns(
            plan.seqs
                .iter()
                .map(|(site, device, seq, ts)| (site.as_str(), device.as_str(), *seq, *ts, 0)),
        );
        tx.execute(
            "INSERT INTO rollup_seqs (site, device_id, seq, ts)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
             ON CONFLICT (site, device_id, seq) DO UPDATE SET ts = least(rollup_seqs.ts, excluded.ts)",
            &[&cols.a, &cols.b, &cols.c, &cols.d],
        )?;
    }
    if !plan.gaps.is_empty() {
        let (days, sites, gaps): (Vec<i64>, Vec<&str>, Vec<i64>) = unzip3(
            plan.gaps
                .iter()
                .map(|((d, site), n)| (*d, site.as_str(), *n)),
        );
        tx.execute(
            "INSERT INTO rollup_seq_gaps (day, site, gaps)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[])
             ON CONFLICT (day, site) DO UPDATE SET gaps = rollup_seq_gaps.gaps + excluded.gaps",
            &[&days, &sites, &gaps],
        )?;
    }
    Ok(())
}

/// Rows of four keys and a count as five arrays, for `unnest`.
struct Columns<A, B, C, D> {
    a: Vec<A>,
    b: Vec<B>,
    c: Vec<C>,
    d: Vec<D>,
    n: Vec<i64>,
}

fn columns<A, B, C, D>(rows: impl Iterator<Item = (A, B, C, D, i64)>) -> Columns<A, B, C, D> {
    let mut out = Columns {
        a: Vec::new(),
        b: Vec::new(),
        c: Vec::new(),
        d: Vec::new(),
        n: Vec::new(),
    };
    for (a, b, c, d, n) in rows {
        out.a.push(a);
        out.b.push(b);
        out.c.push(c);
        out.d.push(d);
        out.n.push(n);
    }
    out
}

fn unzip3<A, B, C>(it: impl Iterator<Item = (A, B, C)>) -> (Vec<A>, Vec<B>, Vec<C>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for (a, b, c) in it {
        out.0.push(a);
        out.1.push(b);
        out.2.push(c);
    }
    out
}

pub(crate) fn stored_sqlite(r: &rusqlite::Row, at: usize) -> rusqlite::Result<Stored> {
    Ok(Stored {
        site: r.get(at)?,
        name: r.get(at + 1)?,
        source: r.get(at + 2)?,
        ts: r.get(at + 3)?,
        received_at: r.get(at + 4)?,
        logged_at: r.get(at + 5)?,
        stored_at: r.get(at + 6)?,
        session_id: r.get(at + 7)?,
        device_id: r.get(at + 8)?,
        seq: r.get(at + 9)?,
    })
}

/// A row of `… RETURNING {STORED_COLUMNS}` (or a select of them from `at` on).
pub(crate) fn stored_postgres(r: &postgres::Row, at: usize) -> Stored {
    Stored {
        site: r.get(at),
        name: r.get(at + 1),
        source: r.get(at + 2),
        ts: r.get(at + 3),
        received_at: r.get(at + 4),
        logged_at: r.get(at + 5),
        stored_at: r.get(at + 6),
        session_id: r.get(at + 7),
        device_id: r.get(at + 8),
        seq: r.get(at + 9),
    }
}

/// Builds the rollups of a SQLite warehouse that has none yet (see the module docs); a
/// warehouse that has them is left as it is.
pub(crate) fn ensure_sqlite(conn: &mut rusqlite::Connection) -> Result<(), WarehouseError> {
    conn.execute_batch(&sqlite_schema())?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let built: bool = tx.query_row("SELECT count(*) > 0 FROM rollup_state", [], |r| r.get(0))?;
    if !built {
        let mut last = 0i64;
        loop {
            let mut delta = Delta::default();
            let mut read = 0;
            {
                let mut st = tx.prepare_cached(&format!(
                    "SELECT rowid, {STORED_COLUMNS} FROM events WHERE rowid > ?1 ORDER BY rowid LIMIT ?2"
                ))?;
                let mut rows = st.query(params![last, BACKFILL_CHUNK])?;
                while let Some(r) = rows.next()? {
                    last = r.get(0)?;
                    delta.add(&stored_sqlite(r, 1)?);
                    read += 1;
                }
            }
            apply_sqlite(&tx, &delta)?;
            if read < BACKFILL_CHUNK {
                break;
            }
        }
        tx.execute("INSERT INTO rollup_state (version) VALUES (1)", [])?;
    }
    tx.commit()?;
    Ok(())
}

/// Whether a SQLite warehouse opened read-only has its rollups.
pub(crate) fn sqlite_has_rollups(conn: &rusqlite::Connection) -> Result<bool, WarehouseError> {
    let has: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'rollup_state'",
        [],
        |r| r.get(0),
    )?;
    Ok(has && conn.query_row("SELECT count(*) > 0 FROM rollup_state", [], |r| r.get(0))?)
}

/// As [`ensure_sqlite`], for PostgreSQL (concurrent openers wait for the first one's build).
pub(crate) fn ensure_postgres(client: &mut postgres::Client) -> Result<(), WarehouseError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PG_LOCK])?;
    tx.batch_execute(&postgres_schema())?;
    let built: bool = tx
        .query_one("SELECT count(*) > 0 FROM rollup_state", &[])?
        .get(0);
    if !built {
        let mut last = String::new();
        loop {
            let rows = tx.query(
                &format!(
                    "SELECT id, {STORED_COLUMNS} FROM events WHERE id > $1 ORDER BY id LIMIT $2"
                ),
                &[&last, &BACKFILL_CHUNK],
            )?;
            let mut delta = Delta::default();
            for r in &rows {
                delta.add(&stored_postgres(r, 1));
            }
            if let Some(r) = rows.last() {
                last = r.get(0);
            }
            apply_postgres(&mut tx, &delta)?;
            if (rows.len() as i64) < BACKFILL_CHUNK {
                break;
            }
        }
        tx.execute("INSERT INTO rollup_state (version) VALUES (1)", &[])?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(new: &[(i64, i64)], rows: &[(i64, i64)]) -> StreamChange {
        let new: BTreeMap<i64, i64> = new.iter().copied().collect();
        let (lo, hi) = bounds(&new);
        stream_change(&new, &Around::from_rows(lo, hi, rows.iter().copied()))
    }

    const D: i64 = DAY_MS;

    #[test]
    fn a_new_stream_counts_from_one() {
        let c = change(&[(3, 0), (4, D)], &[]);
        assert_eq!(c.seqs, vec![(3, 0), (4, D)]);
        assert_eq!(c.gaps, BTreeMap::from([(0, 2)]));
    }

    #[test]
    fn filling_a_gap_moves_it_to_the_days_around_it() {
        // Stored 1 (day 0) and 5 (day 2); 3 arrives on day 1: the gap of 3 before 5 becomes
        // 1 before 3 and 1 before 5.
        let c = change(&[(3, D)], &[(1, 0), (5, 2 * D)]);
        assert_eq!(c.gaps, BTreeMap::from([(1, 1), (2, -2)]));
        // The last missing number closes the gap.
        let c = change(&[(2, 0)], &[(1, 0), (3, 0)]);
        assert_eq!(c.gaps, BTreeMap::from([(0, -1)]));
    }

    #[test]
    fn a_stored_seq_again_changes_nothing_unless_it_came_earlier() {
        let c = change(&[(2, 5)], &[(1, 0), (2, 5), (4, 9)]);
        assert_eq!(c, StreamChange::default());
        // Seen earlier (another event with the same seq, captured a day before): its gap
        // moves to that day.
        let c = change(&[(3, 0)], &[(1, 0), (3, D)]);
        assert_eq!(c.seqs, vec![(3, 0)]);
        assert_eq!(c.gaps, BTreeMap::from([(0, 1), (1, -1)]));
    }

    #[test]
    fn a_gap_counts_at_most_a_million() {
        let c = change(&[(5_000_000, 0)], &[(1, 0)]);
        assert_eq!(c.gaps, BTreeMap::from([(0, GAP_CAP)]));
    }

    #[test]
    fn lag_buckets_are_exact_below_256_ms_and_within_a_percent_above() {
        for l in -255..=255 {
            assert_eq!(lag_bucket(l), l);
        }
        assert_eq!(lag_bucket(256), 256);
        assert_eq!(lag_bucket(257), 256);
        assert_eq!(lag_bucket(258), 258);
        assert_eq!(lag_bucket(-257), -256);
        for l in [300, 1_000, 12_345, 86_400_000, 1 << 40, i64::MAX] {
            let b = lag_bucket(l);
            assert!(b <= l && (l - b) as f64 <= l as f64 * 0.008, "{l} -> {b}");
        }
        assert_eq!(lag_bucket(i64::MIN), -i64::MAX);
        // Every lag of a range lands in one of few buckets.
        let buckets: BTreeSet<i64> = (0..86_400_000).step_by(97).map(lag_bucket).collect();
        assert!(buckets.len() < 128 * 28, "{}", buckets.len());
    }

    #[test]
    fn days_are_utc() {
        assert_eq!(day_name(day_of(1_764_324_000_000)), "2025-11-28");
        assert_eq!(day_name(day_of(-1)), "1969-12-31");
        assert_eq!(day_name(i64::MAX), "1970-01-01");
    }
}
