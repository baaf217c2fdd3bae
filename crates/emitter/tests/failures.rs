//! Failures against the real relay binary on loopback: a wrong secret is a permanent error
//! reported at once, events the relay rejects are counted and reported, a full buffer
//! refuses instead of blocking or growing, and a shutdown with the relay down is bounded and
//! says what it dropped.

#[macro_use]
mod relay_binary;
mod common;
#[path = "../../../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use common::{FLUSH, emitter, order_paid, server_rows, start_relay};
use support::now_ms;
use trueup_emitter::{EmitError, FlushError, ServerEvent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_fails_at_once_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = start_relay(tmp.path(), "");
    let em = emitter(&relay, |c| c.secret = "not-the-secret-at-all-000".into());
    for i in 0..3 {
        em.emit(order_paid(&format!("order-{i}"), now_ms()))
            .unwrap();
    }
    let started = Instant::now();
    let err = em.flush(FLUSH).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a 401 is not retried: {:?}",
        started.elapsed()
    );
    match &err {
        FlushError::Failed {
            failed: 3,
            rejected: 0,
            last_error,
        } => assert!(last_error.contains("401") && last_error.contains("unauthorized")),
        other => panic!("expected 3 failed events, got {other:?}"),
    }
    let s = em.stats();
    assert_eq!((s.emitted, s.acked, s.failed, s.buffered), (3, 0, 3, 0));
    assert_eq!(s.retried, 0);
    assert!(s.last_error.unwrap().contains("server secret"));
    assert_eq!(server_rows(&relay), 0);

    // A secret of another site: 403, also permanent.
    let em = emitter(&relay, |c| c.site = "someone-else".into());
    em.emit(order_paid("order-9", now_ms())).unwrap();
    match em.flush(FLUSH).await {
        Err(FlushError::Failed {
            failed: 1,
            last_error,
            ..
        }) => assert!(last_error.contains("403") && last_error.contains("wrong_site")),
        other => panic!("expected a 403, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_relay_rejects_are_counted_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = start_relay(tmp.path(), "");
    let em = emitter(&relay, |_| {});
    em.emit(order_paid("order-1", now_ms())).unwrap();
    let bad = em
        .emit(
            ServerEvent::new("order_paid", "order-2", now_ms())
                .user_id("user-7")
                .prop("order_id", "order-2")
                .prop("amount", 10),
        )
        .unwrap();
    em.emit(
        ServerEvent::new("order_paid", "order-3", now_ms() - 30 * 86_400_000)
            .user_id("user-7")
            .prop("order_id", "order-3")
            .prop("amount", 10)
            .prop("currency", "EUR"),
    )
    .unwrap();
    match em.flush(FLUSH).await {
        Err(FlushError::Failed {
            failed: 0,
            rejected: 2,
            last_error,
        }) => assert!(last_error.contains("ts_out_of_range"), "{last_error}"),
        other => panic!("expected 2 rejected, got {other:?}"),
    }
    let s = em.stats();
    assert_eq!((s.acked, s.rejected, s.failed, s.buffered), (1, 2, 0, 0));
    assert_eq!(server_rows(&relay), 1);
    // The relay kept the rejected one, with its reason, in the dead-letter store.
    let reason: String = relay
        .spool_db()
        .query_row(
            "SELECT reason FROM dead_letter WHERE event_id = ?1",
            [bad.to_string()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(reason, "missing_prop");
    // A later flush reports only what happened to the events it waited for.
    em.emit(order_paid("order-4", now_ms())).unwrap();
    em.flush(FLUSH).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_refuses_at_once_and_frees_up_once_delivered() {
    let tmp = tempfile::tempdir().unwrap();
    let mut relay = start_relay(tmp.path(), "");
    relay.kill9();
    let em = emitter(&relay, |c| c.buffer_capacity = 5);
    for i in 0..5 {
        em.emit(order_paid(&format!("order-{i}"), now_ms()))
            .unwrap();
    }
    let started = Instant::now();
    assert_eq!(
        em.emit(order_paid("order-5", now_ms())),
        Err(EmitError::BufferFull { capacity: 5 })
    );
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "emit never blocks"
    );
    let s = em.stats();
    assert_eq!((s.emitted, s.refused, s.buffered), (5, 1, 5));

    tokio::task::block_in_place(|| relay.restart());
    em.flush(FLUSH).await.unwrap();
    assert_eq!(em.stats().buffered, 0);
    em.emit(order_paid("order-5", now_ms())).unwrap();
    em.flush(FLUSH).await.unwrap();
    let s = em.stats();
    assert_eq!((s.emitted, s.acked, s.refused), (6, 6, 1));
    assert_eq!(server_rows(&relay), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_the_relay_down_is_bounded_and_says_what_it_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let mut relay = start_relay(tmp.path(), "");
    relay.kill9();
    let em = emitter(&relay, |_| {});
    let clone = em.clone();
    em.emit(order_paid("order-1", now_ms())).unwrap();
    clone.emit(order_paid("order-2", now_ms())).unwrap();
    let started = Instant::now();
    let result = em.shutdown(Duration::from_millis(300)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(result, Err(FlushError::Timeout { pending: 2, .. })),
        "{result:?}"
    );
    let s = clone.stats();
    assert_eq!((s.emitted, s.acked, s.failed, s.buffered), (2, 0, 2, 0));
    assert_eq!(
        clone.emit(order_paid("order-3", now_ms())),
        Err(EmitError::Closed)
    );
    assert_eq!(clone.flush(FLUSH).await, Err(FlushError::Closed));
}
