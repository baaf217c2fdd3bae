//! Operating the real relay binary: graceful shutdown under load, the agent's files and the
//! demo site, the admin endpoints (and their absence from the public address), and the
//! configuration surface (`--print-config`, bad configs, environment overrides).

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_requests_in_flight_and_flushes_the_spool() {
    let tmp = tempfile::tempdir().unwrap();
    let mut relay = RelayProc::start(tmp.path(), "");
    let url = relay.collect_url();
    let agents = Agents::spawn(&url, 4);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = relay.terminate();
        (relay, status)
    });
    let (mut relay, status) = status.await.unwrap();
    assert!(
        status.success(),
        "clean exit after SIGTERM: {status}\n{}",
        relay.log_text()
    );
    let log = relay.log_text();
    assert!(log.contains("shutdown complete"), "{log}");
    assert!(
        !relay.dir.join("relay.ready.json").exists(),
        "a clean exit removes the ready file"
    );
    // The spool was flushed to the warehouse before exiting: nothing left waiting.
    let spool = relay.spool_db();
    assert_eq!(
        relay.count(&spool, "SELECT count(*) FROM spool"),
        0,
        "the spool was not flushed"
    );
    drop(spool);
    // Senders with a batch in flight retry it once the relay is back.
    relay.restart();
    let logs = agents.finish().await;
    relay.wait_drained();
    let (events, _) = check_exactly_once(&relay, &logs);
    assert!(events > 0);
}

#[test]
fn port_0_binds_free_ports_and_the_ready_file_says_which() {
    let tmp = tempfile::tempdir().unwrap();
    let a = RelayProc::start(tmp.path(), "");
    let other = tmp.path().join("b");
    std::fs::create_dir_all(&other).unwrap();
    let b = RelayProc::start(&other, "");
    for relay in [&a, &b] {
        assert_ne!(relay.public.port(), 0);
        assert_ne!(relay.admin.port(), 0);
        assert_eq!(http_get(relay.admin, "/readyz").unwrap().0, 200);
        let text = std::fs::read_to_string(relay.dir.join("relay.ready.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["pid"].as_u64(), Some(u64::from(relay.pid())), "{text}");
    }
    assert_ne!(a.public, b.public);
    assert_ne!(a.admin, b.admin);
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_the_agent_files_and_the_demo_site() {
    let tmp = tempfile::tempdir().unwrap();
    let assets = tmp.path().join("assets");
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&assets).unwrap();
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(assets.join("loader.js"), "/* loader */").unwrap();
    std::fs::write(assets.join("agent_bg.3f9a1c2e.wasm"), b"\0asm\x01\0\0\0").unwrap();
    std::fs::write(www.join("index.html"), "<h1>demo</h1>").unwrap();
    let relay = RelayProc::start(tmp.path(), &format!("www_dir = \"{}\"\n", www.display()));
    let get = |path: &str| client().get(relay.url(path)).send();

    let resp = get("/_r/a/agent_bg.3f9a1c2e.wasm").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/wasm");
    assert_eq!(
        resp.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
    let resp = get("/_r/a/loader.js").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("javascript")
    );
    assert_eq!(resp.headers()["cache-control"], "public, max-age=300");
    assert_eq!(get("/_r/a/missing.js").await.unwrap().status(), 404);
    assert_eq!(get("/_r/a/../relay.toml").await.unwrap().status(), 404);
    let resp = get("/").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "<h1>demo</h1>");
    // The collection endpoint only takes POST.
    assert_eq!(get("/_r/q").await.unwrap().status(), 405);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_endpoints_live_only_on_the_admin_address() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(tmp.path(), "");
    let resp = client()
        .post(relay.collect_url())
        .header("content-type", "text/plain")
        .body(batch(&[event("d", 1)]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    relay.wait_drained();
    assert_eq!(
        http_get(relay.admin, "/healthz").unwrap(),
        (200, "ok\n".to_string())
    );
    assert_eq!(
        http_get(relay.admin, "/readyz").unwrap(),
        (200, "ok\n".to_string())
    );
    // The forwarder counts a delivery just after its cursor commit (which empties the spool):
    // wait for that count rather than race it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while relay.metric("trueup_sink_delivered_total") < 1.0 {
        assert!(std::time::Instant::now() < deadline, "no delivery counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, metrics) = http_get(relay.admin, "/metrics").unwrap();
    assert_eq!(status, 200);
    for name in [
        "trueup_events_received_total",
        "trueup_events_accepted_total",
        "trueup_sink_delivered_total",
        "trueup_spool_depth",
        "trueup_spool_bytes",
        "trueup_sink_lag_seconds",
        "trueup_sink_backlog_rows",
        "trueup_request_duration_seconds_bucket",
        "trueup_spool_commit_seconds_bucket",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            client().get(relay.url(path)).send().await.unwrap().status(),
            404,
            "{path} on the public address"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answer_says_nosniff_and_api_answers_are_never_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let assets = tmp.path().join("assets");
    std::fs::create_dir_all(&assets).unwrap();
    std::fs::write(assets.join("loader.js"), "/* loader */").unwrap();
    let relay = RelayProc::start(tmp.path(), "");
    let post = |body: String| {
        client()
            .post(relay.collect_url())
            .header("content-type", "text/plain")
            .body(body)
            .send()
    };
    let ok = post(batch(&[event("d", 1)])).await.unwrap();
    let bad = post("{not json".into()).await.unwrap();
    let server = client()
        .post(relay.url("/_r/s"))
        .header("content-type", "application/json")
        .body(batch(&[server_event("signup")]))
        .send()
        .await
        .unwrap();
    for (what, resp, status) in [
        ("accepted", &ok, 200),
        ("malformed", &bad, 400),
        ("server, no secret", &server, 401),
    ] {
        assert_eq!(resp.status(), status, "{what}");
        assert_eq!(
            resp.headers()["x-content-type-options"],
            "nosniff",
            "{what}"
        );
        assert_eq!(resp.headers()["cache-control"], "no-store", "{what}");
    }
    let body: serde_json::Value = bad.json().await.unwrap();
    assert_eq!(body["error"], "malformed_batch");
    let message = body["message"].as_str().unwrap();
    assert!(
        !message.contains(".rs") && !message.contains("/work"),
        "{message}"
    );
    for path in ["/_r/a/loader.js", "/_r/a/missing.js", "/nothing-here"] {
        let resp = client().get(relay.url(path)).send().await.unwrap();
        assert_eq!(
            resp.headers()["x-content-type-options"],
            "nosniff",
            "{path}"
        );
    }
    let resp = admin_get(&relay, "/metrics", None).await;
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    assert_eq!(resp.headers()["cache-control"], "no-store");
}

/// A GET on the admin address with `Authorization: Bearer <token>`, if given.
async fn admin_get(relay: &RelayProc, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut req = client().get(format!("http://{}{path}", relay.admin));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    req.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn with_an_admin_token_the_admin_endpoints_need_it_and_probes_say_only_their_status() {
    const TOKEN: &str = "admin-token-for-tests-0123456789";
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let hook_secret = tmp.path().join("hook-secret");
    std::fs::write(&hook_secret, "hook-secret-0123456789").unwrap();
    // A sink nobody answers and a spool limit of one byte: after one batch the relay is
    // unready ("spool over its size limit"), which only the token may read.
    let relay = RelayProc::start(
        tmp.path(),
        &format!(
            "admin_token_file = \"{}\"\n[spool]\nmax_bytes = 1\n[[sinks]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:9/in\"\nsecret_file = \"{}\"\n",
            token_file.display(),
            hook_secret.display()
        ),
    );
    for (path, token) in [
        ("/metrics", None),
        ("/sinks", None),
        ("/metrics", Some("admin-token-for-tests-012345678X")),
        ("/metrics", Some("short")),
        ("/metrics", Some("")),
    ] {
        let resp = admin_get(&relay, path, token).await;
        assert_eq!(resp.status(), 401, "{path} with {token:?}");
        assert_eq!(
            resp.headers()["www-authenticate"],
            "Bearer realm=\"trueup-admin\""
        );
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized");
        assert!(body["message"].as_str().unwrap().contains("admin token"));
    }
    // The token in another scheme is refused too.
    let resp = client()
        .get(format!("http://{}/metrics", relay.admin))
        .header("authorization", format!("Basic {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = admin_get(&relay, "/metrics", Some(TOKEN)).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("trueup_spool_depth"));
    let resp = admin_get(&relay, "/sinks", Some(TOKEN)).await;
    assert_eq!(resp.status(), 200);

    // Probes: the status to anyone, the reasons with the token.
    let probe = |path: &'static str, token| {
        let relay = &relay;
        async move {
            let resp = admin_get(relay, path, token).await;
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    assert_eq!(probe("/healthz", None).await, (200, "ok\n".to_string()));
    assert_eq!(probe("/readyz", None).await, (200, "ok\n".to_string()));
    let resp = client()
        .post(relay.collect_url())
        .header("content-type", "text/plain")
        .body(batch(&[event("d", 1)]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        probe("/readyz", None).await,
        (503, "unavailable\n".to_string())
    );
    let (status, reasons) = probe("/readyz", Some(TOKEN)).await;
    assert_eq!(status, 503);
    assert!(reasons.contains("spool over its size limit"), "{reasons}");
}

#[test]
fn the_admin_address_off_loopback_needs_a_token_and_the_token_is_never_printed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = relay_cmd()
        .args(["--admin-listen", "0.0.0.0:0", "--print-config"])
        .env_remove("TRUEUP_ADMIN_TOKEN")
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("admin_listen 0.0.0.0:0 is not a loopback address"),
        "{err}"
    );
    const TOKEN: &str = "token-that-must-not-be-printed";
    let out = relay_cmd()
        .args(["--admin-listen", "0.0.0.0:0", "--print-config"])
        .env("TRUEUP_ADMIN_TOKEN", TOKEN)
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("admin_token = \"<redacted>\""), "{text}");
    assert!(!text.contains(TOKEN), "{text}");
}

/// Runs a relay in `log_format` that meets a failing sink whose URL and key are secrets, a
/// wrong server secret and an event with a marked payload; returns its whole log.
async fn log_of_a_relay_meeting_secrets(log_format: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("hook-key");
    std::fs::write(&key, "HOOK-KEY-SECRET-0123456789").unwrap();
    let mut relay = RelayProc::start(
        tmp.path(),
        &format!(
            "log_format = \"{log_format}\"\nadmin_token = \"ADMIN-TOKEN-SECRET-0123\"\n[forwarder]\ninitial_backoff_ms = 20\nmax_backoff_ms = 50\nshutdown_drain_secs = 1\n[[sinks]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:9/in?token=URL-TOKEN-SECRET\"\nsecret_file = \"{}\"\n",
            key.display()
        ),
    );
    let mut e = event("d", 1);
    e["props"] = serde_json::json!({"note": "PAYLOAD-MARKER-7c1d"});
    let resp = client()
        .post(relay.collect_url())
        .header("content-type", "text/plain")
        .body(batch(&[e]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client()
        .post(relay.url("/_r/s"))
        .bearer_auth("WRONG-SERVER-SECRET-0123456789")
        .header("content-type", "application/json")
        .body(batch(&[server_event("signup")]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // Let the sink fail a few times (each failure is logged).
    tokio::time::sleep(Duration::from_millis(400)).await;
    relay.terminate();
    relay.log_text()
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_are_plain_or_json_lines_and_never_carry_a_payload_or_a_secret() {
    for format in ["text", "json"] {
        let log = log_of_a_relay_meeting_secrets(format).await;
        assert!(
            log.contains("sink delivery failed"),
            "{format}: the failing sink is logged:\n{log}"
        );
        assert!(
            !log.contains('\u{1b}'),
            "{format}: colour codes in a log file:\n{log}"
        );
        for secret in [
            "HOOK-KEY-SECRET",
            "URL-TOKEN-SECRET",
            "ADMIN-TOKEN-SECRET",
            "WRONG-SERVER-SECRET",
            SERVER_SECRET,
            "PAYLOAD-MARKER",
        ] {
            assert!(
                !log.contains(secret),
                "{format}: {secret} in the log:\n{log}"
            );
        }
        if format == "json" {
            for line in log.lines().filter(|l| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                assert!(
                    v["level"].is_string() && v["timestamp"].is_string(),
                    "{line}"
                );
            }
        }
    }
}

fn relay_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trueup-relay"))
}

#[test]
fn print_config_shows_effective_values_and_public_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("c.toml");
    std::fs::write(&file, "prefix = \"/edge/\"\n[limits]\nmax_events_per_batch = 100\n[[sites]]\nkey = \"shop\"\nserver_secrets = [\"a-very-secret-secret-123\"]\n").unwrap();
    let out = relay_cmd()
        .args([
            "--config",
            file.to_str().unwrap(),
            "--print-config",
            "--listen",
            "0.0.0.0:8000",
        ])
        .env("TRUEUP_DATA_DIR", "/var/lib/trueup")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "listen = \"0.0.0.0:8000\"",
        "data_dir = \"/var/lib/trueup\"",
        "max_events_per_batch = 100",
        "collect = \"/edge/q\"",
        "assets = \"/edge/a/\"",
        "warehouse = \"/var/lib/trueup/warehouse.sqlite\"",
        "sink.warehouse = \"warehouse batch_size=2000",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(
        !text.contains("a-very-secret-secret-123"),
        "secrets must not be printed"
    );
    // The printed configuration is itself a valid config file.
    let reprinted = tmp.path().join("printed.toml");
    let body: String = text.split("[public_paths]").next().unwrap().to_string();
    std::fs::write(
        &reprinted,
        body.replace("<redacted>", "a-very-secret-secret-123"),
    )
    .unwrap();
    let out = relay_cmd()
        .args(["--config", reprinted.to_str().unwrap(), "--print-config"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sinks_come_from_the_file_or_trueup_sinks_and_print_without_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("c.toml");
    std::fs::write(&file, "[[sinks]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"https://hooks.example/in\"\nsecret_env = \"HOOK_SECRET\"\nconcurrency = 4\n").unwrap();
    let run = |env: Option<&str>| {
        let mut cmd = relay_cmd();
        cmd.args(["--config", file.to_str().unwrap(), "--print-config"])
            .env("HOOK_SECRET", "whsec-do-not-print-me");
        if let Some(v) = env {
            cmd.env("TRUEUP_SINKS", v);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = run(None);
    assert!(
        text.contains("sink.hook = \"webhook batch_size=500 concurrency=4 timeout_secs=10\""),
        "{text}"
    );
    assert!(text.contains("secret_env = \"HOOK_SECRET\""), "{text}");
    assert!(!text.contains("whsec-do-not-print-me"), "{text}");
    let text = run(Some(
        r#"[{name = "ph", kind = "posthog", url = "https://eu.i.posthog.com", secret_env = "PH_KEY"}, {name = "warehouse", kind = "warehouse"}]"#,
    ));
    assert!(
        text.contains("sink.ph = \"posthog batch_size=1000"),
        "{text}"
    );
    assert!(text.contains("sink.warehouse = \"warehouse"), "{text}");
    assert!(
        !text.contains("sink.hook"),
        "TRUEUP_SINKS replaces the file's sinks: {text}"
    );
}

#[test]
fn bad_configuration_is_refused_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("lisen = \"127.0.0.1:1\"\n", "unknown field"),
        (
            "[limits]\nmax_events_per_batch = 100000\n",
            "max_events_per_batch",
        ),
        (
            "[[sites]]\nkey = \"a\"\nserver_secrets = [\"short\"]\n",
            "at least 16",
        ),
        (
            "[[sites]]\nkey = \"a\"\norigins = [\"shop.example\"]\n",
            "origin",
        ),
        (
            "[spool]\ndedupe_retention_secs = 10\n",
            "dedupe_retention_secs",
        ),
        ("[sink]\nkind = \"warehouse\"\n", "replaced by [[sinks]]"),
        (
            "[[sinks]]\nname = \"k\"\nkind = \"kafkaa\"\n",
            "unknown variant",
        ),
        (
            "[[sinks]]\nname = \"k\"\nkind = \"kafka\"\n",
            "kind kafka needs brokers",
        ),
        (
            "[[sinks]]\nname = \"k\"\nkind = \"kafka\"\nbrokers = \"broker-1\"\n",
            "\"broker-1\" is not host:port",
        ),
        (
            "[[sinks]]\nname = \"k\"\nkind = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"raw events\"\n",
            "topic \"raw events\" must be",
        ),
        (
            "[[sinks]]\nname = \"k\"\nkind = \"kafka\"\nbrokers = \"b:9092\"\nproperties = { acks = \"1\" }\n",
            "\"acks\" is set by trueup",
        ),
        (
            "[[sinks]]\nname = \"k\"\nkind = \"kafka\"\nbrokers = \"b:9092\"\nurl = \"https://x.example\"\n",
            "url does not apply to kind kafka",
        ),
        (
            "[[sinks]]\nname = \"w\"\nkind = \"warehouse\"\ntopic = \"t\"\n",
            "topic does not apply to kind warehouse",
        ),
        (
            "[[sinks]]\nname = \"n\"\nkind = \"nats\"\n",
            "kind nats needs url",
        ),
        (
            "[[sinks]]\nname = \"n\"\nkind = \"nats\"\nurl = \"http://127.0.0.1:4222\"\n",
            "must be a nats:// (or tls://) URL",
        ),
        (
            "[[sinks]]\nname = \"n\"\nkind = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nsubject = \"a..b\"\n",
            "subject \"a..b\" must be",
        ),
        (
            "[[sinks]]\nname = \"n\"\nkind = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nshards = 0\n",
            "shards must be 1..=1024",
        ),
        (
            "[[sinks]]\nname = \"n\"\nkind = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nbrokers = \"b:1\"\n",
            "brokers does not apply to kind nats",
        ),
        (
            "[[sinks]]\nname = \"a b\"\nkind = \"warehouse\"\n",
            "name must be",
        ),
        (
            "[[sinks]]\nname = \"h\"\nkind = \"webhook\"\nsecret_env = \"K\"\n",
            "needs url",
        ),
        (
            "[[sinks]]\nname = \"h\"\nkind = \"webhook\"\nurl = \"https://hooks.example/in\"\n",
            "secret_env or secret_file",
        ),
        (
            "[[sinks]]\nname = \"h\"\nkind = \"webhook\"\nurl = \"ftp://x\"\nsecret_env = \"K\"\n",
            "http(s) URL",
        ),
        (
            "[[sinks]]\nname = \"w\"\nkind = \"warehouse\"\nurl = \"https://x.example\"\n",
            "url does not apply to kind warehouse",
        ),
        (
            "admin_token = \"too-short\"\n",
            "admin_token must be at least 16",
        ),
        (
            "admin_token_file = \"/nonexistent/admin-token\"\n",
            "cannot read admin_token_file /nonexistent/admin-token",
        ),
        (
            "[[sinks]]\nname = \"w\"\nkind = \"warehouse\"\nconcurrency = 2\n",
            "concurrency must be 1 for kind warehouse",
        ),
        (
            "[[sinks]]\nname = \"s\"\nkind = \"segment\"\nsecret_env = \"K\"\nbatch_size = 3000\n",
            "batch_size must be 1..=2500",
        ),
        (
            "[[sinks]]\nname = \"s\"\nkind = \"segment\"\nsecret_env = \"K\"\nmax_event_bytes = 40000\n",
            "max_event_bytes must be 1..=32000",
        ),
        (
            "[[sinks]]\nname = \"w\"\nkind = \"warehouse\"\n[[sinks]]\nname = \"w\"\nkind = \"warehouse\"\npath = \"/tmp/x.sqlite\"\n",
            "unique",
        ),
    ];
    for (toml, want) in cases {
        let file = tmp.path().join("bad.toml");
        std::fs::write(&file, toml).unwrap();
        let out = relay_cmd()
            .args(["--config", file.to_str().unwrap(), "--print-config"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{toml}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{toml}: expected {want:?} in {err}");
    }
    // The loader's section is checked when it runs (`load`), with the reason.
    let loader_cases = [
        ("", "loader: from = \"kafka\" needs brokers"),
        (
            "[loader]\nbrokers = \"b:9092\"\nto = \"postgres\"\n",
            "needs its connection URL in secret_env or secret_file",
        ),
        (
            "[loader]\nbrokers = \"b:9092\"\nbatch_size = 0\n",
            "batch_size must be 1..=100000",
        ),
        (
            "[loader]\nbrokers = \"b:9092\"\nproperties = { \"enable.auto.commit\" = \"true\" }\n",
            "\"enable.auto.commit\" is set by trueup",
        ),
        ("[loader]\nfrom = \"redis\"\n", "unknown variant"),
        ("[loader]\nfrom = \"nats\"\n", "from = \"nats\" needs url"),
        (
            "[loader]\nfrom = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nbrokers = \"b:1\"\n",
            "apply to from = \"kafka\" only",
        ),
    ];
    for (toml, want) in loader_cases {
        let file = tmp.path().join("bad-loader.toml");
        std::fs::write(&file, toml).unwrap();
        let out = relay_cmd()
            .args(["--config", file.to_str().unwrap(), "load"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{toml}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{toml}: expected {want:?} in {err}");
    }
    // Two different admin tokens.
    let token_file = tmp.path().join("admin-token");
    std::fs::write(&token_file, "fedcba9876543210f\n").unwrap();
    let file = tmp.path().join("two-tokens.toml");
    std::fs::write(
        &file,
        format!(
            "admin_token = \"0123456789abcdef0\"\nadmin_token_file = \"{}\"\n",
            token_file.display()
        ),
    )
    .unwrap();
    let out = relay_cmd()
        .args(["--config", file.to_str().unwrap(), "--print-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not both"));
    // A sink's secret is read at start: a variable that is not set stops the relay, saying which.
    let file = tmp.path().join("unset.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[[sinks]]\nname = \"ph\"\nkind = \"posthog\"\nurl = \"https://us.i.posthog.com\"\nsecret_env = \"TRUEUP_TEST_NEVER_SET\"\n").unwrap();
    let out = relay_cmd()
        .args(["--config", file.to_str().unwrap()])
        .env("TRUEUP_DATA_DIR", tmp.path().join("data"))
        .env_remove("TRUEUP_TEST_NEVER_SET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TRUEUP_TEST_NEVER_SET, which is not set"),
        "{err}"
    );
    let out = relay_cmd()
        .args(["--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent.toml"));
}

#[test]
fn a_relay_that_cannot_listen_says_so_and_leaves_no_ready_file() {
    let tmp = tempfile::tempdir().unwrap();
    // Held for the whole test, so the relay's bind must fail.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ready = tmp.path().join("relay.ready.json");
    // A file from an earlier run, which a supervisor must not mistake for this run's.
    std::fs::write(
        &ready,
        r#"{"listen":"127.0.0.1:1","admin_listen":"127.0.0.1:2","pid":1}"#,
    )
    .unwrap();
    let out = relay_cmd()
        .env("TRUEUP_DATA_DIR", tmp.path().join("data"))
        .args(["--listen", &taken.local_addr().unwrap().to_string()])
        .args(["--admin-listen", "127.0.0.1:0", "--ready-file"])
        .arg(&ready)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on"), "{err}");
    assert!(!ready.exists(), "the stale ready file is still there");
}
