//! The NATS JetStream sink: one message per spooled record, through `async-nats`.
//!
//! # What the stream gets
//!
//! - **Subject**: `<subject>.<shard>`, the shard a stable hash (FNV-1a) of the event's
//!   `session_id` (its `anon_id` when it has none; counters: the `device_id`) modulo `shards`:
//!   one session's events are in one subject, in order, and consumers can split by subject.
//! - **Payload**: the record exactly as the relay stored it (as the Kafka sink's value).
//! - **Headers**: `Nats-Msg-Id` = the event id (counters: `counters:<device>:<received_at>`),
//!   and the same `trueup-*` headers as the Kafka sink.
//!
//! # Guarantees
//!
//! Every publish waits for JetStream's acknowledgement (the message is stored in the
//! stream); a delivery returns only when every record's has come back, and the forwarder
//! moves the sink's cursor after that. A failed or missing acknowledgement fails the whole
//! delivery and the same records are published again: within the stream's duplicate window
//! the server drops the repeats by `Nats-Msg-Id` (counted in `trueup_nats_duplicates_total`);
//! after it, the loader stores them once. The stream is created if missing (file storage,
//! subjects `<subject>.>`, the configured duplicate window); an existing stream is used as it
//! is.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures_util::future::join_all;

use super::log::LogMessage;
use super::{Delivery, Sink, SinkError};
use crate::config::SinkConfig;
use crate::spool::Record;
use crate::time::now_ms;

/// The NATS JetStream sink.
pub struct NatsSink {
    js: jetstream::Context,
    stream: jetstream::stream::Config,
    /// The stream is known to exist (checked once, then again after a failure).
    ready: tokio::sync::Mutex<bool>,
    subject: String,
    shards: u32,
    max_event_bytes: usize,
}

/// FNV-1a: a hash that never changes between versions or machines, so a session's shard
/// does not either.
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Connects to a NATS server (in the background: the relay starts while NATS is down, and
/// deliveries fail until it is up), with `token` if given.
pub async fn connect(url: &str, token: Option<String>) -> anyhow::Result<async_nats::Client> {
    let mut opts = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .name("trueup");
    if let Some(t) = token {
        opts = opts.token(t);
    }
    Ok(opts.connect(url).await?)
}

impl NatsSink {
    /// A sink for `cfg` (kind `nats`); `secret` is the server's token, if any.
    pub async fn new(cfg: &SinkConfig, secret: Option<String>) -> anyhow::Result<NatsSink> {
        let client = connect(cfg.url.as_deref().unwrap_or_default(), secret).await?;
        let mut js = jetstream::new(client);
        js.set_timeout(cfg.timeout());
        let stream = jetstream::stream::Config {
            name: cfg.stream().to_string(),
            subjects: vec![format!("{}.>", cfg.subject())],
            storage: jetstream::stream::StorageType::File,
            duplicate_window: cfg.duplicate_window(),
            ..Default::default()
        };
        Ok(NatsSink {
            js,
            stream,
            ready: tokio::sync::Mutex::new(false),
            subject: cfg.subject().to_string(),
            shards: cfg.shards(),
            max_event_bytes: cfg.max_event_bytes(),
        })
    }

    async fn ensure_stream(&self) -> Result<(), SinkError> {
        let mut ready = self.ready.lock().await;
        if !*ready {
            self.js
                .get_or_create_stream(self.stream.clone())
                .await
                .map_err(|e| SinkError {
                    message: format!("cannot get or create stream {}: {e}", self.stream.name),
                    retry_after: None,
                })?;
            *ready = true;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Sink for NatsSink {
    async fn deliver(&self, records: Arc<Vec<Record>>) -> Result<Delivery, SinkError> {
        let fail = |message: String| SinkError {
            message,
            retry_after: None,
        };
        self.ensure_stream().await?;
        let mut delivery = Delivery::default();
        let mut acks = Vec::with_capacity(records.len());
        for r in records.iter() {
            let m = match LogMessage::of(r, self.max_event_bytes) {
                Ok(m) => m,
                Err(reason) => {
                    delivery.rejected.push((r.pos, reason));
                    continue;
                }
            };
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", m.dedupe_id().as_str());
            for (name, v) in m.headers() {
                headers.insert(name, v);
            }
            let shard = m.key().map_or(0, fnv1a) % self.shards;
            let subject = format!("{}.{shard}", self.subject);
            let ack = match self
                .js
                .publish_with_headers(subject, headers, r.body.clone().into())
                .await
            {
                Ok(ack) => ack,
                Err(e) => {
                    *self.ready.lock().await = false;
                    return Err(fail(format!("cannot publish: {e}")));
                }
            };
            acks.push((r.received_at, ack));
        }
        let results = join_all(
            acks.into_iter()
                .map(|(received_at, ack)| async move { (received_at, ack.await) }),
        )
        .await;
        let now = now_ms();
        let mut first_error = None;
        for (received_at, result) in results {
            match result {
                Ok(ack) => {
                    if ack.duplicate {
                        metrics::counter!("trueup_nats_duplicates_total").increment(1);
                    }
                    metrics::histogram!("trueup_pipeline_lag_seconds", "stage" => "accepted_to_log")
                        .record((now - received_at).max(0) as f64 / 1000.0);
                }
                Err(e) => {
                    first_error.get_or_insert_with(|| format!("not acknowledged: {e}"));
                }
            }
        }
        match first_error {
            Some(e) => {
                // The stream may have been deleted: look again before the next attempt.
                *self.ready.lock().await = false;
                Err(fail(e))
            }
            None => Ok(delivery),
        }
    }
}
