//! The public listener's accept loop: HTTP/1.1 connections with bounds that hold against slow
//! or greedy clients (see the README's Security section).
//!
//! - **A cap on connections** (`limits.max_connections`): one beyond it is closed as soon as
//!   it is accepted, so a flood of idle sockets can cost a client retries but never the
//!   relay's memory or file descriptors. Counted in `trueup_connections_refused_total`; the
//!   open ones in `trueup_connections_open`.
//! - **A deadline for the request head** (`limits.header_read_timeout_secs`): a connection
//!   that has not sent a whole request line and headers within it (a slowloris dribbling a
//!   header a byte at a time, or a socket left open and silent between keep-alive requests)
//!   is closed. The body then has the request's own deadline (`request_timeout_secs`, 408),
//!   and the bytes of bodies being read at once are bounded apart (`ingest`).
//!
//! axum's own `serve` sets none of these (hyper's header deadline needs a timer it does not
//! configure), so the relay runs hyper itself; the router and its middleware are the same.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// The bounds of the public listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// How long a connection may take to send a request's line and headers.
    pub header_read_timeout: Duration,
}

/// Serves `router` on `listener` until `stop` is cancelled; then stops accepting, lets
/// requests in flight finish (closing idle keep-alive connections) and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, never spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("trueup_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = router
            .clone()
            .map_request(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(remote));
                req.map(Body::new)
            });
        let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let open = metrics::gauge!("trueup_connections_open");
            open.increment(1.0);
            // Errors here are the client's (reset, header deadline, bad framing); hyper has
            // answered what deserved an answer.
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            open.decrement(1.0);
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
