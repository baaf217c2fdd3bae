//! The relay's configuration: a TOML file, overridden by environment variables and flags.
//!
//! Every field has a default that works on a laptop (`trueup-relay` with no arguments listens
//! on loopback and keeps its data in `./data`). Precedence, highest first: command-line flag,
//! environment variable, config file, default. `trueup-relay --print-config` prints the
//! effective configuration and the public URL paths derived from it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use trueup_protocol::{Limits, MAX_EVENTS_PER_BATCH_LIMIT, SchemaDef, SchemaRegistry};

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Public address: the collection endpoint, the agent's files and (optionally) the site.
    /// Put it behind the app's own domain (see the README's deployment examples).
    pub listen: SocketAddr,
    /// Admin address: `/healthz`, `/readyz`, `/sinks`, `/metrics`. Never expose it publicly.
    pub admin_listen: SocketAddr,
    /// Token the admin endpoints require (`Authorization: Bearer <token>`; at least 16
    /// characters). Better in `admin_token_file` or `TRUEUP_ADMIN_TOKEN` than here. Without
    /// one the admin address must be a loopback address. With one, `/healthz` and `/readyz`
    /// still answer their status to anyone (for load balancers) but their reasons only with
    /// the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// File whose content (trimmed) is the admin token; read at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// Optional file the relay writes once it is ready (listeners bound, spool and sink
    /// open): `{"listen": "<addr>", "admin_listen": "<addr>", "pid": <n>}`, replaced
    /// atomically, removed at a clean exit. With port 0 in `listen` or `admin_listen` the
    /// system picks free ports, and this file is how a supervisor (or a test) learns them.
    pub ready_file: Option<PathBuf>,
    /// Where the spool (`spool.sqlite`) and the embedded warehouse (`warehouse.sqlite`) live.
    pub data_dir: PathBuf,
    /// The path prefix everything public lives under, on the app's own domain. Keep it
    /// unremarkable: filter lists block paths with words like `analytics`, `track`, `collect`.
    pub prefix: String,
    /// Collection endpoint for browser batches, under the prefix.
    pub collect_path: String,
    /// Endpoint for server events (authenticated with a site's server secret), under the prefix.
    pub server_path: String,
    /// Where the agent's files are served, under the prefix.
    pub assets_path: String,
    /// Folder whose files are served at `<prefix>/<assets_path>/`: the agent's loader, glue and
    /// wasm (`npm run build` writes them to `dist/`). Files whose name carries a content hash
    /// (`name.<8+ hex>.ext`) are cached for a year; others for five minutes.
    pub asset_dir: PathBuf,
    /// Optional folder served at `/` (the demo site). Off by default.
    pub www_dir: Option<PathBuf>,
    /// Optional TOML file of user schemas (`[[schema]]` tables), added to the built-in ones.
    pub schemas_file: Option<PathBuf>,
    /// Request and event bounds.
    pub limits: LimitsConfig,
    /// The durable spool.
    pub spool: SpoolConfig,
    /// Rate limits.
    pub rate_limit: RateLimitConfig,
    /// What every sink's forwarder shares (backoff, shutdown drain, default batch size).
    pub forwarder: ForwarderConfig,
    /// Where events go: any number of sinks, each with its own forwarder and durable cursor.
    /// Empty: the embedded warehouse alone (see [`Config::effective_sinks`]).
    pub sinks: Vec<SinkConfig>,
    /// The single `[sink]` table of earlier versions; refused with a pointer to `[[sinks]]`.
    #[serde(skip_serializing)]
    pub sink: Option<toml::Value>,
    /// Sites whose events this relay accepts.
    pub sites: Vec<SiteConfig>,
    /// Fault injection on the collection endpoint, for delivery tests. Off by default.
    pub faults: FaultsConfig,
    /// Seconds a request may take before it is answered 408.
    pub request_timeout_secs: u64,
    /// Log format: `text` or `json`.
    pub log_format: String,
    /// Reconciliation of client analytics against the system of record: the truth database,
    /// the metrics, and the schedule on which the relay publishes the gaps as gauges.
    pub reconcile: trueup_reconcile::ReconcileConfig,
    /// What the behaviour dashboard shows (page views' event, the funnel, the metric the
    /// client events' loss is measured against).
    pub dashboard: trueup_reconcile::DashboardConfig,
    /// The loader (`trueup-relay load`): from the log that the relays' `kafka` sinks write,
    /// into the warehouse. Unused by the relay itself.
    pub loader: LoaderConfig,
}

/// Request and event bounds, all checked before the data they bound is allocated.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most connections open at once on the public address; more are closed at once.
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's line and headers (also the idle
    /// time allowed between keep-alive requests); then it is closed.
    pub header_read_timeout_secs: u64,
    /// Bytes of request bodies being read at once (each counts its Content-Length, or
    /// `max_body_bytes` without one); a request beyond it gets 503 `busy` + Retry-After.
    pub max_inflight_body_bytes: usize,
    /// Largest request body as sent (compressed or not), bytes. Larger → 413.
    pub max_body_bytes: usize,
    /// Largest body after decompression, bytes. Larger → 413 (gzip bombs stop here).
    pub max_decompressed_bytes: usize,
    /// Most events in one batch. More → 413. At most 5000.
    pub max_events_per_batch: usize,
    /// Largest single event, bytes. Larger → that event is rejected `too_large`.
    pub max_event_bytes: usize,
    /// Deepest JSON nesting of an event (the event object is depth 1). Deeper → `too_deep`.
    pub max_depth: usize,
    /// How far in the future an event's `ts` may be, seconds.
    pub max_future_secs: i64,
    /// How far in the past an event's `ts` may be, seconds. Keep it above the agent's
    /// maximum queue age so that events delivered late are still accepted.
    pub max_past_secs: i64,
}

/// The durable spool.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Bytes of events waiting to be forwarded above which new batches get 503 + Retry-After.
    pub max_bytes: u64,
    /// How long an event id is remembered for dedupe, seconds. Counted from the time in the
    /// UUIDv7 id; keep it above `limits.max_past_secs`.
    pub dedupe_retention_secs: u64,
    /// Most requests that share one transaction (group commit).
    pub max_group_requests: usize,
    /// Cap on the spool database file, bytes (0: none, the disk is the limit). Reaching it
    /// behaves as a full disk: new batches get 503 `storage_full` + Retry-After and nothing
    /// of them is acknowledged; delivering to the sinks frees room and collection resumes.
    pub max_file_bytes: u64,
}

/// Token-bucket rate limits. A limit of 0 turns it off.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Sustained requests per second from one client IP.
    pub per_ip_per_sec: u32,
    /// Burst of requests from one client IP.
    pub per_ip_burst: u32,
    /// Most clients with a rate-limit bucket at once (least recently seen evicted first): a
    /// bound on the limiter's memory, whatever the number of distinct addresses.
    pub max_tracked_clients: usize,
    /// Sustained requests per second for one site key.
    pub per_site_per_sec: u32,
    /// Burst for one site key.
    pub per_site_burst: u32,
    /// Proxies whose `X-Forwarded-For` is trusted (CIDRs). When the peer is one of them, the
    /// client IP is the right-most `X-Forwarded-For` entry that is not. Empty: the peer address.
    pub trusted_proxies: Vec<IpNet>,
}

/// Fault injection for delivery tests (never in production): the relay logs a warning at
/// start when any ratio is above 0. Decisions come from a seeded generator, so a test run can
/// be repeated.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultsConfig {
    /// Seed of the generator.
    pub seed: u64,
    /// Share of client batches answered 503 (Retry-After: 1) without being read.
    pub fail_ratio: f64,
    /// Share of client batches stored (durably, like any other) whose answer is then lost:
    /// the connection breaks after the status line, so the sender cannot know they were stored.
    pub ack_lost_ratio: f64,
}

/// What all forwarders share.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwarderConfig {
    /// Most records per sink call, for sinks that do not set their own `batch_size`.
    pub batch_size: usize,
    /// First retry delay after a sink failure, milliseconds (doubled per failure, full jitter).
    pub initial_backoff_ms: u64,
    /// Longest retry delay, milliseconds.
    pub max_backoff_ms: u64,
    /// On shutdown, how long to keep forwarding what is spooled, seconds. What is left stays
    /// in the spool for the next start.
    pub shutdown_drain_secs: u64,
    /// The nice value (0..=19) of the forwarders' threads, so that when the CPU is saturated
    /// collection runs first and forwarding takes what is left (the spool absorbs the
    /// difference). 0: the same priority as collection. Linux only; elsewhere ignored.
    pub nice: i32,
    /// Threads of the forwarders' runtime (0: one per CPU).
    pub threads: usize,
}

/// What a sink is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// The embedded warehouse: one SQLite file, no setup.
    Warehouse,
    /// The same warehouse tables in PostgreSQL (the connection URL is the secret).
    Postgres,
    /// A signed JSON batch POSTed to any URL.
    Webhook,
    /// PostHog's capture endpoint, `<url>/batch/`.
    Posthog,
    /// Segment's tracking API, `<url>/v1/batch`.
    Segment,
    /// RudderStack's data plane, `<url>/v1/batch` (Segment's format, larger limits).
    Rudderstack,
    /// A Kafka topic (or any broker speaking Kafka's protocol), through librdkafka: one
    /// message per record, acknowledged by every in-sync replica, idempotent producer.
    Kafka,
    /// A NATS JetStream stream: one message per record, deduplicated by the server on
    /// `Nats-Msg-Id` (the event id) within the stream's duplicate window.
    Nats,
}

impl SinkKind {
    /// The lowercase name used in the config and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Warehouse => "warehouse",
            SinkKind::Postgres => "postgres",
            SinkKind::Webhook => "webhook",
            SinkKind::Posthog => "posthog",
            SinkKind::Segment => "segment",
            SinkKind::Rudderstack => "rudderstack",
            SinkKind::Kafka => "kafka",
            SinkKind::Nats => "nats",
        }
    }

    /// Defaults: (events per request, bytes per request, bytes per event). The upstreams'
    /// documented limits: PostHog 20 MB per request; Segment 500 KB per batch, 32 KB per
    /// event, 2,500 events per batch; RudderStack 4 MB per batch, 32 KB per event.
    fn limits(self) -> (usize, usize, usize) {
        match self {
            SinkKind::Warehouse | SinkKind::Postgres => (2_000, usize::MAX, usize::MAX),
            SinkKind::Webhook => (500, 1024 * 1024, 1024 * 1024),
            SinkKind::Posthog => (1_000, 20 * 1000 * 1000, 1024 * 1024),
            SinkKind::Segment => (2_500, 500 * 1000, 32 * 1000),
            SinkKind::Rudderstack => (2_500, 4 * 1000 * 1000, 32 * 1000),
            // Kafka's default `max.message.bytes` (1 MiB) per message; the producer batches.
            SinkKind::Kafka => (5_000, usize::MAX, 1024 * 1024),
            // NATS's default `max_payload` (1 MiB), less room for the headers.
            SinkKind::Nats => (5_000, usize::MAX, 1024 * 1024 - 4096),
        }
    }
}

/// One sink (`[[sinks]]`). Which fields apply depends on `kind`; a field that does not apply
/// is an error, so a typo never passes silently. Secrets are never written in this file:
/// `secret_env` names an environment variable, `secret_file` a file, holding the PostHog
/// project API key, the Segment/RudderStack write key, the webhook's signing secret, or the
/// PostgreSQL connection URL (`postgres://user:password@host:5432/db`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// A unique name: the key of its cursor in the spool and its label in metrics
    /// (letters, digits, `_` and `-`). Renaming a sink makes it a new one, which starts from
    /// the oldest record still spooled.
    pub name: String,
    /// What it is.
    pub kind: SinkKind,
    /// `warehouse`: the SQLite file (default `<data_dir>/warehouse.sqlite` for the first
    /// warehouse sink, `<data_dir>/<name>.sqlite` for others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// `webhook`: the URL to POST to. `posthog`: the instance (`https://us.i.posthog.com`).
    /// `segment`: the API host (default `https://api.segment.io`). `rudderstack`: the data
    /// plane URL. `http://` is allowed for loopback and private networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Environment variable holding the sink's secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// File holding the sink's secret (surrounding whitespace is ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Most records per request (default per kind, at most the upstream's limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Most bytes per request body (default: the upstream's documented limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_bytes: Option<usize>,
    /// Largest single event as sent; a larger one is dead-lettered `too_large`, never sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_event_bytes: Option<usize>,
    /// Seconds one request may take (connect, send, answer) before it counts as failed.
    #[serde(default = "default_sink_timeout")]
    pub timeout_secs: u64,
    /// Requests in flight at once (each a batch; the cursor moves when all have answered);
    /// `postgres`: transactions at once, each on a connection of its own; `warehouse`: 1.
    #[serde(default = "default_sink_concurrency")]
    pub concurrency: usize,
    /// `posthog`: send with `historical_migration: true` (for backfills; PostHog routes such
    /// batches to its slower historical pipeline).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub historical_migration: bool,
    /// `kafka`: the bootstrap servers, `host:port[,host:port…]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brokers: Option<String>,
    /// `kafka`: the topic (default `raw_events`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// `kafka`: more librdkafka properties (`"compression.type" = "lz4"`,
    /// `"security.protocol" = "sasl_ssl"`, …). Those that carry the delivery guarantee
    /// (`acks`, `enable.idempotence`, …) cannot be changed; a secret (`secret_env` or
    /// `secret_file`) is set as `sasl.password`, never written here.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub properties: std::collections::BTreeMap<String, String>,
    /// `nats`: the JetStream stream (default `TRUEUP_EVENTS`), created if missing with the
    /// subjects `<subject>.>`, file storage and `duplicate_window_secs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// `nats`: the subject prefix (default `trueup.events`); a record goes to
    /// `<subject>.<shard>`, the shard a stable hash of its session (or device) modulo `shards`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// `nats`: how many session shards (default 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<u32>,
    /// `nats`: the stream's duplicate window when the sink creates it (default 600 s). See
    /// the README ("Scale out") for what it must cover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_window_secs: Option<u64>,
}

/// Checks a NATS URL, stream name and subject prefix.
pub fn check_nats(url: Option<&str>, stream: &str, subject: &str) -> Result<(), String> {
    let url = url.ok_or("kind nats needs url (nats://host:4222)")?;
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "nats" | "tls") && u.host().is_some() => {}
        _ => {
            return Err(format!(
                "url {url:?} must be a nats:// (or tls://) URL with a host"
            ));
        }
    }
    if stream.is_empty()
        || stream.len() > 64
        || !stream
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "stream {stream:?} must be 1-64 letters, digits, '_' or '-'"
        ));
    }
    if subject.is_empty()
        || subject.split('.').any(|t| {
            t.is_empty()
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
    {
        return Err(format!(
            "subject {subject:?} must be dot-separated tokens of letters, digits, '_' or '-'"
        ));
    }
    Ok(())
}

/// librdkafka properties the Kafka sink and loader set themselves: changing any of them would
/// break the delivery guarantee (or the secret's handling).
pub const KAFKA_FIXED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "sasl.password",
];

/// Checks a Kafka sink's or loader's `brokers`, `topic` and `properties`.
pub fn check_kafka(
    brokers: Option<&str>,
    topic: &str,
    properties: &std::collections::BTreeMap<String, String>,
) -> Result<(), String> {
    let brokers = brokers.ok_or("kind kafka needs brokers (host:port[,host:port...])")?;
    for b in brokers.split(',') {
        let b = b.trim();
        match b.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => return Err(format!("brokers: {b:?} is not host:port")),
        }
    }
    // Kafka's own rule for topic names.
    if topic.is_empty()
        || topic.len() > 249
        || topic == "."
        || topic == ".."
        || !topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "topic {topic:?} must be 1-249 of letters, digits, '.', '_' and '-'"
        ));
    }
    for key in properties.keys() {
        if KAFKA_FIXED_PROPERTIES.contains(&key.as_str()) {
            return Err(format!(
                "properties: {key:?} is set by trueup and cannot be changed"
            ));
        }
    }
    Ok(())
}

fn default_sink_timeout() -> u64 {
    10
}

fn default_sink_concurrency() -> usize {
    1
}

impl SinkConfig {
    /// The embedded warehouse sink that runs when no `[[sinks]]` is configured.
    pub fn default_warehouse() -> SinkConfig {
        SinkConfig {
            name: "warehouse".into(),
            kind: SinkKind::Warehouse,
            path: None,
            url: None,
            secret_env: None,
            secret_file: None,
            batch_size: None,
            max_batch_bytes: None,
            max_event_bytes: None,
            timeout_secs: default_sink_timeout(),
            concurrency: default_sink_concurrency(),
            historical_migration: false,
            brokers: None,
            topic: None,
            properties: Default::default(),
            stream: None,
            subject: None,
            shards: None,
            duplicate_window_secs: None,
        }
    }

    /// Most records per request.
    pub fn batch_size(&self) -> usize {
        self.batch_size.unwrap_or(self.kind.limits().0)
    }

    /// Most bytes per request body.
    pub fn max_batch_bytes(&self) -> usize {
        self.max_batch_bytes.unwrap_or(self.kind.limits().1)
    }

    /// Largest event as sent.
    pub fn max_event_bytes(&self) -> usize {
        self.max_event_bytes.unwrap_or(self.kind.limits().2)
    }

    /// `kafka`: the topic.
    pub fn topic(&self) -> &str {
        self.topic.as_deref().unwrap_or("raw_events")
    }

    /// `nats`: the stream.
    pub fn stream(&self) -> &str {
        self.stream.as_deref().unwrap_or("TRUEUP_EVENTS")
    }

    /// `nats`: the subject prefix.
    pub fn subject(&self) -> &str {
        self.subject.as_deref().unwrap_or("trueup.events")
    }

    /// `nats`: the session shards.
    pub fn shards(&self) -> u32 {
        self.shards.unwrap_or(16)
    }

    /// `nats`: the duplicate window of a stream the sink creates.
    pub fn duplicate_window(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.duplicate_window_secs.unwrap_or(600))
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_secs)
    }

    /// Reads the secret from `secret_env` or `secret_file`. `None` when neither is set.
    pub fn secret(&self) -> Result<Option<String>, ConfigError> {
        let bad = |m: String| ConfigError::Invalid(format!("sink {:?}: {m}", self.name));
        if let Some(var) = &self.secret_env {
            return match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_string())),
                _ => Err(bad(format!(
                    "secret_env names {var}, which is not set (or empty)"
                ))),
            };
        }
        if let Some(path) = &self.secret_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| bad(format!("cannot read secret_file {}: {e}", path.display())))?;
            if text.trim().is_empty() {
                return Err(bad(format!("secret_file {} is empty", path.display())));
            }
            return Ok(Some(text.trim().to_string()));
        }
        Ok(None)
    }

    fn validate(&mut self) -> Result<(), ConfigError> {
        let name = self.name.clone();
        let bad = |m: String| Err(ConfigError::Invalid(format!("sink {name:?}: {m}")));
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return bad("name must be 1-64 letters, digits, '_' or '-'".into());
        }
        let kind = self.kind;
        let (max_batch, max_bytes, max_event) = kind.limits();
        let http = !matches!(
            kind,
            SinkKind::Warehouse | SinkKind::Postgres | SinkKind::Kafka | SinkKind::Nats
        );
        let nats = kind == SinkKind::Nats;
        let secret = kind != SinkKind::Warehouse;
        let kafka = kind == SinkKind::Kafka;
        let applies = [
            ("path", self.path.is_some(), kind == SinkKind::Warehouse),
            ("url", self.url.is_some(), http || nats),
            ("secret_env", self.secret_env.is_some(), secret),
            ("secret_file", self.secret_file.is_some(), secret),
            (
                "historical_migration",
                self.historical_migration,
                kind == SinkKind::Posthog,
            ),
            ("max_batch_bytes", self.max_batch_bytes.is_some(), http),
            (
                "max_event_bytes",
                self.max_event_bytes.is_some(),
                http || kafka || nats,
            ),
            ("stream", self.stream.is_some(), nats),
            ("subject", self.subject.is_some(), nats),
            ("shards", self.shards.is_some(), nats),
            (
                "duplicate_window_secs",
                self.duplicate_window_secs.is_some(),
                nats,
            ),
            ("brokers", self.brokers.is_some(), kafka),
            ("topic", self.topic.is_some(), kafka),
            ("properties", !self.properties.is_empty(), kafka),
        ];
        for (field, set, ok) in applies {
            if set && !ok {
                return bad(format!("{field} does not apply to kind {}", kind.as_str()));
            }
        }
        if self.secret_env.is_some() && self.secret_file.is_some() {
            return bad("set secret_env or secret_file, not both".into());
        }
        match kind {
            SinkKind::Warehouse | SinkKind::Postgres => {}
            SinkKind::Nats => {
                if let Err(m) = check_nats(self.url.as_deref(), self.stream(), self.subject()) {
                    return bad(m);
                }
                if !(1..=1024).contains(&self.shards()) {
                    return bad("shards must be 1..=1024".into());
                }
                let w = self.duplicate_window().as_secs();
                if !(1..=7 * 24 * 3600).contains(&w) {
                    return bad("duplicate_window_secs must be 1..=604800".into());
                }
            }
            SinkKind::Kafka => {
                if let Err(m) = check_kafka(self.brokers.as_deref(), self.topic(), &self.properties)
                {
                    return bad(m);
                }
            }
            SinkKind::Segment => {
                if self.url.is_none() {
                    self.url = Some("https://api.segment.io".into());
                }
            }
            SinkKind::Webhook | SinkKind::Posthog | SinkKind::Rudderstack => {
                if self.url.is_none() {
                    return bad(format!("kind {} needs url", kind.as_str()));
                }
            }
        }
        // Kafka's and NATS's secrets are optional (a SASL password; a NATS token).
        if secret && !kafka && !nats && self.secret_env.is_none() && self.secret_file.is_none() {
            return bad(format!(
                "kind {} needs its key (postgres: its connection URL) in secret_env or secret_file",
                kind.as_str()
            ));
        }
        if let Some(url) = &self.url
            && !nats
        {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => return bad(format!("url {url:?} must be an http(s) URL with a host")),
            }
        }
        let most = if http { max_batch } else { MAX_FORWARD_BATCH };
        if self.batch_size() == 0 || self.batch_size() > most {
            return bad(format!("batch_size must be 1..={most}"));
        }
        if self.max_batch_bytes() == 0 || self.max_batch_bytes() > max_bytes {
            return bad(format!("max_batch_bytes must be 1..={max_bytes}"));
        }
        if self.max_event_bytes() == 0
            || self.max_event_bytes() > max_event
            || self.max_event_bytes() > self.max_batch_bytes()
        {
            return bad(format!(
                "max_event_bytes must be 1..={max_event} and at most max_batch_bytes"
            ));
        }
        if self.timeout_secs == 0 || self.timeout_secs > 600 {
            return bad("timeout_secs must be 1..=600".into());
        }
        if self.concurrency == 0 || self.concurrency > 64 {
            return bad("concurrency must be 1..=64".into());
        }
        if kind == SinkKind::Warehouse && self.concurrency != 1 {
            return bad("concurrency must be 1 for kind warehouse (SQLite has one writer)".into());
        }
        Ok(())
    }
}

/// Most records one sink request may carry (bounds what a forwarder reads at once).
pub const MAX_FORWARD_BATCH: usize = 10_000;

/// One site: a public site key and where its pages may send from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// The site key the agent sends in every batch (public, not a secret).
    pub key: String,
    /// Origins (`https://app.example.com`) allowed to send, and answered with CORS headers.
    #[serde(default)]
    pub origins: Vec<String>,
    /// Also allow an `Origin` whose host equals the request's `Host` (the relay behind the
    /// app's own domain).
    #[serde(default = "default_true")]
    pub allow_same_origin: bool,
    /// Secrets a backend presents (`Authorization: Bearer …`) on the server path. Empty: the
    /// server path is closed for this site.
    #[serde(default)]
    pub server_secrets: Vec<String>,
}

fn default_true() -> bool {
    true
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().expect("valid"),
            admin_listen: "127.0.0.1:9090".parse().expect("valid"),
            admin_token: None,
            admin_token_file: None,
            ready_file: None,
            data_dir: PathBuf::from("data"),
            prefix: "/_r".into(),
            collect_path: "q".into(),
            server_path: "s".into(),
            assets_path: "a".into(),
            asset_dir: PathBuf::from("dist"),
            www_dir: None,
            schemas_file: None,
            limits: LimitsConfig::default(),
            spool: SpoolConfig::default(),
            rate_limit: RateLimitConfig::default(),
            forwarder: ForwarderConfig::default(),
            sinks: vec![],
            sink: None,
            sites: vec![SiteConfig {
                key: "demo".into(),
                origins: vec![],
                allow_same_origin: true,
                server_secrets: vec![],
            }],
            faults: FaultsConfig::default(),
            request_timeout_secs: 30,
            log_format: "text".into(),
            reconcile: trueup_reconcile::ReconcileConfig::default(),
            dashboard: trueup_reconcile::DashboardConfig::default(),
            loader: LoaderConfig::default(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = Limits::default();
        LimitsConfig {
            max_connections: 10_000,
            header_read_timeout_secs: 10,
            max_inflight_body_bytes: 256 * 1024 * 1024,
            max_body_bytes: 1024 * 1024,
            max_decompressed_bytes: 4 * 1024 * 1024,
            max_events_per_batch: 500,
            max_event_bytes: l.max_event_bytes,
            max_depth: l.max_depth,
            max_future_secs: l.max_future_ms / 1000,
            max_past_secs: l.max_past_ms / 1000,
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            max_bytes: 1024 * 1024 * 1024,
            dedupe_retention_secs: 9 * 24 * 3600,
            max_file_bytes: 0,
            max_group_requests: 512,
        }
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            per_ip_per_sec: 20,
            per_ip_burst: 100,
            max_tracked_clients: 100_000,
            per_site_per_sec: 5_000,
            per_site_burst: 20_000,
            trusted_proxies: vec![],
        }
    }
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        ForwarderConfig {
            batch_size: 2_000,
            initial_backoff_ms: 200,
            max_backoff_ms: 30_000,
            shutdown_drain_secs: 10,
            nice: 10,
            threads: 0,
        }
    }
}

/// Where the loader reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoaderSource {
    /// A Kafka topic, as a member of a consumer group.
    Kafka,
    /// A NATS JetStream stream, through a durable pull consumer.
    Nats,
}

/// Where the loader writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoaderTarget {
    /// The embedded warehouse file (one loader at a time: SQLite has one writer).
    Warehouse,
    /// PostgreSQL (the connection URL in `secret_env` or `secret_file`).
    Postgres,
}

/// `[loader]`: `trueup-relay load` consumes the log and fills the warehouse. Each batch is one
/// warehouse transaction (`ON CONFLICT (id) DO NOTHING`); the consumer's offsets are committed
/// only after it: at-least-once from the log, exactly once in the warehouse.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoaderConfig {
    /// The log.
    pub from: LoaderSource,
    /// `kafka`: bootstrap servers, `host:port[,host:port…]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brokers: Option<String>,
    /// `kafka`: the topic the relays produce to.
    pub topic: String,
    /// `kafka`: the consumer group; `nats`: the durable consumer's name. Every loader of one
    /// warehouse uses the same one, and they share the work.
    pub group: String,
    /// `nats`: the server, `nats://host:4222`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `nats`: the stream the relays' `nats` sinks publish to.
    pub stream: String,
    /// `nats`: how long a message fetched by a loader that then died waits before it is
    /// delivered again (the consumer's `ack_wait`, when the loader creates it). Longer than
    /// a warehouse write takes; a redelivery is stored once anyway.
    pub ack_wait_secs: u64,
    /// `kafka`: more librdkafka properties (as the sink's `properties`).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub properties: std::collections::BTreeMap<String, String>,
    /// The warehouse.
    pub to: LoaderTarget,
    /// `warehouse`: the SQLite file (default `<data_dir>/warehouse.sqlite`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// `postgres`: the environment variable holding the connection URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// `postgres`: the file holding the connection URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Most messages per warehouse transaction.
    pub batch_size: usize,
    /// How long a batch waits to fill before it is written anyway, in ms.
    pub max_wait_ms: u64,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            from: LoaderSource::Kafka,
            brokers: None,
            topic: "raw_events".into(),
            group: "trueup-loader".into(),
            url: None,
            stream: "TRUEUP_EVENTS".into(),
            ack_wait_secs: 30,
            properties: Default::default(),
            to: LoaderTarget::Warehouse,
            path: None,
            secret_env: None,
            secret_file: None,
            batch_size: 5_000,
            max_wait_ms: 100,
        }
    }
}

impl LoaderConfig {
    /// Checks the loader's section (only `trueup-relay load` calls it).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(format!("loader: {m}")));
        match self.from {
            LoaderSource::Kafka => {
                if let Err(m) = check_kafka(self.brokers.as_deref(), &self.topic, &self.properties)
                {
                    return bad(m.replace("kind kafka", "from = \"kafka\""));
                }
                if self.group.is_empty() || self.group.len() > 255 {
                    return bad("group must be 1-255 characters".into());
                }
                if self.url.is_some() {
                    return bad("url applies to from = \"nats\" only (kafka: brokers)".into());
                }
            }
            LoaderSource::Nats => {
                if let Err(m) = check_nats(self.url.as_deref(), &self.stream, "trueup") {
                    return bad(m.replace("kind nats", "from = \"nats\""));
                }
                if self.brokers.is_some() || !self.properties.is_empty() {
                    return bad(
                        "brokers and properties apply to from = \"kafka\" only (nats: url)".into(),
                    );
                }
                if self.group.is_empty()
                    || self.group.len() > 64
                    || !self
                        .group
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return bad(
                        "group (the durable consumer) must be 1-64 letters, digits, '_' or '-'"
                            .into(),
                    );
                }
                if !(1..=3600).contains(&self.ack_wait_secs) {
                    return bad("ack_wait_secs must be 1..=3600".into());
                }
            }
        }
        match self.to {
            LoaderTarget::Warehouse => {
                if self.secret_env.is_some() || self.secret_file.is_some() {
                    return bad("secret_env/secret_file apply to to = \"postgres\" only".into());
                }
            }
            LoaderTarget::Postgres => {
                if self.path.is_some() {
                    return bad("path applies to to = \"warehouse\" only".into());
                }
                if self.secret_env.is_some() == self.secret_file.is_some() {
                    return bad(
                        "to = \"postgres\" needs its connection URL in secret_env or secret_file (one of them)"
                            .into(),
                    );
                }
            }
        }
        if self.batch_size == 0 || self.batch_size > 100_000 {
            return bad("batch_size must be 1..=100000".into());
        }
        if self.max_wait_ms == 0 || self.max_wait_ms > 60_000 {
            return bad("max_wait_ms must be 1..=60000".into());
        }
        Ok(())
    }

    /// The PostgreSQL URL (`to = "postgres"`), read from `secret_env` or `secret_file`.
    pub fn postgres_url(&self) -> Result<String, ConfigError> {
        let sink = SinkConfig {
            name: "loader".into(),
            kind: SinkKind::Postgres,
            secret_env: self.secret_env.clone(),
            secret_file: self.secret_file.clone(),
            ..SinkConfig::default_warehouse()
        };
        sink.secret()?
            .ok_or_else(|| ConfigError::Invalid("loader: no secret_env or secret_file".into()))
    }
}

/// A configuration that cannot work, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config {path}: {source}")]
    Parse {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The user schema file: `[[schema]]` tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaFile {
    #[serde(default)]
    schema: Vec<SchemaDef>,
}

impl Config {
    /// Reads a TOML file; missing fields take their defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source: Box::new(source),
        })
    }

    /// Checks ranges and consistency, and normalises the prefix (leading `/`, no trailing `/`).
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let p = self.prefix.trim_matches('/');
        self.prefix = if p.is_empty() {
            String::new()
        } else {
            format!("/{p}")
        };
        for (name, seg) in [
            ("collect_path", &mut self.collect_path),
            ("server_path", &mut self.server_path),
            ("assets_path", &mut self.assets_path),
        ] {
            *seg = seg.trim_matches('/').to_string();
            if seg.is_empty() {
                return bad(format!("{name} must not be empty"));
            }
        }
        if self.collect_path == self.server_path
            || self.collect_path == self.assets_path
            || self.server_path == self.assets_path
        {
            return bad("collect_path, server_path and assets_path must differ".into());
        }
        let l = &self.limits;
        if l.max_events_per_batch == 0 || l.max_events_per_batch > MAX_EVENTS_PER_BATCH_LIMIT {
            return bad(format!(
                "limits.max_events_per_batch must be 1..={MAX_EVENTS_PER_BATCH_LIMIT}"
            ));
        }
        if l.max_body_bytes == 0 || l.max_decompressed_bytes < l.max_body_bytes {
            return bad(
                "limits.max_decompressed_bytes must be at least limits.max_body_bytes (> 0)".into(),
            );
        }
        if l.max_connections == 0 || l.header_read_timeout_secs == 0 {
            return bad(
                "limits.max_connections and limits.header_read_timeout_secs must be > 0".into(),
            );
        }
        if l.max_inflight_body_bytes < l.max_body_bytes {
            return bad(
                "limits.max_inflight_body_bytes must be at least limits.max_body_bytes".into(),
            );
        }
        if l.max_depth < 3 {
            return bad("limits.max_depth must be at least 3 (event, props, a value)".into());
        }
        if self.spool.dedupe_retention_secs < (l.max_past_secs.max(0) as u64) {
            return bad("spool.dedupe_retention_secs must be at least limits.max_past_secs, or late retries would be stored twice".into());
        }
        if self.spool.max_group_requests == 0 || self.forwarder.batch_size == 0 {
            return bad("spool.max_group_requests and forwarder.batch_size must be > 0".into());
        }
        if self.sink.is_some() {
            return bad("the [sink] table is replaced by [[sinks]] (name, kind, ...); see the README's \"Forward to your pipeline\"".into());
        }
        let default_batch = self.forwarder.batch_size;
        let mut names = std::collections::HashSet::new();
        for s in &mut self.sinks {
            if matches!(s.kind, SinkKind::Warehouse | SinkKind::Postgres) && s.batch_size.is_none()
            {
                s.batch_size = Some(default_batch);
            }
            s.validate()?;
            if !names.insert(s.name.clone()) {
                return bad(format!("sink names must be unique ({:?} twice)", s.name));
            }
        }
        if !(1..=10_000_000).contains(&self.rate_limit.max_tracked_clients) {
            return bad("rate_limit.max_tracked_clients must be 1..=10000000".into());
        }
        if !(0..=19).contains(&self.forwarder.nice) {
            return bad(format!(
                "forwarder.nice must be 0..=19 (0: the same priority as collection), not {}",
                self.forwarder.nice
            ));
        }
        if self.forwarder.batch_size > MAX_FORWARD_BATCH {
            return bad(format!(
                "forwarder.batch_size must be 1..={MAX_FORWARD_BATCH}"
            ));
        }
        if self.sites.is_empty() {
            return bad("at least one [[sites]] entry is needed".into());
        }
        let mut keys = std::collections::HashSet::new();
        for s in &self.sites {
            if s.key.is_empty() || !keys.insert(&s.key) {
                return bad(format!(
                    "site keys must be non-empty and unique (got {:?})",
                    s.key
                ));
            }
            if s.server_secrets.iter().any(|k| k.len() < 16) {
                return bad(format!(
                    "site {:?}: server secrets must be at least 16 characters",
                    s.key
                ));
            }
            for o in &s.origins {
                if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                    return bad(format!(
                        "site {:?}: origin {o:?} must look like https://host[:port]",
                        s.key
                    ));
                }
            }
        }
        self.resolve_admin_token()?;
        let f = &self.faults;
        if !(0.0..=1.0).contains(&f.fail_ratio) || !(0.0..=1.0).contains(&f.ack_lost_ratio) {
            return bad("faults.fail_ratio and faults.ack_lost_ratio must be within 0..=1".into());
        }
        self.reconcile
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        self.dashboard
            .validate(&self.reconcile)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return bad("log_format must be \"text\" or \"json\"".into());
        }
        Ok(())
    }

    /// Reads `admin_token_file` into `admin_token` and checks the admin address's rule.
    fn resolve_admin_token(&mut self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if let Some(path) = &self.admin_token_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::Invalid(format!(
                    "cannot read admin_token_file {}: {e}",
                    path.display()
                ))
            })?;
            let from_file = text.trim();
            // Equal: this ran before (validation is idempotent).
            if self.admin_token.as_deref().is_some_and(|t| t != from_file) {
                return bad("set admin_token or admin_token_file, not both".into());
            }
            self.admin_token = Some(from_file.to_string());
        }
        match &self.admin_token {
            Some(t) if t.chars().count() < 16 || t.chars().any(char::is_whitespace) => {
                bad("admin_token must be at least 16 characters, without spaces".into())
            }
            None if !self.admin_listen.ip().is_loopback() => bad(format!(
                "admin_listen {} is not a loopback address: set an admin token \
                 (TRUEUP_ADMIN_TOKEN, admin_token_file or admin_token) or listen on 127.0.0.1",
                self.admin_listen
            )),
            _ => Ok(()),
        }
    }

    /// The per-event limits for validation.
    pub fn event_limits(&self) -> Limits {
        Limits {
            max_event_bytes: self.limits.max_event_bytes,
            max_depth: self.limits.max_depth,
            max_future_ms: self.limits.max_future_secs.saturating_mul(1000),
            max_past_ms: self.limits.max_past_secs.saturating_mul(1000),
            ..Limits::default()
        }
    }

    /// The built-in schemas plus the user schema file, if any.
    pub fn schema_registry(&self) -> Result<SchemaRegistry, ConfigError> {
        let mut reg = SchemaRegistry::builtin();
        if let Some(path) = &self.schemas_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let file: SchemaFile = toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.clone(),
                source: Box::new(source),
            })?;
            for def in file.schema {
                reg.register(def)
                    .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            }
        }
        Ok(reg)
    }

    /// Public URL path of the collection endpoint.
    pub fn collect_url_path(&self) -> String {
        format!("{}/{}", self.prefix, self.collect_path)
    }

    /// Public URL path of the server-event endpoint.
    pub fn server_url_path(&self) -> String {
        format!("{}/{}", self.prefix, self.server_path)
    }

    /// Public URL path under which the agent's files are served (ends with `/`).
    pub fn assets_url_path(&self) -> String {
        format!("{}/{}/", self.prefix, self.assets_path)
    }

    /// The sinks that run: the configured ones, or the embedded warehouse alone.
    pub fn effective_sinks(&self) -> Vec<SinkConfig> {
        if self.sinks.is_empty() {
            let mut wh = SinkConfig::default_warehouse();
            wh.batch_size = Some(self.forwarder.batch_size);
            vec![wh]
        } else {
            self.sinks.clone()
        }
    }

    /// The file of a warehouse sink: its `path`, or `<data_dir>/warehouse.sqlite` for the
    /// first warehouse sink and `<data_dir>/<name>.sqlite` for the others.
    pub fn warehouse_path_of(&self, sink: &SinkConfig) -> PathBuf {
        if let Some(p) = &sink.path {
            return p.clone();
        }
        let first = self
            .effective_sinks()
            .into_iter()
            .find(|s| s.kind == SinkKind::Warehouse)
            .map(|s| s.name);
        if first.as_deref() == Some(sink.name.as_str()) {
            self.data_dir.join("warehouse.sqlite")
        } else {
            self.data_dir.join(format!("{}.sqlite", sink.name))
        }
    }

    /// The warehouse reconciliation reads: the first warehouse sink's file
    /// (`<data_dir>/warehouse.sqlite` when none is configured).
    pub fn warehouse_path(&self) -> PathBuf {
        self.effective_sinks()
            .iter()
            .find(|s| s.kind == SinkKind::Warehouse)
            .map_or_else(
                || self.data_dir.join("warehouse.sqlite"),
                |s| self.warehouse_path_of(s),
            )
    }

    /// The spool file.
    pub fn spool_path(&self) -> PathBuf {
        self.data_dir.join("spool.sqlite")
    }

    /// What reconciliation reads: the first warehouse among the sinks (`warehouse` or
    /// `postgres`, in configuration order; the embedded one when none) and the spool's tally.
    pub fn reconcile_stores(&self) -> Result<trueup_reconcile::Stores, ConfigError> {
        let first = self
            .effective_sinks()
            .into_iter()
            .find(|s| matches!(s.kind, SinkKind::Warehouse | SinkKind::Postgres));
        let warehouse = match first {
            Some(s) if s.kind == SinkKind::Postgres => {
                trueup_reconcile::WarehouseStore::Postgres(s.secret()?.unwrap_or_default())
            }
            Some(s) => trueup_reconcile::WarehouseStore::Sqlite(self.warehouse_path_of(&s)),
            None => {
                trueup_reconcile::WarehouseStore::Sqlite(self.data_dir.join("warehouse.sqlite"))
            }
        };
        Ok(trueup_reconcile::Stores {
            warehouse,
            spool: Some(self.spool_path()),
        })
    }
}
