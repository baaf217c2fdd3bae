//! Batches, the agent's counters, and the relay's answers.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::envelope::Event;
use crate::validate::Reason;

/// No relay configuration may accept more events per batch than this. [`RawEvents`] keeps at
/// most this many events and only counts the rest, so a hostile batch of a million tiny
/// events costs a counter, not a million allocations.
pub const MAX_EVENTS_PER_BATCH_LIMIT: usize = 5_000;

/// A batch as a sender builds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// Protocol version, [`crate::PROTOCOL_VERSION`].
    pub v: u32,
    /// The site key the events belong to (client batches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// When the batch was sent, milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<i64>,
    /// The agent's loss counters at send time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<Counters>,
    /// The events.
    pub events: Vec<Event>,
}

/// A batch as the relay reads it: the header parsed, each event kept as raw JSON so that it
/// can be validated (and dead-lettered) on its own.
#[derive(Debug, Deserialize)]
pub struct RawBatch<'a> {
    /// Protocol version.
    pub v: u32,
    /// Site key.
    #[serde(default)]
    pub site: Option<String>,
    /// Send time.
    #[serde(default)]
    pub sent_at: Option<i64>,
    /// The agent's counters.
    #[serde(default)]
    pub counters: Option<Counters>,
    /// The events, bounded.
    #[serde(borrow)]
    pub events: RawEvents<'a>,
}

/// The events of a [`RawBatch`]: at most [`MAX_EVENTS_PER_BATCH_LIMIT`] kept, all counted.
#[derive(Debug, Default)]
pub struct RawEvents<'a> {
    /// The kept events, in batch order.
    pub items: Vec<&'a RawValue>,
    /// How many events the batch held, kept or not.
    pub total: usize,
}

impl<'de: 'a, 'a> Deserialize<'de> for RawEvents<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BoundedVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for BoundedVisitor<'a> {
            type Value = RawEvents<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of events")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = RawEvents {
                    items: Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64)),
                    total: 0,
                };
                loop {
                    if out.items.len() < MAX_EVENTS_PER_BATCH_LIMIT {
                        match seq.next_element::<&'de RawValue>()? {
                            Some(raw) => out.items.push(raw),
                            None => break,
                        }
                    } else if seq.next_element::<IgnoredAny>()?.is_none() {
                        break;
                    }
                    out.total += 1;
                }
                Ok(out)
            }
        }
        deserializer.deserialize_seq(BoundedVisitor(std::marker::PhantomData))
    }
}

/// The agent's persisted loss counters. At every moment
/// `enqueued == acked + dropped_total() + pending`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counters {
    /// The device these counters belong to.
    pub device_id: String,
    /// Events accepted by `track()` and given an id and a seq.
    pub enqueued: u64,
    /// Send attempts of events (an event sent twice counts twice).
    #[serde(default)]
    pub sent: u64,
    /// Events the relay answered `accepted` or `duplicate` for.
    pub acked: u64,
    /// Events sent again after a failed attempt.
    #[serde(default)]
    pub retried: u64,
    /// Events still queued.
    pub pending: u64,
    /// Events given up, by reason (`queue_full`, `expired`, `rejected`, `storage_unavailable`,
    /// `too_large`, `consent`, `wasm_unavailable`, ...).
    #[serde(default)]
    pub dropped: BTreeMap<String, u64>,
    /// The agent's degraded mode, if any (e.g. `memory_queue`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

impl Counters {
    /// Sum of all drop reasons.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }

    /// Whether `enqueued == acked + dropped + pending` holds.
    pub fn identity_holds(&self) -> bool {
        self.acked
            .checked_add(self.dropped_total())
            .and_then(|x| x.checked_add(self.pending))
            == Some(self.enqueued)
    }
}

/// What happened to one event of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum EventStatus {
    /// Stored durably for the first time.
    Accepted,
    /// Already stored earlier; this copy was not stored again.
    Duplicate,
    /// Not valid; kept in the relay's dead-letter store.
    Rejected {
        /// Why.
        reason: Reason,
        /// A human-readable detail (which field, what was expected).
        detail: String,
    },
}

/// The answer for one event, in batch order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventResult {
    /// The event's id when it had a readable one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    /// The outcome.
    #[serde(flatten)]
    pub status: EventStatus,
}

/// The relay's 200 answer to a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResponse {
    /// Events stored for the first time.
    pub accepted: u32,
    /// Events already stored.
    pub duplicate: u32,
    /// Events rejected.
    pub rejected: u32,
    /// Per event, in batch order.
    pub results: Vec<EventResult>,
}

impl BatchResponse {
    /// Appends a result and updates the totals.
    pub fn push(&mut self, result: EventResult) {
        match result.status {
            EventStatus::Accepted => self.accepted += 1,
            EventStatus::Duplicate => self.duplicate += 1,
            EventStatus::Rejected { .. } => self.rejected += 1,
        }
        self.results.push(result);
    }
}

/// The body of every whole-request error (4xx/5xx).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable machine-readable code, e.g. `payload_too_large`.
    pub error: String,
    /// A short explanation for humans.
    pub message: String,
}
