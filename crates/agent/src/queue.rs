//! The durable queue and the loss counters, in IndexedDB (or in memory when IndexedDB is
//! unavailable, flagged as degraded).
//!
//! # Promise
//!
//! `enqueued = acked + dropped + pending` holds at every commit: every change to the queue
//! and the matching change to the counters happen in one IndexedDB transaction, which all
//! tabs of the site share (IndexedDB serialises overlapping read-write transactions, so two
//! tabs never hand out the same `seq`).
//!
//! # Layout (database `trueup`, version 2)
//!
//! - store `q`: key = the event id (a UUIDv7, so keys sort by capture time across tabs),
//!   value `{s: the event's JSON text, b: its size, t: its capture time}`. The text is made
//!   once, at `track()` time, and sent as is.
//! - store `kv`: `qb` (bytes queued) and `c` (the counters). The agent's identity lives in
//!   `localStorage` instead (see the crate docs): it must be readable synchronously.
//! - store `d` (auto-increment keys): counter *deltas* written by `enqueue` and
//!   `drop_uncounted`, `{n, b, r?}` = `n` events enqueued (and pending, or dropped for reason
//!   `r`), `b` bytes. The sending tab folds them into `c` and `qb` in its own transactions.
//!
//! # Why deltas
//!
//! A tab can go away right after `track()`. Chromium aborts a transaction that still waits
//! for a read when the page is torn down, so the write that persists events must not read:
//! `enqueue` issues its puts and one delta `add`, then commits in the same task. The
//! read-modify-write of the counters happens later, in the sending tab (`peek`, `settle`,
//! `maintain`), where an abort only means the work is done again. Readers add the pending
//! deltas to what is stored, so the identity holds at every commit.
//!
//! Writes issue all their requests before awaiting anything but the counters, and commit
//! explicitly, so a tab closed right after `track()` has the best chance to keep its events
//! (the page's `pagehide` beacon covers the rest).
//!
//! The queue is bounded by bytes (`max_queue_bytes`; the sending tab evicts the oldest in
//! `maintain`, counted as `queue_full`, even while offline) and by age (events older than `max_age_ms` are dropped as `expired` when
//! the sender reads them).

use std::cell::RefCell;
use std::collections::VecDeque;

use js_sys::{JsString, Object, Promise, Reflect};
use wasm_bindgen::prelude::*;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{IdbDatabase, IdbObjectStore, IdbRequest, IdbTransaction, IdbTransactionMode};

use crate::policy::expired;

/// How an event left the queue.
#[derive(Debug, Clone, PartialEq)]
pub enum Settle {
    /// The relay answered accepted or duplicate.
    Acked,
    /// Given up, with the reason counted in `dropped`.
    Dropped(&'static str),
}

/// One queued event.
#[derive(Clone)]
pub struct Entry {
    /// Its id (the queue key).
    pub id: JsString,
    /// Its JSON text, as sent.
    pub json: JsString,
    /// Its size in bytes (UTF-16 code units of the JSON, close enough for budgets).
    pub bytes: f64,
    /// Its capture time, ms since the epoch.
    pub ts: f64,
}

/// Where the queue lives.
pub enum Queue {
    /// IndexedDB: durable and shared by the site's tabs.
    Idb(IdbDatabase),
    /// Memory: lost with the page; the counters say `degraded: memory_queue`.
    Mem(RefCell<Mem>),
}

/// The memory queue.
#[derive(Default)]
pub struct Mem {
    q: VecDeque<Entry>,
    kv: Vec<(&'static str, JsValue)>,
}

impl Mem {
    fn get(&self, key: &str) -> JsValue {
        self.kv
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or(JsValue::UNDEFINED)
    }
    fn set(&mut self, key: &'static str, value: JsValue) {
        match self.kv.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.kv.push((key, value)),
        }
    }
}

/// Watches an IndexedDB request: the handlers are attached *now* (not when the future is
/// first polled), so several requests can be issued at once and awaited one after the other
/// without missing a success event. The continuation runs in a microtask of the success
/// event, while the transaction is still active, so more requests can be made in it.
pub fn done(
    req: &IdbRequest,
) -> impl std::future::Future<Output = Result<JsValue, JsValue>> + use<> {
    let promise = Promise::new(&mut |resolve, reject| {
        req.set_onsuccess(Some(&resolve));
        req.set_onerror(Some(&reject));
    });
    let req = req.clone();
    async move {
        JsFuture::from(promise).await?;
        req.result()
    }
}

/// Asks the browser to commit now rather than when the renderer is idle, so a tab that goes
/// away right after still has its transaction committed.
fn commit(tx: &IdbTransaction) {
    if let Ok(f) = Reflect::get(tx, &"commit".into()).and_then(|f| f.dyn_into::<js_sys::Function>())
    {
        let _ = f.call0(tx);
    }
}

/// Awaits a transaction's commit.
pub async fn committed(tx: &IdbTransaction) -> Result<(), JsValue> {
    let promise = Promise::new(&mut |resolve, reject| {
        tx.set_oncomplete(Some(&resolve));
        tx.set_onerror(Some(&reject));
        tx.set_onabort(Some(&reject));
    });
    JsFuture::from(promise).await.map(|_| ())
}

/// Opens (creating if needed) the database `name` (the agent uses `trueup`).
pub async fn open_idb(name: &str) -> Result<IdbDatabase, JsValue> {
    let factory = web_sys::window()
        .ok_or(JsValue::NULL)?
        .indexed_db()?
        .ok_or(JsValue::NULL)?;
    let req = factory.open_with_u32(name, 2)?;
    let upgrade = Closure::<dyn FnMut(web_sys::IdbVersionChangeEvent)>::new(
        move |ev: web_sys::IdbVersionChangeEvent| {
            let db: Option<IdbDatabase> = ev
                .target()
                .and_then(|t| t.dyn_into::<IdbRequest>().ok())
                .and_then(|r| r.result().ok())
                .and_then(|r| r.dyn_into().ok());
            if let Some(db) = db {
                // Creating a store that exists fails harmlessly (an upgrade from version 1).
                let _ = db.create_object_store("q");
                let _ = db.create_object_store("kv");
                let auto = web_sys::IdbObjectStoreParameters::new();
                auto.set_auto_increment(true);
                let _ = db.create_object_store_with_optional_parameters("d", &auto);
            }
        },
    );
    req.set_onupgradeneeded(Some(upgrade.as_ref().unchecked_ref()));
    let result = done(&req).await;
    req.set_onupgradeneeded(None);
    drop(upgrade);
    result?.dyn_into()
}

fn num(v: &JsValue) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// The loss counters: the wire contract's `trueup_protocol::Counters` (same fields, same JSON),
/// held with a small vector instead of a `BTreeMap` for the drop reasons, and converted to and
/// from JS by hand (js-sys), both to keep the wasm small. The relay parses what this produces
/// with the protocol crate (and rejects unknown fields), which the e2e tests exercise.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// The device (`<device>`, shared by its tabs).
    pub device_id: String,
    /// Events accepted by `track()`.
    pub enqueued: u64,
    /// Send attempts of events.
    pub sent: u64,
    /// Events the relay answered accepted or duplicate for.
    pub acked: u64,
    /// Events sent again after a failed attempt.
    pub retried: u64,
    /// Events still queued.
    pub pending: u64,
    /// Events given up, by reason, in first-seen order.
    pub dropped: Vec<(String, u64)>,
    /// The degraded mode, if any.
    pub degraded: Option<String>,
}

impl Counters {
    /// Adds `n` drops for `reason`.
    pub fn drop_n(&mut self, reason: &str, n: u64) {
        match self.dropped.iter_mut().find(|(r, _)| r == reason) {
            Some(slot) => slot.1 += n,
            None => self.dropped.push((reason.to_string(), n)),
        }
    }

    /// Drops for one reason.
    pub fn dropped(&self, reason: &str) -> Option<u64> {
        self.dropped
            .iter()
            .find(|(r, _)| r == reason)
            .map(|(_, n)| *n)
    }

    /// Whether `enqueued == acked + dropped + pending`.
    pub fn identity_holds(&self) -> bool {
        let dropped: u64 = self.dropped.iter().map(|(_, n)| n).sum();
        self.acked + dropped + self.pending == self.enqueued
    }

    fn slots(&mut self) -> [&mut u64; 5] {
        [
            &mut self.enqueued,
            &mut self.sent,
            &mut self.acked,
            &mut self.retried,
            &mut self.pending,
        ]
    }
}

const COUNTS: [&str; 5] = ["enqueued", "sent", "acked", "retried", "pending"];

/// Reads the counters from their stored form (absent → zero).
pub fn counters_from(v: JsValue) -> Counters {
    let mut c = Counters::default();
    if !v.is_object() {
        return c;
    }
    let field = |k: &str| Reflect::get(&v, &k.into()).unwrap_or_default();
    c.device_id = field("device_id").as_string().unwrap_or_default();
    c.degraded = field("degraded").as_string();
    for (slot, k) in c.slots().into_iter().zip(COUNTS) {
        *slot = num(&field(k)) as u64;
    }
    let dropped = field("dropped");
    if let Some(obj) = dropped.dyn_ref::<Object>() {
        for k in Object::keys(obj).iter() {
            if let Some(name) = k.as_string() {
                let n = num(&Reflect::get(obj, &k).unwrap_or_default()) as u64;
                c.drop_n(&name, n);
            }
        }
    }
    c
}

/// The counters' stored (and wire) form.
pub fn counters_to(c: &Counters) -> JsValue {
    let o = Object::new();
    let put = |k: &str, v: JsValue| drop(Reflect::set(&o, &k.into(), &v));
    put("device_id", c.device_id.as_str().into());
    let mut c2 = c.clone();
    for (slot, k) in c2.slots().into_iter().zip(COUNTS) {
        put(k, (*slot as f64).into());
    }
    let dropped = Object::new();
    for (k, n) in &c.dropped {
        let _ = Reflect::set(&dropped, &k.as_str().into(), &(*n as f64).into());
    }
    put("dropped", dropped.into());
    if let Some(d) = &c.degraded {
        put("degraded", d.as_str().into());
    }
    o.into()
}

fn entry_value(e: &Entry) -> JsValue {
    let o = Object::new();
    let _ = Reflect::set(&o, &"s".into(), &e.json);
    let _ = Reflect::set(&o, &"b".into(), &e.bytes.into());
    let _ = Reflect::set(&o, &"t".into(), &e.ts.into());
    o.into()
}

fn entry_from(key: JsValue, value: &JsValue) -> Result<Entry, JsValue> {
    Ok(Entry {
        id: key.dyn_into()?,
        json: Reflect::get(value, &"s".into())?.dyn_into()?,
        bytes: num(&Reflect::get(value, &"b".into())?),
        ts: num(&Reflect::get(value, &"t".into())?),
    })
}

fn bump(c: &mut Counters, reason: &str, n: u64) {
    c.drop_n(reason, n);
}

struct Rw {
    tx: IdbTransaction,
    q: IdbObjectStore,
    kv: IdbObjectStore,
    d: IdbObjectStore,
}

impl Rw {
    fn begin(db: &IdbDatabase) -> Result<Rw, JsValue> {
        let names = js_sys::Array::of3(&"q".into(), &"kv".into(), &"d".into());
        let tx =
            db.transaction_with_str_sequence_and_mode(&names, IdbTransactionMode::Readwrite)?;
        Ok(Rw {
            q: tx.object_store("q")?,
            kv: tx.object_store("kv")?,
            d: tx.object_store("d")?,
            tx,
        })
    }

    fn put(&self, key: &str, value: &JsValue) -> Result<(), JsValue> {
        self.kv.put_with_key(value, &key.into()).map(|_| ())
    }

    /// Reads the stored counters and bytes and takes the pending deltas into them (the deltas
    /// are cleared in this transaction; `store` writes the result back). All reads are issued
    /// at once.
    async fn totals(&self) -> Result<(Counters, f64), JsValue> {
        let (c, qb, d) = (
            self.kv.get(&"c".into())?,
            self.kv.get(&"qb".into())?,
            self.d.get_all()?,
        );
        let mut c = counters_from(done(&c).await?);
        let mut qb = num(&done(&qb).await?);
        fold(&mut c, &mut qb, &done(&d).await?);
        self.d.clear()?;
        Ok((c, qb))
    }

    fn store(&self, c: &Counters, qb: f64) -> Result<(), JsValue> {
        self.put("qb", &qb.max(0.0).into())?;
        self.put("c", &counters_to(c))
    }

    /// Evicts the oldest events while over `max_bytes`.
    async fn cap(&self, c: &mut Counters, qb: &mut f64, max_bytes: f64) -> Result<(), JsValue> {
        if *qb <= max_bytes {
            return Ok(());
        }
        let cursor_req = self.q.open_cursor()?;
        while *qb > max_bytes {
            let Ok(cursor) = done(&cursor_req)
                .await?
                .dyn_into::<web_sys::IdbCursorWithValue>()
            else {
                break;
            };
            *qb -= num(&Reflect::get(&cursor.value()?, &"b".into())?);
            cursor.delete()?;
            c.pending = c.pending.saturating_sub(1);
            bump(c, "queue_full", 1);
            cursor.continue_()?;
        }
        Ok(())
    }
}

/// A delta record: `n` events enqueued (pending, or dropped for `reason`), `bytes` queued.
fn delta(n: u64, bytes: f64, reason: Option<&str>) -> JsValue {
    let o = Object::new();
    let _ = Reflect::set(&o, &"n".into(), &(n as f64).into());
    let _ = Reflect::set(&o, &"b".into(), &bytes.into());
    if let Some(r) = reason {
        let _ = Reflect::set(&o, &"r".into(), &r.into());
    }
    o.into()
}

/// Adds delta records (an array of `delta`) to counters and bytes.
fn fold(c: &mut Counters, qb: &mut f64, deltas: &JsValue) {
    let Some(deltas) = deltas.dyn_ref::<js_sys::Array>() else {
        return;
    };
    for d in deltas.iter() {
        let n = num(&Reflect::get(&d, &"n".into()).unwrap_or_default()) as u64;
        c.enqueued += n;
        match Reflect::get(&d, &"r".into())
            .ok()
            .and_then(|r| r.as_string())
        {
            Some(reason) => bump(c, &reason, n),
            None => c.pending += n,
        }
        *qb += num(&Reflect::get(&d, &"b".into()).unwrap_or_default());
    }
}

impl Queue {
    /// Whether events survive the page.
    pub fn durable(&self) -> bool {
        matches!(self, Queue::Idb(_))
    }

    /// Appends events and evicts the oldest while over `max_bytes`.
    pub async fn enqueue(&self, events: &[Entry], max_bytes: f64) -> Result<(), JsValue> {
        let n = events.len() as u64;
        let added: f64 = events.iter().map(|e| e.bytes).sum();
        match self {
            Queue::Idb(db) => {
                // Writes only, committed in this task (see "Why deltas"); the byte cap is
                // enforced by the sending tab's `maintain`.
                let names = js_sys::Array::of2(&"q".into(), &"d".into());
                let tx = db.transaction_with_str_sequence_and_mode(
                    &names,
                    IdbTransactionMode::Readwrite,
                )?;
                let q = tx.object_store("q")?;
                for e in events {
                    q.put_with_key(&entry_value(e), &e.id)?;
                }
                tx.object_store("d")?.add(&delta(n, added, None))?;
                commit(&tx);
                committed(&tx).await
            }
            Queue::Mem(m) => {
                let mut m = m.borrow_mut();
                let mut qb = num(&m.get("qb")) + added;
                let mut c = counters_from(m.get("c"));
                m.q.extend(events.iter().cloned());
                c.enqueued += n;
                c.pending += n;
                while qb > max_bytes {
                    let Some(old) = m.q.pop_front() else { break };
                    qb -= old.bytes;
                    c.pending = c.pending.saturating_sub(1);
                    bump(&mut c, "queue_full", 1);
                }
                m.set("qb", qb.max(0.0).into());
                m.set("c", counters_to(&c));
                Ok(())
            }
        }
    }

    /// Counts events that never entered the queue (consent withheld, too large, storage
    /// failed) as enqueued and dropped at once, so the identity keeps holding.
    pub async fn drop_uncounted(&self, reason: &'static str, n: u64) -> Result<(), JsValue> {
        match self {
            Queue::Idb(db) => {
                let tx = db.transaction_with_str_and_mode("d", IdbTransactionMode::Readwrite)?;
                tx.object_store("d")?.add(&delta(n, 0.0, Some(reason)))?;
                commit(&tx);
                committed(&tx).await
            }
            Queue::Mem(_) => {
                self.update_counters(|c| {
                    c.enqueued += n;
                    bump(c, reason, n);
                })
                .await
            }
        }
    }

    /// Folds the deltas into the counters and evicts the oldest events while the queue is over
    /// `max_bytes` (the sending tab calls it after writes, online or not).
    pub async fn maintain(&self, max_bytes: f64) -> Result<(), JsValue> {
        match self {
            Queue::Idb(db) => {
                let rw = Rw::begin(db)?;
                let (mut c, mut qb) = rw.totals().await?;
                rw.cap(&mut c, &mut qb, max_bytes).await?;
                rw.store(&c, qb)?;
                commit(&rw.tx);
                committed(&rw.tx).await
            }
            // The memory queue is capped as it is written.
            Queue::Mem(_) => Ok(()),
        }
    }

    /// Applies a change to the counters in its own transaction.
    pub async fn update_counters(&self, f: impl FnOnce(&mut Counters)) -> Result<(), JsValue> {
        match self {
            Queue::Idb(db) => {
                let rw = Rw::begin(db)?;
                let (mut c, qb) = rw.totals().await?;
                f(&mut c);
                rw.store(&c, qb)?;
                commit(&rw.tx);
                committed(&rw.tx).await
            }
            Queue::Mem(m) => {
                let mut m = m.borrow_mut();
                let mut c = counters_from(m.get("c"));
                f(&mut c);
                m.set("c", counters_to(&c));
                Ok(())
            }
        }
    }

    /// The oldest events, in order, up to `max_bytes` and `max_events` (at least one, if
    /// any); events older than `max_age_ms` are dropped as `expired` on the way.
    pub async fn peek(
        &self,
        max_bytes: f64,
        max_events: usize,
        now: f64,
        max_age_ms: f64,
    ) -> Result<Vec<Entry>, JsValue> {
        let mut out: Vec<Entry> = Vec::new();
        let mut total = 0.0;
        let (mut n_expired, mut bytes_expired) = (0u64, 0.0);
        let mut take = |e: Entry, out: &mut Vec<Entry>| -> bool {
            if expired(e.ts, now, max_age_ms) {
                n_expired += 1;
                bytes_expired += e.bytes;
                return true; // drop it, go on
            }
            if out.len() >= max_events || (!out.is_empty() && total + e.bytes > max_bytes) {
                return false;
            }
            total += e.bytes;
            out.push(e);
            true
        };
        match self {
            Queue::Idb(db) => {
                // Two bulk reads (no cursor round trips) keep the sending tab's transaction
                // short, so the other tabs' writes wait as little as possible.
                let rw = Rw::begin(db)?;
                let limit = max_events.min(u32::MAX as usize) as u32;
                let keys =
                    rw.q.get_all_keys_with_key_and_limit(&JsValue::UNDEFINED, limit)?;
                let values =
                    rw.q.get_all_with_key_and_limit(&JsValue::UNDEFINED, limit)?;
                let keys: js_sys::Array = done(&keys).await?.dyn_into()?;
                let values: js_sys::Array = done(&values).await?.dyn_into()?;
                for (key, value) in keys.iter().zip(values.iter()) {
                    let e = entry_from(key.clone(), &value)?;
                    let was_expired = expired(e.ts, now, max_age_ms);
                    if !take(e, &mut out) {
                        break;
                    }
                    if was_expired {
                        rw.q.delete(&key)?;
                    }
                }
                let (mut c, mut qb) = rw.totals().await?;
                c.pending = c.pending.saturating_sub(n_expired);
                if n_expired > 0 {
                    bump(&mut c, "expired", n_expired);
                }
                qb -= bytes_expired;
                rw.store(&c, qb)?;
                commit(&rw.tx);
                committed(&rw.tx).await?;
            }
            Queue::Mem(m) => {
                let mut m = m.borrow_mut();
                let mut keep = VecDeque::with_capacity(m.q.len());
                let mut full = false;
                while let Some(e) = m.q.pop_front() {
                    if full {
                        keep.push_back(e);
                        continue;
                    }
                    let was_expired = expired(e.ts, now, max_age_ms);
                    if !was_expired {
                        keep.push_back(e.clone());
                    }
                    full = !take(e, &mut out);
                }
                m.q = keep;
                if n_expired > 0 {
                    let qb = num(&m.get("qb"));
                    let mut c = counters_from(m.get("c"));
                    c.pending = c.pending.saturating_sub(n_expired);
                    bump(&mut c, "expired", n_expired);
                    m.set("qb", (qb - bytes_expired).max(0.0).into());
                    m.set("c", counters_to(&c));
                }
            }
        }
        Ok(out)
    }

    /// Removes settled events and counts them. An event already gone (settled by another
    /// path) is not counted twice. `sent`/`retried` are added in the same transaction.
    pub async fn settle(
        &self,
        outcomes: &[(JsString, Settle)],
        sent: u64,
        retried: u64,
    ) -> Result<(), JsValue> {
        let count = |c: &mut Counters, s: &Settle| {
            c.pending = c.pending.saturating_sub(1);
            match s {
                Settle::Acked => c.acked += 1,
                Settle::Dropped(reason) => bump(c, reason, 1),
            }
        };
        match self {
            Queue::Idb(db) => {
                let rw = Rw::begin(db)?;
                // Every read issued at once: one round trip, however many events.
                let gets = outcomes
                    .iter()
                    .map(|(id, _)| rw.q.get(id).map(|r| done(&r)))
                    .collect::<Result<Vec<_>, _>>()?;
                let (mut c, mut qb) = rw.totals().await?;
                c.sent += sent;
                c.retried += retried;
                for ((id, s), get) in outcomes.iter().zip(gets) {
                    let value = get.await?;
                    if value.is_undefined() {
                        continue;
                    }
                    qb -= num(&Reflect::get(&value, &"b".into())?);
                    rw.q.delete(id)?;
                    count(&mut c, s);
                }
                rw.store(&c, qb)?;
                commit(&rw.tx);
                committed(&rw.tx).await
            }
            Queue::Mem(m) => {
                let mut m = m.borrow_mut();
                let mut qb = num(&m.get("qb"));
                let mut c = counters_from(m.get("c"));
                c.sent += sent;
                c.retried += retried;
                for (id, s) in outcomes {
                    if let Some(i) = m.q.iter().position(|e| e.id == *id)
                        && let Some(e) = m.q.remove(i)
                    {
                        qb -= e.bytes;
                        count(&mut c, s);
                    }
                }
                m.set("qb", qb.max(0.0).into());
                m.set("c", counters_to(&c));
                Ok(())
            }
        }
    }

    /// Adds events that may already be queued (rescued from localStorage after their tab went
    /// away mid-write): only those absent are added and counted. Returns how many were added.
    pub async fn adopt(&self, events: &[Entry]) -> Result<u64, JsValue> {
        match self {
            Queue::Idb(db) => {
                let rw = Rw::begin(db)?;
                let gets = events
                    .iter()
                    .map(|e| rw.q.get(&e.id).map(|r| done(&r)))
                    .collect::<Result<Vec<_>, _>>()?;
                let (mut c, mut qb) = rw.totals().await?;
                let mut added = 0;
                for (e, get) in events.iter().zip(gets) {
                    if get.await?.is_undefined() {
                        rw.q.put_with_key(&entry_value(e), &e.id)?;
                        added += 1;
                        qb += e.bytes;
                    }
                }
                c.enqueued += added;
                c.pending += added;
                rw.store(&c, qb)?;
                commit(&rw.tx);
                committed(&rw.tx).await?;
                Ok(added)
            }
            Queue::Mem(m) => {
                let fresh: Vec<Entry> = {
                    let m = m.borrow();
                    events
                        .iter()
                        .filter(|e| !m.q.iter().any(|q| q.id == e.id))
                        .cloned()
                        .collect()
                };
                self.enqueue(&fresh, f64::INFINITY).await?;
                Ok(fresh.len() as u64)
            }
        }
    }

    /// Drops everything queued with `reason` (opt-out).
    pub async fn clear(&self, reason: &'static str) -> Result<(), JsValue> {
        let all = self
            .peek(f64::INFINITY, usize::MAX, 0.0, f64::INFINITY)
            .await?;
        let outcomes: Vec<(JsString, Settle)> = all
            .into_iter()
            .map(|e| (e.id, Settle::Dropped(reason)))
            .collect();
        self.settle(&outcomes, 0, 0).await
    }

    /// The counters: what is stored plus the deltas not yet folded in.
    pub async fn counters(&self) -> Counters {
        let read = async {
            match self {
                Queue::Idb(db) => {
                    let names = js_sys::Array::of2(&"kv".into(), &"d".into());
                    let tx = db.transaction_with_str_sequence(&names)?;
                    let c = done(&tx.object_store("kv")?.get(&"c".into())?);
                    let d = done(&tx.object_store("d")?.get_all()?);
                    let mut counters = counters_from(c.await?);
                    fold(&mut counters, &mut 0.0, &d.await?);
                    Ok::<_, JsValue>(counters)
                }
                Queue::Mem(m) => Ok(counters_from(m.borrow().get("c"))),
            }
        };
        read.await.unwrap_or_default()
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    /// The hand-written JS form must keep the wire contract's field names.
    #[test]
    fn counters_fields_match_the_protocol() {
        let wire = serde_json::to_value(trueup_protocol::Counters {
            degraded: Some("x".into()),
            ..Default::default()
        })
        .unwrap();
        let mut wire_keys: Vec<&str> = wire
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut ours: Vec<&str> = super::COUNTS.to_vec();
        ours.extend(["device_id", "dropped", "degraded"]);
        wire_keys.sort_unstable();
        ours.sort_unstable();
        assert_eq!(wire_keys, ours);
    }
}
