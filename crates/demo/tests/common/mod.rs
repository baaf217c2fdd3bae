//! What the shop's integration tests share: the real `trueup-demo` binary on loopback, a
//! relay configured to trust it, and waiting for the warehouse.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{RelayProc, SERVER_SECRET, http_get};

/// The repository's `www/`.
pub fn www() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../www")
        .canonicalize()
        .unwrap()
}

/// The relay in `dir` with the example schemas, trusting proxies on loopback, plus `extra`
/// TOML (top-level keys only; pass `rate_limit` to replace the default one).
pub fn start_relay(dir: &Path, rate_limit: Option<&str>) -> RelayProc {
    let rate_limit = rate_limit.unwrap_or("per_ip_per_sec = 0\nper_site_per_sec = 0\n");
    RelayProc::start(
        dir,
        &format!(
            "schemas_file = \"{}\"\n[rate_limit]\ntrusted_proxies = [\"127.0.0.1/32\"]\n{rate_limit}",
            crate::relay_binary::example_schemas().display()
        ),
    )
}

/// A running `trueup-demo`.
pub struct Demo {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The relay's URL the shop uses, and the admin address of the relay it started (if it
    /// did), from its ready file.
    pub relay_url: String,
    pub relay_admin: Option<SocketAddr>,
    pub db: PathBuf,
    log: PathBuf,
}

impl Demo {
    /// Starts the shop in `dir` with `args` (its own `--listen` (port 0), `--ready-file`,
    /// `--db` and `--www` are set here) and waits until it answers.
    pub fn spawn(dir: &Path, args: &[&str]) -> Demo {
        let db = dir.join("demo.sqlite");
        let log = dir.join("demo.log");
        let ready_file = dir.join("demo.ready.json");
        let _ = std::fs::remove_file(&ready_file);
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_trueup-demo"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--ready-file")
            .arg(&ready_file)
            .arg("--db")
            .arg(&db)
            .arg("--www")
            .arg(www())
            .args(args)
            .env("TRUEUP_LOG", "info,tower_http=warn")
            .env_remove("TRUEUP_SERVER_SECRET")
            .current_dir(dir)
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("spawn trueup-demo");
        let mut demo = Demo {
            child: Some(child),
            addr: "127.0.0.1:0".parse().unwrap(),
            relay_url: String::new(),
            relay_admin: None,
            db,
            log,
        };
        demo.wait_ready_file(&ready_file, Duration::from_secs(40));
        demo.wait_ready(Duration::from_secs(40));
        demo
    }

    /// Waits for the shop's ready file and takes its addresses from it.
    fn wait_ready_file(&mut self, path: &Path, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "trueup-demo exited during start ({status}):\n{}",
                    self.log_text()
                );
            }
            if let Ok(text) = std::fs::read_to_string(path) {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                self.addr = v["listen"].as_str().unwrap().parse().unwrap();
                self.relay_url = v["relay"].as_str().unwrap().to_string();
                self.relay_admin = v["relay_admin"].as_str().map(|a| a.parse().unwrap());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "trueup-demo wrote no ready file in {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The shop in front of `relay`, with the relay's test secret.
    pub fn start(dir: &Path, relay: &RelayProc, extra: &[&str]) -> Demo {
        let relay_url = relay.url("");
        let mut args = vec!["--relay", &relay_url, "--server-secret", SERVER_SECRET];
        args.extend_from_slice(extra);
        Demo::spawn(dir, &args)
    }

    fn wait_ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "trueup-demo exited during start ({status}):\n{}",
                    self.log_text()
                );
            }
            if http_get(self.addr, "/api/healthz").is_ok_and(|(s, _)| s == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "trueup-demo not ready in {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends `signal` and waits (at most `within`) for the exit.
    pub fn signal_and_wait(&mut self, signal: i32, within: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "trueup-demo did not exit in {within:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(&self.db).unwrap()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `sql` (a count) on `conn()` until it is `expected` or `within` passed; returns the
/// last count.
pub fn wait_count(
    conn: impl Fn() -> rusqlite::Connection,
    sql: &str,
    params: &[&dyn rusqlite::ToSql],
    expected: i64,
    within: Duration,
) -> i64 {
    let deadline = Instant::now() + within;
    loop {
        let n: i64 = conn().query_row(sql, params, |r| r.get(0)).unwrap();
        if n == expected || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}
