//! Rate limiting per client IP and per site key (token buckets, `governor`), and the client
//! IP rule for relays behind trusted proxies.
//!
//! Client addresses are kept in memory only, for the per-IP limit, and never stored or
//! logged. The per-IP buckets are bounded: at most `rate_limit.max_tracked_clients` (least
//! recently seen evicted first; an evicted client starts again with a full burst), so a flood
//! of distinct addresses costs a fixed amount of memory. IPv6 clients are limited per /64
//! (one host usually holds a whole /64, so per address the limit would not hold); IPv4 per
//! address. Site keys are limited only after they were found in the configuration.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::num::NonZeroUsize;
use std::sync::Mutex;

use axum::http::HeaderMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use lru::LruCache;

use crate::api::ApiError;
use crate::config::RateLimitConfig;

/// Both limiters. A limit of 0 in the config leaves that limiter out.
pub struct Limiters {
    per_ip: Option<PerClient>,
    per_site: Option<DefaultKeyedRateLimiter<String>>,
    trusted: Vec<IpNet>,
    clock: DefaultClock,
}

/// One bucket per client, the least recently seen evicted beyond the capacity.
struct PerClient {
    quota: Quota,
    buckets: Mutex<LruCache<IpAddr, DefaultDirectRateLimiter>>,
}

impl PerClient {
    fn check(
        &self,
        ip: IpAddr,
    ) -> Result<(), governor::NotUntil<<DefaultClock as Clock>::Instant>> {
        // A poisoned lock means a panic while holding it; the cache itself is still sound.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets
            .get_or_insert(client_key(ip), || RateLimiter::direct(self.quota))
            .check()
    }

    fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The bucket a client address counts against: IPv4 (also IPv4-mapped IPv6) per address,
/// IPv6 per /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(Ipv6Addr::from(seg))
            }
        },
        v4 => v4,
    }
}

fn quota(per_sec: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(per_sec)?;
    Some(Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).unwrap_or(rate)))
}

impl Limiters {
    /// Builds the limiters from the config.
    pub fn new(cfg: &RateLimitConfig) -> Limiters {
        Limiters {
            per_ip: quota(cfg.per_ip_per_sec, cfg.per_ip_burst).map(|quota| PerClient {
                quota,
                buckets: Mutex::new(LruCache::new(
                    NonZeroUsize::new(cfg.max_tracked_clients).unwrap_or(NonZeroUsize::MIN),
                )),
            }),
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
            Some(l) => l.check(ip).map_err(|nu| self.limited("ip", nu)),
            None => Ok(()),
        }
    }

    /// Clients with a bucket now (at most `rate_limit.max_tracked_clients`).
    pub fn tracked_clients(&self) -> usize {
        self.per_ip.as_ref().map_or(0, PerClient::len)
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

    /// Forgets idle site keys (the per-client buckets are bounded by their capacity).
    pub fn shrink(&self) {
        if let Some(l) = &self.per_site {
            l.retain_recent();
        }
    }

    /// Sets the `trueup_rate_limit_tracked_clients` gauge.
    pub fn report(&self) {
        metrics::gauge!("trueup_rate_limit_tracked_clients").set(self.tracked_clients() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiters(trusted: &[&str]) -> Limiters {
        Limiters::new(&RateLimitConfig {
            per_ip_per_sec: 1,
            per_ip_burst: 2,
            max_tracked_clients: 1000,
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

    #[test]
    fn many_distinct_clients_cost_a_bounded_memory_and_ipv6_counts_per_64() {
        let l = limiters(&[]);
        for i in 0..50_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(l.check_ip(ip).is_ok());
            assert!(l.tracked_clients() <= 1000);
        }
        assert_eq!(l.tracked_clients(), 1000);
        // One host's /64: its addresses share one bucket (burst 2).
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(l.check_ip(a).is_ok());
        assert!(l.check_ip(b).is_ok());
        assert!(l.check_ip(a).is_err(), "the third request of one /64");
        assert!(l.check_ip("2001:db8:1:3::1".parse().unwrap()).is_ok());
        // IPv4-mapped IPv6 is the IPv4 client.
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert!(l.check_ip(v4).is_ok());
        assert!(l.check_ip(mapped).is_ok());
        assert!(l.check_ip(v4).is_err());
    }
}
