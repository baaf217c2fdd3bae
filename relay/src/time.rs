//! Wall-clock helpers.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `ms` as ISO-8601 / RFC 3339 in UTC with milliseconds (`2026-12-06T10:00:00.123Z`), the form
/// PostHog and Segment take. Outside years -9999..=9999 (never a validated event's time):
/// the epoch.
pub fn iso8601(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(ts) => format!("{ts:.3}"),
        Err(_) => "1970-01-01T00:00:00.000Z".to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn iso8601_has_milliseconds_and_z() {
        assert_eq!(
            super::iso8601(1_764_324_000_123),
            "2025-11-28T10:00:00.123Z"
        );
        assert_eq!(super::iso8601(0), "1970-01-01T00:00:00.000Z");
    }
}
