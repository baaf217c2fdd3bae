//! A schema of its own in the PostgreSQL under test (the `postgres` sink of the fan-out part,
//! the loader of the pipeline part): created empty, dropped at the end; the connection URL
//! for the process under test (scoped to the schema by `search_path`, and named by
//! `application_name` so that its server processes can be found and their CPU read) is in a
//! secret file. The benchmark's own connection reads the schema with qualified names.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::procs;

/// The scratch schema and the benchmark's connection to it.
pub struct PgScratch {
    pub client: tokio_postgres::Client,
    pub schema: String,
    /// Holds the URL the process under test connects with.
    pub url_file: PathBuf,
    /// `application_name` of the connections of the process under test.
    app: &'static str,
}

impl PgScratch {
    /// Creates the schema `trueup_bench_<label>_<pid>` (dropping a leftover of that name) and
    /// writes the URL for `app` into `dir/postgres-url`.
    pub async fn create(
        url: &str,
        dir: &Path,
        label: &str,
        app: &'static str,
    ) -> anyhow::Result<PgScratch> {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL ({url}): {e}"))?;
        tokio::spawn(conn);
        let schema = format!("trueup_bench_{label}_{}", std::process::id());
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
            ))
            .await?;
        let sep = if url.contains('?') { '&' } else { '?' };
        let url_file = dir.join("postgres-url");
        std::fs::write(
            &url_file,
            format!("{url}{sep}options=-csearch_path%3D{schema}&application_name={app}\n"),
        )?;
        Ok(PgScratch {
            client,
            schema,
            url_file,
            app,
        })
    }

    /// Rows of the schema's `events`.
    pub async fn rows(&self) -> anyhow::Result<u64> {
        let row = self
            .client
            .query_one(&format!("SELECT count(*) FROM {}.events", self.schema), &[])
            .await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// The server's version (`SHOW server_version`).
    pub async fn server_version(&self) -> Option<String> {
        let row = self
            .client
            .query_one("SHOW server_version", &[])
            .await
            .ok()?;
        row.try_get::<_, String>(0).ok()
    }

    /// The server processes of the connections of the process under test.
    pub async fn backend_pids(&self) -> Vec<u32> {
        let rows = self
            .client
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                &[&self.app],
            )
            .await
            .unwrap_or_default();
        rows.iter()
            .filter_map(|r| u32::try_from(r.get::<_, i32>(0)).ok())
            .collect()
    }

    /// The CPU time each of those processes has used so far.
    pub async fn backend_cpu(&self) -> Vec<(u32, Duration)> {
        let pids = self.backend_pids().await;
        pids.into_iter()
            .filter_map(|p| Some((p, procs::cpu_time(p)?)))
            .collect()
    }

    /// The CPU time so far of the server's own processes that serve no client (WAL writer,
    /// checkpointer, background writer, autovacuum; the postmaster): found as the children
    /// of the benchmark's own server process's parent whose title names no client address.
    /// `None` when the server is not a local process this benchmark can read.
    pub async fn background_cpu(&self) -> Option<Duration> {
        let row = self
            .client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .ok()?;
        let own = u32::try_from(row.get::<_, i32>(0)).ok()?;
        let postmaster = procs::parent_pid(own)?;
        let mut total = procs::cpu_time(postmaster)?;
        for child in procs::child_pids(postmaster) {
            // A client backend's title is `postgres: <user> <db> <host>(<port>) <state>`.
            let title = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            if !title.contains(&b'(')
                && let Some(c) = procs::cpu_time(child)
            {
                total += c;
            }
        }
        Some(total)
    }

    /// Drops the schema.
    pub async fn drop_schema(self) -> anyhow::Result<()> {
        self.client
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .await?;
        Ok(())
    }
}

/// CPU used between two [`PgScratch::backend_cpu`] readings: a process missing from `before`
/// (connected since) started at 0.
pub fn cpu_between(before: &[(u32, Duration)], after: &[(u32, Duration)]) -> Duration {
    after
        .iter()
        .map(|(pid, a)| {
            let b = before.iter().find(|(p, _)| p == pid);
            a.saturating_sub(b.map_or(Duration::ZERO, |b| b.1))
        })
        .sum()
}
