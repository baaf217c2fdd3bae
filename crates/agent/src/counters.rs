//! The loss counters and the queue's accounting: every count the queue keeps is decided here;
//! `js/queue.js` only reads and writes the stores.
//!
//! # Promise
//!
//! `enqueued = acked + dropped + pending` holds at every commit: every change to the queue
//! and the matching change to the counters happen in one IndexedDB transaction, which all
//! tabs of the site share (IndexedDB serialises overlapping read-write transactions, so two
//! tabs never count the same event twice).
//!
//! # Layout (database `trueup`, version 2; `js/queue.js`)
//!
//! - store `q`: key = the event id (a UUIDv7, so keys sort by capture time across tabs),
//!   value `{s: the event's JSON text, b: its size, t: its capture time}`. The text is made
//!   once, at `track()` time, and sent as is.
//! - store `kv`: `qb` (bytes queued) and `c` (the counters, in their wire form). The agent's
//!   identity lives in `localStorage` instead (see the crate docs): it must be readable
//!   synchronously.
//! - store `d` (auto-increment keys): counter *deltas* (`delta`), `{n, b, r?}` = `n` events
//!   enqueued (and pending, or dropped for reason `r`), `b` bytes. The sending tab folds them
//!   into `c` and `qb` in its own transactions (`Totals::new`).
//!
//! Where IndexedDB is unavailable the same stores live in memory (lost with the page; the
//! counters say `degraded: memory_queue`).
//!
//! # Why deltas
//!
//! A tab can go away right after `track()`. Chromium aborts a transaction that still waits
//! for a read when the page is torn down, so the write that persists events must not read:
//! it issues its puts and its delta `add`s, then commits in the same task. The
//! read-modify-write of the counters happens later, in the sending tab (`peek`, `settle`,
//! `maintain`, …), where an abort only means the work is done again. Readers add the pending
//! deltas to what is stored, so the identity holds at every commit.
//!
//! The queue is bounded by bytes (the sending tab evicts the oldest while `Totals::over`,
//! counted as `queue_full`, even while offline) and by age (events older than `maxAgeMs` are
//! dropped as `expired` when the sender reads them, `Core::pick`).

use alloc::vec::Vec;

use js_sys::{Array, Object, Reflect};
use wasm_bindgen::prelude::*;

use crate::{Consent, Core, get, num, set};

/// The loss counters: the wire contract's `trueup_protocol::Counters` (same fields, same JSON),
/// held as JS values and numbers and converted to and from JS by hand (js-sys), to keep the
/// wasm small. The relay parses what this produces with the protocol crate (and rejects
/// unknown fields), which the e2e tests exercise.
#[derive(Clone, Default)]
pub struct Counters {
    /// The device (`<device>`, shared by its tabs): a string.
    pub device_id: JsValue,
    /// Events accepted by `track()`.
    pub enqueued: f64,
    /// Send attempts of events.
    pub sent: f64,
    /// Events the relay answered accepted or duplicate for.
    pub acked: f64,
    /// Events sent again after a failed attempt.
    pub retried: f64,
    /// Events still queued.
    pub pending: f64,
    /// Events given up, by reason (a string), in first-seen order.
    pub dropped: Vec<(JsValue, f64)>,
    /// The degraded mode (a string), or undefined.
    pub degraded: JsValue,
}

const COUNTS: [&str; 5] = ["enqueued", "sent", "acked", "retried", "pending"];

impl Counters {
    /// Reads the counters from their stored (and wire) form; absent → zero.
    pub fn from_js(v: &JsValue) -> Counters {
        let mut c = Counters::default();
        if !v.is_object() {
            return c;
        }
        c.device_id = get(v, "device_id");
        c.degraded = get(v, "degraded");
        for (slot, k) in c.slots().into_iter().zip(COUNTS) {
            *slot = num(&get(v, k));
        }
        let dropped = get(v, "dropped");
        if dropped.is_object() {
            for k in Object::keys(dropped.unchecked_ref::<Object>()).iter() {
                let n = num(&Reflect::get(&dropped, &k).unwrap_or_default());
                c.drop_n(k, n);
            }
        }
        c
    }

    /// The stored (and wire) form.
    pub fn to_js(&self) -> JsValue {
        let o: JsValue = Object::new().into();
        let device = if self.device_id.is_string() {
            self.device_id.clone()
        } else {
            "".into()
        };
        set(&o, "device_id", &device);
        let mut c = self.clone();
        for (slot, k) in c.slots().into_iter().zip(COUNTS) {
            set(&o, k, &(*slot).into());
        }
        let dropped: JsValue = Object::new().into();
        for (k, n) in &self.dropped {
            let _ = Reflect::set(&dropped, k, &(*n).into());
        }
        set(&o, "dropped", &dropped);
        if !self.degraded.is_undefined() {
            set(&o, "degraded", &self.degraded);
        }
        o
    }

    /// Adds `n` drops for `reason` (a string).
    pub fn drop_n(&mut self, reason: JsValue, n: f64) {
        match self.dropped.iter_mut().find(|(r, _)| *r == reason) {
            Some(slot) => slot.1 += n,
            None => self.dropped.push((reason, n)),
        }
    }

    /// Drops for one reason (0 when none).
    pub fn dropped(&self, reason: &str) -> f64 {
        let reason = JsValue::from_str(reason);
        self.dropped
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0.0, |(_, n)| *n)
    }

    /// Whether `enqueued == acked + dropped + pending`.
    pub fn identity_holds(&self) -> bool {
        let dropped: f64 = self.dropped.iter().map(|(_, n)| n).sum();
        self.acked + dropped + self.pending == self.enqueued
    }

    fn slots(&mut self) -> [&mut f64; 5] {
        [
            &mut self.enqueued,
            &mut self.sent,
            &mut self.acked,
            &mut self.retried,
            &mut self.pending,
        ]
    }
}

/// A delta record: `n` events enqueued (pending, or dropped for `reason` when it is a string),
/// `bytes` queued.
pub fn delta(n: f64, bytes: f64, reason: &JsValue) -> JsValue {
    let o: JsValue = Object::new().into();
    set(&o, "n", &n.into());
    set(&o, "b", &bytes.into());
    if reason.is_string() {
        set(&o, "r", reason);
    }
    o
}

/// The counters and the bytes queued, within one read-write transaction of the queue: made
/// from what is stored plus the pending deltas (`Core::totals`), changed by what the
/// transaction does to the queue, then written back (`counters`, `qb`).
#[wasm_bindgen]
pub struct Totals {
    c: Counters,
    qb: f64,
}

impl Totals {
    /// The stored counters `c` and bytes `qb` with the delta records `deltas` (an array, see
    /// `delta`) folded in.
    pub fn new(c: &JsValue, qb: &JsValue, deltas: &JsValue) -> Totals {
        let mut t = Totals {
            c: Counters::from_js(c),
            qb: num(qb),
        };
        if let Some(deltas) = deltas.dyn_ref::<Array>() {
            for d in deltas.iter() {
                let n = num(&get(&d, "n"));
                t.c.enqueued += n;
                let reason = get(&d, "r");
                if reason.is_string() {
                    t.c.drop_n(reason, n);
                } else {
                    t.c.pending += n;
                }
                t.qb += num(&get(&d, "b"));
            }
        }
        t
    }

    /// The counters (for tests and `Core::stamp`).
    pub fn counters_mut(&mut self) -> &mut Counters {
        &mut self.c
    }

    fn leave(&mut self, bytes: f64) {
        self.c.pending = (self.c.pending - 1.0).max(0.0);
        self.qb -= bytes;
    }
}

#[wasm_bindgen]
impl Totals {
    /// The counters' stored (and wire) form.
    pub fn counters(&self) -> JsValue {
        self.c.to_js()
    }

    /// Bytes queued.
    #[wasm_bindgen(getter)]
    pub fn qb(&self) -> f64 {
        self.qb.max(0.0)
    }

    /// A batch of `n` events was sent, `retried` of them after a failed attempt.
    pub fn sent(&mut self, n: f64, retried: f64) {
        self.c.sent += n;
        self.c.retried += retried;
    }

    /// An event of `bytes` left the queue: acknowledged (`outcome` true) or dropped for the
    /// reason `outcome` (a string).
    pub fn settle(&mut self, outcome: JsValue, bytes: f64) {
        self.leave(bytes);
        if outcome.is_string() {
            self.c.drop_n(outcome, 1.0);
        } else {
            self.c.acked += 1.0;
        }
    }

    /// Whether the queue holds more than `max` bytes (the oldest go, `evict`).
    pub fn over(&self, max: f64) -> bool {
        self.qb > max
    }

    /// The oldest event, of `bytes`, was evicted (`queue_full`).
    pub fn evict(&mut self, bytes: f64) {
        self.settle("queue_full".into(), bytes);
    }

    /// An event of `bytes` that another tab rescued was added (it was not in the queue).
    pub fn adopt(&mut self, bytes: f64) {
        self.c.enqueued += 1.0;
        self.c.pending += 1.0;
        self.qb += bytes;
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

#[wasm_bindgen]
impl Core {
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
}
