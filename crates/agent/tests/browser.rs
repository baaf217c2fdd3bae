//! The agent in a real browser (headless Chromium via wasm-bindgen-test): the queue
//! (`js/queue.js`, real IndexedDB, with every count taken by the core's `Totals`) — byte cap
//! and eviction, expiry by age, batches, settling, deltas, and the counter identity
//! `enqueued = acked + dropped + pending` after every step, for the IndexedDB queue and for the
//! memory queue used when IndexedDB is unavailable — and the core's decisions: the relay's
//! answers and the retry policy, stamping and writing events, consent, beacons, attribution.
//!
//! Run: `CHROMEDRIVER=/usr/bin/chromedriver cargo test -p trueup-agent --target wasm32-unknown-unknown`
#![cfg(target_arch = "wasm32")]

use js_sys::{Array, Object, Promise, Reflect};
use trueup_agent::counters::{Counters, delta};
use trueup_agent::{Core, Host};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

#[wasm_bindgen(module = "/js/queue.js")]
extern "C" {
    type Queue;
    #[wasm_bindgen(js_name = openIdb)]
    fn open_idb(name: &str) -> Promise;
    fn queue(db: &JsValue) -> Queue;
    #[wasm_bindgen(method)]
    fn write(this: &Queue, records: &Array, deltas: &Array) -> Promise;
    #[wasm_bindgen(method)]
    fn counters(this: &Queue, acc: &JsValue) -> Promise;
    #[wasm_bindgen(method)]
    fn peek(this: &Queue, acc: &JsValue) -> Promise;
    #[wasm_bindgen(method)]
    fn settle(
        this: &Queue,
        acc: &JsValue,
        ids: &Array,
        outcomes: &Array,
        sent: f64,
        retried: f64,
    ) -> Promise;
    #[wasm_bindgen(method)]
    fn maintain(this: &Queue, acc: &JsValue, max: f64) -> Promise;
    /// `maintain` with the ids of the batch in flight, which eviction spares.
    #[wasm_bindgen(method, js_name = maintain)]
    fn maintain_busy(this: &Queue, acc: &JsValue, max: f64, busy: &Array) -> Promise;
    #[wasm_bindgen(method)]
    fn clear(this: &Queue, acc: &JsValue, reason: &str) -> Promise;
    #[wasm_bindgen(method)]
    fn adopt(this: &Queue, acc: &JsValue, records: &Array) -> Promise;
    #[wasm_bindgen(method, js_name = adopt)]
    fn adopt_with(this: &Queue, acc: &JsValue, records: &Array, deltas: &Array) -> Promise;
    #[wasm_bindgen(method, catch, js_name = write)]
    fn try_write(this: &Queue, records: &Array, deltas: &Array) -> Result<Promise, JsValue>;
    #[wasm_bindgen(js_name = openIdb)]
    fn open_idb_lost(name: &str, lost: &js_sys::Function) -> Promise;
}

#[wasm_bindgen(inline_js = "
export function recordBeacons(h, accept) {
  h.beacons = [];
  h.beacon = (records) => accept-- > 0 && (h.beacons.push(records.map((r) => JSON.parse(r.s).name)), true);
}
export function storageSet(k, v) { localStorage.setItem(k, v); }
export function sessionGet(k) { return sessionStorage.getItem(k); }
export function sessionSet(k, v) { sessionStorage.setItem(k, v); }
export function clearStorage() {
  localStorage.clear();
  sessionStorage.clear();
}
export function openAt(name, version) {
  return new Promise((ok, ko) => {
    const r = indexedDB.open(name, version);
    r.onsuccess = () => ok(r.result);
    r.onerror = () => ko(r.error);
    r.onblocked = () => setTimeout(() => ko(new Error('blocked')), 2000);
  });
}
export function settleWithin(p, ms) {
  return Promise.race([p.then(() => 'resolved', () => 'rejected'), new Promise((r) => setTimeout(() => r('pending'), ms))]);
}
export function closeDb(db) { db.close(); }
export function lostCounter() { return () => (globalThis.lostCalls = (globalThis.lostCalls || 0) + 1); }
export function takeRescue(stream) {
  return JSON.parse(localStorage.getItem('trueup.rescue.' + sessionStorage.getItem('trueup.tab')) || '[]');
}")]
extern "C" {
    /// Makes `host` record (by event name) the beacons it accepts, up to `accept` of them.
    #[wasm_bindgen(js_name = recordBeacons)]
    fn record_beacons(host: &JsValue, accept: u32);
    /// A device that never chose anything (tests share one page and its storage).
    #[wasm_bindgen(js_name = clearStorage)]
    fn clear_storage();
    /// Sets item `k` of localStorage.
    #[wasm_bindgen(js_name = storageSet)]
    fn storage_set(k: &str, v: &str);
    /// Item `k` of sessionStorage.
    #[wasm_bindgen(js_name = sessionGet)]
    fn session_get(k: &str) -> Option<String>;
    /// Sets item `k` of sessionStorage.
    #[wasm_bindgen(js_name = sessionSet)]
    fn session_set(k: &str, v: &str);
    /// Opens database `name` at `version` with no handlers (another tab's connection); rejects
    /// when blocked for 2 s.
    #[wasm_bindgen(js_name = openAt)]
    fn open_at(name: &str, version: u32) -> Promise;
    /// "resolved", "rejected", or "pending" when `p` has not settled within `ms`.
    #[wasm_bindgen(js_name = settleWithin)]
    fn settle_within(p: &Promise, ms: u32) -> Promise;
    #[wasm_bindgen(js_name = closeDb)]
    fn close_db(db: &JsValue);
    /// A function counting its calls in `globalThis.lostCalls`.
    #[wasm_bindgen(js_name = lostCounter)]
    fn lost_counter() -> js_sys::Function;
    /// This tab's rescue list (`Core::rescue`), as records.
    #[wasm_bindgen(js_name = takeRescue)]
    fn take_rescue() -> Array;
}

#[wasm_bindgen(module = "/js/host.js")]
extern "C" {
    fn host(o: &JsValue) -> Host;
    /// The v1 batch body of `records` with the site and counters (what `fetch` sends).
    fn body(site: &str, records: &JsValue, counters: &JsValue) -> String;
}

async fn wait(p: Promise) -> JsValue {
    JsFuture::from(p).await.expect("the promise resolves")
}

fn field(v: &JsValue, path: &[&str]) -> JsValue {
    let mut cur = v.clone();
    for k in path {
        cur = Reflect::get(&cur, &(*k).into()).unwrap_or_default();
    }
    cur
}

fn text(v: &JsValue, path: &[&str]) -> Option<String> {
    field(v, path).as_string()
}

/// Options as js/core.js resolves them (what the tests do not set does not matter to them).
fn options(set: &[(&str, f64)]) -> JsValue {
    let o: JsValue = Object::new().into();
    for (k, v) in [
        ("maxEventBytes", 32_000.0),
        ("sessionTimeoutMs", 1_800_000.0),
        ("maxAgeMs", 1e15),
        ("batchBytes", 60_000.0),
        ("maxBatchEvents", 200.0),
        ("flushIntervalMs", 1_000.0),
        ("retryBaseMs", 1_000.0),
        ("retryCapMs", 300_000.0),
    ]
    .iter()
    .chain(set)
    {
        Reflect::set(&o, &(*k).into(), &(*v).into()).unwrap();
    }
    Reflect::set(&o, &"endpoint".into(), &"/_r/q".into()).unwrap();
    o
}

fn core_with(set: &[(&str, f64)]) -> Core {
    clear_storage();
    let o = options(set);
    Core::new(
        &o,
        host(&o),
        &"https://shop.example/".into(),
        &"".into(),
        false,
    )
}

/// A core as the queue's accounting (`acc` in js/queue.js).
fn acc(set: &[(&str, f64)]) -> JsValue {
    core_with(set).into()
}

fn now() -> f64 {
    js_sys::Date::now()
}

/// A queued event record `{i, s, b, t}` (`Host::event`'s form).
fn record(i: u32, ts: f64, bytes: f64) -> JsValue {
    let r: JsValue = Object::new().into();
    let id = String::from("0190000000-") + &(100 + i).to_string();
    for (k, v) in [
        ("i", JsValue::from(id)),
        ("s", "{\"x\":1}".into()),
        ("b", bytes.into()),
        ("t", ts.into()),
    ] {
        Reflect::set(&r, &k.into(), &v).unwrap();
    }
    r
}

fn records(list: &[JsValue]) -> Array {
    list.iter().collect()
}

/// Writes events as the core's `take` does: the records and one delta `{n, b}`.
async fn enqueue(q: &Queue, list: &[JsValue]) {
    let bytes: f64 = list
        .iter()
        .map(|r| field(r, &["b"]).as_f64().unwrap())
        .sum();
    let deltas = Array::of1(&delta(list.len() as f64, bytes, &JsValue::UNDEFINED));
    wait(q.write(&records(list), &deltas)).await;
}

async fn counters(q: &Queue) -> Counters {
    let c = Counters::from_js(&wait(q.counters(&acc(&[]))).await);
    let dropped: Vec<String> = c
        .dropped
        .iter()
        .map(|(r, n)| r.as_string().unwrap() + "=" + &n.to_string())
        .collect();
    assert!(
        c.identity_holds(),
        "enqueued {} != acked {} + dropped {:?} + pending {}",
        c.enqueued,
        c.acked,
        dropped,
        c.pending
    );
    c
}

async fn peek_ids(q: &Queue, acc: &JsValue) -> Vec<String> {
    let batch: Array = wait(q.peek(acc)).await.unchecked_into();
    batch.iter().map(|r| text(&r, &["i"]).unwrap()).collect()
}

fn ids_of(list: &[JsValue]) -> Vec<String> {
    list.iter().map(|r| text(r, &["i"]).unwrap()).collect()
}

async fn queues(name: &str) -> Vec<Queue> {
    let db = wait(open_idb(name)).await;
    vec![queue(&db), queue(&JsValue::UNDEFINED)]
}

#[wasm_bindgen_test]
async fn byte_cap_evicts_the_oldest_and_counts_it() {
    for q in queues("t-cap").await {
        let t = now();
        let batch: Vec<JsValue> = (0..10)
            .map(|i| record(i, t + f64::from(i), 100.0))
            .collect();
        enqueue(&q, &batch[..6]).await;
        enqueue(&q, &batch[6..]).await;
        // The writes only write; the sending tab's maintenance enforces the cap.
        wait(q.maintain(&acc(&[]), 550.0)).await;
        let c = counters(&q).await;
        assert_eq!((c.enqueued, c.pending), (10.0, 5.0));
        assert_eq!(c.dropped("queue_full"), 5.0);
        assert_eq!(
            peek_ids(&q, &acc(&[])).await,
            ids_of(&batch[5..]),
            "the newest stay, in order"
        );
    }
}

#[wasm_bindgen_test]
async fn eviction_spares_the_batch_in_flight() {
    for q in queues("t-cap-busy").await {
        let t = now();
        let batch: Vec<JsValue> = (0..10)
            .map(|i| record(i, t + f64::from(i), 100.0))
            .collect();
        enqueue(&q, &batch).await;
        // The three oldest are being sent (the relay may be storing them): the next oldest go.
        let busy: Array = ids_of(&batch[..3]).into_iter().map(JsValue::from).collect();
        wait(q.maintain_busy(&acc(&[]), 550.0, &busy)).await;
        let c = counters(&q).await;
        assert_eq!((c.pending, c.dropped("queue_full")), (5.0, 5.0));
        let mut kept = ids_of(&batch[..3]);
        kept.extend(ids_of(&batch[8..]));
        assert_eq!(peek_ids(&q, &acc(&[])).await, kept);
    }
}

#[wasm_bindgen_test]
async fn old_events_expire_and_are_counted() {
    for q in queues("t-expiry").await {
        let t = now();
        let batch = [
            record(1, t - 5_000.0, 10.0),
            record(2, t - 4_000.0, 10.0),
            record(3, t - 500.0, 10.0),
        ];
        enqueue(&q, &batch).await;
        let out = peek_ids(&q, &acc(&[("maxAgeMs", 3_000.0)])).await;
        assert_eq!(out, ids_of(&batch[2..]));
        let c = counters(&q).await;
        assert_eq!(c.dropped("expired"), 2.0);
        assert_eq!(c.pending, 1.0);
        // Expired events left the queue: they are not counted again.
        peek_ids(&q, &acc(&[("maxAgeMs", 3_000.0)])).await;
        assert_eq!(counters(&q).await.dropped("expired"), 2.0);
    }
}

#[wasm_bindgen_test]
async fn batches_respect_bytes_and_count_but_take_at_least_one() {
    for q in queues("t-peek").await {
        let batch: Vec<JsValue> = (0..5).map(|i| record(i, now(), 400.0)).collect();
        enqueue(&q, &batch).await;
        // The batch budget is batchBytes - 1000 (room for the envelope).
        let by_bytes = acc(&[("batchBytes", 2_000.0)]);
        assert_eq!(peek_ids(&q, &by_bytes).await.len(), 2);
        assert_eq!(
            peek_ids(&q, &acc(&[("maxBatchEvents", 3.0)])).await.len(),
            3
        );
        assert_eq!(
            peek_ids(&q, &acc(&[("batchBytes", 1_010.0)])).await.len(),
            1,
            "an oversized event still goes alone"
        );
    }
}

#[wasm_bindgen_test]
async fn settling_counts_once_and_keeps_the_identity() {
    for q in queues("t-settle").await {
        let batch: Vec<JsValue> = (0..4).map(|i| record(i, now(), 10.0)).collect();
        enqueue(&q, &batch).await;
        let ids: Array = ids_of(&batch[..2]).into_iter().map(JsValue::from).collect();
        let outcomes = Array::of2(&JsValue::TRUE, &"rejected".into());
        wait(q.settle(&acc(&[]), &ids, &outcomes, 4.0, 0.0)).await;
        // The same answer again (a second sender, a replayed response): nothing moves.
        wait(q.settle(&acc(&[]), &ids, &outcomes, 0.0, 0.0)).await;
        let c = counters(&q).await;
        assert_eq!(
            (c.enqueued, c.acked, c.pending, c.sent),
            (4.0, 1.0, 2.0, 4.0)
        );
        assert_eq!(c.dropped("rejected"), 1.0);
        // No outcome for an event: it stays queued (a retry).
        let keep = Array::of2(&JsValue::UNDEFINED, &JsValue::UNDEFINED);
        wait(q.settle(&acc(&[]), &ids, &keep, 2.0, 2.0)).await;
        let c = counters(&q).await;
        assert_eq!((c.pending, c.sent, c.retried), (2.0, 6.0, 2.0));
        wait(q.clear(&acc(&[]), "consent")).await;
        let c = counters(&q).await;
        assert_eq!((c.pending, c.dropped("consent")), (0.0, 2.0));
        // Events that never entered the queue: a delta with a reason.
        let drop = Array::of1(&delta(3.0, 0.0, &"too_large".into()));
        wait(q.write(&Array::new(), &drop)).await;
        let c = counters(&q).await;
        assert_eq!((c.enqueued, c.dropped("too_large")), (7.0, 3.0));
    }
}

#[wasm_bindgen_test]
async fn counters_include_deltas_not_yet_folded() {
    let q = queue(&wait(open_idb("t-deltas")).await);
    enqueue(&q, &[record(1, now(), 10.0), record(2, now(), 10.0)]).await;
    let drop = Array::of1(&delta(1.0, 0.0, &"too_large".into()));
    wait(q.write(&Array::new(), &drop)).await;
    // Nothing folded yet: the reader adds the deltas.
    let c = counters(&q).await;
    assert_eq!(
        (c.enqueued, c.pending, c.dropped("too_large")),
        (3.0, 2.0, 1.0)
    );
    // Folding changes nothing visible, and is idempotent.
    wait(q.maintain(&acc(&[]), 1e9)).await;
    wait(q.maintain(&acc(&[]), 1e9)).await;
    let again = counters(&q).await;
    assert_eq!(
        (again.enqueued, again.pending, again.dropped("too_large")),
        (3.0, 2.0, 1.0)
    );
}

#[wasm_bindgen_test]
async fn the_idb_queue_is_shared_across_connections() {
    // Two connections stand for two tabs of the same site.
    let a = queue(&wait(open_idb("t-shared")).await);
    let b = queue(&wait(open_idb("t-shared")).await);
    enqueue(&a, &[record(1, now(), 10.0)]).await;
    enqueue(&b, &[record(2, now(), 10.0)]).await;
    assert_eq!(peek_ids(&a, &acc(&[])).await.len(), 2);
    let c = counters(&b).await;
    assert_eq!((c.enqueued, c.pending), (2.0, 2.0));
}

#[wasm_bindgen_test]
async fn rescued_events_are_adopted_once() {
    let q = queue(&wait(open_idb("t-adopt")).await);
    let queued = record(1, now(), 10.0);
    enqueue(&q, std::slice::from_ref(&queued)).await;
    // A tab rescued both: one it had committed after all, one it had not.
    let rescued = records(&[queued, record(2, now(), 20.0)]);
    wait(q.adopt(&acc(&[]), &rescued)).await;
    wait(q.adopt(&acc(&[]), &rescued)).await;
    let c = counters(&q).await;
    assert_eq!((c.enqueued, c.pending), (2.0, 2.0));
    assert_eq!(peek_ids(&q, &acc(&[])).await.len(), 2);
}

fn ctx(id: &str) -> JsValue {
    let c: JsValue = Object::new().into();
    for (k, v) in [
        ("id", JsValue::from(id)),
        ("ts", now().into()),
        ("url", "https://shop.example/p/1".into()),
        ("referrer", "".into()),
        ("title", "Shop".into()),
    ] {
        Reflect::set(&c, &k.into(), &v).unwrap();
    }
    c
}

fn props(k: &str, v: &str) -> JsValue {
    let p: JsValue = Object::new().into();
    Reflect::set(&p, &k.into(), &v.into()).unwrap();
    p
}

fn json(record: &JsValue) -> JsValue {
    js_sys::JSON::parse(&text(record, &["s"]).unwrap()).unwrap()
}

#[wasm_bindgen_test]
fn events_are_stamped_then_written_once_per_task() {
    let mut core = core_with(&[("maxEventBytes", 2_000.0)]);
    core.track("a".into(), props("k", "v"), &ctx("id-a"));
    core.page(JsValue::UNDEFINED, &ctx("id-b"));
    core.identify("u-1".into(), props("plan", "pro"), &ctx("id-c"));
    core.track(5.into(), JsValue::UNDEFINED, &ctx("id-x")); // not a name: ignored
    assert!(
        core.take().is_undefined(),
        "nothing is written before the queue is open"
    );
    core.opened(false);
    let w: Array = core.take().unchecked_into();
    let records: Array = w.get(1).unchecked_into();
    let events: Vec<JsValue> = records.iter().map(|r| json(&r)).collect();
    let names: Vec<String> = events.iter().map(|e| text(e, &["name"]).unwrap()).collect();
    assert_eq!(names, ["a", "page_view", "identify"]);
    let seqs: Vec<f64> = events
        .iter()
        .map(|e| field(e, &["seq"]).as_f64().unwrap())
        .collect();
    assert_eq!(seqs[1] - seqs[0], 1.0);
    assert_eq!(seqs[2] - seqs[1], 1.0);
    assert_eq!(text(&events[0], &["schema"]).as_deref(), Some("event/1"));
    assert_eq!(text(&events[0], &["props", "k"]).as_deref(), Some("v"));
    assert_eq!(text(&events[0], &["source"]).as_deref(), Some("client"));
    assert_eq!(
        text(&events[0], &["context", "title"]).as_deref(),
        Some("Shop")
    );
    assert!(field(&events[0], &["context", "referrer"]).is_undefined());
    assert!(field(&events[0], &["user_id"]).is_undefined());
    assert_eq!(text(&events[2], &["user_id"]).as_deref(), Some("u-1"));
    assert_eq!(
        text(&events[2], &["props", "traits", "plan"]).as_deref(),
        Some("pro")
    );
    let device = text(&events[0], &["device_id"]).unwrap();
    assert_eq!(device.matches('.').count(), 1, "<device>.<tab>: {device}");
    let deltas: Array = w.get(2).unchecked_into();
    assert_eq!(deltas.length(), 1);
    assert_eq!(field(&deltas.get(0), &["n"]).as_f64(), Some(3.0));
    assert!(core.take().is_undefined(), "each event is written once");
    // Too large: counted with the next write, never queued.
    core.track("big".into(), props("pad", &"x".repeat(3_000)), &ctx("id-d"));
    let w: Array = core.take().unchecked_into();
    assert_eq!(Array::from(&w.get(1)).length(), 0);
    let d = Array::from(&w.get(2)).get(0);
    assert_eq!(text(&d, &["r"]).as_deref(), Some("too_large"));
    // A failed write is counted as storage_unavailable with the next one.
    core.track("e".into(), JsValue::UNDEFINED, &ctx("id-e"));
    let w: Array = core.take().unchecked_into();
    core.written(w.get(0).as_f64().unwrap() as u32, false);
    let w: Array = core.take().unchecked_into();
    let d = Array::from(&w.get(2)).get(0);
    assert_eq!(text(&d, &["r"]).as_deref(), Some("storage_unavailable"));
    assert_eq!(field(&d, &["n"]).as_f64(), Some(1.0));
}

#[wasm_bindgen_test]
fn consent_pending_holds_then_grant_writes_and_refusal_counts() {
    let mut core = pending_core(true);
    core.track("held".into(), JsValue::UNDEFINED, &ctx("id-h"));
    assert!(core.take().is_undefined(), "nothing written while pending");
    let stats = core.stats(&JsValue::UNDEFINED);
    assert_eq!(field(&stats, &["enqueued"]).as_f64(), Some(0.0));
    assert!(core.consent(true).is_undefined());
    let w: Array = core.take().unchecked_into();
    assert_eq!(
        Array::from(&w.get(1)).length(),
        1,
        "the held event is written"
    );
    core.track("later".into(), JsValue::UNDEFINED, &ctx("id-l"));
    // Opt-out: the queue is to be emptied with reason consent; later events are counted only.
    let reason = core.consent(false);
    assert_eq!(reason.as_string().as_deref(), Some("consent"));
    core.track("after".into(), JsValue::UNDEFINED, &ctx("id-z"));
    // "later" was not written: the next write counts it, and writes nothing more.
    let w: Array = core.take().unchecked_into();
    assert_eq!(Array::from(&w.get(1)).length(), 0);
    let d = Array::from(&w.get(2)).get(0);
    assert_eq!(text(&d, &["r"]).as_deref(), Some("consent"));
    core.written(w.get(0).as_f64().unwrap() as u32, true);
    assert!(core.take().is_undefined(), "nothing more is written");
    let stats = core.stats(&JsValue::UNDEFINED);
    assert_eq!(field(&stats, &["dropped", "consent"]).as_f64(), Some(1.0));
}

/// A pending core of a fresh device (consent "pending", nothing stored), its queue open or not
/// (js/core.js opens it once consent is given).
fn pending_core(open: bool) -> Core {
    let o = options(&[]);
    Reflect::set(&o, &"consent".into(), &"pending".into()).unwrap();
    clear_storage();
    let mut core = Core::new(
        &o,
        host(&o),
        &"https://shop.example/".into(),
        &"".into(),
        false,
    );
    if open {
        core.opened(false);
    }
    core
}

#[wasm_bindgen_test]
fn the_pending_hold_is_bounded_by_count_and_bytes_and_counts_its_drops_at_grant() {
    // Count: 1,000 held; the 5 oldest are dropped, counted once consent is given.
    let mut core = pending_core(true);
    for i in 0..1_005 {
        core.track("held".into(), JsValue::UNDEFINED, &ctx(&nth_id("c", i)));
    }
    assert!(core.take().is_undefined(), "nothing written while pending");
    assert_eq!(
        field(&core.stats(&JsValue::UNDEFINED), &["enqueued"]).as_f64(),
        Some(0.0),
        "nothing counted before consent"
    );
    assert!(core.consent(true).is_undefined());
    let w: Array = core.take().unchecked_into();
    let written = Array::from(&w.get(1));
    assert_eq!(written.length(), 1_000);
    assert_eq!(
        text(&written.get(0), &["i"]).as_deref(),
        Some(nth_id("c", 5).as_str()),
        "the oldest went first"
    );
    let drops: Vec<(Option<String>, Option<f64>)> = Array::from(&w.get(2))
        .iter()
        .map(|d| (text(&d, &["r"]), field(&d, &["n"]).as_f64()))
        .collect();
    assert!(
        drops.contains(&(Some("queue_full".into()), Some(5.0))),
        "{drops:?}"
    );
    // Bytes: 1 MB; 300 events of ~10 KB each keep ~100.
    let mut core = pending_core(true);
    let pad = "x".repeat(10_000);
    for i in 0..300 {
        core.track("big".into(), props("pad", &pad), &ctx(&nth_id("b", i)));
    }
    core.consent(true);
    let w: Array = core.take().unchecked_into();
    let kept = Array::from(&w.get(1)).length();
    assert!((95..=100).contains(&kept), "{kept} kept");
    let dropped: f64 = Array::from(&w.get(2))
        .iter()
        .filter(|d| text(d, &["r"]).as_deref() == Some("queue_full"))
        .map(|d| field(&d, &["n"]).as_f64().unwrap())
        .sum();
    assert_eq!(f64::from(kept) + dropped, 300.0);
    // Refused instead (the queue never opened): everything the hold saw counts as dropped for
    // consent, and nothing is stored.
    let mut core = pending_core(false);
    for i in 0..1_005 {
        core.track("held".into(), JsValue::UNDEFINED, &ctx(&nth_id("d", i)));
    }
    core.consent(false);
    let stats = core.stats(&JsValue::UNDEFINED);
    assert_eq!(
        field(&stats, &["dropped", "consent"]).as_f64(),
        Some(1_005.0)
    );
}

fn nth_id(prefix: &str, i: u32) -> String {
    format!("{prefix}-{i:05}")
}

#[wasm_bindgen_test]
fn answers_follow_the_retry_policy() {
    let mut core = core_with(&[("retryBaseMs", 60_000.0), ("flushIntervalMs", 60_000.0)]);
    let ids: Array = ["a", "b", "c"].iter().map(|s| JsValue::from(*s)).collect();
    let answer = |statuses: &[&str]| -> JsValue {
        let results: Array = statuses.iter().map(|s| props("status", s)).collect();
        let a: JsValue = Object::new().into();
        Reflect::set(&a, &"results".into(), &results).unwrap();
        a
    };
    let outcomes = |r: &Array| -> Vec<String> {
        Array::from(&r.get(0))
            .iter()
            .map(|o| {
                o.as_string()
                    .unwrap_or_else(|| o.as_bool().unwrap().to_string())
            })
            .collect()
    };
    // 200: per event.
    let r = core.answered(
        &ids,
        Some(200),
        f64::NAN,
        &answer(&["accepted", "duplicate", "rejected"]),
        true,
    );
    assert_eq!(outcomes(&r), ["true", "true", "rejected"]);
    assert_eq!(
        (r.get(1).as_f64(), r.get(2).as_bool()),
        (Some(0.0), Some(true)),
        "a full batch: the next one goes now"
    );
    // A batch that was not full: the rest waits for the flush interval.
    core.wake(1);
    core.sending(&ids);
    let r = core.answered(&ids, Some(200), f64::NAN, &answer(&["accepted"; 3]), false);
    assert_eq!(r.get(2).as_bool(), Some(false));
    assert!(!core.due(), "not due before the flush interval");
    core.wake(0);
    assert!(!core.due(), "a write waits for the interval too");
    core.wake(1);
    assert!(core.due(), "a flush is due at once");
    // An answer that does not match the batch settles nothing, and backs off.
    let r = core.answered(&ids, Some(200), 30.0, &answer(&["accepted"]), false);
    assert!(outcomes(&r).is_empty());
    assert_eq!(r.get(2).as_bool(), Some(false));
    core.wake(1);
    assert!(!core.due(), "backing off");
    // A network error or a 503: retried (and counted as retried next time).
    let r = core.answered(&ids, None, f64::NAN, &JsValue::UNDEFINED, false);
    assert!(outcomes(&r).is_empty());
    assert_eq!(r.get(1).as_f64(), Some(3.0), "sent again after a failure");
    core.answered(&ids, Some(503), f64::NAN, &JsValue::UNDEFINED, false);
    // Back online: no backoff (of this tab's own; the relay's wait holds: below).
    core.wake(2);
    core.wake(1);
    assert!(core.due());
    // Other 4xx: dropped as rejected.
    let r = core.answered(&ids, Some(400), f64::NAN, &JsValue::UNDEFINED, false);
    assert_eq!(outcomes(&r), ["rejected", "rejected", "rejected"]);
    // 413: halve the batch; one event alone: too_large.
    assert_eq!(core.limit(), 200.0);
    let r = core.answered(&ids, Some(413), f64::NAN, &JsValue::UNDEFINED, false);
    assert!(outcomes(&r).is_empty());
    assert_eq!((r.get(2).as_bool(), core.limit()), (Some(true), 1.0));
    let one = Array::of1(&"a".into());
    let r = core.answered(&one, Some(413), f64::NAN, &JsValue::UNDEFINED, false);
    assert_eq!(outcomes(&r), ["too_large"]);
    assert_eq!(core.limit(), 2.0, "doubles back after a success");
}

#[wasm_bindgen_test]
fn beacons_go_unsaved_first_under_the_budget_until_refused() {
    let o = options(&[("batchBytes", 1_000.0 + 600.0)]);
    clear_storage();
    let h = host(&o);
    record_beacons(&h, 2);
    let beacons = Reflect::get(&h, &"beacons".into()).unwrap();
    let mut core = Core::new(&o, h, &"https://shop.example/".into(), &"".into(), false);
    core.opened(false);
    let pad = "x".repeat(150);
    for (i, name) in ["p1", "p2", "p3"].iter().enumerate() {
        core.track(
            (*name).into(),
            props("pad", &pad),
            &ctx(&(String::from("p") + &i.to_string())),
        );
    }
    let w: Array = core.take().unchecked_into();
    core.written(w.get(0).as_f64().unwrap() as u32, true);
    for (i, name) in ["u1", "u2"].iter().enumerate() {
        core.track(
            (*name).into(),
            props("pad", &pad),
            &ctx(&(String::from("u") + &i.to_string())),
        );
    }
    core.beacon(false, true);
    // Budget 600 bytes: two events of ~400 do not fit together. The browser accepts two.
    let sent: Vec<Vec<String>> = Array::from(&beacons)
        .iter()
        .map(|b| {
            Array::from(&b)
                .iter()
                .map(|n| n.as_string().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(sent, [vec!["u1"], vec!["u2"]]);
}

#[wasm_bindgen_test]
fn attribution_first_touch_stays_last_touch_moves() {
    use trueup_agent::attribution::{apply, touch_of};
    let page = "https://shop.example/landing?utm_source=news&utm_campaign=spring&gclid=abc";
    let t1 = touch_of(&page.into(), &"https://www.search.example/".into(), 1.0)
        .expect("a campaign touch");
    assert_eq!(text(&t1, &["utm_source"]).as_deref(), Some("news"));
    assert_eq!(text(&t1, &["gclid"]).as_deref(), Some("abc"));
    assert_eq!(
        text(&t1, &["referrer"]).as_deref(),
        Some("https://www.search.example/")
    );
    assert_eq!(text(&t1, &["landing_page"]).as_deref(), Some(page));
    // Internal navigation and direct visits are not touches.
    assert!(
        touch_of(
            &"https://shop.example/cart".into(),
            &"https://shop.example/landing".into(),
            2.0
        )
        .is_none()
    );
    assert!(touch_of(&"https://shop.example/".into(), &"".into(), 2.0).is_none());
    let (attr, new) = apply(&JsValue::UNDEFINED, Some(t1));
    assert!(new);
    let t2 = touch_of(
        &"https://shop.example/?utm_source=ads&msclkid=m1".into(),
        &"".into(),
        3.0,
    )
    .unwrap();
    let (attr, new) = apply(&attr, Some(t2));
    assert!(new);
    assert_eq!(
        text(&attr, &["first", "utm_source"]).as_deref(),
        Some("news")
    );
    assert_eq!(text(&attr, &["last", "utm_source"]).as_deref(), Some("ads"));
    assert_eq!(text(&attr, &["last", "msclkid"]).as_deref(), Some("m1"));
    let (kept, new) = apply(&attr, None);
    assert!(!new);
    assert_eq!(text(&kept, &["last", "utm_source"]).as_deref(), Some("ads"));
}

#[wasm_bindgen_test]
async fn a_read_window_of_expired_events_does_not_hide_the_rest() {
    for q in queues("t-expired-window").await {
        let t = now();
        let old: Vec<JsValue> = (0..3).map(|i| record(i, t - 5_000.0, 10.0)).collect();
        let fresh = record(9, t, 10.0);
        enqueue(&q, &old).await;
        enqueue(&q, std::slice::from_ref(&fresh)).await;
        let acc = acc(&[("maxAgeMs", 3_000.0), ("maxBatchEvents", 2.0)]);
        assert_eq!(peek_ids(&q, &acc).await, ids_of(&[fresh]));
        let c = counters(&q).await;
        assert_eq!((c.dropped("expired"), c.pending), (3.0, 1.0));
    }
}

#[wasm_bindgen_test]
async fn events_rescued_before_their_write_are_counted_once() {
    let q = queue(&wait(open_idb("t-rescued-early")).await);
    let mut core = core_with(&[]);
    for id in ["r1", "r2", "r3"] {
        core.track(id.into(), JsValue::UNDEFINED, &ctx(id));
    }
    // Hidden before the queue opened: the events go to the rescue list, which this tab (or
    // another one) adopts when it opens the queue, before this tab's own write.
    core.hide(false);
    let rescued = take_rescue();
    assert_eq!(rescued.length(), 3);
    let acc: JsValue = core_with(&[]).into();
    wait(q.adopt(&acc, &rescued)).await;
    core.opened(false);
    core.track("r4".into(), JsValue::UNDEFINED, &ctx("r4"));
    let w: Array = core.take().unchecked_into();
    assert_eq!(Array::from(&w.get(1)).length(), 4);
    // As js/core.js persists: with `check`, only what is not queued is added and counted.
    let deltas: Array = w.get(2).unchecked_into();
    if w.get(3).is_truthy() {
        wait(q.adopt_with(&acc, &w.get(1).unchecked_into(), &deltas)).await;
    } else {
        wait(q.write(&w.get(1).unchecked_into(), &deltas)).await;
    }
    let c = counters(&q).await;
    assert_eq!((c.enqueued, c.pending), (4.0, 4.0));
    assert_eq!(peek_ids(&q, &acc).await.len(), 4);
}

#[wasm_bindgen_test]
fn opt_out_counts_what_was_not_written() {
    // Tracked before the queue opened, then refused: counted, never stored.
    let mut core = core_with(&[]);
    core.track("early".into(), JsValue::UNDEFINED, &ctx("id-e"));
    core.consent(false);
    let stats = core.stats(&JsValue::UNDEFINED);
    assert_eq!(field(&stats, &["enqueued"]).as_f64(), Some(1.0));
    assert_eq!(field(&stats, &["dropped", "consent"]).as_f64(), Some(1.0));
    // Tracked and refused in the same task, the queue open: the write counts it as consent.
    let mut core = core_with(&[]);
    core.opened(false);
    core.track("written".into(), JsValue::UNDEFINED, &ctx("id-w"));
    let w: Array = core.take().unchecked_into();
    core.written(w.get(0).as_f64().unwrap() as u32, true);
    core.track("same_task".into(), JsValue::UNDEFINED, &ctx("id-s"));
    let reason = core.consent(false);
    assert_eq!(reason.as_string().as_deref(), Some("consent"));
    let w: Array = core.take().unchecked_into();
    assert_eq!(Array::from(&w.get(1)).length(), 0);
    let d = Array::from(&w.get(2)).get(0);
    assert_eq!(text(&d, &["r"]).as_deref(), Some("consent"));
    assert_eq!(field(&d, &["n"]).as_f64(), Some(1.0));
}

#[wasm_bindgen_test]
fn a_failed_write_keeps_its_drop_counts() {
    let mut core = core_with(&[("maxEventBytes", 500.0)]);
    core.opened(false);
    core.track("big".into(), props("pad", &"x".repeat(600)), &ctx("b"));
    core.track("ok".into(), JsValue::UNDEFINED, &ctx("o"));
    let drops = |w: &Array| -> Vec<(String, f64)> {
        Array::from(&w.get(2))
            .iter()
            .filter_map(|d| Some((text(&d, &["r"])?, field(&d, &["n"]).as_f64()?)))
            .collect()
    };
    let w: Array = core.take().unchecked_into();
    assert_eq!(drops(&w), [("too_large".to_string(), 1.0)]);
    core.written(w.get(0).as_f64().unwrap() as u32, false);
    // Both failed writes' counts go with the next write, until one commits.
    for _ in 0..2 {
        let w: Array = core.take().unchecked_into();
        assert_eq!(
            drops(&w),
            [
                ("too_large".to_string(), 1.0),
                ("storage_unavailable".to_string(), 1.0)
            ]
        );
        core.written(w.get(0).as_f64().unwrap() as u32, false);
        let w: Array = core.take().unchecked_into();
        core.written(w.get(0).as_f64().unwrap() as u32, false);
    }
    let w: Array = core.take().unchecked_into();
    core.written(w.get(0).as_f64().unwrap() as u32, true);
    assert!(core.take().is_undefined(), "counted once, when written");
}

#[wasm_bindgen_test]
fn beacons_skip_the_batch_in_flight_and_wait_out_a_backoff() {
    let o = options(&[("retryBaseMs", 60_000.0)]);
    clear_storage();
    let h = host(&o);
    record_beacons(&h, 100);
    let beacons = Reflect::get(&h, &"beacons".into()).unwrap();
    let sent = || -> Vec<String> {
        let out: Vec<String> = Array::from(&beacons)
            .iter()
            .flat_map(|b| {
                Array::from(&b)
                    .iter()
                    .map(|n| n.as_string().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        beacons.unchecked_ref::<Array>().set_length(0);
        out
    };
    let mut core = Core::new(&o, h, &"https://shop.example/".into(), &"".into(), false);
    core.opened(false);
    for name in ["flying", "queued"] {
        core.track(name.into(), JsValue::UNDEFINED, &ctx(name));
    }
    let w: Array = core.take().unchecked_into();
    core.written(w.get(0).as_f64().unwrap() as u32, true);
    core.sending(&Array::of1(&"flying".into()));
    core.track("unwritten".into(), JsValue::UNDEFINED, &ctx("unwritten"));
    // Not the sending tab: only what is not written yet (the sender may have sent the rest).
    core.beacon(false, false);
    assert_eq!(sent(), ["unwritten"]);
    core.track("unwritten2".into(), JsValue::UNDEFINED, &ctx("unwritten2"));
    // Offline: only what nothing else holds (not written yet).
    core.beacon(true, true);
    assert_eq!(sent(), ["unwritten2"], "a beacon carries an event once");
    // Backing off: the same.
    core.answered(
        &Array::of1(&"flying".into()),
        Some(503),
        f64::NAN,
        &JsValue::UNDEFINED,
        false,
    );
    core.beacon(false, true);
    assert!(sent().is_empty(), "nothing written goes while backing off");
    core.wake(2); // back online: no backoff
    core.beacon(false, true);
    assert_eq!(sent(), ["queued"], "not the batch in flight");
    core.beacon(false, true);
    assert!(sent().is_empty(), "nothing twice");
}

#[wasm_bindgen_test]
fn the_relays_wait_holds_when_back_online_and_in_the_next_page() {
    let mut core = core_with(&[]);
    core.opened(false);
    let ids = Array::of1(&"a".into());
    core.track("a".into(), JsValue::UNDEFINED, &ctx("a"));
    core.sending(&ids);
    core.answered(&ids, Some(503), 30.0, &JsValue::UNDEFINED, false);
    core.wake(2);
    core.wake(1);
    assert!(!core.due(), "online does not clear the relay's Retry-After");
    // Another tab, or the next page of this one (the storage kept): it waits too.
    let o = options(&[]);
    let mut next = Core::new(
        &o,
        host(&o),
        &"https://shop.example/".into(),
        &"".into(),
        false,
    );
    next.opened(false);
    next.wake(4);
    assert!(!next.due(), "a new sending tab honours the wait");
    // A wait that is over holds nothing.
    storage_set("trueup.wait", &(now() - 1.0).to_string());
    let mut later = Core::new(
        &o,
        host(&o),
        &"https://shop.example/".into(),
        &"".into(),
        false,
    );
    later.wake(1);
    assert!(later.due());
}

#[wasm_bindgen_test]
async fn a_blocked_open_gives_up_and_a_newer_version_is_not_blocked() {
    let name = String::from("t-blocked-") + &now().to_string();
    // Another tab's connection at version 1, which never closes: the upgrade to 2 is blocked.
    let old = wait(open_at(&name, 1)).await;
    let open = open_idb(&name);
    assert_eq!(wait(settle_within(&open, 6_000)).await, "rejected");
    close_db(&old);
    // This agent's connection closes when another one asks for a newer version, and says so.
    let lost = lost_counter();
    let name = name + "-b";
    let db = wait(open_idb_lost(&name, &lost)).await;
    let newer = wait(open_at(&name, 3)).await;
    close_db(&newer);
    assert!(
        Reflect::get(&js_sys::global(), &"lostCalls".into())
            .unwrap()
            .as_f64()
            >= Some(1.0),
        "lost is called"
    );
    // Writes on the closed connection reject (they do not throw).
    let q = queue(&db);
    let p = q
        .try_write(&records(&[record(1, now(), 1.0)]), &Array::new())
        .expect("no synchronous throw");
    assert_eq!(wait(settle_within(&p, 1_000)).await, "rejected");
}

/// The stream (`device_id`) and `seq` of the one event `core` writes next.
fn next_stamp(core: &mut Core, id: &str) -> (String, f64) {
    core.track(id.into(), JsValue::UNDEFINED, &ctx(id));
    let w: Array = core.take().unchecked_into();
    let record = Array::from(&w.get(1)).get(0);
    let event = js_sys::JSON::parse(&text(&record, &["s"]).unwrap()).unwrap();
    (
        text(&event, &["device_id"]).unwrap(),
        field(&event, &["seq"]).as_f64().unwrap(),
    )
}

#[wasm_bindgen_test]
fn a_tab_copied_from_a_live_one_gets_its_own_stream_and_a_reload_keeps_it() {
    let mut a = core_with(&[]);
    a.opened(false);
    let (stream, seq) = next_stamp(&mut a, "a1");
    assert_eq!(seq, 1.0);
    let tab = session_get("trueup.tab").unwrap();
    // A duplicated tab starts with a copy of this sessionStorage while `a` lives.
    let o = options(&[]);
    let mut b = Core::new(
        &o,
        host(&o),
        &"https://shop.example/".into(),
        &"".into(),
        false,
    );
    b.opened(false);
    let (copy, copy_seq) = next_stamp(&mut b, "b1");
    assert_ne!(copy, stream, "its own stream");
    assert_eq!(copy_seq, 1.0);
    assert_ne!(session_get("trueup.tab").unwrap(), tab);
    // `a` goes away (pagehide), and the next page of its tab goes on with its stream.
    a.hide(true);
    session_set("trueup.tab", &tab);
    session_set("trueup.seq", "1");
    let mut c = Core::new(
        &o,
        host(&o),
        &"https://shop.example/".into(),
        &"".into(),
        false,
    );
    c.opened(false);
    assert_eq!(next_stamp(&mut c, "c1"), (stream.clone(), 2.0));
    // `a` back from the bfcache, after `c` numbered on and went away: a new stream.
    let _ = next_stamp(&mut c, "c2");
    c.hide(true);
    a.shown();
    let (back, seq) = next_stamp(&mut a, "a2");
    assert!(back != stream && back != copy && seq == 1.0);
    assert_eq!(
        session_get("trueup.tab").unwrap(),
        back.split('.').nth(1).unwrap()
    );
}

/// The JSON the agent sends, read with `trueup-protocol`'s own types (serde, unknown fields
/// refused): each kind of event, in memory mode and with attribution, the counters, and the
/// batch body. The relay parses with these types, so a field the agent renames or adds fails
/// here rather than at the relay.
#[wasm_bindgen_test]
fn the_wire_shapes_are_the_protocols() {
    use trueup_protocol::{Batch, Counters as WireCounters, Event};
    clear_storage();
    let o = options(&[]);
    let mut core = Core::new(
        &o,
        host(&o),
        &"https://shop.example/?utm_source=news&utm_campaign=launch&gclid=g-1".into(),
        &"https://ref.example/".into(),
        true,
    );
    core.opened(true);
    let ids = [
        "0190f3a2-7b1c-7def-8abc-0123456789a1",
        "0190f3a2-7b1c-7def-8abc-0123456789a2",
        "0190f3a2-7b1c-7def-8abc-0123456789a3",
    ];
    core.track("signup".into(), props("plan", "pro"), &ctx(ids[0]));
    core.page(JsValue::UNDEFINED, &ctx(ids[1]));
    core.identify("u-1".into(), props("email", "a@example.com"), &ctx(ids[2]));
    core.track(
        "too_big".into(),
        props("pad", &"x".repeat(40_000)),
        &ctx("x"),
    );
    let w: Array = core.take().unchecked_into();
    let records = Array::from(&w.get(1));
    let events: Vec<Event> = records
        .iter()
        .map(|r| {
            let s = text(&r, &["s"]).unwrap();
            serde_json::from_str(&s).unwrap_or_else(|e| panic!("{e}: {s}"))
        })
        .collect();
    assert_eq!(
        events.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["signup", "page_view", "identify"]
    );
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [Some(1), Some(2), Some(3)]
    );
    assert_eq!(events[2].user_id.as_deref(), Some("u-1"));
    assert_eq!(events[0].context.degraded.as_deref(), Some("memory_queue"));
    let touch = events[0]
        .context
        .attribution
        .as_ref()
        .unwrap()
        .first
        .as_ref()
        .unwrap();
    assert_eq!(touch.utm_campaign.as_deref(), Some("launch"));
    // The counters, as stored and sent (with this write's deltas folded in).
    let mut t = core.totals(&JsValue::UNDEFINED, &0.into(), &w.get(2));
    core.stamp(&mut t);
    let counters = t.counters();
    let text = String::from(js_sys::JSON::stringify(&counters).unwrap());
    let c: WireCounters = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!((c.enqueued, c.pending), (4, 3), "{text}");
    // The batch body.
    let raw = body("demo", &records, &counters);
    let batch: Batch = serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{e}: {raw}"));
    assert_eq!(batch.v, 1);
    assert_eq!(batch.site.as_deref(), Some("demo"));
    assert_eq!(batch.events, events);
    assert_eq!(batch.counters.unwrap().enqueued, 4);
}
