//! The shop against the real relay, both real binaries on loopback: signup keeps the
//! attribution with the user and emits one `signup_completed`; bad input is refused with a
//! reason and stores nothing; a checkout retried with its idempotency key (through injected
//! 503s) creates one order and one `order_paid`; and `/_r/*` carries the browser's requests to
//! the relay with the headers the relay needs.

#[path = "../../emitter/tests/relay_binary/mod.rs"]
#[macro_use]
mod relay_binary;
mod common;
#[path = "../../../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use common::{Demo, client, start_relay, wait_count};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{batch, event};

const SOON: Duration = Duration::from_secs(20);

async fn post(url: &str, body: Value) -> (StatusCode, Value) {
    let resp = client().post(url).json(&body).send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn ms_of(rfc3339: &str) -> i64 {
    // The relay's warehouse keeps ms; the shop keeps RFC 3339 with ms: compare through SQLite.
    let conn = rusqlite::Connection::open_in_memory().unwrap();
    conn.query_row(
        "SELECT CAST(round((julianday(?1) - 2440587.5) * 86400000) AS INTEGER)",
        [rfc3339],
        |r| r.get(0),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_keeps_the_attribution_with_the_user_and_emits_signup_completed_once() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = start_relay(tmp.path(), None);
    let demo = Demo::start(tmp.path(), &relay, &[]);
    let attribution = json!({
        "first": {"utm_source": "newsletter", "utm_medium": "email", "utm_campaign": "launch",
                  "landing_page": "http://shop.example/?utm_source=newsletter", "ts": 1_764_300_000_000_i64},
        "last": {"gclid": "g-123", "referrer": "https://www.google.com/",
                 "landing_page": "http://shop.example/pricing?gclid=g-123", "ts": 1_764_320_000_000_i64}
    });
    let (status, answer) = post(
        &demo.url("/api/signup"),
        json!({"email": " Ada@Shop.Example ", "plan": "pro", "anon_id": "anon-42", "attribution": attribution}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let user_id = answer["user_id"].as_str().unwrap().to_string();

    type Row = (String, Option<String>, String, Option<String>, i64);
    let (email, anon, created_at, raw, known): Row = demo
        .db()
        .query_row(
            "SELECT email, anon_id, created_at, attribution, attribution_known FROM users WHERE id = ?1",
            [&user_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap();
    assert_eq!(email, "ada@shop.example");
    assert_eq!(anon.as_deref(), Some("anon-42"));
    assert_eq!(
        created_at.len(),
        "2026-11-28T10:00:00.123Z".len(),
        "{created_at}"
    );
    assert!(created_at.ends_with('Z') && created_at.as_bytes()[10] == b'T');
    assert_eq!(
        serde_json::from_str::<Value>(&raw.unwrap()).unwrap(),
        attribution
    );
    assert_eq!(known, 1);
    let columns: Vec<Option<String>> = demo
        .db()
        .query_row(
            "SELECT ft_source, ft_medium, ft_campaign, ft_click_id, ft_referrer, ft_landing,
                    lt_source, lt_medium, lt_campaign, lt_click_id, lt_referrer, lt_landing
             FROM users WHERE id = ?1",
            [&user_id],
            |r| (0..12).map(|i| r.get(i)).collect(),
        )
        .unwrap();
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        columns,
        [
            some("newsletter"),
            some("email"),
            some("launch"),
            None,
            None,
            some("http://shop.example/?utm_source=newsletter"),
            None,
            None,
            None,
            some("g-123"),
            some("https://www.google.com/"),
            some("http://shop.example/pricing?gclid=g-123"),
        ]
    );

    // Exactly one server signup_completed for this user, stamped with the stored time.
    let n = wait_count(
        || relay.warehouse(),
        "SELECT count(*) FROM events WHERE source = 'server' AND name = 'signup_completed' AND user_id = ?1",
        &[&user_id],
        1,
        SOON,
    );
    assert_eq!(n, 1, "{}", demo.log_text());
    let (ts, anon_id, props): (i64, String, String) = relay
        .warehouse()
        .query_row(
            "SELECT ts, anon_id, props FROM events WHERE source = 'server' AND user_id = ?1",
            [&user_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(ts, ms_of(&created_at));
    assert_eq!(anon_id, "anon-42");
    assert_eq!(
        serde_json::from_str::<Value>(&props).unwrap(),
        json!({"plan": "pro"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_without_a_known_touch_is_stored_as_unknown_not_direct() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = start_relay(tmp.path(), None);
    let demo = Demo::start(tmp.path(), &relay, &[]);
    let cases = [
        (
            "none@shop.example",
            json!({"email": "none@shop.example", "plan": "free"}),
            false,
        ),
        (
            "empty@shop.example",
            json!({"email": "empty@shop.example", "plan": "free", "attribution": {}}),
            false,
        ),
        (
            "null@shop.example",
            json!({"email": "null@shop.example", "plan": "free", "attribution": null, "anon_id": null}),
            false,
        ),
        // A touch that names no source (only the landing page) is still unknown; the raw
        // JSON is kept as sent.
        (
            "landing@shop.example",
            json!({"email": "landing@shop.example", "plan": "free",
            "attribution": {"first": {"landing_page": "http://shop.example/"}}}),
            true,
        ),
    ];
    for (email, body, raw_kept) in cases {
        let (status, answer) = post(&demo.url("/api/signup"), body).await;
        assert_eq!(status, StatusCode::CREATED, "{email}: {answer}");
        let (known, raw, set): (i64, Option<String>, i64) = demo
            .db()
            .query_row(
                "SELECT attribution_known, attribution,
                        count(ft_source) + count(ft_medium) + count(ft_campaign) + count(ft_click_id)
                        + count(ft_referrer) + count(ft_landing) + count(lt_source) + count(lt_medium)
                        + count(lt_campaign) + count(lt_click_id) + count(lt_referrer) + count(lt_landing)
                 FROM users WHERE email = ?1",
                [email],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(known, 0, "{email}");
        assert_eq!(set, 0, "{email}: no column says 'direct' or anything else");
        assert_eq!(raw.is_some(), raw_kept, "{email}: {raw:?}");
    }
    let unknown = demo
        .db()
        .query_row("SELECT sum(attribution_known = 0) FROM users", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap();
    assert_eq!(unknown, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_reason_and_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = start_relay(tmp.path(), None);
    let demo = Demo::start(tmp.path(), &relay, &[]);
    let url = demo.url("/api/signup");

    let (status, answer) = post(&url, json!({"email": "ada@shop.example", "plan": "pro"})).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let (status, answer) = post(&url, json!({"email": "ADA@shop.example", "plan": "team"})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(answer["error"], "email_taken");

    let raw = |body: &'static str, content_type: Option<&'static str>| {
        let mut req = client().post(&url).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        async move {
            let resp = req.send().await.unwrap();
            (resp.status(), resp.json::<Value>().await.unwrap())
        }
    };
    let (status, answer) = raw(
        r#"{"email": "x@shop.example", "plan": "#,
        Some("application/json"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["error"], "invalid_json");
    assert!(
        answer["message"].as_str().unwrap().contains("EOF"),
        "{answer}"
    );
    let (status, answer) = raw(r#"{"email": "x@shop.example"}"#, Some("application/json")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        answer["message"].as_str().unwrap().contains("plan"),
        "names the field: {answer}"
    );
    let (status, answer) = raw(r#"{"email": "x@shop.example", "plan": "pro"}"#, None).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(answer["error"], "not_json");
    for (body, code) in [
        (
            json!({"email": "not-an-email", "plan": "pro"}),
            "invalid_email",
        ),
        (
            json!({"email": "x@shop.example", "plan": "pro plus!"}),
            "invalid_plan",
        ),
        (
            json!({"email": "x@shop.example", "plan": "pro", "anon_id": "a b"}),
            "invalid_anon_id",
        ),
        (
            json!({"email": "x@shop.example", "plan": "pro", "attribution": "google"}),
            "invalid_attribution",
        ),
        (
            json!({"email": "x@shop.example", "plan": "pro", "coupon": "X"}),
            "invalid_json",
        ),
    ] {
        let (status, answer) = post(&url, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(answer["error"], code, "{body}: {answer}");
        assert!(!answer["message"].as_str().unwrap().is_empty());
    }

    let users = demo
        .db()
        .query_row("SELECT count(*) FROM users", [], |r| r.get::<_, i64>(0))
        .unwrap();
    assert_eq!(users, 1, "only the first signup is stored");
    // And only it was emitted.
    let n = wait_count(
        || relay.warehouse(),
        "SELECT count(*) FROM events WHERE source = 'server'",
        &[],
        1,
        SOON,
    );
    assert_eq!(n, 1);
    std::thread::sleep(Duration::from_millis(500));
    relay.wait_drained();
    assert_eq!(
        relay.count(&relay.warehouse(), "SELECT count(*) FROM events"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_retried_with_its_key_creates_one_order_and_one_order_paid() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = start_relay(tmp.path(), None);
    let demo = Demo::start(
        tmp.path(),
        &relay,
        &["--flaky-checkout", "0.5", "--seed", "7"],
    );
    let (_, answer) = post(
        &demo.url("/api/signup"),
        json!({"email": "buyer@shop.example", "plan": "pro", "anon_id": "anon-7"}),
    )
    .await;
    let user_id = answer["user_id"].as_str().unwrap().to_string();

    // Like checkout.html: one key per checkout, retried until the shop answers.
    let mut injected = 0;
    let mut replays = 0;
    let mut orders = Vec::new();
    for n in 0..6 {
        let key = format!("checkout-{n}-{}", uuid::Uuid::now_v7());
        let order = json!({"user_id": user_id, "idempotency_key": key, "amount_cents": 4950, "currency": "EUR"});
        let mut attempts = 0;
        let answer = loop {
            attempts += 1;
            assert!(attempts < 50, "checkout {n} never succeeded");
            let (status, answer) = post(&demo.url("/api/checkout"), order.clone()).await;
            match status {
                StatusCode::SERVICE_UNAVAILABLE => {
                    assert_eq!(answer["error"], "flaky_checkout");
                    injected += 1;
                }
                StatusCode::CREATED => break answer,
                StatusCode::OK => {
                    assert_eq!(answer["created"], false, "a 200 is the order found again");
                    replays += 1;
                    break answer;
                }
                other => panic!("checkout answered {other}: {answer}"),
            }
        };
        orders.push((key, answer["order_id"].as_str().unwrap().to_string()));
    }
    assert!(
        injected > 0 && replays > 0,
        "the seed must exercise retries ({injected} injected, {replays} replays)"
    );

    let db = demo.db();
    let rows: i64 = db
        .query_row("SELECT count(*) FROM orders", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 6, "one order per checkout, however many attempts");
    for (key, order_id) in &orders {
        let (id, amount, currency): (String, i64, String) = db
            .query_row(
                "SELECT id, amount_cents, currency FROM orders WHERE idempotency_key = ?1",
                [key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((&id, amount, currency.as_str()), (order_id, 4950, "EUR"));
    }

    // One order_paid per order in the warehouse, although every attempt emitted it.
    let n = wait_count(
        || relay.warehouse(),
        "SELECT count(*) FROM events WHERE source = 'server' AND name = 'order_paid'",
        &[],
        6,
        SOON,
    );
    assert_eq!(n, 6, "{}", demo.log_text());
    let wh = relay.warehouse();
    for (_, order_id) in &orders {
        let (count, props, ts): (i64, String, i64) = wh
            .query_row(
                "SELECT count(*), max(props), max(ts) FROM events
                 WHERE source = 'server' AND name = 'order_paid' AND json_extract(props, '$.order_id') = ?1",
                [order_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(count, 1);
        let props: Value = serde_json::from_str(&props).unwrap();
        assert_eq!(
            props,
            json!({"order_id": order_id, "amount": 49.5, "currency": "EUR"})
        );
        let created_at: String = db
            .query_row(
                "SELECT created_at FROM orders WHERE id = ?1",
                [order_id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(ts, ms_of(&created_at));
    }
    relay.wait_drained();
    assert!(
        relay.metric("trueup_events_duplicate_total") >= replays as f64,
        "every replay emitted again and the relay removed the copy"
    );

    // The same key for a different order is a conflict; an unknown buyer is a 404.
    let (status, answer) = post(
        &demo.url("/api/checkout"),
        json!({"user_id": user_id, "idempotency_key": orders[0].0, "amount_cents": 1, "currency": "EUR"}),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_key_reused"))
    );
    let (status, answer) = post(
        &demo.url("/api/checkout"),
        json!({"user_id": "nobody", "idempotency_key": "checkout-nobody", "amount_cents": 100, "currency": "EUR"}),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_user"))
    );
    let (status, answer) = post(
        &demo.url("/api/checkout"),
        json!({"user_id": user_id, "idempotency_key": "checkout-cents", "amount_cents": 12.5, "currency": "EUR"}),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json"))
    );
    let rows: i64 = db
        .query_row("SELECT count(*) FROM orders", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_carries_the_browsers_requests_to_the_relay() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("assets")).unwrap();
    std::fs::write(tmp.path().join("assets/loader.js"), "/* the agent */").unwrap();
    let mut relay = start_relay(tmp.path(), None);
    let demo = Demo::start(tmp.path(), &relay, &[]);
    let origin = format!("http://{}", demo.addr);

    // A client batch from a page of the shop's own origin (the relay knows only
    // https://shop.example: same-origin is recognised through X-Forwarded-Host).
    let events = [event("dev-1", 1), event("dev-1", 2)];
    let resp = client()
        .post(demo.url("/_r/q"))
        .header("content-type", "text/plain")
        .header("origin", &origin)
        .body(batch(&events))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["accepted"], 2, "{answer}");
    let n = wait_count(
        || relay.warehouse(),
        "SELECT count(*) FROM events WHERE source = 'client' AND device_id = 'dev-1'",
        &[],
        2,
        SOON,
    );
    assert_eq!(n, 2);

    // The relay's refusals come back as they are.
    let resp = client()
        .post(demo.url("/_r/q"))
        .header("content-type", "text/plain")
        .header("origin", "https://evil.example")
        .body(batch(&[event("dev-1", 3)]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "origin_not_allowed"
    );

    // GETs of the agent's files, with the relay's headers.
    let resp = client()
        .get(demo.url("/_r/a/loader.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("javascript")
    );
    assert!(resp.headers().contains_key("cache-control"));
    assert_eq!(resp.text().await.unwrap(), "/* the agent */");
    let resp = client()
        .get(demo.url("/_r/a/missing.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // The shop's own pages are served next to it.
    let resp = client().get(demo.url("/signup.html")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.text().await.unwrap().contains("trueup.attribution()"));

    // A relay that is down is a 502 the agent retries, not a hang or a crash.
    relay.kill9();
    let resp = client()
        .post(demo.url("/_r/q"))
        .header("content-type", "text/plain")
        .header("origin", &origin)
        .body(batch(&[event("dev-1", 3)]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "relay_unreachable"
    );
    assert_eq!(
        client()
            .get(demo.url("/api/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_sees_each_browsers_address_through_the_proxy() {
    let tmp = tempfile::tempdir().unwrap();
    // One request per client IP, no burst: the relay must tell the browsers apart.
    let relay = start_relay(
        tmp.path(),
        Some("per_ip_per_sec = 1\nper_ip_burst = 1\nper_site_per_sec = 0\n"),
    );
    let demo = Demo::start(tmp.path(), &relay, &[]);
    let origin = format!("http://{}", demo.addr);
    // The test's own requests come from loopback, a trusted proxy too, so the address it
    // names in X-Forwarded-For stands for the browser; the shop appends its peer after it.
    let send = |ip: &'static str, seq: u64| {
        client()
            .post(demo.url("/_r/q"))
            .header("content-type", "text/plain")
            .header("origin", &origin)
            .header("x-forwarded-for", ip)
            .body(batch(&[event(&format!("dev-{ip}"), seq)]))
            .send()
    };
    assert_eq!(
        send("203.0.113.7", 1).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        send("203.0.113.8", 1).await.unwrap().status(),
        StatusCode::OK
    );
    let limited = send("203.0.113.7", 2).await.unwrap();
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(limited.headers().contains_key("retry-after"));
}

/// A fact whose emit was lost (the shop died between its commit and the relay's answer) is
/// emitted again when the shop starts; facts already delivered are not stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn facts_whose_emit_was_lost_are_emitted_again_at_start_and_stored_once() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = start_relay(tmp.path(), None);
    let mut demo = Demo::start(tmp.path(), &relay, &[]);
    let (status, answer) = post(
        &demo.url("/api/signup"),
        json!({"email": "emitted@shop.example", "plan": "pro"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let server_signups =
        "SELECT count(*) FROM events WHERE source = 'server' AND name = 'signup_completed'";
    assert_eq!(
        wait_count(|| relay.warehouse(), server_signups, &[], 1, SOON),
        1
    );
    demo.signal_and_wait(libc::SIGTERM, SOON);

    // A user the shop committed but never emitted (written while it was down).
    demo.db()
        .execute(
            "INSERT INTO users (id, email, plan, created_at, attribution_known)
             VALUES ('01a22014-0000-7000-8000-000000000001', 'lost@shop.example', 'team',
                     strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), 0)",
            [],
        )
        .unwrap();
    let demo = Demo::start(tmp.path(), &relay, &[]);
    assert_eq!(
        wait_count(|| relay.warehouse(), server_signups, &[], 2, SOON),
        2,
        "{}",
        demo.log_text()
    );
    let plan: String = relay
        .warehouse()
        .query_row(
            "SELECT props->>'plan' FROM events WHERE user_id = '01a22014-0000-7000-8000-000000000001'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(plan, "team");
    // The already delivered signup was re-emitted too, and answered duplicate.
    std::thread::sleep(Duration::from_millis(500));
    let n: i64 = relay
        .warehouse()
        .query_row(server_signups, [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
    assert!(relay.metric("trueup_events_duplicate_total") >= 1.0);
}
