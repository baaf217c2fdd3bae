//! The demo shop: a small but real system of record — users and orders in SQLite — served on
//! the shop's own origin together with the trueup relay behind it.
//!
//! What it shows, and promises:
//! - **Attribution kept with the user.** The signup form hands the agent's
//!   `trueup.attribution()` (first and last touch) to the server, which stores it with the
//!   user in the same transaction as the account ([`attribution`], [`db`]). A visitor with no
//!   known touch is stored as unknown, never as "direct".
//! - **Business events from the system of record.** After a signup or an order commits, the
//!   shop emits `signup_completed` / `order_paid` through the server emitter, keyed by the
//!   user's or order's id and stamped with its stored `created_at`: a retried checkout, a
//!   replayed request or a re-emit produces the same event id, stored once ([`api`]).
//! - **Checkout is idempotent.** The page picks an idempotency key per checkout and retries
//!   with it until it gets an answer; the order is created once. `--flaky-checkout` answers
//!   503 *after* committing for a seeded share of requests, to exercise that path.
//! - **The relay on the shop's domain.** `/_r/*` is reverse-proxied to the relay ([`proxy`]),
//!   so the agent's files and batches are first-party; the relay must list the shop as a
//!   trusted proxy to see the browser's address.
//!
//! The binary (`trueup-demo`) reads [`config::Args`], optionally starts the relay itself
//! ([`relay_child`]), and serves [`app`].
#![deny(missing_docs)]

pub mod api;
pub mod attribution;
pub mod config;
pub mod db;
pub mod proxy;
pub mod relay_child;
pub mod time;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::{any, get, post};
use rand::{Rng, SeedableRng};
use tower_http::services::ServeDir;
use tower_http::trace::TraceLayer;
use trueup_emitter::{Emitter, ServerEvent};

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The system of record.
    pub db: db::Db,
    /// Business events to the relay.
    pub emitter: Emitter,
    /// `/_r/*` to the relay.
    pub proxy: proxy::Proxy,
    /// `--flaky-checkout`, when on.
    pub flaky: Option<Arc<Flaky>>,
}

/// Seeded decisions for `--flaky-checkout`.
pub struct Flaky {
    ratio: f64,
    rng: Mutex<rand::rngs::StdRng>,
}

impl Flaky {
    /// `None` when `ratio` is 0 (or less).
    pub fn new(ratio: f64, seed: u64) -> Option<Arc<Flaky>> {
        (ratio > 0.0).then(|| {
            Arc::new(Flaky {
                ratio: ratio.min(1.0),
                rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
            })
        })
    }

    fn roll(&self) -> bool {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        rng.random_bool(self.ratio)
    }
}

impl AppState {
    /// Emits `event`, after the commit it reports. Never fails the request: the fact is in
    /// the database, so a refused emit is logged for a re-emit, not turned into an error.
    pub fn emit(&self, event: ServerEvent) {
        let name = event.name.clone();
        let key = event.key.clone();
        if let Err(e) = self.emitter.emit(event) {
            tracing::error!(event = %name, key = %key, error = %e, "business event not emitted");
        }
    }

    /// Emits again the facts of the last `window_ms` (at most 10,000 users and 10,000
    /// orders). An emit can be lost after its commit (the process dies with the event
    /// buffered, a request is dropped between the commit and the emit); the ids derive from
    /// the facts, so the relay answers `duplicate` for every event it already has.
    pub async fn re_emit_recent(&self, window_ms: i64) -> anyhow::Result<(usize, usize)> {
        let since = time::to_rfc3339(time::now_ms() - window_ms);
        let (users, orders) = self
            .db
            .run(move |conn| db::recent_facts(conn, &since, 10_000))
            .await?;
        for u in &users {
            self.emit(api::signup_event(u)?);
        }
        for o in &orders {
            self.emit(api::order_event(o)?);
        }
        Ok((users.len(), orders.len()))
    }

    /// Whether this checkout answer should be an injected 503.
    pub fn flaky_now(&self) -> bool {
        self.flaky.as_ref().is_some_and(|f| f.roll())
    }
}

/// The shop: the API, `/_r/*` proxied to the relay, and the pages of `www`.
pub fn app(state: AppState, www: &std::path::Path) -> Router {
    Router::new()
        .route("/api/signup", post(api::signup))
        .route("/api/checkout", post(api::checkout))
        .route("/api/healthz", get(|| async { "ok" }))
        .route("/_r/{*rest}", any(proxy::forward))
        .fallback_service(ServeDir::new(www))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
