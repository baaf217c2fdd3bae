//! trueup's wire contract, shared by the browser agent, the relay and the server emitter.
//!
//! Version 1 of the contract:
//!
//! - An [`Event`] is one thing that happened, captured once. Its `id` is a UUIDv7 fixed when
//!   the event is captured; it is the idempotency key, so every retry carries the same id and
//!   the relay stores an id once. `ts` is the capture time in milliseconds since the Unix
//!   epoch; the time a batch is sent travels separately, in [`Batch::sent_at`]. Server events
//!   derive their id from an idempotency key and the fact's time ([`id_for_key`]), so a
//!   replayed job emits the same id.
//! - Client events carry `device_id` and `seq`, a per-device counter that only grows: a `seq`
//!   missing at the relay is an event that was captured and never arrived, so loss can be
//!   counted rather than guessed.
//! - Every event names a schema, `"<name>/<version>"`, that the [`SchemaRegistry`] knows; a
//!   schema change is a new version, never a silent break.
//! - A [`Batch`] carries events and the agent's [`Counters`]. The relay answers with a
//!   [`BatchResponse`]: per event, `accepted`, `duplicate` or `rejected` with a [`Reason`].
//!   Whole-request failures use [`ErrorBody`].
//!
//! The crate does no I/O and compiles to `wasm32-unknown-unknown` as well as native targets.
#![deny(missing_docs)]

mod batch;
mod envelope;
mod ids;
mod schema;
mod validate;

pub use batch::{
    Batch, BatchResponse, Counters, ErrorBody, EventResult, EventStatus,
    MAX_EVENTS_PER_BATCH_LIMIT, RawBatch, RawEvents,
};
pub use envelope::{Attribution, Context, Event, Source, Touch};
pub use ids::id_for_key;
pub use schema::{PropSpec, PropType, SchemaDef, SchemaError, SchemaRegistry};
pub use validate::{Limits, Reason, Rejection, json_depth, validate_event};

/// The version of the wire contract this crate implements, sent as `v` in every batch.
pub const PROTOCOL_VERSION: u32 = 1;
