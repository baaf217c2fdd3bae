//! Receivers that stand in for the upstreams the relay's sinks forward to (PostHog's
//! `/batch/`, Segment's and RudderStack's `/v1/batch`, a signed webhook), over real HTTP on
//! loopback. Each enforces that upstream's documented limits and answers, records every
//! event it took by id (and how many times each id arrived), and plays faults a test scripts:
//! an answer without storing (429 with Retry-After, 503, …), a connection closed after
//! storing (so the retry is a duplicate it sees), an answer slower than the relay's timeout,
//! or being down altogether.
//!
//! Only the relay's own tests use it (`#[path = "support/upstream.rs"] mod upstream;`), so the
//! other crates that share `support/` need none of its dependencies.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Which upstream a receiver is.
#[derive(Clone, Debug)]
pub enum Flavor {
    /// PostHog: `POST /batch/`, `api_key` in the body.
    Posthog { api_key: String },
    /// Segment / RudderStack: `POST /v1/batch`, HTTP Basic `write_key:`.
    Segment { write_key: String },
    /// A webhook verifying `Trueup-Signature` with the shared secret.
    Webhook { secret: String },
}

/// A fault for the next request.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer this status (with `Retry-After` seconds if given), storing nothing.
    Status(u16, Option<u64>),
    /// Store the batch, then close the connection without answering.
    ResetAfterStore,
    /// Wait this long before handling the request normally (a slow upstream).
    Delay(Duration),
}

#[derive(Default)]
pub struct Seen {
    /// Every event taken, by its id, in the upstream's form.
    pub events: HashMap<String, Value>,
    /// How many times each id arrived in a request that was taken.
    pub arrivals: HashMap<String, u32>,
    /// Requests received (all answers).
    pub requests: u32,
    /// Requests answered 413 by the size limit.
    pub too_large: u32,
    /// Requests answered 400 because of a poisoned event.
    pub refused: u32,
    /// Largest body taken, bytes.
    pub largest_body: usize,
    /// Idempotency keys of webhook batches taken.
    pub batch_ids: Vec<String>,
}

struct State {
    flavor: Flavor,
    max_body: usize,
    max_event: usize,
    max_events: usize,
    faults: VecDeque<Fault>,
    down: bool,
    seen: Seen,
}

/// A running receiver.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl Upstream {
    /// Starts one on 127.0.0.1:0 with the upstream's documented limits
    /// (PostHog 20 MB per request; Segment 500 KB per batch, 32 KB per event, 2,500 events;
    /// webhooks 1 MiB, our own default).
    pub async fn start(flavor: Flavor) -> Upstream {
        let (max_body, max_event, max_events) = match &flavor {
            Flavor::Posthog { .. } => (20 * 1000 * 1000, usize::MAX, usize::MAX),
            Flavor::Segment { .. } => (500 * 1000, 32 * 1000, 2_500),
            Flavor::Webhook { .. } => (1024 * 1024, usize::MAX, usize::MAX),
        };
        let state = Arc::new(Mutex::new(State {
            flavor,
            max_body,
            max_event,
            max_events,
            faults: VecDeque::new(),
            down: false,
            seen: Seen::default(),
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A smaller request-size limit than the upstream's own (to make 413s happen).
    pub fn limit_body(&self, bytes: usize) {
        self.state.lock().unwrap().max_body = bytes;
    }

    pub fn push_fault(&self, f: Fault) {
        self.state.lock().unwrap().faults.push_back(f);
    }

    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    pub fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.state.lock().unwrap().seen)
    }

    /// Waits (at most `secs`) until `n` distinct events have been taken.
    pub async fn wait_for(&self, n: usize, secs: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.seen(|s| s.events.len());
            if got >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "upstream has {got} of {n} events after {secs} s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

type Answer = Result<Response<Full<Bytes>>, std::io::Error>;

fn reply(status: u16, retry_after: Option<u64>, body: &str) -> Answer {
    let mut r = Response::builder().status(status);
    if let Some(s) = retry_after {
        r = r.header("retry-after", s.to_string());
    }
    Ok(r.body(Full::new(Bytes::from(body.to_string()))).unwrap())
}

async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Answer {
    let fault = {
        let mut s = state.lock().unwrap();
        s.seen.requests += 1;
        s.faults.pop_front()
    };
    if let Some(Fault::Delay(d)) = &fault {
        tokio::time::sleep(*d).await;
    }
    if let Some(Fault::Status(code, after)) = fault {
        return reply(code, after, "{\"error\":\"scripted\"}");
    }
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(400, None, "unreadable body"),
    };
    let mut s = state.lock().unwrap();
    if s.down {
        return reply(503, Some(1), "{\"error\":\"down\"}");
    }
    if body.len() > s.max_body {
        s.seen.too_large += 1;
        return reply(413, None, "{\"error\":\"payload too large\"}");
    }
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let Ok(doc) = serde_json::from_slice::<Value>(&body) else {
        return reply(400, None, "{\"error\":\"invalid json\"}");
    };
    // (id, event) pairs in the upstream's form, after its own checks.
    let taken: Vec<(String, Value)> = match s.flavor.clone() {
        Flavor::Posthog { api_key } => {
            if parts.uri.path() != "/batch/" {
                return reply(404, None, "not found");
            }
            if doc["api_key"] != api_key.as_str() {
                return reply(401, None, "{\"error\":\"invalid api key\"}");
            }
            let Some(batch) = doc["batch"].as_array() else {
                return reply(400, None, "{\"error\":\"no batch\"}");
            };
            let mut out = Vec::new();
            for e in batch {
                let ok = e["event"].is_string()
                    && e["distinct_id"].is_string()
                    && e["uuid"].is_string()
                    && e["timestamp"]
                        .as_str()
                        .is_some_and(|t| t.parse::<jiff::Timestamp>().is_ok())
                    && e["properties"].is_object();
                if !ok || e["properties"]["poison"] == true {
                    s.seen.refused += 1;
                    return reply(
                        400,
                        None,
                        "{\"type\":\"validation_error\",\"detail\":\"invalid event\"}",
                    );
                }
                out.push((e["uuid"].as_str().unwrap().to_string(), e.clone()));
            }
            out
        }
        Flavor::Segment { write_key } => {
            if parts.uri.path() != "/v1/batch" {
                return reply(404, None, "not found");
            }
            use base64::Engine as _;
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"))
            );
            if header("authorization") != want {
                return reply(401, None, "{\"error\":\"invalid write key\"}");
            }
            let Some(batch) = doc["batch"].as_array() else {
                return reply(400, None, "{\"error\":\"no batch\"}");
            };
            if batch.len() > s.max_events {
                return reply(400, None, "{\"error\":\"too many messages\"}");
            }
            let mut out = Vec::new();
            for m in batch {
                if m.to_string().len() > s.max_event {
                    // Segment: a message over 32 KB is refused.
                    s.seen.refused += 1;
                    return reply(400, None, "{\"error\":\"message too large\"}");
                }
                let ok = m["messageId"].is_string()
                    && m["anonymousId"].is_string()
                    && matches!(m["type"].as_str(), Some("track" | "page" | "identify"))
                    && m["timestamp"]
                        .as_str()
                        .is_some_and(|t| t.parse::<jiff::Timestamp>().is_ok())
                    && m["sentAt"]
                        .as_str()
                        .is_some_and(|t| t.parse::<jiff::Timestamp>().is_ok());
                if !ok || m["properties"]["poison"] == true {
                    s.seen.refused += 1;
                    return reply(400, None, "{\"error\":\"invalid message\"}");
                }
                out.push((m["messageId"].as_str().unwrap().to_string(), m.clone()));
            }
            out
        }
        Flavor::Webhook { secret } => {
            let ts = header("trueup-timestamp");
            let want = signature(&secret, &ts, &body);
            let fresh = ts
                .parse::<i64>()
                .is_ok_and(|t| (t - jiff::Timestamp::now().as_second()).abs() <= 300);
            if header("trueup-signature") != want || !fresh {
                return reply(401, None, "{\"error\":\"bad signature\"}");
            }
            let key = header("idempotency-key");
            if key.is_empty() || doc["batch_id"] != key.as_str() {
                return reply(400, None, "{\"error\":\"idempotency key\"}");
            }
            let Some(records) = doc["records"].as_array() else {
                return reply(400, None, "{\"error\":\"no records\"}");
            };
            let mut out = Vec::new();
            for r in records {
                if r["type"] != "event" {
                    continue;
                }
                if r["data"]["props"]["poison"] == true {
                    s.seen.refused += 1;
                    return reply(422, None, "{\"error\":\"refused\"}");
                }
                out.push((
                    r["data"]["id"].as_str().unwrap_or("").to_string(),
                    r.clone(),
                ));
            }
            s.seen.batch_ids.push(key);
            out
        }
    };
    s.seen.largest_body = s.seen.largest_body.max(body.len());
    for (id, e) in taken {
        *s.seen.arrivals.entry(id.clone()).or_default() += 1;
        s.seen.events.insert(id, e);
    }
    drop(s);
    if let Some(Fault::ResetAfterStore) = fault {
        return Err(std::io::Error::other("connection reset after storing"));
    }
    reply(200, None, "{\"status\":\"ok\"}")
}

/// What a receiver computes: `v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub fn signature(secret: &str, ts: &str, body: &[u8]) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("v1={hex}")
}
