//! The servers under test, run as child processes on loopback: the relay (fresh data
//! directory, rate limits off) and the nginx baseline. Each lives in its own temporary
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

/// Waits for the relay's ready file (`{"listen": …, "admin_listen": …}`: it binds port 0 and
/// says which ports it got) and returns (public, admin).
async fn wait_ready_file(
    child: &mut ChildGuard,
    path: &Path,
    timeout: Duration,
    log: &Path,
) -> anyhow::Result<(SocketAddr, SocketAddr)> {
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
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("ready file {text:?}"))?;
            let addr = |key: &str| -> anyhow::Result<SocketAddr> {
                v[key]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .with_context(|| format!("ready file {text:?}: no {key}"))
            };
            return Ok((addr("listen")?, addr("admin_listen")?));
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

/// CPU time of a process and its direct children (nginx's master and its workers).
pub fn tree_cpu_time(pid: u32) -> Option<Duration> {
    let own = cpu_time(pid)?;
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    Some(
        children
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .filter_map(cpu_time)
            .fold(own, |total, c| total + c),
    )
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
        // The user's own TRUEUP_* settings must not change what is measured.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TRUEUP_") {
                cmd.env_remove(key);
            }
        }
        // Its log is a file: no colour codes.
        cmd.env("NO_COLOR", "1");
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut child = ChildGuard {
            child,
            name: "trueup-relay",
        };
        let (addr, admin) = wait_ready_file(&mut child, &ready_file, ready_timeout, &log).await?;
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

    /// `trueup_spool_depth` from the admin `/metrics`.
    pub async fn spool_depth(&self) -> anyhow::Result<u64> {
        let (status, body) = load::get(self.admin, "/metrics").await?;
        anyhow::ensure!(status == StatusCode::OK, "GET /metrics answered {status}");
        let text = String::from_utf8_lossy(&body);
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix("trueup_spool_depth "))
            .context("/metrics has no trueup_spool_depth")?;
        let depth: f64 = value
            .trim()
            .parse()
            .with_context(|| format!("trueup_spool_depth {value:?} is not a number"))?;
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
        let on_path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        on_path
            .into_iter()
            .chain(["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"].map(PathBuf::from))
            .map(|d| d.join("nginx"))
            .find(|p| p.is_file())
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
