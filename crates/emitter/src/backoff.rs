//! How long to wait before the next attempt: exponential backoff with full jitter, or the
//! relay's `Retry-After` when it gives one.

use std::time::{Duration, SystemTime};

use rand::Rng;

/// The wait before attempt `failures + 1`, after `failures` (≥ 1) consecutive failures.
///
/// Without `Retry-After`: a uniformly random wait in `[0, min(max, initial · 2^(failures-1))]`
/// ("full jitter": many backends restarted at once do not retry in lockstep). With it: at
/// least what the relay asked for, up to [`MAX_RETRY_AFTER`] or `max`, whichever is longer
/// (a broken or hostile `Retry-After` must not park events for years).
pub(crate) fn retry_delay(
    failures: u32,
    initial: Duration,
    max: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let cap = initial.saturating_mul(1u32 << exp).min(max);
    let jittered = Duration::from_millis(rand::rng().random_range(0..=cap.as_millis() as u64));
    match retry_after {
        Some(ra) => ra.min(MAX_RETRY_AFTER.max(max)).max(jittered),
        None => jittered,
    }
}

/// The longest `Retry-After` honoured when it exceeds `max_backoff`.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// A `Retry-After` header value: delay-seconds or an HTTP-date.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn full_jitter_stays_under_the_doubling_cap() {
        for failures in 1..=12u32 {
            let cap = (100 * MS * (1 << (failures - 1))).min(30_000 * MS);
            let mut seen_high = false;
            for _ in 0..200 {
                let d = retry_delay(failures, 100 * MS, 30_000 * MS, None);
                assert!(d <= cap, "failures {failures}: {d:?} > {cap:?}");
                seen_high |= d > cap / 2;
            }
            assert!(seen_high, "failures {failures}: never above half the cap");
        }
    }

    #[test]
    fn huge_failure_counts_do_not_overflow() {
        assert!(retry_delay(u32::MAX, 100 * MS, 30_000 * MS, None) <= 30_000 * MS);
    }

    #[test]
    fn retry_after_is_a_floor() {
        for _ in 0..100 {
            let d = retry_delay(1, 100 * MS, 30_000 * MS, Some(2_000 * MS));
            assert!(d >= 2_000 * MS);
        }
        // Longer than max_backoff is still honoured, up to ten minutes.
        let d = retry_delay(1, 100 * MS, 1_000 * MS, Some(120_000 * MS));
        assert_eq!(d, 120_000 * MS);
        let d = retry_delay(1, 100 * MS, 1_000 * MS, Some(Duration::from_secs(u64::MAX)));
        assert_eq!(d, MAX_RETRY_AFTER);
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
        let d = parse_retry_after(&later).unwrap();
        assert!(
            d > Duration::from_secs(55) && d <= Duration::from_secs(60),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }
}
