//! The business and behaviour dashboards' reports (`GET /api/v1/business` and
//! `/api/v1/behaviour` on the relay's admin listener).
//!
//! **Business** is exact: per metric and day, what the system of record counted (`actual`),
//! what its backend emitted as server events, and what it was worth (`value`, when the truth
//! SQL reports one), with conversions by attribution source from the metric's
//! `attribution_sql`, **unknown as its own row**, never folded into `direct`.
//!
//! **Behaviour** is lossy and says so: page views, sessions, top events and a funnel from the
//! client events in the warehouse, with the loss measured over the same window against a
//! business metric (`missing % = (actual − tracked) / actual`), which every chart carries.
//!
//! As in [`crate::quality`], each section fails on its own and says why.

use std::collections::BTreeMap;

use serde::Serialize;
use trueup_warehouse::Warehouse;

use crate::quality::SectionError;
use crate::{DashboardConfig, ReconcileConfig, ReconcileError, Stores, TruthDb, day, wh_error};

/// One day of a business metric.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BusinessDay {
    /// The UTC day.
    pub day: String,
    /// What the system of record counted.
    pub actual: u64,
    /// Server events of the metric's event in the warehouse.
    pub server: u64,
    /// What the day's conversions were worth, when the truth SQL reports a `value`.
    pub value: Option<f64>,
}

/// A metric's totals over the window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BusinessTotal {
    /// Sum of `actual`.
    pub actual: u64,
    /// Sum of `server`.
    pub server: u64,
    /// Sum of `value` (none when no day has one).
    pub value: Option<f64>,
}

/// One business metric over the window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BusinessMetric {
    /// The metric's name.
    pub name: String,
    /// Its event.
    pub event: String,
    /// What `value` is.
    pub value_label: Option<String>,
    /// One row per day of the window, oldest first.
    pub days: Vec<BusinessDay>,
    /// The window's totals.
    pub total: BusinessTotal,
}

/// Conversions from one source over the window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceRow {
    /// The source; `unknown` when no attribution is recorded.
    pub source: String,
    /// How many conversions.
    pub conversions: u64,
    /// Share of the metric's conversions with a row here, %.
    pub share_pct: f64,
}

/// A metric's conversions by source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attribution {
    /// The metric.
    pub metric: String,
    /// Conversions over the window.
    pub total: u64,
    /// Most conversions first; `unknown` is always its own row, last among equals.
    pub rows: Vec<SourceRow>,
}

/// The business report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Business {
    /// When it was computed, ms since the Unix epoch.
    pub generated_at_ms: i64,
    /// The site it is restricted to, if any.
    pub site: Option<String>,
    /// The window, in days ending today (UTC).
    pub days: u32,
    /// The window's days, oldest first.
    pub day_list: Vec<String>,
    /// The sections that could not be computed.
    pub errors: Vec<SectionError>,
    /// The metrics.
    pub metrics: Vec<BusinessMetric>,
    /// Conversions by source, for the metrics with an `attribution_sql`.
    pub attribution: Vec<Attribution>,
}

/// The name an unknown attribution is shown under.
pub const UNKNOWN: &str = "unknown";

fn error(section: &'static str, e: impl std::fmt::Display) -> SectionError {
    SectionError {
        section,
        message: e.to_string(),
    }
}

/// Computes the business report for the `days` ending on the day of `now_ms`.
pub fn business(cfg: &ReconcileConfig, stores: &Stores, days: u32, now_ms: i64) -> Business {
    let day_list = day::window(now_ms, days);
    let mut b = Business {
        generated_at_ms: now_ms,
        site: cfg.site.clone(),
        days,
        day_list: day_list.clone(),
        errors: Vec::new(),
        metrics: Vec::new(),
        attribution: Vec::new(),
    };
    if let Err(e) = business_sections(cfg, stores, &day_list, &mut b) {
        b.metrics.clear();
        b.attribution.clear();
        b.errors.push(error("business", e));
    }
    b
}

fn business_sections(
    cfg: &ReconcileConfig,
    stores: &Stores,
    day_list: &[String],
    b: &mut Business,
) -> Result<(), ReconcileError> {
    cfg.validate()?;
    if cfg.metrics.is_empty() {
        return Ok(());
    }
    let first = day::start_ms(&day_list[0]).expect("window days are valid");
    let truth = TruthDb::parse(cfg.truth.as_deref().expect("validated"))?;
    let mut wh = stores.warehouse.open()?;
    for m in &cfg.metrics {
        let actual = truth.query(&m.name, &m.truth_sql)?;
        let counted = wh
            .events_per_day(&m.event, cfg.site.as_deref(), first)
            .map_err(|e| wh_error(stores, e))?;
        let days: Vec<BusinessDay> = day_list
            .iter()
            .map(|d| {
                let t = actual.get(d).copied().unwrap_or_default();
                BusinessDay {
                    day: d.clone(),
                    actual: t.actual,
                    server: counted.get(d).map_or(0, |c| c.1),
                    value: t.value,
                }
            })
            .collect();
        let total = BusinessTotal {
            actual: days.iter().map(|d| d.actual).sum(),
            server: days.iter().map(|d| d.server).sum(),
            value: days.iter().filter_map(|d| d.value).reduce(|a, v| a + v),
        };
        b.metrics.push(BusinessMetric {
            name: m.name.clone(),
            event: m.event.clone(),
            value_label: m.value_label.clone(),
            days,
            total,
        });
        if let Some(sql) = &m.attribution_sql {
            let rows = truth.attribution(&m.name, sql)?;
            b.attribution.push(attribution(
                &m.name,
                rows.into_iter().filter(|r| day_list.contains(&r.day)),
            ));
        }
    }
    Ok(())
}

fn attribution(metric: &str, rows: impl Iterator<Item = crate::truth::SourceDay>) -> Attribution {
    let mut by_source: BTreeMap<String, u64> = BTreeMap::new();
    let mut unknown = 0;
    for r in rows {
        match r.source.filter(|s| !s.is_empty()) {
            Some(s) => *by_source.entry(s).or_default() += r.conversions,
            None => unknown += r.conversions,
        }
    }
    let total: u64 = by_source.values().sum::<u64>() + unknown;
    let share = |n: u64| {
        if total == 0 {
            0.0
        } else {
            n as f64 / total as f64 * 100.0
        }
    };
    let mut rows: Vec<SourceRow> = by_source
        .into_iter()
        // A source spelled like the unknown row is the site's own label: keep them apart.
        .map(|(source, n)| SourceRow {
            source: if source == UNKNOWN {
                format!("{UNKNOWN} (as recorded)")
            } else {
                source
            },
            conversions: n,
            share_pct: share(n),
        })
        .collect();
    rows.sort_by(|a, b| {
        b.conversions
            .cmp(&a.conversions)
            .then(a.source.cmp(&b.source))
    });
    rows.push(SourceRow {
        source: UNKNOWN.into(),
        conversions: unknown,
        share_pct: share(unknown),
    });
    Attribution {
        metric: metric.into(),
        total,
        rows,
    }
}

/// The client events' loss over the window, measured against a business metric.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeasuredLoss {
    /// The metric it is measured against.
    pub reference: String,
    /// That metric's client event.
    pub event: String,
    /// What the system of record counted in the window.
    pub actual: u64,
    /// What the client events counted.
    pub tracked: u64,
    /// `(actual − tracked) / actual × 100`; none when `actual` is 0.
    pub missing_pct: Option<f64>,
}

/// A count on one day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DayCount {
    /// The UTC day.
    pub day: String,
    /// The count.
    pub count: u64,
}

/// One event name and how often it came.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventCount {
    /// The event name.
    pub name: String,
    /// Client events of that name in the window.
    pub count: u64,
}

/// One funnel step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunnelStep {
    /// The step's event.
    pub event: String,
    /// Sessions that did this step and every one before it, in order.
    pub sessions: u64,
    /// `sessions` as a share of the first step's, %.
    pub pct_of_first: f64,
}

/// The funnel over the configured steps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Funnel {
    /// The steps, in order.
    pub steps: Vec<FunnelStep>,
}

/// The behaviour report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Behaviour {
    /// When it was computed, ms since the Unix epoch.
    pub generated_at_ms: i64,
    /// The site it is restricted to, if any.
    pub site: Option<String>,
    /// The window, in days ending today (UTC).
    pub days: u32,
    /// The window's days, oldest first.
    pub day_list: Vec<String>,
    /// The sections that could not be computed (`loss`, `behaviour`).
    pub errors: Vec<SectionError>,
    /// The measured loss (none: no metric to measure it against, or its section failed).
    pub loss: Option<MeasuredLoss>,
    /// Page views per day.
    pub page_views: Vec<DayCount>,
    /// Sessions per day.
    pub sessions: Vec<DayCount>,
    /// The most frequent client events.
    pub top_events: Vec<EventCount>,
    /// The funnel, when one is configured.
    pub funnel: Option<Funnel>,
}

/// How many names `top_events` lists.
pub const TOP_EVENTS: u32 = 10;

/// Computes the behaviour report for the `days` ending on the day of `now_ms`.
pub fn behaviour(
    cfg: &ReconcileConfig,
    dash: &DashboardConfig,
    stores: &Stores,
    days: u32,
    now_ms: i64,
) -> Behaviour {
    let day_list = day::window(now_ms, days);
    let mut b = Behaviour {
        generated_at_ms: now_ms,
        site: cfg.site.clone(),
        days,
        day_list: day_list.clone(),
        errors: Vec::new(),
        loss: None,
        page_views: Vec::new(),
        sessions: Vec::new(),
        top_events: Vec::new(),
        funnel: None,
    };
    let mut wh = match stores.warehouse.open() {
        Ok(wh) => wh,
        Err(e) => {
            b.errors.push(error("behaviour", e));
            return b;
        }
    };
    match measured_loss(cfg, dash, &mut wh, stores, &day_list) {
        Ok(l) => b.loss = l,
        Err(e) => b.errors.push(error("loss", e)),
    }
    if let Err(e) = behaviour_sections(cfg, dash, &mut wh, &day_list, &mut b) {
        b.page_views.clear();
        b.sessions.clear();
        b.top_events.clear();
        b.funnel = None;
        b.errors.push(error("behaviour", wh_error(stores, e)));
    }
    b
}

fn measured_loss(
    cfg: &ReconcileConfig,
    dash: &DashboardConfig,
    wh: &mut Warehouse,
    stores: &Stores,
    day_list: &[String],
) -> Result<Option<MeasuredLoss>, ReconcileError> {
    cfg.validate()?;
    let reference = match &dash.loss_reference {
        Some(name) => cfg.metrics.iter().find(|m| &m.name == name),
        None => cfg.metrics.first(),
    };
    let Some(m) = reference else {
        return Ok(None);
    };
    let first = day::start_ms(&day_list[0]).expect("window days are valid");
    let truth = TruthDb::parse(cfg.truth.as_deref().expect("validated"))?;
    let actual_by_day = truth.query(&m.name, &m.truth_sql)?;
    let counted = wh
        .events_per_day(&m.event, cfg.site.as_deref(), first)
        .map_err(|e| wh_error(stores, e))?;
    let actual: u64 = day_list
        .iter()
        .filter_map(|d| actual_by_day.get(d))
        .map(|t| t.actual)
        .sum();
    let tracked: u64 = day_list
        .iter()
        .filter_map(|d| counted.get(d))
        .map(|c| c.0)
        .sum();
    Ok(Some(MeasuredLoss {
        reference: m.name.clone(),
        event: m.event.clone(),
        actual,
        tracked,
        missing_pct: crate::pct(actual as f64 - tracked as f64, actual),
    }))
}

fn behaviour_sections(
    cfg: &ReconcileConfig,
    dash: &DashboardConfig,
    wh: &mut Warehouse,
    day_list: &[String],
    b: &mut Behaviour,
) -> Result<(), trueup_warehouse::WarehouseError> {
    let site = cfg.site.as_deref();
    let first = day::start_ms(&day_list[0]).expect("window days are valid");
    let per_day = |m: &BTreeMap<String, u64>| -> Vec<DayCount> {
        day_list
            .iter()
            .map(|d| DayCount {
                day: d.clone(),
                count: m.get(d).copied().unwrap_or(0),
            })
            .collect()
    };
    let views: BTreeMap<String, u64> = wh
        .events_per_day(&dash.page_event, site, first)?
        .into_iter()
        .map(|(d, (client, _))| (d, client))
        .collect();
    b.page_views = per_day(&views);
    b.sessions = per_day(&wh.sessions_per_day(site, first)?);
    b.top_events = wh
        .top_events(site, first, TOP_EVENTS)?
        .into_iter()
        .map(|(name, count)| EventCount { name, count })
        .collect();
    if !dash.funnel.is_empty() {
        let reached = wh.funnel(site, first, &dash.funnel)?;
        b.funnel = Some(funnel(&dash.funnel, reached));
    }
    Ok(())
}

/// The funnel's steps with the sessions that reached each (see [`Warehouse::funnel`]).
fn funnel(steps: &[String], reached: Vec<u64>) -> Funnel {
    let first = reached.first().copied().unwrap_or(0);
    Funnel {
        steps: steps
            .iter()
            .zip(reached)
            .map(|(event, sessions)| FunnelStep {
                event: event.clone(),
                sessions,
                pct_of_first: if first == 0 {
                    0.0
                } else {
                    sessions as f64 / first as f64 * 100.0
                },
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::truth::SourceDay;

    fn src(day: &str, source: Option<&str>, n: u64) -> SourceDay {
        SourceDay {
            day: day.into(),
            source: source.map(Into::into),
            conversions: n,
        }
    }

    #[test]
    fn unknown_is_its_own_row_never_direct() {
        let a = attribution(
            "signups",
            [
                src("2026-12-01", Some("google"), 6),
                src("2026-12-02", Some("google"), 4),
                src("2026-12-01", Some("direct"), 3),
                src("2026-12-01", None, 5),
                src("2026-12-02", Some(""), 2),
                src("2026-12-02", Some("unknown"), 1),
            ]
            .into_iter(),
        );
        assert_eq!(a.total, 21);
        let rows: Vec<(&str, u64)> = a
            .rows
            .iter()
            .map(|r| (r.source.as_str(), r.conversions))
            .collect();
        assert_eq!(
            rows,
            [
                ("google", 10),
                ("direct", 3),
                ("unknown (as recorded)", 1),
                ("unknown", 7)
            ]
        );
        assert!((a.rows[3].share_pct - 7.0 / 21.0 * 100.0).abs() < 1e-9);
        // No conversions: the unknown row is still there, at 0.
        let none = attribution("orders", std::iter::empty());
        assert_eq!(none.rows.len(), 1);
        assert_eq!((none.rows[0].conversions, none.rows[0].share_pct), (0, 0.0));
    }

    #[test]
    fn the_dashboard_section_is_checked_against_the_metrics() {
        let reconcile = ReconcileConfig {
            truth: Some("sqlite:t.db".into()),
            metrics: vec![crate::MetricConfig {
                name: "signups".into(),
                event: "signup_completed".into(),
                truth_sql: "SELECT 1".into(),
                value_label: None,
                attribution_sql: None,
            }],
            ..ReconcileConfig::default()
        };
        let ok = DashboardConfig {
            funnel: vec!["page_view".into(), "signup_completed".into()],
            loss_reference: Some("signups".into()),
            ..DashboardConfig::default()
        };
        ok.validate(&reconcile).unwrap();
        let err = |d: DashboardConfig| d.validate(&reconcile).unwrap_err().to_string();
        assert!(
            err(DashboardConfig {
                funnel: vec!["a".into()],
                ..ok.clone()
            })
            .contains("2 to 10")
        );
        assert!(
            err(DashboardConfig {
                funnel: vec!["a".into(), String::new()],
                ..ok.clone()
            })
            .contains("empty event name")
        );
        assert!(
            err(DashboardConfig {
                loss_reference: Some("orders".into()),
                ..ok.clone()
            })
            .contains("not a metric")
        );
        assert!(
            err(DashboardConfig {
                page_event: String::new(),
                ..ok
            })
            .contains("page_event")
        );
    }

    #[test]
    fn a_funnel_step_is_a_share_of_the_first() {
        let steps: Vec<String> = ["view", "start", "done"].map(String::from).into();
        let f = funnel(&steps, vec![4, 2, 1]);
        let got: Vec<u64> = f.steps.iter().map(|s| s.sessions).collect();
        assert_eq!(got, [4, 2, 1]);
        assert_eq!(f.steps[1].pct_of_first, 50.0);
    }
}
