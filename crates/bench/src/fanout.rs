//! The fan-out measurement (`--fanout`, on by default): what forwarding to more than one sink
//! costs the relay's ingest, and how fast each kind of sink drains a backlog.
//!
//! It runs after the warehouse-only relay of the main phases has stopped (so nothing else of
//! the benchmark runs meanwhile), in the same process and run, so that its figures compare
//! with the main closed loop's.
//!
//! 1. **Ingest with three sinks.** A fresh relay (new temporary data directory, the same
//!    config as the main relay) with three `[[sinks]]`: the embedded `warehouse`, a `webhook`
//!    and `posthog`, both HTTP sinks pointed at loopback receivers run by the benchmark (see
//!    `receiver`: a bare hyper server on a thread and runtime of its own, answering `200`
//!    after reading each body and counting the events in its JSON array). The same warm-up
//!    and the same closed loop (connections, batch size, `--seconds`) as the main relay's;
//!    all three forwarders run during the load, as they would in production. Compared with
//!    the main closed loop (the relay with the embedded warehouse alone, which is what runs
//!    when no `[[sinks]]` is configured): `ratio 3 sinks/1 sink` (goal ≥ 0.90). The receivers'
//!    CPU is counted apart (they would be other machines in production; here they share the
//!    2 cores with the relay and are part of the price). After the load it notes each sink's
//!    backlog, waits until every backlog is 0 and checks: the warehouse holds exactly the
//!    events acknowledged as accepted, and each receiver counted at least that many (delivery
//!    is at least once: a resent batch is counted again).
//!    Also shown: each sink's backlog when the load ended and how much of what was accepted
//!    it had delivered by then (a sink slower than ingest falls behind during the load, so the
//!    closed loop's figure is more than all three sinks could sustain), and the time until
//!    every backlog was 0.
//! 2. **Forwarding throughput per sink kind** (`warehouse`, `webhook`, `posthog`, `segment`,
//!    each with its default batch size and request size; the HTTP sinks with
//!    `--fanout-concurrency`, default 1 like the relay's). For each kind:
//!    a *preload* relay on a fresh data directory whose only sink, `hold`, is a webhook
//!    pointed at a receiver answering `503` with `Retry-After: 3600` (its forwarder sends one
//!    request and then waits; nothing is deleted from the spool) takes `--fanout-events`
//!    events from the closed loop and is stopped (SIGTERM). A second relay is then started on
//!    the same data directory with the sink under test as its only sink: a sink new to a spool
//!    starts from the oldest record still spooled, so its backlog is exactly those events, and
//!    it starts delivering at once with no retry backoff to wait out. The benchmark polls
//!    `GET /sinks` every 10 ms from the relay's readiness until the sink's `backlog_rows` is 0;
//!    the rate is the sink's `delivered` count over that window divided by its length (the
//!    relay's start-up is not in it; at most the batch in flight at the first poll is counted
//!    a little early, under 1 % with the defaults). Nothing else runs meanwhile, so it is the
//!    most that kind of sink forwards on this machine with the relay alone on it (and, for
//!    HTTP sinks, a receiver sharing its CPUs). It is put next to the main closed loop's
//!    ingest rate: `ratio <kind>/ingest` (goal ≥ 1: a sink that forwards slower than the relay
//!    ingests falls behind under sustained full load, and the spool grows until its limit).
//!    Checks: the warehouse holds exactly the preloaded events; a receiver at least as many.
//!    `postgres` too when a database is given (`--postgres URL`, else `TRUEUP_TEST_POSTGRES`;
//!    `.ci/postgres` starts the local one): the sink writes a schema of its own, created empty
//!    and dropped after, with `batch_size = 5000` and `concurrency = 2` (what the README
//!    recommends); the CPU of the database's server processes serving it is shown in place of
//!    a receiver's, and the check counts its rows.
//! 3. **Where the CPU goes.** The relay's CPU time per event (from `/proc/<pid>/stat`): while
//!    ingesting with nothing forwarded (the preloads, whose only sink is on hold; their
//!    events/s are shown too, as `0 sinks`), in the warehouse-only closed loop, in the
//!    three-sink closed loop, and per event forwarded by each kind. Ingest alone plus the
//!    forwarding of the three sinks is what every event costs when all three keep up; the
//!    machine's cores divided by that cost is the most the relay could sustain with those
//!    sinks here (the `note` line), which tells whether the three-sink figure is CPU-bound.
//!
//! Everything is bounded: the preload by its event count (and [`PRELOAD_TIMEOUT`]), each
//! wait for a backlog by [`FORWARD_TIMEOUT`] or [`DRAIN_TIMEOUT`]. With `--seconds 10` on
//! 2 cores the whole part takes about a minute.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::load::{self, Expect, Load, PhaseResult, Target};
use crate::pg::{PgScratch, cpu_between};
use crate::procs::{self, RelayProc, RelaySetup, SinkStatus};
use crate::receiver::{Mode, Receiver};
use crate::{COLLECT_PATH, READY_TIMEOUT, cpu_line, phase_json, phase_line, with_cpu};

/// Longest wait, after the three-sink load, for every sink's backlog to reach 0.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest the preload of one sink's backlog may take.
const PRELOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for one sink to deliver its preloaded backlog.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `GET /sinks` is polled while a backlog drains.
const POLL: Duration = Duration::from_millis(10);

/// What the fan-out part needs from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub connections: usize,
    pub events_per_batch: usize,
    pub seconds: u64,
    pub warmup_seconds: u64,
    /// Events preloaded for each sink's forwarding measurement.
    pub events: u64,
    /// The warehouse-only relay's closed-loop ingest rate, measured earlier in this run.
    pub ingest_events_per_sec: f64,
    /// The relay's CPU per event in that closed loop (ingest plus the warehouse's forwarding).
    pub ingest_cpu_per_event: Option<Duration>,
    /// `concurrency` of the HTTP sinks (the relay's default is 1).
    pub concurrency: u64,
}

/// A kind of sink under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Warehouse,
    Webhook,
    Posthog,
    Segment,
    Postgres,
}

impl Kind {
    /// The kinds measured on every run; `Postgres` is added when a database is given.
    pub const ALL: [Kind; 4] = [Kind::Warehouse, Kind::Webhook, Kind::Posthog, Kind::Segment];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Warehouse => "warehouse",
            Kind::Webhook => "webhook",
            Kind::Posthog => "posthog",
            Kind::Segment => "segment",
            Kind::Postgres => "postgres",
        }
    }

    /// Its `[[sinks]]` table, named after its kind; `url` is the receiver's base URL.
    fn sink_toml(self, url: Option<&str>, secret_file: &Path, concurrency: u64) -> String {
        let name = self.as_str();
        match (self, url) {
            (Kind::Postgres, _) => format!(
                "\n[[sinks]]\nname = \"{name}\"\nkind = \"postgres\"\nbatch_size = 5000\nconcurrency = 2\nsecret_file = {}\n",
                toml_str(&secret_file.display().to_string())
            ),
            (Kind::Warehouse, _) | (_, None) => {
                format!("\n[[sinks]]\nname = \"{name}\"\nkind = \"warehouse\"\n")
            }
            (_, Some(url)) => {
                let url = match self {
                    // The webhook is POSTed to its URL as is; PostHog and Segment get their
                    // API's path appended by the relay.
                    Kind::Webhook => format!("{url}/hook"),
                    _ => url.to_string(),
                };
                format!(
                    "\n[[sinks]]\nname = \"{name}\"\nkind = \"{name}\"\nurl = {}\nsecret_file = {}\nconcurrency = {concurrency}\n",
                    toml_str(&url),
                    toml_str(&secret_file.display().to_string())
                )
            }
        }
    }
}

/// A TOML basic string (JSON's escaping is valid TOML for these ASCII paths and URLs).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// The preload relay's only sink: a webhook whose receiver holds (503, Retry-After 3600).
fn hold_toml(url: &str, secret_file: &Path) -> String {
    format!(
        "\n[[sinks]]\nname = \"hold\"\nkind = \"webhook\"\nurl = {}\nsecret_file = {}\n",
        toml_str(&format!("{url}/hold")),
        toml_str(&secret_file.display().to_string())
    )
}

/// Everything the fan-out part measured.
pub struct Report {
    pub ingest: ThreeSinks,
    pub forwarding: Vec<Forward>,
    /// The warehouse-only closed loop's events/s (the main phase).
    pub ingest_events_per_sec: f64,
    /// The relay's CPU per event in that closed loop.
    pub ingest_cpu_per_event: Option<Duration>,
    /// `concurrency` of the HTTP sinks.
    pub concurrency: u64,
    /// Why the `postgres` sink was not measured, if it was not.
    pub postgres_skipped: Option<String>,
    pub cpus: usize,
}

/// The three-sink relay's ingest.
pub struct ThreeSinks {
    pub warmup: PhaseResult,
    pub result: PhaseResult,
    /// CPU of the two receivers' threads during the measured closed loop.
    pub receiver_cpu: Option<Duration>,
    /// Each sink's backlog when the load ended.
    pub backlog_at_end: Vec<SinkStatus>,
    /// Each sink at the end of the drain wait.
    pub final_sinks: Vec<SinkStatus>,
    pub drain_time: Duration,
    pub accepted: u64,
    pub warehouse_rows: Option<u64>,
    pub webhook_events: u64,
    pub posthog_events: u64,
    pub peak_rss_bytes: Option<u64>,
    pub problems: Vec<String>,
}

/// One sink kind's forwarding measurement.
pub struct Forward {
    pub kind: Kind,
    /// The preload's closed loop.
    pub preload: PhaseResult,
    /// The sink's backlog at the first poll (what the window covers, mostly).
    pub backlog_at_start: u64,
    /// Records the sink delivered during the window.
    pub window_events: u64,
    pub window: Duration,
    /// The relay's CPU over the window.
    pub relay_cpu: Option<Duration>,
    /// The receiver thread's CPU over the window (HTTP sinks); for `postgres`, the server
    /// process of the sink's connection.
    pub receiver_cpu: Option<Duration>,
    /// Requests the receiver answered 200 (HTTP sinks).
    pub requests: Option<u64>,
    /// Events the receiver counted (HTTP sinks).
    pub received: Option<u64>,
    /// Rows in the warehouse (warehouse and postgres sinks).
    pub warehouse_rows: Option<u64>,
    pub problems: Vec<String>,
}

impl Forward {
    pub fn events_per_sec(&self) -> f64 {
        let s = self.window.as_secs_f64();
        if s > 0.0 {
            self.window_events as f64 / s
        } else {
            0.0
        }
    }

    fn cores(&self, cpu: Option<Duration>) -> Option<f64> {
        let s = self.window.as_secs_f64();
        cpu.filter(|_| s > 0.0).map(|c| c.as_secs_f64() / s)
    }

    pub fn relay_cores(&self) -> Option<f64> {
        self.cores(self.relay_cpu)
    }

    pub fn receiver_cores(&self) -> Option<f64> {
        self.cores(self.receiver_cpu)
    }

    fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn delta(after: Option<Duration>, before: Option<Duration>) -> Option<Duration> {
    Some(after?.saturating_sub(before?))
}

fn sum_cpu(rs: &[&Receiver]) -> Option<Duration> {
    rs.iter().map(|r| r.cpu_time()).sum()
}

/// Stops a relay and notes a failed exit as a problem.
fn stop(relay: &mut RelayProc, what: &str, problems: &mut Vec<String>) {
    let (status, ok) = crate::stop_relay(relay);
    if !ok {
        problems.push(format!("{what} relay exit: {status}"));
        eprintln!("{what} relay log (last lines):\n{}", relay.log_tail(20));
    }
}

/// Notes a phase's failed requests as a problem.
fn note_errors(r: &PhaseResult, what: &str, problems: &mut Vec<String>) {
    if r.error_count() > 0 {
        problems.push(format!("{what}: {} failed requests", r.error_count()));
    }
}

/// `application_name` of the `postgres` sink's connections.
const PG_APP: &str = "trueup-bench-sink";

/// Runs the whole fan-out part; `postgres`: the database for the `postgres` sink's figure.
pub async fn run(s: Settings, relay_bin: &Path, postgres: Option<&str>) -> anyhow::Result<Report> {
    let secrets = tempfile::Builder::new()
        .prefix("trueup-bench-secrets-")
        .tempdir()?;
    let secret_file = secrets.path().join("sink-secret");
    std::fs::write(&secret_file, "trueup-bench-not-a-secret\n")?;
    let started = Instant::now();
    let ingest = three_sinks(s, relay_bin, &secret_file).await?;
    let mut forwarding = Vec::new();
    let hold = Receiver::start("hold", Mode::Hold)?;
    for (i, kind) in Kind::ALL.into_iter().enumerate() {
        forwarding.push(forward(s, relay_bin, &secret_file, &hold, kind, 20 + i, None).await?);
    }
    let postgres = match postgres {
        Some(url) => {
            let pg = PgScratch::create(url, secrets.path(), "sink", PG_APP).await?;
            let f = forward(
                s,
                relay_bin,
                &secret_file,
                &hold,
                Kind::Postgres,
                20 + Kind::ALL.len(),
                Some(&pg),
            )
            .await;
            pg.drop_schema().await?;
            forwarding.push(f?);
            None
        }
        None => Some("no database (--postgres URL or TRUEUP_TEST_POSTGRES)".to_string()),
    };
    eprintln!("fan-out part took {:.0} s", started.elapsed().as_secs_f64());
    Ok(Report {
        ingest,
        forwarding,
        ingest_events_per_sec: s.ingest_events_per_sec,
        ingest_cpu_per_event: s.ingest_cpu_per_event,
        concurrency: s.concurrency,
        postgres_skipped: postgres,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

async fn three_sinks(
    s: Settings,
    relay_bin: &Path,
    secret_file: &Path,
) -> anyhow::Result<ThreeSinks> {
    let webhook = Receiver::start("webhook", Mode::Accept)?;
    let posthog = Receiver::start("posthog", Mode::Accept)?;
    let config = [
        Kind::Warehouse.sink_toml(None, secret_file, s.concurrency),
        Kind::Webhook.sink_toml(Some(&webhook.url()), secret_file, s.concurrency),
        Kind::Posthog.sink_toml(Some(&posthog.url()), secret_file, s.concurrency),
    ]
    .concat();
    eprintln!("fan-out: starting a relay with three sinks (warehouse, webhook, posthog)");
    let mut relay = RelayProc::start_with(
        relay_bin,
        RelaySetup {
            extra_config: config,
            dir: None,
            label: "3sinks",
        },
        READY_TIMEOUT,
    )
    .await?;
    let target = Target::new(relay.addr, COLLECT_PATH, Expect::RelayAccepted)?;
    let load = |phase: usize, seconds: u64| Load {
        connections: s.connections,
        events_per_batch: s.events_per_batch,
        duration: Duration::from_secs(seconds),
        phase,
        max_batches: None,
    };
    let warmup = if s.warmup_seconds > 0 {
        eprintln!(
            "fan-out warm-up: {} s closed loop (not measured)",
            s.warmup_seconds
        );
        load::closed_loop(&target, load(10, s.warmup_seconds)).await?
    } else {
        PhaseResult::empty()
    };
    eprintln!(
        "fan-out closed loop, three sinks: {} connections, {} s",
        s.connections, s.seconds
    );
    let receivers_before = sum_cpu(&[&webhook, &posthog]);
    let mut result = with_cpu(
        relay.pid(),
        load::closed_loop(&target, load(11, s.seconds)),
        procs::cpu_time,
    )
    .await?;
    let receiver_cpu = delta(sum_cpu(&[&webhook, &posthog]), receivers_before);
    // The bench process's CPU includes the receivers' threads: the load generator's is the rest.
    result.client_cpu = delta(result.client_cpu, receiver_cpu);
    crate::check_alive(&mut relay)?;
    let mut problems = Vec::new();
    let backlog_at_end = relay.sinks().await?;
    eprintln!(
        "  {}; {}; receivers {} cores",
        phase_line(&result),
        cpu_line(&result),
        cores_str(receiver_cpu.map(|c| c.as_secs_f64() / result.elapsed.as_secs_f64()))
    );
    eprintln!(
        "  backlog at the end of the load: {}",
        backlog_at_end
            .iter()
            .map(|b| format!("{} {}", b.name, b.backlog_rows))
            .collect::<Vec<_>>()
            .join(", ")
    );
    note_errors(&warmup, "three-sink warm-up", &mut problems);
    note_errors(&result, "three-sink closed loop", &mut problems);
    let accepted = warmup.accepted + result.accepted;
    eprintln!(
        "  waiting for every sink's backlog to reach 0 (at most {} s)",
        DRAIN_TIMEOUT.as_secs()
    );
    let drain_started = Instant::now();
    let deadline = drain_started + DRAIN_TIMEOUT;
    let final_sinks = loop {
        let sinks = relay.sinks().await?;
        if sinks.iter().all(|x| x.backlog_rows == 0) || Instant::now() >= deadline {
            break sinks;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let drain_time = drain_started.elapsed();
    for x in &final_sinks {
        if x.backlog_rows > 0 {
            problems.push(format!(
                "sink {} still had {} records to deliver after {} s",
                x.name,
                x.backlog_rows,
                DRAIN_TIMEOUT.as_secs()
            ));
        }
        if x.dead_lettered > 0 {
            problems.push(format!(
                "sink {} dead-lettered {} records",
                x.name, x.dead_lettered
            ));
        }
    }
    let warehouse_rows = match relay.warehouse_rows() {
        Ok(n) => Some(n),
        Err(e) => {
            problems.push(format!("cannot count the warehouse rows: {e:#}"));
            None
        }
    };
    if warehouse_rows.is_some_and(|n| n != accepted) {
        problems.push(format!(
            "warehouse rows {} != accepted {accepted}",
            warehouse_rows.unwrap_or_default()
        ));
    }
    let (webhook_events, posthog_events) = (webhook.events(), posthog.events());
    for (name, n, r) in [
        ("webhook", webhook_events, &webhook),
        ("posthog", posthog_events, &posthog),
    ] {
        if n < accepted {
            problems.push(format!(
                "the {name} receiver counted {n} events, fewer than the {accepted} accepted"
            ));
        }
        let unreadable = r
            .counts
            .unreadable
            .load(std::sync::atomic::Ordering::Relaxed);
        if unreadable > 0 {
            problems.push(format!(
                "the {name} receiver could not read {unreadable} bodies"
            ));
        }
    }
    eprintln!(
        "  drained in {:.1} s; warehouse rows {}, webhook events {webhook_events}, posthog events {posthog_events}, accepted {accepted}",
        drain_time.as_secs_f64(),
        warehouse_rows.map_or("?".into(), |n| n.to_string())
    );
    let peak_rss_bytes = relay.peak_rss_bytes().ok();
    stop(&mut relay, "three-sink", &mut problems);
    Ok(ThreeSinks {
        warmup,
        result,
        receiver_cpu,
        backlog_at_end,
        final_sinks,
        drain_time,
        accepted,
        warehouse_rows,
        webhook_events,
        posthog_events,
        peak_rss_bytes,
        problems,
    })
}

async fn forward(
    s: Settings,
    relay_bin: &Path,
    secret_file: &Path,
    hold: &Receiver,
    kind: Kind,
    phase: usize,
    pg: Option<&PgScratch>,
) -> anyhow::Result<Forward> {
    let name = kind.as_str();
    let batches = s.events.div_ceil(s.events_per_batch as u64).max(1);
    let mut problems = Vec::new();
    eprintln!(
        "fan-out forwarding, {name}: preloading {} events (sink on hold)",
        batches * s.events_per_batch as u64
    );
    let mut relay = RelayProc::start_with(
        relay_bin,
        RelaySetup {
            extra_config: hold_toml(&hold.url(), secret_file),
            dir: None,
            label: "preload",
        },
        READY_TIMEOUT,
    )
    .await?;
    let target = Target::new(relay.addr, COLLECT_PATH, Expect::RelayAccepted)?;
    let preload = with_cpu(
        relay.pid(),
        load::closed_loop(
            &target,
            Load {
                connections: s.connections,
                events_per_batch: s.events_per_batch,
                duration: PRELOAD_TIMEOUT,
                phase,
                max_batches: Some(batches),
            },
        ),
        procs::cpu_time,
    )
    .await?;
    crate::check_alive(&mut relay)?;
    note_errors(&preload, &format!("{name} preload"), &mut problems);
    let preloaded = preload.accepted;
    if preloaded < batches * s.events_per_batch as u64 {
        problems.push(format!(
            "{name} preload: {preloaded} of {} events accepted within {} s",
            batches * s.events_per_batch as u64,
            PRELOAD_TIMEOUT.as_secs()
        ));
    }
    eprintln!("  {}; {}", phase_line(&preload), cpu_line(&preload));
    stop(&mut relay, &format!("{name} preload"), &mut problems);
    let dir = relay.into_dir();

    let receiver = match kind {
        Kind::Warehouse | Kind::Postgres => None,
        _ => Some(Receiver::start(name, Mode::Accept)?),
    };
    let config = kind.sink_toml(
        receiver.as_ref().map(|r| r.url()).as_deref(),
        pg.map_or(secret_file, |pg| &pg.url_file),
        s.concurrency,
    );
    eprintln!("  starting the relay again with the {name} sink alone");
    let mut relay = RelayProc::start_with(
        relay_bin,
        RelaySetup {
            extra_config: config,
            dir: Some(dir),
            label: name,
        },
        READY_TIMEOUT,
    )
    .await?;
    let sink_of = |sinks: Vec<SinkStatus>| sinks.into_iter().find(|x| x.name == name);
    let first = sink_of(relay.sinks().await?)
        .ok_or_else(|| anyhow::anyhow!("GET /sinks has no sink {name}"))?;
    let t0 = Instant::now();
    let relay_before = procs::cpu_time(relay.pid());
    let receiver_before = receiver.as_ref().and_then(|r| r.cpu_time());
    // The sink may connect to PostgreSQL again after this: such server processes start at 0.
    let pg_before = match pg {
        Some(pg) => pg.backend_cpu().await,
        None => Vec::new(),
    };
    let deadline = t0 + FORWARD_TIMEOUT;
    let mut last = first.clone();
    while last.backlog_rows > 0 && Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
        if let Some(x) = sink_of(relay.sinks().await?) {
            last = x;
        }
    }
    let window = t0.elapsed();
    let relay_cpu = delta(procs::cpu_time(relay.pid()), relay_before);
    let receiver_cpu = match pg {
        Some(pg) => Some(cpu_between(&pg_before, &pg.backend_cpu().await)),
        None => delta(
            receiver.as_ref().and_then(|r| r.cpu_time()),
            receiver_before,
        ),
    };
    crate::check_alive(&mut relay)?;
    if last.backlog_rows > 0 {
        problems.push(format!(
            "{name}: {} records still to deliver after {} s",
            last.backlog_rows,
            FORWARD_TIMEOUT.as_secs()
        ));
    }
    if last.dead_lettered > 0 {
        problems.push(format!(
            "{name}: {} records dead-lettered",
            last.dead_lettered
        ));
    }
    if first.backlog_rows < preloaded / 2 {
        problems.push(format!(
            "{name}: only {} of {preloaded} records were left at the first poll; the window \
             is too short to measure (raise --fanout-events)",
            first.backlog_rows
        ));
    }
    let (mut warehouse_rows, mut received, mut requests) = (None, None, None);
    let rows = match pg {
        Some(pg) => pg.rows().await,
        None => relay.warehouse_rows(),
    };
    match &receiver {
        None => match rows {
            Ok(n) => {
                warehouse_rows = Some(n);
                if n != preloaded {
                    problems.push(format!("warehouse rows {n} != preloaded {preloaded}"));
                }
            }
            Err(e) => problems.push(format!("cannot count the warehouse rows: {e:#}")),
        },
        Some(r) => {
            let n = r.events();
            received = Some(n);
            requests = Some(r.counts.requests.load(std::sync::atomic::Ordering::Relaxed));
            if n < preloaded {
                problems.push(format!(
                    "the {name} receiver counted {n} events, fewer than the {preloaded} preloaded"
                ));
            }
        }
    }
    stop(&mut relay, name, &mut problems);
    let f = Forward {
        kind,
        preload,
        backlog_at_start: first.backlog_rows,
        window_events: last.delivered.saturating_sub(first.delivered),
        window,
        relay_cpu,
        receiver_cpu,
        requests,
        received,
        warehouse_rows,
        problems,
    };
    eprintln!(
        "  {name}: {:.0} events/s ({} events in {:.2} s; relay {} cores{})",
        f.events_per_sec(),
        f.window_events,
        f.window.as_secs_f64(),
        cores_str(f.relay_cores()),
        f.receiver_cores().map_or(String::new(), |c| format!(
            ", {} {c:.2} cores",
            f.receiver_label()
        )),
    );
    Ok(f)
}

/// CPU per event, microseconds.
fn per_event_us(cpu: Option<Duration>, events: u64) -> Option<f64> {
    cpu.filter(|_| events > 0)
        .map(|c| c.as_secs_f64() * 1e6 / events as f64)
}

fn us_str(us: Option<f64>) -> String {
    us.map_or("?".into(), |u| format!("{u:.1} us"))
}

fn cores_str(c: Option<f64>) -> String {
    c.map_or("?".into(), |c| format!("{c:.2}"))
}

impl ThreeSinks {
    fn receiver_cores(&self) -> Option<f64> {
        let s = self.result.elapsed.as_secs_f64();
        self.receiver_cpu
            .filter(|_| s > 0.0)
            .map(|c| c.as_secs_f64() / s)
    }
}

impl Forward {
    /// What `receiver_cpu` measured.
    fn receiver_label(&self) -> &'static str {
        match self.kind {
            Kind::Postgres => "postgres backends",
            _ => "receiver",
        }
    }

    /// The relay's CPU per event forwarded, microseconds.
    fn cpu_per_event_us(&self) -> Option<f64> {
        per_event_us(self.relay_cpu, self.window_events)
    }
}

impl Report {
    /// Ingest with nothing forwarded (the preloads, their only sink on hold): events/s over
    /// all of them.
    pub fn held_events_per_sec(&self) -> f64 {
        let events: u64 = self.forwarding.iter().map(|f| f.preload.events).sum();
        let secs: f64 = self
            .forwarding
            .iter()
            .map(|f| f.preload.elapsed.as_secs_f64())
            .sum();
        if secs > 0.0 {
            events as f64 / secs
        } else {
            0.0
        }
    }

    /// The relay's CPU per event ingested with nothing forwarded (the preloads), microseconds.
    pub fn held_cpu_per_event_us(&self) -> Option<f64> {
        let cpu: Option<Duration> = self.forwarding.iter().map(|f| f.preload.server_cpu).sum();
        let events = self.forwarding.iter().map(|f| f.preload.events).sum();
        per_event_us(cpu, events)
    }

    /// What the relay's CPU per event should be with the three sinks (ingest alone plus each
    /// sink's forwarding, measured apart), microseconds; and the rate the machine's CPUs
    /// would allow at that cost.
    fn three_sink_model(&self) -> Option<(f64, f64)> {
        let mut us = self.held_cpu_per_event_us()?;
        for kind in [Kind::Warehouse, Kind::Webhook, Kind::Posthog] {
            us += self
                .forwarding
                .iter()
                .find(|f| f.kind == kind)?
                .cpu_per_event_us()?;
        }
        Some((us, self.cpus as f64 * 1e6 / us))
    }

    /// Three-sink ingest over warehouse-only ingest.
    pub fn ingest_ratio(&self) -> Option<f64> {
        (self.ingest_events_per_sec > 0.0)
            .then(|| self.ingest.result.events_per_sec() / self.ingest_events_per_sec)
    }

    fn forward_ratio(&self, f: &Forward) -> Option<f64> {
        (self.ingest_events_per_sec > 0.0).then(|| f.events_per_sec() / self.ingest_events_per_sec)
    }

    /// Every check of the fan-out part passed.
    pub fn passed(&self) -> bool {
        self.ingest.problems.is_empty() && self.forwarding.iter().all(Forward::ok)
    }

    pub fn text(&self, s: &mut String) {
        use std::fmt::Write as _;
        let i = &self.ingest;
        let _ = writeln!(
            s,
            "fanout  1 sink   : {:.0} events/s  (ingest, the embedded warehouse alone: relay max above)",
            self.ingest_events_per_sec
        );
        let _ = writeln!(
            s,
            "fanout  3 sinks  : {}  (ingest, warehouse + webhook + posthog, concurrency {}; receivers {} cores)",
            phase_line(&i.result),
            self.concurrency,
            cores_str(i.receiver_cores())
        );
        let _ = writeln!(
            s,
            "fanout  0 sinks  : {:.0} events/s  (ingest with the only sink on hold, nothing forwarded: the preloads)",
            self.held_events_per_sec()
        );
        match self.ingest_ratio() {
            Some(r) => {
                let _ = writeln!(s, "ratio 3 sinks/1  : {r:.3}  (goal >= 0.90)");
            }
            None => {
                let _ = writeln!(s, "ratio 3 sinks/1  : n/a");
            }
        }
        for b in &i.backlog_at_end {
            let kept_up = if i.accepted > 0 {
                format!(
                    "{:.0}%",
                    100.0 * b.delivered.min(i.accepted) as f64 / i.accepted as f64
                )
            } else {
                "?".into()
            };
            let _ = writeln!(
                s,
                "backlog {:<9}: {} records  (at the end of the three-sink load; {kept_up} of the accepted events delivered by then)",
                b.name, b.backlog_rows
            );
        }
        let _ = writeln!(
            s,
            "fanout  drain    : {:.1} s  (after the three-sink load, until every backlog was 0)",
            i.drain_time.as_secs_f64()
        );
        for f in &self.forwarding {
            let cpu = match (f.relay_cores(), f.receiver_cores()) {
                (Some(r), Some(c)) => {
                    format!("relay {r:.2} cores, {} {c:.2} cores", f.receiver_label())
                }
                (Some(r), None) => format!("relay {r:.2} cores"),
                _ => "cpu ?".into(),
            };
            let _ = writeln!(
                s,
                "forward {:<9}: {:.0} events/s  ({} events in {:.2} s, {cpu})",
                f.kind.as_str(),
                f.events_per_sec(),
                f.window_events,
                f.window.as_secs_f64()
            );
        }
        for f in &self.forwarding {
            let label = format!("{}/ingest", f.kind.as_str());
            match self.forward_ratio(f) {
                Some(r) => {
                    let _ = writeln!(s, "ratio {label:<16}: {r:.3}  (goal >= 1)");
                }
                None => {
                    let _ = writeln!(s, "ratio {label:<16}: n/a");
                }
            }
        }
        let _ = writeln!(
            s,
            "cpu/event ingest alone : {}  (relay CPU per event, the preloads: nothing forwarded)",
            us_str(self.held_cpu_per_event_us())
        );
        let _ = writeln!(
            s,
            "cpu/event 1 sink       : {}  (relay max: ingest + the warehouse's forwarding)",
            us_str(self.ingest_cpu_per_event.map(|d| d.as_secs_f64() * 1e6))
        );
        let _ = writeln!(
            s,
            "cpu/event 3 sinks      : {}  (the three-sink load; what was left in backlogs was forwarded after it)",
            us_str(per_event_us(i.result.server_cpu, i.result.events))
        );
        for f in &self.forwarding {
            let _ = writeln!(
                s,
                "cpu/event forward {:<9}: {}  (relay CPU per event forwarded)",
                f.kind.as_str(),
                us_str(f.cpu_per_event_us())
            );
        }
        if let Some((us, rate)) = self.three_sink_model() {
            let _ = writeln!(
                s,
                "note   fanout: ingest alone + forwarding to warehouse, webhook and posthog = {us:.1} us of relay CPU per event: {} cores allow at most {rate:.0} events/s",
                self.cpus
            );
        }
        for f in &self.forwarding {
            let used = f.relay_cores().unwrap_or(0.0) + f.receiver_cores().unwrap_or(0.0);
            if used >= 0.9 * self.cpus as f64 {
                let _ = writeln!(
                    s,
                    "note   forward {}: CPU-bound ({used:.2} of {} cores busy with the relay and the {})",
                    f.kind.as_str(),
                    self.cpus,
                    f.receiver_label()
                );
            }
        }
        if let Some(why) = &self.postgres_skipped {
            let _ = writeln!(s, "forward postgres : skipped ({why})");
        }
        let problems: Vec<&String> = i
            .problems
            .iter()
            .chain(self.forwarding.iter().flat_map(|f| &f.problems))
            .collect();
        if problems.is_empty() {
            let _ = writeln!(
                s,
                "fanout  checks   : OK (warehouse = accepted {}, webhook {} >= accepted, posthog {} >= accepted; each sink got its {} preloaded events)",
                i.accepted,
                i.webhook_events,
                i.posthog_events,
                self.forwarding.first().map_or(0, |f| f.preload.accepted)
            );
        } else {
            let _ = writeln!(s, "fanout  checks   : FAILED");
            for p in problems {
                let _ = writeln!(s, "error  fanout: {p}");
            }
        }
        let phases = [("fanout warm-up", &i.warmup), ("fanout 3 sinks", &i.result)];
        for (name, r) in phases.into_iter().chain(
            self.forwarding
                .iter()
                .map(|f| ("fanout preload", &f.preload)),
        ) {
            for (kind, n) in &r.errors {
                let _ = writeln!(s, "error  {name}: {n} x {kind}");
            }
        }
        let _ = writeln!(s, "cpu    fanout 3 sinks: {}", cpu_line(&i.result));
    }

    pub fn json(&self) -> serde_json::Value {
        let i = &self.ingest;
        let sinks = |v: &[SinkStatus]| {
            v.iter()
                .map(|x| {
                    json!({
                        "name": x.name,
                        "backlog_rows": x.backlog_rows,
                        "delivered": x.delivered,
                        "retries": x.retries,
                        "dead_lettered": x.dead_lettered,
                    })
                })
                .collect::<Vec<_>>()
        };
        json!({
            "http_sink_concurrency": self.concurrency,
            "postgres_skipped": self.postgres_skipped,
            "relay_cpu_us_per_event": {
                "ingest_alone": self.held_cpu_per_event_us(),
                "warehouse_only": self.ingest_cpu_per_event.map(|d| d.as_secs_f64() * 1e6),
                "three_sinks": per_event_us(i.result.server_cpu, i.result.events),
                "three_sinks_model": self.three_sink_model().map(|m| m.0),
                "three_sinks_model_max_events_per_sec": self.three_sink_model().map(|m| m.1),
            },
            "ingest_nothing_forwarded_events_per_sec": self.held_events_per_sec(),
            "ingest": {
                "warehouse_only_events_per_sec": self.ingest_events_per_sec,
                "three_sinks": phase_json(&i.result),
                "three_sinks_receiver_cpu_cores": i.receiver_cores(),
                "ratio_three_sinks_to_warehouse_only": self.ingest_ratio(),
                "sinks_at_end_of_load": sinks(&i.backlog_at_end),
                "sinks_after_drain": sinks(&i.final_sinks),
                "drain_seconds": i.drain_time.as_secs_f64(),
                "accepted": i.accepted,
                "warehouse_rows": i.warehouse_rows,
                "webhook_received_events": i.webhook_events,
                "posthog_received_events": i.posthog_events,
                "relay_peak_rss_bytes": i.peak_rss_bytes,
                "warmup_errors": i.warmup.errors,
                "ok": i.problems.is_empty(),
                "problems": i.problems,
            },
            "forwarding": self.forwarding.iter().map(|f| json!({
                "kind": f.kind.as_str(),
                "preloaded_events": f.preload.accepted,
                "preload_errors": f.preload.error_count(),
                "backlog_at_first_poll": f.backlog_at_start,
                "events": f.window_events,
                "seconds": f.window.as_secs_f64(),
                "events_per_sec": f.events_per_sec(),
                "ratio_to_ingest": self.forward_ratio(f),
                "relay_cpu_cores": f.relay_cores(),
                "relay_cpu_us_per_event": f.cpu_per_event_us(),
                "preload_events_per_sec": f.preload.events_per_sec(),
                "receiver_cpu_cores": f.receiver_cores(),
                "receiver_is": f.receiver_label(),
                "receiver_requests": f.requests,
                "receiver_events": f.received,
                "warehouse_rows": f.warehouse_rows,
                "ok": f.ok(),
                "problems": f.problems,
            })).collect::<Vec<_>>(),
            "passed": self.passed(),
        })
    }
}
