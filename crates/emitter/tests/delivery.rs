//! Delivery against the real relay binary on loopback: events land in the warehouse as
//! server events, a fact emitted again (by the same or another emitter) is stored once, a
//! relay that is down is retried until it is back, 429's Retry-After is honoured, 413 splits,
//! and flush/shutdown wait for the relay's answer.

#[macro_use]
mod relay_binary;
mod common;
#[path = "../../../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use common::{FLUSH, emitter, order_paid, server_rows, start_relay};
use serde_json::Value;
use support::now_ms;
use trueup_emitter::{FlushError, ServerEvent, Stats};
use trueup_protocol::id_for_key;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_land_in_the_warehouse_as_server_events() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = start_relay(tmp.path(), "");
    let em = emitter(&relay, |_| {});
    let ts = now_ms() - 60_000;
    let signup = em
        .emit(
            ServerEvent::new("signup_completed", "user-7", ts)
                .user_id("user-7")
                .anon_id("anon-3")
                .prop("plan", "pro"),
        )
        .unwrap();
    let mut orders = Vec::new();
    for i in 0..3 {
        orders.push(em.emit(order_paid(&format!("order-{i}"), ts + i)).unwrap());
    }
    em.flush(FLUSH).await.unwrap();
    let s = em.stats();
    assert_eq!((s.emitted, s.acked, s.duplicate, s.buffered), (4, 4, 0, 0));
    assert_eq!((s.rejected, s.failed, s.retried), (0, 0, 0));

    assert_eq!(server_rows(&relay), 4);
    let wh = relay.warehouse();
    let (id, name, user, anon, row_ts, props): (String, String, String, String, i64, String) = wh
        .query_row(
            "SELECT id, name, user_id, anon_id, ts, props FROM events WHERE id = ?1",
            [signup.to_string()],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            },
        )
        .unwrap();
    assert_eq!(
        id,
        id_for_key("demo", "signup_completed", "user-7", ts).to_string()
    );
    assert_eq!(
        (name.as_str(), user.as_str(), anon.as_str()),
        ("signup_completed", "user-7", "anon-3")
    );
    assert_eq!(
        row_ts, ts,
        "the event carries the fact's time, not the send time"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&props).unwrap()["plan"],
        "pro"
    );
    for (i, id) in orders.iter().enumerate() {
        let props: String = wh
            .query_row(
                "SELECT props FROM events WHERE id = ?1 AND name = 'order_paid' AND source = 'server'",
                [id.to_string()],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&props).unwrap()["order_id"],
            format!("order-{i}")
        );
    }
    em.shutdown(FLUSH).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_fact_emitted_again_is_stored_once() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = start_relay(tmp.path(), "");
    let ts = now_ms() - 5_000;
    // A checkout handler that ran twice (the browser retried) in one process...
    let first = emitter(&relay, |_| {});
    let a = first.emit(order_paid("order-81f2", ts)).unwrap();
    first.flush(FLUSH).await.unwrap();
    let b = first.emit(order_paid("order-81f2", ts)).unwrap();
    first.flush(FLUSH).await.unwrap();
    // ...and the job replayed by another process after a crash.
    let replay = emitter(&relay, |_| {});
    let c = replay.emit(order_paid("order-81f2", ts)).unwrap();
    replay.flush(FLUSH).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(a, c);

    let s = first.stats();
    assert_eq!((s.acked, s.duplicate), (2, 1));
    let s = replay.stats();
    assert_eq!((s.acked, s.duplicate), (1, 1));
    assert_eq!(server_rows(&relay), 1);
    // Another order, or the same order id at another time, is another fact.
    replay.emit(order_paid("order-81f3", ts)).unwrap();
    replay.flush(FLUSH).await.unwrap();
    assert_eq!(server_rows(&relay), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_down_at_start_is_retried_until_it_is_back_and_nothing_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let mut relay = start_relay(tmp.path(), "");
    relay.kill9();
    let em = emitter(&relay, |c| c.max_batch_events = 10);
    let ts = now_ms();
    for i in 0..50 {
        em.emit(order_paid(&format!("order-{i}"), ts + i)).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let s = em.stats();
    assert_eq!((s.acked, s.buffered, s.failed), (0, 50, 0));
    assert!(s.retried > 0, "retries while the relay is down: {s:?}");
    assert!(
        s.last_error.as_deref().unwrap_or("").contains("connect"),
        "the cause is visible: {s:?}"
    );
    // Still refused while down: flush times out and keeps everything.
    assert!(matches!(
        em.flush(Duration::from_millis(200)).await,
        Err(FlushError::Timeout { pending: 50, .. })
    ));
    assert_eq!(em.stats().buffered, 50);

    tokio::task::block_in_place(|| relay.restart());
    em.flush(FLUSH).await.unwrap();
    let s = em.stats();
    assert_eq!((s.emitted, s.acked, s.buffered, s.failed), (50, 50, 0, 0));
    assert_eq!(server_rows(&relay), 50);
    let distinct = relay.count(&relay.warehouse(), "SELECT count(DISTINCT id) FROM events");
    assert_eq!(distinct, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_sends_at_once_and_returns_only_once_the_relay_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = start_relay(tmp.path(), "");
    let em = emitter(&relay, |c| c.max_batch_delay = Duration::from_secs(60));
    for i in 0..20 {
        em.emit(order_paid(&format!("order-{i}"), now_ms()))
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        relay.metric("trueup_events_received_total"),
        0.0,
        "the batch waits for more events (max_batch_delay)"
    );
    assert_eq!(em.stats().buffered, 20);
    let started = Instant::now();
    em.flush(FLUSH).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    // Nothing in flight any more: everything was answered before flush returned.
    assert_eq!(relay.metric("trueup_events_accepted_total"), 20.0);
    assert_eq!(
        em.stats(),
        Stats {
            emitted: 20,
            acked: 20,
            ..Stats::default()
        }
    );
    // Shutdown delivers what is buffered too.
    for i in 20..25 {
        em.emit(order_paid(&format!("order-{i}"), now_ms()))
            .unwrap();
    }
    em.shutdown(FLUSH).await.unwrap();
    assert_eq!(em.stats().acked, 25);
    assert_eq!(server_rows(&relay), 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_requests_wait_for_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = start_relay(
        tmp.path(),
        "[rate_limit]\nper_ip_per_sec = 0\nper_site_per_sec = 1\nper_site_burst = 1\n",
    );
    let em = emitter(&relay, |c| {
        c.max_batch_events = 1;
        c.max_batch_delay = Duration::ZERO;
    });
    let started = Instant::now();
    for i in 0..3 {
        em.emit(order_paid(&format!("order-{i}"), now_ms()))
            .unwrap();
    }
    em.flush(FLUSH).await.unwrap();
    let s = em.stats();
    assert_eq!((s.acked, s.failed), (3, 0));
    assert!(s.retried >= 1, "{s:?}");
    assert!(relay.metric("trueup_rate_limited_total") >= 1.0);
    assert!(
        s.last_error.as_deref().unwrap_or("").contains("429"),
        "{s:?}"
    );
    // One request per second gets through; Retry-After: 1 was waited for, not hammered.
    assert!(
        started.elapsed() >= Duration::from_millis(1_500),
        "{:?}",
        started.elapsed()
    );
    assert!(relay.metric("trueup_rate_limited_total") <= 6.0);
    assert_eq!(server_rows(&relay), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_too_large_for_the_relay_is_split() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = start_relay(tmp.path(), "[limits]\nmax_body_bytes = 8192\n");
    let em = emitter(&relay, |c| c.max_batch_delay = Duration::from_secs(60));
    for i in 0..20 {
        em.emit(
            ServerEvent::new("export_finished", format!("export-{i}"), now_ms())
                .schema("event/1")
                .user_id("user-7")
                .prop("note", "x".repeat(1_000)),
        )
        .unwrap();
    }
    em.flush(FLUSH).await.unwrap();
    let s = em.stats();
    assert_eq!((s.acked, s.failed), (20, 0));
    assert!(s.retried >= 1, "the split halves are resent: {s:?}");
    assert!(s.last_error.is_none(), "a split is not a failure: {s:?}");
    assert_eq!(server_rows(&relay), 20);
}
