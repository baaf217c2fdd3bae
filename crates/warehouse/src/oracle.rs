//! The proof that the rollups count what the events say: every read of the warehouse against
//! the same figure computed here, in plain Rust, from every stored event, after each of many
//! random batches (re-deliveries, seqs out of order and repeated, several sites and days),
//! on SQLite and on the real PostgreSQL of `.ci/postgres`; and a warehouse from before the
//! rollups gets the same figures when it is opened.

use std::collections::{BTreeMap, BTreeSet};

use crate::rollup::{DAY_MS, Stored, day_name, day_of};
use crate::{CountersRow, EventRow, LAG_STAGES, STORED_COLUMNS, Warehouse};

/// Every stored event.
fn all_events(w: &mut Warehouse) -> Vec<Stored> {
    let sql = format!("SELECT {STORED_COLUMNS} FROM events");
    match w {
        Warehouse::Sqlite(c) => {
            let mut st = c.prepare(&sql).unwrap();
            st.query_map([], |r| crate::rollup::stored_sqlite(r, 0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        }
        Warehouse::Postgres(c) => c
            .query(&sql, &[])
            .unwrap()
            .iter()
            .map(|r| crate::rollup::stored_postgres(r, 0))
            .collect(),
    }
}

/// What the reads must answer for `site` from `from` (a day's start).
#[derive(Debug, PartialEq)]
struct Figures {
    per_day: BTreeMap<String, BTreeMap<String, (u64, u64)>>,
    client: u64,
    seq_gaps: u64,
    seq_gaps_per_day: BTreeMap<String, u64>,
    lags: BTreeMap<String, Vec<(i64, u64)>>,
    sessions: BTreeMap<String, u64>,
    top: Vec<(String, u64)>,
    funnel: Vec<u64>,
}

const NAMES: [&str; 3] = ["page_view", "signup", "order"];
const FUNNEL: [&str; 3] = ["page_view", "signup", "order"];

fn expected(events: &[Stored], site: Option<&str>, from: i64) -> Figures {
    let mine: Vec<&Stored> = events
        .iter()
        .filter(|e| site.is_none_or(|s| e.site == s))
        .collect();
    let recent = || mine.iter().copied().filter(|e| e.ts >= from);
    let client = || recent().filter(|e| e.source == "client");
    let mut per_day: BTreeMap<String, BTreeMap<String, (u64, u64)>> = BTreeMap::new();
    for name in NAMES {
        let days = per_day.entry(name.into()).or_default();
        for e in recent().filter(|e| e.name == name) {
            let d = days.entry(day_name(day_of(e.ts))).or_default();
            if e.source == "client" {
                d.0 += 1;
            } else {
                d.1 += 1;
            }
        }
    }
    // Streams: each (site, device)'s distinct seqs with their first ts.
    let mut streams: BTreeMap<(&str, &str), BTreeMap<i64, i64>> = BTreeMap::new();
    for e in &mine {
        if let (Some(d), Some(seq)) = (&e.device_id, e.seq)
            && e.source == "client"
            && (1..=1_000_000_000).contains(&seq)
        {
            let t = streams
                .entry((&e.site, d))
                .or_default()
                .entry(seq)
                .or_insert(e.ts);
            *t = (*t).min(e.ts);
        }
    }
    let mut seq_gaps = 0;
    let mut seq_gaps_per_day: BTreeMap<String, u64> = BTreeMap::new();
    for seqs in streams.values() {
        let mut prev = 0;
        for (&seq, &ts) in seqs {
            let gap = (seq - prev - 1).min(1_000_000) as u64;
            seq_gaps += gap;
            if gap > 0 && ts >= from {
                *seq_gaps_per_day.entry(day_name(day_of(ts))).or_default() += gap;
            }
            prev = seq;
        }
    }
    let mut lags = BTreeMap::new();
    for stage in LAG_STAGES {
        let mut counts: BTreeMap<i64, u64> = BTreeMap::new();
        for e in recent() {
            let l = match stage {
                "capture_to_accepted" => Some(e.received_at - e.ts),
                "accepted_to_log" => e.logged_at.map(|l| l - e.received_at),
                "log_to_warehouse" => e.stored_at.zip(e.logged_at).map(|(s, l)| s - l),
                "accepted_to_warehouse" => e.stored_at.map(|s| s - e.received_at),
                _ => e.stored_at.map(|s| s - e.ts),
            };
            if let Some(l) = l {
                *counts.entry(crate::lag_bucket(l)).or_default() += 1;
            }
        }
        lags.insert(stage.to_string(), counts.into_iter().collect());
    }
    let mut sessions: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    let mut names: BTreeMap<&str, u64> = BTreeMap::new();
    let mut firsts: BTreeMap<(String, String), i64> = BTreeMap::new();
    for e in client() {
        *names.entry(&e.name).or_default() += 1;
        if let Some(s) = &e.session_id {
            sessions
                .entry(day_name(day_of(e.ts)))
                .or_default()
                .insert(s);
            let t = firsts.entry((s.clone(), e.name.clone())).or_insert(e.ts);
            *t = (*t).min(e.ts);
        }
    }
    let mut top: Vec<(String, u64)> = names.into_iter().map(|(n, c)| (n.into(), c)).collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(2);
    Figures {
        per_day,
        client: mine.iter().filter(|e| e.source == "client").count() as u64,
        seq_gaps,
        seq_gaps_per_day,
        lags,
        sessions: sessions
            .into_iter()
            .map(|(d, s)| (d, s.len() as u64))
            .collect(),
        top,
        funnel: {
            let mut reached = vec![0; FUNNEL.len()];
            let sessions: BTreeSet<&String> = firsts.keys().map(|(s, _)| s).collect();
            for s in sessions {
                let mut at = i64::MIN;
                for (k, step) in FUNNEL.iter().enumerate() {
                    match firsts.get(&(s.clone(), step.to_string())) {
                        Some(&t) if t >= at => {
                            reached[k] += 1;
                            at = t;
                        }
                        _ => break,
                    }
                }
            }
            reached
        },
    }
}

fn read(w: &mut Warehouse, site: Option<&str>, from: i64) -> Figures {
    let mut per_day = BTreeMap::new();
    for name in NAMES {
        per_day.insert(name.into(), w.events_per_day(name, site, from).unwrap());
    }
    let mut lags = BTreeMap::new();
    for stage in LAG_STAGES {
        lags.insert(stage.to_string(), w.lag_counts(stage, site, from).unwrap());
    }
    Figures {
        per_day,
        client: w.client_events(site).unwrap(),
        seq_gaps: w.seq_gaps(site).unwrap(),
        seq_gaps_per_day: w.seq_gaps_per_day(site, from).unwrap(),
        lags,
        sessions: w.sessions_per_day(site, from).unwrap(),
        top: w.top_events(site, from, 2).unwrap(),
        funnel: w.funnel(site, from, &FUNNEL.map(String::from)).unwrap(),
    }
}

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

/// An event's owned columns.
struct Ev {
    id: String,
    name: &'static str,
    source: &'static str,
    site: &'static str,
    ts: i64,
    received_at: i64,
    session: Option<String>,
    device: Option<String>,
    seq: Option<i64>,
    logged_at: Option<i64>,
}

impl Ev {
    fn row(&self) -> EventRow<'_> {
        EventRow {
            id: &self.id,
            name: self.name,
            schema: "event/1",
            source: self.source,
            site: self.site,
            ts: self.ts,
            received_at: self.received_at,
            anon_id: "a",
            user_id: None,
            session_id: self.session.as_deref(),
            device_id: self.device.as_deref(),
            seq: self.seq,
            props: "{}",
            context: "{}",
            logged_at: self.logged_at,
        }
    }
}

const DAY0: i64 = 20_400 * DAY_MS; // 2025-11-08

fn random_event(rng: &mut Rng, seed: u64, n: usize) -> Ev {
    let client = rng.below(5) > 0;
    let ts = DAY0 + rng.below(6) as i64 * DAY_MS + rng.below(DAY_MS as u64) as i64;
    let device = rng.below(6);
    let seq = match rng.below(20) {
        0 => 5_000_000 + rng.below(10) as i64, // a forged or far seq
        1 => 0,                                // outside every stream
        _ => 1 + rng.below(40) as i64,
    };
    Ev {
        id: format!("e{seed}-{n:06}"),
        name: NAMES[rng.below(3) as usize],
        source: if client { "client" } else { "server" },
        site: if rng.below(4) == 0 { "b" } else { "a" },
        ts,
        received_at: ts + rng.below(50) as i64 - 5,
        session: (client && rng.below(10) > 0).then(|| format!("s{}", rng.below(12))),
        device: (client && rng.below(10) > 0).then(|| format!("d{device}")),
        seq: client.then_some(seq),
        logged_at: (rng.below(2) == 0).then(|| ts + 100 + rng.below(20) as i64),
    }
}

fn check(w: &mut Warehouse) {
    let events = all_events(w);
    for site in [None, Some("a"), Some("b")] {
        for from in [0, DAY0 + 2 * DAY_MS, DAY0 + 5 * DAY_MS] {
            assert_eq!(
                read(w, site, from),
                expected(&events, site, from),
                "site {site:?} from {from}"
            );
        }
    }
}

/// Random batches, each with a share of re-delivered events; figures checked after each.
fn exercise(w: &mut Warehouse, seed: u64) {
    let mut rng = Rng(seed);
    let mut sent: Vec<Ev> = Vec::new();
    let counters = CountersRow {
        device_id: "d1",
        site: "a",
        received_at: 1,
        enqueued: 1,
        sent: 1,
        acked: 1,
        retried: 0,
        pending: 0,
        dropped: "{}",
        degraded: None,
    };
    for batch in 0..25 {
        let size = 1 + rng.below(60) as usize;
        let fresh: Vec<Ev> = (0..size)
            .map(|i| random_event(&mut rng, seed, sent.len() + i))
            .collect();
        let again: Vec<usize> = (0..rng.below(10))
            .filter(|_| !sent.is_empty())
            .map(|_| rng.below(sent.len() as u64) as usize)
            .collect();
        let mut rows: Vec<EventRow> = fresh.iter().map(Ev::row).collect();
        rows.extend(again.iter().map(|&i| sent[i].row()));
        // The same event twice in one batch too.
        if let Some(first) = fresh.first() {
            rows.push(first.row());
        }
        let new = w.write(&rows, std::slice::from_ref(&counters)).unwrap();
        assert_eq!(
            new,
            fresh.len() as u64,
            "batch {batch}: only the new ones count"
        );
        sent.extend(fresh);
        if batch % 5 == 4 {
            check(w);
        }
    }
    check(w);
}

#[test]
fn sqlite_rollups_equal_the_events() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.sqlite");
    let mut w = Warehouse::open_sqlite(&path).unwrap();
    exercise(&mut w, 7);
    // Read-only, as the dashboards read it.
    let mut r = Warehouse::open_sqlite_read_only(&path).unwrap();
    check(&mut r);
    // A warehouse from before the rollups: they are built when it is opened for writing.
    drop((w, r));
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(
        "DROP TABLE rollup_events; DROP TABLE rollup_sessions; DROP TABLE rollup_firsts;
         DROP TABLE rollup_lags; DROP TABLE rollup_seqs; DROP TABLE rollup_seq_gaps;
         DROP TABLE rollup_state;",
    )
    .unwrap();
    drop(c);
    let err = Warehouse::open_sqlite_read_only(&path).err().unwrap();
    assert!(err.to_string().contains("no daily rollups yet"), "{err}");
    let mut w = Warehouse::open_sqlite(&path).unwrap();
    check(&mut w);
    // Writing on goes on counting right; reopening builds nothing twice.
    exercise(&mut w, 8);
    drop(w);
    let mut w = Warehouse::open_sqlite(&path).unwrap();
    check(&mut w);
}

#[test]
fn postgres_rollups_equal_the_events() {
    let Ok(url) = std::env::var("TRUEUP_TEST_POSTGRES") else {
        eprintln!("TRUEUP_TEST_POSTGRES not set: skipped (.ci/run sets it)");
        return;
    };
    let (schema, mut admin, scoped) = crate::tests::pg_schema(&url, "wh_rollup");
    let mut w = Warehouse::connect_postgres(&scoped).unwrap();
    exercise(&mut w, 7);
    drop(w);
    admin
        .batch_execute(&format!(
            "DROP TABLE {schema}.rollup_events, {schema}.rollup_sessions, {schema}.rollup_firsts,
             {schema}.rollup_lags, {schema}.rollup_seqs, {schema}.rollup_seq_gaps,
             {schema}.rollup_state"
        ))
        .unwrap();
    let mut w = Warehouse::connect_postgres(&scoped).unwrap();
    check(&mut w);
    exercise(&mut w, 8);
    drop(w);
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .unwrap();
}
