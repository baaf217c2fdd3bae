//! This page's events on their way into the queue: stamped at the call (`track`, `page`,
//! `event`), written once per task (`take`, `written`), rescued into localStorage and
//! beaconed when the page hides (`hide`, `beacon`). An event stays in `Core::page` until the
//! relay has answered for it, so the page knows at every moment what no one has sent.

use alloc::vec::Vec;

use js_sys::{Array, Object};
use wasm_bindgen::prelude::*;

use crate::consent::{HOLD_BYTES, HOLD_EVENTS};
use crate::counters::delta;
use crate::*;

/// `Item::batch` of an event IndexedDB has committed.
pub(crate) const PERSISTED: u32 = u32::MAX;

/// An event of this page not known to be acknowledged.
pub(crate) struct Item {
    pub(crate) id: JsValue,
    /// `{i, s, b, t}` (`Host::event`).
    pub(crate) record: JsValue,
    pub(crate) bytes: f64,
    /// 0: not written yet; `n`: in write `n` (`take`); `PERSISTED`.
    pub(crate) batch: u32,
    /// Not to be beaconed: beaconed already, or in the batch being sent (`sending`).
    pub(crate) beaconed: bool,
    /// Put in the rescue list before it was written: another tab (or this one, when it opens
    /// the queue) may adopt it first, so its write must check what is queued (`take`).
    pub(crate) rescued: bool,
}

#[wasm_bindgen]
impl Core {
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
}

impl Core {
    /// Stamps an event and builds its JSON now (so later changes to `props` do not leak in);
    /// it is written with the task's other events (`take`).
    #[inline(never)]
    pub(crate) fn event(&mut self, name: &JsValue, schema: &str, props: JsValue, ctx: &JsValue) {
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
