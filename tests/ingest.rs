//! The collection and server endpoints of the real relay binary over HTTP on loopback:
//! per-event answers, the exact status of every kind of bad input (which must change
//! nothing), origins, secrets, rate limits and a full spool.

mod support;

use std::io::Write as _;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::*;

/// POSTs `body` with `headers`; the response.
async fn send(
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut req = client().post(url).body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

async fn post(url: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
    let resp = send(url, &[("content-type", "text/plain;charset=UTF-8")], body).await;
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn statuses(v: &Value) -> Vec<String> {
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| match r["status"].as_str().unwrap() {
            "rejected" => format!("rejected:{}", r["reason"].as_str().unwrap()),
            s => s.to_string(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_event_is_accepted_duplicate_or_rejected_and_stored_once() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(tmp.path(), "");
    let good: Vec<Value> = (1..=3).map(|s| event("dev-a", s)).collect();
    let mut no_id = event("dev-a", 4);
    no_id.as_object_mut().unwrap().remove("id");
    let mut bad_schema = event("dev-a", 5);
    bad_schema["schema"] = json!("nope/1");
    let events = vec![
        good[0].clone(),
        no_id,
        good[1].clone(),
        bad_schema,
        good[2].clone(),
    ];

    let (status, body) = post(&relay.collect_url(), batch(&events)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        statuses(&body),
        [
            "accepted",
            "rejected:missing_id",
            "accepted",
            "rejected:unknown_schema",
            "accepted"
        ]
    );
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(body["results"][0]["id"], good[0]["id"]);

    // The same batch again (a retry): nothing new is stored.
    let (status, body) = post(&relay.collect_url(), batch(&events)).await;
    assert_eq!(status, 200);
    assert_eq!(
        statuses(&body),
        [
            "duplicate",
            "rejected:missing_id",
            "duplicate",
            "rejected:unknown_schema",
            "duplicate"
        ]
    );

    relay.wait_drained();
    let wh = relay.warehouse();
    assert_eq!(relay.count(&wh, "SELECT count(*) FROM events"), 3);
    let (name, source, seq, props): (String, String, i64, String) = wh
        .query_row(
            "SELECT name, source, seq, props FROM events WHERE id = ?1",
            [good[1]["id"].as_str().unwrap()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(
        (name.as_str(), source.as_str(), seq),
        ("button_clicked", "client", 2)
    );
    assert_eq!(
        serde_json::from_str::<Value>(&props).unwrap(),
        good[1]["props"]
    );

    // Rejected events are kept, with their reason and raw body, never dropped silently.
    let spool = relay.spool_db();
    assert_eq!(
        relay.count(&spool, "SELECT count(*) FROM dead_letter WHERE stage = 'ingest' AND reason = 'unknown_schema' AND raw LIKE '%nope/1%'"),
        2
    );
    assert_eq!(relay.metric("trueup_events_rejected_total"), 4.0);
    assert_eq!(relay.metric("trueup_events_duplicate_total"), 3.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_counters_reach_the_warehouse() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(tmp.path(), "");
    let body = json!({
        "v": 1, "site": "demo",
        "counters": {"device_id": "dev-c", "enqueued": 10, "sent": 9, "acked": 6, "retried": 1, "pending": 2,
                     "dropped": {"queue_full": 2}},
        "events": [event("dev-c", 1)]
    });
    let (status, _) = post(&relay.collect_url(), body.to_string()).await;
    assert_eq!(status, 200);
    relay.wait_drained();
    let wh = relay.warehouse();
    let (enq, acked, pending, dropped): (i64, i64, i64, String) = wh
        .query_row("SELECT enqueued, acked, pending, dropped FROM agent_counters WHERE device_id = 'dev-c'", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .unwrap();
    assert_eq!((enq, acked, pending), (10, 6, 2));
    assert_eq!(dropped, r#"{"queue_full":2}"#);
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_its_exact_status_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(tmp.path(), "");
    let url = relay.collect_url();
    let code = |v: &Value| v["error"].as_str().unwrap_or("").to_string();

    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            b"{\"v\":1,\"events\":[".to_vec(),
            400,
            "malformed_batch",
        ),
        ("not an object", b"[1,2,3]".to_vec(), 400, "malformed_batch"),
        (
            "events of the wrong type",
            br#"{"v":1,"site":"demo","events":5}"#.to_vec(),
            400,
            "malformed_batch",
        ),
        (
            "v of the wrong type",
            br#"{"v":"1","site":"demo","events":[]}"#.to_vec(),
            400,
            "malformed_batch",
        ),
        (
            "unknown version",
            br#"{"v":2,"site":"demo","events":[]}"#.to_vec(),
            400,
            "unsupported_version",
        ),
        ("empty body", Vec::new(), 400, "malformed_batch"),
        (
            "invalid UTF-8",
            b"{\"v\":1,\"site\":\"demo\",\"events\":[{\"name\":\"\xff\xfe\"}]}".to_vec(),
            400,
            "malformed_batch",
        ),
        (
            "no site key",
            br#"{"v":1,"events":[]}"#.to_vec(),
            403,
            "unknown_site",
        ),
        (
            "unknown site key",
            br#"{"v":1,"site":"other","events":[]}"#.to_vec(),
            403,
            "unknown_site",
        ),
    ];
    for (what, body, want, want_code) in cases {
        let (status, v) = post(&url, body).await;
        assert_eq!(
            (status.as_u16(), code(&v).as_str()),
            (want, want_code),
            "{what}: {v}"
        );
    }

    // Deep nesting: inside an event it is that event's defect; in the batch's own structure
    // (outside the events) it makes the batch unparseable.
    // (400,000 levels is also over the event size limit, which is checked first.)
    for (depth, reason) in [
        (5_000, "rejected:too_deep"),
        (400_000, "rejected:too_large"),
    ] {
        let body = format!(
            "{{\"v\":1,\"site\":\"demo\",\"events\":[{}{}]}}",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let (status, v) = post(&url, body).await;
        assert_eq!(status, 200, "depth {depth}: {v}");
        assert_eq!(statuses(&v), [reason]);
    }
    let body = format!(
        "{{\"v\":1,\"site\":\"demo\",\"counters\":{}{},\"events\":[]}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let (status, v) = post(&url, body).await;
    assert_eq!(
        (status.as_u16(), code(&v).as_str()),
        (400, "malformed_batch")
    );

    // 10 MB body: refused from Content-Length, before the body is sent at all.
    let (status, body) = raw_post(
        relay.public,
        "/_r/q",
        "Content-Length: 10485760\r\n",
        vec![],
    );
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("body_too_large"), "{body}");
    // 10 MB streamed without Content-Length (chunked): refused by the streamed cap.
    let chunk = {
        let mut c = format!("{:x}\r\n", 64 * 1024).into_bytes();
        c.extend(std::iter::repeat_n(b' ', 64 * 1024));
        c.extend(b"\r\n");
        c
    };
    let (status, body) = raw_post(
        relay.public,
        "/_r/q",
        "Transfer-Encoding: chunked\r\n",
        vec![chunk; 160],
    );
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("body_too_large"), "{body}");

    // A gzip bomb: 64 KiB on the wire, 64 MiB inflated.
    let bomb = gzip(&vec![b'['; 64 * 1024 * 1024]);
    assert!(bomb.len() < 1024 * 1024);
    let (status, v) = post(&format!("{url}?z=gzip"), bomb).await;
    assert_eq!(
        (status.as_u16(), code(&v).as_str()),
        (413, "decompressed_too_large")
    );
    let (status, v) = post(&format!("{url}?z=gzip"), b"not gzip".to_vec()).await;
    assert_eq!((status.as_u16(), code(&v).as_str()), (400, "bad_gzip"));
    let (status, v) = post(&format!("{url}?z=brotli"), b"{}".to_vec()).await;
    assert_eq!((status.as_u16(), code(&v).as_str()), (400, "bad_query"));

    // 100,000 events (tiny ones: the body is under the size limit).
    let many = format!(
        "{{\"v\":1,\"site\":\"demo\",\"events\":[{}]}}",
        vec!["{}"; 100_000].join(",")
    );
    assert!(many.len() < 1024 * 1024);
    let (status, v) = post(&url, many).await;
    assert_eq!(
        (status.as_u16(), code(&v).as_str()),
        (413, "too_many_events")
    );

    // Wrong content type, wrong Origin.
    let resp = send(
        &url,
        &[("content-type", "application/x-www-form-urlencoded")],
        batch(&[event("d", 1)]),
    )
    .await;
    assert_eq!(resp.status(), 415);
    let resp = send(
        &url,
        &[
            ("content-type", "text/plain"),
            ("origin", "https://evil.example"),
        ],
        batch(&[event("d", 1)]),
    )
    .await;
    assert_eq!(resp.status(), 403);
    assert_eq!(code(&resp.json().await.unwrap()), "origin_not_allowed");

    // Server path: no secret, a wrong secret, a client event with the right secret.
    let server_url = relay.url("/_r/s");
    let body = json!({"v": 1, "events": [server_event("order_paid")]}).to_string();
    let resp = send(
        &server_url,
        &[("content-type", "application/json")],
        body.clone(),
    )
    .await;
    assert_eq!(resp.status(), 401);
    let resp = send(
        &server_url,
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer not-the-secret-at-all-000"),
        ],
        body,
    )
    .await;
    assert_eq!(resp.status(), 401);

    // Per-event defects inside a well-formed batch: 200 with a reason each.
    let mut deep = json!(1);
    for _ in 0..20 {
        deep = json!([deep]);
    }
    let mut too_deep = event("d", 1);
    too_deep["props"] = json!({ "deep": deep });
    let mut too_big = event("d", 2);
    too_big["props"] = json!({ "blob": "x".repeat(40_000) });
    let mut wrong_type = event("d", 3);
    wrong_type["seq"] = json!("three");
    let mut far_future = event("d", 4);
    far_future["ts"] = json!(now_ms() + 10 * 86_400_000);
    let wrong_source = server_event("order_paid");
    let (status, v) = post(
        &url,
        batch(&[too_deep, too_big, wrong_type, far_future, wrong_source]),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        statuses(&v),
        [
            "rejected:too_deep",
            "rejected:too_large",
            "rejected:invalid_envelope",
            "rejected:ts_out_of_range",
            "rejected:wrong_source"
        ]
    );

    // Nothing above stored an event, and the relay is still healthy.
    relay.wait_drained();
    assert_eq!(
        relay.count(&relay.warehouse(), "SELECT count(*) FROM events"),
        0
    );
    assert_eq!(http_get(relay.admin, "/healthz").unwrap().0, 200);
    assert_eq!(relay.metric("trueup_events_accepted_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn server_events_need_the_site_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(tmp.path(), "");
    let ev = server_event("order_paid");
    let send = |body: String| {
        client()
            .post(relay.url("/_r/s"))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {SERVER_SECRET}"))
            .body(body)
            .send()
    };
    let resp = send(json!({"v": 1, "events": [ev.clone(), event("d", 1)]}).to_string())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(statuses(&v), ["accepted", "rejected:wrong_source"]);
    // A retried server emit (same idempotency key) is a duplicate.
    let v: Value = send(json!({"v": 1, "events": [ev.clone()]}).to_string())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(statuses(&v), ["duplicate"]);
    // A secret only works for its own site.
    let resp = send(json!({"v": 1, "site": "someone-else", "events": [ev]}).to_string())
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    relay.wait_drained();
    let wh = relay.warehouse();
    assert_eq!(
        relay.count(
            &wh,
            "SELECT count(*) FROM events WHERE source = 'server' AND user_id = 'user-42'"
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn allowed_origins_get_cors_and_same_origin_is_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(tmp.path(), "");
    let url = relay.collect_url();
    let resp = client()
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    let resp = send(
        &url,
        &[
            ("content-type", "text/plain"),
            ("origin", "https://shop.example"),
        ],
        batch(&[event("d", 1)]),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    // Same origin as the relay's own host: allowed (the relay behind the app's domain).
    let resp = send(
        &url,
        &[
            ("content-type", "text/plain"),
            ("origin", &format!("http://{}", relay.public)),
        ],
        batch(&[event("d", 2)]),
    )
    .await;
    assert_eq!(resp.status(), 200);
    // Another origin: no CORS grant.
    let resp = client()
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limits_answer_429_with_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(
        tmp.path(),
        "[rate_limit]\nper_ip_per_sec = 1\nper_ip_burst = 3\nper_site_per_sec = 1\nper_site_burst = 5\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
    );
    let send = |ip: &'static str, seq: u64| {
        client()
            .post(relay.collect_url())
            .header("content-type", "text/plain")
            .header("x-forwarded-for", ip)
            .body(batch(&[event("d", seq)]))
            .send()
    };
    for seq in 0..3 {
        assert_eq!(send("198.51.100.1", seq).await.unwrap().status(), 200);
    }
    let resp = send("198.51.100.1", 3).await.unwrap();
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "retry-after {retry}");
    // Another client IP (behind the trusted proxy) has its own bucket ...
    assert_eq!(send("198.51.100.2", 4).await.unwrap().status(), 200);
    assert_eq!(send("198.51.100.3", 5).await.unwrap().status(), 200);
    // ... but the site's bucket (burst 5) is now empty.
    let resp = send("198.51.100.4", 6).await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["message"]
            .as_str()
            .unwrap(),
        "too many requests for this site; retry later"
    );
    assert!(relay.metric("trueup_rate_limited_total") >= 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_distinct_client_addresses_keeps_the_limiter_bounded_and_limiting() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(
        tmp.path(),
        "[rate_limit]\nper_ip_per_sec = 1\nper_ip_burst = 2\nmax_tracked_clients = 300\nper_site_per_sec = 0\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
    );
    let send = |ip: String, seq: u64| {
        client()
            .post(relay.collect_url())
            .header("content-type", "text/plain")
            .header("x-forwarded-for", ip)
            .body(batch(&[event("d", seq)]))
            .send()
    };
    // 2,000 clients, 16 at a time, each one request: all accepted.
    let ips: Vec<String> = (0..2000u32)
        .map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255))
        .collect();
    for (n, chunk) in ips.chunks(16).enumerate() {
        let mut set = tokio::task::JoinSet::new();
        for (i, ip) in chunk.iter().enumerate() {
            set.spawn(send(ip.clone(), (n * 16 + i) as u64));
        }
        while let Some(a) = set.join_next().await {
            assert_eq!(a.unwrap().unwrap().status(), 200);
        }
    }
    // The gauge is set every second: at most the configured 300 buckets.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(relay.metric("trueup_rate_limit_tracked_clients"), 300.0);
    // And the limit still holds: a client's burst of 2 (refilled meanwhile) is gone after 2.
    let recent = ips[1999].clone();
    assert_eq!(send(recent.clone(), 5000).await.unwrap().status(), 200);
    assert_eq!(send(recent.clone(), 5001).await.unwrap().status(), 200);
    assert_eq!(send(recent, 5002).await.unwrap().status(), 429);
    // Every accepted event is stored once.
    relay.wait_drained();
    assert_eq!(
        relay.count(&relay.warehouse(), "SELECT count(*) FROM events"),
        2002
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_spool_answers_503_fast_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(
        tmp.path(),
        "[spool]\nmax_bytes = 2000\n[forwarder]\ninitial_backoff_ms = 20\nmax_backoff_ms = 100\n",
    );
    // Hold the warehouse's write lock so the forwarder cannot deliver: the spool fills up.
    let wh = relay.warehouse();
    wh.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut accepted = Vec::new();
    let mut got_503 = false;
    for seq in 0..50 {
        let events: Vec<Value> = (0..5).map(|i| event("d", seq * 5 + i)).collect();
        let started = std::time::Instant::now();
        let resp = send(
            &relay.collect_url(),
            &[("content-type", "text/plain")],
            batch(&events),
        )
        .await;
        if resp.status() == 503 {
            assert!(
                started.elapsed() < std::time::Duration::from_millis(500),
                "503 must be fast"
            );
            assert!(
                resp.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    >= 1
            );
            assert_eq!(resp.json::<Value>().await.unwrap()["error"], "spool_full");
            got_503 = true;
            break;
        }
        assert_eq!(resp.status(), 200);
        accepted.extend(events.iter().map(|e| e["id"].as_str().unwrap().to_string()));
    }
    assert!(got_503, "the spool never reported full");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while relay.metric("trueup_sink_retries_total") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the forwarder should be retrying"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Release the sink: the forwarder's retries deliver everything that was acknowledged.
    wh.execute_batch("ROLLBACK").unwrap();
    relay.wait_drained();
    let n = relay.count(&wh, "SELECT count(*) FROM events");
    assert_eq!(n as usize, accepted.len());
    for id in &accepted {
        let c: i64 = wh
            .query_row("SELECT count(*) FROM events WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(c, 1, "{id}");
    }
    // And new batches are taken again.
    let resp = send(
        &relay.collect_url(),
        &[("content-type", "text/plain")],
        batch(&[event("d", 999)]),
    )
    .await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dedupe_window_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut relay = RelayProc::start(tmp.path(), "");
    let events = [event("d", 1), event("d", 2)];
    let (_, v) = post(&relay.collect_url(), batch(&events)).await;
    assert_eq!(statuses(&v), ["accepted", "accepted"]);
    relay.wait_drained();
    tokio::task::spawn_blocking(move || {
        relay.terminate();
        relay.restart();
        relay
    })
    .await
    .map(|relay| async move {
        let (_, v) = post(&relay.collect_url(), batch(&events)).await;
        assert_eq!(statuses(&v), ["duplicate", "duplicate"]);
        relay.wait_drained();
        assert_eq!(
            relay.count(&relay.warehouse(), "SELECT count(*) FROM events"),
            2
        );
    })
    .unwrap()
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fault_injection_refuses_or_loses_answers_but_never_data() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(tmp.path(), "[faults]\nseed = 7\nfail_ratio = 1.0\n");
    let (status, v) = post(&relay.collect_url(), batch(&[event("d", 1)])).await;
    assert_eq!(
        (status.as_u16(), v["error"].as_str()),
        (503, Some("fault_injected"))
    );
    drop(relay);

    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(tmp.path(), "[faults]\nseed = 7\nack_lost_ratio = 1.0\n");
    assert!(relay.log_text().contains("FAULT INJECTION IS ON"));
    let events = [event("d", 1), event("d", 2)];
    // The answer is lost: the client sees a broken response ...
    let sent = client()
        .post(relay.collect_url())
        .header("content-type", "text/plain")
        .body(batch(&events))
        .send()
        .await;
    let lost = match sent {
        Err(_) => true,
        Ok(resp) => resp.bytes().await.is_err(),
    };
    assert!(lost, "the answer must not be readable");
    // ... but the batch was stored: a retry is answered duplicate, and it is stored once.
    let resp = client()
        .post(relay.collect_url())
        .header("content-type", "text/plain")
        .body(batch(&events))
        .send()
        .await;
    if let Ok(resp) = resp
        && let Ok(body) = resp.bytes().await
    {
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(statuses(&v), ["duplicate", "duplicate"]);
    }
    relay.wait_drained();
    assert_eq!(
        relay.count(&relay.warehouse(), "SELECT count(*) FROM events"),
        2
    );
    assert_eq!(relay.metric("trueup_events_duplicate_total"), 2.0);
}
