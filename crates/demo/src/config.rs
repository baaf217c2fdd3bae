//! The shop's command line. Flags override environment variables, which override defaults
//! that run the demo on a laptop.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// The relay the shop talks to when neither --relay nor --relay-config says otherwise.
pub const DEFAULT_RELAY: &str = "http://127.0.0.1:8081";

/// The secret of `relay/demo.toml`'s demo site; use a real one anywhere else.
pub const DEMO_SERVER_SECRET: &str = "demo-server-secret-change-me";

/// trueup's demo shop: signup and checkout on a SQLite system of record, the relay proxied
/// under /_r/, business events emitted to the relay.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Args {
    /// Address the shop listens on (the origin the browser sees).
    #[arg(long, env = "TRUEUP_DEMO_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The relay's public base URL: /_r/* is proxied to it, and server events go to its
    /// server path (<relay>/_r/s). Default: the relay --relay-config started, else
    /// http://127.0.0.1:8081.
    #[arg(long, env = "TRUEUP_DEMO_RELAY")]
    pub relay: Option<String>,
    /// Write `{"listen": "<addr>", "relay": "<url>", "relay_admin": "<addr>" | null}` here
    /// once the shop listens (with port 0 in --listen, how a parent process learns the port;
    /// `relay_admin` is the admin address of the relay --relay-config started).
    #[arg(long, env = "TRUEUP_DEMO_READY_FILE", value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
    /// The shop's SQLite database (users, orders); created when missing.
    #[arg(long, env = "TRUEUP_DEMO_DB", default_value = "data/demo.sqlite")]
    pub db: PathBuf,
    /// Folder of the pages served at / (index, signup, checkout).
    #[arg(long, env = "TRUEUP_DEMO_WWW", default_value = "www")]
    pub www: PathBuf,
    /// The relay's site key the events belong to.
    #[arg(long, env = "TRUEUP_DEMO_SITE", default_value = "demo")]
    pub site: String,
    /// A server secret of that site (the relay's `server_secrets`).
    #[arg(
        long,
        env = "TRUEUP_SERVER_SECRET",
        default_value = DEMO_SERVER_SECRET,
        hide_env_values = true
    )]
    pub server_secret: String,
    /// Share (0..=1) of checkout requests answered 503 after the order is committed, so the
    /// page's retry with the same idempotency key is exercised.
    #[arg(long, value_name = "RATIO", default_value_t = 0.0, value_parser = ratio)]
    pub flaky_checkout: f64,
    /// Seed of the --flaky-checkout decisions.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Start the relay too: the `trueup-relay` next to this executable, with this config
    /// file; the shop waits until it is ready and stops it on exit (Ctrl-C stops both).
    #[arg(long, env = "TRUEUP_DEMO_RELAY_CONFIG", value_name = "PATH")]
    pub relay_config: Option<PathBuf>,
}

fn ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err("must be within 0..=1".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_run_the_demo_and_ratios_are_checked() {
        let a = Args::try_parse_from(["trueup-demo"]).unwrap();
        assert_eq!(a.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(a.relay, None);
        assert_eq!(a.db, PathBuf::from("data/demo.sqlite"));
        assert_eq!(a.flaky_checkout, 0.0);
        let a = Args::try_parse_from(["trueup-demo", "--flaky-checkout", "0.5", "--seed", "7"])
            .unwrap();
        assert_eq!((a.flaky_checkout, a.seed), (0.5, 7));
        assert!(Args::try_parse_from(["trueup-demo", "--flaky-checkout", "1.5"]).is_err());
    }
}
