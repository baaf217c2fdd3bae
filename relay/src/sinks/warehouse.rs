//! The warehouse sinks: the embedded SQLite file (`kind = "warehouse"`, the default, one file,
//! no setup) and PostgreSQL (`kind = "postgres"`). Both write the same tables through
//! `trueup-warehouse` (its docs are the contract for analysts): each delivery is one
//! transaction, `ON CONFLICT (id) DO NOTHING`, committed before the forwarder moves the
//! sink's cursor, so a re-delivery after a crash stores nothing twice. PostgreSQL takes up to
//! the sink's `concurrency` deliveries at once, each on a connection of its own (the inserts
//! are idempotent and independent, so their order does not matter); SQLite one at a time.

use std::borrow::Cow;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::value::RawValue;
use trueup_warehouse::{CountersRow, EventRow, Warehouse, WarehouseError};

use super::{Delivery, Sink, SinkError};
use crate::spool::{Record, RecordKind};

/// A warehouse sink (SQLite or PostgreSQL).
pub struct WarehouseSink {
    inner: Arc<Inner>,
}

// One per sink, behind an Arc: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Inner {
    /// SQLite has one writer: one connection, deliveries one at a time.
    Sqlite(Mutex<Warehouse>),
    /// Idle connections. A delivery takes one (or connects, so up to the sink's
    /// `concurrency` transactions run at once) and puts it back unless it broke.
    Postgres {
        url: String,
        idle: Mutex<Vec<Warehouse>>,
    },
}

/// The columns of an event, borrowed from its JSON.
#[derive(Deserialize)]
struct Event<'a> {
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
    /// Opens (or creates) the embedded warehouse file.
    pub fn open(path: &Path) -> Result<WarehouseSink, WarehouseError> {
        let db = Warehouse::open_sqlite(path)?;
        Ok(WarehouseSink {
            inner: Arc::new(Inner::Sqlite(Mutex::new(db))),
        })
    }

    /// Connects to PostgreSQL (proving the URL works) and creates the tables if missing.
    pub fn postgres(url: String) -> Result<WarehouseSink, WarehouseError> {
        let db = Warehouse::connect_postgres(&url)?;
        Ok(WarehouseSink {
            inner: Arc::new(Inner::Postgres {
                url,
                idle: Mutex::new(vec![db]),
            }),
        })
    }
}

impl Drop for WarehouseSink {
    fn drop(&mut self) {
        // The PostgreSQL client blocks when it closes; never on an async worker thread.
        if let Inner::Postgres { idle, .. } = self.inner.as_ref() {
            let conns = idle.lock().map(|mut v| std::mem::take(&mut *v));
            if let Ok(conns) = conns
                && !conns.is_empty()
            {
                std::thread::spawn(move || drop(conns));
            }
        }
    }
}

/// Stores a delivery on PostgreSQL with an idle connection or a new one.
fn write_postgres(
    url: &str,
    idle: &Mutex<Vec<Warehouse>>,
    records: &[Record],
) -> Result<Delivery, String> {
    let taken = idle.lock().map_err(|_| "warehouse pool poisoned")?.pop();
    let mut db = match taken {
        Some(Warehouse::Postgres(c)) if c.is_closed() => None,
        other => other,
    }
    .map_or_else(|| Warehouse::connect_postgres(url), Ok)
    .map_err(|e| e.to_string())?;
    let result = write(&mut db, records).map_err(|e| e.to_string());
    let broken = matches!(&db, Warehouse::Postgres(c) if c.is_closed());
    if !broken && let Ok(mut v) = idle.lock() {
        v.push(db);
    }
    result
}

fn write(db: &mut Warehouse, records: &[Record]) -> Result<Delivery, WarehouseError> {
    write_counted(db, records).map(|(d, _)| d)
}

/// Stores records in one transaction: what was refused (unreadable), and how many events
/// were new (the others were already there: duplicates absorbed).
pub(crate) fn write_counted(
    db: &mut Warehouse,
    records: &[Record],
) -> Result<(Delivery, u64), WarehouseError> {
    write_logged(db, records, |_| None)
}

/// [`write_counted`], with when the log took each record (by its position in `records`).
pub(crate) fn write_logged(
    db: &mut Warehouse,
    records: &[Record],
    logged_at: impl Fn(usize) -> Option<i64>,
) -> Result<(Delivery, u64), WarehouseError> {
    let mut delivery = Delivery::default();
    let mut parsed = Vec::with_capacity(records.len());
    let mut counters = Vec::new();
    for (i, r) in records.iter().enumerate() {
        match r.kind {
            RecordKind::Event => match serde_json::from_str::<Event>(&r.body) {
                Ok(e) => parsed.push((r, e, logged_at(i))),
                Err(err) => delivery
                    .rejected
                    .push((r.pos, format!("unreadable_event: {err}"))),
            },
            RecordKind::Counters => {
                match serde_json::from_str::<trueup_protocol::Counters>(&r.body) {
                    Ok(c) => counters.push((r, c)),
                    Err(err) => delivery
                        .rejected
                        .push((r.pos, format!("unreadable_counters: {err}"))),
                }
            }
        }
    }
    let events: Vec<EventRow> = parsed
        .iter()
        .map(|(r, e, logged_at)| EventRow {
            id: &e.id,
            name: &e.name,
            schema: &e.schema,
            source: &e.source,
            site: &r.site,
            ts: e.ts,
            received_at: r.received_at,
            anon_id: &e.anon_id,
            user_id: e.user_id.as_deref(),
            session_id: e.session_id.as_deref(),
            device_id: e.device_id.as_deref(),
            seq: e.seq.map(|s| s.min(i64::MAX as u64) as i64),
            props: e.props.map_or("{}", RawValue::get),
            context: e.context.map_or("{}", RawValue::get),
            logged_at: *logged_at,
        })
        .collect();
    let dropped: Vec<String> = counters
        .iter()
        .map(|(_, c)| serde_json::to_string(&c.dropped).unwrap_or_else(|_| "{}".into()))
        .collect();
    let counter_rows: Vec<CountersRow> = counters
        .iter()
        .zip(&dropped)
        .map(|((r, c), dropped)| CountersRow {
            device_id: &c.device_id,
            site: &r.site,
            received_at: r.received_at,
            enqueued: c.enqueued.min(i64::MAX as u64) as i64,
            sent: c.sent.min(i64::MAX as u64) as i64,
            acked: c.acked.min(i64::MAX as u64) as i64,
            retried: c.retried.min(i64::MAX as u64) as i64,
            pending: c.pending.min(i64::MAX as u64) as i64,
            dropped,
            degraded: c.degraded.as_deref(),
        })
        .collect();
    let new = db.write(&events, &counter_rows)?;
    Ok((delivery, new))
}

#[async_trait::async_trait]
impl Sink for WarehouseSink {
    async fn deliver(&self, records: Arc<Vec<Record>>) -> Result<Delivery, SinkError> {
        let inner = self.inner.clone();
        let fail = |message: String| SinkError {
            message,
            retry_after: None,
        };
        tokio::task::spawn_blocking(move || match inner.as_ref() {
            Inner::Sqlite(db) => {
                let mut db = db
                    .lock()
                    .map_err(|_| "warehouse connection poisoned".to_string())?;
                write(&mut db, &records).map_err(|e| e.to_string())
            }
            Inner::Postgres { url, idle } => write_postgres(url, idle, &records),
        })
        .await
        .map_err(|e| fail(format!("warehouse task failed: {e}")))?
        .map_err(fail)
    }
}
