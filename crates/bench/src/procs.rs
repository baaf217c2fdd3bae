//! The servers under test, run as child processes on loopback: the relay (fresh data
//! directory, rate limits off), the nginx baseline, and for the pipeline part the log (tansu
//! or nats-server) and the loader (`trueup-relay load`). Each lives in a temporary
//! directory, and is killed if the benchmark stops early.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use hyper::StatusCode;
use tokio::time::Instant;

use crate::load;

/// Waits for a ready file (the relay's `{"listen": …, "admin_listen": …}`, the loader's
/// `{"admin_listen": …, "pid": …}`: they bind port 0 and say which ports they got) and returns
/// its JSON.
async fn wait_ready_file(
    child: &mut ChildGuard,
    path: &Path,
    timeout: Duration,
    log: &Path,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.exited() {
            bail!(
                "{} exited during start ({status}):\n{}",
                child.name,
                tail(log, 20)
            );
        }
        if let Ok(text) = std::fs::read_to_string(path) {
            return serde_json::from_str(&text).with_context(|| format!("ready file {text:?}"));
        }
        if Instant::now() > deadline {
            bail!(
                "{} wrote no ready file in {timeout:?}:\n{}",
                child.name,
                tail(log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An address from a ready file.
fn ready_addr(v: &serde_json::Value, key: &str) -> anyhow::Result<SocketAddr> {
    v[key]
        .as_str()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("ready file {v}: no {key}"))
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    stat_cpu_time(&format!("/proc/{pid}/stat"))
}

/// CPU time (user + system) one thread of a process has used so far.
pub fn task_cpu_time(pid: u32, tid: u32) -> Option<Duration> {
    stat_cpu_time(&format!("/proc/{pid}/task/{tid}/stat"))
}

fn stat_cpu_time(path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may contain spaces; the fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// CPU time the whole machine has been busy (every CPU, anything but idle and I/O wait)
/// since boot, from `/proc/stat`.
pub fn machine_busy_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is within user).
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| fields.get(i))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| Duration::from_secs_f64(busy as f64 / hz as f64))
}

/// CPU time of a process and its direct children (nginx's master and its workers).
pub fn tree_cpu_time(pid: u32) -> Option<Duration> {
    let own = cpu_time(pid)?;
    Some(
        child_pids(pid)
            .into_iter()
            .filter_map(cpu_time)
            .fold(own, |total, c| total + c),
    )
}

/// The direct children of a process (those of its main thread).
pub fn child_pids(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect()
}

/// The parent of a process, from `/proc/<pid>/stat`.
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the name: state, then the parent's pid.
    stat[stat.rfind(')')? + 2..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A binary on `PATH`, else in the usual sbin and local folders (often not on a user's
/// `PATH`), else in `extra`.
pub fn find_binary(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(
            ["/usr/sbin", "/usr/local/sbin", "/usr/local/bin"]
                .iter()
                .chain(extra)
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The value of a series in Prometheus' text format, summed over every series of that name
/// whose labels include `labels` (`None`: no such series).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (series, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue, // a longer name
        };
        let has = |(k, v): &(&str, &str)| {
            series.split(',').any(|kv| {
                kv.split_once('=').is_some_and(|(key, quoted)| {
                    key == *k
                        && quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"')) == Some(*v)
                })
            })
        };
        if labels.iter().all(has)
            && let Ok(v) = value.trim().parse::<f64>()
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// A child process that is stopped if dropped while still running.
struct ChildGuard {
    child: Child,
    name: &'static str,
}

impl ChildGuard {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the child has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends SIGTERM and waits up to `grace` for the exit; then SIGKILL. Returns the exit
    /// status and whether SIGKILL was needed.
    fn terminate(&mut self, grace: Duration) -> anyhow::Result<(ExitStatus, bool)> {
        if let Some(status) = self.exited() {
            return Ok((status, false));
        }
        signal(self.pid(), libc::SIGTERM);
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Ok((status, false));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill().ok();
        let status = self
            .child
            .wait()
            .with_context(|| format!("wait {}", self.name))?;
        Ok((status, true))
    }
}

impl Drop for ChildGuard {
    /// The benchmark stopped early: SIGTERM first (nginx's master stops its workers only
    /// then), SIGKILL if that is not enough.
    fn drop(&mut self) {
        let _ = self.terminate(Duration::from_secs(3));
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own live child.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// The last `lines` lines of a log file, for error messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Polls `GET path` until it answers `want`, for at most `timeout`; fails early if the child
/// exits.
async fn wait_for(
    child: &mut ChildGuard,
    addr: SocketAddr,
    path: &str,
    want: StatusCode,
    timeout: Duration,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        if let Some(status) = child.exited() {
            bail!(
                "{} exited during start-up ({status}); last lines of {}:\n{}",
                child.name,
                log.display(),
                tail(log, 20)
            );
        }
        match load::get(addr, path).await {
            Ok((status, _)) if status == want => return Ok(()),
            Ok((status, body)) => {
                last = format!("{status}: {}", String::from_utf8_lossy(&body).trim());
            }
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "{} not ready after {} s (GET http://{addr}{path}: {last}); last lines of {}:\n{}",
        child.name,
        timeout.as_secs(),
        log.display(),
        tail(log, 20)
    )
}

/// The relay's configuration for the benchmark: defaults (fsync on, site `demo`) with the
/// rate limits off, since the load comes from one IP and one site.
const RELAY_CONFIG: &str = "\
# Written by trueup-bench: defaults, rate limits off (all load comes from one IP and site).
[rate_limit]
per_ip_per_sec = 0
per_site_per_sec = 0
";

/// The relay under test.
pub struct RelayProc {
    child: ChildGuard,
    dir: tempfile::TempDir,
    log: PathBuf,
    /// The public listener.
    pub addr: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
}

/// One sink in the relay's `GET /sinks`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SinkStatus {
    /// Its configured name.
    pub name: String,
    /// Records spooled that it has not taken yet.
    pub backlog_rows: u64,
    /// Records it delivered since the relay started.
    pub delivered: u64,
    /// Failed delivery attempts since the relay started.
    pub retries: u64,
    /// Records it dead-lettered since the relay started.
    pub dead_lettered: u64,
}

/// How to start a relay: what to add to the benchmark's config, and where.
#[derive(Debug, Default)]
pub struct RelaySetup {
    /// Appended to the config (e.g. `[[sinks]]` tables).
    pub extra_config: String,
    /// The directory (config, log, `data/`) of an earlier relay to start again on its spool;
    /// `None`: a fresh temporary directory.
    pub dir: Option<tempfile::TempDir>,
    /// Names the config and log files (`relay[-<label>].toml`, `.log`), so that a relay
    /// started again in the same directory keeps the earlier log.
    pub label: &'static str,
}

impl RelayProc {
    /// Starts `bin` with a fresh data directory and waits until `/readyz` answers 200.
    pub async fn start(bin: &Path, ready_timeout: Duration) -> anyhow::Result<RelayProc> {
        RelayProc::start_with(bin, RelaySetup::default(), ready_timeout).await
    }

    /// Starts `bin` as `setup` says and waits until `/readyz` answers 200.
    pub async fn start_with(
        bin: &Path,
        setup: RelaySetup,
        ready_timeout: Duration,
    ) -> anyhow::Result<RelayProc> {
        let dir = match setup.dir {
            Some(d) => d,
            None => tempfile::Builder::new()
                .prefix("trueup-bench-relay-")
                .tempdir()
                .context("cannot create a temporary directory")?,
        };
        let stem = if setup.label.is_empty() {
            "relay".to_string()
        } else {
            format!("relay-{}", setup.label)
        };
        let config = dir.path().join(format!("{stem}.toml"));
        std::fs::write(&config, format!("{RELAY_CONFIG}{}", setup.extra_config))
            .context("cannot write the relay config")?;
        let log = dir.path().join(format!("{stem}.log"));
        let out = File::create(&log).context("cannot create the relay log")?;
        let ready_file = dir.path().join("relay.ready.json");
        // A relay started again in this directory: the earlier ready file is stale.
        let _ = std::fs::remove_file(&ready_file);
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .arg("--ready-file")
            .arg(&ready_file)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        measured_env(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut child = ChildGuard {
            child,
            name: "trueup-relay",
        };
        let ready = wait_ready_file(&mut child, &ready_file, ready_timeout, &log).await?;
        let (addr, admin) = (
            ready_addr(&ready, "listen")?,
            ready_addr(&ready, "admin_listen")?,
        );
        let mut relay = RelayProc {
            child,
            dir,
            log,
            addr,
            admin,
        };
        wait_for(
            &mut relay.child,
            admin,
            "/readyz",
            StatusCode::OK,
            ready_timeout,
            &relay.log,
        )
        .await?;
        Ok(relay)
    }

    /// The relay's process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The temporary directory (config, log, data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The relay's log file.
    pub fn log(&self) -> PathBuf {
        self.log.clone()
    }

    /// Whether the relay is still running (and if not, how it ended).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.exited()
    }

    /// The last lines of the relay's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log(), lines)
    }

    /// The admin `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        get_metrics(self.admin).await
    }

    /// `trueup_spool_depth` from the admin `/metrics`.
    pub async fn spool_depth(&self) -> anyhow::Result<u64> {
        let depth = metric(&self.metrics().await?, "trueup_spool_depth", &[])
            .context("/metrics has no trueup_spool_depth")?;
        Ok(depth as u64)
    }

    /// Polls the spool depth until it is 0 (everything forwarded to the warehouse), for at
    /// most `timeout`. Returns the last depth seen and how long it took.
    pub async fn wait_drained(&self, timeout: Duration) -> anyhow::Result<(u64, Duration)> {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            let depth = self.spool_depth().await?;
            if depth == 0 || Instant::now() >= deadline {
                return Ok((depth, started.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Peak resident set size so far (`VmHWM`), bytes.
    pub fn peak_rss_bytes(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.child.pid());
        let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .with_context(|| format!("{path} has no VmHWM"))?;
        let kib: u64 = line
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("VmHWM {line:?}"))?;
        Ok(kib * 1024)
    }

    /// Rows in the warehouse's `events` table (read-only, while the relay runs).
    pub fn warehouse_rows(&self) -> anyhow::Result<u64> {
        let path = self.dir.path().join("data").join("warehouse.sqlite");
        let conn = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("open {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let n: i64 = conn
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
            .with_context(|| format!("count the events in {}", path.display()))?;
        Ok(n as u64)
    }

    /// SIGTERM, then waits up to `grace` (SIGKILL after). Returns the exit status and whether
    /// SIGKILL was needed.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<(ExitStatus, bool)> {
        self.child.terminate(grace)
    }

    /// Keeps the temporary directory after the benchmark (call after [`RelayProc::stop`]);
    /// returns its path.
    pub fn keep(self) -> PathBuf {
        self.into_dir().keep()
    }

    /// The temporary directory, to start another relay on the same spool (call after
    /// [`RelayProc::stop`]).
    pub fn into_dir(self) -> tempfile::TempDir {
        let RelayProc { dir, .. } = self;
        dir
    }

    /// The sinks as `GET /sinks` on the admin listener reports them.
    pub async fn sinks(&self) -> anyhow::Result<Vec<SinkStatus>> {
        #[derive(serde::Deserialize)]
        struct Sinks {
            sinks: Vec<SinkStatus>,
        }
        let (status, body) = load::get(self.admin, "/sinks").await?;
        anyhow::ensure!(status == StatusCode::OK, "GET /sinks answered {status}");
        let s: Sinks = serde_json::from_slice(&body).context("GET /sinks: unexpected JSON")?;
        Ok(s.sinks)
    }
}

/// `GET /metrics` on an admin listener, as text.
pub async fn get_metrics(admin: SocketAddr) -> anyhow::Result<String> {
    let (status, body) = load::get(admin, "/metrics").await?;
    anyhow::ensure!(status == StatusCode::OK, "GET /metrics answered {status}");
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Which log the pipeline part runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogKind {
    /// A Kafka-protocol broker: tansu (in-memory storage).
    Kafka,
    /// NATS JetStream: `nats-server -js` (file storage).
    Nats,
}

impl LogKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LogKind::Kafka => "kafka",
            LogKind::Nats => "nats",
        }
    }
}

/// The log under test on loopback, in the caller's directory.
pub struct LogProc {
    child: ChildGuard,
    log: PathBuf,
    /// Where clients connect.
    pub addr: SocketAddr,
    /// What `--version` printed.
    pub version: String,
}

/// How many random ports tansu is tried on.
const TANSU_ATTEMPTS: usize = 20;

impl LogProc {
    /// Starts tansu (`bin`) with in-memory storage. Tansu takes its port on the command line
    /// and must advertise the same one, so it cannot be given port 0: it is started on a
    /// random port and, if that port turns out to be taken (it then exits), on another.
    pub async fn start_tansu(bin: &Path, dir: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let version = version_of(bin);
        for attempt in 0..TANSU_ATTEMPTS {
            let port = 20_000 + (random_u64() % 40_000) as u16;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            // Skips a port that is plainly in use; nothing is held for tansu.
            if TcpListener::bind(addr).is_err() {
                continue;
            }
            let log = dir.join(format!("tansu-{attempt}.log"));
            let out = File::create(&log).context("cannot create the tansu log")?;
            let url = format!("tcp://{addr}");
            let child = Command::new(bin)
                .args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &url,
                    "--storage-engine",
                    "memory://tansu/",
                ])
                .env("RUST_LOG", "warn")
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
                .with_context(|| format!("cannot start {}", bin.display()))?;
            let mut child = ChildGuard {
                child,
                name: "tansu",
            };
            let deadline = Instant::now() + timeout;
            let up = loop {
                if child.exited().is_some() {
                    break false; // most likely the port was taken: another one
                }
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    // Another program on that port would answer too: tansu must still run.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break child.exited().is_none();
                }
                if Instant::now() > deadline {
                    bail!(
                        "tansu not listening on {addr} after {timeout:?}:\n{}",
                        tail(&log, 20)
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            if up {
                return Ok(LogProc {
                    child,
                    log,
                    addr,
                    version,
                });
            }
        }
        bail!("tansu did not start on any of {TANSU_ATTEMPTS} random ports")
    }

    /// Starts `nats-server -js` on a port of the kernel's choosing (`-p -1`), storing the
    /// streams under `dir`; the port is read from its log.
    pub async fn start_nats(bin: &Path, dir: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let version = version_of(bin);
        let log = dir.join("nats-server.log");
        let out = File::create(&log).context("cannot create the nats-server log")?;
        let child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-sd"])
            .arg(dir.join("nats-store"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut child = ChildGuard {
            child,
            name: "nats-server",
        };
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(addr) = text
                .lines()
                .find_map(|l| l.split("Listening for client connections on ").nth(1))
                .and_then(|a| a.trim().parse().ok())
            {
                return Ok(LogProc {
                    child,
                    log,
                    addr,
                    version,
                });
            }
            if let Some(status) = child.exited() {
                bail!(
                    "nats-server exited during start ({status}):\n{}",
                    tail(&log, 20)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "nats-server not listening after {timeout:?}:\n{}",
                    tail(&log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Whether it is still running (and if not, how it ended).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.exited()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// SIGTERM, then waits up to `grace` (SIGKILL after).
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<(ExitStatus, bool)> {
        self.child.terminate(grace)
    }
}

/// The first line `bin --version` prints (`?` if it cannot be run).
fn version_of(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines().next().map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

/// Random enough for picking a port: the standard library's per-process random hash keys.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The loader under test (`trueup-relay load`), with its config and log in the caller's
/// directory.
pub struct LoaderProc {
    child: ChildGuard,
    log: PathBuf,
    /// Its admin listener (`/readyz`, `/metrics`).
    pub admin: SocketAddr,
}

impl LoaderProc {
    /// Writes `config` (which must set `admin_listen = "127.0.0.1:0"`), starts `bin load` on
    /// it and waits until `/readyz` answers 200.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        config: &str,
        ready_timeout: Duration,
    ) -> anyhow::Result<LoaderProc> {
        let config_path = dir.join("loader.toml");
        std::fs::write(&config_path, config).context("cannot write the loader config")?;
        let log = dir.join("loader.log");
        let out = File::create(&log).context("cannot create the loader log")?;
        let ready_file = dir.join("loader.ready.json");
        let _ = std::fs::remove_file(&ready_file);
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(&config_path)
            .arg("--ready-file")
            .arg(&ready_file)
            .arg("load")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TRUEUP_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("NO_COLOR", "1");
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {} load", bin.display()))?;
        let mut child = ChildGuard {
            child,
            name: "trueup-relay load",
        };
        let ready = wait_ready_file(&mut child, &ready_file, ready_timeout, &log).await?;
        anyhow::ensure!(
            ready["pid"].as_u64() == Some(u64::from(child.pid())),
            "the loader's ready file {ready} names another process"
        );
        let admin = ready_addr(&ready, "admin_listen")?;
        let mut loader = LoaderProc { child, log, admin };
        wait_for(
            &mut loader.child,
            admin,
            "/readyz",
            StatusCode::OK,
            ready_timeout,
            &loader.log,
        )
        .await?;
        Ok(loader)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Whether it is still running (and if not, how it ended).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.exited()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// The admin `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        get_metrics(self.admin).await
    }

    /// `trueup_loader_stored_total`: events stored that were not in the warehouse yet (0
    /// before the first write).
    pub async fn stored(&self) -> anyhow::Result<u64> {
        Ok(metric(&self.metrics().await?, "trueup_loader_stored_total", &[]).unwrap_or(0.0) as u64)
    }

    /// SIGTERM (it finishes the batch being written), then waits up to `grace` (SIGKILL
    /// after).
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<(ExitStatus, bool)> {
        self.child.terminate(grace)
    }
}

/// nginx answering `204` to everything, the baseline.
pub struct NginxProc {
    child: ChildGuard,
    _dir: tempfile::TempDir,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl NginxProc {
    /// nginx on `PATH`, else in the usual sbin folders (often not on a user's `PATH`).
    pub fn find() -> Option<PathBuf> {
        find_binary("nginx", &["/usr/local/nginx/sbin"])
    }

    /// Starts nginx (in the foreground, one worker per CPU, access log off) and waits until
    /// it answers.
    pub async fn start(
        bin: &Path,
        connections: usize,
        ready_timeout: Duration,
    ) -> anyhow::Result<NginxProc> {
        let dir = tempfile::Builder::new()
            .prefix("trueup-bench-nginx-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let d = dir.path().display().to_string();
        // nginx cannot say which port it bound, so the bench binds port 0 and hands the open
        // socket over as fd 3: nginx takes the sockets named in its `NGINX` environment
        // variable ("3;", the binary-upgrade mechanism) for the `listen` that matches. No port
        // is released and re-bound, so nothing else can take it in between.
        let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
        let addr = listener.local_addr()?;
        let worker_connections = (connections * 2 + 64).max(1024);
        // `return 204` reads and discards the request body, so keep-alive works and every
        // byte of each batch still crosses the socket. The master process stays in the
        // foreground (`daemon off`) and stops its workers on SIGTERM.
        let conf = format!(
            "daemon off;
master_process on;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_body_buffer_size 64k;
    client_max_body_size 4m;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    server {{
        listen {addr};
        location / {{ return 204; }}
    }}
}}
"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).context("cannot write the nginx config")?;
        let log = dir.path().join("error.log");
        let out = File::create(dir.path().join("nginx.out"))?;
        let fd = listener.as_raw_fd();
        let mut cmd = Command::new(bin);
        // SAFETY: only dup2, which is async-signal-safe, runs between fork and exec; the new
        // fd 3 does not inherit the listener's close-on-exec flag.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .env("NGINX", "3;")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(&log)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        drop(listener);
        let mut nginx = NginxProc {
            child: ChildGuard {
                child,
                name: "nginx",
            },
            _dir: dir,
            addr,
        };
        wait_for(
            &mut nginx.child,
            addr,
            "/",
            StatusCode::NO_CONTENT,
            ready_timeout,
            &log,
        )
        .await?;
        Ok(nginx)
    }

    /// The master's process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// SIGTERM (fast shutdown), SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<(ExitStatus, bool)> {
        self.child.terminate(grace)
    }
}

/// The environment of a measured child: without the user's own TRUEUP_* settings (they must
/// not change what is measured), and without colour codes (its log is a file).
pub(crate) fn measured_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TRUEUP_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("NO_COLOR", "1");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_the_matching_series() {
        let text = "# HELP trueup_loader_stored_total x\n\
            trueup_loader_stored_total 120\n\
            trueup_loader_stored_total_extra 5\n\
            trueup_loader_rejected_total{reason=\"a\"} 2\n\
            trueup_loader_rejected_total{reason=\"b\"} 3\n";
        assert_eq!(metric(text, "trueup_loader_stored_total", &[]), Some(120.0));
        assert_eq!(metric(text, "trueup_loader_rejected_total", &[]), Some(5.0));
        assert_eq!(
            metric(text, "trueup_loader_rejected_total", &[("reason", "b")]),
            Some(3.0)
        );
        assert_eq!(metric(text, "trueup_loader_duplicates_total", &[]), None);
    }
}
