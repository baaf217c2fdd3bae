//! The embedded warehouse: one SQLite file (`<data_dir>/warehouse.sqlite`), no setup.
//!
//! # Contract for analysts (stable; additions only)
//!
//! `events`, one row per event id:
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `id` | TEXT PRIMARY KEY | UUIDv7, the idempotency key |
//! | `name` | TEXT | event name |
//! | `schema` | TEXT | `"<name>/<version>"` |
//! | `source` | TEXT | `client` or `server` |
//! | `site` | TEXT | site key |
//! | `ts` | INTEGER | capture time, ms since the Unix epoch |
//! | `received_at` | INTEGER | relay receive time, ms since the Unix epoch |
//! | `anon_id`, `user_id`, `session_id`, `device_id` | TEXT | identities (nullable but `anon_id`) |
//! | `seq` | INTEGER | per-device sequence number (client events) |
//! | `props` | TEXT | properties, JSON object |
//! | `context` | TEXT | url, referrer, title, attribution, JSON object |
//!
//! `agent_counters`, the latest counters each device reported (`device_id` primary key,
//! `site`, `received_at`, `enqueued`, `sent`, `acked`, `retried`, `pending`, `dropped` as a JSON
//! object by reason, `degraded`).
//!
//! Writes are `INSERT OR IGNORE` on `id`, so a re-delivery after a crash stores nothing twice.
//! Each delivery is one transaction, committed with `synchronous = FULL` before the forwarder
//! deletes the records from the spool.

use std::borrow::Cow;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, params};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Delivery, Sink, SinkError};
use crate::spool::{Record, RecordKind};

const SCHEMA: &str = "
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
    context TEXT NOT NULL
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

/// The embedded warehouse sink.
pub struct WarehouseSink {
    conn: Arc<Mutex<Connection>>,
}

/// The columns of an event, borrowed from its JSON.
#[derive(Deserialize)]
struct EventRow<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    schema: Cow<'a, str>,
    #[serde(borrow)]
    source: Cow<'a, str>,
    ts: i64,
    #[serde(borrow)]
    anon_id: Cow<'a, str>,
    #[serde(default, borrow)]
    user_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    session_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    device_id: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    props: Option<&'a RawValue>,
    #[serde(default, borrow)]
    context: Option<&'a RawValue>,
}

impl WarehouseSink {
    /// Opens (or creates) the warehouse file.
    pub fn open(path: &Path) -> Result<WarehouseSink, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(WarehouseSink {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn write(conn: &mut Connection, records: &[Record]) -> Result<Delivery, rusqlite::Error> {
        let tx = conn.transaction()?;
        let mut delivery = Delivery::default();
        {
            let mut ev = tx.prepare_cached(
                "INSERT OR IGNORE INTO events
                 (id, name, schema, source, site, ts, received_at, anon_id, user_id, session_id, device_id, seq, props, context)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?;
            let mut counters = tx.prepare_cached(
                "INSERT INTO agent_counters
                 (device_id, site, received_at, enqueued, sent, acked, retried, pending, dropped, degraded)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (device_id) DO UPDATE SET
                   site = excluded.site, received_at = excluded.received_at, enqueued = excluded.enqueued,
                   sent = excluded.sent, acked = excluded.acked, retried = excluded.retried,
                   pending = excluded.pending, dropped = excluded.dropped, degraded = excluded.degraded
                 WHERE excluded.received_at >= agent_counters.received_at",
            )?;
            for r in records {
                match r.kind {
                    RecordKind::Event => match serde_json::from_str::<EventRow>(&r.body) {
                        Ok(e) => {
                            ev.execute(params![
                                e.id,
                                e.name,
                                e.schema,
                                e.source,
                                r.site,
                                e.ts,
                                r.received_at,
                                e.anon_id,
                                e.user_id,
                                e.session_id,
                                e.device_id,
                                e.seq.map(|s| s as i64),
                                e.props.map_or("{}", RawValue::get),
                                e.context.map_or("{}", RawValue::get),
                            ])?;
                        }
                        Err(err) => delivery
                            .rejected
                            .push((r.pos, format!("unreadable_event: {err}"))),
                    },
                    RecordKind::Counters => {
                        match serde_json::from_str::<trueup_protocol::Counters>(&r.body) {
                            Ok(c) => {
                                let dropped = serde_json::to_string(&c.dropped)
                                    .unwrap_or_else(|_| "{}".into());
                                counters.execute(params![
                                    c.device_id,
                                    r.site,
                                    r.received_at,
                                    c.enqueued as i64,
                                    c.sent as i64,
                                    c.acked as i64,
                                    c.retried as i64,
                                    c.pending as i64,
                                    dropped,
                                    c.degraded,
                                ])?;
                            }
                            Err(err) => delivery
                                .rejected
                                .push((r.pos, format!("unreadable_counters: {err}"))),
                        }
                    }
                }
            }
        }
        tx.commit()?;
        Ok(delivery)
    }
}

#[async_trait::async_trait]
impl Sink for WarehouseSink {
    async fn deliver(&self, records: Arc<Vec<Record>>) -> Result<Delivery, SinkError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().map_err(|_| SinkError {
                message: "warehouse connection poisoned".into(),
                retry_after: None,
            })?;
            WarehouseSink::write(&mut conn, &records).map_err(|e| SinkError {
                message: e.to_string(),
                retry_after: None,
            })
        })
        .await
        .map_err(|e| SinkError {
            message: format!("warehouse task failed: {e}"),
            retry_after: None,
        })?
    }
}
