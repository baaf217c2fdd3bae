//! Rate limiting per client IP and per site key (token buckets, `governor`), and the client
//! IP rule for relays behind trusted proxies.

use std::net::IpAddr;
use std::num::NonZeroU32;

use axum::http::HeaderMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;

use crate::api::ApiError;
use crate::config::RateLimitConfig;

/// Both limiters. A limit of 0 in the config leaves that limiter out.
pub struct Limiters {
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_site: Option<DefaultKeyedRateLimiter<String>>,
    trusted: Vec<IpNet>,
    clock: DefaultClock,
}

fn quota(per_sec: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(per_sec)?;
    Some(Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).unwrap_or(rate)))
}

impl Limiters {
    /// Builds the limiters from the config.
    pub fn new(cfg: &RateLimitConfig) -> Limiters {
        Limiters {
            per_ip: quota(cfg.per_ip_per_sec, cfg.per_ip_burst).map(RateLimiter::keyed),
            per_site: quota(cfg.per_site_per_sec, cfg.per_site_burst).map(RateLimiter::keyed),
            trusted: cfg.trusted_proxies.clone(),
            clock: DefaultClock::default(),
        }
    }

    /// The client's IP: the peer, or, when the peer is a trusted proxy, the right-most
    /// `X-Forwarded-For` entry that is not a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.is_trusted_peer(peer) {
            return peer;
        }
        let hops: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        hops.iter()
            .rev()
            .find(|ip| !self.is_trusted_peer(**ip))
            .or(hops.first())
            .copied()
            .unwrap_or(peer)
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn is_trusted_peer(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// Takes one request from the IP's bucket.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), ApiError> {
        match &self.per_ip {
            Some(l) => l.check_key(&ip).map_err(|nu| self.limited("ip", nu)),
            None => Ok(()),
        }
    }

    /// Takes one request from the site's bucket.
    pub fn check_site(&self, site: &str) -> Result<(), ApiError> {
        match &self.per_site {
            Some(l) => l
                .check_key(&site.to_string())
                .map_err(|nu| self.limited("site", nu)),
            None => Ok(()),
        }
    }

    fn limited(
        &self,
        scope: &'static str,
        nu: governor::NotUntil<<DefaultClock as Clock>::Instant>,
    ) -> ApiError {
        metrics::counter!("trueup_rate_limited_total", "scope" => scope).increment(1);
        let wait = nu.wait_time_from(self.clock.now());
        ApiError::RateLimited {
            scope,
            retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
        }
    }

    /// Forgets idle keys so the maps stay small.
    pub fn shrink(&self) {
        if let Some(l) = &self.per_ip {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.per_site {
            l.retain_recent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiters(trusted: &[&str]) -> Limiters {
        Limiters::new(&RateLimitConfig {
            per_ip_per_sec: 1,
            per_ip_burst: 2,
            trusted_proxies: trusted.iter().map(|s| s.parse().unwrap()).collect(),
            ..Default::default()
        })
    }

    fn xff(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", v.parse().unwrap());
        h
    }

    #[test]
    fn forwarded_for_is_only_believed_from_trusted_proxies() {
        let l = limiters(&["10.0.0.0/8"]);
        let client: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(
            l.client_ip(
                "10.1.1.1".parse().unwrap(),
                &xff("198.51.100.1, 203.0.113.9, 10.2.2.2")
            ),
            client
        );
        assert_eq!(
            l.client_ip("192.0.2.1".parse().unwrap(), &xff("203.0.113.9")),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            l.client_ip("10.1.1.1".parse().unwrap(), &HeaderMap::new()),
            "10.1.1.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn burst_then_limited_with_retry_after() {
        let l = limiters(&[]);
        let ip = "192.0.2.1".parse().unwrap();
        assert!(l.check_ip(ip).is_ok());
        assert!(l.check_ip(ip).is_ok());
        match l.check_ip(ip) {
            Err(ApiError::RateLimited { retry_after, .. }) => assert!(retry_after >= 1),
            other => panic!("expected 429, got {other:?}"),
        }
        assert!(
            l.check_ip("192.0.2.2".parse().unwrap()).is_ok(),
            "other IPs are not affected"
        );
    }
}
