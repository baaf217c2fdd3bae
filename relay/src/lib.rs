//! trueup's first-party relay: a library with a thin binary (`trueup-relay`).
//!
//! The event path: [`ingest`] validates a batch (bounds, site, origin, rate limits, schemas),
//! [`spool`] stores it durably with dedupe in one group-committed transaction and only then
//! is the request answered, [`forwarder`] drains the spool to a [`sinks::Sink`] (the embedded
//! warehouse by default). [`router`] builds the public and admin routers; [`server`] runs them.
#![deny(missing_docs)]

pub mod api;
pub mod config;
pub mod dash;
pub mod forwarder;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod ingest;
pub mod limiters;
pub mod listen;
pub mod loader;
pub mod reconcile;
pub mod router;
pub mod server;
pub mod sinks;
pub mod spool;
pub mod time;

pub use config::Config;
pub use server::Relay;
