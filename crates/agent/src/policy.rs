//! The retry policy, as pure functions so it is tested without a browser.
//!
//! - Network errors, timeouts, 408, 429 and 5xx are retried; `Retry-After` is honoured and
//!   otherwise the wait is exponential with full jitter (uniform in `[0, min(cap, base·2^n)]`).
//! - Events are given up by age (`expired`), never by attempt count.
//! - 413 splits the batch; a single event answered 413 is dropped as `too_large`.
//! - 404 is retried too: it means the endpoint is not routed (a deploy or proxy mistake),
//!   not that the events are bad, and giving up by age bounds it.
//! - Any other 4xx drops the batch's events with the reason `rejected`.

/// What to do with a batch after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 200: read the per-event results.
    Answered,
    /// Try again later.
    Retry,
    /// Too large: send fewer events at once.
    Split,
    /// Permanently refused: drop with the reason `rejected`.
    Drop,
}

/// Classifies an HTTP status (`None` for a network error or timeout).
pub fn classify(status: Option<u16>) -> Verdict {
    match status {
        None | Some(404) | Some(408) | Some(429) => Verdict::Retry,
        Some(200..=299) => Verdict::Answered,
        Some(413) => Verdict::Split,
        Some(500..=599) => Verdict::Retry,
        Some(_) => Verdict::Drop,
    }
}

/// The wait before retry number `failures` (1 = after the first failure), in ms, given a
/// uniform random number in `[0, 1)` and the server's `Retry-After` (seconds) if any.
pub fn backoff_ms(
    failures: u32,
    random: f64,
    retry_after_secs: Option<f64>,
    base_ms: f64,
    cap_ms: f64,
) -> f64 {
    let exp = base_ms * f64::from(1u32 << failures.saturating_sub(1).min(30));
    let jittered = exp.min(cap_ms) * random.clamp(0.0, 1.0);
    match retry_after_secs {
        // The server knows its load: never retry before it asks, however long it asks
        // (up to a day, against broken values).
        Some(s) if s.is_finite() && s > 0.0 => jittered.max((s * 1000.0).min(86_400_000.0)),
        _ => jittered,
    }
}

/// Keeps a parsed `Retry-After` (delay-seconds form) when it is usable; the HTTP-date form
/// parses as NaN and counts as absent. Parsing is the caller's (`parseFloat` in the browser,
/// which keeps Rust's float parser out of the wasm).
pub fn retry_after(parsed: f64) -> Option<f64> {
    Some(parsed).filter(|s| s.is_finite() && *s >= 0.0)
}

/// Whether an event captured at `ts` is too old to send.
pub fn expired(ts: f64, now: f64, max_age_ms: f64) -> bool {
    now - ts > max_age_ms
}

/// Whether an event at `now` starts a new session: after `timeout_ms` idle since the last
/// event, or when the visitor arrives from a new campaign. A damaged (NaN) last time counts
/// as idle.
pub fn new_session(last: f64, now: f64, timeout_ms: f64, new_campaign: bool) -> bool {
    let idle = now - last;
    new_campaign || idle.is_nan() || idle > timeout_ms
}

#[cfg(test)]
mod tests {
    //! Native by `cargo test`, and in headless Chromium by
    //! `cargo test --target wasm32-unknown-unknown` (the code the browser runs).
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;
    #[cfg(target_arch = "wasm32")]
    wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

    #[test]
    fn statuses_map_to_verdicts() {
        assert_eq!(classify(None), Verdict::Retry);
        for s in [404, 408, 429, 500, 502, 503, 504] {
            assert_eq!(classify(Some(s)), Verdict::Retry, "{s}");
        }
        assert_eq!(classify(Some(200)), Verdict::Answered);
        assert_eq!(classify(Some(413)), Verdict::Split);
        for s in [400, 401, 403, 415] {
            assert_eq!(classify(Some(s)), Verdict::Drop, "{s}");
        }
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        assert_eq!(backoff_ms(1, 1.0, None, 500.0, 60_000.0), 500.0);
        assert_eq!(backoff_ms(3, 1.0, None, 500.0, 60_000.0), 2000.0);
        assert_eq!(backoff_ms(30, 1.0, None, 500.0, 60_000.0), 60_000.0);
        assert_eq!(
            backoff_ms(3, 0.0, None, 500.0, 60_000.0),
            0.0,
            "full jitter reaches 0"
        );
        assert_eq!(backoff_ms(1, 0.5, Some(10.0), 500.0, 60_000.0), 10_000.0);
        assert_eq!(
            backoff_ms(1, 0.5, Some(1e12), 500.0, 60_000.0),
            86_400_000.0
        );
        assert_eq!(backoff_ms(u32::MAX, 0.99, None, 500.0, 60_000.0), 59_400.0);
    }

    #[test]
    fn retry_after_filtering() {
        assert_eq!(retry_after(5.0), Some(5.0));
        assert_eq!(retry_after(f64::NAN), None, "an HTTP-date");
        assert_eq!(retry_after(-1.0), None);
    }

    #[test]
    fn sessions_rotate_after_idle_or_a_new_campaign() {
        let min = 60_000.0;
        assert!(!new_session(0.0, 29.0 * min, 30.0 * min, false));
        assert!(new_session(0.0, 31.0 * min, 30.0 * min, false));
        assert!(new_session(0.0, 1.0, 30.0 * min, true));
        assert!(new_session(f64::NAN, 1.0, 30.0 * min, false));
    }

    #[test]
    fn expiry_is_by_age() {
        assert!(!expired(1000.0, 2000.0, 1000.0));
        assert!(expired(1000.0, 2001.0, 1000.0));
    }
}
