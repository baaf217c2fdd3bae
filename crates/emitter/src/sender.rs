//! The background task that owns the buffer: it batches, sends one request at a time,
//! retries, and settles every event exactly once as acknowledged, rejected or failed.
//!
//! Invariants:
//! - Events are settled in the order they were emitted. One batch is in flight at a time and
//!   it always holds the oldest unsettled events (a 413 splits it and puts the younger half
//!   back at the front of the queue), so "the first `n` events are settled" is one counter,
//!   and a flush is a marker "wait until `n` are settled", `n` being how many events the
//!   task had received when the marker arrived through the same channel.
//! - `Shared::buffered` counts events emitted and not settled: queued, in flight or waiting
//!   to be retried. `emit` reserves a place before sending the event to the task, and the
//!   task frees it when it settles the event, so the bound covers everything held in memory.
//! - A retried batch keeps its events and their ids, so a request whose answer was lost is
//!   retried safely: what the relay already stored comes back `duplicate`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};
use trueup_protocol::{BatchResponse, ErrorBody, EventStatus, PROTOCOL_VERSION};
use uuid::Uuid;

use crate::Config;
use crate::backoff::{parse_retry_after, retry_delay};

/// Largest relay answer read; a relay answers a few hundred bytes per event.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// What the handles send to the task, in one channel so that order is kept.
pub(crate) enum Command {
    /// A new event.
    Event(Queued),
    /// Answer once every event received before this is settled.
    Flush(oneshot::Sender<Outcome>),
    /// Drop what is left, answer, and end.
    Stop(oneshot::Sender<()>),
}

/// One event held by the task.
pub(crate) struct Queued {
    pub(crate) id: Uuid,
    pub(crate) name: String,
    pub(crate) json: String,
    pub(crate) emitted_at: Instant,
    /// Attempts so far.
    pub(crate) sent: u32,
}

/// What happened to the events a flush waited for, when not all were stored.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) failed: u64,
    pub(crate) rejected: u64,
    pub(crate) last_error: Option<String>,
}

/// Counters and flags shared by the handles and the task.
#[derive(Default)]
pub(crate) struct Shared {
    pub(crate) emitted: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) duplicate: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) buffered: AtomicU64,
    pub(crate) last_error: Mutex<Option<String>>,
    /// Set by `shutdown`: `emit` refuses from then on.
    pub(crate) closed: AtomicBool,
}

impl Shared {
    fn set_last_error(&self, e: &str) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(e.to_string());
        }
    }
}

/// How the relay (or the network) answered one request.
enum Answer {
    /// 200 with per-event results.
    Stored(BatchResponse),
    /// Worth trying again: network error, 408, 429, 5xx, an unreadable 200.
    Retry {
        why: String,
        retry_after: Option<Duration>,
    },
    /// 413: the batch is too large for the relay.
    TooLarge(String),
    /// Any other 4xx: sending the same request again cannot succeed.
    Refused(String),
}

enum Settled {
    Acked { duplicate: bool },
    Rejected(String),
    Failed(String),
}

struct Marker {
    upto: u64,
    outcome: Outcome,
    reply: oneshot::Sender<Outcome>,
}

type Request = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// The task's state.
pub(crate) struct Sender {
    cfg: Config,
    http: reqwest::Client,
    shared: Arc<Shared>,
    inbox: mpsc::UnboundedReceiver<Command>,
    inbox_closed: bool,
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    /// Events received from the handles so far.
    received: u64,
    /// Events settled so far (always the first `settled` received).
    settled: u64,
    markers: Vec<Marker>,
    /// The batch being sent or waiting to be retried.
    batch: Option<Vec<Queued>>,
    /// Consecutive failed attempts, for the backoff.
    failures: u32,
    /// When the batch may be retried.
    not_before: Option<Instant>,
}

impl Sender {
    pub(crate) fn new(
        cfg: Config,
        http: reqwest::Client,
        shared: Arc<Shared>,
        inbox: mpsc::UnboundedReceiver<Command>,
    ) -> Sender {
        Sender {
            cfg,
            http,
            shared,
            inbox,
            inbox_closed: false,
            queue: VecDeque::new(),
            queued_bytes: 0,
            received: 0,
            settled: 0,
            markers: Vec::new(),
            batch: None,
            failures: 0,
            not_before: None,
        }
    }

    /// Runs until stopped, or until every handle is dropped and everything is settled.
    pub(crate) async fn run(mut self) {
        let mut request: Option<Request> = None;
        loop {
            let now = Instant::now();
            if self.batch.is_none() && self.batch_due(now) {
                self.batch = Some(self.take_batch());
            }
            if request.is_none()
                && self.not_before.is_none_or(|t| t <= now)
                && let Some(batch) = self.batch.as_mut()
            {
                for ev in batch.iter_mut() {
                    if ev.sent > 0 {
                        self.shared.retried.fetch_add(1, Ordering::Relaxed);
                    }
                    ev.sent += 1;
                }
                let body = batch_body(&self.cfg.site, batch);
                request = Some(Box::pin(send(
                    self.http.clone(),
                    self.cfg.endpoint.clone(),
                    self.cfg.secret.clone(),
                    body,
                )));
            }
            if self.inbox_closed && request.is_none() && self.batch.is_none() {
                debug_assert!(self.queue.is_empty());
                return;
            }
            let wake = if request.is_some() {
                None
            } else if self.batch.is_some() {
                self.not_before
            } else {
                self.queue
                    .front()
                    .map(|ev| ev.emitted_at + self.cfg.max_batch_delay)
            };
            tokio::select! {
                cmd = self.inbox.recv(), if !self.inbox_closed => match cmd {
                    Some(Command::Event(ev)) => self.enqueue(ev),
                    Some(Command::Flush(reply)) => self.add_marker(reply),
                    Some(Command::Stop(reply)) => {
                        // Whatever the request in flight did, its events are dropped below.
                        drop(request.take());
                        self.stop();
                        let _ = reply.send(());
                        return;
                    }
                    None => self.inbox_closed = true,
                },
                answer = async { request.as_mut().expect("guarded by the precondition").await },
                    if request.is_some() =>
                {
                    request = None;
                    self.on_answer(answer);
                }
                _ = sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
            }
        }
    }

    fn enqueue(&mut self, ev: Queued) {
        self.received += 1;
        self.queued_bytes += ev.json.len();
        self.queue.push_back(ev);
    }

    fn add_marker(&mut self, reply: oneshot::Sender<Outcome>) {
        if self.settled >= self.received {
            let _ = reply.send(Outcome::default());
        } else {
            self.markers.push(Marker {
                upto: self.received,
                outcome: Outcome::default(),
                reply,
            });
        }
    }

    /// Whether the queue should become a batch now.
    fn batch_due(&self, now: Instant) -> bool {
        let Some(oldest) = self.queue.front() else {
            return false;
        };
        self.queue.len() >= self.cfg.max_batch_events
            || self.queued_bytes >= self.cfg.max_batch_bytes
            || oldest.emitted_at + self.cfg.max_batch_delay <= now
            || !self.markers.is_empty()
            || self.inbox_closed
    }

    /// The oldest events, within the count and byte bounds (at least one).
    fn take_batch(&mut self) -> Vec<Queued> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(ev) = self.queue.front() {
            let fits = batch.is_empty() || bytes + ev.json.len() <= self.cfg.max_batch_bytes;
            if batch.len() >= self.cfg.max_batch_events || !fits {
                break;
            }
            bytes += ev.json.len();
            let ev = self.queue.pop_front().expect("front exists");
            self.queued_bytes -= ev.json.len();
            batch.push(ev);
        }
        batch
    }

    fn on_answer(&mut self, answer: Answer) {
        let mut batch = self.batch.take().expect("an answer is for the batch");
        match answer {
            Answer::Stored(resp) if resp.results.len() == batch.len() => {
                if self.failures > 0 {
                    tracing::info!(
                        failures = self.failures,
                        "relay reachable again; server events delivered"
                    );
                }
                self.failures = 0;
                self.not_before = None;
                for (ev, result) in batch.into_iter().zip(resp.results) {
                    let settled = match result.status {
                        EventStatus::Accepted => Settled::Acked { duplicate: false },
                        EventStatus::Duplicate => Settled::Acked { duplicate: true },
                        EventStatus::Rejected { reason, detail } => {
                            tracing::error!(
                                event_id = %ev.id,
                                event = %ev.name,
                                reason = reason.as_str(),
                                %detail,
                                "the relay rejected a server event (kept in its dead-letter store, not in the warehouse)"
                            );
                            Settled::Rejected(format!(
                                "event {} ({}) rejected: {}: {detail}",
                                ev.id,
                                ev.name,
                                reason.as_str()
                            ))
                        }
                    };
                    self.settle(settled);
                }
            }
            Answer::Stored(resp) => {
                let why = format!(
                    "the relay answered {} results for {} events",
                    resp.results.len(),
                    batch.len()
                );
                self.retry_later(batch, why, None);
            }
            Answer::Retry { why, retry_after } => self.retry_later(batch, why, retry_after),
            Answer::TooLarge(why) if batch.len() > 1 => {
                let younger = batch.split_off(batch.len() / 2);
                tracing::warn!(
                    events = batch.len() + younger.len(),
                    error = %why,
                    "batch too large for the relay; splitting it"
                );
                for ev in younger.into_iter().rev() {
                    self.queued_bytes += ev.json.len();
                    self.queue.push_front(ev);
                }
                self.batch = Some(batch);
                self.not_before = None;
            }
            Answer::TooLarge(why) | Answer::Refused(why) => self.fail(batch, &why),
        }
        self.answer_markers();
    }

    fn retry_later(&mut self, batch: Vec<Queued>, why: String, retry_after: Option<Duration>) {
        self.failures = self.failures.saturating_add(1);
        let age = batch
            .first()
            .map(|ev| ev.emitted_at.elapsed())
            .unwrap_or_default();
        if age >= self.cfg.give_up_after {
            let why = format!("gave up after {}s unacknowledged: {why}", age.as_secs());
            self.fail(batch, &why);
            return;
        }
        // Never wait past the point of giving up.
        let delay = retry_delay(
            self.failures,
            self.cfg.initial_backoff,
            self.cfg.max_backoff,
            retry_after,
        )
        .min(self.cfg.give_up_after.saturating_sub(age));
        tracing::warn!(
            events = batch.len(),
            failures = self.failures,
            delay_ms = delay.as_millis() as u64,
            error = %why,
            "server events not delivered; retrying"
        );
        self.shared.set_last_error(&why);
        let now = Instant::now();
        self.not_before = Some(
            now.checked_add(delay)
                .unwrap_or_else(|| now + crate::backoff::MAX_RETRY_AFTER),
        );
        self.batch = Some(batch);
    }

    /// Gives the batch up: nothing sent again can succeed.
    fn fail(&mut self, batch: Vec<Queued>, why: &str) {
        self.failures = 0;
        self.not_before = None;
        tracing::error!(
            events = batch.len(),
            error = %why,
            "server events dropped: the relay refused them"
        );
        for _ in batch {
            self.settle(Settled::Failed(why.to_string()));
        }
    }

    /// Settles the oldest unsettled event.
    fn settle(&mut self, how: Settled) {
        self.settled += 1;
        self.shared.buffered.fetch_sub(1, Ordering::Relaxed);
        let s = &self.shared;
        let error = match how {
            Settled::Acked { duplicate } => {
                s.acked.fetch_add(1, Ordering::Relaxed);
                if duplicate {
                    s.duplicate.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            Settled::Rejected(e) => {
                s.rejected.fetch_add(1, Ordering::Relaxed);
                for m in self.markers.iter_mut().filter(|m| self.settled <= m.upto) {
                    m.outcome.rejected += 1;
                }
                e
            }
            Settled::Failed(e) => {
                s.failed.fetch_add(1, Ordering::Relaxed);
                for m in self.markers.iter_mut().filter(|m| self.settled <= m.upto) {
                    m.outcome.failed += 1;
                }
                e
            }
        };
        s.set_last_error(&error);
        for m in self.markers.iter_mut().filter(|m| self.settled <= m.upto) {
            m.outcome.last_error = Some(error.clone());
        }
    }

    fn answer_markers(&mut self) {
        let settled = self.settled;
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.markers)
            .into_iter()
            .partition(|m| m.upto <= settled);
        self.markers = waiting;
        for m in done {
            let _ = m.reply.send(m.outcome);
        }
    }

    /// Drops everything still held (counted `failed`), including what arrives until the
    /// channel is closed, and answers every flush.
    fn stop(&mut self) {
        const WHY: &str = "the emitter shut down before the relay acknowledged the event";
        self.inbox.close();
        let mut left: Vec<Queued> = self.batch.take().unwrap_or_default();
        left.extend(self.queue.drain(..));
        self.queued_bytes = 0;
        let mut late_flushes = Vec::new();
        while let Ok(cmd) = self.inbox.try_recv() {
            match cmd {
                Command::Event(ev) => {
                    self.received += 1;
                    left.push(ev);
                }
                Command::Flush(reply) => late_flushes.push(reply),
                Command::Stop(reply) => {
                    let _ = reply.send(());
                }
            }
        }
        if !left.is_empty() {
            tracing::error!(
                events = left.len(),
                "server events dropped at shutdown: the relay did not acknowledge them in time"
            );
        }
        for _ in left {
            self.settle(Settled::Failed(WHY.into()));
        }
        self.answer_markers();
        for reply in late_flushes {
            let _ = reply.send(Outcome::default());
        }
    }
}

/// The JSON of a batch of already-serialised events.
fn batch_body(site: &str, events: &[Queued]) -> String {
    let sent_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let site = serde_json::Value::from(site);
    let mut body =
        String::with_capacity(64 + events.iter().map(|e| e.json.len() + 1).sum::<usize>());
    body.push_str(&format!(
        "{{\"v\":{PROTOCOL_VERSION},\"site\":{site},\"sent_at\":{sent_at},\"events\":["
    ));
    for (i, ev) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&ev.json);
    }
    body.push_str("]}");
    body
}

/// One attempt, classified.
async fn send(http: reqwest::Client, url: String, secret: String, body: String) -> Answer {
    let resp = match http
        .post(url)
        .header(CONTENT_TYPE, "application/json")
        .bearer_auth(secret)
        .body(body)
        .send()
        .await
    {
        Ok(resp) => resp,
        Err(e) => {
            return Answer::Retry {
                why: error_chain(&e),
                retry_after: None,
            };
        }
    };
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let text = match read_capped(resp).await {
        Ok(text) => text,
        Err(why) => {
            return Answer::Retry {
                why: format!("{status}, answer unreadable: {why}"),
                retry_after,
            };
        }
    };
    if status.is_success() {
        return match serde_json::from_str::<BatchResponse>(&text) {
            Ok(resp) => Answer::Stored(resp),
            Err(e) => Answer::Retry {
                why: format!("{status} but not a batch answer: {e}"),
                retry_after,
            },
        };
    }
    let why = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(b) => format!("{status}: {}: {}", b.error, b.message),
        Err(_) => format!("{status}: {}", text.chars().take(200).collect::<String>()),
    };
    match status.as_u16() {
        408 | 429 | 500..=599 => Answer::Retry { why, retry_after },
        413 => Answer::TooLarge(why),
        _ => Answer::Refused(why),
    }
}

async fn read_capped(mut resp: reqwest::Response) -> Result<String, String> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        if buf.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(format!("over {MAX_ANSWER_BYTES} bytes"));
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf).map_err(|_| "not UTF-8".to_string())
}

/// An error and its causes on one line (reqwest's own message omits the cause, e.g. which
/// connection error).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_a_protocol_batch() {
        let ev = |id: &str| Queued {
            id: Uuid::nil(),
            name: "n".into(),
            json: format!("{{\"x\":\"{id}\"}}"),
            emitted_at: Instant::now(),
            sent: 0,
        };
        let body = batch_body("de\"mo", &[ev("a"), ev("b")]);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["site"], "de\"mo");
        assert!(v["sent_at"].as_i64().unwrap() > 1_700_000_000_000);
        assert_eq!(v["events"][0]["x"], "a");
        assert_eq!(v["events"][1]["x"], "b");
    }
}
