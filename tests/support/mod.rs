//! Shared helpers for the integration tests: run the real `trueup-relay` binary on loopback
//! with a fresh data directory, build valid and invalid events, read the warehouse.
#![allow(dead_code)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

pub const SERVER_SECRET: &str = "test-server-secret-0123456789";

/// A running relay process.
pub struct RelayProc {
    child: Option<Child>,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl RelayProc {
    /// Starts the relay in `dir` with the test defaults plus `extra` TOML (appended; tables
    /// given there replace the defaults' tables, so pass whole tables). It binds port 0 for
    /// both listeners and reports the ports it got in its ready file.
    pub fn start(dir: &Path, extra: &str) -> RelayProc {
        let unbound: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let config = dir.join("relay.toml");
        let mut text = format!(
            "listen = \"{unbound}\"\nadmin_listen = \"{unbound}\"\ndata_dir = \"{}\"\nasset_dir = \"{}\"\n",
            dir.join("data").display(),
            dir.join("assets").display()
        );
        text.push_str(extra);
        if !extra.contains("[rate_limit]") {
            text.push_str("\n[rate_limit]\nper_ip_per_sec = 0\nper_site_per_sec = 0\n");
        }
        if !extra.contains("[[sites]]") {
            text.push_str(&format!(
                "\n[[sites]]\nkey = \"demo\"\norigins = [\"https://shop.example\"]\nserver_secrets = [\"{SERVER_SECRET}\"]\n"
            ));
        }
        std::fs::write(&config, text).unwrap();
        let mut relay = RelayProc {
            child: None,
            public: unbound,
            admin: unbound,
            dir: dir.to_path_buf(),
            config,
            log: dir.join("relay.log"),
        };
        relay.spawn();
        relay
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let ready_file = self.dir.join("relay.ready.json");
        // A file left by the previous run of this relay must never be read as this run's.
        let _ = std::fs::remove_file(&ready_file);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_trueup-relay"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--ready-file")
            .arg(&ready_file);
        if self.public.port() != 0 {
            // A restart comes back on the addresses the first start got.
            cmd.arg("--listen")
                .arg(self.public.to_string())
                .arg("--admin-listen")
                .arg(self.admin.to_string());
        }
        let child = cmd
            .env("TRUEUP_LOG", "info,tower_http=warn")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn trueup-relay");
        self.child = Some(child);
        self.wait_ready_file(&ready_file);
        self.wait_ready();
    }

    /// Waits (at most 20 s) for the relay's ready file and takes the addresses from it.
    fn wait_ready_file(&mut self, path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("relay exited during start ({status}):\n{}", self.log_text());
            }
            if let Ok(text) = std::fs::read_to_string(path) {
                let v: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("ready file {text:?}: {e}"));
                // Only this child's file counts (a stale one names another pid).
                if v["pid"].as_u64() == Some(u64::from(self.pid())) {
                    let (public, admin) = read_ready_file(&text);
                    self.public = public;
                    self.admin = admin;
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "relay wrote no ready file in 20 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (at most 20 s) until /readyz answers 200.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("relay exited during start ({status}):\n{}", self.log_text());
            }
            if http_get(self.admin, "/readyz")
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "relay not ready in 20 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.public, path)
    }

    pub fn collect_url(&self) -> String {
        self.url("/_r/q")
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (at most 30 s) for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "relay did not exit 30 s after SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Starts the relay again on the same ports and data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
    }

    /// Reads one metric's value (sum over label sets) from /metrics.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = http_get(self.admin, "/metrics").expect("metrics");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits (at most 60 s) until the spool is empty: everything is in the warehouse.
    pub fn wait_drained(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.metric("trueup_spool_depth") > 0.0 {
            assert!(Instant::now() < deadline, "spool did not drain in 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn warehouse(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.dir.join("data/warehouse.sqlite")).unwrap()
    }

    pub fn spool_db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.dir.join("data/spool.sqlite")).unwrap()
    }

    pub fn count(&self, conn: &rusqlite::Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }
}

/// The public and admin addresses from a relay's ready file
/// (`{"listen": …, "admin_listen": …, "pid": …}`).
pub fn read_ready_file(text: &str) -> (SocketAddr, SocketAddr) {
    let v: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("ready file {text:?}: {e}"));
    let addr = |key: &str| -> SocketAddr {
        v[key]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("ready file {text:?}: no {key}"))
    };
    (addr("listen"), addr("admin_listen"))
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A minimal blocking HTTP/1.1 GET, for readiness polling without a runtime.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A valid client event.
pub fn event(device: &str, seq: u64) -> Value {
    json!({
        "id": new_id(), "name": "button_clicked", "schema": "event/1", "ts": now_ms(),
        "source": "client", "anon_id": "anon-1", "session_id": "sess-1",
        "device_id": device, "seq": seq,
        "props": {"button": "checkout", "price": 49.5},
        "context": {"url": "https://shop.example/cart", "title": "Cart"}
    })
}

/// A valid server event.
pub fn server_event(name: &str) -> Value {
    json!({
        "id": new_id(), "name": name, "schema": "event/1", "ts": now_ms(),
        "source": "server", "anon_id": "user-42", "user_id": "user-42",
        "props": {"order_id": "o-1"}
    })
}

pub fn batch(events: &[Value]) -> String {
    json!({"v": 1, "site": "demo", "events": events}).to_string()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// POSTs over a raw socket: writes the head, then the body chunks from another thread
/// (ignoring write errors: the relay may answer and close before reading everything, which
/// is the point of an early 413), and returns the status and body of the answer.
pub fn raw_post(
    addr: SocketAddr,
    path: &str,
    extra_headers: &str,
    chunks: Vec<Vec<u8>>,
) -> (u16, String) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\nConnection: close\r\n{extra_headers}\r\n").unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for c in chunks {
            if w.write_all(&c).is_err() {
                return;
            }
        }
    });
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let _ = writer.join();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// What one simulated agent saw: every event id it sent and each answer it got for it.
#[derive(Default)]
pub struct SenderLog {
    pub sent: Vec<String>,
    pub answers: Vec<(String, String)>,
    pub attempts_unanswered: u64,
}

/// Behaves like an agent: sends batches of `per_batch` new events for `device` until `stop`
/// is set, and retries each batch with the same ids until it is answered 200 (the relay may
/// be down, restarting, or shutting down meanwhile). A batch that has started is always
/// finished, so every id in `sent` was eventually acknowledged.
pub async fn agent_loop(
    url: String,
    device: String,
    per_batch: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    give_up_after: Duration,
) -> SenderLog {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let mut log = SenderLog::default();
    let mut seq = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let events: Vec<Value> = (0..per_batch)
            .map(|_| {
                seq += 1;
                let mut e = event(&device, seq);
                // A session per device (so that a log keyed by session spreads them).
                e["session_id"] = json!(format!("sess-{device}"));
                e
            })
            .collect();
        let ids: Vec<String> = events
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect();
        let body = batch(&events);
        let started = Instant::now();
        loop {
            assert!(
                started.elapsed() < give_up_after,
                "{device}: a batch was not acknowledged in {give_up_after:?}"
            );
            let answer = match http
                .post(&url)
                .header("content-type", "text/plain")
                .body(body.clone())
                .send()
                .await
            {
                Ok(resp) if resp.status() == 200 => resp.json::<Value>().await.ok(),
                _ => None,
            };
            match answer {
                Some(v) => {
                    for (id, r) in ids.iter().zip(v["results"].as_array().unwrap()) {
                        assert_eq!(r["id"].as_str(), Some(id.as_str()));
                        log.answers
                            .push((id.clone(), r["status"].as_str().unwrap().to_string()));
                    }
                    break;
                }
                None => {
                    log.attempts_unanswered += 1;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
        }
        log.sent.extend(ids);
    }
    log
}

/// Checks a finished run against the warehouse: every event sent is there exactly once,
/// nothing else is, no id was answered `accepted` twice, and each device's `seq` has no gap.
/// Returns (events, answered duplicate).
pub fn check_exactly_once(relay: &RelayProc, logs: &[SenderLog]) -> (usize, usize) {
    use std::collections::{HashMap, HashSet};
    let sent: HashSet<&str> = logs
        .iter()
        .flat_map(|l| l.sent.iter().map(String::as_str))
        .collect();
    let total_sent: usize = logs.iter().map(|l| l.sent.len()).sum();
    assert_eq!(sent.len(), total_sent, "test bug: ids must be unique");
    let mut accepted: HashMap<&str, usize> = HashMap::new();
    let mut duplicates = 0;
    for (id, status) in logs.iter().flat_map(|l| l.answers.iter()) {
        match status.as_str() {
            "accepted" => *accepted.entry(id).or_default() += 1,
            "duplicate" => duplicates += 1,
            other => panic!("event {id} answered {other}"),
        }
    }
    let twice: Vec<_> = accepted.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "ids answered `accepted` more than once (stored twice): {twice:?}"
    );

    let wh = relay.warehouse();
    let mut stmt = wh.prepare("SELECT id FROM events").unwrap();
    let stored: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let stored_set: HashSet<&str> = stored.iter().map(String::as_str).collect();
    assert_eq!(stored.len(), stored_set.len(), "an id is stored twice");
    let missing: Vec<_> = sent.difference(&stored_set).take(5).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events missing from the warehouse, e.g. {missing:?}",
        sent.difference(&stored_set).count()
    );
    let extra: Vec<_> = stored_set.difference(&sent).take(5).collect();
    assert!(
        extra.is_empty(),
        "events in the warehouse that were never sent: {extra:?}"
    );
    let gaps: i64 = wh
        .query_row(
            "SELECT coalesce(sum(mx - n), 0) FROM (SELECT device_id, max(seq) AS mx, count(*) AS n FROM events GROUP BY device_id)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(gaps, 0, "seq gaps: events lost");
    (stored.len(), duplicates)
}

/// `n` simulated agents (devices `dev-0`…) sending batches of 20 to `url` (see `agent_loop`).
pub struct Agents {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<SenderLog>>,
}

impl Agents {
    pub fn spawn(url: &str, n: usize) -> Agents {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handles = (0..n)
            .map(|i| {
                tokio::spawn(agent_loop(
                    url.to_string(),
                    format!("dev-{i}"),
                    20,
                    stop.clone(),
                    Duration::from_secs(60),
                ))
            })
            .collect();
        Agents { stop, handles }
    }

    /// Stops them after their batch in flight is acknowledged; waits at most 90 s.
    pub async fn finish(self) -> Vec<SenderLog> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut logs = Vec::new();
        for h in self.handles {
            logs.push(
                tokio::time::timeout(Duration::from_secs(90), h)
                    .await
                    .expect("agents finish")
                    .unwrap(),
            );
        }
        logs
    }
}
