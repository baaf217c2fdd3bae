//! The dashboards' benchmark (`--dashboards`, instead of the usual phases): how long each call
//! of the dashboards' JSON API takes on a large warehouse.
//!
//! 1. **Generates** a data directory in a temporary directory, deterministically (fixed seed):
//!    a SQLite warehouse (`data/warehouse.sqlite`) of `--events` events over the last `--days`
//!    days, written through `trueup_warehouse`'s own API in batches of 10,000 rows (so the
//!    schema and the indexes are the real ones), plus up to 20,000 `agent_counters` rows; and a
//!    truth database (`truth.sqlite`) with a `users` row per server `signup_completed` event
//!    and an `orders` row per server `order_paid` event, on the same day.
//! 2. Starts the release relay on it (admin token, the two metrics reconciled against the
//!    truth database, a funnel) and waits for its ready file and `/readyz`.
//! 3. Calls `GET /api/v1/{quality,business,behaviour}?days=1|7|30` on the admin listener with
//!    the token: each once to warm up (not counted), then `--runs` times, timing each call
//!    (wall clock, from connect to the last byte of the body). Every answer must be `200`
//!    with `errors: []`; anything else means the benchmark is wrong and fails it.
//! 4. Stops the relay (SIGTERM) and removes the temporary directory (unless `--keep-data`).
//!
//! The goal is each call within [`GOAL_MS`]; a slower row is reported, never an error.
//!
//! The data's shape: 85 % client events, 15 % server events. A device has 1–59 client events
//! (30 on average) in sessions of 1–15 (8 on average), each session opening with a page view
//! and going on with names drawn from [`CLIENT_EVENTS`] (page views ~61 % of client events
//! overall), 2–90 s apart; `seq` rises by one per event of a device with 0.5 % of the numbers
//! skipped. Server events are drawn from [`SERVER_EVENTS`] at random times, for a pool of
//! existing customers (a signup is a new user). `received_at` is 50–2,000 ms after `ts`
//! (mostly near the low end); `stored_at` is the write's, as the warehouse sets it. The
//! client and server shares of `signup_completed` and `order_paid` are such that the client
//! events count about 90 % of what the system of record does.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use trueup_warehouse::{CountersRow, EventRow, Warehouse};

/// The slowest a call may be to meet the goal.
pub const GOAL_MS: f64 = 300.0;
/// The generator's seed: the same data on every run with the same `--events` and `--days`.
const SEED: u64 = 0x7472_7565_7570_6462;
/// Rows per warehouse write (one transaction each).
const BATCH_ROWS: usize = 10_000;
/// The most `agent_counters` rows (one per device, the first devices).
const COUNTER_ROWS: usize = 20_000;
/// Share of client events.
const CLIENT_SHARE: f64 = 0.85;
/// Share of a device's `seq` numbers that never arrive.
const SEQ_SKIP: f64 = 0.005;
/// Share of signups whose first-touch attribution is known.
const ATTRIBUTION_KNOWN: f64 = 0.85;
/// The admin token of the relay under test (32 characters).
const ADMIN_TOKEN: &str = "bench-dashboards-0123456789abcde";
const SITE: &str = "demo";
const MS_PER_DAY: i64 = 86_400_000;
/// No session starts later than this before now, so that its last event is in the past.
const LAST_SESSION_START_MS: i64 = 25 * 60 * 1000;
/// The API calls, each with every window.
const ENDPOINTS: [&str; 3] = ["quality", "business", "behaviour"];
const WINDOWS: [u32; 3] = [1, 7, 30];
/// Longest wait for the relay's ready file and `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a single API call may take before the benchmark gives up on it.
const CALL_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for the relay to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// Client event names with their weights (every session's first event is a page view).
const CLIENT_EVENTS: [(&str, f64); 20] = [
    ("page_view", 52.0),
    ("product_viewed", 10.0),
    ("button_clicked", 6.0),
    ("added_to_cart", 5.0),
    ("search_performed", 3.0),
    ("checkout_started", 3.0),
    ("scroll_depth", 2.0),
    ("order_paid", 1.5),
    ("product_list_viewed", 1.5),
    ("form_started", 1.5),
    ("signup_completed", 1.0),
    ("login_completed", 1.0),
    ("form_submitted", 1.0),
    ("video_played", 1.0),
    ("outbound_link_clicked", 1.0),
    ("cart_viewed", 0.7),
    ("file_downloaded", 0.5),
    ("coupon_applied", 0.5),
    ("error_shown", 0.5),
    ("newsletter_subscribed", 0.3),
];
/// Index of `page_view` in [`CLIENT_EVENTS`].
const PAGE_VIEW: u8 = 0;

/// Server event names with their weights.
const SERVER_EVENTS: [(&str, f64); 10] = [
    ("email_sent", 30.0),
    ("webhook_received", 15.0),
    ("invoice_sent", 14.0),
    ("subscription_renewed", 10.0),
    ("order_paid", 8.9),
    ("signup_completed", 5.9),
    ("api_key_created", 5.0),
    ("password_reset", 4.2),
    ("payment_failed", 4.0),
    ("refund_issued", 3.0),
];

/// First-touch sources of the signups whose attribution is known (`None`: no source
/// recorded, which the attribution SQL reads as `direct`).
const SOURCES: [(Option<&str>, f64); 7] = [
    (Some("google"), 40.0),
    (None, 20.0),
    (Some("newsletter"), 10.0),
    (Some("facebook"), 10.0),
    (Some("referral"), 10.0),
    (Some("bing"), 5.0),
    (Some("linkedin"), 5.0),
];

/// What the dashboards' benchmark needs from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    pub relay_bin: PathBuf,
    pub events: u64,
    pub days: u32,
    pub runs: u32,
    pub keep_data: bool,
}

/// Everything measured.
pub struct Report {
    settings: Settings,
    cpus: usize,
    generation: Generation,
    rows: Vec<CallRow>,
    relay_peak_rss_bytes: Option<u64>,
    relay_exit: String,
    relay_exit_ok: bool,
    kept_dir: Option<PathBuf>,
}

/// Generates the data, runs the relay on it and times the calls.
pub fn run(settings: Settings, runtime: &tokio::runtime::Runtime) -> anyhow::Result<Report> {
    let dir = tempfile::Builder::new()
        .prefix("trueup-bench-dashboards-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let layout = Layout::new(dir.path());
    std::fs::create_dir_all(&layout.data_dir).context("cannot create the data directory")?;
    eprintln!(
        "generating {} events over {} days in {}",
        settings.events,
        settings.days,
        dir.path().display()
    );
    let generation = generate(&layout, settings.events, settings.days)?;
    eprintln!("{}", generation.line());
    std::fs::write(&layout.config, relay_config(&layout))
        .context("cannot write the relay config")?;

    let measured = runtime.block_on(measure(&settings, &layout));
    let kept_dir = settings.keep_data.then(|| dir.keep());
    let (rows, relay_peak_rss_bytes, relay_exit, relay_exit_ok) = measured?;
    Ok(Report {
        settings,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        generation,
        rows,
        relay_peak_rss_bytes,
        relay_exit,
        relay_exit_ok,
        kept_dir,
    })
}

/// Starts the relay, times every call, stops the relay: (rows, peak RSS, exit, clean exit).
async fn measure(
    settings: &Settings,
    layout: &Layout,
) -> anyhow::Result<(Vec<CallRow>, Option<u64>, String, bool)> {
    eprintln!("starting the relay: {}", settings.relay_bin.display());
    let mut relay = RelayChild::start(&settings.relay_bin, layout).await?;
    eprintln!("relay ready (admin {})", relay.admin);
    let mut rows = Vec::new();
    for endpoint in ENDPOINTS {
        for days in WINDOWS {
            let row = time_calls(relay.admin, endpoint, days, settings.runs).await?;
            eprintln!("  {}", row.line());
            for p in &row.problems {
                eprintln!("    problem: {p}");
            }
            rows.push(row);
            if let Some(status) = relay.exited() {
                bail!(
                    "the relay exited during the calls ({status}):\n{}",
                    relay.log_tail(30)
                );
            }
        }
    }
    let rss = relay.peak_rss_bytes();
    eprintln!("stopping the relay (SIGTERM)");
    let (exit, ok) = relay.stop();
    if !ok {
        eprintln!("relay log (last lines):\n{}", relay.log_tail(20));
    }
    Ok((rows, rss, exit, ok))
}

// ---------------------------------------------------------------------------------------
// The files of a run.

/// Where everything of a run lives, in its temporary directory.
struct Layout {
    data_dir: PathBuf,
    warehouse: PathBuf,
    truth: PathBuf,
    config: PathBuf,
    log: PathBuf,
    ready_file: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> Layout {
        let data_dir = dir.join("data");
        Layout {
            warehouse: data_dir.join("warehouse.sqlite"),
            data_dir,
            truth: dir.join("truth.sqlite"),
            config: dir.join("relay.toml"),
            log: dir.join("relay.log"),
            ready_file: dir.join("relay.ready.json"),
        }
    }
}

/// A TOML basic string (JSON's escapes are TOML's).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// The relay's config: the generated data directory, the admin token, two metrics
/// reconciled against the truth database (not on a schedule), the funnel, the site.
fn relay_config(layout: &Layout) -> String {
    let signups_truth = "SELECT substr(created_at,1,10) AS day, count(*) AS actual, \
                         sum(attribution_known=0) AS unknown_attribution FROM users GROUP BY 1";
    let signups_attribution = "SELECT substr(created_at,1,10) AS day, count(*) AS conversions, \
                               CASE WHEN attribution_known=0 THEN NULL \
                               ELSE coalesce(ft_source,'direct') END AS source \
                               FROM users GROUP BY 1,3";
    let orders_truth = "SELECT substr(created_at,1,10) AS day, count(*) AS actual, \
                        sum(amount_cents)/100.0 AS value FROM orders GROUP BY 1";
    format!(
        "# Written by trueup-bench --dashboards.
listen = \"127.0.0.1:0\"
admin_listen = \"127.0.0.1:0\"
admin_token = {token}
data_dir = {data_dir}

[reconcile]
truth = {truth}
interval_secs = 0
days = 7

[[reconcile.metrics]]
name = \"signups\"
event = \"signup_completed\"
truth_sql = {signups_truth}
attribution_sql = {signups_attribution}

[[reconcile.metrics]]
name = \"orders\"
event = \"order_paid\"
truth_sql = {orders_truth}
value_label = \"revenue\"

[dashboard]
funnel = [\"page_view\", \"product_viewed\", \"added_to_cart\", \"checkout_started\", \"order_paid\"]

[[sites]]
key = \"{SITE}\"
origins = [\"https://shop.example\"]
",
        token = toml_str(ADMIN_TOKEN),
        data_dir = toml_str(&layout.data_dir.display().to_string()),
        truth = toml_str(&format!("sqlite:{}", layout.truth.display())),
        signups_truth = toml_str(signups_truth),
        signups_attribution = toml_str(signups_attribution),
        orders_truth = toml_str(orders_truth),
    )
}

// ---------------------------------------------------------------------------------------
// Deterministic randomness.

/// splitmix64's finalizer: a well-mixed 64-bit function of its input.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// splitmix64: small, fast, and good enough for synthetic data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// Picks an index with probability proportional to its weight.
struct Weighted {
    cumulative: Vec<f64>,
}

impl Weighted {
    fn new(weights: impl IntoIterator<Item = f64>) -> Weighted {
        let mut total = 0.0;
        let cumulative = weights
            .into_iter()
            .map(|w| {
                total += w;
                total
            })
            .collect();
        Weighted { cumulative }
    }

    fn pick(&self, rng: &mut Rng) -> usize {
        let x = rng.unit() * self.cumulative.last().copied().unwrap_or(0.0);
        self.cumulative
            .iter()
            .position(|&c| x < c)
            .unwrap_or(self.cumulative.len() - 1)
    }
}

/// Domains of the ids derived from an index or an event's salt, so that they never collide.
#[derive(Clone, Copy)]
enum IdKind {
    Device = 1,
    Anon = 2,
    Session = 3,
    User = 4,
    Customer = 5,
    Order = 6,
    Amount = 7,
}

/// A deterministic value of `kind` for `n`.
fn derived(kind: IdKind, n: u64) -> u64 {
    mix(n ^ ((kind as u64) << 56) ^ SEED)
}

/// A UUIDv7 string with the time `ms` and random bits drawn from `seed`.
fn uuid7(ms: i64, seed: u64) -> String {
    let mut random = [0u8; 10];
    random[..8].copy_from_slice(&mix(seed).to_le_bytes());
    random[8..].copy_from_slice(&mix(seed.rotate_left(32)).to_le_bytes()[..2]);
    uuid::Builder::from_unix_timestamp_millis(ms.max(0) as u64, &random)
        .into_uuid()
        .hyphenated()
        .to_string()
}

// ---------------------------------------------------------------------------------------
// The plan: every event as a few numbers, sorted by time; strings only when written.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Client,
    Server,
}

/// One event, before its strings exist.
#[derive(Clone, Copy)]
struct Planned {
    ts: i64,
    lag_ms: u16,
    source: Source,
    /// Index into [`CLIENT_EVENTS`] or [`SERVER_EVENTS`].
    name: u8,
    /// Client: the device's index. Server: the customer's (unused for a signup).
    actor: u32,
    /// Client only: the session's index.
    session: u32,
    /// Client only.
    seq: u32,
    /// The event's own random bits: its id, order id, amount, properties.
    salt: u64,
}

impl Planned {
    fn name(&self) -> &'static str {
        match self.source {
            Source::Client => CLIENT_EVENTS[usize::from(self.name)].0,
            Source::Server => SERVER_EVENTS[usize::from(self.name)].0,
        }
    }

    fn is_server(&self, name: &str) -> bool {
        self.source == Source::Server && self.name() == name
    }

    /// The user id of a server event: a new user's for a signup, else a customer's.
    fn user_id(&self) -> String {
        if self.name() == "signup_completed" {
            uuid7(self.ts, derived(IdKind::User, self.salt))
        } else {
            customer_id(self.actor)
        }
    }

    fn order_id(&self) -> String {
        uuid7(self.ts, derived(IdKind::Order, self.salt))
    }

    fn amount_cents(&self) -> i64 {
        500 + (derived(IdKind::Amount, self.salt) % 25_000) as i64
    }
}

/// A customer who signed up before the window.
fn customer_id(n: u32) -> String {
    let seed = derived(IdKind::Customer, u64::from(n));
    uuid7(1_600_000_000_000 + i64::from(n) * 60_000, seed)
}

struct Device {
    first_ts: i64,
    last_ts: i64,
    events: u32,
}

impl Device {
    fn id(n: u32, first_ts: i64) -> String {
        uuid7(first_ts, derived(IdKind::Device, u64::from(n)))
    }

    fn anon_id(n: u32, first_ts: i64) -> String {
        uuid7(first_ts, derived(IdKind::Anon, u64::from(n)))
    }
}

struct Plan {
    /// Sorted by `ts`.
    events: Vec<Planned>,
    devices: Vec<Device>,
    session_starts: Vec<i64>,
}

/// The window the events fall in, ms: `[start, end]`.
#[derive(Clone, Copy)]
struct Span {
    start: i64,
    end: i64,
}

fn plan(events: u64, days: u32, now_ms: i64) -> Plan {
    let mut rng = Rng(SEED);
    let client_target = (events as f64 * CLIENT_SHARE).round() as u64;
    let window = Span {
        start: now_ms - i64::from(days) * MS_PER_DAY,
        end: now_ms,
    };
    let mut plan = Plan {
        events: Vec::with_capacity(events as usize),
        devices: Vec::new(),
        session_starts: Vec::new(),
    };
    plan_client_events(&mut rng, client_target, window, &mut plan);
    plan_server_events(&mut rng, events - client_target, window, &mut plan);
    plan.events.sort_by_key(|e| e.ts);
    plan
}

/// A skewed lag from capture to the relay: 50–2,000 ms, mostly near 50.
fn receive_lag(rng: &mut Rng) -> u16 {
    (50 + rng.below(1951) * rng.below(1951) / 1950) as u16
}

/// Devices with sessions of client events until `target` events are planned.
fn plan_client_events(rng: &mut Rng, target: u64, window: Span, plan: &mut Plan) {
    let names = Weighted::new(CLIENT_EVENTS.iter().map(|(_, w)| *w));
    let mut planned = 0u64;
    while planned < target {
        let wanted = (rng.between(1, 59) as u64).min(target - planned);
        plan_device(rng, &names, wanted as u32, window, plan);
        planned += wanted;
    }
}

/// One device's `wanted` events, in sessions at random times (in order).
fn plan_device(rng: &mut Rng, names: &Weighted, wanted: u32, window: Span, plan: &mut Plan) {
    let device = plan.devices.len() as u32;
    let mut lengths = Vec::new();
    let mut left = wanted;
    while left > 0 {
        let n = (rng.between(1, 15) as u32).min(left);
        lengths.push(n);
        left -= n;
    }
    let latest_start = window.end - LAST_SESSION_START_MS;
    let mut starts: Vec<i64> = lengths
        .iter()
        .map(|_| rng.between(window.start, latest_start))
        .collect();
    starts.sort_unstable();
    let mut seq = 0u32;
    let mut last_ts = starts[0];
    for (start, length) in starts.iter().zip(lengths) {
        let session = plan.session_starts.len() as u32;
        plan.session_starts.push(*start);
        let mut ts = *start;
        for i in 0..length {
            seq += if rng.chance(SEQ_SKIP) { 2 } else { 1 };
            let name = if i == 0 {
                PAGE_VIEW
            } else {
                names.pick(rng) as u8
            };
            plan.events.push(Planned {
                ts,
                lag_ms: receive_lag(rng),
                source: Source::Client,
                name,
                actor: device,
                session,
                seq,
                salt: rng.next_u64(),
            });
            last_ts = ts;
            ts += rng.between(2_000, 90_000);
        }
    }
    plan.devices.push(Device {
        first_ts: starts[0],
        last_ts,
        events: wanted,
    });
}

/// `count` server events at random times, for a pool of customers (signups are new users).
fn plan_server_events(rng: &mut Rng, count: u64, window: Span, plan: &mut Plan) {
    let names = Weighted::new(SERVER_EVENTS.iter().map(|(_, w)| *w));
    let customers = (count / 20).max(100);
    for _ in 0..count {
        plan.events.push(Planned {
            ts: rng.between(window.start, window.end - 60_000),
            lag_ms: receive_lag(rng),
            source: Source::Server,
            name: names.pick(rng) as u8,
            actor: rng.below(customers) as u32,
            session: 0,
            seq: 0,
            salt: rng.next_u64(),
        });
    }
}

// ---------------------------------------------------------------------------------------
// Writing the warehouse and the truth database.

/// What the generation made, and how long it took.
pub struct Generation {
    events: u64,
    client_events: u64,
    server_events: u64,
    devices: usize,
    sessions: usize,
    counters: usize,
    users: u64,
    orders: u64,
    plan_time: Duration,
    warehouse_time: Duration,
    truth_time: Duration,
    warehouse_bytes: u64,
    truth_bytes: u64,
}

impl Generation {
    fn total_time(&self) -> Duration {
        self.plan_time + self.warehouse_time + self.truth_time
    }

    fn line(&self) -> String {
        format!(
            "generation: {:.1} s (plan {:.1} s, warehouse {:.1} s, truth {:.1} s); \
             {} events ({} client, {} server), {} devices, {} sessions, {} agent_counters, \
             {} users, {} orders; warehouse.sqlite {:.1} MiB",
            self.total_time().as_secs_f64(),
            self.plan_time.as_secs_f64(),
            self.warehouse_time.as_secs_f64(),
            self.truth_time.as_secs_f64(),
            self.events,
            self.client_events,
            self.server_events,
            self.devices,
            self.sessions,
            self.counters,
            self.users,
            self.orders,
            mib(self.warehouse_bytes)
        )
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

fn generate(layout: &Layout, events: u64, days: u32) -> anyhow::Result<Generation> {
    let started = Instant::now();
    let plan = plan(events, days, now_ms());
    let plan_time = started.elapsed();

    let started = Instant::now();
    let counters = write_warehouse(&layout.warehouse, &plan)?;
    let warehouse_time = started.elapsed();

    let started = Instant::now();
    let (users, orders) = write_truth(&layout.truth, &plan)?;
    let truth_time = started.elapsed();

    let client_events = plan
        .events
        .iter()
        .filter(|e| e.source == Source::Client)
        .count() as u64;
    Ok(Generation {
        events: plan.events.len() as u64,
        client_events,
        server_events: plan.events.len() as u64 - client_events,
        devices: plan.devices.len(),
        sessions: plan.session_starts.len(),
        counters,
        users,
        orders,
        plan_time,
        warehouse_time,
        truth_time,
        warehouse_bytes: sqlite_bytes(&layout.warehouse),
        truth_bytes: sqlite_bytes(&layout.truth),
    })
}

/// A SQLite database's size on disk, its write-ahead log included.
fn sqlite_bytes(path: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    size(path) + size(Path::new(&wal))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One event's strings, which its [`EventRow`] borrows.
struct EventStrings {
    id: String,
    anon_id: String,
    user_id: Option<String>,
    session_id: Option<String>,
    device_id: Option<String>,
    props: String,
}

/// `"<name>/1"` for every name, in the order of the name tables.
struct Schemas {
    client: Vec<String>,
    server: Vec<String>,
}

impl Schemas {
    fn new() -> Schemas {
        let schema = |(name, _): &(&str, f64)| format!("{name}/1");
        Schemas {
            client: CLIENT_EVENTS.iter().map(schema).collect(),
            server: SERVER_EVENTS.iter().map(schema).collect(),
        }
    }

    fn of(&self, e: &Planned) -> &str {
        match e.source {
            Source::Client => &self.client[usize::from(e.name)],
            Source::Server => &self.server[usize::from(e.name)],
        }
    }
}

fn event_strings(e: &Planned, plan: &Plan) -> EventStrings {
    let id = uuid7(e.ts, e.salt);
    match e.source {
        Source::Client => {
            let first_ts = plan.devices[e.actor as usize].first_ts;
            let session_start = plan.session_starts[e.session as usize];
            EventStrings {
                id,
                anon_id: Device::anon_id(e.actor, first_ts),
                user_id: None,
                session_id: Some(uuid7(
                    session_start,
                    derived(IdKind::Session, u64::from(e.session)),
                )),
                device_id: Some(Device::id(e.actor, first_ts)),
                props: props(e),
            }
        }
        Source::Server => {
            let user = e.user_id();
            EventStrings {
                id,
                anon_id: user.clone(),
                user_id: Some(user),
                session_id: None,
                device_id: None,
                props: props(e),
            }
        }
    }
}

/// Small properties for the events that have some; `{}` for the rest.
fn props(e: &Planned) -> String {
    let item = e.salt % 500;
    match e.name() {
        "page_view" => format!(r#"{{"path":"/products/{item}"}}"#),
        "product_viewed" => format!(
            r#"{{"product_id":"p-{item}","price_cents":{}}}"#,
            e.amount_cents()
        ),
        "added_to_cart" => format!(
            r#"{{"product_id":"p-{item}","quantity":{}}}"#,
            1 + e.salt % 3
        ),
        "order_paid" => format!(
            r#"{{"order_id":"{}","amount_cents":{},"currency":"USD"}}"#,
            e.order_id(),
            e.amount_cents()
        ),
        _ => "{}".to_string(),
    }
}

fn event_row<'a>(e: &Planned, s: &'a EventStrings, schemas: &'a Schemas) -> EventRow<'a> {
    EventRow {
        id: &s.id,
        name: e.name(),
        schema: schemas.of(e),
        source: match e.source {
            Source::Client => "client",
            Source::Server => "server",
        },
        site: SITE,
        ts: e.ts,
        received_at: e.ts + i64::from(e.lag_ms),
        anon_id: &s.anon_id,
        user_id: s.user_id.as_deref(),
        session_id: s.session_id.as_deref(),
        device_id: s.device_id.as_deref(),
        seq: (e.source == Source::Client).then_some(i64::from(e.seq)),
        props: &s.props,
        context: "{}",
        logged_at: None,
    }
}

/// The latest counters of one device, with what its page dropped.
struct DeviceCounters {
    device_id: String,
    received_at: i64,
    acked: i64,
    retried: i64,
    dropped_count: i64,
    dropped: String,
}

fn device_counters(n: u32, d: &Device, rng: &mut Rng) -> DeviceCounters {
    let dropped_count = if rng.chance(0.03) {
        rng.between(1, 5)
    } else {
        0
    };
    DeviceCounters {
        device_id: Device::id(n, d.first_ts),
        received_at: d.last_ts + 500,
        acked: i64::from(d.events),
        retried: if rng.chance(0.1) {
            rng.between(1, 3)
        } else {
            0
        },
        dropped_count,
        dropped: if dropped_count > 0 {
            format!(r#"{{"queue_full":{dropped_count}}}"#)
        } else {
            "{}".into()
        },
    }
}

fn counters_row(c: &DeviceCounters) -> CountersRow<'_> {
    CountersRow {
        device_id: &c.device_id,
        site: SITE,
        received_at: c.received_at,
        enqueued: c.acked + c.dropped_count,
        sent: c.acked + c.retried,
        acked: c.acked,
        retried: c.retried,
        pending: 0,
        dropped: &c.dropped,
        degraded: None,
    }
}

/// Writes every planned event and the first devices' counters through the warehouse's own
/// API, one transaction per batch; returns the counters rows written.
fn write_warehouse(path: &Path, plan: &Plan) -> anyhow::Result<usize> {
    let mut wh = Warehouse::open_sqlite(path)
        .with_context(|| format!("cannot open the warehouse {}", path.display()))?;
    let schemas = Schemas::new();
    let mut written = 0usize;
    for batch in plan.events.chunks(BATCH_ROWS) {
        let strings: Vec<EventStrings> = batch.iter().map(|e| event_strings(e, plan)).collect();
        let rows: Vec<EventRow> = batch
            .iter()
            .zip(&strings)
            .map(|(e, s)| event_row(e, s, &schemas))
            .collect();
        wh.write(&rows, &[]).context("warehouse write (events)")?;
        written += rows.len();
        if written % 100_000 < BATCH_ROWS {
            eprintln!("  {written} events written");
        }
    }
    let mut rng = Rng(SEED ^ 0xC0C0);
    let counters: Vec<DeviceCounters> = plan
        .devices
        .iter()
        .take(COUNTER_ROWS)
        .enumerate()
        .map(|(n, d)| device_counters(n as u32, d, &mut rng))
        .collect();
    for batch in counters.chunks(BATCH_ROWS) {
        let rows: Vec<CountersRow> = batch.iter().map(counters_row).collect();
        wh.write(&[], &rows).context("warehouse write (counters)")?;
    }
    Ok(counters.len())
}

/// The truth database: a user per server signup and an order per server `order_paid`,
/// created when the event was captured. Returns (users, orders).
fn write_truth(path: &Path, plan: &Plan) -> anyhow::Result<(u64, u64)> {
    let mut conn = rusqlite::Connection::open(path)
        .with_context(|| format!("cannot create the truth database {}", path.display()))?;
    conn.execute_batch(
        "CREATE TABLE users (id TEXT PRIMARY KEY, created_at TEXT NOT NULL,
                             attribution_known INTEGER NOT NULL, ft_source TEXT);
         CREATE TABLE orders (id TEXT PRIMARY KEY, user_id TEXT NOT NULL,
                              amount_cents INTEGER NOT NULL, created_at TEXT NOT NULL);",
    )?;
    const ISO_UTC: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', ?2 / 1000.0, 'unixepoch')";
    let sources = Weighted::new(SOURCES.iter().map(|(_, w)| *w));
    let mut rng = Rng(SEED ^ 0x7B07);
    let (mut users, mut orders) = (0, 0);
    let tx = conn.transaction()?;
    {
        let mut user = tx.prepare(&format!(
            "INSERT INTO users (id, created_at, attribution_known, ft_source) VALUES (?1, {ISO_UTC}, ?3, ?4)"
        ))?;
        let mut order = tx.prepare(&format!(
            "INSERT INTO orders (id, created_at, user_id, amount_cents) VALUES (?1, {ISO_UTC}, ?3, ?4)"
        ))?;
        for e in &plan.events {
            if e.is_server("signup_completed") {
                let known = rng.chance(ATTRIBUTION_KNOWN);
                let source = if known {
                    SOURCES[sources.pick(&mut rng)].0
                } else {
                    None
                };
                user.execute(rusqlite::params![e.user_id(), e.ts, known, source])?;
                users += 1;
            } else if e.is_server("order_paid") {
                order.execute(rusqlite::params![
                    e.order_id(),
                    e.ts,
                    e.user_id(),
                    e.amount_cents()
                ])?;
                orders += 1;
            }
        }
    }
    tx.commit()?;
    Ok((users, orders))
}

// ---------------------------------------------------------------------------------------
// The relay under test.

/// The relay, started on the generated data directory; stopped if dropped while running.
struct RelayChild {
    child: Child,
    log: PathBuf,
    admin: SocketAddr,
}

impl RelayChild {
    async fn start(bin: &Path, layout: &Layout) -> anyhow::Result<RelayChild> {
        let out = File::create(&layout.log).context("cannot create the relay log")?;
        let _ = std::fs::remove_file(&layout.ready_file);
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(&layout.config)
            .arg("--ready-file")
            .arg(&layout.ready_file)
            .current_dir(
                layout
                    .config
                    .parent()
                    .expect("the config is in a directory"),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        crate::procs::measured_env(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut relay = RelayChild {
            child,
            log: layout.log.clone(),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        relay.admin = relay.wait_ready_file(&layout.ready_file).await?;
        relay.wait_readyz().await?;
        Ok(relay)
    }

    /// Waits for this process's ready file; returns its admin address.
    async fn wait_ready_file(&mut self, path: &Path) -> anyhow::Result<SocketAddr> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.fail_if_exited("during start")?;
            if let Some(admin) = std::fs::read_to_string(path)
                .ok()
                .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                .filter(|v| v["pid"].as_u64() == Some(u64::from(self.child.id())))
                .and_then(|v| v["admin_listen"].as_str()?.parse().ok())
            {
                return Ok(admin);
            }
            if Instant::now() > deadline {
                bail!(
                    "the relay wrote no ready file in {READY_TIMEOUT:?}:\n{}",
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_readyz(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.fail_if_exited("during start")?;
            if let Ok((StatusCode::OK, _)) = crate::load::get(self.admin, "/readyz").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the relay was not ready in {READY_TIMEOUT:?}:\n{}",
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn fail_if_exited(&mut self, when: &str) -> anyhow::Result<()> {
        match self.exited() {
            Some(status) => bail!("the relay exited {when} ({status}):\n{}", self.log_tail(20)),
            None => Ok(()),
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Peak resident set size so far (`VmHWM`), bytes.
    fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    /// SIGTERM, then waits up to [`STOP_GRACE`] (SIGKILL after): the exit as text, and
    /// whether it was clean.
    fn stop(&mut self) -> (String, bool) {
        if let Some(status) = self.exited() {
            return (format!("had already exited ({status})"), false);
        }
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our live child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return (status.to_string(), status.success());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let status = self.child.wait().map_or("?".into(), |s| s.to_string());
        (
            format!("did not exit within {STOP_GRACE:?} of SIGTERM; killed ({status})"),
            false,
        )
    }
}

impl Drop for RelayChild {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The calls.

/// `GET path` on a fresh connection with the admin token; the status and the whole body.
async fn get_with_token(addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let request = Request::get(path)
        .header(header::HOST, addr.to_string())
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}"))
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    driver.abort();
    Ok((status, body))
}

/// One endpoint and window: every timed call, and what was wrong with any answer.
pub struct CallRow {
    endpoint: &'static str,
    days: u32,
    warmup_ms: f64,
    times_ms: Vec<f64>,
    response_bytes: usize,
    problems: Vec<String>,
    /// A few figures of the last answer, to see that the data is what it should be.
    figures: Value,
}

impl CallRow {
    fn path(&self) -> String {
        format!("/api/v1/{}?days={}", self.endpoint, self.days)
    }

    fn sorted(&self) -> Vec<f64> {
        let mut t = self.times_ms.clone();
        t.sort_by(f64::total_cmp);
        t
    }

    fn median_ms(&self) -> f64 {
        let t = self.sorted();
        match t.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => t[n / 2],
            n => (t[n / 2 - 1] + t[n / 2]) / 2.0,
        }
    }

    fn max_ms(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }

    fn min_ms(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    /// Every timed call within the goal.
    fn meets_goal(&self) -> bool {
        self.max_ms() <= GOAL_MS
    }

    fn line(&self) -> String {
        format!(
            "{:<31} median {:>8.1} ms  max {:>8.1} ms  (warm-up {:.1} ms, {} KiB)",
            self.path(),
            self.median_ms(),
            self.max_ms(),
            self.warmup_ms,
            self.response_bytes / 1024
        )
    }
}

/// One warm-up call, then `runs` timed calls of `endpoint?days=days`.
async fn time_calls(
    admin: SocketAddr,
    endpoint: &'static str,
    days: u32,
    runs: u32,
) -> anyhow::Result<CallRow> {
    let path = format!("/api/v1/{endpoint}?days={days}");
    let mut row = CallRow {
        endpoint,
        days,
        warmup_ms: 0.0,
        times_ms: Vec::new(),
        response_bytes: 0,
        problems: Vec::new(),
        figures: Value::Null,
    };
    for run in 0..=runs {
        let started = Instant::now();
        let (status, body) = tokio::time::timeout(CALL_TIMEOUT, get_with_token(admin, &path))
            .await
            .with_context(|| format!("GET {path}: no answer in {CALL_TIMEOUT:?}"))??;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if run == 0 {
            row.warmup_ms = ms;
        } else {
            row.times_ms.push(ms);
        }
        row.response_bytes = body.len();
        match check_answer(status, &body) {
            Ok(v) => row.figures = figures(endpoint, &v),
            Err(problem) => {
                let problem = format!("{path} (call {run}): {problem}");
                if !row.problems.contains(&problem) {
                    row.problems.push(problem);
                }
            }
        }
    }
    Ok(row)
}

/// The answer's JSON if it is `200` with `errors: []`, else what is wrong with it.
fn check_answer(status: StatusCode, body: &[u8]) -> Result<Value, String> {
    let text = || String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned();
    if status != StatusCode::OK {
        return Err(format!("status {status}: {}", text()));
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON ({e}): {}", text()))?;
    match v.get("errors").and_then(Value::as_array) {
        Some(errors) if errors.is_empty() => Ok(v),
        Some(_) => Err(format!("errors {}", v["errors"])),
        None => Err(format!("no errors array: {}", text())),
    }
}

/// A few headline figures of an answer.
fn figures(endpoint: &str, v: &Value) -> Value {
    let sum = |items: &Value, key: &str| -> u64 {
        items
            .as_array()
            .map_or(0, |a| a.iter().filter_map(|i| i[key].as_u64()).sum())
    };
    match endpoint {
        "quality" => json!({
            "gap_metrics": v["gap"].as_array().map_or(0, Vec::len),
            "seq_gaps": sum(&v["seq_gaps"], "gaps"),
            "loss_devices": v["loss"]["devices"],
            "freshness_stages": v["freshness"].as_array().map_or(0, Vec::len),
        }),
        "business" => json!({
            "totals": v["metrics"].as_array().map(|ms| ms.iter().map(|m| json!({
                "metric": m["name"], "actual": m["total"]["actual"],
                "server": m["total"]["server"], "value": m["total"]["value"],
            })).collect::<Vec<_>>()),
            "attribution_rows": v["attribution"].as_array().map(|a| a.iter().map(|x| x["rows"].as_array().map_or(0, Vec::len)).collect::<Vec<_>>()),
        }),
        _ => json!({
            "page_views": sum(&v["page_views"], "count"),
            "sessions": sum(&v["sessions"], "count"),
            "missing_pct": v["loss"]["missing_pct"],
            "funnel": v["funnel"]["steps"].as_array().map(|s| s.iter().map(|x| x["sessions"].clone()).collect::<Vec<_>>()),
        }),
    }
}

// ---------------------------------------------------------------------------------------
// The report.

impl Report {
    /// Every answer was right and the relay stopped cleanly (slowness never fails).
    pub fn passed(&self) -> bool {
        self.relay_exit_ok && self.rows.iter().all(|r| r.problems.is_empty())
    }

    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let g = &self.generation;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "trueup dashboards API benchmark: {} events over {} days, {} timed calls per row \
             after one warm-up, {} CPUs, goal {GOAL_MS:.0} ms per call",
            g.events, self.settings.days, self.settings.runs, self.cpus
        );
        let _ = writeln!(s, "{}", g.line());
        let _ = writeln!(
            s,
            "{:<31} {:>10} {:>10} {:>10}  {:<6}",
            "call", "median ms", "max ms", "warm-up ms", "≤300ms"
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "{:<31} {:>10.1} {:>10.1} {:>10.1}  {:<6}{}",
                r.path(),
                r.median_ms(),
                r.max_ms(),
                r.warmup_ms,
                if r.meets_goal() { "pass" } else { "FAIL" },
                if r.problems.is_empty() {
                    String::new()
                } else {
                    "  WRONG ANSWER".into()
                }
            );
        }
        for r in self.rows.iter().filter(|r| r.days == 30) {
            let _ = writeln!(s, "figures {}: {}", r.path(), r.figures);
        }
        for p in self.rows.iter().flat_map(|r| &r.problems) {
            let _ = writeln!(s, "problem: {p}");
        }
        let _ = writeln!(
            s,
            "relay peak RSS: {}; exit: {}",
            self.relay_peak_rss_bytes
                .map_or("n/a".into(), |b| format!("{:.1} MiB", mib(b))),
            if self.relay_exit_ok {
                "OK (SIGTERM)".to_string()
            } else {
                format!("FAILED ({})", self.relay_exit)
            }
        );
        if let Some(dir) = &self.kept_dir {
            let _ = writeln!(s, "data kept: {}", dir.display());
        }
        s
    }

    pub fn json(&self) -> Value {
        let g = &self.generation;
        json!({
            "config": {
                "events": self.settings.events,
                "days": self.settings.days,
                "runs": self.settings.runs,
                "goal_ms": GOAL_MS,
                "batch_rows": BATCH_ROWS,
                "seed": SEED,
                "cpus": self.cpus,
                "relay_version": relay_version(&self.settings.relay_bin),
            },
            "generation": {
                "seconds": g.total_time().as_secs_f64(),
                "plan_seconds": g.plan_time.as_secs_f64(),
                "warehouse_seconds": g.warehouse_time.as_secs_f64(),
                "truth_seconds": g.truth_time.as_secs_f64(),
                "events": g.events,
                "client_events": g.client_events,
                "server_events": g.server_events,
                "devices": g.devices,
                "sessions": g.sessions,
                "agent_counters": g.counters,
                "users": g.users,
                "orders": g.orders,
                "warehouse_bytes": g.warehouse_bytes,
                "truth_bytes": g.truth_bytes,
            },
            "calls": self.rows.iter().map(|r| json!({
                "path": r.path(),
                "endpoint": r.endpoint,
                "days": r.days,
                "median_ms": r.median_ms(),
                "max_ms": r.max_ms(),
                "min_ms": r.min_ms(),
                "warmup_ms": r.warmup_ms,
                "times_ms": r.times_ms,
                "response_bytes": r.response_bytes,
                "meets_goal": r.meets_goal(),
                "problems": r.problems,
                "figures": r.figures,
            })).collect::<Vec<_>>(),
            "relay_peak_rss_bytes": self.relay_peak_rss_bytes,
            "relay_exit": { "ok": self.relay_exit_ok, "status": self.relay_exit },
            "passed": self.passed(),
        })
    }
}

/// What `trueup-relay --version` prints.
fn relay_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_is_deterministic_and_shaped_as_documented() {
        let now = 1_800_000_000_000;
        let a = plan(20_000, 30, now);
        let b = plan(20_000, 30, now);
        assert_eq!(a.events.len(), 20_000);
        assert!(
            a.events
                .iter()
                .zip(&b.events)
                .all(|(x, y)| x.salt == y.salt && x.ts == y.ts)
        );
        assert!(a.events.windows(2).all(|w| w[0].ts <= w[1].ts));
        assert!(
            a.events
                .iter()
                .all(|e| e.ts >= now - 30 * MS_PER_DAY && e.ts <= now)
        );
        let client = a
            .events
            .iter()
            .filter(|e| e.source == Source::Client)
            .count();
        assert_eq!(client, 17_000);
        let views = a.events.iter().filter(|e| e.name() == "page_view").count();
        let share = views as f64 / client as f64;
        assert!((0.55..0.67).contains(&share), "page views {share}");
        // Each device's seqs are distinct, with about 0.5 % of the numbers skipped.
        let mut seqs: std::collections::HashMap<u32, Vec<u32>> = Default::default();
        for e in a.events.iter().filter(|e| e.source == Source::Client) {
            seqs.entry(e.actor).or_default().push(e.seq);
        }
        let mut skipped = 0;
        for s in seqs.values_mut() {
            s.sort_unstable();
            s.dedup();
            skipped += s.last().unwrap() - s.len() as u32;
        }
        assert_eq!(seqs.values().map(Vec::len).sum::<usize>(), client);
        let skip_share = f64::from(skipped) / client as f64;
        assert!((0.002..0.01).contains(&skip_share), "skipped {skip_share}");
    }

    #[test]
    fn ids_are_uuid_v7_and_distinct() {
        let id = uuid7(1_800_000_000_000, 42);
        let parsed = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(parsed.get_version_num(), 7);
        assert_ne!(uuid7(1_800_000_000_000, 43), id);
    }
}
