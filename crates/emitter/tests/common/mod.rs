//! What the emitter's integration tests share: a relay that knows the example schemas, an
//! emitter for it with short backoffs, and reading the warehouse.
#![allow(dead_code)]

use std::time::Duration;

use trueup_emitter::{Config, Emitter, ServerEvent};

use crate::support::{RelayProc, SERVER_SECRET};

/// How long a test waits for a flush before calling it a failure.
pub const FLUSH: Duration = Duration::from_secs(20);

/// The real relay in `dir`, with `relay/schemas.example.toml` and `extra` TOML.
pub fn start_relay(dir: &std::path::Path, extra: &str) -> RelayProc {
    let schemas = crate::relay_binary::example_schemas();
    RelayProc::start(
        dir,
        &format!("schemas_file = \"{}\"\n{extra}", schemas.display()),
    )
}

/// An emitter for `relay`'s site `demo` with short backoffs, adjusted by `tweak`.
pub fn emitter(relay: &RelayProc, tweak: impl FnOnce(&mut Config)) -> Emitter {
    let mut cfg = Config::new(relay.url(""), "demo", SERVER_SECRET);
    cfg.initial_backoff = Duration::from_millis(50);
    cfg.max_backoff = Duration::from_millis(500);
    tweak(&mut cfg);
    Emitter::new(cfg).unwrap()
}

/// A valid `order_paid/1` fact.
pub fn order_paid(order: &str, ts: i64) -> ServerEvent {
    ServerEvent::new("order_paid", order, ts)
        .user_id("user-7")
        .prop("order_id", order)
        .prop("amount", 49.5)
        .prop("currency", "EUR")
}

/// Server events in the warehouse once the relay's spool is drained.
pub fn server_rows(relay: &RelayProc) -> i64 {
    relay.wait_drained();
    relay.count(
        &relay.warehouse(),
        "SELECT count(*) FROM events WHERE source = 'server'",
    )
}
