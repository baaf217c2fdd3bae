//! `trueup-bench`: how many events per second the relay stores durably on this machine, at
//! what latency and memory, next to an nginx that only answers `204`.
//!
//! ```text
//! cargo build --release -p trueup-relay
//! cargo run -p trueup-bench --release -- [--seconds 10] [--connections 32] \
//!     [--events-per-batch 20] [--rate-fraction 0.5] [--no-fanout] [--fanout-events 200000] \
//!     [--fanout-concurrency 1] [--postgres URL] [--json FILE]
//! cargo run -p trueup-bench --release -- --pipeline kafka|nats [--rate 20000[,10000]] \
//!     [--seconds 10] [--batch 20] [--tansu PATH | --nats-server PATH] [--postgres URL] [--json FILE]
//! cargo run -p trueup-bench --release -- --dashboards [--events 1000000] [--days 30] [--runs 7] \
//!     [--keep-data] [--json FILE]
//! ```
//!
//! `--pipeline` replaces the steps below with the scale-out path (relay -> Kafka-protocol
//! broker or NATS JetStream -> `trueup-relay load` -> PostgreSQL or SQLite): its sustained
//! throughput and its tracked-to-warehouse latency at fixed rates; see `pipeline`.
//!
//! `--dashboards` replaces them with the dashboards' JSON API on a generated warehouse of
//! `--events` events: each call's median and max time against a 300 ms goal; see `dashboards`.
//!
//! What it does, in order:
//!
//! 1. Starts the release relay (`target/release/trueup-relay`, never built from here) as a
//!    child process on loopback, with a fresh temporary data directory and a config that
//!    turns the rate limits off (fsync stays on: the relay answers only after its spool
//!    has fsync'd the batch), and waits for `/readyz`.
//! 2. Warm-up (`--warmup-seconds`, not measured), then the **closed loop**: `--connections`
//!    keep-alive connections each POST a batch of `--events-per-batch` ~380-byte events to
//!    `/_r/q` as soon as the previous one is answered, for `--seconds`. Every event of the
//!    run has a fresh UUIDv7 id, so nothing is answered `duplicate`; an answer counts only
//!    if it is `200` with `accepted` equal to the events sent. Reports events/s, requests/s
//!    and p50/p99/max latency.
//! 3. The **open loop** at `--rate-fraction` of the measured events/s: batches scheduled at
//!    fixed intervals across the connections, latency measured from each batch's scheduled
//!    send time (so a stall is charged to every request it delays: no coordinated omission).
//! 4. Waits (up to 60 s) for the spool to drain (`trueup_spool_depth 0` on `/metrics`),
//!    reads the relay's peak RSS (`VmHWM`), checks that the warehouse holds exactly as many
//!    events as the relay acknowledged as accepted, then stops the relay with SIGTERM.
//! 5. The **fan-out** part (unless `--no-fanout`; see `fanout`): the same warm-up and closed
//!    loop against a fresh relay with three sinks (warehouse, webhook, posthog; the HTTP ones
//!    pointed at loopback receivers run by the benchmark on their own thread), compared with
//!    step 2's warehouse-only figure; then, per sink kind (warehouse, webhook, posthog,
//!    segment; postgres with `--postgres URL` or `TRUEUP_TEST_POSTGRES`), how many events/s
//!    it forwards from a preloaded backlog of `--fanout-events`,
//!    compared with step 2's ingest rate; and the relay's CPU per event in each case. About a
//!    minute with `--seconds 10` on 2 cores; every wait in it is bounded.
//! 6. If nginx is installed: the same closed loop (same connections, same kind of bodies)
//!    against nginx answering `204` with `worker_processes auto`, and the ratio.
//!
//! The load generator shares the machine's CPUs with the server under test, so it is kept
//! cheap: a bare hyper HTTP/1.1 client, one tokio worker thread by default
//! (`--client-threads`), bodies spliced from per-connection templates (see `batch`).
//!
//! Progress goes to stderr; the summary (stable, one figure per line) to stdout, and as
//! JSON to `--json FILE`. Exit status: 0 when every relay request succeeded and the
//! warehouse check passed (and, with the fan-out part, each of its warehouses held exactly
//! the events accepted and each receiver counted at least that many), 1 otherwise, 2 when the
//! benchmark could not run.

mod batch;
mod dashboards;
mod fanout;
mod load;
mod pg;
mod pipeline;
mod procs;
mod receiver;
mod soak;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::json;

use crate::load::{Expect, Load, PhaseResult, Target};
use crate::procs::{NginxProc, RelayProc};

/// Longest wait for a server to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for the spool to drain into the warehouse after the load.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the relay to exit after SIGTERM (it drains for up to 10 s by default).
const STOP_GRACE: Duration = Duration::from_secs(30);
/// The relay's collection path with the default prefix.
const COLLECT_PATH: &str = "/_r/q";

/// Load benchmark of the trueup relay (durable, fsync'd ingest) against nginx answering 204.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Seconds of each measured phase.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    connections: u64,
    /// Events per batch (the relay's default limit is 500).
    #[arg(long, visible_alias = "batch", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=500))]
    events_per_batch: u64,
    /// Rate of the open-loop phase, as a fraction of the closed loop's events/s.
    #[arg(long, default_value_t = 0.5)]
    rate_fraction: f64,
    /// Unmeasured closed-loop seconds before the measured phases (0: none).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=60))]
    warmup_seconds: u64,
    /// The relay binary (relative paths are also tried from the workspace root).
    #[arg(long, default_value = "target/release/trueup-relay")]
    relay_bin: PathBuf,
    /// The nginx binary (default: nginx on PATH, or in /usr/sbin, /usr/local/sbin).
    #[arg(long)]
    nginx_bin: Option<PathBuf>,
    /// Skip the nginx baseline.
    #[arg(long)]
    no_nginx: bool,
    /// Worker threads of the load generator.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    client_threads: u64,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the relay's temporary directory (config, log, spool, warehouse) and print its path.
    #[arg(long, visible_alias = "keep")]
    keep_data: bool,
    /// Run the fan-out part (the default): ingest with three sinks, forwarding per sink kind.
    #[arg(long, overrides_with = "no_fanout")]
    fanout: bool,
    /// Skip the fan-out part.
    #[arg(long, overrides_with = "fanout")]
    no_fanout: bool,
    /// Events preloaded for each sink kind's forwarding measurement.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1_000..=1_000_000))]
    fanout_events: u64,
    /// `concurrency` (requests in flight) of the fan-out part's HTTP sinks; the relay's
    /// default is 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    fanout_concurrency: u64,
    /// PostgreSQL to measure the `postgres` sink's forwarding against (a schema of its own is
    /// created and dropped); without it, `TRUEUP_TEST_POSTGRES` if set, else that sink is
    /// skipped. Start the local one with `.ci/postgres`.
    #[arg(long)]
    postgres: Option<String>,
    /// Run the soak instead of the usual phases: the maximum (closed loop, --seconds), then
    /// an open loop at --rate-fraction of it for this many seconds (see `soak`).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3600))]
    soak_seconds: u64,
    /// The soak's window: latency, RSS and spool depth are reported per window.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=600))]
    soak_window: u64,
    /// Run the pipeline part instead of the usual phases: relay -> this log -> loader ->
    /// warehouse (PostgreSQL from --postgres or TRUEUP_TEST_POSTGRES, else SQLite); see
    /// `pipeline`.
    #[arg(long, value_enum)]
    pipeline: Option<procs::LogKind>,
    /// `--pipeline`: offered rate of the fixed-rate open loop, events/s; repeat it (or give a
    /// comma-separated list) to measure several, each on a fresh pipeline.
    #[arg(long, value_delimiter = ',', default_value = "20000",
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    rate: Vec<u64>,
    /// `--pipeline kafka`: the tansu binary (default: TRUEUP_TANSU; `.ci/tansu` fetches it).
    #[arg(long)]
    tansu: Option<PathBuf>,
    /// `--pipeline nats`: the nats-server binary (default: nats-server on PATH or in sbin).
    #[arg(long)]
    nats_server: Option<PathBuf>,
    /// Run the dashboards' benchmark instead of the usual phases: a generated warehouse of
    /// --events events over --days days, then each dashboard API call --runs times (see
    /// `dashboards`).
    #[arg(long)]
    dashboards: bool,
    /// `--dashboards`: events in the generated warehouse.
    #[arg(long, default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1_000..=100_000_000))]
    events: u64,
    /// `--dashboards`: days the generated events span, ending now.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=366))]
    days: u32,
    /// `--dashboards`: timed calls per endpoint and window (after one warm-up call).
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !(args.rate_fraction > 0.0 && args.rate_fraction <= 1.0) {
        eprintln!("trueup-bench: --rate-fraction must be in (0, 1]");
        return ExitCode::from(2);
    }
    let Some(relay_bin) = resolve_relay_bin(&args.relay_bin) else {
        eprintln!(
            "trueup-bench: the relay binary {} does not exist.\n\
             Build it first:  cargo build --release -p trueup-relay\n\
             (or point --relay-bin at a trueup-relay binary)",
            args.relay_bin.display()
        );
        return ExitCode::from(2);
    };
    if cfg!(debug_assertions) {
        eprintln!(
            "trueup-bench: warning: this is a debug build of the load generator; \
             run it with --release or it will measure itself"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads as usize)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("trueup-bench: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(log) = args.pipeline {
        return run_pipeline(&args, log, relay_bin, &runtime);
    }
    if args.dashboards {
        return run_dashboards(&args, relay_bin, &runtime);
    }
    if args.soak_seconds > 0 {
        let settings = soak::Settings {
            connections: args.connections as usize,
            events_per_batch: args.events_per_batch as usize,
            warmup_seconds: args.warmup_seconds,
            max_seconds: args.seconds,
            rate_fraction: args.rate_fraction,
            seconds: args.soak_seconds,
            window_seconds: args.soak_window,
        };
        return match runtime.block_on(soak::run(settings, &relay_bin)) {
            Ok(report) => {
                print!("{}", report.text());
                if let Some(path) = &args.json {
                    let json = serde_json::to_string_pretty(&report.json()).expect("valid JSON");
                    if let Err(e) = std::fs::write(path, json + "\n") {
                        eprintln!("trueup-bench: cannot write {}: {e}", path.display());
                        return ExitCode::from(2);
                    }
                }
                if report.passed() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("trueup-bench: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    match runtime.block_on(run(&args, &relay_bin)) {
        Ok(report) => {
            print!("{}", report.text(&args));
            if let Some(path) = &args.json {
                let json = serde_json::to_string_pretty(&report.json(&args)).expect("valid JSON");
                if let Err(e) = std::fs::write(path, json + "\n") {
                    eprintln!("trueup-bench: cannot write {}: {e}", path.display());
                    return ExitCode::from(2);
                }
            }
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("trueup-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The pipeline part (`--pipeline`): finds the log's server, runs, prints, writes the JSON.
fn run_pipeline(
    args: &Args,
    log: procs::LogKind,
    relay_bin: PathBuf,
    runtime: &tokio::runtime::Runtime,
) -> ExitCode {
    let log_bin = match log {
        procs::LogKind::Kafka => args
            .tansu
            .clone()
            .or_else(|| std::env::var_os("TRUEUP_TANSU").map(PathBuf::from)),
        procs::LogKind::Nats => args
            .nats_server
            .clone()
            .or_else(|| procs::find_binary("nats-server", &[])),
    };
    let Some(log_bin) = log_bin.filter(|p| p.is_file()) else {
        eprintln!(
            "trueup-bench: {}",
            match log {
                procs::LogKind::Kafka =>
                    "no tansu binary: export TRUEUP_TANSU=$(.ci/tansu), or --tansu PATH",
                procs::LogKind::Nats =>
                    "no nats-server: apt-get install nats-server, or --nats-server PATH",
            }
        );
        return ExitCode::from(2);
    };
    let settings = pipeline::Settings {
        log,
        log_bin,
        relay_bin,
        postgres: postgres_url(args),
        connections: args.connections as usize,
        events_per_batch: args.events_per_batch as usize,
        seconds: args.seconds,
        warmup_seconds: args.warmup_seconds,
        rates: args.rate.clone(),
        client_threads: args.client_threads,
    };
    match runtime.block_on(pipeline::run(settings)) {
        Ok(report) => {
            print!("{}", report.text());
            if let Some(path) = &args.json {
                let json = serde_json::to_string_pretty(&report.json()).expect("valid JSON");
                if let Err(e) = std::fs::write(path, json + "\n") {
                    eprintln!("trueup-bench: cannot write {}: {e}", path.display());
                    return ExitCode::from(2);
                }
            }
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("trueup-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The dashboards' benchmark (`--dashboards`): runs, prints, writes the JSON. Fails only on
/// wrong answers, never on slow ones.
fn run_dashboards(args: &Args, relay_bin: PathBuf, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let settings = dashboards::Settings {
        relay_bin,
        events: args.events,
        days: args.days,
        runs: args.runs,
        keep_data: args.keep_data,
    };
    match dashboards::run(settings, runtime) {
        Ok(report) => {
            print!("{}", report.text());
            if let Some(path) = &args.json {
                let json = serde_json::to_string_pretty(&report.json()).expect("valid JSON");
                if let Err(e) = std::fs::write(path, json + "\n") {
                    eprintln!("trueup-bench: cannot write {}: {e}", path.display());
                    return ExitCode::from(2);
                }
            }
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("trueup-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `--postgres`, else `TRUEUP_TEST_POSTGRES` (empty: none).
fn postgres_url(args: &Args) -> Option<String> {
    args.postgres
        .clone()
        .or_else(|| std::env::var("TRUEUP_TEST_POSTGRES").ok())
        .filter(|u| !u.is_empty())
}

/// The relay binary, absolute (the relay runs in its temporary directory): the path as
/// given, else (if relative) from the workspace root.
fn resolve_relay_bin(given: &Path) -> Option<PathBuf> {
    let mut candidates = vec![given.to_path_buf()];
    if given.is_relative() {
        candidates.push(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(given),
        );
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
}

/// Everything measured.
struct Report {
    cpus: usize,
    relay_max: PhaseResult,
    fixed: Option<Fixed>,
    fanout: Fanout,
    nginx: Baseline,
    peak_rss_bytes: Option<u64>,
    warehouse: Warehouse,
    relay_exit: String,
    relay_exit_ok: bool,
    warmup: PhaseResult,
    kept_dir: Option<PathBuf>,
}

/// The open-loop phase.
struct Fixed {
    target_events_per_sec: f64,
    result: PhaseResult,
}

/// The fan-out part, or why there is none.
enum Fanout {
    Measured(Box<fanout::Report>),
    Skipped(String),
}

/// The nginx phase, or why there is none.
enum Baseline {
    Measured(Box<PhaseResult>),
    Skipped(String),
}

/// The warehouse check.
struct Warehouse {
    /// Events the relay answered `accepted` for, over the whole run (warm-up included).
    accepted: u64,
    /// Rows of `events`, if they could be counted.
    rows: Option<u64>,
    /// Spool depth when the drain wait ended.
    depth_left: Option<u64>,
    drain_time: Duration,
    problem: Option<String>,
}

impl Warehouse {
    fn ok(&self) -> bool {
        self.problem.is_none() && self.rows == Some(self.accepted)
    }
}

async fn run(args: &Args, relay_bin: &Path) -> anyhow::Result<Report> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = |phase: usize, seconds: u64| Load {
        connections: args.connections as usize,
        events_per_batch: args.events_per_batch as usize,
        duration: Duration::from_secs(seconds),
        phase,
        max_batches: None,
    };

    eprintln!("starting the relay: {}", relay_bin.display());
    let mut relay = RelayProc::start(relay_bin, READY_TIMEOUT).await?;
    eprintln!(
        "relay ready on {} (admin {}), data in {}",
        relay.addr,
        relay.admin,
        relay.dir().display()
    );
    let target = Target::new(relay.addr, COLLECT_PATH, Expect::RelayAccepted)?;

    let warmup = if args.warmup_seconds > 0 {
        eprintln!(
            "warm-up: {} s closed loop (not measured)",
            args.warmup_seconds
        );
        load::closed_loop(&target, load(0, args.warmup_seconds)).await?
    } else {
        PhaseResult::empty()
    };

    eprintln!(
        "relay closed loop: {} connections, {} s",
        args.connections, args.seconds
    );
    let relay_max = with_cpu(
        relay.pid(),
        load::closed_loop(&target, load(1, args.seconds)),
        procs::cpu_time,
    )
    .await?;
    eprintln!("  {}; {}", phase_line(&relay_max), cpu_line(&relay_max));
    check_alive(&mut relay)?;

    let fixed = if relay_max.events_per_sec() > 0.0 {
        let target_events = relay_max.events_per_sec() * args.rate_fraction;
        let rps = target_events / args.events_per_batch as f64;
        eprintln!(
            "relay open loop: {target_events:.0} events/s ({rps:.0} batches/s), {} s",
            args.seconds
        );
        let result = with_cpu(
            relay.pid(),
            load::open_loop(&target, load(2, args.seconds), rps),
            procs::cpu_time,
        )
        .await?;
        eprintln!("  {}; {}", phase_line(&result), cpu_line(&result));
        check_alive(&mut relay)?;
        Some(Fixed {
            target_events_per_sec: target_events,
            result,
        })
    } else {
        eprintln!("relay open loop: skipped (the closed loop stored nothing)");
        None
    };

    let accepted =
        warmup.accepted + relay_max.accepted + fixed.as_ref().map_or(0, |f| f.result.accepted);
    eprintln!(
        "waiting for the spool to drain into the warehouse (at most {} s)",
        DRAIN_TIMEOUT.as_secs()
    );
    let warehouse = check_warehouse(&relay, accepted).await;
    let peak_rss_bytes = match relay.peak_rss_bytes() {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("cannot read the relay's peak RSS: {e:#}");
            None
        }
    };
    eprintln!("stopping the relay (SIGTERM)");
    let (relay_exit, relay_exit_ok) = stop_relay(&mut relay);
    if !relay_exit_ok {
        eprintln!("relay log (last lines):\n{}", relay.log_tail(20));
    }
    let kept_dir = args.keep_data.then(|| relay.keep());

    let fanout = if args.no_fanout {
        Fanout::Skipped("--no-fanout".into())
    } else if relay_max.events_per_sec() <= 0.0 {
        Fanout::Skipped("the closed loop stored nothing".into())
    } else {
        let settings = fanout::Settings {
            connections: args.connections as usize,
            events_per_batch: args.events_per_batch as usize,
            seconds: args.seconds,
            warmup_seconds: args.warmup_seconds,
            events: args.fanout_events,
            ingest_events_per_sec: relay_max.events_per_sec(),
            ingest_cpu_per_event: relay_max
                .server_cpu
                .filter(|_| relay_max.events > 0)
                .map(|c| Duration::from_secs_f64(c.as_secs_f64() / relay_max.events as f64)),
            concurrency: args.fanout_concurrency,
        };
        let postgres = postgres_url(args);
        Fanout::Measured(Box::new(
            fanout::run(settings, relay_bin, postgres.as_deref()).await?,
        ))
    };

    let nginx = if args.no_nginx {
        Baseline::Skipped("--no-nginx".into())
    } else {
        match args.nginx_bin.clone().or_else(NginxProc::find) {
            None => Baseline::Skipped("nginx not found on PATH".into()),
            Some(bin) => baseline(&bin, load(3, args.seconds)).await?,
        }
    };

    Ok(Report {
        cpus,
        relay_max,
        fixed,
        fanout,
        nginx,
        peak_rss_bytes,
        warehouse,
        relay_exit,
        relay_exit_ok,
        warmup,
        kept_dir,
    })
}

/// SIGTERM, then waits (SIGKILL after [`STOP_GRACE`]); returns the exit as text and whether
/// it was a clean exit.
fn stop_relay(relay: &mut RelayProc) -> (String, bool) {
    match relay.stop(STOP_GRACE) {
        Ok((status, false)) => (status.to_string(), status.success()),
        Ok((status, true)) => (
            format!(
                "did not exit within {} s of SIGTERM; killed ({status})",
                STOP_GRACE.as_secs()
            ),
            false,
        ),
        Err(e) => (format!("{e:#}"), false),
    }
}

/// Runs a phase and notes the CPU time the load generator and the server used meanwhile.
async fn with_cpu(
    server: u32,
    phase: impl Future<Output = anyhow::Result<PhaseResult>>,
    server_cpu: fn(u32) -> Option<Duration>,
) -> anyhow::Result<PhaseResult> {
    let me = std::process::id();
    let before = (procs::cpu_time(me), server_cpu(server));
    let mut result = phase.await?;
    let delta = |a: Option<Duration>, b: Option<Duration>| Some(a?.saturating_sub(b?));
    result.client_cpu = delta(procs::cpu_time(me), before.0);
    result.server_cpu = delta(server_cpu(server), before.1);
    Ok(result)
}

fn check_alive(relay: &mut RelayProc) -> anyhow::Result<()> {
    if let Some(status) = relay.exited() {
        anyhow::bail!(
            "the relay exited during the load ({status}); last lines of its log:\n{}",
            relay.log_tail(30)
        );
    }
    Ok(())
}

async fn check_warehouse(relay: &RelayProc, accepted: u64) -> Warehouse {
    let mut w = Warehouse {
        accepted,
        rows: None,
        depth_left: None,
        drain_time: Duration::ZERO,
        problem: None,
    };
    match relay.wait_drained(DRAIN_TIMEOUT).await {
        Ok((depth, took)) => {
            w.depth_left = Some(depth);
            w.drain_time = took;
            if depth > 0 {
                w.problem = Some(format!(
                    "spool not drained after {} s: {depth} records left",
                    DRAIN_TIMEOUT.as_secs()
                ));
            }
        }
        Err(e) => w.problem = Some(format!("cannot read the spool depth: {e:#}")),
    }
    match relay.warehouse_rows() {
        Ok(n) => w.rows = Some(n),
        Err(e) => {
            w.problem
                .get_or_insert(format!("cannot count the warehouse rows: {e:#}"));
        }
    }
    eprintln!(
        "  drained in {:.1} s; warehouse rows {}, accepted {accepted}",
        w.drain_time.as_secs_f64(),
        w.rows.map_or("?".into(), |n| n.to_string())
    );
    w
}

async fn baseline(bin: &Path, load: Load) -> anyhow::Result<Baseline> {
    eprintln!("starting nginx: {}", bin.display());
    let mut nginx = match NginxProc::start(bin, load.connections, READY_TIMEOUT).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("nginx baseline skipped: {e:#}");
            return Ok(Baseline::Skipped(format!("nginx failed to start: {e}")));
        }
    };
    let target = Target::new(nginx.addr, COLLECT_PATH, Expect::NoContent)?;
    eprintln!(
        "nginx closed loop: {} connections, {} s",
        load.connections,
        load.duration.as_secs()
    );
    let result = with_cpu(
        nginx.pid(),
        load::closed_loop(&target, load),
        procs::tree_cpu_time,
    )
    .await;
    if let Err(e) = nginx.stop(Duration::from_secs(10)) {
        eprintln!("stopping nginx: {e:#}");
    }
    let result = result?;
    eprintln!("  {}; {}", phase_line(&result), cpu_line(&result));
    Ok(Baseline::Measured(Box::new(result)))
}

/// Throughput and latency of one phase, as in the summary.
fn phase_line(r: &PhaseResult) -> String {
    format!(
        "{:.0} events/s  {:.0} req/s  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  errors {}",
        r.events_per_sec(),
        r.requests_per_sec(),
        r.latency_ms(0.50),
        r.latency_ms(0.99),
        r.max_latency_ms(),
        r.error_count()
    )
}

/// CPU cores the server and the load generator used in one phase.
fn cpu_line(r: &PhaseResult) -> String {
    let cores = |c: Option<f64>| c.map_or("?".into(), |c| format!("{c:.2}"));
    format!(
        "server {} cores, load generator {} cores",
        cores(r.server_cores()),
        cores(r.client_cores())
    )
}

fn phase_json(r: &PhaseResult) -> serde_json::Value {
    json!({
        "seconds": r.elapsed.as_secs_f64(),
        "requests": r.requests,
        "events": r.events,
        "events_per_sec": r.events_per_sec(),
        "requests_per_sec": r.requests_per_sec(),
        "latency_ms": {
            "p50": r.latency_ms(0.50),
            "p90": r.latency_ms(0.90),
            "p99": r.latency_ms(0.99),
            "p999": r.latency_ms(0.999),
            "max": r.max_latency_ms(),
        },
        "errors": r.error_count(),
        "error_kinds": r.errors,
        "server_cpu_cores": r.server_cores(),
        "client_cpu_cores": r.client_cores(),
    })
}

impl Report {
    fn relay_errors(&self) -> u64 {
        self.warmup.error_count()
            + self.relay_max.error_count()
            + self.fixed.as_ref().map_or(0, |f| f.result.error_count())
    }

    fn passed(&self) -> bool {
        self.relay_errors() == 0
            && self.warehouse.ok()
            && self.relay_exit_ok
            && match &self.fanout {
                Fanout::Measured(f) => f.passed(),
                Fanout::Skipped(_) => true,
            }
    }

    fn ratio(&self) -> Option<f64> {
        match &self.nginx {
            Baseline::Measured(n) if n.events_per_sec() > 0.0 => {
                Some(self.relay_max.events_per_sec() / n.events_per_sec())
            }
            _ => None,
        }
    }

    fn text(&self, args: &Args) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "trueup relay benchmark (batches of {} events, ~{:.0} B each, fsync on, {} CPUs)",
            args.events_per_batch,
            self.relay_max.bytes_per_event(),
            self.cpus
        );
        let _ = writeln!(
            s,
            "relay   max      : {}  ({} connections, {} s)",
            phase_line(&self.relay_max),
            args.connections,
            args.seconds
        );
        let label = format!("at {:.0}%", args.rate_fraction * 100.0);
        match &self.fixed {
            Some(f) => {
                let _ = writeln!(
                    s,
                    "relay   {label:<9}: {}  (open loop, target {:.0} events/s, send lag p99 {:.1} ms)",
                    phase_line(&f.result),
                    f.target_events_per_sec,
                    f.result.send_lag.value_at_quantile(0.99) as f64 / 1000.0
                );
            }
            None => {
                let _ = writeln!(s, "relay   {label:<9}: skipped (no throughput measured)");
            }
        }
        match &self.nginx {
            Baseline::Measured(n) => {
                let _ = writeln!(
                    s,
                    "nginx   204      : {}  ({} connections, {} s)",
                    phase_line(n),
                    args.connections,
                    args.seconds
                );
            }
            Baseline::Skipped(why) => {
                let _ = writeln!(s, "nginx   204      : skipped ({why})");
            }
        }
        let client_bound = match &self.nginx {
            Baseline::Measured(n) => n.client_cores().filter(|c| *c >= 0.9),
            Baseline::Skipped(_) => None,
        };
        if let Some(c) = client_bound {
            let _ = writeln!(
                s,
                "note   nginx: the load generator was CPU-bound ({c:.2} cores): nginx's figure is a lower bound, the ratio an upper bound"
            );
        }
        match self.ratio() {
            Some(r) => {
                let _ = writeln!(s, "ratio relay/nginx: {r:.3}");
            }
            None => {
                let _ = writeln!(s, "ratio relay/nginx: n/a");
            }
        }
        match self.peak_rss_bytes {
            Some(b) => {
                let _ = writeln!(s, "relay peak RSS   : {:.1} MiB", b as f64 / 1048576.0);
            }
            None => {
                let _ = writeln!(s, "relay peak RSS   : n/a");
            }
        }
        let w = &self.warehouse;
        if w.ok() {
            let _ = writeln!(s, "warehouse rows = accepted: OK ({})", w.accepted);
        } else {
            let _ = writeln!(
                s,
                "warehouse rows = accepted: FAILED (rows {}, accepted {}{})",
                w.rows.map_or("?".into(), |n| n.to_string()),
                w.accepted,
                w.problem
                    .as_ref()
                    .map_or(String::new(), |p| format!("; {p}"))
            );
        }
        let _ = writeln!(
            s,
            "relay exit       : {}",
            if self.relay_exit_ok {
                "OK (SIGTERM)".to_string()
            } else {
                format!("FAILED ({})", self.relay_exit)
            }
        );
        match &self.fanout {
            Fanout::Measured(f) => f.text(&mut s),
            Fanout::Skipped(why) => {
                let _ = writeln!(s, "fanout           : skipped ({why})");
            }
        }
        let phases: [(&str, Option<&PhaseResult>); 4] = [
            ("relay warm-up", Some(&self.warmup)),
            ("relay max", Some(&self.relay_max)),
            ("relay fixed", self.fixed.as_ref().map(|f| &f.result)),
            (
                "nginx",
                match &self.nginx {
                    Baseline::Measured(n) => Some(n),
                    Baseline::Skipped(_) => None,
                },
            ),
        ];
        for (name, r) in phases {
            for (kind, n) in r.map(|r| &r.errors).into_iter().flatten() {
                let _ = writeln!(s, "error  {name}: {n} x {kind}");
            }
        }
        for (name, r) in [
            ("relay max", Some(&self.relay_max)),
            ("relay fixed", self.fixed.as_ref().map(|f| &f.result)),
            (
                "nginx",
                match &self.nginx {
                    Baseline::Measured(n) => Some(&**n),
                    Baseline::Skipped(_) => None,
                },
            ),
        ] {
            if let Some(r) = r {
                let _ = writeln!(s, "cpu    {name}: {}", cpu_line(r));
            }
        }
        if let Some(dir) = &self.kept_dir {
            let _ = writeln!(s, "relay data kept  : {}", dir.display());
        }
        s
    }

    fn json(&self, args: &Args) -> serde_json::Value {
        json!({
            "config": {
                "seconds": args.seconds,
                "connections": args.connections,
                "events_per_batch": args.events_per_batch,
                "event_bytes": self.relay_max.bytes_per_event(),
                "rate_fraction": args.rate_fraction,
                "client_threads": args.client_threads,
                "cpus": self.cpus,
                "fsync": true,
            },
            "relay_max": phase_json(&self.relay_max),
            "relay_fixed": self.fixed.as_ref().map(|f| {
                let mut v = phase_json(&f.result);
                v["target_events_per_sec"] = json!(f.target_events_per_sec);
                v["send_lag_p99_ms"] = json!(f.result.send_lag.value_at_quantile(0.99) as f64 / 1000.0);
                v
            }),
            "nginx": match &self.nginx {
                Baseline::Measured(n) => phase_json(n),
                Baseline::Skipped(why) => json!({ "skipped": why }),
            },
            "ratio_relay_nginx": self.ratio(),
            "relay_peak_rss_bytes": self.peak_rss_bytes,
            "warehouse": {
                "ok": self.warehouse.ok(),
                "rows": self.warehouse.rows,
                "accepted": self.warehouse.accepted,
                "spool_depth_left": self.warehouse.depth_left,
                "drain_seconds": self.warehouse.drain_time.as_secs_f64(),
                "problem": self.warehouse.problem,
            },
            "relay_exit": { "ok": self.relay_exit_ok, "status": self.relay_exit },
            "fanout": match &self.fanout {
                Fanout::Measured(f) => f.json(),
                Fanout::Skipped(why) => json!({ "skipped": why }),
            },
            "warmup_errors": self.warmup.errors,
            "passed": self.passed(),
        })
    }
}
