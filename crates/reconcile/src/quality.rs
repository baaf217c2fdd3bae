//! The data-quality report behind the dashboards' quality page (`GET /api/v1/quality` on the
//! relay's admin listener): over a window of days, the gap per metric per day with its moved
//! days, loss by stage, `seq` gaps per day, freshness lag per stage and rejects and dead
//! letters by reason with redacted samples.
//!
//! Each section is computed on its own: a truth database that cannot be reached empties the
//! gap section and says why in [`Quality::errors`], and the rest is still reported. Nothing
//! here writes.

use std::path::Path;

use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use serde_json::Value;
use trueup_warehouse::{LAG_STAGES, Warehouse};

use crate::{
    LossByStage, MetricReport, ReconcileConfig, ReconcileError, Stores, TruthDb, day,
    loss_by_stage, metric_report, open_read_only, store_error, wh_error,
};

/// The windows the dashboards offer: today, 7 days, 30 days.
pub const WINDOWS: [u32; 3] = [1, 7, 30];

/// Samples kept per reject reason.
pub const SAMPLES_PER_REASON: usize = 3;

/// A sample's raw text is cut to this many bytes (after redaction).
pub const SAMPLE_BYTES: usize = 600;

/// A section that could not be computed, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SectionError {
    /// `gap`, `loss`, `seq_gaps`, `freshness` or `rejects`.
    pub section: &'static str,
    /// What went wrong, naming the store (a PostgreSQL URL without its password).
    pub message: String,
}

/// `seq` numbers missing on one day.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeqGapDay {
    /// The UTC day.
    pub day: String,
    /// Numbers missing before that day's events in their tab streams.
    pub gaps: u64,
}

/// The lag of one stage of the path.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Freshness {
    /// One of the warehouse's `LAG_STAGES`.
    pub stage: &'static str,
    /// Events measured (those with the stage's stamps).
    pub events: u64,
    /// Median lag, ms (nearest rank; exact below 256 ms, at most 0.8 % low above).
    pub p50_ms: i64,
    /// 95th percentile, ms (as `p50_ms`).
    pub p95_ms: i64,
}

/// One sample of a reject or dead letter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RejectSample {
    /// When it was received, ms since the Unix epoch.
    pub received_at_ms: i64,
    /// What was wrong with it.
    pub detail: String,
    /// Its event id, when it had one.
    pub event_id: Option<String>,
    /// The sink that dead-lettered it (none: refused at ingest).
    pub sink: Option<String>,
    /// The payload with every value but the event's name, schema and source replaced by its
    /// length (see [`redact`]), cut to [`SAMPLE_BYTES`].
    pub raw: String,
}

/// Rejects or dead letters of one stage and reason.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rejects {
    /// `ingest` (refused by the relay) or `sink` (dead-lettered on the way out).
    pub stage: String,
    /// The reason code.
    pub reason: String,
    /// How many in the window.
    pub count: u64,
    /// The latest few, redacted.
    pub samples: Vec<RejectSample>,
}

/// The data-quality report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quality {
    /// When it was computed, ms since the Unix epoch.
    pub generated_at_ms: i64,
    /// The site it is restricted to, if any.
    pub site: Option<String>,
    /// The window, in days ending today (UTC).
    pub days: u32,
    /// The window's days, oldest first.
    pub day_list: Vec<String>,
    /// The percentage points a gap may move before it is marked.
    pub alert_points: f64,
    /// The sections that could not be computed.
    pub errors: Vec<SectionError>,
    /// The gap per metric per day (empty when no metric is configured, or on error).
    pub gap: Vec<MetricReport>,
    /// Loss by stage, all time.
    pub loss: Option<LossByStage>,
    /// `seq` gaps per day of the window.
    pub seq_gaps: Vec<SeqGapDay>,
    /// Lag per stage over the window's events.
    pub freshness: Vec<Freshness>,
    /// Rejects and dead letters received in the window, by stage and reason.
    pub rejects: Vec<Rejects>,
}

/// Computes the report for the `days` ending on the day of `now_ms`.
pub fn quality(cfg: &ReconcileConfig, stores: &Stores, days: u32, now_ms: i64) -> Quality {
    let cfg = ReconcileConfig {
        days,
        ..cfg.clone()
    };
    let site = cfg.site.as_deref();
    let day_list = day::window(now_ms, days);
    let from = day::start_ms(&day_list[0]).expect("window days are valid");
    let mut q = Quality {
        generated_at_ms: now_ms,
        site: cfg.site.clone(),
        days,
        day_list: day_list.clone(),
        alert_points: cfg.alert_points,
        errors: Vec::new(),
        gap: Vec::new(),
        loss: None,
        seq_gaps: Vec::new(),
        freshness: Vec::new(),
        rejects: Vec::new(),
    };
    let fail = |section, e: ReconcileError| SectionError {
        section,
        message: e.to_string(),
    };
    let mut errors = Vec::new();
    match stores.warehouse.open() {
        Err(e) => {
            let message = e.to_string();
            for section in ["gap", "loss", "seq_gaps", "freshness"] {
                errors.push(SectionError {
                    section,
                    message: message.clone(),
                });
            }
        }
        Ok(mut wh) => {
            match gap(&cfg, &mut wh, stores, now_ms) {
                Ok(g) => q.gap = g,
                Err(e) => errors.push(fail("gap", e)),
            }
            match loss_by_stage(&mut wh, stores, site) {
                Ok(l) => q.loss = Some(l),
                Err(e) => errors.push(fail("loss", e)),
            }
            match wh.seq_gaps_per_day(site, from) {
                Ok(per_day) => {
                    q.seq_gaps = day_list
                        .iter()
                        .map(|d| SeqGapDay {
                            day: d.clone(),
                            gaps: per_day.get(d).copied().unwrap_or(0),
                        })
                        .collect()
                }
                Err(e) => errors.push(fail("seq_gaps", wh_error(stores, e))),
            }
            match freshness(&mut wh, site, from) {
                Ok(f) => q.freshness = f,
                Err(e) => errors.push(fail("freshness", wh_error(stores, e))),
            }
        }
    }
    match stores.spool.as_deref() {
        Some(spool) if spool.exists() => match rejects(spool, site, from) {
            Ok(r) => q.rejects = r,
            Err(e) => errors.push(fail("rejects", e)),
        },
        _ => {}
    }
    q.errors = errors;
    q
}

/// The gap rows of the window's days (with the trailing days before them for the average).
fn gap(
    cfg: &ReconcileConfig,
    wh: &mut Warehouse,
    stores: &Stores,
    now_ms: i64,
) -> Result<Vec<MetricReport>, ReconcileError> {
    cfg.validate()?;
    if cfg.metrics.is_empty() {
        return Ok(Vec::new());
    }
    let all_days = day::window(now_ms, cfg.days + cfg.trailing_days);
    let first = day::start_ms(&all_days[0]).expect("window days are valid");
    let truth = TruthDb::parse(cfg.truth.as_deref().expect("validated"))?;
    let mut out = Vec::with_capacity(cfg.metrics.len());
    for m in &cfg.metrics {
        let actual = truth.query(&m.name, &m.truth_sql)?;
        let counted = wh
            .events_per_day(&m.event, cfg.site.as_deref(), first)
            .map_err(|e| wh_error(stores, e))?;
        out.push(metric_report(m, &all_days, cfg, &actual, &counted));
    }
    Ok(out)
}

fn freshness(
    wh: &mut Warehouse,
    site: Option<&str>,
    from: i64,
) -> Result<Vec<Freshness>, trueup_warehouse::WarehouseError> {
    let mut out = Vec::new();
    for stage in LAG_STAGES {
        let counts = wh.lag_counts(stage, site, from)?;
        let events: u64 = counts.iter().map(|(_, n)| n).sum();
        if events == 0 {
            continue;
        }
        out.push(Freshness {
            stage,
            events,
            p50_ms: percentile(&counts, events, 0.50),
            p95_ms: percentile(&counts, events, 0.95),
        });
    }
    Ok(out)
}

/// The nearest-rank percentile `p` of a distribution given as ascending (value, count).
fn percentile(counts: &[(i64, u64)], total: u64, p: f64) -> i64 {
    let rank = ((p * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (v, n) in counts {
        seen += n;
        if seen >= rank {
            return *v;
        }
    }
    counts.last().map_or(0, |(v, _)| *v)
}

fn rejects(spool: &Path, site: Option<&str>, from: i64) -> Result<Vec<Rejects>, ReconcileError> {
    let conn = open_read_only(spool)?;
    let err = |e| store_error(spool, e);
    let has: Option<String> = conn
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'dead_letter'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(err)?;
    if has.is_none() {
        return Ok(Vec::new());
    }
    let mut groups = conn
        .prepare(
            "SELECT stage, reason, count(*) FROM dead_letter
             WHERE received_at >= ?1 AND (?2 IS NULL OR site = ?2)
             GROUP BY stage, reason ORDER BY count(*) DESC, stage, reason",
        )
        .map_err(err)?;
    let groups: Vec<(String, String, i64)> = groups
        .query_map(params![from, site], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .map_err(err)?
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let mut samples = conn
        .prepare(
            "SELECT received_at, detail, event_id, sink, raw FROM dead_letter
             WHERE received_at >= ?1 AND (?2 IS NULL OR site = ?2) AND stage = ?3 AND reason = ?4
             ORDER BY pos DESC LIMIT ?5",
        )
        .map_err(err)?;
    let mut out = Vec::with_capacity(groups.len());
    for (stage, reason, n) in groups {
        let list = samples
            .query_map(
                params![from, site, stage, reason, SAMPLES_PER_REASON as i64],
                |r| {
                    Ok(RejectSample {
                        received_at_ms: r.get(0)?,
                        detail: cut(r.get::<_, String>(1)?, SAMPLE_BYTES),
                        event_id: r.get(2)?,
                        sink: r.get(3)?,
                        raw: cut(redact(&r.get::<_, String>(4)?), SAMPLE_BYTES),
                    })
                },
            )
            .map_err(err)?
            .collect::<Result<_, _>>()
            .map_err(err)?;
        out.push(Rejects {
            stage,
            reason,
            count: u64::try_from(n).unwrap_or(0),
            samples: list,
        });
    }
    Ok(out)
}

/// Keys of an event (or a batch) whose string values a sample keeps: they say what the event
/// was, not who sent it. Under `props`, `context` or `traits` (the page's data) nothing is kept.
const KEPT: [&str; 5] = ["v", "name", "schema", "source", "type"];
const DATA: [&str; 3] = ["props", "context", "traits"];

/// A reject's payload as a sample may show it: its shape (keys, nesting, types) and the
/// event's name, schema and source; every other string becomes `"<redacted: N chars>"`, every
/// number `"<number>"`. A payload that is not JSON shows only its size.
pub fn redact(raw: &str) -> String {
    fn walk(v: &mut Value, keep: bool, in_data: bool) {
        match v {
            Value::String(s) if !keep => {
                *v = Value::String(format!("<redacted: {} chars>", s.chars().count()))
            }
            Value::Number(_) if !keep => *v = Value::String("<number>".into()),
            Value::Array(items) => items.iter_mut().for_each(|i| walk(i, false, in_data)),
            Value::Object(map) => {
                for (k, item) in map.iter_mut() {
                    let keep = !in_data && KEPT.contains(&k.as_str());
                    walk(item, keep, in_data || DATA.contains(&k.as_str()));
                }
            }
            _ => {}
        }
    }
    match serde_json::from_str::<Value>(raw) {
        Ok(mut v) => {
            walk(&mut v, false, false);
            v.to_string()
        }
        Err(_) => format!("<{} bytes, not JSON>", raw.len()),
    }
}

/// `s` cut to at most `max` bytes on a character boundary, marked when cut.
fn cut(s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let counts = [(10, 50), (20, 45), (500, 5)];
        assert_eq!(percentile(&counts, 100, 0.50), 10);
        assert_eq!(percentile(&counts, 100, 0.95), 20);
        assert_eq!(percentile(&counts, 100, 0.96), 500);
        assert_eq!(percentile(&[(7, 1)], 1, 0.95), 7);
    }

    #[test]
    fn redaction_keeps_the_shape_and_the_event_name_only() {
        let raw = r#"{"v":1,"name":"signup","props":{"email":"a@b.example","n":5,"tags":["x"]},"schema":"signup/1"}"#;
        let shown = redact(raw);
        assert!(!shown.contains("a@b.example"), "{shown}");
        assert!(
            shown.contains(r#""email":"<redacted: 11 chars>""#),
            "{shown}"
        );
        assert!(shown.contains(r#""name":"signup""#), "{shown}");
        assert!(shown.contains(r#""schema":"signup/1""#), "{shown}");
        assert!(shown.contains(r#""n":"<number>""#), "{shown}");
        assert!(
            shown.contains(r#""tags":["<redacted: 1 chars>"]"#),
            "{shown}"
        );
        assert!(shown.contains(r#""v":1"#), "{shown}");
        assert_eq!(redact("not json at all"), "<15 bytes, not JSON>");
        // A "name" in the page's data is the page's data.
        let nested =
            redact(r#"{"batch":[{"name":"signup","props":{"name":"Ann","x":{"type":"Bob"}}}]}"#);
        assert!(
            !nested.contains("Ann") && !nested.contains("Bob"),
            "{nested}"
        );
        assert!(nested.contains(r#""name":"signup""#), "{nested}");
    }

    #[test]
    fn cut_respects_character_boundaries() {
        assert_eq!(cut("ééé".into(), 3), "é…");
        assert_eq!(cut("abc".into(), 3), "abc");
    }
}
