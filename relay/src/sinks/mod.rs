//! Sinks: where the forwarder delivers spooled records. One file per sink, one trait.
//!
//! A sink receives records in spool order and answers for the whole call: either it has
//! durably taken every record except those it lists as permanently rejected, or it failed and
//! the forwarder retries the same records later. Delivery is at-least-once (a crash after the
//! sink's commit and before the spool's deletion re-delivers), so sinks must treat the event
//! id as an idempotency key.

pub(crate) mod form;
pub mod http;
pub mod kafka;
mod log;
pub mod nats;
pub mod posthog;
pub mod segment;
pub mod warehouse;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::config::{Config, SinkConfig, SinkKind};
use crate::spool::Record;

/// The sink's answer to a delivery that succeeded.
#[derive(Debug, Default)]
pub struct Delivery {
    /// Records the sink will never take, by position, with a reason; they go to the
    /// dead-letter table.
    pub rejected: Vec<(i64, String)>,
}

/// A delivery that failed as a whole; the forwarder retries it.
#[derive(Debug, thiserror::Error)]
#[error("sink unavailable: {message}")]
pub struct SinkError {
    /// What went wrong.
    pub message: String,
    /// How long the sink asked us to wait, if it did.
    pub retry_after: Option<Duration>,
}

/// A destination for spooled records.
#[async_trait::async_trait]
pub trait Sink: Send + Sync + 'static {
    /// Delivers records (in order). See the module docs for the contract.
    async fn deliver(&self, records: Arc<Vec<Record>>) -> Result<Delivery, SinkError>;
}

/// Opens the sink a `[[sinks]]` entry describes (reading its secret).
pub async fn open(cfg: &Config, sink: &SinkConfig) -> anyhow::Result<Arc<dyn Sink>> {
    let what = || format!("sink {:?} ({})", sink.name, sink.kind.as_str());
    let secret = || -> anyhow::Result<String> {
        sink.secret()?
            .with_context(|| format!("{}: no secret_env or secret_file", what()))
    };
    Ok(match sink.kind {
        SinkKind::Warehouse => {
            let path = cfg.warehouse_path_of(sink);
            Arc::new(
                warehouse::WarehouseSink::open(&path)
                    .with_context(|| format!("{}: cannot open {}", what(), path.display()))?,
            )
        }
        SinkKind::Postgres => {
            // The PostgreSQL client blocks (it runs its own runtime): off the async threads.
            let url = secret()?;
            let sink = tokio::task::spawn_blocking(move || warehouse::WarehouseSink::postgres(url))
                .await?
                .with_context(|| format!("{}: cannot connect", what()))?;
            Arc::new(sink)
        }
        SinkKind::Webhook => Arc::new(webhook::WebhookSink::new(sink, secret()?)?),
        SinkKind::Posthog => Arc::new(posthog::PosthogSink::new(sink, secret()?)?),
        SinkKind::Segment | SinkKind::Rudderstack => {
            Arc::new(segment::SegmentSink::new(sink, secret()?)?)
        }
        SinkKind::Nats => Arc::new(
            nats::NatsSink::new(sink, sink.secret()?)
                .await
                .with_context(|| format!("{}: cannot connect", what()))?,
        ),
        SinkKind::Kafka => Arc::new(
            kafka::KafkaSink::new(sink, sink.secret()?)
                .with_context(|| format!("{}: cannot create the producer", what()))?,
        ),
    })
}
