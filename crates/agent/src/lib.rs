//! trueup's browser agent, compiled to WebAssembly and driven by a tiny JS stub.
//!
//! # What it promises
//!
//! - Every event gets, at `track()` time, its id (UUIDv7, made by the stub), its capture
//!   time, and its `seq`; its JSON is made once, then persisted in IndexedDB in a
//!   transaction issued in the same task (one transaction per task, not per event).
//! - Events leave the queue only when the relay has answered for them (accepted or
//!   duplicate → `acked`; rejected → `dropped.rejected`), when they are too old
//!   (`dropped.expired`), when the queue is over its byte cap (oldest first,
//!   `dropped.queue_full`), or on opt-out (`dropped.consent`). So
//!   `enqueued = acked + dropped + pending` at every commit.
//! - One tab sends (a Web Lock); every tab writes. On `pagehide`/`visibilitychange→hidden`,
//!   each tab beacons its own unacknowledged events (deduped by id at the relay); what does
//!   not fit stays queued for the next page load. No `unload` listener, and the lock is
//!   released on `pagehide`, so the page stays bfcache-eligible.
//! - Nothing here throws into the page: every export catches, and the stub catches around it.
//!
//! # Sequence streams
//!
//! `seq` must be known synchronously at `track()` time (so a beacon sent at `pagehide` can
//! carry it) and unique, but tabs share the device. So each tab numbers its own stream:
//! events carry `device_id = "<device>.<tab>"`, where `<tab>` lives in `sessionStorage`
//! (it survives reloads and navigations in the tab) and `seq` counts 1, 2, 3… per stream. A
//! gap in a stream's `seq` at the relay is an event that left `track()` and never arrived.
//! The counters are per device (`<device>`), shared by the tabs.
//!
//! # Identity
//!
//! The device id, visitor id (`anon_id`), user id, session and attribution live in
//! `localStorage` (written only with consent): it is synchronous, so the agent stamps events
//! the moment it is constructed, before IndexedDB has opened. Events tracked meanwhile wait
//! in memory (and go out by beacon if the page is hidden first).

#![deny(missing_docs)]

// Talc instead of Rust's default dlmalloc: smaller in the wasm and faster (its README's
// WebAssembly benchmarks); single-threaded, as the agent is.
#[cfg(all(not(target_feature = "atomics"), target_family = "wasm"))]
#[global_allocator]
static TALC: talc::wasm::WasmDynamicTalc = talc::wasm::new_wasm_dynamic_allocator();

pub mod attribution;
pub mod policy;
pub mod queue;

use std::cell::RefCell;
use std::rc::Rc;

use js_sys::{Array, Function, JSON, JsString, Object, Promise, Reflect};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, future_to_promise, spawn_local};

use crate::policy::Verdict;
use crate::queue::{Counters, Entry, Mem, Queue, Settle};

/// JS strings used on every event, made once.
struct Keys {
    id: JsValue,
    name: JsValue,
    schema: JsValue,
    ts: JsValue,
    source: JsValue,
    anon_id: JsValue,
    user_id: JsValue,
    session_id: JsValue,
    device_id: JsValue,
    seq: JsValue,
    props: JsValue,
    context: JsValue,
    url: JsValue,
    referrer: JsValue,
    title: JsValue,
    attribution: JsValue,
    degraded: JsValue,
    client: JsValue,
    memory_queue: JsValue,
}

thread_local! {
    static KEYS: Keys = Keys {
        id: "id".into(),
        name: "name".into(),
        schema: "schema".into(),
        ts: "ts".into(),
        source: "source".into(),
        anon_id: "anon_id".into(),
        user_id: "user_id".into(),
        session_id: "session_id".into(),
        device_id: "device_id".into(),
        seq: "seq".into(),
        props: "props".into(),
        context: "context".into(),
        url: "url".into(),
        referrer: "referrer".into(),
        title: "title".into(),
        attribution: "attribution".into(),
        degraded: "degraded".into(),
        client: "client".into(),
        memory_queue: "memory_queue".into(),
    };
}

/// The identity as JS strings, remade when it changes (not per event).
struct Ids {
    anon: JsValue,
    user: JsValue,
    session: JsValue,
    device_stream: JsValue,
}

impl Ids {
    fn of(st: &State) -> Ids {
        Ids {
            anon: st.anon.as_str().into(),
            user: st.user.as_deref().map_or(JsValue::UNDEFINED, JsValue::from),
            session: st.session.as_str().into(),
            device_stream: (String::new() + &st.device + "." + &st.stream).into(),
        }
    }
}

/// Options, as passed to `init()` (camelCase in JS); read with js-sys, not serde, for size.
#[derive(Clone)]
struct Options {
    /// The site key.
    site: String,
    /// The collection endpoint.
    endpoint: String,
    /// Queue byte cap; the oldest events are evicted beyond it.
    max_queue_bytes: f64,
    /// Events older than this are dropped as expired.
    max_age_ms: f64,
    /// Largest event (JSON), bytes; larger ones are dropped as too_large.
    max_event_bytes: f64,
    /// Delay between an event and its batch being sent.
    flush_interval_ms: f64,
    /// Largest batch body, bytes (under the page's 64 KiB keepalive budget).
    batch_bytes: f64,
    /// Most events per batch.
    max_batch_events: f64,
    /// `granted` (default) or `pending` (store and send nothing until `consent(true)`).
    consent: String,
    /// Idle time after which a new session starts.
    session_timeout_ms: f64,
    /// Send timeout.
    request_timeout_ms: f64,
    /// `auto` (IndexedDB, else memory) or `memory`.
    storage: String,
    /// First retry delay.
    retry_base_ms: f64,
    /// Cap of the exponential backoff.
    retry_cap_ms: f64,
}

impl Options {
    fn from_js(o: &JsValue) -> Options {
        let f = |k: &str, d: f64| {
            Reflect::get(o, &k.into())
                .ok()
                .and_then(|v| v.as_f64())
                .filter(|n| *n > 0.0)
                .unwrap_or(d)
        };
        let s = |k: &str, d: &str| {
            Reflect::get(o, &k.into())
                .ok()
                .and_then(|v| v.as_string())
                .unwrap_or_else(|| d.into())
        };
        Options {
            site: s("site", ""),
            endpoint: s("endpoint", "/_r/q"),
            max_queue_bytes: f("maxQueueBytes", 5_000_000.0),
            max_age_ms: f("maxAgeMs", 7.0 * 86_400_000.0),
            max_event_bytes: f("maxEventBytes", 32_000.0),
            flush_interval_ms: f("flushIntervalMs", 1_000.0),
            batch_bytes: f("batchBytes", 60_000.0).min(63_000.0),
            max_batch_events: f("maxBatchEvents", 200.0),
            consent: s("consent", "granted"),
            session_timeout_ms: f("sessionTimeoutMs", 30.0 * 60_000.0),
            request_timeout_ms: f("requestTimeoutMs", 10_000.0),
            storage: s("storage", "auto"),
            retry_base_ms: f("retryBaseMs", 1_000.0),
            retry_cap_ms: f("retryCapMs", 5.0 * 60_000.0),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Consent {
    Granted,
    Pending,
    Denied,
}

struct State {
    queue: Option<Rc<Queue>>,
    /// Events made this task, persisted by one transaction in a microtask.
    writes: Vec<Entry>,
    write_scheduled: bool,
    /// This page's events not known to be acknowledged, for the `pagehide` beacon.
    /// (event, beaconed, persisted).
    mirror: Vec<(Entry, bool, bool)>,
    /// Events held while consent is pending.
    held: Vec<Entry>,
    device: String,
    stream: String,
    seq: f64,
    anon: String,
    user: Option<String>,
    session: String,
    session_last: f64,
    /// `{first?, last?}`; undefined when there is no touch yet.
    attribution: JsValue,
    consent: Consent,
    leader: bool,
    release_lock: Option<Function>,
    in_flight: bool,
    failures: u32,
    backoff_until: f64,
    split_limit: usize,
    due_at: f64,
    stopped: bool,
    /// Drops counted while nothing may be stored (consent denied).
    unstored_drops: u64,
    /// The identity as JS strings.
    ids: Ids,
    /// Events were written since the sending tab last folded counters and enforced the cap.
    dirty: bool,
    /// This tab left a rescue list in localStorage (see `rescue`).
    rescued: bool,
    /// Known at construction when IndexedDB is missing or not wanted: events are flagged
    /// `degraded: memory_queue` from the first one.
    memory_only: bool,
}

struct Core {
    opts: Options,
    st: RefCell<State>,
    channel: Option<web_sys::BroadcastChannel>,
}

/// The agent. The stub constructs one per page and forwards every call.
#[wasm_bindgen]
pub struct Agent {
    core: Rc<Core>,
}

fn now() -> f64 {
    js_sys::Date::now()
}

fn random_id() -> String {
    let crypto = Reflect::get(&js_sys::global(), &"crypto".into()).unwrap_or_default();
    Reflect::get(&crypto, &"randomUUID".into())
        .ok()
        .and_then(|f| f.dyn_into::<Function>().ok())
        .and_then(|f| f.call0(&crypto).ok())
        .and_then(|v| v.as_string())
        .unwrap_or_else(|| {
            let n = (js_sys::Math::random() * 9e15) as u64;
            let m = (js_sys::Math::random() * 9e15) as u64;
            let mut s = String::new();
            for x in [n, m] {
                let mut x = x;
                while x > 0 {
                    s.push(char::from_digit((x % 36) as u32, 36).unwrap_or('0'));
                    x /= 36;
                }
            }
            s
        })
}

fn set(o: &Object, k: &str, v: &JsValue) {
    let _ = Reflect::set(o, &k.into(), v);
}

fn get_str(v: &JsValue, k: &str) -> Option<String> {
    Reflect::get(v, &k.into()).ok()?.as_string()
}

/// A number as text, by JS (keeps Rust's float formatting out of the wasm).
fn num_text(n: f64) -> String {
    js_sys::Number::from(n)
        .to_string_with_radix(10)
        .ok()
        .and_then(|t| JsValue::from(t).as_string())
        .unwrap_or_default()
}

fn local_storage() -> Option<web_sys::Storage> {
    web_sys::window().and_then(|w| w.local_storage().ok().flatten())
}

fn local_get(key: &str) -> Option<String> {
    local_storage()?
        .get_item(&(String::from("trueup.") + key))
        .ok()
        .flatten()
}

fn local_set(key: &str, value: &str) {
    if let Some(s) = local_storage() {
        let _ = s.set_item(&(String::from("trueup.") + key), value);
    }
}

fn local_remove(key: &str) {
    if let Some(s) = local_storage() {
        let _ = s.remove_item(&(String::from("trueup.") + key));
    }
}

/// The URL the page was loaded with (the navigation entry: unaffected by later
/// `history.replaceState`) and the referrer.
fn landing_page() -> (String, String) {
    let Some(w) = web_sys::window() else {
        return Default::default();
    };
    let nav = Reflect::get(&w, &"performance".into())
        .ok()
        .and_then(|p| {
            let f: Function = Reflect::get(&p, &"getEntriesByType".into())
                .ok()?
                .dyn_into()
                .ok()?;
            f.call1(&p, &"navigation".into()).ok()
        })
        .map(|entries| Reflect::get(&entries, &0.into()).unwrap_or_default());
    let href = nav
        .and_then(|e| get_str(&e, "name"))
        .filter(|n| n.starts_with("http"))
        .unwrap_or_else(|| w.location().href().unwrap_or_default());
    (href, w.document().map(|d| d.referrer()).unwrap_or_default())
}

fn session_storage(key: &str, make: impl FnOnce() -> String) -> String {
    let storage = web_sys::window().and_then(|w| w.session_storage().ok().flatten());
    if let Some(s) = &storage
        && let Ok(Some(v)) = s.get_item(key)
    {
        return v;
    }
    let v = make();
    if let Some(s) = storage {
        let _ = s.set_item(key, &v);
    }
    v
}

#[wasm_bindgen]
impl Agent {
    /// Creates the agent; it opens its storage in the background and replays the calls
    /// made meanwhile in order. Never throws.
    #[wasm_bindgen(constructor)]
    pub fn new(options: JsValue) -> Agent {
        let opts = Options::from_js(&options);
        let stream = session_storage("trueup.tab", random_id);
        let seq = js_sys::parse_float(&session_storage("trueup.seq", || "0".into()));
        let seq = if seq.is_finite() { seq } else { 0.0 };
        let consent = match local_get("consent").as_deref() {
            Some("granted") => Consent::Granted,
            Some("denied") => Consent::Denied,
            _ if opts.consent == "pending" => Consent::Pending,
            _ => Consent::Granted,
        };
        let t = now();
        let (landing, referrer) = landing_page();
        let stored_attr = local_get("attr")
            .and_then(|a| JSON::parse(&a).ok())
            .unwrap_or_default();
        let (attribution, new_campaign) =
            attribution::apply(&stored_attr, attribution::touch_of(&landing, &referrer, t));
        let (mut session, mut session_last) = local_get("sess")
            .and_then(|s| {
                s.split_once(' ')
                    .map(|(id, last)| (id.to_string(), js_sys::parse_float(last)))
            })
            .unwrap_or_default();
        if session.is_empty()
            || policy::new_session(session_last, t, opts.session_timeout_ms, new_campaign)
        {
            session = random_id();
            session_last = t;
        }
        let has_touch = Reflect::has(&attribution, &"first".into()).unwrap_or(false);
        let channel = web_sys::BroadcastChannel::new("trueup").ok();
        let memory_only = opts.storage == "memory"
            || web_sys::window()
                .and_then(|w| w.indexed_db().ok().flatten())
                .is_none();
        let core = Rc::new(Core {
            opts,
            channel,
            st: RefCell::new(State {
                queue: None,
                writes: Vec::new(),
                write_scheduled: false,
                mirror: Vec::new(),
                held: Vec::new(),
                device: local_get("dev").unwrap_or_else(random_id),
                stream,
                seq,
                anon: local_get("anon").unwrap_or_else(random_id),
                user: local_get("user"),
                session,
                session_last,
                attribution: if has_touch {
                    attribution.into()
                } else {
                    JsValue::UNDEFINED
                },
                consent,
                leader: false,
                release_lock: None,
                in_flight: false,
                failures: 0,
                backoff_until: 0.0,
                split_limit: usize::MAX,
                due_at: f64::INFINITY,
                stopped: false,
                unstored_drops: 0,
                memory_only,
                dirty: true,
                rescued: false,
                ids: Ids {
                    anon: JsValue::UNDEFINED,
                    user: JsValue::UNDEFINED,
                    session: JsValue::UNDEFINED,
                    device_stream: JsValue::UNDEFINED,
                },
            }),
        });
        core.refresh_ids();
        core.save_identity();
        core.listen();
        let c = core.clone();
        spawn_local(async move { c.start().await });
        Agent { core }
    }

    /// Handles `track`, `page`, `identify`, `reset` and `consent`, with the call-time
    /// context `{id, ts, url, referrer, title}`. Never throws. Events are stamped (ids,
    /// `seq`, identity) at once, even before the queue is open, so a `pagehide` beacon can
    /// carry them whatever the agent's start-up has reached.
    pub fn call(&self, method: &str, args: Array, ctx: JsValue) {
        self.core.apply(method, &args, &ctx);
    }

    /// Sends what is queued now. Resolves when the attempt is over (or, in a tab that is not
    /// the sender, once the sending tab has been asked).
    pub fn flush(&self) -> Promise {
        let c = self.core.clone();
        future_to_promise(async move {
            c.persist().await;
            if c.st.borrow().leader {
                c.send_round().await;
            } else if let Some(ch) = &c.channel {
                let _ = ch.post_message(&"f".into());
            }
            Ok(JsValue::UNDEFINED)
        })
    }

    /// The loss counters (a Promise of `{device_id, enqueued, sent, acked, retried, pending,
    /// dropped, degraded}`).
    pub fn stats(&self) -> Promise {
        let c = self.core.clone();
        future_to_promise(async move {
            let queue = c.st.borrow().queue.clone();
            let mut counters = match queue {
                Some(q) => q.counters().await,
                // Not open yet: what was tracked so far waits in memory.
                None => {
                    let st = c.st.borrow();
                    let n = st.writes.len() as u64;
                    Counters {
                        device_id: st.device.clone(),
                        enqueued: n,
                        pending: n,
                        ..Counters::default()
                    }
                }
            };
            let extra = c.st.borrow().unstored_drops;
            if extra > 0 {
                counters.enqueued += extra;
                counters.drop_n("consent", extra);
            }
            Ok(queue::counters_to(&counters))
        })
    }

    /// First- and last-touch attribution, for a signup form to hand to the server.
    pub fn attribution(&self) -> JsValue {
        let a = self.core.st.borrow().attribution.clone();
        if a.is_object() {
            a
        } else {
            Object::new().into()
        }
    }

    /// Persists and flushes, then stops sending (timers, lock).
    pub fn shutdown(&self) -> Promise {
        let c = self.core.clone();
        future_to_promise(async move {
            c.persist().await;
            if c.st.borrow().leader {
                c.send_round().await;
            }
            let mut st = c.st.borrow_mut();
            st.stopped = true;
            if let Some(release) = st.release_lock.take() {
                let _ = release.call0(&JsValue::UNDEFINED);
            }
            Ok(JsValue::UNDEFINED)
        })
    }
}

impl Core {
    /// Opens the queue (IndexedDB, else memory), then persists what was tracked meanwhile
    /// and takes part in sending.
    async fn start(self: &Rc<Self>) {
        let idb = if self.opts.storage == "memory" {
            None
        } else {
            queue::open_idb("trueup").await.ok()
        };
        let queue = Rc::new(match idb {
            Some(db) => Queue::Idb(db),
            None => Queue::Mem(RefCell::new(Mem::default())),
        });
        let degraded = !queue.durable();
        let dev = self.st.borrow().device.clone();
        let _ = queue
            .update_counters(move |c| {
                c.device_id = dev;
                c.degraded = degraded.then(|| "memory_queue".to_string());
            })
            .await;
        {
            let mut st = self.st.borrow_mut();
            st.memory_only = degraded;
            st.queue = Some(queue.clone());
        }
        if !degraded && self.st.borrow().consent == Consent::Granted {
            self.adopt_rescued(&queue).await;
        }
        self.persist().await;
        self.request_lock();
    }

    /// The tab's `seq` (sessionStorage) and the session's last activity (localStorage, with
    /// consent).
    fn save_progress(&self) {
        let st = self.st.borrow();
        if let Some(s) = web_sys::window().and_then(|w| w.session_storage().ok().flatten()) {
            let _ = s.set_item("trueup.seq", &num_text(st.seq));
        }
        if st.consent == Consent::Granted {
            local_set(
                "sess",
                &(st.session.clone() + " " + &num_text(st.session_last)),
            );
        }
    }

    fn refresh_ids(&self) {
        let mut st = self.st.borrow_mut();
        let ids = Ids::of(&st);
        st.ids = ids;
    }

    /// Keeps the identity in localStorage (only with consent): device, visitor, user,
    /// session and attribution.
    fn save_identity(&self) {
        let st = self.st.borrow();
        if st.consent != Consent::Granted {
            return;
        }
        local_set("dev", &st.device);
        local_set("anon", &st.anon);
        match &st.user {
            Some(u) => local_set("user", u),
            None => local_remove("user"),
        }
        let last = num_text(st.session_last);
        local_set("sess", &(st.session.clone() + " " + &last));
        if let Some(a) = JSON::stringify(&st.attribution)
            .ok()
            .and_then(|a| JsValue::from(a).as_string())
            .filter(|_| st.attribution.is_object())
        {
            local_set("attr", &a);
        }
    }

    fn apply(self: &Rc<Self>, method: &str, args: &Array, ctx: &JsValue) {
        match method {
            "track" => {
                if let Some(name) = args.get(0).as_string() {
                    self.event(&name, "event/1", args.get(1), ctx);
                }
            }
            "page" => self.event("page_view", "page_view/1", args.get(0), ctx),
            "identify" => {
                let Some(user) = args.get(0).as_string() else {
                    return;
                };
                self.st.borrow_mut().user = Some(user);
                self.refresh_ids();
                self.save_identity();
                let props = Object::new();
                let traits = args.get(1);
                if traits.is_object() {
                    set(&props, "traits", &traits);
                }
                self.event("identify", "identify/1", props.into(), ctx);
            }
            "reset" => {
                {
                    let mut st = self.st.borrow_mut();
                    st.user = None;
                    st.anon = random_id();
                    st.session = random_id();
                }
                self.refresh_ids();
                self.save_identity();
            }
            "consent" => self.consent(args.get(0).is_truthy()),
            _ => {}
        }
    }

    fn consent(self: &Rc<Self>, granted: bool) {
        let held = {
            let mut st = self.st.borrow_mut();
            st.consent = if granted {
                Consent::Granted
            } else {
                Consent::Denied
            };
            std::mem::take(&mut st.held)
        };
        if granted {
            local_set("consent", "granted");
            self.save_identity();
            {
                let mut st = self.st.borrow_mut();
                for e in held {
                    st.mirror.push((e.clone(), false, false));
                    st.writes.push(e);
                }
            }
            let me = self.clone();
            spawn_local(async move { me.persist().await });
            return;
        }
        // Opt-out: forget the identity, drop what is held and queued, and count it.
        local_set("consent", "denied");
        for k in ["dev", "anon", "user", "sess", "attr"] {
            local_remove(k);
        }
        let n_held = held.len() as u64;
        let queue = {
            let mut st = self.st.borrow_mut();
            st.mirror.clear();
            st.writes.clear();
            st.queue.clone()
        };
        match queue {
            Some(q) => spawn_local(async move {
                if n_held > 0 {
                    let _ = q.drop_uncounted("consent", n_held).await;
                }
                let _ = q.clear("consent").await;
            }),
            None => self.st.borrow_mut().unstored_drops += n_held,
        }
    }

    /// Builds the event's JSON now (so later changes to `props` do not leak in) and queues
    /// its persistence for the end of the task.
    fn event(self: &Rc<Self>, name: &str, schema: &str, props: JsValue, ctx: &JsValue) {
        KEYS.with(|k| self.event_with(k, name, schema, props, ctx));
    }

    /// `event`, with the property names made once per page (creating a JS string from Rust
    /// costs a UTF-8 decode per call, which showed in `track()`'s profile).
    fn event_with(
        self: &Rc<Self>,
        k: &Keys,
        name: &str,
        schema: &str,
        props: JsValue,
        ctx: &JsValue,
    ) {
        let ts = Reflect::get(ctx, &k.ts)
            .ok()
            .and_then(|v| v.as_f64())
            .unwrap_or_else(now);
        let id = Reflect::get(ctx, &k.id).unwrap_or_default();
        if !id.is_string() {
            return;
        }
        let mut st = self.st.borrow_mut();
        if st.consent == Consent::Denied {
            st.unstored_drops += 1;
            return;
        }
        if policy::new_session(st.session_last, ts, self.opts.session_timeout_ms, false) {
            st.session = random_id();
            let ids = Ids::of(&st);
            st.ids = ids;
        }
        st.session_last = st.session_last.max(ts);
        st.seq += 1.0;
        let ev = Object::new();
        let put = |o: &Object, key: &JsValue, v: &JsValue| drop(Reflect::set(o, key, v));
        put(&ev, &k.id, &id);
        put(&ev, &k.name, &name.into());
        put(&ev, &k.schema, &schema.into());
        put(&ev, &k.ts, &ts.into());
        put(&ev, &k.source, &k.client);
        put(&ev, &k.anon_id, &st.ids.anon);
        if !st.ids.user.is_undefined() {
            put(&ev, &k.user_id, &st.ids.user);
        }
        put(&ev, &k.session_id, &st.ids.session);
        put(&ev, &k.device_id, &st.ids.device_stream);
        put(&ev, &k.seq, &st.seq.into());
        put(
            &ev,
            &k.props,
            &if props.is_object() {
                props
            } else {
                Object::new().into()
            },
        );
        let cx = Object::new();
        for key in [&k.url, &k.referrer, &k.title] {
            let v = Reflect::get(ctx, key).unwrap_or_default();
            if v.dyn_ref::<JsString>().is_some_and(|s| s.length() > 0) {
                put(&cx, key, &v);
            }
        }
        if !st.attribution.is_undefined() {
            put(&cx, &k.attribution, &st.attribution);
        }
        let degraded = st.memory_only || st.queue.as_ref().is_some_and(|q| !q.durable());
        if degraded {
            put(&cx, &k.degraded, &k.memory_queue);
        }
        put(&ev, &k.context, &cx);
        let json = JSON::stringify(&ev).ok();
        let queue = st.queue.clone();
        let fits = json
            .as_ref()
            .is_some_and(|j| f64::from(j.length()) <= self.opts.max_event_bytes);
        let Some(json) = json.filter(|_| fits) else {
            drop(st);
            if let Some(q) = queue {
                spawn_local(async move {
                    let _ = q.drop_uncounted("too_large", 1).await;
                });
            }
            return;
        };
        let entry = Entry {
            id: id.unchecked_into(),
            bytes: f64::from(json.length()),
            json,
            ts,
        };
        if st.consent == Consent::Pending {
            st.held.push(entry);
            return;
        }
        if st.mirror.len() >= 2_000 {
            st.mirror.remove(0);
        }
        st.mirror.push((entry.clone(), false, false));
        st.writes.push(entry);
        if !st.write_scheduled {
            st.write_scheduled = true;
            drop(st);
            let me = self.clone();
            spawn_local(async move { me.persist().await });
        }
    }

    /// Persists this task's events in one transaction, then tells the sender.
    async fn persist(self: &Rc<Self>) {
        // Once per task rather than per event (a Storage write costs ~20 µs): the tab's seq
        // and the session's last activity. This runs in the task that tracked the events.
        self.save_progress();
        let (queue, writes) = {
            let mut st = self.st.borrow_mut();
            st.write_scheduled = false;
            // Until the queue is open, events wait here (and in the beacon mirror).
            let Some(q) = st.queue.clone() else { return };
            (q, std::mem::take(&mut st.writes))
        };
        let q = queue;
        if writes.is_empty() {
            return;
        }
        let n = writes.len() as u64;
        if q.enqueue(&writes, self.opts.max_queue_bytes).await.is_err() {
            // Storage failed (quota, private mode): these events are counted, not lost silently.
            let _ = q.drop_uncounted("storage_unavailable", n).await;
            let mut st = self.st.borrow_mut();
            st.mirror
                .retain(|(m, _, _)| !writes.iter().any(|w| w.id == m.id));
            return;
        }
        {
            let mut st = self.st.borrow_mut();
            st.dirty = true;
            for m in st.mirror.iter_mut() {
                if !m.2 && writes.iter().any(|w| w.id == m.0.id) {
                    m.2 = true;
                }
            }
            // Back visible and all committed: the rescue list is no longer needed.
            if st.rescued && st.mirror.iter().all(|m| m.2) {
                st.rescued = false;
                local_remove(&(String::from("rescue.") + &st.stream));
            }
        }
        self.wake();
        if !self.st.borrow().leader
            && let Some(ch) = &self.channel
        {
            let _ = ch.post_message(&"w".into());
        }
    }

    fn wake(&self) {
        let mut st = self.st.borrow_mut();
        let due = now() + self.opts.flush_interval_ms;
        if due < st.due_at {
            st.due_at = due;
        }
    }

    fn listen(self: &Rc<Self>) {
        let Some(window) = web_sys::window() else {
            return;
        };
        let me = self.clone();
        let on_hide = Closure::<dyn FnMut(web_sys::Event)>::new(move |e: web_sys::Event| {
            let hidden = e.type_() == "pagehide"
                || web_sys::window()
                    .and_then(|w| w.document())
                    .is_some_and(|d| d.visibility_state() == web_sys::VisibilityState::Hidden);
            if hidden {
                me.rescue();
                me.beacon();
                if e.type_() == "pagehide" {
                    me.release_lock();
                }
            }
        });
        let _ =
            window.add_event_listener_with_callback("pagehide", on_hide.as_ref().unchecked_ref());
        if let Some(doc) = window.document() {
            let _ = doc.add_event_listener_with_callback(
                "visibilitychange",
                on_hide.as_ref().unchecked_ref(),
            );
        }
        on_hide.forget();
        let me = self.clone();
        let on_show = Closure::<dyn FnMut(web_sys::Event)>::new(move |e: web_sys::Event| {
            match e.type_().as_str() {
                "online" => {
                    // Failures while offline say nothing about the relay: send now.
                    me.st.borrow_mut().backoff_until = 0.0;
                    me.wake();
                }
                _ => {
                    // Back from the bfcache: take part in sending again.
                    if !me.st.borrow().leader {
                        me.request_lock();
                    }
                    me.wake();
                }
            }
        });
        let me = self.clone();
        let on_storage = Closure::<dyn FnMut(web_sys::Event)>::new(move |e: web_sys::Event| {
            // Another tab went away and rescued events it had not committed: adopt them now,
            // not at the next page load.
            let key = Reflect::get(&e, &"key".into())
                .ok()
                .and_then(|k| k.as_string());
            if key.is_some_and(|k| k.starts_with("trueup.rescue.")) {
                let me = me.clone();
                spawn_local(async move {
                    let queue = me.st.borrow().queue.clone();
                    if let Some(q) = queue.filter(|q| q.durable()) {
                        me.adopt_rescued(&q).await;
                        me.st.borrow_mut().dirty = true;
                        me.wake();
                    }
                });
            }
        });
        let _ =
            window.add_event_listener_with_callback("storage", on_storage.as_ref().unchecked_ref());
        on_storage.forget();
        let _ = window.add_event_listener_with_callback("online", on_show.as_ref().unchecked_ref());
        let _ =
            window.add_event_listener_with_callback("pageshow", on_show.as_ref().unchecked_ref());
        on_show.forget();
        if let Some(ch) = &self.channel {
            let me = self.clone();
            let on_msg = Closure::<dyn FnMut(web_sys::MessageEvent)>::new(
                move |e: web_sys::MessageEvent| {
                    if e.data().as_string().as_deref() == Some("f") {
                        me.st.borrow_mut().due_at = 0.0;
                    } else {
                        me.wake();
                    }
                },
            );
            ch.set_onmessage(Some(on_msg.as_ref().unchecked_ref()));
            on_msg.forget();
        }
    }

    /// Becomes the sending tab when the lock is granted (at once, or when the sending tab
    /// goes away); without Web Locks, every tab sends (the relay dedupes).
    fn request_lock(self: &Rc<Self>) {
        let locks = web_sys::window()
            .map(|w| w.navigator())
            .and_then(|n| Reflect::get(&n, &"locks".into()).ok())
            .filter(|l| l.is_object());
        let Some(locks) = locks else {
            self.lead();
            return;
        };
        let me = self.clone();
        let granted = Closure::once_into_js(move |_lock: JsValue| -> Promise {
            me.lead();
            let me2 = me.clone();
            Promise::new(&mut |resolve, _| {
                me2.st.borrow_mut().release_lock = Some(resolve);
            })
        });
        let request = Reflect::get(&locks, &"request".into())
            .ok()
            .and_then(|f| f.dyn_into::<Function>().ok());
        if let Some(request) = request
            && request
                .call2(&locks, &"trueup-sender".into(), &granted)
                .is_ok()
        {
            return;
        }
        self.lead();
    }

    fn release_lock(&self) {
        let mut st = self.st.borrow_mut();
        if let Some(release) = st.release_lock.take() {
            st.leader = false;
            let _ = release.call0(&JsValue::UNDEFINED);
        }
    }

    fn lead(self: &Rc<Self>) {
        {
            let mut st = self.st.borrow_mut();
            if st.leader || st.stopped {
                return;
            }
            st.leader = true;
            st.due_at = 0.0; // send what earlier pages left at once
        }
        let me = self.clone();
        spawn_local(async move {
            let mut first = true;
            loop {
                // Check at once when becoming the sender (what earlier pages left goes now),
                // then every 200 ms.
                if !std::mem::take(&mut first) {
                    gloo_timers::future::TimeoutFuture::new(200).await;
                }
                let (go, stop) = {
                    let st = me.st.borrow();
                    let online = web_sys::window()
                        .map(|w| w.navigator().on_line())
                        .unwrap_or(true);
                    let t = now();
                    (
                        online && t >= st.due_at && t >= st.backoff_until,
                        st.stopped || !st.leader,
                    )
                };
                if stop {
                    break;
                }
                // Fold the tabs' counter deltas and enforce the byte cap, online or not.
                // (No borrow of the state is held across an await.)
                let due_maintenance = {
                    let mut st = me.st.borrow_mut();
                    let dirty = std::mem::take(&mut st.dirty);
                    st.queue.clone().filter(|_| dirty)
                };
                if let Some(q) = due_maintenance
                    && q.maintain(me.opts.max_queue_bytes).await.is_err()
                {
                    me.st.borrow_mut().dirty = true;
                }
                if go {
                    me.send_round().await;
                }
            }
        });
    }

    /// Sends batches until the queue is empty or an attempt fails.
    async fn send_round(self: &Rc<Self>) {
        let Some(q) = self.st.borrow().queue.clone() else {
            return;
        };
        if std::mem::replace(&mut self.st.borrow_mut().in_flight, true) {
            return;
        }
        loop {
            let limit = self
                .st
                .borrow()
                .split_limit
                .min(self.opts.max_batch_events as usize);
            let entries = match q
                .peek(
                    self.opts.batch_bytes - 1_000.0,
                    limit,
                    now(),
                    self.opts.max_age_ms,
                )
                .await
            {
                Ok(e) => e,
                Err(_) => break,
            };
            if entries.is_empty() {
                self.st.borrow_mut().due_at = f64::INFINITY;
                break;
            }
            let counters = q.counters().await;
            let body = envelope(&self.opts.site, &entries, &counters);
            let (status, retry_after, answer) = post(
                &self.opts.endpoint,
                &body,
                self.opts.request_timeout_ms as u32,
            )
            .await;
            let n = entries.len() as u64;
            let retried = if self.st.borrow().failures > 0 { n } else { 0 };
            let verdict = policy::classify(status);
            let outcomes: Vec<(JsString, Settle)> = match verdict {
                Verdict::Answered => answered(&entries, answer),
                Verdict::Split if entries.len() == 1 => {
                    vec![(entries[0].id.clone(), Settle::Dropped("too_large"))]
                }
                Verdict::Split => {
                    self.st.borrow_mut().split_limit = (entries.len() / 2).max(1);
                    Vec::new()
                }
                Verdict::Drop => entries
                    .iter()
                    .map(|e| (e.id.clone(), Settle::Dropped("rejected")))
                    .collect(),
                Verdict::Retry => Vec::new(),
            };
            let settled = !outcomes.is_empty();
            let _ = q.settle(&outcomes, n, retried).await;
            let mut st = self.st.borrow_mut();
            st.mirror
                .retain(|(m, _, _)| !outcomes.iter().any(|(id, _)| *id == m.id));
            if settled {
                st.failures = 0;
                st.split_limit = st.split_limit.saturating_mul(2);
            } else if verdict != Verdict::Split {
                st.failures += 1;
                let wait = policy::backoff_ms(
                    st.failures,
                    js_sys::Math::random(),
                    retry_after,
                    self.opts.retry_base_ms,
                    self.opts.retry_cap_ms,
                );
                st.backoff_until = now() + wait;
                break;
            }
        }
        self.st.borrow_mut().in_flight = false;
    }

    /// On `pagehide`/hidden: hands this page's unacknowledged events to `sendBeacon`, in
    /// bodies under the batch budget, until the browser refuses (the keepalive quota).
    /// On `pagehide`/hidden: keeps this tab's events that IndexedDB has not committed yet in
    /// `localStorage` (synchronous, so it survives the tab going away right now). The next
    /// page of the site adopts them into the queue (`adopt_rescued`); the queue is keyed by
    /// event id, so an event that was committed after all is not added twice.
    fn rescue(&self) {
        let mut st = self.st.borrow_mut();
        if st.consent != Consent::Granted {
            return;
        }
        let key = String::from("rescue.") + &st.stream;
        let list = Array::new();
        for (e, _, persisted) in st.mirror.iter() {
            if !*persisted {
                let o = Object::new();
                set(&o, "i", &e.id);
                set(&o, "s", &e.json);
                set(&o, "b", &e.bytes.into());
                set(&o, "t", &e.ts.into());
                list.push(&o);
            }
        }
        if list.length() == 0 {
            if std::mem::take(&mut st.rescued) {
                local_remove(&key);
            }
            return;
        }
        if let Some(text) = JSON::stringify(&list)
            .ok()
            .and_then(|t| JsValue::from(t).as_string())
        {
            local_set(&key, &text);
            st.rescued = true;
        }
    }

    /// Adopts the events other tabs rescued when they went away (see `rescue`).
    async fn adopt_rescued(&self, q: &Queue) {
        let Some(storage) = local_storage() else {
            return;
        };
        let n = storage.length().unwrap_or(0);
        let keys: Vec<String> = (0..n)
            .filter_map(|i| storage.key(i).ok().flatten())
            .filter(|k| k.starts_with("trueup.rescue."))
            .collect();
        for key in keys {
            let Some(text) = storage.get_item(&key).ok().flatten() else {
                continue;
            };
            let entries: Vec<Entry> = JSON::parse(&text)
                .ok()
                .and_then(|v| v.dyn_into::<Array>().ok())
                .map(|list| {
                    list.iter()
                        .filter_map(|o| {
                            Some(Entry {
                                id: Reflect::get(&o, &"i".into()).ok()?.dyn_into().ok()?,
                                json: Reflect::get(&o, &"s".into()).ok()?.dyn_into().ok()?,
                                bytes: Reflect::get(&o, &"b".into()).ok()?.as_f64()?,
                                ts: Reflect::get(&o, &"t".into()).ok()?.as_f64()?,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            if q.adopt(&entries).await.is_ok() {
                let _ = storage.remove_item(&key);
            }
        }
    }

    fn beacon(&self) {
        let Some(nav) = web_sys::window().map(|w| w.navigator()) else {
            return;
        };
        let mut st = self.st.borrow_mut();
        // Events not yet committed to IndexedDB first: nothing else would save them. Then the
        // persisted ones (the queue keeps them anyway; a beacon only makes them earlier).
        // No counters: a beacon's answer is never read, so they would be stale.
        let no_counters = Counters::default();
        let budget = self.opts.batch_bytes - 1_000.0;
        for persisted_pass in [false, true] {
            loop {
                let mut picked = Vec::new();
                let mut bytes = 0.0;
                for (i, (e, beaconed, persisted)) in st.mirror.iter().enumerate() {
                    if *beaconed || *persisted != persisted_pass {
                        continue;
                    }
                    if !picked.is_empty() && bytes + e.bytes > budget {
                        break;
                    }
                    bytes += e.bytes;
                    picked.push(i);
                }
                if picked.is_empty() {
                    break;
                }
                let batch: Vec<Entry> = picked.iter().map(|&i| st.mirror[i].0.clone()).collect();
                let body = envelope(&self.opts.site, &batch, &no_counters);
                // The browser refuses beyond its keepalive quota (64 KiB in flight): stop.
                if !nav
                    .send_beacon_with_opt_str(&self.opts.endpoint, Some(&String::from(body)))
                    .unwrap_or(false)
                {
                    return;
                }
                for i in picked {
                    st.mirror[i].1 = true;
                }
            }
        }
    }
}

/// Reads the relay's per-event answer (`trueup_protocol::BatchResponse`): accepted or
/// duplicate → acked, rejected → dropped. An answer that does not match the batch settles
/// nothing (everything is retried; the relay dedupes).
fn answered(entries: &[Entry], answer: Option<JsValue>) -> Vec<(JsString, Settle)> {
    let results = answer
        .and_then(|a| Reflect::get(&a, &"results".into()).ok())
        .and_then(|r| r.dyn_into::<Array>().ok());
    let Some(results) = results.filter(|r| r.length() as usize == entries.len()) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(entries.len());
    for (e, r) in entries.iter().zip(results.iter()) {
        let settle = match get_str(&r, "status").as_deref() {
            Some("accepted") | Some("duplicate") => Settle::Acked,
            Some("rejected") => Settle::Dropped("rejected"),
            _ => return Vec::new(),
        };
        out.push((e.id.clone(), settle));
    }
    out
}

/// The batch body: the events' JSON texts joined, with the site and the counters.
fn envelope(site: &str, entries: &[Entry], counters: &Counters) -> JsString {
    let events = Array::new();
    for e in entries {
        events.push(&e.json);
    }
    let head = Object::new();
    set(&head, "v", &trueup_protocol::PROTOCOL_VERSION.into());
    set(&head, "site", &site.into());
    set(&head, "sent_at", &now().into());
    if !counters.device_id.is_empty() {
        set(&head, "counters", &queue::counters_to(counters));
    }
    let head = JSON::stringify(&head).unwrap_or_else(|_| JsString::from("{}"));
    // `{"v":1,...}` → `{"v":1,...,"events":[e1,e2]}`
    head.slice(0, head.length() - 1)
        .concat(&",\"events\":[".into())
        .concat(&events.join(","))
        .concat(&"]}".into())
}

/// POSTs a CORS-simple `text/plain` body with `keepalive`. Returns the status (None for a
/// network error or timeout), `Retry-After` in seconds, and the JSON answer of a 2xx.
async fn post(
    endpoint: &str,
    body: &JsString,
    timeout_ms: u32,
) -> (Option<u16>, Option<f64>, Option<JsValue>) {
    let Some(window) = web_sys::window() else {
        return (None, None, None);
    };
    let init = web_sys::RequestInit::new();
    init.set_method("POST");
    init.set_body(body);
    let _ = Reflect::set(&init, &"keepalive".into(), &JsValue::TRUE);
    let abort = web_sys::AbortController::new().ok();
    if let Some(a) = &abort {
        init.set_signal(Some(&a.signal()));
    }
    let timer = abort.map(|a| gloo_timers::callback::Timeout::new(timeout_ms, move || a.abort()));
    let resp = JsFuture::from(window.fetch_with_str_and_init(endpoint, &init)).await;
    let result = match resp.and_then(|r| r.dyn_into::<web_sys::Response>()) {
        Err(_) => (None, None, None),
        Ok(r) => {
            let status = r.status();
            let retry_after = r
                .headers()
                .get("retry-after")
                .ok()
                .flatten()
                .and_then(|v| policy::retry_after(js_sys::parse_float(&v)));
            let answer = if r.ok() {
                match r.json() {
                    Ok(p) => JsFuture::from(p).await.ok(),
                    Err(_) => None,
                }
            } else {
                None
            };
            (Some(status), retry_after, answer)
        }
    };
    drop(timer);
    result
}
