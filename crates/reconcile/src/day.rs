//! UTC days as `YYYY-MM-DD` strings, the unit every reconciliation row is keyed by.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

fn date_of_ms(ms: i64) -> Date {
    let ts = Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH);
    TimeZone::UTC.to_datetime(ts).date()
}

/// The UTC day of a time in milliseconds since the Unix epoch (times outside jiff's range,
/// years -9999..=9999, count as the epoch's day).
pub fn of_ms(ms: i64) -> String {
    date_of_ms(ms).to_string()
}

/// The first millisecond of `day`, or `None` if it is not a `YYYY-MM-DD` day.
pub fn start_ms(day: &str) -> Option<i64> {
    let b = day.as_bytes();
    // The strict shape first: jiff also reads other ISO 8601 forms (e.g. `20261128`).
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let date: Date = day.parse().ok()?;
    let start = TimeZone::UTC
        .to_timestamp(date.to_datetime(jiff::civil::Time::midnight()))
        .ok()?;
    Some(start.as_millisecond())
}

/// Whether `s` is a valid `YYYY-MM-DD` day.
pub fn is_day(s: &str) -> bool {
    start_ms(s).is_some()
}

/// The `n` days ending with the day of `now_ms`, oldest first.
pub fn window(now_ms: i64, n: u32) -> Vec<String> {
    let today = date_of_ms(now_ms);
    (0..i64::from(n))
        .rev()
        .filter_map(|back| today.checked_sub(back.days()).ok())
        .map(|d| d.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS_PER_DAY: i64 = 86_400_000;

    #[test]
    fn round_trips_and_known_dates() {
        assert_eq!(of_ms(0), "1970-01-01");
        assert_eq!(of_ms(1_795_831_200_000), "2026-11-28");
        assert_eq!(of_ms(-1), "1969-12-31");
        assert_eq!(start_ms("2024-02-29"), Some(1_709_164_800_000));
        assert_eq!(start_ms("2023-02-29"), None);
        assert_eq!(start_ms("2026-13-01"), None);
        assert_eq!(start_ms("26-11-28"), None);
        for day in 0..3000 {
            let ms = (day - 1000) * MS_PER_DAY;
            assert_eq!(start_ms(&of_ms(ms)), Some(ms));
        }
    }

    #[test]
    fn window_ends_today() {
        let now = start_ms("2026-03-01").unwrap() + 5;
        assert_eq!(window(now, 3), ["2026-02-27", "2026-02-28", "2026-03-01"]);
    }
}
