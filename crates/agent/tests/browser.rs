//! The queue in a real browser (headless Chromium via wasm-bindgen-test): byte cap and
//! eviction, expiry by age, settling, and the counter identity
//! `enqueued = acked + dropped + pending` after every step — for the IndexedDB queue and for
//! the memory queue used when IndexedDB is unavailable.
//!
//! Run: `CHROMEDRIVER=/usr/bin/chromedriver cargo test -p trueup-agent --target wasm32-unknown-unknown`
#![cfg(target_arch = "wasm32")]

use std::cell::RefCell;

use js_sys::JsString;
use trueup_agent::queue::{Entry, Mem, Queue, Settle, open_idb};
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

fn entry(i: u32, ts: f64, bytes: f64) -> Entry {
    let id = String::from("0190000000-")
        + &char::from_digit(i / 10, 10).unwrap().to_string()
        + &char::from_digit(i % 10, 10).unwrap().to_string();
    Entry {
        id: JsString::from(id.as_str()),
        json: JsString::from("{\"x\":1}"),
        bytes,
        ts,
    }
}

async fn queues(name: &str) -> Vec<Queue> {
    let db = open_idb(name).await.expect("IndexedDB opens in Chromium");
    vec![Queue::Idb(db), Queue::Mem(RefCell::new(Mem::default()))]
}

async fn identity(q: &Queue) {
    let c = q.counters().await;
    assert!(
        c.identity_holds(),
        "enqueued {} != acked {} + dropped {:?} + pending {}",
        c.enqueued,
        c.acked,
        c.dropped,
        c.pending
    );
}

#[wasm_bindgen_test]
async fn byte_cap_evicts_the_oldest_and_counts_it() {
    for q in queues("t-cap").await {
        let batch: Vec<Entry> = (0..10)
            .map(|i| entry(i, 1000.0 + f64::from(i), 100.0))
            .collect();
        q.enqueue(&batch[..6], 550.0).await.unwrap();
        q.enqueue(&batch[6..], 550.0).await.unwrap();
        // IndexedDB: the writes only write; the sending tab's maintenance enforces the cap.
        q.maintain(550.0).await.unwrap();
        let c = q.counters().await;
        assert_eq!((c.enqueued, c.pending), (10, 5));
        assert_eq!(c.dropped("queue_full"), Some(5));
        identity(&q).await;
        let left = q.peek(1e9, 100, 2000.0, 1e9).await.unwrap();
        let ids: Vec<String> = left.iter().map(|e| String::from(&e.id)).collect();
        let want: Vec<String> = batch[5..].iter().map(|e| String::from(&e.id)).collect();
        assert_eq!(ids, want, "the newest stay, in order");
    }
}

#[wasm_bindgen_test]
async fn old_events_expire_and_are_counted() {
    for q in queues("t-expiry").await {
        let batch = [
            entry(1, 100.0, 10.0),
            entry(2, 200.0, 10.0),
            entry(3, 5_000.0, 10.0),
        ];
        q.enqueue(&batch, 1e9).await.unwrap();
        let out = q.peek(1e9, 100, 6_000.0, 3_000.0).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(String::from(&out[0].id), String::from(&batch[2].id));
        let c = q.counters().await;
        assert_eq!(c.dropped("expired"), Some(2));
        assert_eq!(c.pending, 1);
        identity(&q).await;
    }
}

#[wasm_bindgen_test]
async fn peek_respects_bytes_and_count_but_returns_at_least_one() {
    for q in queues("t-peek").await {
        let batch: Vec<Entry> = (0..5).map(|i| entry(i, 1000.0, 400.0)).collect();
        q.enqueue(&batch, 1e9).await.unwrap();
        assert_eq!(q.peek(1000.0, 100, 1000.0, 1e9).await.unwrap().len(), 2);
        assert_eq!(q.peek(1e9, 3, 1000.0, 1e9).await.unwrap().len(), 3);
        assert_eq!(
            q.peek(10.0, 100, 1000.0, 1e9).await.unwrap().len(),
            1,
            "an oversized event still goes alone"
        );
    }
}

#[wasm_bindgen_test]
async fn settling_counts_once_and_keeps_the_identity() {
    for q in queues("t-settle").await {
        let batch: Vec<Entry> = (0..4).map(|i| entry(i, 1000.0, 10.0)).collect();
        q.enqueue(&batch, 1e9).await.unwrap();
        let outcomes = vec![
            (batch[0].id.clone(), Settle::Acked),
            (batch[1].id.clone(), Settle::Dropped("rejected")),
        ];
        q.settle(&outcomes, 4, 0).await.unwrap();
        // The same answer again (a second sender, a replayed response): nothing moves.
        q.settle(&outcomes, 0, 0).await.unwrap();
        let c = q.counters().await;
        assert_eq!((c.enqueued, c.acked, c.pending, c.sent), (4, 1, 2, 4));
        assert_eq!(c.dropped("rejected"), Some(1));
        identity(&q).await;
        q.clear("consent").await.unwrap();
        let c = q.counters().await;
        assert_eq!((c.pending, c.dropped("consent")), (0, Some(2)));
        identity(&q).await;
        q.drop_uncounted("too_large", 3).await.unwrap();
        identity(&q).await;
    }
}

#[wasm_bindgen_test]
async fn counters_include_deltas_not_yet_folded() {
    let q = Queue::Idb(open_idb("t-deltas").await.unwrap());
    q.enqueue(&[entry(1, 1000.0, 10.0), entry(2, 1000.0, 10.0)], 1e9)
        .await
        .unwrap();
    q.drop_uncounted("too_large", 1).await.unwrap();
    // Nothing folded yet: the reader adds the deltas.
    let c = q.counters().await;
    assert_eq!(
        (c.enqueued, c.pending, c.dropped("too_large")),
        (3, 2, Some(1))
    );
    identity(&q).await;
    // Folding changes nothing visible, and is idempotent.
    q.maintain(1e9).await.unwrap();
    q.maintain(1e9).await.unwrap();
    assert_eq!(q.counters().await, c);
}

#[wasm_bindgen_test]
async fn the_idb_queue_is_shared_across_connections() {
    // Two connections stand for two tabs of the same site.
    let a = Queue::Idb(open_idb("t-shared").await.unwrap());
    let b = Queue::Idb(open_idb("t-shared").await.unwrap());
    a.enqueue(&[entry(1, 1000.0, 10.0)], 1e9).await.unwrap();
    b.enqueue(&[entry(2, 1000.0, 10.0)], 1e9).await.unwrap();
    assert_eq!(a.peek(1e9, 100, 1000.0, 1e9).await.unwrap().len(), 2);
    let c = b.counters().await;
    assert_eq!((c.enqueued, c.pending), (2, 2));
}

fn field(v: &wasm_bindgen::JsValue, path: &[&str]) -> Option<String> {
    let mut cur = v.clone();
    for k in path {
        cur = js_sys::Reflect::get(&cur, &(*k).into()).ok()?;
    }
    cur.as_string()
}

#[wasm_bindgen_test]
fn attribution_first_touch_stays_last_touch_moves() {
    use trueup_agent::attribution::{apply, touch_of};
    let page = "https://shop.example/landing?utm_source=news&utm_campaign=spring&gclid=abc";
    let t1 = touch_of(page, "https://www.search.example/", 1.0).expect("a campaign touch");
    assert_eq!(field(&t1, &["utm_source"]).as_deref(), Some("news"));
    assert_eq!(field(&t1, &["gclid"]).as_deref(), Some("abc"));
    assert_eq!(
        field(&t1, &["referrer"]).as_deref(),
        Some("https://www.search.example/")
    );
    assert_eq!(field(&t1, &["landing_page"]).as_deref(), Some(page));
    // Internal navigation and direct visits are not touches.
    assert!(
        touch_of(
            "https://shop.example/cart",
            "https://shop.example/landing",
            2.0
        )
        .is_none()
    );
    assert!(touch_of("https://shop.example/", "", 2.0).is_none());
    let (attr, new) = apply(&wasm_bindgen::JsValue::UNDEFINED, Some(t1));
    assert!(new);
    let t2 = touch_of("https://shop.example/?utm_source=ads&msclkid=m1", "", 3.0).unwrap();
    let (attr, new) = apply(&attr, Some(t2));
    assert!(new);
    assert_eq!(
        field(&attr, &["first", "utm_source"]).as_deref(),
        Some("news")
    );
    assert_eq!(
        field(&attr, &["last", "utm_source"]).as_deref(),
        Some("ads")
    );
    assert_eq!(field(&attr, &["last", "msclkid"]).as_deref(), Some("m1"));
    let (kept, new) = apply(&attr, None);
    assert!(!new);
    assert_eq!(
        field(&kept, &["last", "utm_source"]).as_deref(),
        Some("ads")
    );
}
