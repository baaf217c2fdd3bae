//! Slow and greedy clients against the real relay binary: a slowloris dribbling headers on
//! many connections, bodies sent a few bytes at a time, more connections than the cap, and
//! more body bytes in flight than the budget. Normal clients must still be answered within
//! their own timeout, and every slow connection must be closed by its deadline.

mod support;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

/// Reads until the relay closes the connection (or `within` passes); returns what it sent
/// and whether it closed in time.
async fn until_closed(stream: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

/// A slowloris: a request line, then a header line every 300 ms, never the blank line.
async fn slowloris(relay: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(relay).await.unwrap();
    s.write_all(b"POST /_r/q HTTP/1.1\r\nHost: shop.example\r\n")
        .await
        .unwrap();
    s
}

/// One normal batch with a client timeout of `timeout`; its status and latency.
async fn normal(relay: &RelayProc, seq: u64, timeout: Duration) -> (u16, Duration) {
    let started = Instant::now();
    let resp = client()
        .post(relay.collect_url())
        .timeout(timeout)
        .header("content-type", "text/plain")
        .body(batch(&[event("normal", seq)]))
        .send()
        .await
        .unwrap_or_else(|e| panic!("normal client {seq}: {e}"));
    (resp.status().as_u16(), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_headers_and_bodies_do_not_stop_normal_clients_and_are_cut_at_their_deadlines() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(
        tmp.path(),
        "request_timeout_secs = 3\n[limits]\nmax_connections = 400\nheader_read_timeout_secs = 2\n",
    );
    let started = Instant::now();
    // 200 slowloris connections, each adding a header line every 300 ms.
    let mut lorises = Vec::new();
    for _ in 0..200 {
        lorises.push(slowloris(relay.public).await);
    }
    let dribble = tokio::spawn(async move {
        let mut closed_at = vec![None; lorises.len()];
        while closed_at.iter().any(Option::is_none) && started.elapsed() < Duration::from_secs(8) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            for (i, s) in lorises.iter_mut().enumerate() {
                if closed_at[i].is_none() && s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                    closed_at[i] = Some(started.elapsed());
                }
                if closed_at[i].is_none() {
                    // A closed socket also shows as a readable EOF.
                    let mut b = [0u8; 64];
                    if let Ok(Ok(0)) =
                        tokio::time::timeout(Duration::from_millis(1), s.read(&mut b)).await
                    {
                        closed_at[i] = Some(started.elapsed());
                    }
                }
            }
        }
        closed_at
    });
    // 20 bodies a few bytes at a time: Content-Length 2000, 10 bytes every 300 ms.
    let mut slow_bodies = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(relay.public).await.unwrap();
        s.write_all(
            b"POST /_r/q HTTP/1.1\r\nHost: shop.example\r\nContent-Type: text/plain\r\nContent-Length: 2000\r\n\r\n",
        )
        .await
        .unwrap();
        slow_bodies.push(s);
    }
    let trickle = tokio::spawn(async move {
        let mut answers = Vec::new();
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            for s in &mut slow_bodies {
                let _ = s.write_all(b"          ").await;
            }
        }
        for mut s in slow_bodies {
            answers.push(until_closed(&mut s, Duration::from_secs(5)).await);
        }
        answers
    });

    // Meanwhile, 100 normal clients, 10 at a time, each with a 2 s timeout: all answered.
    let mut slowest = Duration::ZERO;
    for round in 0..10u64 {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..10 {
            let relay_url = relay.collect_url();
            let seq = round * 10 + i;
            set.spawn(async move {
                let started = Instant::now();
                let resp = client()
                    .post(relay_url)
                    .timeout(Duration::from_secs(2))
                    .header("content-type", "text/plain")
                    .body(batch(&[event("normal", seq)]))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("normal client {seq}: {e}"));
                (resp.status().as_u16(), started.elapsed())
            });
        }
        while let Some(r) = set.join_next().await {
            let (status, took) = r.unwrap();
            assert_eq!(status, 200);
            slowest = slowest.max(took);
        }
    }
    eprintln!("slowest normal answer under the slow clients: {slowest:?}");

    // Every slowloris connection was closed by the 2 s header deadline (with slack for the
    // 300 ms dribble and a loaded machine), none later than 5 s.
    let closed_at = dribble.await.unwrap();
    let latest = closed_at
        .iter()
        .map(|c| c.expect("every slowloris connection is closed"))
        .max()
        .unwrap();
    assert!(
        latest < Duration::from_secs(5),
        "last slowloris closed at {latest:?}"
    );
    // Every slow body was answered 408 at the request deadline (3 s) and closed.
    for (text, closed) in trickle.await.unwrap() {
        assert!(closed, "a slow body's connection stayed open");
        assert!(
            text.starts_with("HTTP/1.1 408"),
            "slow body answered: {text:?}"
        );
    }
    // What the normal clients sent is stored, once.
    relay.wait_drained();
    assert_eq!(
        relay.count(&relay.warehouse(), "SELECT count(*) FROM events"),
        100
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_cap_are_closed_at_once_and_idle_ones_free_their_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(
        tmp.path(),
        "[limits]\nmax_connections = 20\nheader_read_timeout_secs = 2\n",
    );
    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(relay.public).await.unwrap());
    }
    // Give the relay time to accept all 20 before the 21st.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(relay.public).await.unwrap();
    let (_, closed) = until_closed(&mut extra, Duration::from_millis(500)).await;
    assert!(closed, "a connection beyond the cap is closed at once");
    assert!(relay.metric("trueup_connections_refused_total") >= 1.0);
    // The silent ones are closed by the header deadline; then normal clients get in.
    for s in &mut idle {
        let (_, closed) = until_closed(s, Duration::from_secs(4)).await;
        assert!(
            closed,
            "a silent connection stays open past the header deadline"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let (status, _) = normal(&relay, 1, Duration::from_secs(2)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_beyond_the_in_flight_budget_get_503_at_once_and_the_budget_comes_back() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(
        tmp.path(),
        "request_timeout_secs = 2\n[limits]\nmax_body_bytes = 16384\nmax_decompressed_bytes = 65536\nmax_inflight_body_bytes = 32768\n",
    );
    // Two slow senders each declare 16,000 bytes and send none: the 32 KiB budget is taken.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(relay.public).await.unwrap();
        s.write_all(
            b"POST /_r/q HTTP/1.1\r\nHost: shop.example\r\nContent-Type: text/plain\r\nContent-Length: 16000\r\n\r\n",
        )
        .await
        .unwrap();
        holders.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let resp = client()
        .post(relay.collect_url())
        .header("content-type", "text/plain")
        .body(batch(&[event("normal", 1)]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503, "no room for another body");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "answered at once"
    );
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "busy");
    assert!(relay.metric("trueup_body_budget_exhausted_total") >= 1.0);
    // The holders hit the 2 s request deadline (408); their room comes back.
    for s in &mut holders {
        let (text, closed) = until_closed(s, Duration::from_secs(4)).await;
        assert!(closed && text.starts_with("HTTP/1.1 408"), "{text:?}");
    }
    let (status, _) = normal(&relay, 2, Duration::from_secs(2)).await;
    assert_eq!(status, 200);
    relay.wait_drained();
    assert_eq!(
        relay.count(&relay.warehouse(), "SELECT count(*) FROM events"),
        1,
        "the refused batch stored nothing; the retry stored once"
    );
}
