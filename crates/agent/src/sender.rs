//! The sending tab's schedule and the relay's answers: when a send is due (`wake`, `due`,
//! `next_wake`, with the agent's backoff and the relay's `Retry-After`), what goes into a batch
//! (`limit`, `pick`), and what an answer means (`answered`, by `policy`).

use js_sys::Array;
use wasm_bindgen::prelude::*;

use crate::queue::PERSISTED;
use crate::*;

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

#[wasm_bindgen]
impl Core {
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
}

impl Core {
    /// Held back: this tab's backoff, or the relay's wait (read again: another tab may have
    /// been told one).
    pub(crate) fn waiting(&self) -> bool {
        let t = now();
        t < self.backoff_until
            || t < self.server_wait_until
            || t < num(&self.host.load(false, "wait"))
    }
}
