//! Times as the shop stores them: RFC 3339 in UTC with milliseconds
//! (`2026-11-28T10:00:00.123Z`), so `substr(created_at, 1, 10)` is the UTC day, and the
//! milliseconds since the epoch that events carry.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `ms` as stored: `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn to_rfc3339(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(ts) => format!("{ts:.3}"),
        // Outside years -9999..=9999: not a time this shop produces.
        Err(_) => "1970-01-01T00:00:00.000Z".to_string(),
    }
}

/// A stored time back in milliseconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    text.parse::<jiff::Timestamp>()
        .ok()
        .map(|ts| ts.as_millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_times_have_milliseconds_and_a_utc_day_prefix() {
        assert_eq!(to_rfc3339(1_764_324_000_123), "2025-11-28T10:00:00.123Z");
        assert_eq!(to_rfc3339(1_764_324_000_000), "2025-11-28T10:00:00.000Z");
        assert_eq!(to_rfc3339(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn round_trips() {
        for ms in [0, 1, 1_764_324_000_123, now_ms()] {
            assert_eq!(parse_rfc3339(&to_rfc3339(ms)), Some(ms));
        }
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
