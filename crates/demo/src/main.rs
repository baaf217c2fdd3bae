//! `trueup-demo`: reads the command line, optionally starts the relay, opens the database,
//! builds the emitter and serves the shop until Ctrl-C or SIGTERM; then stops serving, shuts
//! the emitter down (the last business events reach the relay) and stops the relay.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use trueup_demo::config::Args;
use trueup_demo::config::DEFAULT_RELAY;
use trueup_demo::relay_child::RelayChild;
use trueup_demo::{AppState, Flaky, app, db, proxy};
use trueup_emitter::{Config as EmitterConfig, Emitter};

/// How long the emitter may take, at exit, to deliver what it holds.
const EMITTER_DRAIN: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = EnvFilter::try_from_env("TRUEUP_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,tower_http=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("trueup-demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // block_on runs `run` on this (the main) thread, so the relay is forked from a thread
    // that lives as long as the process (what PR_SET_PDEATHSIG watches).
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the shop stopped with an error");
            eprintln!("trueup-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut relay = match &args.relay_config {
        Some(path) => Some(RelayChild::start(path).await?),
        None => None,
    };
    let relay_url = match (&args.relay, &relay) {
        (Some(url), Some(child)) => {
            if !url.contains(&child.public.to_string()) {
                tracing::warn!(relay = %url, listen = %child.public, "--relay does not point at the started relay's address");
            }
            url.clone()
        }
        (Some(url), None) => url.clone(),
        (None, Some(child)) => format!("http://{}", child.public),
        (None, None) => DEFAULT_RELAY.to_string(),
    };
    let relay_died = relay.as_mut().map(RelayChild::died);

    let db = db::Db::open(&args.db).with_context(|| format!("database {}", args.db.display()))?;
    let emitter = Emitter::new(EmitterConfig::new(
        &relay_url,
        &args.site,
        &args.server_secret,
    ))?;
    let state = AppState {
        db,
        emitter: emitter.clone(),
        proxy: proxy::Proxy::new(&relay_url)?,
        flaky: Flaky::new(args.flaky_checkout, args.seed),
    };
    if args.flaky_checkout > 0.0 {
        tracing::warn!(
            ratio = args.flaky_checkout,
            seed = args.seed,
            "fault injection on: some checkouts answer 503 after committing"
        );
    }
    // Facts of the last day whose emit may have been lost before a restart: sent again,
    // stored once.
    match state.re_emit_recent(24 * 3600 * 1000).await {
        Ok((users, orders)) if users + orders > 0 => {
            tracing::info!(
                users,
                orders,
                "re-emitted the last day's facts (the relay dedupes)"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not re-emit recent facts"),
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    if let Some(path) = &args.ready_file {
        let relay_admin = relay.as_ref().map(|r| r.admin.to_string());
        let body = serde_json::json!({"listen": addr.to_string(), "relay": relay_url, "relay_admin": relay_admin});
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{body}\n"))
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("cannot write the ready file {}", path.display()))?;
    }
    tracing::info!(
        url = %format!("http://{addr}/"),
        relay = %relay_url,
        db = %args.db.display(),
        "demo shop listening"
    );
    if let Some(r) = &relay {
        tracing::info!(
            url = %format!("http://{}/dash/", r.admin),
            "dashboards on the relay's admin address (sign in with its admin token)"
        );
    }

    let (died_tx, mut died_rx) = tokio::sync::oneshot::channel::<String>();
    let stop = async move {
        let died = async move {
            match relay_died {
                Some(d) => d.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown_signal() => tracing::info!("shutting down"),
            why = died => { let _ = died_tx.send(why); }
        }
    };
    axum::serve(
        listener,
        app(state, &args.www).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stop)
    .await?;

    match emitter.shutdown(EMITTER_DRAIN).await {
        Ok(()) => tracing::info!(stats = ?emitter.stats(), "emitter drained"),
        Err(e) => {
            tracing::error!(error = %e, stats = ?emitter.stats(), "emitter shut down with events undelivered")
        }
    }
    if let Some(relay) = relay {
        relay.stop().await;
    }
    match died_rx.try_recv() {
        Ok(why) => anyhow::bail!(why),
        Err(_) => Ok(()),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
