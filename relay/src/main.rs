//! `trueup-relay`: reads the configuration, builds the relay, serves until SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use trueup_relay::{Config, Relay};

/// trueup's first-party relay. Flags override environment variables, which override the file.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (every field optional; see the README, "Configure it").
    #[arg(long, env = "TRUEUP_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Public address (collection endpoint, agent files, demo site).
    #[arg(long, env = "TRUEUP_LISTEN")]
    listen: Option<SocketAddr>,
    /// Admin address (/healthz, /readyz, /metrics).
    #[arg(long, env = "TRUEUP_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Token the admin endpoints require (Authorization: Bearer <token>); overrides
    /// admin_token and admin_token_file. Needed when the admin address is not loopback.
    #[arg(long, env = "TRUEUP_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Write the bound addresses here as JSON once ready (see `ready_file` in the config);
    /// with port 0 in --listen/--admin-listen, how a parent process learns the ports.
    #[arg(long, env = "TRUEUP_READY_FILE")]
    ready_file: Option<PathBuf>,
    /// Directory of the spool and the embedded warehouse.
    #[arg(long, env = "TRUEUP_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Public path prefix (e.g. /_r).
    #[arg(long, env = "TRUEUP_PREFIX")]
    prefix: Option<String>,
    /// Folder of the agent's files, served under <prefix>/<assets_path>/.
    #[arg(long, env = "TRUEUP_ASSET_DIR")]
    asset_dir: Option<PathBuf>,
    /// Folder served at / (the demo site).
    #[arg(long, env = "TRUEUP_WWW_DIR")]
    www_dir: Option<PathBuf>,
    /// TOML file of user schemas.
    #[arg(long, env = "TRUEUP_SCHEMAS")]
    schemas: Option<PathBuf>,
    /// A server secret for the first site (for backends emitting server events).
    #[arg(long, env = "TRUEUP_SERVER_SECRET", hide_env_values = true)]
    server_secret: Option<String>,
    /// The reconciliation's truth database (sqlite:<path> or postgres://...), so that its
    /// password need not be in the file; overrides reconcile.truth.
    #[arg(
        long,
        env = "TRUEUP_RECONCILE_TRUTH",
        hide_env_values = true,
        global = true
    )]
    reconcile_truth: Option<String>,
    /// The sinks, replacing the file's `[[sinks]]`: a TOML array of tables, e.g.
    /// `[{name = "ph", kind = "posthog", url = "https://us.i.posthog.com", secret_env = "PH_KEY"}]`.
    #[arg(long, env = "TRUEUP_SINKS")]
    sinks: Option<String>,
    /// Print the effective configuration and public URL paths, then exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Compare client analytics with the system of record (the `[reconcile]` section of the
    /// configuration) per day and metric, print the table and loss by stage, and exit.
    /// Reads the data directory and the truth database; writes nothing.
    Reconcile {
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// Days to report, ending today (UTC); overrides reconcile.days.
        #[arg(long)]
        days: Option<u32>,
    },
    /// Run the loader (the `[loader]` section): consume the log the relays' kafka sinks
    /// write and fill the warehouse, committing offsets only after each warehouse
    /// transaction. Serves /healthz, /readyz and /metrics on admin_listen; until SIGTERM.
    Load,
}

fn run_reconcile(mut cfg: Config, json: bool, days: Option<u32>) -> anyhow::Result<()> {
    if let Some(d) = days {
        cfg.reconcile.days = d;
    }
    if cfg.reconcile.metrics.is_empty() {
        eprintln!(
            "trueup-relay: no [[reconcile.metrics]] in the configuration; reporting loss by stage only"
        );
    }
    let stores = cfg.reconcile_stores()?;
    let report =
        trueup_reconcile::reconcile(&cfg.reconcile, &stores, trueup_relay::time::now_ms())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

fn effective_config(args: &Args) -> anyhow::Result<Config> {
    let mut cfg = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let Some(v) = args.admin_listen {
        cfg.admin_listen = v;
    }
    if let Some(v) = &args.admin_token {
        cfg.admin_token = Some(v.clone());
        cfg.admin_token_file = None;
    }
    if let Some(v) = &args.ready_file {
        cfg.ready_file = Some(v.clone());
    }
    if let Some(v) = &args.data_dir {
        cfg.data_dir = v.clone();
    }
    if let Some(v) = &args.prefix {
        cfg.prefix = v.clone();
    }
    if let Some(v) = &args.asset_dir {
        cfg.asset_dir = v.clone();
    }
    if let Some(v) = &args.www_dir {
        cfg.www_dir = Some(v.clone());
    }
    if let Some(v) = &args.schemas {
        cfg.schemas_file = Some(v.clone());
    }
    if let Some(secret) = &args.server_secret
        && let Some(site) = cfg.sites.first_mut()
    {
        site.server_secrets.push(secret.clone());
    }
    if let Some(v) = &args.reconcile_truth {
        cfg.reconcile.truth = Some(v.clone());
    }
    if let Some(text) = &args.sinks {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Sinks {
            sinks: Vec<trueup_relay::config::SinkConfig>,
        }
        let parsed: Sinks = toml::from_str(&format!("sinks = {text}")).map_err(|e| {
            anyhow::anyhow!("TRUEUP_SINKS / --sinks is not a TOML array of sink tables: {e}")
        })?;
        cfg.sinks = parsed.sinks;
    }
    cfg.validate()?;
    Ok(cfg)
}

fn print_config(cfg: &Config) -> anyhow::Result<()> {
    let mut shown = cfg.clone();
    if shown.admin_token.is_some() {
        shown.admin_token = Some("<redacted>".into());
    }
    for site in &mut shown.sites {
        for s in &mut site.server_secrets {
            *s = "<redacted>".into();
        }
    }
    if let Some(truth) = &mut shown.reconcile.truth {
        *truth = trueup_reconcile::truth::redact(truth);
    }
    println!("# Effective trueup-relay configuration");
    println!("{}", toml::to_string_pretty(&shown)?);
    println!("[public_paths]  # derived; not settable");
    println!("collect = {:?}", cfg.collect_url_path());
    println!("server = {:?}", cfg.server_url_path());
    println!("assets = {:?}", cfg.assets_url_path());
    println!(
        "warehouse = {:?}",
        cfg.warehouse_path().display().to_string()
    );
    for s in cfg.effective_sinks() {
        println!(
            "sink.{} = {:?}",
            s.name,
            format!(
                "{} batch_size={} concurrency={} timeout_secs={}",
                s.kind.as_str(),
                s.batch_size(),
                s.concurrency,
                s.timeout_secs
            )
        );
    }
    println!("spool = {:?}", cfg.spool_path().display().to_string());
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let cfg = match effective_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trueup-relay: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Some(Command::Reconcile { json, days }) = args.command {
        return match run_reconcile(cfg, json, days) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("trueup-relay reconcile: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if args.print_config {
        return match print_config(&cfg) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("trueup-relay: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let loading = matches!(args.command, Some(Command::Load));
    let filter = EnvFilter::try_from_env("TRUEUP_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,tower_http=warn"));
    // Logs go to stderr (stdout carries --print-config and reports), coloured only on a
    // terminal and without NO_COLOR: a log file or collector gets plain text or JSON lines.
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    if cfg.log_format == "json" {
        logs.json().init();
    } else {
        use std::io::IsTerminal as _;
        let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        logs.with_ansi(colour).init();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("trueup-relay: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        let signal = async move {
            trueup_relay::server::shutdown_signal().await;
            trigger.cancel();
        };
        if loading {
            let loader = trueup_relay::loader::Loader::bind(cfg).await?;
            tokio::spawn(signal);
            return loader.run(shutdown).await;
        }
        let relay = Relay::bind(cfg).await?;
        tokio::spawn(signal);
        relay.run(shutdown).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "relay stopped with an error");
            eprintln!("trueup-relay: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
