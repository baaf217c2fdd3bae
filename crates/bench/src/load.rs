//! The load generator: keep-alive HTTP/1.1 connections (a bare hyper client, no pool), a
//! closed-loop phase (every connection sends its next batch as soon as the previous one is
//! answered) and an open-loop phase (batches scheduled at fixed intervals, latency measured
//! from the scheduled time so that a slow answer cannot hide the requests it delayed).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::batch::BatchWriter;

/// Longest a single request may take before it counts as an error (and its connection is
/// replaced).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before reconnecting after a connection failed.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// Highest latency the histograms track, microseconds (beyond: clamped).
const MAX_TRACKED_US: u64 = 120_000_000;

/// What a successful answer looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The relay: `200` with a JSON answer whose `accepted` equals the events sent.
    RelayAccepted,
    /// The baseline: `204 No Content`.
    NoContent,
}

/// Where the load goes.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server.
    pub addr: SocketAddr,
    /// The path batches are POSTed to.
    pub path: Uri,
    /// How answers are checked.
    pub expect: Expect,
}

/// The shape of a phase's load.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// Events per batch.
    pub events_per_batch: usize,
    /// How long new requests are started for.
    pub duration: Duration,
    /// Connection `c` of this phase simulates device `device_base + c` (so `seq` keeps
    /// growing per device across phases).
    pub device_base: usize,
}

/// What one phase measured.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    /// From the first scheduled request to the last answer.
    pub elapsed: Duration,
    /// Requests answered as expected.
    pub requests: u64,
    /// Events in the requests answered as expected.
    pub events: u64,
    /// Events the relay answered `accepted` for, in any 200 answer (also partial ones).
    pub accepted: u64,
    /// Latency of the requests answered as expected, microseconds.
    pub latency: Histogram<u64>,
    /// Open loop only: how late requests were sent after their scheduled time, microseconds.
    pub send_lag: Histogram<u64>,
    /// Failed requests by kind.
    pub errors: BTreeMap<String, u64>,
}

impl PhaseResult {
    /// Nothing measured.
    pub fn empty() -> PhaseResult {
        PhaseResult {
            elapsed: Duration::ZERO,
            requests: 0,
            events: 0,
            accepted: 0,
            latency: histogram(),
            send_lag: histogram(),
            errors: BTreeMap::new(),
        }
    }

    fn merge(&mut self, other: PhaseResult) {
        self.requests += other.requests;
        self.events += other.events;
        self.accepted += other.accepted;
        self.latency
            .add(&other.latency)
            .expect("histograms share their bounds");
        self.send_lag
            .add(&other.send_lag)
            .expect("histograms share their bounds");
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }

    /// Failed requests, all kinds.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Events answered as expected per second.
    pub fn events_per_sec(&self) -> f64 {
        per_sec(self.events, self.elapsed)
    }

    /// Requests answered as expected per second.
    pub fn requests_per_sec(&self) -> f64 {
        per_sec(self.requests, self.elapsed)
    }

    /// A latency quantile in milliseconds (0 when nothing was answered).
    pub fn latency_ms(&self, quantile: f64) -> f64 {
        if self.latency.is_empty() {
            return 0.0;
        }
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// The highest latency in milliseconds.
    pub fn max_latency_ms(&self) -> f64 {
        self.latency.max() as f64 / 1000.0
    }
}

fn per_sec(n: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        0.0
    } else {
        n as f64 / elapsed.as_secs_f64()
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_TRACKED_US, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(MAX_TRACKED_US)) as u64
}

/// A keep-alive HTTP/1.1 connection.
type Conn = SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Conn> {
    let stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Ends when the server closes the connection or the sender is dropped; a failure
        // shows up on the sender's next request.
        let _ = conn.await;
    });
    Ok(sender)
}

/// One request's failure: what to count it as, and whether the connection is unusable.
struct Failure {
    kind: String,
    reconnect: bool,
    /// A 200 answer that accepted fewer events than sent still stored these.
    accepted: u64,
}

impl Failure {
    fn broken(kind: String) -> Failure {
        Failure {
            kind,
            reconnect: true,
            accepted: 0,
        }
    }
}

/// The relay's 200 answer, the totals only.
#[derive(Deserialize)]
struct Answer {
    accepted: u64,
    #[serde(default)]
    duplicate: u64,
    #[serde(default)]
    rejected: u64,
}

/// The relay's error body.
#[derive(Deserialize)]
struct ErrorAnswer {
    error: String,
}

/// POSTs one batch and checks the answer. Returns the events accepted.
async fn post_batch(
    conn: &mut Conn,
    target: &Target,
    body: Bytes,
    events: u64,
) -> Result<u64, Failure> {
    if let Err(e) = conn.ready().await {
        return Err(Failure::broken(format!("connection lost: {e}")));
    }
    let req = Request::builder()
        .method(Method::POST)
        .uri(target.path.clone())
        .header(header::HOST, target.addr.to_string())
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Full::new(body))
        .expect("valid request");
    let exchange = async {
        let resp = conn.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, body))
    };
    let (status, body) = match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Err(_) => {
            return Err(Failure::broken(format!(
                "timeout after {} s",
                REQUEST_TIMEOUT.as_secs()
            )));
        }
        Ok(Err(e)) => return Err(Failure::broken(format!("HTTP error: {e}"))),
        Ok(Ok(answer)) => answer,
    };
    match target.expect {
        Expect::NoContent if status == StatusCode::NO_CONTENT => Ok(0),
        Expect::RelayAccepted if status == StatusCode::OK => {
            match serde_json::from_slice::<Answer>(&body) {
                Ok(a) if a.accepted == events => Ok(a.accepted),
                Ok(a) => Err(Failure {
                    kind: format!(
                        "200 but accepted {} of {events} (duplicate {}, rejected {})",
                        a.accepted, a.duplicate, a.rejected
                    ),
                    reconnect: false,
                    accepted: a.accepted,
                }),
                Err(e) => Err(Failure {
                    kind: format!("200 with an unreadable answer: {e}"),
                    reconnect: false,
                    accepted: 0,
                }),
            }
        }
        _ => {
            let code = serde_json::from_slice::<ErrorAnswer>(&body)
                .map(|e| format!(" {}", e.error))
                .unwrap_or_default();
            Err(Failure {
                kind: format!("HTTP {}{code}", status.as_u16()),
                reconnect: false,
                accepted: 0,
            })
        }
    }
}

/// Opens `n` connections at once.
async fn connect_all(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Conn>> {
    let mut pending = Vec::with_capacity(n);
    for _ in 0..n {
        pending.push(tokio::spawn(connect(addr)));
    }
    let mut conns = Vec::with_capacity(n);
    for p in pending {
        conns.push(
            p.await
                .context("connect task")?
                .with_context(|| format!("cannot connect to {addr}"))?,
        );
    }
    Ok(conns)
}

/// Closed loop: every connection sends its next batch as soon as the last one is answered,
/// until `load.duration` has passed. Measures the most the server sustains.
pub async fn closed_loop(target: &Target, load: Load) -> anyhow::Result<PhaseResult> {
    let target = Arc::new(target.clone());
    let conns = connect_all(target.addr, load.connections).await?;
    let start = Instant::now();
    let deadline = start + load.duration;
    let mut tasks = Vec::with_capacity(conns.len());
    for (c, conn) in conns.into_iter().enumerate() {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = PhaseResult::empty();
            let mut writer = BatchWriter::new(load.device_base + c, load.events_per_batch);
            let events = load.events_per_batch as u64;
            let mut conn = Some(conn);
            while Instant::now() < deadline {
                let Some(sender) = conn.as_mut() else {
                    match connect(target.addr).await {
                        Ok(s) => conn = Some(s),
                        Err(e) => {
                            out.error(format!("connect: {e}"));
                            tokio::time::sleep(RECONNECT_PAUSE).await;
                        }
                    }
                    continue;
                };
                let body = writer.next_batch();
                let sent = Instant::now();
                match post_batch(sender, &target, body, events).await {
                    Ok(accepted) => {
                        out.latency.saturating_record(micros(sent.elapsed()));
                        out.requests += 1;
                        out.events += events;
                        out.accepted += accepted;
                    }
                    Err(f) => {
                        out.accepted += f.accepted;
                        out.error(f.kind);
                        if f.reconnect {
                            conn = None;
                        }
                    }
                }
            }
            out
        }));
    }
    join(tasks, start).await
}

/// Open loop: batches scheduled every `1 / requests_per_sec` seconds, handed round-robin to
/// the connections, for `load.duration`. Latency counts from the scheduled send time, so a
/// request held up behind a slow one is charged for the wait (no coordinated omission).
/// tokio's timer has a 1 ms resolution: sends are up to about 1 ms late, and that lag is
/// part of the latency (`send_lag` shows it).
pub async fn open_loop(
    target: &Target,
    load: Load,
    requests_per_sec: f64,
) -> anyhow::Result<PhaseResult> {
    anyhow::ensure!(
        requests_per_sec > 0.0 && requests_per_sec.is_finite(),
        "the request rate must be positive"
    );
    let target = Arc::new(target.clone());
    let conns = connect_all(target.addr, load.connections).await?;
    let interval = Duration::from_secs_f64(1.0 / requests_per_sec);
    // Leave the connections a moment to settle before the first scheduled send.
    let start = Instant::now() + Duration::from_millis(10);
    let deadline = start + load.duration;
    let stride = load.connections as u32;
    let mut tasks = Vec::with_capacity(conns.len());
    for (c, conn) in conns.into_iter().enumerate() {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = PhaseResult::empty();
            let mut writer = BatchWriter::new(load.device_base + c, load.events_per_batch);
            let events = load.events_per_batch as u64;
            let mut conn = Some(conn);
            let mut slot = c as u32;
            loop {
                let scheduled = start + interval * slot;
                if scheduled >= deadline {
                    break;
                }
                slot += stride;
                tokio::time::sleep_until(scheduled).await;
                let body = writer.next_batch();
                if conn.is_none() {
                    match connect(target.addr).await {
                        Ok(s) => conn = Some(s),
                        Err(e) => {
                            out.error(format!("connect: {e}"));
                            continue;
                        }
                    }
                }
                let sender = conn.as_mut().expect("connected above");
                out.send_lag
                    .saturating_record(micros(Instant::now().saturating_duration_since(scheduled)));
                match post_batch(sender, &target, body, events).await {
                    Ok(accepted) => {
                        out.latency.saturating_record(micros(scheduled.elapsed()));
                        out.requests += 1;
                        out.events += events;
                        out.accepted += accepted;
                    }
                    Err(f) => {
                        out.accepted += f.accepted;
                        out.error(f.kind);
                        if f.reconnect {
                            conn = None;
                        }
                    }
                }
            }
            out
        }));
    }
    join(tasks, start).await
}

async fn join(
    tasks: Vec<tokio::task::JoinHandle<PhaseResult>>,
    start: Instant,
) -> anyhow::Result<PhaseResult> {
    let mut total = PhaseResult::empty();
    for t in tasks {
        total.merge(t.await.context("load task panicked")?);
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

/// A plain GET on a fresh connection (readiness, metrics); returns the status and body.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
    let mut conn = connect(addr).await?;
    let req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))?;
    let exchange = async {
        let resp = conn.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, body))
    };
    Ok(tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .with_context(|| format!("GET {path} timed out"))??)
}
