//! The load generator: keep-alive HTTP/1.1 connections (a bare hyper client, no pool), a
//! closed-loop phase (every connection sends its next batch as soon as the previous one is
//! answered) and an open-loop phase (batches scheduled at fixed intervals, latency measured
//! from the scheduled time so that a slow answer cannot hide the requests it delayed).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::HeaderValue;
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
/// How long an open-loop phase may run past its end to send what was scheduled.
const OVERRUN_LIMIT: Duration = Duration::from_secs(10);
/// The error counted for each scheduled request not sent within [`OVERRUN_LIMIT`].
const OVERRUN: &str = "not sent: the server was more than 10 s behind schedule";
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
    /// The `Host` header: the address.
    pub host: HeaderValue,
}

impl Target {
    /// POSTs to `http://<addr><path>`, answers checked as `expect` says.
    pub fn new(addr: SocketAddr, path: &str, expect: Expect) -> anyhow::Result<Target> {
        Ok(Target {
            addr,
            path: path.parse().context("invalid path")?,
            expect,
            host: HeaderValue::from_str(&addr.to_string()).context("invalid address")?,
        })
    }
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
    /// Connection `c` simulates device `<phase>-<c>`: each phase has its own devices.
    pub phase: usize,
    /// Closed loop only: stop once this many batches have been sent (and `duration` still
    /// bounds the phase). `None`: only `duration`.
    pub max_batches: Option<u64>,
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
    /// Body bytes of the requests answered as expected.
    pub bytes: u64,
    /// Events the relay answered `accepted` for, in any 200 answer (also partial ones).
    pub accepted: u64,
    /// Latency of the requests answered as expected, microseconds.
    pub latency: Histogram<u64>,
    /// Open loop only: how late requests were sent after their scheduled time, microseconds.
    pub send_lag: Histogram<u64>,
    /// Failed requests by kind.
    pub errors: BTreeMap<String, u64>,
    /// CPU time the load generator used during the phase.
    pub client_cpu: Option<Duration>,
    /// CPU time the server under test used during the phase.
    pub server_cpu: Option<Duration>,
}

impl PhaseResult {
    /// Nothing measured.
    pub fn empty() -> PhaseResult {
        PhaseResult {
            elapsed: Duration::ZERO,
            requests: 0,
            events: 0,
            bytes: 0,
            accepted: 0,
            latency: histogram(),
            send_lag: histogram(),
            errors: BTreeMap::new(),
            client_cpu: None,
            server_cpu: None,
        }
    }

    fn merge(&mut self, other: PhaseResult) {
        self.requests += other.requests;
        self.events += other.events;
        self.bytes += other.bytes;
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

    /// Mean size of an event as sent (its share of the batch body), bytes.
    pub fn bytes_per_event(&self) -> f64 {
        if self.events == 0 {
            0.0
        } else {
            self.bytes as f64 / self.events as f64
        }
    }

    /// Mean CPU cores used over the phase.
    fn cores(&self, cpu: Option<Duration>) -> Option<f64> {
        let secs = self.elapsed.as_secs_f64();
        cpu.filter(|_| secs > 0.0).map(|c| c.as_secs_f64() / secs)
    }

    /// Mean CPU cores the load generator used.
    pub fn client_cores(&self) -> Option<f64> {
        self.cores(self.client_cpu)
    }

    /// Mean CPU cores the server under test used.
    pub fn server_cores(&self) -> Option<f64> {
        self.cores(self.server_cpu)
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

/// A keep-alive HTTP/1.1 connection, driven by the task that uses it (no separate task for
/// the connection: one wake-up per exchange instead of several, which matters when the load
/// generator shares two CPUs with the server).
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    driver: Pin<Box<http1::Connection<TokioIo<TcpStream>, Full<Bytes>>>>,
    /// The connection future has completed (closed by either side, or failed).
    closed: bool,
}

impl Conn {
    async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
            .await
            .context("connect timed out")??;
        stream.set_nodelay(true)?;
        let (sender, driver) = http1::handshake(TokioIo::new(stream)).await?;
        Ok(Conn {
            sender,
            driver: Box::pin(driver),
            closed: false,
        })
    }

    /// Sends a request and reads the whole answer, within [`REQUEST_TIMEOUT`].
    async fn exchange(&mut self, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String> {
        let Conn {
            sender,
            driver,
            closed,
        } = self;
        let exchange = async {
            sender.ready().await?;
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        let timeout = tokio::time::sleep(REQUEST_TIMEOUT);
        tokio::pin!(exchange, timeout);
        loop {
            tokio::select! {
                biased;
                done = &mut exchange => return done.map_err(|e| format!("HTTP error: {e}")),
                end = driver.as_mut(), if !*closed => {
                    *closed = true;
                    if let Err(e) = end {
                        return Err(format!("connection failed: {e}"));
                    }
                    // Closed cleanly: the exchange now fails (or has its answer) at once.
                }
                () = &mut timeout => {
                    return Err(format!("timeout after {} s", REQUEST_TIMEOUT.as_secs()));
                }
            }
        }
    }
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
    let req = Request::builder()
        .method(Method::POST)
        .uri(target.path.clone())
        .header(header::HOST, target.host.clone())
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Full::new(body))
        .expect("valid request");
    let (status, body) = conn.exchange(req).await.map_err(Failure::broken)?;
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
        pending.push(tokio::spawn(Conn::open(addr)));
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
    // Batches left to send, shared by the connections (u64::MAX: no cap).
    let budget = Arc::new(AtomicU64::new(load.max_batches.unwrap_or(u64::MAX)));
    let mut tasks = Vec::with_capacity(conns.len());
    for (c, conn) in conns.into_iter().enumerate() {
        let target = target.clone();
        let budget = budget.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = PhaseResult::empty();
            let mut writer =
                BatchWriter::new(&format!("{}-{c}", load.phase), load.events_per_batch);
            let events = load.events_per_batch as u64;
            let mut conn = Some(conn);
            let mut claimed = false;
            while Instant::now() < deadline {
                if !claimed {
                    let take = budget
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
                    if take.is_err() {
                        break;
                    }
                    claimed = true;
                }
                let Some(sender) = conn.as_mut() else {
                    match Conn::open(target.addr).await {
                        Ok(s) => conn = Some(s),
                        Err(e) => {
                            out.error(format!("connect: {e}"));
                            tokio::time::sleep(RECONNECT_PAUSE).await;
                        }
                    }
                    continue;
                };
                let body = writer.next_batch();
                let len = body.len() as u64;
                let sent = Instant::now();
                claimed = false;
                match post_batch(sender, &target, body, events).await {
                    Ok(accepted) => {
                        out.latency.saturating_record(micros(sent.elapsed()));
                        out.requests += 1;
                        out.events += events;
                        out.bytes += len;
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
    let hard_stop = deadline + OVERRUN_LIMIT;
    let mut tasks = Vec::with_capacity(conns.len());
    for (c, conn) in conns.into_iter().enumerate() {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = PhaseResult::empty();
            let mut writer =
                BatchWriter::new(&format!("{}-{c}", load.phase), load.events_per_batch);
            let events = load.events_per_batch as u64;
            let mut conn = Some(conn);
            let mut slot = c as u32;
            loop {
                let scheduled = start + interval * slot;
                if scheduled >= deadline {
                    break;
                }
                if Instant::now() >= hard_stop {
                    // The server fell so far behind that finishing the schedule would take
                    // unbounded time: what is left counts as failed.
                    let left =
                        (deadline - scheduled).as_secs_f64() / (interval * stride).as_secs_f64();
                    *out.errors.entry(OVERRUN.to_string()).or_default() += left.ceil() as u64;
                    break;
                }
                slot += stride;
                tokio::time::sleep_until(scheduled).await;
                let body = writer.next_batch();
                let len = body.len() as u64;
                if conn.is_none() {
                    match Conn::open(target.addr).await {
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
                        out.bytes += len;
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

/// A plain POST on a fresh connection (the receivers' tests); returns the status and body.
#[cfg(test)]
pub async fn post(
    addr: SocketAddr,
    path: &str,
    body: Vec<u8>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let mut conn = Conn::open(addr).await?;
    let req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    conn.exchange(req)
        .await
        .map_err(|e| anyhow::anyhow!("POST {path}: {e}"))
}

/// A plain GET on a fresh connection (readiness, metrics); returns the status and body.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
    let mut conn = Conn::open(addr).await?;
    let req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))?;
    conn.exchange(req)
        .await
        .map_err(|e| anyhow::anyhow!("GET {path}: {e}"))
}
