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
pub mod counters;
pub mod policy;

use alloc::vec::Vec;

use js_sys::{Array, Object, Reflect};
use wasm_bindgen::prelude::*;

use crate::counters::{Counters, Totals, delta};
use crate::policy::Verdict;

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

/// Most events held while consent is pending (`Core::held`).
const HOLD_EVENTS: usize = 1_000;
/// Most bytes (of event JSON) held while consent is pending.
const HOLD_BYTES: f64 = 1_000_000.0;

/// `Item::batch` of an event IndexedDB has committed.
const PERSISTED: u32 = u32::MAX;

/// An event of this page not known to be acknowledged.
struct Item {
    id: JsValue,
    /// `{i, s, b, t}` (`Host::event`).
    record: JsValue,
    bytes: f64,
    /// 0: not written yet; `n`: in write `n` (`take`); `PERSISTED`.
    batch: u32,
    /// Not to be beaconed: beaconed already, or in the batch being sent (`sending`).
    beaconed: bool,
    /// Put in the rescue list before it was written: another tab (or this one, when it opens
    /// the queue) may adopt it first, so its write must check what is queued (`take`).
    rescued: bool,
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

    /// `track(name, props)`: an event `name` (a string, else nothing happens) with `props`
    /// (an object, else `{}`); `ctx` is the call's `{id, ts, url, referrer, title}` (the
    /// stub's). Stamped (ids, `seq`, identity) at once, even before the queue is open, so a
    /// `pagehide` beacon can carry it; written with the task's other events (`take`).
    pub fn track(&mut self, name: JsValue, props: JsValue, ctx: &JsValue) {
        #[cfg(feature = "test-trap")]
        if name == "trueup:trap" {
            panic!("test-trap");
        } else if name == "trueup:trap-later" {
            self.trap_on_take = true;
        }
        if name.is_string() {
            self.event(&name, "event/1", props, ctx);
        }
    }

    /// `page(props)`: a `page_view` event.
    pub fn page(&mut self, props: JsValue, ctx: &JsValue) {
        self.event(&"page_view".into(), "page_view/1", props, ctx);
    }

    /// `identify(user, traits)`: the visitor is `user` (a string, else nothing happens) from
    /// now on, kept with the identity; an `identify` event carries `traits` (an object).
    pub fn identify(&mut self, user: JsValue, traits: JsValue, ctx: &JsValue) {
        if !user.is_string() {
            return;
        }
        self.user = user;
        self.refresh();
        self.save_identity();
        let props: JsValue = Object::new().into();
        if traits.is_object() {
            set(&props, "traits", &traits);
        }
        self.event(&"identify".into(), "identify/1", props, ctx);
    }

    /// `reset()` (a logout): no user, a new visitor id and session from now on.
    pub fn reset(&mut self) {
        self.user = JsValue::UNDEFINED;
        self.anon = self.host.uuid();
        self.session = self.host.uuid();
        self.refresh();
        self.save_identity();
    }

    /// `consent(granted)`: granted, what was held goes to the queue and the identity is kept;
    /// refused, the identity is forgotten and what is held and queued is dropped (counted
    /// `consent`). Returns the reason to drop everything queued with (opt-out), else undefined.
    /// Stored (`trueup.consent`): the device's, for its other tabs and its next pages.
    pub fn consent(&mut self, granted: bool) -> JsValue {
        let held = core::mem::take(&mut self.held);
        let held_drops = core::mem::take(&mut self.held_drops);
        self.held_bytes = 0.0;
        if granted {
            let mut held = held;
            if self.consent != Consent::Granted {
                self.adopt_stored_identity();
                // Stored and sent nowhere yet: they are this identity's.
                for it in held.iter_mut() {
                    it.record = self.host.restamp(&it.record, &self.ids);
                    it.bytes = num(&get(&it.record, "b"));
                }
            }
            self.consent = Consent::Granted;
            self.save_identity();
            // After the identity: a tab told of the consent (a `storage` event) finds it stored.
            self.keep(false, "consent", &"granted".into());
            self.page.extend(held);
            if held_drops > 0.0 {
                self.drops.push(("queue_full".into(), held_drops, 0));
            }
            return JsValue::UNDEFINED;
        }
        // Opt-out: forget the identity, drop what is held and queued, and count it.
        self.release();
        self.consent = Consent::Denied;
        self.keep(false, "consent", &"denied".into());
        for k in ["dev", "anon", "user", "sess", "attr"] {
            self.keep(false, k, &JsValue::UNDEFINED);
        }
        self.keep(true, "tab", &JsValue::UNDEFINED);
        self.keep(true, "seq", &JsValue::UNDEFINED);
        // This page forgets it too: what it tracks after a later consent is a new device's,
        // with counters of its own (`totals`).
        self.device = self.host.uuid();
        self.anon = self.host.uuid();
        self.user = JsValue::UNDEFINED;
        self.session = self.host.uuid();
        self.attribution = JsValue::UNDEFINED;
        self.stream = self.host.uuid();
        self.seq = 0.0;
        self.device_stream = join(&self.device, &self.stream, ".");
        self.refresh();
        // What was tracked and not written yet is counted too (what was written is the
        // queue's, which the caller clears with the reason returned).
        let unwritten = self.page.iter().filter(|it| it.batch == 0).count();
        self.page.clear();
        let n = (held.len() + unwritten) as f64 + held_drops;
        if !self.open {
            self.unstored_drops += n;
            return JsValue::UNDEFINED;
        }
        if n > 0.0 {
            self.drops.push(("consent".into(), n, 0));
        }
        "consent".into()
    }

    /// What to write now, once per task: `[write, records, deltas, check]` (the events not
    /// written yet and the delta records of this write, `counters::delta`; with `check`, some
    /// of the events were rescued before this write, so the write adds and counts only those
    /// not queued yet, js/queue.js `adopt`), or undefined. Before
    /// the queue is open, events wait here. Also keeps the tab's `seq` (sessionStorage) and
    /// the session's last activity (localStorage, with consent) once per task rather than
    /// per event (a Storage write costs ~20 µs).
    pub fn take(&mut self) -> JsValue {
        #[cfg(feature = "test-trap")]
        if self.trap_on_take {
            panic!("test-trap");
        }
        if self.consent == Consent::Granted {
            self.keep(true, "seq", &self.seq.into());
            self.keep(
                false,
                "sess",
                &join(&self.session, &self.session_last.into(), " "),
            );
        }
        if !self.open {
            return JsValue::UNDEFINED;
        }
        self.writes += 1;
        let write = self.writes;
        let records = Array::new();
        let mut bytes = 0.0;
        let mut check = false;
        for it in self.page.iter_mut().filter(|it| it.batch == 0) {
            it.batch = write;
            records.push(&it.record);
            bytes += it.bytes;
            check |= it.rescued;
        }
        let deltas = Array::new();
        // Events that may have been adopted already are counted by the write itself, only
        // those not queued (`check`; js/queue.js `adopt`), not by a delta.
        if records.length() > 0 && !check {
            deltas.push(&delta(records.length().into(), bytes, &JsValue::UNDEFINED));
        }
        for (reason, n, w) in self.drops.iter_mut().filter(|d| d.2 == 0) {
            *w = write;
            deltas.push(&delta(*n, 0.0, reason));
        }
        if records.length() == 0 && deltas.length() == 0 {
            return JsValue::UNDEFINED;
        }
        let out = Array::of3(&write.into(), &records, &deltas);
        out.push(&check.into());
        out.into()
    }

    /// Write `write` (`take`) committed (`ok`) or failed: its events are then counted as
    /// dropped (`storage_unavailable`, with the next write), not lost silently, and the drops
    /// it carried go with the next write too.
    pub fn written(&mut self, write: u32, ok: bool) {
        for d in self.drops.iter_mut().filter(|d| d.2 == write) {
            d.2 = if ok { u32::MAX } else { 0 };
        }
        self.drops.retain(|d| d.2 != u32::MAX);
        if ok {
            // A memory queue is gone with the page: its events stay to be rescued and beaconed.
            if self.memory {
                return;
            }
            for it in self.page.iter_mut().filter(|it| it.batch == write) {
                it.batch = PERSISTED;
            }
            // All committed: the rescue list is no longer needed.
            if self.rescued && self.page.iter().all(|it| it.batch == PERSISTED) {
                self.rescued = false;
                self.keep_rescue(&JsValue::UNDEFINED);
            }
            return;
        }
        let before = self.page.len();
        self.page.retain(|it| it.batch != write);
        let lost = (before - self.page.len()) as f64;
        if lost > 0.0 {
            self.drops.push(("storage_unavailable".into(), lost, 0));
        }
    }

    /// The queue is open, in memory or not (then events are flagged `degraded`).
    pub fn opened(&mut self, memory: bool) {
        self.open = true;
        self.memory = memory;
        self.refresh();
    }

    /// Puts this device and the degraded mode into the counters.
    pub fn stamp(&self, t: &mut Totals) {
        let c = t.counters_mut();
        // (Another device's counters with events still queued stay that device's: see `totals`.)
        if !c.device_id.is_truthy() || c.pending == 0.0 {
            c.device_id = self.device.clone();
        }
        c.degraded = if self.memory {
            "memory_queue".into()
        } else {
            JsValue::UNDEFINED
        };
    }

    /// Whether consent is granted (events rescued by other tabs are adopted only then).
    #[wasm_bindgen(getter)]
    pub fn granted(&self) -> bool {
        self.consent == Consent::Granted
    }

    /// On `pagehide` (`gone`) or hidden: keeps this tab's events that IndexedDB has not
    /// committed yet in `localStorage` (synchronous, so it survives the tab going away right
    /// now). The next page of the site adopts them into the queue; the queue is keyed by event
    /// id, so an event that was committed after all is not added twice. On `pagehide`, the
    /// tab's stream leaves the list of live tabs: the next page of this tab continues it.
    pub fn hide(&mut self, gone: bool) {
        if self.consent != Consent::Granted {
            return;
        }
        if gone {
            self.release();
        }
        let list = Array::new();
        for it in self.page.iter_mut().filter(|it| it.batch != PERSISTED) {
            list.push(&it.record);
            it.rescued |= it.batch == 0;
        }
        if list.length() > 0 {
            self.keep_rescue(&list);
            self.rescued = true;
        } else if core::mem::take(&mut self.rescued) {
            self.keep_rescue(&JsValue::UNDEFINED);
        }
    }

    /// On `pagehide`/hidden: hands this page's events that no one has sent to `sendBeacon`, in
    /// bodies under the batch budget, until the browser refuses (its keepalive quota). Events
    /// not committed to IndexedDB first (those of a memory queue never are): nothing else
    /// would save them; then, in the sending tab (`sender`), the persisted ones it has not
    /// sent (the queue keeps them anyway; a beacon only makes them earlier), but not those of
    /// the batch being sent (`sending`), and none while `offline` or backing off (the relay
    /// asked for a pause, or cannot be reached). An event goes by beacon once. No counters: a
    /// beacon's answer is never read, so they would be stale.
    pub fn beacon(&mut self, offline: bool, sender: bool) {
        let budget = self.batch_bytes - 1_000.0;
        let quiet = offline || self.waiting();
        for persisted in [false, true] {
            // Persisted events only from the sending tab, which knows what it has sent: the
            // others' are sent (and acknowledged) by the sender, unbeknownst to them.
            if persisted && (quiet || !sender) {
                return;
            }
            loop {
                let records = Array::new();
                let mut picked = Vec::new();
                let mut bytes = 0.0;
                for (i, it) in self.page.iter().enumerate() {
                    if it.beaconed || (it.batch == PERSISTED) != persisted {
                        continue;
                    }
                    if !picked.is_empty() && bytes + it.bytes > budget {
                        break;
                    }
                    bytes += it.bytes;
                    picked.push(i);
                    records.push(&it.record);
                }
                if picked.is_empty() {
                    break;
                }
                if !self.host.beacon(&records) {
                    return;
                }
                for i in picked {
                    self.page[i].beaconed = true;
                }
            }
        }
    }

    /// Back from the back/forward cache: the pages shown in this tab meanwhile went on with its
    /// stream, so this page begins a new one (what they numbered is not known for sure here:
    /// their storage writes reach this page's process asynchronously).
    pub fn shown(&mut self) {
        if self.claimed {
            return;
        }
        self.stream = self.host.uuid();
        self.seq = 0.0;
        self.device_stream = join(&self.device, &self.stream, ".");
        self.refresh();
        self.save_identity();
    }

    /// The batch `ids` is being sent: a beacon does not send them again.
    pub fn sending(&mut self, ids: &Array) {
        // What is written from now on waits for its own flush interval (or a full batch).
        self.due_at = f64::INFINITY;
        for it in self.page.iter_mut() {
            it.beaconed |= ids.includes(&it.id, 0);
        }
    }

    /// Schedules the next send: `how` 0 events were written (within the flush interval),
    /// 1 now (a flush was asked for, or this tab became the sender), 2 back online (failures
    /// while offline say nothing about the relay: no backoff), 3 the queue is empty, 4 this
    /// tab became the sender (now; the persisted events of its page are forgotten here, as
    /// the sender before may have sent them: they are not beaconed).
    pub fn wake(&mut self, how: u32) {
        match how {
            1 => self.due_at = 0.0,
            4 => {
                self.page.retain(|it| it.batch != PERSISTED);
                self.due_at = 0.0;
            }
            3 => self.due_at = f64::INFINITY,
            _ => {
                if how == 2 {
                    self.backoff_until = 0.0;
                }
                self.due_at = self.due_at.min(now() + self.flush_interval_ms);
            }
        }
    }

    /// When the next send is due (a time in ms; infinite when nothing waits), held back by a
    /// backoff or the relay's wait: js/core.js sets its one timer for it.
    pub fn next_wake(&self) -> f64 {
        self.due_at
            .max(self.backoff_until)
            .max(self.server_wait_until)
            .max(num(&self.host.load(false, "wait")))
    }

    /// Whether a send is due (and not held back by a backoff or the relay's wait).
    pub fn due(&self) -> bool {
        now() >= self.due_at && !self.waiting()
    }

    /// Most events in the next batch (halved after a 413, doubled back after successes).
    #[wasm_bindgen(getter)]
    pub fn limit(&self) -> f64 {
        self.split_limit.min(self.max_batch_events)
    }

    /// The queue's totals for one transaction: the stored counters `c` and bytes `qb` with the
    /// delta records `deltas` folded in.
    ///
    /// The counters are one device's. Stored counters of another device with nothing queued
    /// are of a device that is gone (an opt-out forgot it and emptied its queue; the relay has
    /// its last report): with consent, this device's begin at zero instead of inheriting them,
    /// so no event is counted under two devices. (Another device's counters with events still
    /// queued, as when localStorage alone was cleared, go on counting for that device until
    /// its events have left.)
    pub fn totals(&self, c: &JsValue, qb: &JsValue, deltas: &JsValue) -> Totals {
        let stored = get(c, "device_id");
        let gone = self.consent == Consent::Granted
            && stored.is_truthy() // (a device id; "" before the first stamp)
            && stored != self.device
            && num(&get(c, "pending")) == 0.0;
        let none = JsValue::UNDEFINED;
        let mut t = Totals::new(if gone { &none } else { c }, qb, deltas);
        if gone {
            t.counters_mut().device_id = self.device.clone();
        }
        t
    }

    /// Whether the queue's next (oldest) event, of `bytes` and captured at `ts`, goes into a
    /// batch that has `n` events of `total` bytes so far: 1 it goes, 2 it expired (counted in
    /// `t`: delete it and go on), 0 the batch is full (at least one event goes, however big).
    pub fn pick(&self, t: &mut Totals, bytes: f64, ts: f64, n: f64, total: f64) -> u32 {
        if policy::expired(ts, now(), self.max_age_ms) {
            t.settle("expired".into(), bytes);
            return 2;
        }
        if n >= self.limit() || (n > 0.0 && total + bytes > self.batch_bytes - 1_000.0) {
            return 0;
        }
        1
    }

    /// The relay's answer to the batch `ids` (`status` none for a network error or timeout,
    /// `retry_after` as parsed from the header, `answer` the JSON of a 2xx), by the retry
    /// policy: `[outcomes, retried, more]`, where `outcomes` has, per event, true (acked), a
    /// drop reason, or nothing at all (everything stays queued); `retried` is how many of
    /// them were sent again after a failure; `more` says whether to send the next batch now:
    /// only after a split, or a success of a `full` batch (more was waiting behind it). After
    /// any other success the rest waits for the flush interval, a full batch or page hide —
    /// a trickle of events costs a request per interval, not one per event; after a failure
    /// the backoff is set.
    pub fn answered(
        &mut self,
        ids: &Array,
        status: Option<u16>,
        retry_after: f64,
        answer: &JsValue,
        full: bool,
    ) -> Array {
        let n = ids.length();
        let retried = if self.failures > 0 { n } else { 0 };
        let verdict = policy::classify(status);
        let outcomes = match verdict {
            Verdict::Answered => outcomes_of(answer, n),
            Verdict::Split if n == 1 => Array::of1(&"too_large".into()),
            Verdict::Split => {
                self.split_limit = f64::from((n / 2).max(1));
                Array::new()
            }
            Verdict::Drop => Array::new_with_length(n).fill(&"rejected".into(), 0, n),
            Verdict::Retry => Array::new(),
        };
        let settled = outcomes.length() > 0;
        let more = if settled {
            self.page
                .retain(|it| outcomes.get(ids.index_of(&it.id, 0) as u32).is_undefined());
            self.failures = 0;
            self.split_limit *= 2.0;
            if !full {
                self.due_at = self.due_at.min(now() + self.flush_interval_ms);
            }
            full
        } else if verdict == Verdict::Split {
            true
        } else {
            // Due again as soon as the backoff allows.
            self.due_at = 0.0;
            self.failures += 1;
            let wait = policy::backoff_ms(
                self.failures,
                js_sys::Math::random(),
                policy::retry_after(retry_after),
                self.retry_base_ms,
                self.retry_cap_ms,
            );
            self.backoff_until = now() + wait;
            if let Some(secs) = policy::retry_after(retry_after).filter(|s| *s > 0.0)
                && matches!(status, Some(429 | 503))
            {
                // Asked by the relay: every tab of the device waits, this page's next too.
                self.server_wait_until = now() + (secs * 1000.0).min(86_400_000.0);
                if self.consent == Consent::Granted {
                    self.keep(false, "wait", &self.server_wait_until.into());
                }
            }
            false
        };
        Array::of3(&outcomes, &retried.into(), &more.into())
    }

    /// The loss counters for `stats()`: `c` as read from the queue (with its deltas), or
    /// undefined before the queue is open (then what was tracked so far waits in memory).
    pub fn stats(&self, c: &JsValue) -> JsValue {
        let mut c = if c.is_object() {
            Counters::from_js(c)
        } else {
            let n = self.page.len() as f64;
            Counters {
                device_id: self.device.clone(),
                enqueued: n,
                pending: n,
                ..Counters::default()
            }
        };
        if self.unstored_drops > 0.0 {
            c.enqueued += self.unstored_drops;
            c.drop_n("consent".into(), self.unstored_drops);
        }
        c.to_js()
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
    /// Held back: this tab's backoff, or the relay's wait (read again: another tab may have
    /// been told one).
    fn waiting(&self) -> bool {
        let t = now();
        t < self.backoff_until
            || t < self.server_wait_until
            || t < num(&self.host.load(false, "wait"))
    }

    fn keep(&self, session: bool, key: &str, value: &JsValue) {
        self.host.keep(session, &key.into(), value);
    }

    fn keep_rescue(&self, value: &JsValue) {
        self.host
            .keep(false, &join(&"rescue".into(), &self.stream, "."), value);
    }

    /// Remakes the identity and context objects every event carries.
    fn refresh(&mut self) {
        let ids: JsValue = Object::new().into();
        set(&ids, "anon_id", &self.anon);
        if !self.user.is_undefined() {
            set(&ids, "user_id", &self.user);
        }
        set(&ids, "session_id", &self.session);
        set(&ids, "device_id", &self.device_stream);
        self.ids = ids;
        let extra: JsValue = Object::new().into();
        if !self.attribution.is_undefined() {
            set(&extra, "attribution", &self.attribution);
        }
        if self.memory {
            set(&extra, "degraded", &"memory_queue".into());
        }
        self.extra = extra;
    }

    /// Keeps the identity in localStorage (only with consent): device, visitor, user,
    /// session and attribution.
    fn save_identity(&mut self) {
        if self.consent != Consent::Granted {
            return;
        }
        if !self.claimed {
            self.claimed = true;
            self.keep(true, "tab", &self.stream);
            let live = live_tabs(&self.host);
            live.push(&self.stream);
            // Bounded: a tab that crashed never takes its stream off the list.
            let n = live.length();
            let live = if n > 50 { live.slice(n - 50, n) } else { live };
            self.keep(false, "tabs", &live);
        }
        self.keep(false, "dev", &self.device);
        self.keep(false, "anon", &self.anon);
        self.keep(false, "user", &self.user);
        self.keep(
            false,
            "sess",
            &join(&self.session, &self.session_last.into(), " "),
        );
        if self.attribution.is_object() {
            self.keep(false, "attr", &self.attribution);
        }
    }

    /// At consent: a tab given consent earlier kept its identity (device, visitor, user,
    /// session); this page takes it, so the site's tabs are one device and one visitor and the
    /// counters add up.
    fn adopt_stored_identity(&mut self) {
        let device = self.host.load(false, "dev");
        if !device.is_string() {
            return;
        }
        self.device = device;
        self.device_stream = join(&self.device, &self.stream, ".");
        let anon = self.host.load(false, "anon");
        if anon.is_string() {
            self.anon = anon;
        }
        let user = self.host.load(false, "user");
        if user.is_string() {
            self.user = user;
        }
        let (session, last) = stored_session(&self.host);
        if session.is_string() {
            self.session = session;
            self.session_last = self.session_last.max(last);
        }
        self.refresh();
    }

    /// Takes this tab's stream off the list of live tabs.
    fn release(&mut self) {
        if !core::mem::take(&mut self.claimed) {
            return;
        }
        let live = live_tabs(&self.host);
        let at = live.index_of(&self.stream, 0);
        if at >= 0 {
            let at = at as u32;
            let rest = live.slice(at + 1, live.length());
            self.keep(false, "tabs", &live.slice(0, at).concat(&rest));
        }
    }

    /// Stamps an event and builds its JSON now (so later changes to `props` do not leak in);
    /// it is written with the task's other events (`take`).
    #[inline(never)]
    fn event(&mut self, name: &JsValue, schema: &str, props: JsValue, ctx: &JsValue) {
        let id = get(ctx, "id");
        if !id.is_string() {
            return;
        }
        // (The snippet's queue is the page's: anything may be there.)
        let ts = get(ctx, "ts");
        let ts = if js_sys::Number::is_finite(&ts) {
            num(&ts)
        } else {
            now()
        };
        if self.consent == Consent::Denied {
            self.unstored_drops += 1.0;
            return;
        }
        if policy::new_session(self.session_last, ts, self.session_timeout_ms, false) {
            self.session = self.host.uuid();
            self.refresh();
        }
        self.session_last = self.session_last.max(ts);
        self.seq += 1.0;
        let props = if props.is_object() {
            props
        } else {
            Object::new().into()
        };
        let record = self.host.event(
            &id,
            name,
            schema,
            ts,
            self.seq,
            &props,
            ctx,
            &self.ids,
            &self.extra,
        );
        let bytes = num(&get(&record, "b"));
        // Unserialisable props (a cycle, a BigInt) count as too large: they cannot be sent.
        if !record.is_object() || bytes > self.max_event_bytes {
            self.drops.push(("too_large".into(), 1.0, 0));
            return;
        }
        let item = Item {
            id,
            record,
            bytes,
            batch: 0,
            beaconed: false,
            rescued: false,
        };
        if self.consent == Consent::Pending {
            // Bounded by count and bytes: the oldest go first, as from the queue.
            self.held_bytes += bytes;
            self.held.push(item);
            while self.held.len() > HOLD_EVENTS || self.held_bytes > HOLD_BYTES {
                let oldest = self.held.remove(0);
                self.held_bytes -= oldest.bytes;
                self.held_drops += 1.0;
            }
            return;
        }
        // The beacon list is bounded: the oldest committed events leave it first.
        if self.page.len() >= 2_000
            && let Some(i) = self
                .page
                .iter()
                .position(|it| it.batch == PERSISTED || (self.memory && it.batch != 0))
        {
            self.page.remove(i);
        }
        self.page.push(item);
    }
}

/// The stored session and its last activity (localStorage `trueup.sess`, "<session> <last
/// activity>"), or undefined and 0.
fn stored_session(host: &Host) -> (JsValue, f64) {
    match host.load(false, "sess").dyn_ref::<js_sys::JsString>() {
        Some(s) => {
            let parts = s.split(" ");
            (parts.get(0), parts.get(1).unchecked_into_f64())
        }
        None => (JsValue::UNDEFINED, 0.0),
    }
}

/// The streams of the site's live tabs (localStorage `trueup.tabs`, a JSON array): a tab adds
/// its own when it starts (with consent) and takes it off at `pagehide`.
fn live_tabs(host: &Host) -> Array {
    match parse(&host.load(false, "tabs")) {
        Ok(v) if Array::is_array(&v) => v.unchecked_into(),
        _ => Array::new(),
    }
}

/// Reads the relay's per-event answer (`trueup_protocol::BatchResponse`): accepted or
/// duplicate → true (acked), rejected → `rejected`. An answer that does not match the batch
/// settles nothing (everything is retried; the relay dedupes).
fn outcomes_of(answer: &JsValue, n: u32) -> Array {
    let out = Array::new();
    let results = get(answer, "results");
    let Some(results) = results.dyn_ref::<Array>().filter(|r| r.length() == n) else {
        return out;
    };
    for r in results.iter() {
        let status = get(&r, "status");
        let outcome = if status == "accepted" || status == "duplicate" {
            JsValue::TRUE
        } else if status == "rejected" {
            status
        } else {
            return Array::new();
        };
        out.push(&outcome);
    }
    out
}
