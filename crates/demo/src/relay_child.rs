//! `--relay-config`: the shop starts the relay itself, so one command runs the whole demo and
//! Ctrl-C stops both, in order.
//!
//! The relay is the `trueup-relay` binary next to the shop's own executable (Cargo builds
//! both into `target/<profile>/`), started with `--config <path>` in its own process group:
//! a Ctrl-C in the terminal reaches only the shop, which first stops serving, then shuts its
//! emitter down (so the last business events reach the relay), then sends the relay SIGTERM
//! and waits for it to drain. Should the shop die without that (SIGKILL, a crash), Linux
//! sends the relay SIGTERM anyway (`PR_SET_PDEATHSIG`), and dropping the handle kills it.
//! If the relay exits on its own, the shop stops too: a demo without its relay is broken.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long the relay may take to become ready.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long the relay may take to drain and exit after SIGTERM before it is killed (its
/// forwarder drains for `forwarder.shutdown_drain_secs`, 10 s by default).
const STOP_GRACE: Duration = Duration::from_secs(20);

/// The running relay.
pub struct RelayChild {
    /// Where its public endpoints are (from its ready file).
    pub public: SocketAddr,
    /// Where its `/readyz` is (from its ready file).
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    died: Option<oneshot::Receiver<String>>,
    task: JoinHandle<()>,
}

/// The `trueup-relay` binary next to this executable.
pub fn relay_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the shop's own executable")?;
    let bin = exe
        .parent()
        .context("the executable has no directory")?
        .join(format!("trueup-relay{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        bail!(
            "{} not found: build it next to trueup-demo (cargo build -p trueup-relay, same profile)",
            bin.display()
        );
    }
    Ok(bin)
}

impl RelayChild {
    /// Starts the relay with `config`, learns its addresses from its ready file (so the
    /// config may say port 0) and waits until its `/readyz` answers 200.
    pub async fn start(config: &Path) -> anyhow::Result<RelayChild> {
        let bin = relay_binary()?;
        let ready_file =
            std::env::temp_dir().join(format!("trueup-demo-{}-relay.json", std::process::id()));
        let _ = std::fs::remove_file(&ready_file);
        let mut cmd = Command::new(&bin);
        cmd.arg("--config")
            .arg(config)
            .arg("--ready-file")
            .arg(&ready_file)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        #[cfg(unix)]
        cmd.process_group(0);
        #[cfg(target_os = "linux")]
        // SAFETY: between fork and exec only async-signal-safe calls are allowed; prctl is one.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        tracing::info!(pid = child.id(), config = %config.display(), "relay started");
        let addrs = wait_ready_file(&mut child, &ready_file).await;
        let _ = std::fs::remove_file(&ready_file);
        let (public, admin) = addrs?;
        wait_ready(&mut child, admin).await?;
        tracing::info!(%public, %admin, "relay ready");
        let (stop, stop_rx) = oneshot::channel();
        let (died_tx, died) = oneshot::channel();
        let task = tokio::spawn(supervise(child, stop_rx, died_tx));
        Ok(RelayChild {
            public,
            admin,
            stop: Some(stop),
            died: Some(died),
            task,
        })
    }

    /// Resolves (with why) if the relay exits on its own; never resolves otherwise. Once.
    pub fn died(&mut self) -> impl Future<Output = String> + Send + 'static {
        let died = self.died.take();
        async move {
            match died {
                Some(rx) => match rx.await {
                    Ok(why) => why,
                    Err(_) => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        }
    }

    /// SIGTERM, then waits for the relay to drain and exit (killing it after a grace period).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// The relay's ready file: `{"listen": …, "admin_listen": …}`.
#[derive(serde::Deserialize)]
struct ReadyFile {
    listen: SocketAddr,
    admin_listen: SocketAddr,
}

/// Waits for the relay's ready file and returns its (public, admin) addresses.
async fn wait_ready_file(
    child: &mut Child,
    path: &Path,
) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the relay exited during start ({status}); see its log above");
        }
        if let Ok(text) = std::fs::read_to_string(path) {
            let f: ReadyFile = serde_json::from_str(&text).with_context(|| {
                format!("the relay's ready file {} is not valid", path.display())
            })?;
            return Ok((f.listen, f.admin_listen));
        }
        if started.elapsed() > READY_WITHIN {
            bail!("the relay wrote no ready file within {READY_WITHIN:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_ready(child: &mut Child, admin: SocketAddr) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()?;
    let url = format!("http://{admin}/readyz");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the relay exited during start ({status}); see its log above");
        }
        if let Ok(resp) = http.get(&url).send().await
            && resp.status().is_success()
        {
            return Ok(());
        }
        if started.elapsed() > READY_WITHIN {
            bail!("the relay was not ready at {url} within {READY_WITHIN:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn supervise(mut child: Child, stop: oneshot::Receiver<()>, died: oneshot::Sender<String>) {
    tokio::select! {
        status = child.wait() => {
            let why = match status {
                Ok(s) => format!("the relay exited on its own ({s})"),
                Err(e) => format!("the relay was lost: {e}"),
            };
            tracing::error!(error = %why, "relay stopped; stopping the shop");
            let _ = died.send(why);
        }
        // A stop request, or the handle dropped: stop the relay the same way.
        _ = stop => {
            if let Some(pid) = child.id() {
                // SAFETY: plain syscall on the child's pid, which it keeps until waited for.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            }
            match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                Ok(Ok(status)) => tracing::info!(%status, "relay stopped"),
                _ => {
                    tracing::warn!("the relay did not exit in time after SIGTERM; killing it");
                    let _ = child.kill().await;
                }
            }
        }
    }
}
