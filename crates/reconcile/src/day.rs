//! UTC days as `YYYY-MM-DD` strings, the unit every reconciliation row is keyed by.

const MS_PER_DAY: i64 = 86_400_000;

/// The UTC day of a time in milliseconds since the Unix epoch.
pub fn of_ms(ms: i64) -> String {
    let (y, m, d) = civil_from_days(ms.div_euclid(MS_PER_DAY));
    format!("{y:04}-{m:02}-{d:02}")
}

/// The first millisecond of `day`, or `None` if it is not a `YYYY-MM-DD` day.
pub fn start_ms(day: &str) -> Option<i64> {
    let b = day.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let y: i64 = day[..4].parse().ok()?;
    let m: u32 = day[5..7].parse().ok()?;
    let d: u32 = day[8..].parse().ok()?;
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return None;
    }
    Some(days_from_civil(y, m, d) * MS_PER_DAY)
}

/// Whether `s` is a valid `YYYY-MM-DD` day.
pub fn is_day(s: &str) -> bool {
    start_ms(s).is_some()
}

/// The `n` days ending with the day of `now_ms`, oldest first.
pub fn window(now_ms: i64, n: u32) -> Vec<String> {
    let today = now_ms.div_euclid(MS_PER_DAY);
    (0..i64::from(n))
        .rev()
        .map(|back| of_ms((today - back) * MS_PER_DAY))
        .collect()
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's algorithms for the proleptic Gregorian calendar.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

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
