//! The dashboards on the real relay over HTTP: who may see them (the admin token, as a bearer
//! header or as the cookie the login sets; never on the public listener), and the quality
//! API's figures against data put there (loss by stage, drops by reason, seq gaps per day,
//! rejects with redacted samples, freshness, the sinks), including a truth database that
//! cannot be reached: that section says so and the rest is still reported.
//! The pages themselves are tested in Chromium (`e2e/dashboards.test.mjs`).

mod support;
#[path = "support/upstream.rs"]
mod upstream;

use serde_json::{Value, json};
use support::*;
use upstream::{Flavor, Upstream};

const TOKEN: &str = "dash-test-admin-token-0123456789";

fn relay(dir: &std::path::Path, truth: &str) -> RelayProc {
    relay_with(dir, truth, "")
}

fn relay_with(dir: &std::path::Path, truth: &str, extra: &str) -> RelayProc {
    RelayProc::start(
        dir,
        &format!(
            "admin_token = \"{TOKEN}\"\n{extra}\n[reconcile]\ntruth = \"{truth}\"\ninterval_secs = 0\n\n\
             [[reconcile.metrics]]\nname = \"signups\"\nevent = \"signup_completed\"\n\
             truth_sql = \"SELECT '2000-01-01' AS day, 0 AS actual\"\n"
        ),
    )
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// `/api/v1/quality?days=1`, polled until `done` holds of it (at most `secs` seconds).
async fn quality_until(
    http: &reqwest::Client,
    relay: &RelayProc,
    secs: u64,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let q: Value = http
            .get(format!("http://{}/api/v1/quality?days=1", relay.admin))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if done(&q) {
            return q;
        }
        assert!(std::time::Instant::now() < deadline, "never settled: {q:#}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn only_the_admin_token_opens_the_dashboards_and_never_on_the_public_listener() {
    let dir = tempfile::tempdir().unwrap();
    let truth = dir.path().join("truth.sqlite");
    rusqlite::Connection::open(&truth).unwrap();
    let relay = relay(dir.path(), &format!("sqlite:{}", truth.display()));
    let admin = |p: &str| format!("http://{}{p}", relay.admin);
    let http = no_redirects();

    // No token, a wrong one: 401, JSON for the API, the sign-in page for a page.
    for auth in [
        None,
        Some("Bearer wrong-token-wrong-token-00"),
        Some("Bearer "),
    ] {
        let mut req = http.get(admin("/api/v1/quality"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized");
    }
    let page = http.get(admin("/dash/quality")).send().await.unwrap();
    assert_eq!(page.status(), 401);
    assert!(
        page.text()
            .await
            .unwrap()
            .contains("<form method=\"post\" action=\"/login\"")
    );
    let wrong_cookie = http
        .get(admin("/api/v1/quality"))
        .header("cookie", "trueup_admin=00ff")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_cookie.status(), 401);

    // The bearer token opens the API.
    let ok = http
        .get(admin("/api/v1/quality?days=7"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);

    // The login: a wrong token is 401 with the form; the right one sets the cookie.
    let bad = http
        .post(admin("/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=not-the-token-not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    assert!(bad.headers().get("set-cookie").is_none());
    let good = http
        .post(admin("/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), 303);
    let cookie = good.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains(TOKEN),
        "the cookie holds the token hex-encoded: {cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    for path in ["/dash/quality", "/dash/dash.js", "/api/v1/quality?days=30"] {
        let resp = http
            .get(admin(path))
            .header("cookie", &session)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        if path.starts_with("/dash/") {
            let csp = resp.headers()["content-security-policy"].to_str().unwrap();
            assert!(csp.contains("default-src 'self'"), "{csp}");
        }
    }
    // Metrics and sinks take the session too (the pages may read them).
    let sinks = http
        .get(admin("/sinks"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(sinks.status(), 200);

    // Bad input: a clear 400.
    let bad_days = http
        .get(admin("/api/v1/quality?days=8"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(bad_days.status(), 400);
    let body: Value = bad_days.json().await.unwrap();
    assert_eq!(body["error"], "invalid_query");
    assert!(body["message"].as_str().unwrap().contains("[1, 7, 30]"));

    // The public listener serves none of it, with or without the token.
    for path in [
        "/dash/quality",
        "/api/v1/quality",
        "/login",
        "/dash/dash.js",
    ] {
        let resp = http
            .get(relay.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{path} on the public listener");
    }
}

#[tokio::test]
async fn the_quality_api_reports_what_was_put_there_and_says_which_store_failed() {
    let dir = tempfile::tempdir().unwrap();
    // A truth database that cannot be reached (nothing listens on port 1).
    let relay = relay(dir.path(), "postgres://trueup:pw@127.0.0.1:1/none");
    let http = client();
    let now = now_ms();

    // Device dev-q: seqs 1, 2, 5 (two missing) today; a retry of the same batch (3
    // duplicates); its counters with drops by reason; an event with a bad schema whose
    // props hold an e-mail address.
    let events: Vec<Value> = [1, 2, 5].map(|s| event("dev-q", s)).into();
    let mut with_bad = events.clone();
    with_bad.push(
        json!({"id": new_id(), "name": "signup", "schema": "nope/9", "ts": now,
        "source": "client", "anon_id": "a", "device_id": "dev-q", "seq": 6,
        "props": {"email": "person@private.example"}}),
    );
    let body = json!({"v": 1, "site": "demo", "events": with_bad, "counters": {
        "device_id": "dev-q", "enqueued": 12, "sent": 10, "acked": 8, "retried": 1,
        "pending": 1, "dropped": {"queue_full": 2, "consent": 1}}});
    for _ in 0..2 {
        let resp = http
            .post(relay.collect_url())
            .header("origin", "https://shop.example")
            .header("content-type", "text/plain")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
    }
    relay.wait_drained();

    // Drained means stored; the sink's backlog figure follows on its forwarder's next turn.
    let q = quality_until(&http, &relay, 10, |q| {
        q["sinks"][0]["backlog_rows"] == 0 && q["loss"]["devices"] == 1
    })
    .await;
    // The truth database's failure is the gap section's, said plainly; the rest is there.
    let errors = q["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{q:#}");
    assert_eq!(errors[0]["section"], "gap");
    let message = errors[0]["message"].as_str().unwrap();
    assert!(message.contains("127.0.0.1:1"), "{message}");
    assert!(
        !message.contains("pw"),
        "the password is redacted: {message}"
    );
    assert_eq!(q["gap"], json!([]));
    assert_eq!(q["days"], 1);
    assert_eq!(q["day_list"], json!([trueup_reconcile::day::of_ms(now)]));

    let loss = &q["loss"];
    assert_eq!(loss["devices"], 1);
    assert_eq!(loss["created"], 12);
    assert_eq!(loss["stored"], 11, "created minus the consent drop: {loss}");
    assert_eq!(loss["sent"], 9);
    assert_eq!(loss["acked"], 8);
    assert_eq!(loss["accepted_by_relay"], 3);
    assert_eq!(loss["in_warehouse"], 3);
    assert_eq!(loss["duplicates_removed"], 3);
    assert_eq!(
        loss["rejected_by_relay"], 2,
        "the bad event, in both sends: {loss}"
    );
    assert_eq!(loss["dropped"], json!({"consent": 1, "queue_full": 2}));
    assert_eq!(loss["seq_gaps"], 2);
    assert_eq!(q["seq_gaps"], json!([{"day": q["day_list"][0], "gaps": 2}]));

    let rejects = q["rejects"].as_array().unwrap();
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    assert_eq!(rejects[0]["stage"], "ingest");
    assert_eq!(rejects[0]["count"], 2);
    let samples = rejects[0]["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2);
    let raw = samples[0]["raw"].as_str().unwrap();
    assert!(!raw.contains("person@private.example"), "{raw}");
    assert!(raw.contains("<redacted: 22 chars>"), "{raw}");

    // Freshness: the three events were captured now and stored by the embedded warehouse.
    let stages: Vec<&str> = q["freshness"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        [
            "capture_to_accepted",
            "accepted_to_warehouse",
            "capture_to_warehouse"
        ]
    );
    for f in q["freshness"].as_array().unwrap() {
        assert_eq!(f["events"], 3, "{f}");
        let (p50, p95) = (f["p50_ms"].as_i64().unwrap(), f["p95_ms"].as_i64().unwrap());
        assert!((0..60_000).contains(&p50) && p50 <= p95, "{f}");
    }
    let sinks = q["sinks"].as_array().unwrap();
    assert_eq!(sinks.len(), 1);
    assert_eq!(sinks[0]["name"], "warehouse");
    assert_eq!(sinks[0]["backlog_rows"], 0);
}

/// Every series the Grafana dashboard (`relay/grafana/trueup.json`) queries is one the relay
/// or the loader exports: named in their source, and, for the reconciliation and loss
/// figures, present on a real relay's `/metrics` after a reconciliation ran.
/// A record a sink refuses for good is a dead letter of stage `sink`: counted on the quality
/// page under the sink's reason, with a redacted sample naming the sink and the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sinks_dead_letters_are_on_the_quality_page_with_redacted_samples() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(Flavor::Posthog {
        api_key: "phc_dash_key".into(),
    })
    .await;
    let secret = dir.path().join("ph.secret");
    std::fs::write(&secret, "phc_dash_key\n").unwrap();
    let relay = relay_with(
        dir.path(),
        "postgres://trueup:pw@127.0.0.1:1/none",
        &format!(
            "\n[forwarder]\ninitial_backoff_ms = 50\nmax_backoff_ms = 400\n\n\
             [[sinks]]\nname = \"ph\"\nkind = \"posthog\"\nurl = \"{}\"\nsecret_file = \"{}\"\n",
            up.url(),
            secret.display()
        ),
    );
    let http = client();
    // PostHog refuses a batch holding a poisoned event: the relay splits it down to that one
    // event and dead-letters it; its neighbour is delivered.
    let mut bad = event("dev-dl", 2);
    bad["props"] = json!({"poison": true, "email": "someone@private.example"});
    let bad_id = bad["id"].as_str().unwrap().to_string();
    let body = json!({"v": 1, "site": "demo", "events": [event("dev-dl", 1), bad]});
    let resp = http
        .post(relay.collect_url())
        .header("origin", "https://shop.example")
        .header("content-type", "text/plain")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());

    let q = quality_until(&http, &relay, 20, |q| {
        let settled = q["sinks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["backlog_rows"] == 0);
        settled && !q["rejects"].as_array().unwrap().is_empty()
    })
    .await;
    let rejects = q["rejects"].as_array().unwrap();
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    let r = &rejects[0];
    assert_eq!(r["stage"], "sink");
    assert_eq!(r["reason"], "rejected_400");
    assert_eq!(r["count"], 1);
    let samples = r["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 1);
    assert_eq!(samples[0]["sink"], "ph");
    assert_eq!(samples[0]["event_id"], bad_id.as_str());
    let raw = samples[0]["raw"].as_str().unwrap();
    assert!(!raw.contains("someone@private.example"), "{raw}");
    assert!(raw.contains("<redacted: 23 chars>"), "{raw}");
    let ph = q["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "ph")
        .unwrap();
    assert_eq!(ph["dead_lettered"], 1, "{ph}");
    assert_eq!(ph["delivered"], 1, "{ph}");
}

#[tokio::test]
async fn the_grafana_dashboard_queries_series_the_relay_exports() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("relay/grafana/trueup.json")).unwrap(),
    )
    .unwrap();
    let mut used = std::collections::BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("trueup_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name)
                    .to_string();
                used.insert(base);
            }
        }
    }
    assert!(used.len() >= 20, "{used:?}");
    let mut source = String::new();
    let mut dirs = vec![root.join("relay/src")];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                source.push_str(&std::fs::read_to_string(p).unwrap());
            }
        }
    }
    for name in &used {
        assert!(
            source.contains(&format!("\"{name}\"")),
            "the dashboard queries {name}, which the relay does not export"
        );
    }

    // A relay with a reconciliation every second: its figures are on /metrics.
    let dir = tempfile::tempdir().unwrap();
    let truth = dir.path().join("truth.sqlite");
    rusqlite::Connection::open(&truth)
        .unwrap()
        .execute_batch("CREATE TABLE users (created_at TEXT); INSERT INTO users VALUES ('2026-01-01T00:00:00Z');")
        .unwrap();
    let relay = RelayProc::start(
        dir.path(),
        &format!(
            "admin_token = \"{TOKEN}\"\n\n[reconcile]\ntruth = \"sqlite:{}\"\ninterval_secs = 1\n\n\
             [[reconcile.metrics]]\nname = \"signups\"\nevent = \"signup_completed\"\n\
             truth_sql = \"SELECT substr(created_at, 1, 10) AS day, count(*) AS actual FROM users GROUP BY 1\"\n",
            truth.display()
        ),
    );
    let body = json!({"v": 1, "site": "demo", "events": [event("dev-g", 1)]});
    let resp = client()
        .post(relay.collect_url())
        .header("origin", "https://shop.example")
        .header("content-type", "text/plain")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let text = loop {
        let text = client()
            .get(format!("http://{}/metrics", relay.admin))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("trueup_reconcile_last_success_timestamp_seconds ") {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reconciliation in 20 s:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    for name in used.iter().filter(|n| {
        n.starts_with("trueup_reconcile_")
            || n.starts_with("trueup_loss_stage")
            || n.starts_with("trueup_events_accepted")
            || n.starts_with("trueup_spool_depth")
            || n.starts_with("trueup_sink_backlog")
            || n.starts_with("trueup_pipeline_lag")
    }) {
        assert!(
            text.contains(name.as_str()),
            "{name} is not on /metrics:\n{text}"
        );
    }
}
