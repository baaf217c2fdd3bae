//! The system-of-record database: SQLite or PostgreSQL, read with the metric's own SQL.
//!
//! A metric's `truth_sql` returns one row per UTC day with the columns
//! `day` (text, `YYYY-MM-DD`), `actual` (integer) and, optionally, `unknown_attribution`
//! (integer: how many of the day's conversions have no known attribution) and `value` (a
//! number: what the day's conversions were worth, e.g. revenue). A metric's optional
//! `attribution_sql` returns `day`, `source` (text; NULL = unknown) and `conversions`
//! (integer), one row per day and source ([`TruthDb::attribution`]). The queries run
//! read-only (SQLite is opened read-only; on PostgreSQL it runs in a `READ ONLY` transaction
//! that is rolled back), so a mistaken statement cannot change the system of record.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::ReconcileError;

/// What the system of record says about one day.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TruthDay {
    /// Conversions that really happened.
    pub actual: u64,
    /// How many of them have no known attribution, when the query reports it.
    pub unknown_attribution: Option<u64>,
    /// What they were worth, when the query reports it (a `value` column).
    pub value: Option<f64>,
}

/// Conversions of one day from one attribution source (`None`: unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceDay {
    /// The UTC day.
    pub day: String,
    /// The source, or `None` when no attribution is recorded.
    pub source: Option<String>,
    /// How many conversions.
    pub conversions: u64,
}

/// A connection target for the truth database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TruthDb {
    /// `sqlite:<path>`: a SQLite file, opened read-only.
    Sqlite(PathBuf),
    /// `postgres://…` or `postgresql://…`: a PostgreSQL connection string.
    Postgres(String),
}

impl TruthDb {
    /// Parses `sqlite:<path>` or a `postgres://` / `postgresql://` URL.
    pub fn parse(url: &str) -> Result<TruthDb, ReconcileError> {
        if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(ReconcileError::Config(
                    "truth = \"sqlite:\" needs a path, e.g. sqlite:data/demo.sqlite".into(),
                ));
            }
            Ok(TruthDb::Sqlite(PathBuf::from(path)))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(TruthDb::Postgres(url.to_string()))
        } else {
            Err(ReconcileError::Config(format!(
                "truth = {:?}: use sqlite:<path> or postgres://user:password@host/db",
                redact(url)
            )))
        }
    }

    /// Runs `sql` and returns its rows by day.
    pub fn query(
        &self,
        metric: &str,
        sql: &str,
    ) -> Result<BTreeMap<String, TruthDay>, ReconcileError> {
        match self {
            TruthDb::Sqlite(path) => query_sqlite(path, metric, sql),
            TruthDb::Postgres(url) => query_postgres(url, metric, sql),
        }
    }
}

impl TruthDb {
    /// Runs a metric's `attribution_sql`: conversions per day and source.
    pub fn attribution(&self, metric: &str, sql: &str) -> Result<Vec<SourceDay>, ReconcileError> {
        let rows: Vec<(String, Option<String>, i64)> = match self {
            TruthDb::Sqlite(path) => {
                use rusqlite::{Connection, OpenFlags};
                let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
                    .map_err(|e| {
                        truth_error(metric, format!("cannot open {}: {e}", path.display()))
                    })?;
                conn.busy_timeout(std::time::Duration::from_secs(5))
                    .map_err(|e| truth_error(metric, e))?;
                let mut stmt = conn.prepare(sql).map_err(|e| truth_error(metric, e))?;
                let names: Vec<String> = stmt.column_names().map(|s| s.to_string()).collect();
                let at = attribution_columns(metric, &names)?;
                stmt.query_map([], |r| Ok((r.get(at[0])?, r.get(at[1])?, r.get(at[2])?)))
                    .and_then(|rows| rows.collect::<Result<_, _>>())
                    .map_err(|e| truth_error(metric, format!("attribution_sql: {e}")))?
            }
            TruthDb::Postgres(url) => {
                let mut client = connect_postgres(url, metric)?;
                let mut tx = read_only(&mut client, metric)?;
                let rows = tx.query(sql, &[]).map_err(|e| truth_error(metric, e))?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    let names: Vec<String> =
                        row.columns().iter().map(|c| c.name().to_string()).collect();
                    let at = attribution_columns(metric, &names)?;
                    out.push((
                        row.try_get(at[0]).map_err(|e| {
                            truth_error(metric, format!("column day must be text: {e}"))
                        })?,
                        row.try_get(at[1]).map_err(|e| {
                            truth_error(metric, format!("column source must be text: {e}"))
                        })?,
                        row.try_get(at[2]).map_err(|e| {
                            truth_error(metric, format!("column conversions must be a bigint: {e}"))
                        })?,
                    ));
                }
                tx.rollback().map_err(|e| truth_error(metric, e))?;
                out
            }
        };
        rows.into_iter()
            .map(|(day, source, n)| {
                if !crate::day::is_day(&day) {
                    return Err(truth_error(
                        metric,
                        format!("attribution_sql: column day = {day:?} is not a YYYY-MM-DD day"),
                    ));
                }
                let conversions = u64::try_from(n).map_err(|_| {
                    truth_error(
                        metric,
                        format!("attribution_sql: column conversions is negative ({n})"),
                    )
                })?;
                Ok(SourceDay {
                    day,
                    source,
                    conversions,
                })
            })
            .collect()
    }
}

fn attribution_columns(metric: &str, names: &[String]) -> Result<[usize; 3], ReconcileError> {
    let col = |name: &str| names.iter().position(|n| n == name);
    match (col("day"), col("source"), col("conversions")) {
        (Some(d), Some(s), Some(c)) => Ok([d, s, c]),
        _ => Err(truth_error(
            metric,
            format!(
                "attribution_sql must return columns day, source and conversions; it returns {names:?}"
            ),
        )),
    }
}

fn connect_postgres(url: &str, metric: &str) -> Result<postgres::Client, ReconcileError> {
    let mut config: postgres::Config = url
        .parse()
        .map_err(|e| truth_error(metric, format!("{}: {e}", redact(url))))?;
    config.connect_timeout(CONNECT_TIMEOUT);
    config
        .connect(postgres::NoTls)
        .map_err(|e| truth_error(metric, format!("cannot connect to {}: {e}", redact(url))))
}

fn read_only<'a>(
    client: &'a mut postgres::Client,
    metric: &str,
) -> Result<postgres::Transaction<'a>, ReconcileError> {
    let mut tx = client
        .build_transaction()
        .read_only(true)
        .start()
        .map_err(|e| truth_error(metric, e))?;
    tx.batch_execute(&format!(
        "SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'"
    ))
    .map_err(|e| truth_error(metric, e))?;
    Ok(tx)
}

/// The URL without its passwords (in the userinfo or in `password=`/`sslpassword=`
/// parameters), for messages and printed configurations.
pub fn redact(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &base[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &base[..scheme + 3], user, &base[at..])
        }
        _ => base.to_string(),
    };
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.to_ascii_lowercase().ends_with("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// How long connecting to PostgreSQL may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long one metric's query may run (a runaway query must not hold the schedule).
const STATEMENT_TIMEOUT: &str = "60s";

fn truth_error(metric: &str, detail: impl std::fmt::Display) -> ReconcileError {
    ReconcileError::Truth {
        metric: metric.to_string(),
        detail: detail.to_string(),
    }
}

fn add_day(
    out: &mut BTreeMap<String, TruthDay>,
    metric: &str,
    day: String,
    actual: i64,
    unknown: Option<i64>,
    value: Option<f64>,
) -> Result<(), ReconcileError> {
    if !crate::day::is_day(&day) {
        return Err(truth_error(
            metric,
            format!("column day = {day:?} is not a YYYY-MM-DD day"),
        ));
    }
    let count = |v: i64, col: &str| {
        u64::try_from(v).map_err(|_| truth_error(metric, format!("column {col} is negative ({v})")))
    };
    let entry = out.entry(day).or_default();
    entry.actual += count(actual, "actual")?;
    if let Some(u) = unknown {
        *entry.unknown_attribution.get_or_insert(0) += count(u, "unknown_attribution")?;
    }
    if let Some(v) = value.filter(|v| v.is_finite()) {
        *entry.value.get_or_insert(0.0) += v;
    }
    Ok(())
}

fn query_sqlite(
    path: &std::path::Path,
    metric: &str,
    sql: &str,
) -> Result<BTreeMap<String, TruthDay>, ReconcileError> {
    use rusqlite::{Connection, OpenFlags};
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| truth_error(metric, format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| truth_error(metric, e))?;
    let mut stmt = conn.prepare(sql).map_err(|e| truth_error(metric, e))?;
    let names: Vec<String> = stmt.column_names().map(|s| s.to_string()).collect();
    let col = |name: &str| names.iter().position(|n| n == name);
    let (Some(day_at), Some(actual_at)) = (col("day"), col("actual")) else {
        return Err(truth_error(
            metric,
            format!("truth_sql must return columns day and actual; it returns {names:?}"),
        ));
    };
    let unknown_at = col("unknown_attribution");
    let value_at = col("value");
    let mut rows = stmt.query([]).map_err(|e| truth_error(metric, e))?;
    let mut out = BTreeMap::new();
    while let Some(row) = rows.next().map_err(|e| truth_error(metric, e))? {
        let day: String = row
            .get(day_at)
            .map_err(|e| truth_error(metric, format!("column day: {e}")))?;
        let actual: i64 = row
            .get(actual_at)
            .map_err(|e| truth_error(metric, format!("column actual: {e}")))?;
        let unknown: Option<i64> = match unknown_at {
            Some(at) => row
                .get(at)
                .map_err(|e| truth_error(metric, format!("column unknown_attribution: {e}")))?,
            None => None,
        };
        let value: Option<f64> = match value_at {
            Some(at) => row
                .get(at)
                .map_err(|e| truth_error(metric, format!("column value must be a number: {e}")))?,
            None => None,
        };
        add_day(&mut out, metric, day, actual, unknown, value)?;
    }
    Ok(out)
}

fn query_postgres(
    url: &str,
    metric: &str,
    sql: &str,
) -> Result<BTreeMap<String, TruthDay>, ReconcileError> {
    let mut client = connect_postgres(url, metric)?;
    let mut tx = read_only(&mut client, metric)?;
    let rows = tx.query(sql, &[]).map_err(|e| truth_error(metric, e))?;
    let mut out = BTreeMap::new();
    for row in rows {
        let names: Vec<&str> = row.columns().iter().map(|c| c.name()).collect();
        let col = |name: &str| names.iter().position(|n| *n == name);
        let (Some(day_at), Some(actual_at)) = (col("day"), col("actual")) else {
            return Err(truth_error(
                metric,
                format!("truth_sql must return columns day and actual; it returns {names:?}"),
            ));
        };
        let day: String = row.try_get(day_at).map_err(|e| {
            truth_error(
                metric,
                format!("column day must be text YYYY-MM-DD (e.g. to_char(created_at, 'YYYY-MM-DD')): {e}"),
            )
        })?;
        let actual: i64 = row.try_get(actual_at).map_err(|e| {
            truth_error(
                metric,
                format!("column actual must be a bigint (count(*)): {e}"),
            )
        })?;
        let unknown: Option<i64> = match col("unknown_attribution") {
            Some(at) => row.try_get(at).map_err(|e| {
                truth_error(
                    metric,
                    format!("column unknown_attribution must be a bigint: {e}"),
                )
            })?,
            None => None,
        };
        let value: Option<f64> = match col("value") {
            Some(at) => row.try_get(at).map_err(|e| {
                truth_error(
                    metric,
                    format!("column value must be a float8 (e.g. sum(amount)::float8): {e}"),
                )
            })?,
            None => None,
        };
        add_day(&mut out, metric, day, actual, unknown, value)?;
    }
    tx.rollback().map_err(|e| truth_error(metric, e))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_kinds_and_refuses_others() {
        assert_eq!(
            TruthDb::parse("sqlite:data/demo.sqlite").unwrap(),
            TruthDb::Sqlite("data/demo.sqlite".into())
        );
        assert_eq!(
            TruthDb::parse("sqlite:///tmp/x.sqlite").unwrap(),
            TruthDb::Sqlite("/tmp/x.sqlite".into())
        );
        assert!(matches!(
            TruthDb::parse("postgres://u:p@localhost/db").unwrap(),
            TruthDb::Postgres(_)
        ));
        let err = TruthDb::parse("mysql://u:secret@h/db")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sqlite:<path>"), "{err}");
        assert!(!err.contains("secret"), "the password is not echoed: {err}");
        assert_eq!(
            redact("postgres://u:pw@h:5432/db?sslmode=disable&password=pw2"),
            "postgres://u:***@h:5432/db?sslmode=disable&password=***"
        );
        assert!(TruthDb::parse("sqlite:").is_err());
    }

    #[test]
    fn sqlite_rows_are_summed_by_day_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sqlite");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE users (created_at TEXT, known INTEGER);
             INSERT INTO users VALUES ('2026-11-27T10:00:00.000Z', 1), ('2026-11-28T01:00:00.000Z', 0),
                                      ('2026-11-28T02:00:00.000Z', 1);",
        )
        .unwrap();
        let db = TruthDb::Sqlite(path.clone());
        let got = db
            .query(
                "signups",
                "SELECT substr(created_at, 1, 10) AS day, count(*) AS actual,
                        sum(known = 0) AS unknown_attribution FROM users GROUP BY 1",
            )
            .unwrap();
        assert_eq!(
            got["2026-11-27"],
            TruthDay {
                actual: 1,
                unknown_attribution: Some(0),
                value: None,
            }
        );
        assert_eq!(
            got["2026-11-28"],
            TruthDay {
                actual: 2,
                unknown_attribution: Some(1),
                value: None,
            }
        );

        // A value column (integer or real), and the conversions by source.
        let worth = db
            .query(
                "orders",
                "SELECT substr(created_at, 1, 10) AS day, count(*) AS actual,
                        sum(known) * 12.5 AS value FROM users GROUP BY 1",
            )
            .unwrap();
        assert_eq!(worth["2026-11-28"].value, Some(12.5));
        let by_source = db
            .attribution(
                "signups",
                "SELECT substr(created_at, 1, 10) AS day,
                        CASE WHEN known = 1 THEN 'google' END AS source, count(*) AS conversions
                 FROM users GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .unwrap();
        assert_eq!(
            by_source,
            [
                SourceDay {
                    day: "2026-11-27".into(),
                    source: Some("google".into()),
                    conversions: 1
                },
                SourceDay {
                    day: "2026-11-28".into(),
                    source: None,
                    conversions: 1
                },
                SourceDay {
                    day: "2026-11-28".into(),
                    source: Some("google".into()),
                    conversions: 1
                },
            ]
        );
        let err = db
            .attribution("signups", "SELECT 1 AS day")
            .unwrap_err()
            .to_string();
        assert!(err.contains("day, source and conversions"), "{err}");

        let err = db
            .query("signups", "SELECT 1 AS n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("columns day and actual"), "{err}");
        let err = db
            .query("signups", "SELECT 'yesterday' AS day, 1 AS actual")
            .unwrap_err()
            .to_string();
        assert!(err.contains("YYYY-MM-DD"), "{err}");
        let err = db
            .query(
                "signups",
                "DELETE FROM users RETURNING created_at AS day, 1 AS actual",
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("signups"), "{err}");
        let left: i64 = conn
            .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 3, "the truth database is never written");
    }
}
