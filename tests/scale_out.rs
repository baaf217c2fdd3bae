//! The distributed path, for real: two relays behind a round-robin balancer (written here),
//! each writing to a log through its sink, one loader (`trueup-relay load`) consuming the log
//! into the warehouse. Every scenario runs on both logs: a Kafka-protocol broker (tansu,
//! `TRUEUP_TANSU`, which `.ci/tansu` fetches; `kafka` sinks, the loader in a consumer group)
//! and NATS JetStream (Debian's `nats-server -js`; `nats` sinks, a durable pull consumer). The
//! warehouse is (PostgreSQL at `TRUEUP_TEST_POSTGRES` when set, a
//! schema of the test's own; else the SQLite warehouse). Agents send through the balancer
//! and retry until answered; one fault per test. Each asserts that every acknowledged id is
//! in the warehouse exactly once, nothing else is, no device has a `seq` gap, and the
//! loader's counts add up (stored + duplicates absorbed = events it read).
//!
//! Without `TRUEUP_TANSU` (or `nats-server` on the PATH) those tests say so and pass, as the
//! PostgreSQL ones do without their server; `.ci/run` provides both.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Agents, RelayProc, SenderLog, http_get};
use tokio::net::{TcpListener, TcpStream};

fn tansu_bin() -> Option<PathBuf> {
    match std::env::var_os("TRUEUP_TANSU") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("TRUEUP_TANSU not set (export TRUEUP_TANSU=$(.ci/tansu)): skipped");
            None
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum LogKind {
    Kafka,
    Nats,
}

/// The log on loopback: a tansu broker (in-memory storage) or a NATS server with JetStream
/// (file storage in the test's directory).
struct Broker {
    child: Child,
    addr: SocketAddr,
    kind: LogKind,
}

impl Broker {
    fn start_kind(kind: LogKind, dir: &Path) -> Option<Broker> {
        match kind {
            LogKind::Kafka => Some(Broker::start(&tansu_bin()?, dir)),
            LogKind::Nats => Broker::start_nats(dir),
        }
    }

    /// `nats-server` binds port 0 (`-p -1`) and logs the port it got.
    fn start_nats(dir: &Path) -> Option<Broker> {
        let log_path = dir.join("nats.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-sd"])
            .arg(dir.join("nats-store"))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn();
        let Ok(mut child) = child else {
            eprintln!("nats-server not found (apt-get install nats-server): skipped");
            return None;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(addr) = text
                .lines()
                .find_map(|l| l.split("Listening for client connections on ").nth(1))
                .and_then(|a| a.trim().parse().ok())
            {
                return Some(Broker {
                    child,
                    addr,
                    kind: LogKind::Nats,
                });
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "nats-server exited:\n{text}"
            );
            assert!(
                Instant::now() < deadline,
                "nats-server not listening in 10 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The relays' `[[sinks]]` lines for this log.
    fn sink_toml(&self) -> String {
        match self.kind {
            LogKind::Kafka => format!("kind = \"kafka\"\nbrokers = \"{}\"\n", self.addr),
            LogKind::Nats => format!("kind = \"nats\"\nurl = \"nats://{}\"\n", self.addr),
        }
    }

    /// The `[loader]` lines for this log.
    fn loader_toml(&self) -> String {
        match self.kind {
            LogKind::Kafka => format!(
                "brokers = \"{}\"\nproperties = {{ \"session.timeout.ms\" = \"6000\", \"max.poll.interval.ms\" = \"10000\" }}\n",
                self.addr
            ),
            LogKind::Nats => format!(
                "from = \"nats\"\nurl = \"nats://{}\"\nack_wait_secs = 5\n",
                self.addr
            ),
        }
    }

    /// Tansu takes its port on the command line and must advertise the same one, so it
    /// cannot report a port 0: it is started on a random port and, if that port is taken
    /// (it then exits), started again on another. Nothing is reserved ahead of time.
    fn start(bin: &Path, dir: &Path) -> Broker {
        for attempt in 0..20 {
            let port = 20_000 + (rand_u32() % 40_000) as u16;
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let log = std::fs::File::create(dir.join(format!("tansu-{attempt}.log"))).unwrap();
            let url = format!("tcp://{addr}");
            let mut child = Command::new(bin)
                .args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &url,
                ])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .spawn()
                .expect("spawn tansu");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break; // most likely the port was taken: another one
                }
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Broker {
                        child,
                        addr,
                        kind: LogKind::Kafka,
                    };
                }
                assert!(Instant::now() < deadline, "tansu not listening in 10 s");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("tansu did not start on any of 20 ports");
    }

    fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    t ^ std::process::id().wrapping_mul(2_654_435_761)
}

/// A round-robin TCP balancer on loopback: each connection goes to the next backend; a
/// backend that refuses is skipped (as a balancer's passive health check does).
async fn balancer(backends: Vec<SocketAddr>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                continue;
            };
            let backends = backends.clone();
            let next = next.clone();
            tokio::spawn(async move {
                for _ in 0..backends.len() {
                    let b = backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
                    if let Ok(mut outbound) = TcpStream::connect(b).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Runs `f` on a thread of its own: the blocking PostgreSQL client starts a runtime, which
/// it may not do on one of the test's.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().unwrap())
}

/// Where the loader writes, and how the test reads it back.
enum Store {
    Postgres { url: String, schema: String },
    Sqlite(PathBuf),
}

impl Store {
    fn new(dir: &Path, name: &str) -> Store {
        match std::env::var("TRUEUP_TEST_POSTGRES") {
            Ok(url) => {
                let schema = format!("wh_scale_{name}_{}", std::process::id());
                off_runtime(|| {
                    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                    c.batch_execute(&format!(
                        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
                    ))
                    .unwrap();
                });
                let sep = if url.contains('?') { '&' } else { '?' };
                Store::Postgres {
                    url: format!("{url}{sep}options=-csearch_path%3D{schema}"),
                    schema,
                }
            }
            Err(_) => Store::Sqlite(dir.join("loader-data/warehouse.sqlite")),
        }
    }

    /// The `[loader]` lines that say where to write.
    fn loader_toml(&self, dir: &Path) -> String {
        match self {
            Store::Postgres { url, .. } => {
                let secret = dir.join("pg.secret");
                std::fs::write(&secret, url).unwrap();
                format!(
                    "to = \"postgres\"\nsecret_file = \"{}\"\n",
                    secret.display()
                )
            }
            Store::Sqlite(path) => format!("to = \"warehouse\"\npath = \"{}\"\n", path.display()),
        }
    }

    /// Every stored event id with how many times it is stored, and the seq gaps.
    fn stored(&self) -> (HashMap<String, usize>, i64) {
        let ids_sql = "SELECT id FROM events";
        let gaps_sql = "SELECT coalesce(sum(mx - n), 0) FROM (SELECT device_id, max(seq) AS mx, count(*) AS n FROM events GROUP BY device_id) AS d";
        let mut out = HashMap::new();
        match self {
            Store::Postgres { url, .. } => off_runtime(|| {
                let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
                let exists: bool = c
                    .query_one("SELECT to_regclass('events') IS NOT NULL", &[])
                    .unwrap()
                    .get(0);
                if !exists {
                    return (out, 0);
                }
                for r in c.query(ids_sql, &[]).unwrap() {
                    *out.entry(r.get::<_, String>(0)).or_default() += 1;
                }
                let gaps = c
                    .query_one(&format!("SELECT ({gaps_sql})::BIGINT"), &[])
                    .unwrap()
                    .get(0);
                (out, gaps)
            }),
            Store::Sqlite(path) => {
                let Ok(c) = rusqlite::Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                ) else {
                    return (out, 0);
                };
                let Ok(mut stmt) = c.prepare(ids_sql) else {
                    return (out, 0);
                };
                for id in stmt.query_map([], |r| r.get::<_, String>(0)).unwrap() {
                    *out.entry(id.unwrap()).or_default() += 1;
                }
                let gaps = c.query_row(gaps_sql, [], |r| r.get(0)).unwrap();
                (out, gaps)
            }
        }
    }
}

impl Store {
    /// Events whose stage times are missing or out of order.
    fn out_of_order_stages(&self) -> i64 {
        let sql = "SELECT count(*) FROM events WHERE logged_at IS NULL OR stored_at IS NULL \
                   OR NOT (ts <= received_at AND received_at <= logged_at AND logged_at <= stored_at)";
        match self {
            Store::Postgres { url, .. } => off_runtime(|| {
                let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
                c.query_one(sql, &[]).unwrap().get(0)
            }),
            Store::Sqlite(path) => rusqlite::Connection::open(path)
                .unwrap()
                .query_row(sql, [], |r| r.get(0))
                .unwrap(),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Store::Postgres { schema, .. } = self
            && let Ok(url) = std::env::var("TRUEUP_TEST_POSTGRES")
        {
            off_runtime(|| {
                if let Ok(mut c) = postgres::Client::connect(&url, postgres::NoTls) {
                    let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
                }
            });
        }
    }
}

/// A running loader process.
struct LoaderProc {
    child: Option<Child>,
    admin: SocketAddr,
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl LoaderProc {
    fn start(dir: &Path, broker: &Broker, store: &Store) -> LoaderProc {
        let config = dir.join("loader.toml");
        std::fs::write(
            &config,
            format!(
                "admin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n[loader]\nbatch_size = 500\nmax_wait_ms = 50\n{}{}",
                dir.join("loader-data").display(),
                store.loader_toml(dir),
                broker.loader_toml()
            ),
        )
        .unwrap();
        let mut l = LoaderProc {
            child: None,
            admin: "127.0.0.1:0".parse().unwrap(),
            dir: dir.to_path_buf(),
            config,
            log: dir.join("loader.log"),
        };
        l.spawn();
        l
    }

    fn spawn(&mut self) {
        let ready = self.dir.join("loader.ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_trueup-relay"))
            .arg("--config")
            .arg(&self.config)
            .arg("--ready-file")
            .arg(&ready)
            .arg("load")
            .env("TRUEUP_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn the loader");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                panic!("loader exited during start ({s}):\n{}", self.log_text());
            }
            if let Ok(text) = std::fs::read_to_string(&ready)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
                && v["pid"].as_u64() == Some(u64::from(child.id()))
            {
                self.admin = v["admin_listen"].as_str().unwrap().parse().unwrap();
                break;
            }
            assert!(
                Instant::now() < deadline,
                "loader not ready in 20 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and its exit status (within 20 s).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "loader did not exit 20 s after SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One counter's value (summed over its labels), 0 when absent.
    fn metric(&self, name: &str) -> f64 {
        let Ok((_, body)) = http_get(self.admin, "/metrics") else {
            return 0.0;
        };
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for LoaderProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The relays' sink: the broker's topic, small timeouts so that faults show quickly.
fn relay_toml(broker: &Broker, sink_extra: &str) -> String {
    format!(
        "[forwarder]\ninitial_backoff_ms = 50\nmax_backoff_ms = 500\n\n[[sinks]]\nname = \"log\"\n{}timeout_secs = 5\n{sink_extra}",
        broker.sink_toml()
    )
}

/// Two relays, the balancer over them, a loader; all on one broker.
struct Pipeline {
    _dir: tempfile::TempDir,
    broker: Broker,
    relays: [RelayProc; 2],
    loader: LoaderProc,
    store: Store,
    url: String,
}

async fn pipeline(kind: LogKind, name: &str) -> Option<Pipeline> {
    pipeline_with(kind, name, "").await
}

async fn pipeline_with(kind: LogKind, name: &str, sink_extra: &str) -> Option<Pipeline> {
    pipeline_on(kind, name, sink_extra, false).await
}

/// `sqlite`: the loader writes the SQLite warehouse even when PostgreSQL is there.
async fn pipeline_on(
    kind: LogKind,
    name: &str,
    sink_extra: &str,
    sqlite: bool,
) -> Option<Pipeline> {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_kind(kind, dir.path())?;
    let name = format!("{}_{name}", format!("{kind:?}").to_lowercase());
    let name = name.as_str();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let relays = [
        RelayProc::start(&a, &relay_toml(&broker, sink_extra)),
        RelayProc::start(&b, &relay_toml(&broker, sink_extra)),
    ];
    let lb = balancer(vec![relays[0].public, relays[1].public]).await;
    let store = if sqlite {
        Store::Sqlite(dir.path().join("loader-data/warehouse.sqlite"))
    } else {
        Store::new(dir.path(), name)
    };
    let loader = LoaderProc::start(dir.path(), &broker, &store);
    Some(Pipeline {
        url: format!("http://{lb}/_r/q"),
        _dir: dir,
        broker,
        relays,
        loader,
        store,
    })
}

impl Pipeline {
    /// Waits (at most 90 s) until every id in `ids` is in the warehouse, then checks that
    /// each is there exactly once, nothing else is, no device has a seq gap, and the loader
    /// read stored + duplicates events. Returns the loader's duplicates absorbed.
    fn check(&self, ids: &HashSet<String>) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(90);
        let (stored, gaps) = loop {
            let (stored, gaps) = self.store.stored();
            if ids.iter().all(|id| stored.contains_key(id)) {
                break (stored, gaps);
            }
            if Instant::now() > deadline {
                let missing = ids.iter().filter(|id| !stored.contains_key(*id)).count();
                panic!(
                    "{missing} of {} acknowledged events not in the warehouse after 90 s\nloader log:\n{}\nrelay a:\n{}\nrelay b:\n{}",
                    ids.len(),
                    self.loader.log_text(),
                    self.relays[0].log_text(),
                    self.relays[1].log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let twice: Vec<_> = stored.iter().filter(|(_, n)| **n > 1).take(5).collect();
        assert!(twice.is_empty(), "stored more than once: {twice:?}");
        let extra: Vec<_> = stored
            .keys()
            .filter(|id| !ids.contains(*id))
            .take(5)
            .collect();
        assert!(extra.is_empty(), "stored but never sent: {extra:?}");
        assert_eq!(gaps, 0, "seq gaps in the warehouse");
        // The loader's own accounting (a restarted loader counts from zero: at most all).
        let new = self.loader.metric("trueup_loader_stored_total") as usize;
        assert!(
            new <= ids.len(),
            "loader stored {new} > {} events",
            ids.len()
        );
        assert_eq!(
            self.loader.metric("trueup_loader_rejected_total"),
            0.0,
            "the loader skipped messages"
        );
        self.loader.metric("trueup_loader_duplicates_total") as u64
    }
}

fn acknowledged(logs: &[SenderLog]) -> HashSet<String> {
    let mut ids = HashSet::new();
    for (id, status) in logs.iter().flat_map(|l| l.answers.iter()) {
        assert!(
            status == "accepted" || status == "duplicate",
            "event {id} answered {status}"
        );
        ids.insert(id.clone());
    }
    let sent: usize = logs.iter().map(|l| l.sent.len()).sum();
    assert_eq!(ids.len(), sent, "every sent event was answered");
    ids
}

async fn relay_killed(kind: LogKind) {
    let Some(mut p) = pipeline(kind, "kill_relay").await else {
        return;
    };
    let agents = Agents::spawn(&p.url, 6);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // kill -9: what it acknowledged is in its spool; the agents' retries go to the other.
    p.relays[0].kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let logs = agents.finish().await;
    // Back up, it forwards what it had spooled.
    p.relays[0].restart();
    let ids = acknowledged(&logs);
    assert!(ids.len() > 200, "enough traffic: {}", ids.len());
    let retried: u64 = logs.iter().map(|l| l.attempts_unanswered).sum();
    let dups = p.check(&ids);
    eprintln!(
        "kill -9 a relay: {} events, {retried} unanswered attempts retried, {dups} duplicates absorbed by the loader",
        ids.len()
    );
}

async fn log_down(kind: LogKind) {
    let Some(p) = pipeline(kind, "broker_down").await else {
        return;
    };
    let agents = Agents::spawn(&p.url, 4);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    p.broker.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during_a = p.relays[0].metric("trueup_events_accepted_total")
        + p.relays[1].metric("trueup_events_accepted_total");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during_b = p.relays[0].metric("trueup_events_accepted_total")
        + p.relays[1].metric("trueup_events_accepted_total");
    let backlog =
        p.relays[0].metric("trueup_spool_depth") + p.relays[1].metric("trueup_spool_depth");
    p.broker.signal(libc::SIGCONT);
    let down = stopped.elapsed();
    let logs = agents.finish().await;
    assert!(
        during_b > during_a,
        "the relays kept accepting while the broker was down ({during_a} -> {during_b})"
    );
    assert!(backlog > 0.0, "what they accepted waited in their spools");
    let ids = acknowledged(&logs);
    let dups = p.check(&ids);
    eprintln!(
        "broker down {down:?}: {} events, {} accepted while down, spool backlog {backlog} at the end of the outage, {dups} duplicates absorbed",
        ids.len(),
        during_b - during_a
    );
}

async fn loader_killed(kind: LogKind) {
    let Some(mut p) = pipeline(kind, "kill_loader").await else {
        return;
    };
    let agents = Agents::spawn(&p.url, 6);
    // Kill it as soon as it has stored something (it is mid-stream, likely mid-batch).
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.loader.metric("trueup_loader_stored_total") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "loader stored nothing in 30 s:\n{}",
            p.loader.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.loader.kill9();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    p.loader.spawn();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let logs = agents.finish().await;
    let ids = acknowledged(&logs);
    let dups = p.check(&ids);
    eprintln!(
        "kill -9 the loader: {} events, {dups} duplicates absorbed after the restart",
        ids.len()
    );
}

async fn retry_to_the_other_relay(kind: LogKind) {
    let Some(mut p) = pipeline(kind, "retry_other").await else {
        return;
    };
    let http = support::client();
    let events: Vec<Value> = (1..=50)
        .map(|seq| support::event("dev-retry", seq))
        .collect();
    let ids: HashSet<String> = events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    let body = support::batch(&events);
    let send = |url: String| {
        let http = http.clone();
        let body = body.clone();
        async move {
            let r = http
                .post(url)
                .header("content-type", "text/plain")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let first = send(p.relays[0].collect_url()).await;
    assert_eq!(first["accepted"], 50);
    p.check(&ids);
    // The same batch again, on purpose to the other relay (as a retry whose first answer was
    // lost, balanced elsewhere): that relay has never seen it and accepts it.
    let second = send(p.relays[1].collect_url()).await;
    assert_eq!(second["accepted"], 50, "{second}");
    // Kafka keeps both copies and the loader absorbs the second; JetStream drops it on
    // `Nats-Msg-Id` within the stream's duplicate window (the other relay counts it).
    let (who, metric, absorbed_by) = match kind {
        LogKind::Kafka => ("loader", "trueup_loader_duplicates_total", &p.loader.admin),
        LogKind::Nats => ("stream", "trueup_nats_duplicates_total", &p.relays[1].admin),
    };
    let count = |addr: &SocketAddr| -> f64 {
        let (_, body) = http_get(*addr, "/metrics").unwrap_or_default();
        body.lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(metric))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(absorbed_by) < 50.0 {
        assert!(
            Instant::now() < deadline,
            "the {who} did not absorb the 50 duplicates:\n{}",
            p.loader.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count(absorbed_by), 50.0);
    let loader_dups = p.check(&ids);
    assert_eq!(loader_dups, if kind == LogKind::Kafka { 50 } else { 0 });
    assert_eq!(p.loader.metric("trueup_loader_stored_total"), 50.0);
    // Each stage's time is stored with the event, in order: captured, received by the relay,
    // taken by the log, stored by the loader.
    assert_eq!(p.store.out_of_order_stages(), 0);

    // Freshness per stage, as p50/p95 over the last minute: the relays' stages and the
    // loader's.
    let quantiles = |addr: SocketAddr, stage: &str| -> Vec<f64> {
        let (_, body) = http_get(addr, "/metrics").unwrap();
        ["0.5", "0.95"]
            .iter()
            .map(|q| {
                let key =
                    format!("trueup_pipeline_lag_seconds{{stage=\"{stage}\",quantile=\"{q}\"}} ");
                let line = body
                    .lines()
                    .find(|l| l.starts_with(&key))
                    .unwrap_or_else(|| panic!("no {key} in\n{body}"));
                line[key.len()..].parse().unwrap()
            })
            .collect()
    };
    for (addr, stage) in [
        (p.relays[0].admin, "capture_to_accepted"),
        (p.relays[0].admin, "accepted_to_log"),
        (p.loader.admin, "log_to_warehouse"),
        (p.loader.admin, "capture_to_warehouse"),
    ] {
        let q = quantiles(addr, stage);
        assert!(
            q[0] >= 0.0 && q[0] <= q[1] && q[1] < 60.0,
            "{stage}: p50 {} p95 {}",
            q[0],
            q[1]
        );
    }
    // Stopped the way an orchestrator stops it: it finishes, and exits cleanly.
    let status = p.loader.terminate();
    assert!(
        status.success(),
        "loader exit on SIGTERM: {status}\n{}",
        p.loader.log_text()
    );
}

async fn too_large(kind: LogKind) {
    let Some(p) = pipeline_with(kind, "too_large", "max_event_bytes = 1000\n").await else {
        return;
    };
    let mut events: Vec<Value> = (1..=4).map(|seq| support::event("dev-big", seq)).collect();
    events[1]["props"]["blob"] = serde_json::json!("x".repeat(2000));
    let big = events[1]["id"].as_str().unwrap().to_string();
    let small: HashSet<String> = events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .filter(|id| *id != big)
        .collect();
    let r = support::client()
        .post(p.relays[0].collect_url())
        .header("content-type", "text/plain")
        .body(support::batch(&events))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(
        answer["accepted"], 4,
        "the relay takes it: only the log cannot"
    );
    // The three others reach the warehouse (seq 2 is missing there: a counted loss)...
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (stored, _) = p.store.stored();
        if small.iter().all(|id| stored.contains_key(id)) {
            assert!(!stored.contains_key(&big));
            assert_eq!(stored.len(), 3);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the small events were not loaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and the large one is in the relay's dead letters, with the sink and the reason.
    let spool = p.relays[0].spool_db();
    let (reason, detail, sink): (String, String, String) = spool
        .query_row(
            "SELECT reason, detail, sink FROM dead_letter WHERE event_id = ?1",
            [&big],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((reason.as_str(), sink.as_str()), ("too_large", "log"));
    assert!(detail.contains("max_event_bytes 1000"), "{detail}");
}

/// The backend's path: the emitter (`trueup-emitter`) sends facts through the balancer while
/// a relay is killed; some facts are emitted twice (a backend retrying its own work). Each
/// fact is in the warehouse once.
async fn emitter_through_the_balancer(kind: LogKind) {
    use trueup_emitter::{Config, Emitter, ServerEvent};
    let Some(mut p) = pipeline(kind, "emitter").await else {
        return;
    };
    let base = p.url.trim_end_matches("/_r/q").to_string();
    let mut cfg = Config::new(base, "demo", support::SERVER_SECRET);
    cfg.initial_backoff = Duration::from_millis(50);
    cfg.max_backoff = Duration::from_millis(500);
    cfg.max_batch_delay = Duration::from_millis(20);
    let em = Emitter::new(cfg).unwrap();
    let mut ids = HashSet::new();
    let ts = support::now_ms();
    for i in 0..3000 {
        if i == 1000 {
            p.relays[0].kill9();
        }
        if i == 2000 {
            p.relays[0].restart();
        }
        let fact = || {
            ServerEvent::new("export_finished", format!("export-{i}"), ts)
                .schema("event/1")
                .user_id(format!("user-{}", i % 50))
        };
        ids.insert(em.emit(fact()).unwrap().to_string());
        if i % 10 == 0 {
            // The same fact again: the same id, derived from the fact.
            assert!(ids.contains(&em.emit(fact()).unwrap().to_string()));
        }
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    em.flush(Duration::from_secs(60))
        .await
        .expect("every fact acknowledged");
    let s = em.stats();
    assert_eq!((s.failed, s.rejected), (0, 0), "{s:?}");
    assert_eq!(ids.len(), 3000);
    let dups = p.check(&ids);
    eprintln!(
        "emitter through the balancer, a relay killed: 3000 facts (300 emitted twice), {dups} duplicates absorbed by the loader, stats {s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_server_facts_from_the_emitter_are_stored_once_while_a_relay_dies() {
    emitter_through_the_balancer(LogKind::Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_server_facts_from_the_emitter_are_stored_once_while_a_relay_dies() {
    emitter_through_the_balancer(LogKind::Nats).await;
}

/// The warehouse unavailable for 8 s (another writer holds its lock): the loader's writes
/// fail, it says so on /readyz, holds its batch and commits nothing; after, every event is
/// stored once.
async fn warehouse_unavailable(kind: LogKind) {
    let Some(p) = pipeline_on(kind, "wh_down", "", true).await else {
        return;
    };
    let Store::Sqlite(path) = &p.store else {
        unreachable!()
    };
    let agents = Agents::spawn(&p.url, 4);
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.loader.metric("trueup_loader_stored_total") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "nothing stored:\n{}",
            p.loader.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lock = rusqlite::Connection::open(path).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let locked = Instant::now();
    let mut saw_unready = false;
    // Longer than the SQLite busy timeout (5 s), so writes fail rather than only wait.
    while locked.elapsed() < Duration::from_secs(8) {
        if http_get(p.loader.admin, "/readyz").is_ok_and(|(s, _)| s == 503) {
            saw_unready = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let errors = p.loader.metric("trueup_loader_write_errors_total");
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    let logs = agents.finish().await;
    assert!(
        errors > 0.0,
        "the loader's writes failed while the warehouse was locked"
    );
    assert!(saw_unready, "/readyz said so");
    let ids = acknowledged(&logs);
    let dups = p.check(&ids);
    assert_eq!(http_get(p.loader.admin, "/readyz").unwrap().0, 200);
    eprintln!(
        "warehouse locked 8 s: {} events, {errors} failed writes retried, {dups} duplicates",
        ids.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_the_warehouse_unavailable_holds_the_batch_and_commits_nothing() {
    warehouse_unavailable(LogKind::Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_the_warehouse_unavailable_holds_the_batch_and_commits_nothing() {
    warehouse_unavailable(LogKind::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_a_relay_killed_mid_stream_loses_nothing_and_doubles_nothing() {
    relay_killed(LogKind::Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_a_relay_killed_mid_stream_loses_nothing_and_doubles_nothing() {
    relay_killed(LogKind::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_the_broker_down_for_ten_seconds_the_relays_keep_accepting_and_drain_after() {
    log_down(LogKind::Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_the_broker_down_for_ten_seconds_the_relays_keep_accepting_and_drain_after() {
    log_down(LogKind::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_the_loader_killed_mid_batch_stores_each_event_once() {
    loader_killed(LogKind::Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_the_loader_killed_mid_batch_stores_each_event_once() {
    loader_killed(LogKind::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_a_retry_that_reaches_the_other_relay_is_stored_once_and_counted() {
    retry_to_the_other_relay(LogKind::Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_a_retry_that_reaches_the_other_relay_is_stored_once_and_counted() {
    retry_to_the_other_relay(LogKind::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_an_event_too_large_for_the_log_is_dead_lettered_with_its_reason() {
    too_large(LogKind::Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_an_event_too_large_for_the_log_is_dead_lettered_with_its_reason() {
    too_large(LogKind::Nats).await;
}
