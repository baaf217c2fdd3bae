//! The sinks over real HTTP on loopback: the real relay binary forwards to receivers that
//! enforce each upstream's documented limits and answers (tests/support/upstream.rs), under
//! the faults a real upstream has. Every test ends with each event the relay acknowledged
//! held exactly once by id by every sink, in that upstream's shape, and the relay's own
//! figures (`/sinks`, `/metrics`, `dead_letter`) agreeing.

mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;
use upstream::{Fault, Flavor, Upstream};

const FAST_RETRIES: &str = "\n[forwarder]\ninitial_backoff_ms = 50\nmax_backoff_ms = 400\n";

/// Writes `secret` to a file in `dir` and returns the TOML line pointing at it.
fn secret_file(dir: &std::path::Path, name: &str, secret: &str) -> String {
    let path = dir.join(format!("{name}.secret"));
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    format!("secret_file = \"{}\"\n", path.display())
}

/// POSTs `events` in batches of 100; returns the ids the relay answered accepted.
async fn send_all(relay: &RelayProc, events: &[Value]) -> Vec<String> {
    let mut accepted = Vec::new();
    for chunk in events.chunks(100) {
        let resp = client()
            .post(relay.collect_url())
            .header("content-type", "text/plain")
            .body(batch(chunk))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        for (e, r) in chunk.iter().zip(v["results"].as_array().unwrap()) {
            assert_eq!(r["status"], "accepted", "{r}");
            accepted.push(e["id"].as_str().unwrap().to_string());
        }
    }
    accepted
}

/// `/sinks` on the admin address, by name.
fn sink_view(relay: &RelayProc, name: &str) -> Value {
    let (status, body) = http_get(relay.admin, "/sinks").unwrap();
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    v["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no sink {name} in {body}"))
}

/// Waits until sink `name` has no backlog.
async fn wait_caught_up(relay: &RelayProc, name: &str, secs: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let v = sink_view(relay, name);
        if v["backlog_rows"] == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sink {name} still behind after {secs} s: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn iso(ms: i64) -> String {
    format!("{:.3}", jiff::Timestamp::from_millisecond(ms).unwrap())
}

/// The events a test sends: clicks, plus a page view and an identify.
fn page_view(device: &str, seq: u64) -> Value {
    let mut e = event(device, seq);
    e["name"] = "page_view".into();
    e["schema"] = "page_view/1".into();
    e["props"] = json!({});
    e["context"] = json!({"url": "https://shop.example/p/1?utm_source=ads", "referrer": "https://search.example/", "title": "Product 1",
        "attribution": {"last": {"utm_source": "ads", "utm_medium": "cpc", "utm_campaign": "winter"}}});
    e
}

fn identify(device: &str, seq: u64) -> Value {
    let mut e = event(device, seq);
    e["name"] = "identify".into();
    e["schema"] = "identify/1".into();
    e["user_id"] = "user-7".into();
    e["props"] = json!({"traits": {"plan": "pro"}});
    e
}

/// An event every upstream here refuses (its receiver answers 4xx for a batch holding it).
fn poisoned(device: &str, seq: u64) -> Value {
    let mut e = event(device, seq);
    e["props"] = json!({"poison": true});
    e
}

fn dead_letters(relay: &RelayProc, sink: &str) -> Vec<(String, String)> {
    let db = relay.spool_db();
    let mut stmt = db
        .prepare("SELECT reason, event_id FROM dead_letter WHERE sink = ?1 ORDER BY pos")
        .unwrap();
    stmt.query_map([sink], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn assert_exactly(up: &Upstream, want: &HashSet<String>) {
    let got: HashSet<String> = up.seen(|s| s.events.keys().cloned().collect());
    let missing: Vec<_> = want.difference(&got).take(3).collect();
    let extra: Vec<_> = got.difference(want).take(3).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "upstream holds {} events, want {}: missing {missing:?}, extra {extra:?}",
        got.len(),
        want.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posthog_gets_every_event_once_in_its_shape_through_its_faults() {
    let tmp = tempfile::tempdir().unwrap();
    let up = Upstream::start(Flavor::Posthog {
        api_key: "phc_test_key".into(),
    })
    .await;
    // A lower request limit than PostHog's 20 MB, so that the relay's batches meet 413s.
    up.limit_body(40_000);
    up.push_fault(Fault::Status(429, Some(1)));
    for _ in 0..3 {
        up.push_fault(Fault::Status(503, None));
    }
    let config = format!(
        "{FAST_RETRIES}\n[[sinks]]\nname = \"ph\"\nkind = \"posthog\"\nurl = \"{}\"\ntimeout_secs = 1\n{}",
        up.url(),
        secret_file(tmp.path(), "ph", "phc_test_key")
    );
    let mut relay = RelayProc::start(tmp.path(), &config);
    let started = std::time::Instant::now();

    // 1. 300 clicks through a 429 (Retry-After: 1), a burst of 503s and 413 splits.
    let clicks: Vec<Value> = (1..=300).map(|i| event("d1", i)).collect();
    let mut want: HashSet<String> = send_all(&relay, &clicks).await.into_iter().collect();
    up.wait_for(300, 30).await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After honoured"
    );
    assert!(
        up.seen(|s| s.too_large) > 0,
        "a batch met the size limit and was split"
    );
    assert!(up.seen(|s| s.largest_body) <= 40_000);

    // 2. The connection closes after PostHog stored a batch: the retry is a duplicate it sees.
    up.push_fault(Fault::ResetAfterStore);
    let reset: Vec<Value> = (301..=310).map(|i| event("d1", i)).collect();
    let reset_ids = send_all(&relay, &reset).await;
    want.extend(reset_ids.iter().cloned());
    wait_caught_up(&relay, "ph", 30).await;
    let twice = up.seen(|s| reset_ids.iter().filter(|id| s.arrivals[*id] == 2).count());
    assert_eq!(twice, 10, "the batch whose answer was lost arrived twice");

    // 3. An answer slower than the sink's 1 s timeout: retried.
    up.push_fault(Fault::Delay(Duration::from_millis(2_500)));
    let slow: Vec<Value> = (311..=320).map(|i| event("d1", i)).collect();
    want.extend(send_all(&relay, &slow).await);

    // 4. One event PostHog refuses, in a batch with others; a page view and an identify.
    let bad = poisoned("d1", 321);
    let bad_id = bad["id"].as_str().unwrap().to_string();
    let pv = page_view("d1", 322);
    let idf = identify("d1", 323);
    let mixed = vec![
        event("d1", 324),
        bad,
        pv.clone(),
        idf.clone(),
        event("d1", 325),
    ];
    let mut mixed_ids = send_all(&relay, &mixed).await;
    mixed_ids.retain(|id| *id != bad_id);
    want.extend(mixed_ids);
    wait_caught_up(&relay, "ph", 30).await;
    assert_exactly(&up, &want);

    // Field by field, in PostHog's documented shape.
    let click = &clicks[0];
    let got = up.seen(|s| s.events[click["id"].as_str().unwrap()].clone());
    assert_eq!(got["event"], "button_clicked");
    assert_eq!(got["distinct_id"], "anon-1");
    assert_eq!(got["uuid"], click["id"]);
    assert_eq!(got["timestamp"], iso(click["ts"].as_i64().unwrap()));
    let p = &got["properties"];
    assert_eq!(p["button"], "checkout");
    assert_eq!(p["price"], 49.5);
    assert_eq!(p["$session_id"], "sess-1");
    assert_eq!(p["$device_id"], "d1");
    assert_eq!(p["$current_url"], "https://shop.example/cart");
    assert_eq!(p["$pathname"], "/cart");
    assert_eq!(p["$host"], "shop.example");
    assert_eq!(p["title"], "Cart");
    assert_eq!(p["$lib"], "trueup");
    assert_eq!(p["trueup_seq"], 1);
    let got = up.seen(|s| s.events[pv["id"].as_str().unwrap()].clone());
    assert_eq!(got["event"], "$pageview");
    assert_eq!(got["properties"]["$referrer"], "https://search.example/");
    assert_eq!(got["properties"]["utm_source"], "ads");
    assert_eq!(got["properties"]["utm_campaign"], "winter");
    let got = up.seen(|s| s.events[idf["id"].as_str().unwrap()].clone());
    assert_eq!(got["event"], "$identify");
    assert_eq!(got["distinct_id"], "user-7");
    assert_eq!(got["properties"]["$anon_distinct_id"], "anon-1");
    assert_eq!(got["properties"]["$set"], json!({"plan": "pro"}));

    // The relay's figures agree.
    let v = sink_view(&relay, "ph");
    assert_eq!(v["delivered"], want.len() as u64, "{v}");
    assert_eq!(v["dead_lettered"], 1, "{v}");
    assert!(v["retries"].as_u64().unwrap() >= 6, "{v}");
    assert_eq!(
        dead_letters(&relay, "ph"),
        vec![("rejected_400".to_string(), bad_id)]
    );
    assert!(relay.metric("trueup_sink_dead_letters_total") == 1.0);
    relay.wait_drained();
    relay.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_and_rudderstack_get_every_event_once_within_their_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let seg = Upstream::start(Flavor::Segment {
        write_key: "seg-write-key".into(),
    })
    .await;
    let rud = Upstream::start(Flavor::Segment {
        write_key: "rud-write-key".into(),
    })
    .await;
    // RudderStack takes 4 MB batches; this receiver enforces 60 KB, so 413s split there.
    rud.limit_body(60_000);
    seg.push_fault(Fault::Status(429, Some(1)));
    seg.push_fault(Fault::ResetAfterStore);
    rud.push_fault(Fault::Status(502, None));
    let config = format!(
        "{FAST_RETRIES}\n[[sinks]]\nname = \"seg\"\nkind = \"segment\"\nurl = \"{}\"\nbatch_size = 2500\n{}\n[[sinks]]\nname = \"rud\"\nkind = \"rudderstack\"\nurl = \"{}\"\n{}",
        seg.url(),
        secret_file(tmp.path(), "seg", "seg-write-key"),
        rud.url(),
        secret_file(tmp.path(), "rud", "rud-write-key"),
    );
    let mut relay = RelayProc::start(tmp.path(), &config);
    // 3,000 events of ~1 KB as sent: more than one Segment batch by count and by bytes.
    let mut events: Vec<Value> = (1..=3000)
        .map(|i| {
            let mut e = event("d2", i);
            e["props"]["note"] = "x".repeat(600).into();
            e
        })
        .collect();
    let huge = {
        let mut e = event("d2", 3001);
        // Under the relay's own 32 KiB per event, over Segment's 32 KB once in its form.
        e["props"]["note"] = "y".repeat(31_700).into();
        e
    };
    let huge_id = huge["id"].as_str().unwrap().to_string();
    let bad = poisoned("d2", 3002);
    let bad_id = bad["id"].as_str().unwrap().to_string();
    let pv = page_view("d2", 3003);
    let idf = identify("d2", 3004);
    events.extend([huge, bad, pv.clone(), idf.clone()]);
    let mut want: HashSet<String> = send_all(&relay, &events).await.into_iter().collect();
    want.remove(&huge_id);
    want.remove(&bad_id);
    wait_caught_up(&relay, "seg", 60).await;
    wait_caught_up(&relay, "rud", 60).await;
    assert_exactly(&seg, &want);
    assert_exactly(&rud, &want);
    assert!(
        seg.seen(|s| s.largest_body) <= 500_000,
        "Segment's 500 KB per batch"
    );
    assert!(
        rud.seen(|s| s.too_large) > 0,
        "RudderStack's batches split on 413"
    );
    assert!(
        seg.seen(|s| s.arrivals.values().any(|n| *n == 2)),
        "the batch whose answer was lost was sent again"
    );
    for up in [&seg, &rud] {
        assert!(
            !up.seen(|s| s.arrivals.contains_key(&huge_id)),
            "an event over 32 KB is never sent"
        );
    }
    for sink in ["seg", "rud"] {
        let dead = dead_letters(&relay, sink);
        assert_eq!(dead.len(), 2, "{sink}: {dead:?}");
        assert!(
            dead.contains(&("too_large".to_string(), huge_id.clone())),
            "{dead:?}"
        );
        assert!(
            dead.contains(&("rejected_400".to_string(), bad_id.clone())),
            "{dead:?}"
        );
        let v = sink_view(&relay, sink);
        assert_eq!(v["delivered"], want.len() as u64, "{v}");
    }

    // Field by field, in Segment's documented shape.
    let click = &events[0];
    let m = seg.seen(|s| s.events[click["id"].as_str().unwrap()].clone());
    assert_eq!(m["type"], "track");
    assert_eq!(m["event"], "button_clicked");
    assert_eq!(m["messageId"], click["id"]);
    assert_eq!(m["anonymousId"], "anon-1");
    assert_eq!(m["timestamp"], iso(click["ts"].as_i64().unwrap()));
    assert_eq!(m["properties"]["button"], "checkout");
    assert_eq!(m["context"]["page"]["url"], "https://shop.example/cart");
    assert_eq!(m["context"]["page"]["title"], "Cart");
    assert_eq!(m["context"]["library"]["name"], "trueup");
    assert_eq!(m["context"]["trueup"]["session_id"], "sess-1");
    assert_eq!(m["context"]["trueup"]["seq"], 1);
    let m = seg.seen(|s| s.events[pv["id"].as_str().unwrap()].clone());
    assert_eq!(m["type"], "page");
    assert_eq!(m["name"], "Product 1");
    assert_eq!(m["properties"]["path"], "/p/1");
    assert_eq!(m["properties"]["search"], "?utm_source=ads");
    assert_eq!(m["context"]["campaign"]["source"], "ads");
    assert_eq!(m["context"]["campaign"]["name"], "winter");
    let m = seg.seen(|s| s.events[idf["id"].as_str().unwrap()].clone());
    assert_eq!(m["type"], "identify");
    assert_eq!(m["userId"], "user-7");
    assert_eq!(m["anonymousId"], "anon-1");
    assert_eq!(m["traits"], json!({"plan": "pro"}));
    relay.wait_drained();
    relay.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_batches_are_signed_and_a_wrong_key_keeps_events_until_it_is_fixed() {
    let tmp = tempfile::tempdir().unwrap();
    let hook = Upstream::start(Flavor::Webhook {
        secret: "whsec-right".into(),
    })
    .await;
    let config = |secret: &str| {
        format!(
            "{FAST_RETRIES}\n[[sinks]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}/in\"\n{}",
            hook.url(),
            secret_file(tmp.path(), "hook", secret)
        )
    };
    let mut relay = RelayProc::start(tmp.path(), &config("whsec-wrong"));
    let bad = poisoned("d3", 51);
    let bad_id = bad["id"].as_str().unwrap().to_string();
    let mut events: Vec<Value> = (1..=50).map(|i| event("d3", i)).collect();
    events.push(bad);
    let mut want: HashSet<String> = send_all(&relay, &events).await.into_iter().collect();
    want.remove(&bad_id);
    // The receiver refuses the signature (401): nothing is dead-lettered, all of it waits,
    // /sinks says why, and the relay stays ready.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sink_view(&relay, "hook")["retries"].as_u64().unwrap() < 3 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = sink_view(&relay, "hook");
    assert_eq!(v["backlog_rows"], 51, "{v}");
    assert!(
        v["last_error"]
            .as_str()
            .unwrap()
            .contains("check the sink's url and key"),
        "{v}"
    );
    assert!(dead_letters(&relay, "hook").is_empty());
    assert_eq!(http_get(relay.admin, "/readyz").unwrap().0, 200);
    assert!(hook.seen(|s| s.events.is_empty()));

    // The operator fixes the secret and restarts: everything is delivered, signed.
    relay.terminate();
    let text = std::fs::read_to_string(tmp.path().join("relay.toml")).unwrap();
    std::fs::write(
        tmp.path().join("relay.toml"),
        text.replace("hook.secret", "hook-right.secret"),
    )
    .unwrap();
    std::fs::write(tmp.path().join("hook-right.secret"), "whsec-right").unwrap();
    relay.restart();
    wait_caught_up(&relay, "hook", 30).await;
    assert_exactly(&hook, &want);
    assert_eq!(
        dead_letters(&relay, "hook"),
        vec![("rejected_422".to_string(), bad_id)]
    );
    let r = hook.seen(|s| s.events[events[0]["id"].as_str().unwrap()].clone());
    assert_eq!(r["type"], "event");
    assert_eq!(r["site"], "demo");
    assert_eq!(r["data"], events[0], "the event as stored, field by field");
    assert!(r["received_at"].as_i64().unwrap() > 0);
    assert!(hook.seen(|s| !s.batch_ids.is_empty()));
    relay.wait_drained();
    relay.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sinks_one_down_the_others_stay_current_and_it_catches_up() {
    let tmp = tempfile::tempdir().unwrap();
    let hook = Upstream::start(Flavor::Webhook {
        secret: "whsec-fanout".into(),
    })
    .await;
    let ph = Upstream::start(Flavor::Posthog {
        api_key: "phc_fanout".into(),
    })
    .await;
    ph.set_down(true);
    let config = format!(
        "{FAST_RETRIES}\n[[sinks]]\nname = \"warehouse\"\nkind = \"warehouse\"\n\n[[sinks]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}/in\"\n{}\n[[sinks]]\nname = \"ph\"\nkind = \"posthog\"\nurl = \"{}\"\n{}",
        hook.url(),
        secret_file(tmp.path(), "hook", "whsec-fanout"),
        ph.url(),
        secret_file(tmp.path(), "ph", "phc_fanout"),
    );
    let mut relay = RelayProc::start(tmp.path(), &config);
    let events: Vec<Value> = (1..=200).map(|i| event("d4", i)).collect();
    let want: HashSet<String> = send_all(&relay, &events).await.into_iter().collect();
    wait_caught_up(&relay, "hook", 30).await;
    wait_caught_up(&relay, "warehouse", 30).await;
    assert_exactly(&hook, &want);
    assert_eq!(
        relay.count(&relay.warehouse(), "SELECT count(*) FROM events"),
        200
    );
    // PostHog is down: its backlog holds everything, so the spool deletes nothing yet, and
    // the relay stays ready (it keeps accepting and spooling).
    let v = sink_view(&relay, "ph");
    assert_eq!(v["backlog_rows"], 200, "{v}");
    assert!(v["failing_since_ms"].as_i64().is_some(), "{v}");
    assert_eq!(relay.metric("trueup_spool_depth"), 200.0);
    assert_eq!(
        http_get(relay.admin, "/readyz").unwrap(),
        (200, "ok\n".to_string())
    );

    // A restart while it is down: each sink resumes at its own durable cursor, so the
    // webhook is not sent anything again.
    relay.terminate();
    relay.restart();
    let more: Vec<Value> = (201..=250).map(|i| event("d4", i)).collect();
    let mut want2 = want.clone();
    want2.extend(send_all(&relay, &more).await);
    wait_caught_up(&relay, "hook", 30).await;
    assert_exactly(&hook, &want2);
    assert!(
        hook.seen(|s| s.arrivals.values().all(|n| *n == 1)),
        "nothing re-sent after the restart"
    );
    assert_eq!(sink_view(&relay, "ph")["backlog_rows"], 250);
    assert_eq!(relay.metric("trueup_spool_depth"), 250.0);

    // PostHog is back: it catches up, and only then does the spool empty.
    ph.set_down(false);
    wait_caught_up(&relay, "ph", 30).await;
    assert_exactly(&ph, &want2);
    relay.wait_drained();
    assert_eq!(
        relay.count(&relay.warehouse(), "SELECT count(*) FROM events"),
        250
    );
    assert_eq!(relay.metric("trueup_sink_backlog_rows"), 0.0);
    relay.terminate();
}

/// Each thread of the process `pid` as (name, nice value), from `/proc`.
#[cfg(target_os = "linux")]
fn threads_with_nice(pid: u32) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = entry.unwrap().path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        // stat: "tid (comm) state ...": nice is field 19, the 17th after the comm's ')'.
        let after = &stat[stat.rfind(')').unwrap() + 1..];
        let nice: i64 = after.split_whitespace().nth(16).unwrap().parse().unwrap();
        out.push((comm.trim().to_string(), nice));
    }
    out
}

/// Forwarding yields the CPU to collection: every forwarder thread (workers and the blocking
/// pool where the warehouse writes) runs at `forwarder.nice`, collection's threads at 0.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarders_run_at_the_configured_lower_priority_and_collection_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(tmp.path(), "\n[forwarder]\nnice = 7\nthreads = 2\n");
    let events: Vec<Value> = (1..=300).map(|i| event("d-nice", i)).collect();
    send_all(&relay, &events).await;
    wait_caught_up(&relay, "warehouse", 30).await;
    assert_eq!(
        relay.count(&relay.warehouse(), "SELECT count(*) FROM events"),
        300
    );
    let threads = threads_with_nice(relay.pid());
    let forwarders: Vec<_> = threads.iter().filter(|(n, _)| n == "forwarder").collect();
    // Two workers plus at least one blocking thread (the warehouse's write ran on one).
    assert!(forwarders.len() >= 3, "{threads:?}");
    assert!(forwarders.iter().all(|(_, nice)| *nice == 7), "{threads:?}");
    let others: Vec<_> = threads.iter().filter(|(n, _)| n != "forwarder").collect();
    assert!(!others.is_empty(), "{threads:?}");
    assert!(others.iter().all(|(_, nice)| *nice == 0), "{threads:?}");

    // A nice value out of range is refused with the reason, before anything starts.
    let bad = tempfile::tempdir().unwrap();
    std::fs::write(
        bad.path().join("relay.toml"),
        "[forwarder]\nnice = 25\n\n[[sites]]\nkey = \"demo\"\norigins = [\"https://shop.example\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trueup-relay"))
        .arg("--config")
        .arg(bad.path().join("relay.toml"))
        .arg("--print-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("forwarder.nice must be 0..=19"), "{err}");
}

/// The spool's disk fills while its only sink is down: new batches get 503 `storage_full`
/// with Retry-After, nothing of them is acknowledged or stored, the relay is unready; when the
/// sink returns, delivering frees room and collection resumes by itself. Every event answered
/// accepted reaches the sink exactly once; none answered 503 does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_stores_nothing_unacknowledged_and_recovers_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let hook = Upstream::start(Flavor::Webhook {
        secret: "whsec-full".into(),
    })
    .await;
    hook.set_down(true);
    let relay = RelayProc::start(
        tmp.path(),
        &format!(
            "{FAST_RETRIES}\n[spool]\nmax_file_bytes = 262144\n[[sinks]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}/in\"\n{}",
            hook.url(),
            secret_file(tmp.path(), "hook", "whsec-full")
        ),
    );
    let post = |events: Vec<Value>| {
        client()
            .post(relay.collect_url())
            .header("content-type", "text/plain")
            .body(batch(&events))
            .send()
    };
    let mut accepted = HashSet::new();
    let mut refused = HashSet::new();
    let mut seq = 0u64;
    // Fill: batches of 20 until the spool file is full (bounded: 256 KiB is a few hundred
    // events; 2,000 batches would be far more).
    let mut full = None;
    for _ in 0..2000 {
        let events: Vec<Value> = (0..20)
            .map(|_| {
                seq += 1;
                event("full", seq)
            })
            .collect();
        let resp = post(events.clone()).await.unwrap();
        let ids = events.iter().map(|e| e["id"].as_str().unwrap().to_string());
        if resp.status() == 200 {
            accepted.extend(ids);
            continue;
        }
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["retry-after"], "30");
        refused.extend(ids);
        full = Some(resp.json::<Value>().await.unwrap());
        break;
    }
    let body = full.expect("the spool file filled up");
    assert_eq!(body["error"], "storage_full", "{body}");
    assert!(!accepted.is_empty());
    // Still full: another batch is refused the same way; the relay says it is unready.
    let again: Vec<Value> = (0..20)
        .map(|_| {
            seq += 1;
            event("full", seq)
        })
        .collect();
    let resp = post(again.clone()).await.unwrap();
    assert_eq!(resp.status(), 503);
    refused.extend(again.iter().map(|e| e["id"].as_str().unwrap().to_string()));
    let (status, reasons) = http_get(relay.admin, "/readyz").unwrap();
    assert_eq!(status, 503, "{reasons}");
    assert!(
        reasons.contains("last spool transaction failed"),
        "{reasons}"
    );
    assert!(relay.metric("trueup_spool_full_total") >= 2.0);
    // Nothing refused was stored.
    let spooled: HashSet<String> = {
        let db = relay.spool_db();
        let mut stmt = db
            .prepare("SELECT json_extract(body, '$.id') FROM spool")
            .unwrap();
        stmt.query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert!(spooled.is_disjoint(&refused), "a refused event was stored");
    assert_eq!(spooled, accepted, "every accepted event is spooled");

    // Room returns: the sink comes back, the backlog is delivered and deleted, and the same
    // kind of batch is accepted again without a restart.
    hook.set_down(false);
    wait_caught_up(&relay, "hook", 30).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let events: Vec<Value> = (0..20)
            .map(|_| {
                seq += 1;
                event("full", seq)
            })
            .collect();
        let resp = post(events.clone()).await.unwrap();
        let ids = events.iter().map(|e| e["id"].as_str().unwrap().to_string());
        if resp.status() == 200 {
            accepted.extend(ids);
            break;
        }
        refused.extend(ids);
        assert!(
            std::time::Instant::now() < deadline,
            "collection did not resume: {}",
            resp.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(http_get(relay.admin, "/readyz").unwrap().0, 200);
    wait_caught_up(&relay, "hook", 30).await;
    assert_exactly(&hook, &accepted);
}
