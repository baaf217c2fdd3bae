//! The emitter's configuration: where the relay is, which site and secret, and the bounds of
//! batching, buffering and retrying. Every field has a default that suits a typical backend.

use std::fmt;
use std::time::Duration;

/// The relay's server path under its default prefix (`<prefix>/<server_path>` = `/_r/s`).
pub const DEFAULT_SERVER_PATH: &str = "/_r/s";

/// How an [`crate::Emitter`] reaches the relay and how much it holds.
#[derive(Clone)]
pub struct Config {
    /// Full URL of the relay's server endpoint, e.g. `https://shop.example/_r/s`.
    /// [`Config::new`] builds it from the relay's base URL and [`DEFAULT_SERVER_PATH`].
    pub endpoint: String,
    /// The site key the events belong to (the relay's `[[sites]] key`). Part of every event id.
    pub site: String,
    /// One of the site's `server_secrets`, sent as `Authorization: Bearer …`. Never logged.
    pub secret: String,
    /// Most events in one request. Default 100.
    pub max_batch_events: usize,
    /// Most bytes of events in one request (the relay answers 413 above its `max_body_bytes`,
    /// 1 MiB by default). Default 256 KiB.
    pub max_batch_bytes: usize,
    /// How long the first event of a batch may wait for others before the batch is sent.
    /// [`crate::Emitter::flush`] sends at once. Default 200 ms.
    pub max_batch_delay: Duration,
    /// Most events held in memory: waiting, in flight or being retried. Past it,
    /// [`crate::Emitter::emit`] returns [`crate::EmitError::BufferFull`]. Default 10 000.
    pub buffer_capacity: usize,
    /// Longest time one request may take, connecting included. Default 10 s.
    pub request_timeout: Duration,
    /// The first retry waits up to this long (full jitter), doubling per consecutive failure.
    /// Default 100 ms.
    pub initial_backoff: Duration,
    /// The longest wait between retries, unless the relay's `Retry-After` asks for longer.
    /// Default 30 s.
    pub max_backoff: Duration,
    /// An event still not acknowledged this long after it was emitted is given up (counted
    /// `failed`) at its next failed attempt. Keep it below the relay's `limits.max_past_secs`
    /// (8 days by default), past which the relay would reject the event anyway. Default 24 h.
    pub give_up_after: Duration,
}

impl Config {
    /// A configuration with the defaults, for the relay at `relay_url` (its public base URL,
    /// e.g. `https://shop.example` or `http://127.0.0.1:8081`) with the default prefix.
    pub fn new(
        relay_url: impl AsRef<str>,
        site: impl Into<String>,
        secret: impl Into<String>,
    ) -> Config {
        Config {
            endpoint: format!(
                "{}{DEFAULT_SERVER_PATH}",
                relay_url.as_ref().trim_end_matches('/')
            ),
            site: site.into(),
            secret: secret.into(),
            max_batch_events: 100,
            max_batch_bytes: 256 * 1024,
            max_batch_delay: Duration::from_millis(200),
            buffer_capacity: 10_000,
            request_timeout: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            give_up_after: Duration::from_secs(24 * 3600),
        }
    }

    /// What is wrong with this configuration, if anything.
    pub(crate) fn problem(&self) -> Option<String> {
        let endpoint = reqwest::Url::parse(&self.endpoint);
        match endpoint {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                return Some(format!(
                    "endpoint {:?} is not an http(s) URL",
                    self.endpoint
                ));
            }
        }
        if self.site.is_empty() {
            return Some("site must not be empty".into());
        }
        if self.secret.trim().is_empty() {
            return Some("secret must not be empty".into());
        }
        if self.max_batch_events == 0 || self.max_batch_bytes == 0 || self.buffer_capacity == 0 {
            return Some(
                "max_batch_events, max_batch_bytes and buffer_capacity must be > 0".into(),
            );
        }
        if self.initial_backoff.is_zero() || self.max_backoff < self.initial_backoff {
            return Some("backoff must satisfy 0 < initial_backoff <= max_backoff".into());
        }
        if self.request_timeout.is_zero() {
            return Some("request_timeout must be > 0".into());
        }
        None
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("endpoint", &self.endpoint)
            .field("site", &self.site)
            .field("secret", &"<redacted>")
            .field("max_batch_events", &self.max_batch_events)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("max_batch_delay", &self.max_batch_delay)
            .field("buffer_capacity", &self.buffer_capacity)
            .field("request_timeout", &self.request_timeout)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("give_up_after", &self.give_up_after)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_appends_the_server_path_and_checks_out() {
        let c = Config::new("http://127.0.0.1:8081/", "demo", "s3cret-s3cret-s3cret");
        assert_eq!(c.endpoint, "http://127.0.0.1:8081/_r/s");
        assert_eq!(c.problem(), None);
    }

    #[test]
    fn problems_are_named() {
        let ok = Config::new("https://shop.example", "demo", "s3cret-s3cret-s3cret");
        let mut c = ok.clone();
        c.endpoint = "shop.example/_r/s".into();
        assert!(c.problem().unwrap().contains("not an http(s) URL"));
        let mut c = ok.clone();
        c.secret = " ".into();
        assert!(c.problem().unwrap().contains("secret"));
        let mut c = ok.clone();
        c.buffer_capacity = 0;
        assert!(c.problem().unwrap().contains("buffer_capacity"));
        let mut c = ok;
        c.max_backoff = Duration::from_millis(1);
        assert!(c.problem().unwrap().contains("backoff"));
    }

    #[test]
    fn debug_hides_the_secret() {
        let c = Config::new("https://shop.example", "demo", "s3cret-s3cret-s3cret");
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
