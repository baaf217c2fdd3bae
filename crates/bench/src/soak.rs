//! The soak (`--soak-seconds N`, instead of the usual phases): does the relay stay flat over
//! time at a sustainable rate?
//!
//! 1. A fresh relay (the same config as the main run: fsync on, rate limits off, the embedded
//!    warehouse), a warm-up and a closed loop of `--seconds` to measure its maximum here.
//! 2. An open loop at `--rate-fraction` of that maximum (default half) for `N` seconds, in
//!    windows of `--soak-window` seconds back to back. Each window reports events/s, p50 and
//!    p99 latency (from the scheduled send time: no coordinated omission), the relay's
//!    resident memory (`VmRSS`) and its spool depth when the window ended.
//! 3. The first and last windows side by side: RSS and p99 should stay flat (the ratio
//!    last/first near 1); then the spool drains and the warehouse must hold exactly the
//!    events acknowledged as accepted over the whole run.
//!
//! Bounded: `N` is at most an hour, each window by its length, the drain by a minute.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::load::{self, Expect, Load, PhaseResult, Target};
use crate::procs::RelayProc;
use crate::{COLLECT_PATH, READY_TIMEOUT, check_alive, check_warehouse, phase_json, phase_line};

/// What the soak needs from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub connections: usize,
    pub events_per_batch: usize,
    pub warmup_seconds: u64,
    pub max_seconds: u64,
    pub rate_fraction: f64,
    pub seconds: u64,
    pub window_seconds: u64,
}

/// One window of the open loop.
pub struct Window {
    pub result: PhaseResult,
    pub rss_bytes: Option<u64>,
    pub spool_depth: Option<u64>,
}

/// Everything the soak measured.
pub struct Report {
    pub settings: Settings,
    pub max: PhaseResult,
    pub target_events_per_sec: f64,
    pub windows: Vec<Window>,
    pub warehouse: crate::Warehouse,
    pub relay_exit: String,
    pub relay_exit_ok: bool,
}

/// The relay's resident memory now (`VmRSS`), bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

pub async fn run(s: Settings, relay_bin: &Path) -> anyhow::Result<Report> {
    let load = |phase: usize, seconds: u64| Load {
        connections: s.connections,
        events_per_batch: s.events_per_batch,
        duration: Duration::from_secs(seconds),
        phase,
        max_batches: None,
    };
    let mut relay = RelayProc::start(relay_bin, READY_TIMEOUT).await?;
    let target = Target::new(relay.addr, COLLECT_PATH, Expect::RelayAccepted)?;
    let mut accepted = 0;
    if s.warmup_seconds > 0 {
        accepted += load::closed_loop(&target, load(0, s.warmup_seconds))
            .await?
            .accepted;
    }
    eprintln!(
        "soak: the relay's maximum, closed loop for {} s",
        s.max_seconds
    );
    let max = load::closed_loop(&target, load(1, s.max_seconds)).await?;
    accepted += max.accepted;
    eprintln!("  {}", phase_line(&max));
    check_alive(&mut relay)?;
    anyhow::ensure!(max.events_per_sec() > 0.0, "the closed loop stored nothing");
    let target_events_per_sec = max.events_per_sec() * s.rate_fraction;
    let rps = target_events_per_sec / s.events_per_batch as f64;
    let n = s.seconds.div_ceil(s.window_seconds).max(1);
    eprintln!(
        "soak: {target_events_per_sec:.0} events/s for {} s, {n} windows of {} s",
        s.seconds, s.window_seconds
    );
    let mut windows = Vec::new();
    for i in 0..n {
        let secs = s.window_seconds.min(s.seconds - i * s.window_seconds);
        let result = load::open_loop(&target, load(2 + i as usize, secs), rps).await?;
        check_alive(&mut relay)?;
        accepted += result.accepted;
        let w = Window {
            rss_bytes: rss_bytes(relay.pid()),
            spool_depth: relay.spool_depth().await.ok(),
            result,
        };
        eprintln!("  window {i}: {}", window_line(&w));
        windows.push(w);
    }
    let warehouse = check_warehouse(&relay, accepted).await;
    let (relay_exit, relay_exit_ok) = crate::stop_relay(&mut relay);
    Ok(Report {
        settings: s,
        max,
        target_events_per_sec,
        windows,
        warehouse,
        relay_exit,
        relay_exit_ok,
    })
}

fn mib(b: Option<u64>) -> String {
    b.map_or("?".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
}

fn window_line(w: &Window) -> String {
    format!(
        "{}; rss {}; spool depth {}",
        phase_line(&w.result),
        mib(w.rss_bytes),
        w.spool_depth.map_or("?".into(), |d| d.to_string())
    )
}

fn ratio(last: Option<f64>, first: Option<f64>) -> Option<f64> {
    let (l, f) = (last?, first?);
    (f > 0.0).then(|| l / f)
}

impl Report {
    fn first_last(&self) -> Option<(&Window, &Window)> {
        Some((self.windows.first()?, self.windows.last()?))
    }

    fn rss_ratio(&self) -> Option<f64> {
        let (f, l) = self.first_last()?;
        ratio(l.rss_bytes.map(|b| b as f64), f.rss_bytes.map(|b| b as f64))
    }

    fn p99_ratio(&self) -> Option<f64> {
        let (f, l) = self.first_last()?;
        ratio(
            Some(l.result.latency_ms(0.99)),
            Some(f.result.latency_ms(0.99)),
        )
    }

    fn errors(&self) -> u64 {
        self.windows.iter().map(|w| w.result.error_count()).sum()
    }

    pub fn passed(&self) -> bool {
        self.warehouse.ok() && self.relay_exit_ok && self.errors() == 0
    }

    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "trueup relay soak (batches of {} events, fsync on, {} s at {:.0}% of the maximum)",
            self.settings.events_per_batch,
            self.settings.seconds,
            self.settings.rate_fraction * 100.0
        );
        let _ = writeln!(s, "soak max        : {}", phase_line(&self.max));
        let _ = writeln!(
            s,
            "soak target     : {:.0} events/s",
            self.target_events_per_sec
        );
        for (i, w) in self.windows.iter().enumerate() {
            let _ = writeln!(s, "soak window {i:>3}: {}", window_line(w));
        }
        if let Some((f, l)) = self.first_last() {
            let _ = writeln!(
                s,
                "soak rss        : {} -> {} (last/first {})",
                mib(f.rss_bytes),
                mib(l.rss_bytes),
                self.rss_ratio().map_or("?".into(), |r| format!("{r:.2}"))
            );
            let _ = writeln!(
                s,
                "soak p99        : {:.1} ms -> {:.1} ms (last/first {})",
                f.result.latency_ms(0.99),
                l.result.latency_ms(0.99),
                self.p99_ratio().map_or("?".into(), |r| format!("{r:.2}"))
            );
        }
        let w = &self.warehouse;
        let _ = writeln!(
            s,
            "soak checks     : {} (warehouse rows {} = accepted {}; {} failed requests; relay exit {})",
            if self.passed() { "OK" } else { "FAILED" },
            w.rows.map_or("?".into(), |n| n.to_string()),
            w.accepted,
            self.errors(),
            self.relay_exit
        );
        if let Some(p) = &w.problem {
            let _ = writeln!(s, "error  soak: {p}");
        }
        s
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "soak_seconds": self.settings.seconds,
            "window_seconds": self.settings.window_seconds,
            "rate_fraction": self.settings.rate_fraction,
            "max": phase_json(&self.max),
            "target_events_per_sec": self.target_events_per_sec,
            "windows": self.windows.iter().map(|w| json!({
                "phase": phase_json(&w.result),
                "rss_bytes": w.rss_bytes,
                "spool_depth": w.spool_depth,
            })).collect::<Vec<_>>(),
            "rss_last_over_first": self.rss_ratio(),
            "p99_last_over_first": self.p99_ratio(),
            "accepted": self.warehouse.accepted,
            "warehouse_rows": self.warehouse.rows,
            "relay_exit": self.relay_exit,
            "passed": self.passed(),
        })
    }
}
