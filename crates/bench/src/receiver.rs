//! Loopback HTTP receivers standing in for a webhook endpoint, PostHog and Segment: a bare
//! hyper HTTP/1.1 server that reads every request body whole, counts the events in it and
//! answers `200` (or, when holding, `503` with `Retry-After: 3600`, so that the relay's
//! forwarder waits instead of retrying in a loop).
//!
//! Each receiver runs on its own thread with its own single-threaded tokio runtime, so it
//! does not compete with the load generator for its worker thread; its CPU time is read from
//! `/proc/self/task/<tid>/stat` and reported apart. Counting is kept cheap: the body is
//! parsed with serde's `IgnoredAny` for everything except the length of the one array that
//! carries the events (`records` for the webhook, `batch` for PostHog and Segment), which
//! validates the JSON without building it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde::de::IgnoredAny;

/// How a receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `200` after reading the whole body; the events are counted.
    Accept,
    /// `503` with `Retry-After: 3600` after reading the whole body; nothing is counted as
    /// received.
    Hold,
}

/// What a receiver has seen so far.
#[derive(Debug, Default)]
pub struct Counts {
    /// Requests answered `200`.
    pub requests: AtomicU64,
    /// Events in the requests answered `200` (resent ones counted again).
    pub events: AtomicU64,
    /// Body bytes of the requests answered `200`.
    pub bytes: AtomicU64,
    /// Requests answered `503` (holding).
    pub held: AtomicU64,
    /// Bodies that were not JSON with an events array (answered `400`).
    pub unreadable: AtomicU64,
    /// The receiver thread's id, for its CPU time (0 until it runs).
    tid: AtomicI64,
}

/// The part of each upstream's body that is counted: the events array's length.
#[derive(Deserialize)]
struct Body {
    /// Webhook: `{"batch_id", "sent_at", "records": [...]}`.
    records: Option<Vec<IgnoredAny>>,
    /// PostHog `{"api_key", "historical_migration", "batch": [...]}`, Segment `{"batch": [...]}`.
    batch: Option<Vec<IgnoredAny>>,
}

fn count_events(body: &[u8]) -> Option<u64> {
    let b: Body = serde_json::from_slice(body).ok()?;
    b.records.or(b.batch).map(|v| v.len() as u64)
}

/// A running receiver; stopped when dropped.
pub struct Receiver {
    /// Where it listens (127.0.0.1, a port the kernel chose).
    pub addr: SocketAddr,
    /// What it has seen.
    pub counts: Arc<Counts>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// Binds 127.0.0.1 port 0 (the port is read from the bound socket, never chosen and
    /// bound later) and serves on a thread of its own.
    pub fn start(name: &str, mode: Mode) -> anyhow::Result<Receiver> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .context("cannot bind a loopback port for a receiver")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let c = counts.clone();
        let thread = std::thread::Builder::new()
            .name(format!("receiver-{name}"))
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                c.tid
                    .store(i64::from(unsafe { libc::gettid() }), Ordering::Relaxed);
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("receiver: cannot start its runtime: {e}");
                        return;
                    }
                };
                runtime.block_on(serve(listener, mode, c, stop_rx));
            })
            .context("cannot start a receiver thread")?;
        Ok(Receiver {
            addr,
            counts,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The base URL (`http://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Events counted so far.
    pub fn events(&self) -> u64 {
        self.counts.events.load(Ordering::Relaxed)
    }

    /// CPU time its thread has used so far.
    pub fn cpu_time(&self) -> Option<Duration> {
        let tid = self.counts.tid.load(Ordering::Relaxed);
        (tid > 0)
            .then(|| crate::procs::task_cpu_time(std::process::id(), tid as u32))
            .flatten()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    mode: Mode,
    counts: Arc<Counts>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("receiver: {e}");
            return;
        }
    };
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let counts = counts.clone();
        // Connections end with the runtime (when the receiver is dropped).
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, mode, counts.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    mode: Mode,
    counts: Arc<Counts>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let body = req.into_body().collect().await?.to_bytes();
    let respond = |status: StatusCode, retry_after: bool| {
        let mut r = Response::builder().status(status);
        if retry_after {
            r = r.header(hyper::header::RETRY_AFTER, "3600");
        }
        r.body(Full::new(Bytes::from_static(b"{}")))
            .expect("valid response")
    };
    if mode == Mode::Hold {
        counts.held.fetch_add(1, Ordering::Relaxed);
        return Ok(respond(StatusCode::SERVICE_UNAVAILABLE, true));
    }
    match count_events(&body) {
        Some(n) => {
            counts.requests.fetch_add(1, Ordering::Relaxed);
            counts.events.fetch_add(n, Ordering::Relaxed);
            counts.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            Ok(respond(StatusCode::OK, false))
        }
        None => {
            counts.unreadable.fetch_add(1, Ordering::Relaxed);
            Ok(respond(StatusCode::BAD_REQUEST, false))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_events_array_of_each_upstream() {
        let webhook = br#"{"batch_id":"ab","sent_at":"x","records":[{"type":"event","data":{"a":[1,2]}},{"type":"event"}]}"#;
        let posthog =
            br#"{"api_key":"k","historical_migration":false,"batch":[{"uuid":"1"},{},{}]}"#;
        let segment = br#"{"batch":[{"messageId":"1","properties":{"batch":[1]}}]}"#;
        assert_eq!(count_events(webhook), Some(2));
        assert_eq!(count_events(posthog), Some(3));
        assert_eq!(count_events(segment), Some(1));
        assert_eq!(count_events(b"{}"), None);
        assert_eq!(count_events(b"not json"), None);
    }

    #[test]
    fn answers_and_counts_over_loopback() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ok = Receiver::start("test-ok", Mode::Accept).unwrap();
        let hold = Receiver::start("test-hold", Mode::Hold).unwrap();
        rt.block_on(async {
            let body = br#"{"batch":[{},{}]}"#.to_vec();
            let (status, _) = crate::load::post(ok.addr, "/v1/batch", body.clone())
                .await
                .unwrap();
            assert_eq!(status, StatusCode::OK);
            let (status, _) = crate::load::post(hold.addr, "/hook", body).await.unwrap();
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        });
        assert_eq!(ok.events(), 2);
        assert_eq!(ok.counts.requests.load(Ordering::Relaxed), 1);
        assert_eq!(hold.events(), 0);
        assert_eq!(hold.counts.held.load(Ordering::Relaxed), 1);
        assert!(ok.cpu_time().is_some());
    }
}
