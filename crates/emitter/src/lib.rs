//! The server emitter: business events (`signup_completed`, `order_paid`, …) from a system of
//! record to the trueup relay's authenticated server path.
//!
//! Client analytics are lossy by nature (ad blockers, closed tabs, flaky networks); the
//! system of record is not. A backend emits each business fact once it is committed, and
//! reconciliation compares what the browser reported with what really happened. This crate
//! is the backend's side of that: it turns [`ServerEvent`]s into protocol batches and
//! delivers them to `POST <relay>/_r/s` with `Authorization: Bearer <site secret>`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use trueup_emitter::{Config, Emitter, ServerEvent};
//!
//! let emitter = Emitter::new(Config::new("http://127.0.0.1:8081", "demo", "the-site-secret"))?;
//! // After the order's transaction committed, with the order's own id and created_at:
//! let created_at_ms = 1_764_324_000_123;
//! emitter.emit(
//!     ServerEvent::new("order_paid", "order-81f2", created_at_ms)
//!         .user_id("user-7")
//!         .prop("order_id", "order-81f2")
//!         .prop("amount", 49.5)
//!         .prop("currency", "EUR"),
//! )?;
//! // On shutdown: wait (bounded) until the relay has acknowledged everything.
//! emitter.shutdown(Duration::from_secs(10)).await?;
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! - **Exactly once in the warehouse.** Every event's id is derived from its idempotency key
//!   and the fact's time ([`trueup_protocol::id_for_key`]), never drawn at random. Emitting the
//!   same fact again — the checkout handler retried by the browser, a job replayed after a
//!   crash, two processes emitting the same fact, a re-emit at start-up — produces the same
//!   id, and the relay stores an id once (it answers `duplicate` for the copies, within its
//!   dedupe retention, 9 days by default).
//! - **At least once to the relay, while the process lives.** An event is retried until the
//!   relay acknowledges it (`accepted` or `duplicate`: durably spooled) or it fails
//!   permanently. Network errors, 408, 429 and 5xx are retried with exponential backoff and
//!   full jitter, honouring `Retry-After`; a 413 splits the batch. Other 4xx (a wrong secret,
//!   an unknown site) cannot succeed by retrying: those events are dropped at once, logged at
//!   ERROR and counted `failed`. Events the relay rejects one by one (a schema violation) are
//!   counted `rejected` and logged with the relay's reason; the relay keeps them in its
//!   dead-letter store. An event unacknowledged for [`Config::give_up_after`] is given up.
//!   Nothing is dropped silently: see [`Stats`] and [`Emitter::flush`].
//! - **Bounded memory.** At most [`Config::buffer_capacity`] events are held (waiting, in
//!   flight or being retried). When the relay is down long enough to fill it,
//!   [`Emitter::emit`] returns [`EmitError::BufferFull`] at once: it never blocks the request
//!   that emits and never grows.
//! - **Shutdown.** [`Emitter::shutdown`] refuses new events, sends what is held and waits, at
//!   most the given time, for the relay's answers; what is still unacknowledged then is
//!   dropped, logged at ERROR and counted `failed`, and the call says so.
//!
//! # What is not guaranteed: a crash loses the buffer
//!
//! The buffer is in memory. If the process crashes, is killed, or its runtime stops before
//! the relay acknowledged an event, that event is gone from here. This crate deliberately
//! keeps no disk queue of its own, because the system of record already is one: a backend
//! that must never lose a fact should
//!
//! 1. emit only **after** its own transaction committed (so nothing is reported that did not
//!    happen), and
//! 2. on start, **re-emit the facts that may not have been acknowledged** (say, those of the
//!    last hour, or rows not yet marked as reported once [`Emitter::flush`] succeeded).
//!
//! Re-emitting is safe because of the derived ids: what the relay already had comes back
//! `duplicate`. The relay rejects events older than its `limits.max_past_secs` (8 days by
//! default), so re-emits must happen within that window.
//!
//! # Runtime
//!
//! [`Emitter::new`] spawns one background task on the current Tokio runtime; [`Emitter`] is a
//! cheap handle (an `Arc`) to clone into request handlers. When every handle is dropped
//! without a shutdown, the task keeps delivering what is held, in the background, for as long
//! as the runtime runs. One request is in flight at a time (batches of up to
//! [`Config::max_batch_events`]), which keeps events settled in emit order. HTTPS uses rustls
//! with the platform's root certificates; no OpenSSL.
#![deny(missing_docs)]

mod backoff;
mod config;
mod event;
mod sender;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use config::{Config, DEFAULT_SERVER_PATH};
pub use event::ServerEvent;

use sender::{Command, Queued, Sender, Shared};

/// Why an [`Emitter`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A configuration value is out of range.
    #[error("invalid emitter configuration: {0}")]
    Config(String),
    /// [`Emitter::new`] was called outside a Tokio runtime.
    #[error("the emitter must be created inside a Tokio runtime")]
    NoRuntime,
    /// The HTTP client could not be built (e.g. TLS could not be set up).
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

/// Why [`Emitter::emit`] refused an event. Nothing was buffered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmitError {
    /// The buffer holds [`Config::buffer_capacity`] unacknowledged events (the relay is down
    /// or slow). The caller decides: log it, or keep the fact for a later re-emit.
    #[error("the emitter's buffer is full: {capacity} events not yet acknowledged by the relay")]
    BufferFull {
        /// The configured capacity.
        capacity: usize,
    },
    /// [`Emitter::shutdown`] was called.
    #[error("the emitter is shut down")]
    Closed,
    /// The event cannot be sent as it is (no subject, empty name or key).
    #[error("invalid server event: {0}")]
    Invalid(String),
}

/// Why [`Emitter::flush`] or [`Emitter::shutdown`] did not end with everything stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlushError {
    /// Some events were still unacknowledged when the time was up. After a flush they are
    /// still held and retried; after a shutdown they were dropped (counted `failed`).
    #[error("{pending} server events still unacknowledged after {waited:?}")]
    Timeout {
        /// Events held when the time was up.
        pending: u64,
        /// How long the call waited.
        waited: Duration,
    },
    /// Every event was settled, but not all were stored.
    #[error(
        "{failed} server events failed and {rejected} were rejected by the relay; last error: {last_error}"
    )]
    Failed {
        /// Events dropped: refused request, given up, or dropped at shutdown.
        failed: u64,
        /// Events the relay rejected one by one (see its dead-letter store).
        rejected: u64,
        /// The last failure's description.
        last_error: String,
    },
    /// The emitter was already shut down.
    #[error("the emitter is shut down")]
    Closed,
}

/// The emitter's counters since it was built. When nothing is in flight,
/// `emitted == acked + rejected + failed + buffered`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Events accepted by [`Emitter::emit`].
    pub emitted: u64,
    /// Events the relay acknowledged: stored now (`accepted`) or already (`duplicate`).
    pub acked: u64,
    /// Of `acked`, those the relay already had: re-emitted facts.
    pub duplicate: u64,
    /// Events the relay rejected one by one (invalid for their schema, too old, …).
    pub rejected: u64,
    /// Events dropped: the relay refused the request (4xx other than 408/413/429), retries
    /// were given up, or the emitter shut down first.
    pub failed: u64,
    /// Sends of events after a failed attempt (an event sent three times counts two).
    pub retried: u64,
    /// [`Emitter::emit`] calls refused with [`EmitError::BufferFull`].
    pub refused: u64,
    /// Events held now: waiting, in flight or waiting to be retried.
    pub buffered: u64,
    /// The last failure (a retry's cause included), for operators.
    pub last_error: Option<String>,
}

/// A handle to the emitter's background task. Cheap to clone; every clone feeds the same
/// buffer.
#[derive(Clone)]
pub struct Emitter {
    inner: Arc<Inner>,
}

struct Inner {
    inbox: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
    site: String,
    capacity: usize,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Emitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emitter")
            .field("site", &self.inner.site)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Emitter {
    /// Checks `config`, builds the HTTP client and spawns the background task on the current
    /// Tokio runtime.
    pub fn new(config: Config) -> Result<Emitter, BuildError> {
        if let Some(problem) = config.problem() {
            return Err(BuildError::Config(problem));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BuildError::NoRuntime)?;
        // TLS is rustls (aws-lc-rs provider, the platform's roots), never OpenSSL.
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("trueup-emitter/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| BuildError::Http(e.to_string()))?;
        let shared = Arc::new(Shared::default());
        let (inbox, rx) = mpsc::unbounded_channel();
        let site = config.site.clone();
        let capacity = config.buffer_capacity;
        tracing::debug!(endpoint = %config.endpoint, site = %site, "server emitter started");
        let task = runtime.spawn(Sender::new(config, http, shared.clone(), rx).run());
        Ok(Emitter {
            inner: Arc::new(Inner {
                inbox,
                shared,
                site,
                capacity,
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// Buffers `event` for delivery and returns its id. Never blocks: when the buffer is full
    /// it returns [`EmitError::BufferFull`] at once. Call it after the fact is committed.
    pub fn emit(&self, event: ServerEvent) -> Result<Uuid, EmitError> {
        let s = &self.inner.shared;
        if s.closed.load(Ordering::Acquire) {
            return Err(EmitError::Closed);
        }
        let (id, json) = event.to_wire(&self.inner.site)?;
        let capacity = self.inner.capacity as u64;
        if s.buffered
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b < capacity).then_some(b + 1)
            })
            .is_err()
        {
            s.refused.fetch_add(1, Ordering::Relaxed);
            return Err(EmitError::BufferFull {
                capacity: self.inner.capacity,
            });
        }
        s.emitted.fetch_add(1, Ordering::Relaxed);
        let queued = Queued {
            id,
            name: event.name,
            json,
            emitted_at: tokio::time::Instant::now(),
            sent: 0,
        };
        if self.inner.inbox.send(Command::Event(queued)).is_err() {
            s.emitted.fetch_sub(1, Ordering::Relaxed);
            s.buffered.fetch_sub(1, Ordering::Relaxed);
            return Err(EmitError::Closed);
        }
        Ok(id)
    }

    /// Sends what is buffered now and waits, at most `timeout`, until every event emitted
    /// before this call is settled. `Ok` means all of them are stored in the relay (or were
    /// already). On [`FlushError::Timeout`] the events stay buffered and keep being retried.
    pub async fn flush(&self, timeout: Duration) -> Result<(), FlushError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .inbox
            .send(Command::Flush(reply))
            .map_err(|_| FlushError::Closed)?;
        match tokio::time::timeout(timeout, answer).await {
            Err(_) => Err(FlushError::Timeout {
                pending: self.inner.shared.buffered.load(Ordering::Relaxed),
                waited: timeout,
            }),
            Ok(Err(_)) => Err(FlushError::Closed),
            Ok(Ok(outcome)) if outcome.failed == 0 && outcome.rejected == 0 => Ok(()),
            Ok(Ok(outcome)) => Err(FlushError::Failed {
                failed: outcome.failed,
                rejected: outcome.rejected,
                last_error: outcome.last_error.unwrap_or_default(),
            }),
        }
    }

    /// Refuses new events, flushes for at most `timeout`, then stops the background task;
    /// what is still unacknowledged is dropped (counted `failed`, logged at ERROR) and
    /// reported as [`FlushError::Timeout`]. Calling it again does nothing.
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), FlushError> {
        self.inner.shared.closed.store(true, Ordering::Release);
        let flushed = self.flush(timeout).await;
        let (reply, stopped) = oneshot::channel();
        if self.inner.inbox.send(Command::Stop(reply)).is_ok() {
            let _ = stopped.await;
        }
        let task = self.inner.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
        match flushed {
            // Already shut down: fine if nothing was left behind.
            Err(FlushError::Closed) => {
                let stats = self.stats();
                if stats.buffered == 0 {
                    Ok(())
                } else {
                    Err(FlushError::Failed {
                        failed: stats.buffered,
                        rejected: 0,
                        last_error: "the emitter's background task stopped with events buffered"
                            .into(),
                    })
                }
            }
            other => other,
        }
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        let s = &self.inner.shared;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            emitted: get(&s.emitted),
            acked: get(&s.acked),
            duplicate: get(&s.duplicate),
            rejected: get(&s.rejected),
            failed: get(&s.failed),
            retried: get(&s.retried),
            refused: get(&s.refused),
            buffered: get(&s.buffered),
            last_error: s.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    /// The site key the events are emitted for.
    pub fn site(&self) -> &str {
        &self.inner.site
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_needs_a_runtime() {
        let cfg = Config::new("http://127.0.0.1:9", "demo", "s3cret-s3cret-s3cret");
        assert!(matches!(Emitter::new(cfg), Err(BuildError::NoRuntime)));
    }

    #[tokio::test]
    async fn a_bad_config_is_refused_before_anything_runs() {
        let mut cfg = Config::new("http://127.0.0.1:9", "demo", "s3cret-s3cret-s3cret");
        cfg.max_batch_events = 0;
        assert!(matches!(Emitter::new(cfg), Err(BuildError::Config(_))));
    }

    #[tokio::test]
    async fn https_endpoints_get_a_client() {
        let cfg = Config::new("https://relay.example", "demo", "s3cret-s3cret-s3cret");
        let e = Emitter::new(cfg).expect("TLS set up from the platform's roots");
        e.shutdown(Duration::from_millis(10)).await.unwrap();
    }

    #[tokio::test]
    async fn after_shutdown_emit_is_refused_and_counters_stay_consistent() {
        let cfg = Config::new("http://127.0.0.1:9", "demo", "s3cret-s3cret-s3cret");
        let e = Emitter::new(cfg).unwrap();
        e.shutdown(Duration::from_millis(10)).await.unwrap();
        let ev = ServerEvent::new("order_paid", "o-1", 1).user_id("u");
        assert_eq!(e.emit(ev), Err(EmitError::Closed));
        assert_eq!(
            e.flush(Duration::from_secs(1)).await,
            Err(FlushError::Closed)
        );
        assert_eq!(e.shutdown(Duration::from_secs(1)).await, Ok(()));
        assert_eq!(e.stats(), Stats::default());
    }
}
