//! trueup's browser agent: a synchronous Rust→WebAssembly core that takes the agent's
//! decisions, driven by a small JS layer that does the browser's I/O.
//!
//! # Shape
//!
//! ```text
//! stub.js ── new Agent(options), call, flush, stats, attribution, shutdown ──▶ js/core.js
//! js/core.js: the Agent; listeners, the send lock (Web Locks), one timer (`next_wake`),
//!             BroadcastChannel, fetch ─┬─ asks the core (this crate, `Core`: `track`,
//!                                      │  `page`, `identify`, `reset`, `consent`, `take`, …)
//!                                      └─ js/queue.js: IndexedDB (or memory) transactions
//! Core ── Host (js/host.js): ids, localStorage/sessionStorage, an event's JSON, sendBeacon
//! ```
//!
//! The core decides; JS moves bytes. Here: the identity, sessions and attribution, consent,
//! each event's stamp (`seq`, ids) and the too-large rule, which events the page still owes
//! (for `pagehide` beacons and the localStorage rescue), the batches (`pick`, beacon budgets),
//! the answer of the relay and the retry policy (`answered`, `policy`), the send schedule,
//! and every counter and delta (`counters`). In JS: IndexedDB requests, `fetch`, `sendBeacon`,
//! Storage, timers and events. Nothing here awaits: a read-write transaction of the queue is
//! JS reading the stores, the core's `Totals` counting, and JS writing back. (The async Rust
//! core this replaced, with wasm-bindgen-futures, closures and web-sys, was 46.6 KB of wasm
//! gzipped; this one is 13.5 KB: README, "The agent: size and speed".)
//!
//! The modules, one `impl Core` each: `queue` (this page's events: stamped, written once per
//! task, rescued and beaconed at hide), `sender` (when a send is due, what goes in a batch,
//! what the relay's answer means), `consent` (the hold before it, the identity at it),
//! `identity` (the ids every event carries, the session), `tabs` (the tab's `seq` stream among
//! the open tabs), `counters` (the loss counters and the queue's accounting), and the pure rules
//! `policy` and `attribution`.
//!
//! # What it promises
//!
//! - Every event gets, at `track()` time, its id (UUIDv7, made by the stub), its capture
//!   time, and its `seq`; its JSON is made once, then persisted in IndexedDB in a
//!   transaction issued in the same task (one transaction per task, not per event: `take`).
//! - Events leave the queue only when the relay has answered for them (accepted or
//!   duplicate → `acked`; rejected → `dropped.rejected`), when they are too old
//!   (`dropped.expired`), when the queue is over its byte cap (oldest first,
//!   `dropped.queue_full`), or on opt-out (`dropped.consent`). So
//!   `enqueued = acked + dropped + pending` at every commit.
//! - One tab sends (a Web Lock); every tab writes. On `pagehide`/`visibilitychange→hidden`,
//!   each tab beacons what no one has sent (deduped by id at the relay): its events not
//!   committed to IndexedDB (a memory queue's never are), and, in the sending tab, its
//!   persisted events it has not sent; never the batch in flight, an event once, and while
//!   offline or backing off only the uncommitted ones. What does not fit stays queued for the
//!   next page load. A relay's `Retry-After` (429, 503) is kept in localStorage: every tab and
//!   the next page honour it, and `online` clears only the agent's own backoff. No `unload`
//!   listener; the lock is released and the BroadcastChannel closed on `pagehide`, so the page
//!   stays bfcache-eligible.
//! - A hidden tab's timers are throttled (a background tab may even be frozen), so a sending
//!   tab that goes hidden hands the lock over (after the batch in flight): it releases it and
//!   asks again, behind the tabs that wait; one that gets it while hidden asks the others
//!   (BroadcastChannel) whether one is visible, and hands it on if so.
//! - Before consent (option `consent: "pending"`), nothing is stored or sent: no IndexedDB
//!   database is opened and no Storage item written; events wait in memory, at most
//!   `HOLD_EVENTS` (1,000) and `HOLD_BYTES` (1 MB), the oldest dropped first, and what the
//!   hold dropped is counted (`dropped.queue_full`) once consent is given. Refused, all of
//!   it counts as `dropped.consent` (in memory only).
//! - Nothing throws into the page: the exports do not throw, the host's functions catch, and
//!   the stub catches around the Agent. A trap (a Rust panic) anywhere, in a call or in the
//!   background, stops the core: the stub counts it (`wasm_panic`) and its fallback sends.
//!
//! # Sequence streams
//!
//! `seq` must be known synchronously at `track()` time (so a beacon sent at `pagehide` can
//! carry it) and unique, but tabs share the device. So each tab numbers its own stream:
//! events carry `device_id = "<device>.<tab>"`, where `<tab>` lives in `sessionStorage`
//! (it survives reloads and navigations in the tab) and `seq` counts 1, 2, 3… per stream. A
//! gap in a stream's `seq` at the relay is an event that left `track()` and never arrived.
//! A duplicated tab starts with a copy of the original's sessionStorage, so the tabs that are
//! open list their streams in localStorage (`trueup.tabs`, taken off at `pagehide`, bounded to
//! 50 against tabs that crashed): a page whose stream another open tab holds begins its own.
//! A page restored from the back/forward cache begins a new stream too (the pages shown in its
//! tab meanwhile numbered on in its old one).
//! The counters are per device (`<device>`), shared by the tabs.
//!
//! # Identity
//!
//! The device id, visitor id (`anon_id`), user id, session and attribution live in
//! `localStorage` (written only with consent): it is synchronous, so the agent stamps events
//! the moment it is constructed, before IndexedDB has opened. Events tracked meanwhile wait
//! in memory (and go out by beacon if the page is hidden first).
//!
//! # Size
//!
//! What the browser downloads is budgeted (30 KB gzip for stub, glue and wasm: `npm run size`),
//! so: no serde, no `format!` and no panic messages (the shipped build is `no_std` with a panic
//! handler that traps; see the `std` feature), no Rust strings (JS values are compared and
//! joined by JS), no float parsing or printing, no collections beyond `Vec`, lol_alloc as the
//! allocator, and as few distinct imports and exports as the work needs (each is glue JS too).

#![deny(missing_docs)]
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

// The size build (no `std` feature): a panic traps at once (`unreachable`), which the JS side
// sees as a WebAssembly.RuntimeError, as with std's `panic = "abort"`, without formatting a
// message nobody reads. (std's `panic_immediate_abort` would need a nightly compiler.)
#[cfg(all(not(feature = "std"), target_family = "wasm"))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

// lol_alloc's free list (sorted by address, neighbours coalesced) instead of Rust's default
// dlmalloc or talc: 0.6 KB gzip smaller than talc (README, size table). The core allocates
// little (its `Vec`s of this page's events grow and shrink), so a linear free list costs
// nothing measurable in `track()`.
// SAFETY: the agent's wasm is single-threaded (built without the `atomics` target feature):
// nothing else allocates at the same time.
#[cfg(all(not(target_feature = "atomics"), target_family = "wasm"))]
#[global_allocator]
static ALLOCATOR: lol_alloc::AssumeSingleThreaded<lol_alloc::FreeListAllocator> =
    unsafe { lol_alloc::AssumeSingleThreaded::new(lol_alloc::FreeListAllocator::new()) };

pub mod attribution;
mod consent;
pub mod counters;
mod identity;
pub mod policy;
mod queue;
mod sender;
mod tabs;

use alloc::vec::Vec;

use js_sys::{Array, Object, Reflect};
use wasm_bindgen::prelude::*;

use crate::counters::Totals;
use crate::identity::stored_session;
use crate::policy::Verdict;
use crate::queue::Item;
use crate::tabs::live_tabs;

#[wasm_bindgen]
extern "C" {
    /// What the core asks of the page (`js/host.js`). None of these throws.
    pub type Host;
    /// A new random id.
    #[wasm_bindgen(method)]
    fn uuid(this: &Host) -> JsValue;
    /// Item `trueup.<key>` of `localStorage` (of `sessionStorage` with `session`), or null.
    #[wasm_bindgen(method)]
    fn load(this: &Host, session: bool, key: &str) -> JsValue;
    /// Stores `value` (objects as JSON) as item `trueup.<key>`; undefined removes it.
    #[wasm_bindgen(method)]
    fn keep(this: &Host, session: bool, key: &JsValue, value: &JsValue);
    /// The event's JSON with its fields, as the record `{i: id, s: JSON, b: its length, t: ts}`
    /// that is queued, rescued and beaconed; undefined when `props` cannot be serialised.
    #[wasm_bindgen(method)]
    fn event(
        this: &Host,
        id: &JsValue,
        name: &JsValue,
        schema: &str,
        ts: f64,
        seq: f64,
        props: &JsValue,
        ctx: &JsValue,
        ids: &JsValue,
        extra: &JsValue,
    ) -> JsValue;
    /// The record with its event's identity fields (`anon_id`, `user_id`, `session_id`,
    /// `device_id`) replaced by `ids`' (a record held while consent was pending).
    #[wasm_bindgen(method)]
    fn restamp(this: &Host, record: &JsValue, ids: &JsValue) -> JsValue;
    /// Sends the records in one body by `sendBeacon`; false when the browser refuses.
    #[wasm_bindgen(method)]
    fn beacon(this: &Host, records: &Array) -> bool;

    #[wasm_bindgen(js_namespace = JSON, catch)]
    fn parse(text: &JsValue) -> Result<JsValue, JsValue>;
}

pub(crate) fn get(o: &JsValue, k: &str) -> JsValue {
    Reflect::get(o, &k.into()).unwrap_or_default()
}

pub(crate) fn set(o: &JsValue, k: &str, v: &JsValue) {
    let _ = Reflect::set(o, &k.into(), v);
}

/// A number of the agent's own data (the queue's records, counters and deltas; undefined → 0), by
/// JS's unary `+`, which is cheaper than `as_f64` (that one returns through linear memory).
pub(crate) fn num(v: &JsValue) -> f64 {
    let n = v.unchecked_into_f64();
    if n.is_nan() { 0.0 } else { n }
}

fn now() -> f64 {
    js_sys::Date::now()
}

/// `a` and `b` joined by `sep`, by JS (numbers printed by JS too).
fn join(a: &JsValue, b: &JsValue, sep: &str) -> JsValue {
    Array::of2(a, b).join(sep).into()
}

#[derive(Clone, Copy, PartialEq)]
enum Consent {
    Granted,
    Pending,
    Denied,
}

/// The agent's state and decisions; `js/core.js` drives it. Methods never throw.
#[wasm_bindgen]
pub struct Core {
    host: Host,
    max_event_bytes: f64,
    session_timeout_ms: f64,
    max_age_ms: f64,
    batch_bytes: f64,
    max_batch_events: f64,
    flush_interval_ms: f64,
    retry_base_ms: f64,
    retry_cap_ms: f64,
    device: JsValue,
    stream: JsValue,
    device_stream: JsValue,
    seq: f64,
    anon: JsValue,
    /// Undefined until `identify`.
    user: JsValue,
    session: JsValue,
    session_last: f64,
    /// `{first?, last?}`; undefined when there is no touch yet.
    attribution: JsValue,
    consent: Consent,
    /// `{anon_id, user_id?, session_id, device_id}`, remade when the identity changes.
    ids: JsValue,
    /// `{attribution?, degraded?}`, the context every event carries.
    extra: JsValue,
    /// This page's events not known to be acknowledged, oldest first.
    page: Vec<Item>,
    /// Events held while consent is pending (in memory only: nothing is stored before
    /// consent), at most `HOLD_EVENTS` and `HOLD_BYTES`, the oldest dropped first.
    held: Vec<Item>,
    held_bytes: f64,
    /// Events the hold dropped, counted (`queue_full`) once consent is given.
    held_drops: f64,
    /// Events that never entered the queue, by reason, to be counted with the next write:
    /// `(reason, n, write)`, `write` 0 until a write carries them (`take`); a failed write
    /// gives them back (`written`).
    drops: Vec<(JsValue, f64, u32)>,
    /// Drops counted while nothing may be stored (consent denied).
    unstored_drops: f64,
    writes: u32,
    /// The queue is open (events are written from now on).
    open: bool,
    /// The queue lives in memory (events are flagged `degraded: memory_queue`).
    memory: bool,
    /// This tab left a rescue list in localStorage (see `hide`).
    rescued: bool,
    /// This tab's stream is in the list of live tabs (`live_tabs`).
    claimed: bool,
    failures: u32,
    /// This tab's own backoff after failures (cleared when the browser comes back online).
    backoff_until: f64,
    /// The relay's `Retry-After`, as a time: kept in localStorage (`trueup.wait`), so every
    /// tab and the next page honour it, and not cleared by `online`.
    server_wait_until: f64,
    split_limit: f64,
    due_at: f64,
    /// The next `take` panics (feature `test-trap`).
    #[cfg(feature = "test-trap")]
    trap_on_take: bool,
}

#[wasm_bindgen]
impl Core {
    /// The core of a page: `options` as resolved by `js/core.js` (every field set), the page's
    /// landing URL and referrer, and whether the queue will be in memory. Reads (and, with
    /// consent, keeps) the identity through `host`.
    #[wasm_bindgen(constructor)]
    pub fn new(
        options: &JsValue,
        host: Host,
        landing: &JsValue,
        referrer: &JsValue,
        memory: bool,
    ) -> Core {
        let o = |k: &str| num(&get(options, k));
        // This tab's stream, unless another live tab holds it: a duplicated tab (the
        // browser's "duplicate tab", `window.open` of the page) starts with a copy of the
        // original's sessionStorage, and must not share its stream, seq or rescue list.
        let mut stream = host.load(true, "tab");
        let mut seq = host.load(true, "seq").unchecked_into_f64();
        if !stream.is_string() || live_tabs(&host).includes(&stream, 0) {
            stream = host.uuid();
            seq = 0.0;
        }
        let stored = host.load(false, "consent");
        let consent = if stored == "granted" {
            Consent::Granted
        } else if stored == "denied" {
            Consent::Denied
        } else if get(options, "consent") == "pending" {
            Consent::Pending
        } else {
            Consent::Granted
        };
        let t = now();
        let stored_attr = parse(&host.load(false, "attr")).unwrap_or_default();
        let (attribution, new_campaign) =
            attribution::apply(&stored_attr, attribution::touch_of(landing, referrer, t));
        let (mut session, mut session_last) = stored_session(&host);
        if !session.is_truthy()
            || policy::new_session(session_last, t, o("sessionTimeoutMs"), new_campaign)
        {
            session = host.uuid();
            session_last = t;
        }
        let mut device = host.load(false, "dev");
        if !device.is_string() {
            device = host.uuid();
        }
        let mut anon = host.load(false, "anon");
        if !anon.is_string() {
            anon = host.uuid();
        }
        let user = host.load(false, "user");
        let wait = num(&host.load(false, "wait"));
        let mut core = Core {
            max_event_bytes: o("maxEventBytes"),
            session_timeout_ms: o("sessionTimeoutMs"),
            max_age_ms: o("maxAgeMs"),
            batch_bytes: o("batchBytes"),
            max_batch_events: o("maxBatchEvents"),
            flush_interval_ms: o("flushIntervalMs"),
            retry_base_ms: o("retryBaseMs"),
            retry_cap_ms: o("retryCapMs"),
            host,
            device_stream: join(&device, &stream, "."),
            device,
            stream,
            seq: if seq.is_finite() { seq } else { 0.0 },
            claimed: false,
            anon,
            user: if user.is_string() {
                user
            } else {
                JsValue::UNDEFINED
            },
            session,
            session_last,
            attribution: if get(&attribution, "first").is_object() {
                attribution
            } else {
                JsValue::UNDEFINED
            },
            consent,
            ids: JsValue::UNDEFINED,
            extra: JsValue::UNDEFINED,
            page: Vec::new(),
            held: Vec::new(),
            held_bytes: 0.0,
            held_drops: 0.0,
            drops: Vec::new(),
            unstored_drops: 0.0,
            writes: 0,
            open: false,
            memory,
            rescued: false,
            failures: 0,
            backoff_until: 0.0,
            server_wait_until: wait,
            split_limit: f64::INFINITY,
            due_at: f64::INFINITY,
            #[cfg(feature = "test-trap")]
            trap_on_take: false,
        };
        core.refresh();
        core.save_identity();
        core
    }

    /// First- and last-touch attribution, for a signup form to hand to the server.
    pub fn attribution(&self) -> JsValue {
        if self.attribution.is_object() {
            self.attribution.clone()
        } else {
            Object::new().into()
        }
    }
}

impl Core {
    fn keep(&self, session: bool, key: &str, value: &JsValue) {
        self.host.keep(session, &key.into(), value);
    }

    fn keep_rescue(&self, value: &JsValue) {
        self.host
            .keep(false, &join(&"rescue".into(), &self.stream, "."), value);
    }
}
