//! Entry points for the fuzz targets (`fuzz/` at the repository root; not an API).
//!
//! Each function runs the relay's real code on bytes, without a server: the same functions
//! of [`crate::ingest`] a request goes through, in the same order, up to the spool write,
//! which is replaced by "every valid event is new". The state is built once from
//! [`Config::default()`] with three changes that keep runs deterministic and every bound
//! reachable with small inputs:
//!
//! - the rate limits are off (a fuzzer sends thousands of batches a second);
//! - `max_past_secs`/`max_future_secs` are a century, so seed events with a fixed `ts` stay
//!   valid (and `dedupe_retention_secs` follows, as validation demands);
//! - the body caps are smaller (64 KiB raw, 256 KiB decompressed, 50 events, 8 KiB per
//!   event) so that every "too large" answer is within a fuzzer's input sizes.
//!
//! The schema registry is the built-in one plus `relay/schemas.example.toml`; the site is
//! `demo`, with the server secret [`SERVER_SECRET`].

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{HeaderValue, Request, header};
use serde::Deserialize;
use trueup_protocol::{BatchResponse, SchemaDef, SchemaRegistry, Source};

use crate::api::ApiError;
use crate::config::{Config, ConfigError, SiteConfig};
use crate::ingest::{self, AppState};
use crate::limiters::Limiters;
use crate::spool::{Admission, Spool};

/// The `demo` site's server secret in the fuzzing state.
pub const SERVER_SECRET: &str = "fuzz-server-secret-0123456789";

/// How a body is presented to an ingest endpoint (decoded from the fuzz input's first byte).
#[derive(Debug, Clone, Copy, Default)]
pub struct Presented {
    /// `?z=gzip` in the query.
    pub query_gzip: bool,
    /// `Content-Encoding: gzip`.
    pub header_gzip: bool,
    /// Send a `Content-Length` header with the body's length.
    pub content_length: bool,
    /// Send an `Origin` header (one the `demo` site does not list; same-origin applies).
    pub origin: bool,
    /// Server path: present the right secret (else a wrong one).
    pub good_secret: bool,
}

impl Presented {
    /// The flags of one byte (bit 0: `?z=gzip`, 1: `Content-Encoding`, 2: `Content-Length`,
    /// 3: `Origin`, 4: the right secret).
    pub fn from_byte(b: u8) -> Presented {
        Presented {
            query_gzip: b & 1 != 0,
            header_gzip: b & 2 != 0,
            content_length: b & 4 != 0,
            origin: b & 8 != 0,
            good_secret: b & 16 != 0,
        }
    }
}

#[derive(Deserialize)]
struct SchemaFile {
    schema: Vec<SchemaDef>,
}

fn state() -> &'static AppState {
    static STATE: OnceLock<AppState> = OnceLock::new();
    STATE.get_or_init(|| {
        let mut cfg = Config::default();
        cfg.rate_limit.per_ip_per_sec = 0;
        cfg.rate_limit.per_site_per_sec = 0;
        let century = 100 * 366 * 24 * 3600;
        cfg.limits.max_past_secs = century;
        cfg.limits.max_future_secs = century;
        cfg.spool.dedupe_retention_secs = century as u64;
        cfg.limits.max_body_bytes = 64 * 1024;
        cfg.limits.max_decompressed_bytes = 256 * 1024;
        cfg.limits.max_events_per_batch = 50;
        cfg.limits.max_event_bytes = 8 * 1024;
        cfg.sites = vec![SiteConfig {
            key: "demo".into(),
            origins: vec!["https://shop.example".into()],
            allow_same_origin: true,
            server_secrets: vec![SERVER_SECRET.into()],
        }];
        cfg.validate().expect("the fuzzing config is valid");
        let mut registry = SchemaRegistry::builtin();
        let file: SchemaFile = toml::from_str(include_str!("../schemas.example.toml"))
            .expect("the example schemas parse");
        for def in file.schema {
            registry
                .register(def)
                .expect("the example schemas register");
        }
        let spool = Spool::open(std::path::Path::new(":memory:"), 1, &["fuzz".into()])
            .expect("an in-memory spool opens");
        AppState {
            registry: Arc::new(registry),
            limits: cfg.event_limits(),
            spool: Arc::new(spool),
            limiters: Arc::new(Limiters::new(&cfg.rate_limit)),
            sites: Arc::new(
                cfg.sites
                    .iter()
                    .map(|s| (s.key.clone(), s.clone()))
                    .collect::<HashMap<_, _>>(),
            ),
            shutting_down: Arc::new(AtomicBool::new(false)),
            faults: None,
            body_budget: ingest::body_budget(&cfg),
            cfg: Arc::new(cfg),
        }
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

/// The per-event limits the fuzzing state validates with.
pub fn limits() -> trueup_protocol::Limits {
    state().limits
}

/// The schema registry the fuzzing state validates with.
pub fn registry() -> &'static SchemaRegistry {
    &state().registry
}

/// What an ingest endpoint made of a body: the answer it would send once the spool stored
/// every valid event as new, the raw text of those events, or the whole-request refusal.
pub struct Outcome {
    /// The 200 answer, or the refusal (4xx).
    pub answer: Result<BatchResponse, ApiError>,
    /// The raw JSON of each event that would be stored, as the spool would store it.
    pub stored: Vec<String>,
    /// How many events the batch carried (kept ones), when it parsed.
    pub events: usize,
}

/// `POST <prefix>/<collect_path>` with `body`, presented as `req` says.
pub fn collect(body: &[u8], req: Presented) -> Outcome {
    run(Source::Client, body, req)
}

/// `POST <prefix>/<server_path>` with `body` (the `demo` site's secret, or a wrong one).
pub fn server_events(body: &[u8], req: Presented) -> Outcome {
    run(Source::Server, body, req)
}

fn run(source: Source, body: &[u8], req: Presented) -> Outcome {
    let st = state();
    let mut stored = Vec::new();
    let mut events = 0;
    let answer = (|| {
        let mut uri = String::from("/_r/q");
        if req.query_gzip {
            uri.push_str("?z=gzip");
        }
        let mut b = Request::builder()
            .method("POST")
            .uri(uri)
            .header(header::CONTENT_TYPE, "text/plain;charset=UTF-8")
            .header(header::HOST, "relay.example");
        if req.header_gzip {
            b = b.header(header::CONTENT_ENCODING, "gzip");
        }
        if req.content_length {
            b = b.header(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        if req.origin {
            b = b.header(header::ORIGIN, "https://relay.example");
        }
        if source == Source::Server {
            let secret = if req.good_secret {
                SERVER_SECRET
            } else {
                "not-the-secret-at-all"
            };
            b = b.header(header::AUTHORIZATION, format!("Bearer {secret}"));
        }
        let request = b
            .body(Body::from(body.to_vec()))
            .expect("a well-formed request");
        let (parts, body) = request.into_parts();
        let caller = ingest::limit_caller(st, source, &parts)?;
        let bytes = runtime().block_on(ingest::read_batch_bytes(
            st,
            &parts.headers,
            body,
            caller.gzip,
        ))?;
        let batch = ingest::parse_batch(st, &bytes)?;
        events = batch.events.items.len();
        let site = ingest::admit_site(st, &caller, &batch, &parts.headers)?;
        let mut checked = ingest::validate_batch(st, source, &site, &batch);
        let _counters = ingest::counters_of(&batch, &site);
        let fresh = std::mem::take(&mut checked.fresh);
        let admissions = vec![Admission::New; fresh.len()];
        stored = fresh.into_iter().map(|e| e.body).collect();
        Ok(ingest::answer(source, checked, admissions))
    })();
    Outcome {
        answer,
        stored,
        events,
    }
}

/// The config loader: TOML text as [`Config::from_file`] reads it, then [`Config::validate`].
pub fn load_config(text: &str) -> Result<Config, ConfigError> {
    let mut cfg: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: "<fuzz>".into(),
        source: Box::new(source),
    })?;
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trueup_protocol::{EventStatus, Reason};

    /// Found by the `collect_body` fuzz target (`fuzz/corpus/collect_body/regress-repeated-field`):
    /// an event with a repeated field (`anon_id`, `session_id`, ...) was answered `accepted`
    /// and spooled, but its stored text does not parse as an event, so the sinks would have
    /// dead-lettered it. It is rejected now, and nothing of it is stored.
    #[test]
    fn an_event_with_a_repeated_field_is_rejected_not_stored() {
        let event = r#"{"id":"0196a1b2-c3d4-7e5f-8a9b-000000000032","name":"button_clicked","schema":"event/1","ts":1789999999000,"source":"client","anon_id":"anon-1","session_id":"sessient","anon_id":"anon-1","session_id":"sess-1","device_id":"d1","seq":9,"props":{"traits":{"email":"a@b.example"}},"context":{"url":"https://shop.example/cart","title":"Cart"},"user_id":"u-1"}"#;
        let body = format!(r#"{{"v":1,"site":"demo","events":[{event}]}}"#);
        let out = collect(body.as_bytes(), Presented::from_byte(0x04));
        let resp = out.answer.expect("the batch is answered 200");
        assert_eq!((resp.accepted, resp.rejected), (0, 1));
        assert!(out.stored.is_empty());
        assert!(matches!(
            resp.results[0].status,
            EventStatus::Rejected {
                reason: Reason::InvalidEnvelope,
                ..
            }
        ));
        // The same event without the repeats is accepted: the state accepts the seeds' times.
        let fixed = event.replace(r#""anon_id":"anon-1","session_id":"sessient","#, "");
        let body = format!(r#"{{"v":1,"site":"demo","events":[{fixed}]}}"#);
        let out = collect(body.as_bytes(), Presented::default());
        assert_eq!(out.answer.expect("200").accepted, 1);
        assert_eq!(out.stored, vec![fixed]);
    }
}
