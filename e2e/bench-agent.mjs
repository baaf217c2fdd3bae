// The agent's main-thread speed benchmark (a command, not a CI gate): `npm run bench:agent`.
//
// A real relay (e2e/harness.mjs) serves dist/ and e2e/bench-site/ (the README snippet and the
// loader, nothing else); headless Chromium loads it. In one run, each part in a fresh browser
// context (its own IndexedDB, its own sending tab):
//
// 1. track() cost: once the core is running and IndexedDB is open, 1,000 then 10,000 calls of
//    trueup.track("bench", {run, i, plan: "pro", price: 49.5}), each timed with
//    performance.now() in the page, in batches of 100 that yield to the event loop between
//    batches (so persisting and sending run as in a page). Per-call median/p90/p99/max, and the
//    mean per call from timing whole batches (exact whatever the timer resolution), next to the
//    same loop around a no-op (the measuring floor) and around pieces a call is made of
//    (sessionStorage.setItem, the stub's uuidv7, JSON.stringify of an event). Then every event
//    must be in the warehouse exactly once (by props.run and props.i); the renderer's main-thread
//    time (CDP Performance.getMetrics) from the first call until then, inside and outside track().
// 2. Long tasks (>50 ms, PerformanceObserver "longtask", buffered) while tracking at 1,000
//    events a minute (one every 60 ms) for 30 s, and over 30 s with no tracking (control).
//    The control times a plain-JS stand-in for a call on the same 60 ms schedule (what a lone
//    call costs on this machine). Long animation frames are recorded too (their script
//    attribution says whose code ran), and the main-thread time of each window.
// 3. Time to first request: navigation start → the first POST to /_r/q, with one track() at
//    page start (bench-site's inline script), on a first visit and on a repeat visit.
//
// Prints a summary block (one greppable line per figure) and writes e2e/results/agent-bench.json.
// Needs dist/ (npm run build) and target/debug/trueup-relay (cargo build -p trueup-relay).
//
// Options: --seconds=N  length of each long-task window (default 30)
//          --no-coi     do not make the page cross-origin isolated for the track() timing
//                       (by default the bench page is served with COOP/COEP through a
//                       Playwright route, which gives performance.now() 5 µs resolution
//                       instead of 100 µs; the agent's own requests are not intercepted)

import { mkdirSync, writeFileSync, readFileSync, rmSync } from "node:fs";
import { cpus } from "node:os";
import { join } from "node:path";
import { execFileSync } from "node:child_process";
import { Relay, launch, delivery, runId, until, sleep, ROOT } from "./harness.mjs";

const argv = process.argv.slice(2);
const opt = (name, d) => {
  const a = argv.find((x) => x.startsWith(`--${name}=`));
  return a ? Number(a.split("=")[1]) : d;
};
const WINDOW_MS = Math.max(1, opt("seconds", 30)) * 1000;
const COI = !argv.includes("--no-coi");
const BATCH = 100;
const RATE_EVERY_MS = 60; // 1,000 events a minute
const BUDGET_MS = 170_000; // the whole run; a watchdog ends it beyond this

const SITE = join(ROOT, "e2e/bench-site");
const OUT_DIR = join(ROOT, "e2e/results");
const OUT = join(OUT_DIR, "agent-bench.json");

let relay;
let browser;
const watchdog = setTimeout(() => {
  console.error(`bench-agent: still running after ${BUDGET_MS / 1000} s; giving up`);
  try {
    relay?.proc?.kill("SIGKILL");
    if (relay?.dir) rmSync(relay.dir, { recursive: true, force: true });
  } catch {}
  process.exit(2);
}, BUDGET_MS);
watchdog.unref();

/** Rejects if `p` is not settled within `ms`. */
function bounded(what, p, ms) {
  let timer;
  return Promise.race([
    p,
    new Promise((_, rej) => (timer = setTimeout(() => rej(new Error(`timed out after ${ms} ms: ${what}`)), ms))),
  ]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------------------------------------
// Page observations: console, errors, failed and non-2xx requests to the relay.

const issues = []; // {part, kind, text}
const posts = {}; // part → {fetch, beacon, other, statuses}

function watch(page, part) {
  posts[part] ||= { requests: 0, statuses: {} };
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") issues.push({ part, kind: `console.${m.type()}`, text: m.text() });
  });
  page.on("pageerror", (e) => issues.push({ part, kind: "pageerror", text: String(e && e.stack || e) }));
  page.on("requestfailed", (r) =>
    issues.push({ part, kind: "requestfailed", text: `${r.method()} ${r.url()}: ${r.failure()?.errorText}` }));
  page.on("request", (r) => {
    if (r.method() === "POST" && new URL(r.url()).pathname === "/_r/q") posts[part].requests++;
  });
  page.on("response", (r) => {
    const u = new URL(r.url());
    if (u.pathname === "/_r/q") {
      const s = String(r.status());
      posts[part].statuses[s] = (posts[part].statuses[s] || 0) + 1;
    } else if (r.status() >= 400) {
      issues.push({ part, kind: "http", text: `${r.status()} ${r.url()}` });
    }
  });
}

// Installed in every page before its own scripts: long tasks and long animation frames.
const OBSERVE = () => {
  const b = (window.__bench = { lt: [], loaf: [], errors: [] });
  try {
    new PerformanceObserver((l) => {
      for (const e of l.getEntries())
        b.lt.push({ start: e.startTime, duration: e.duration, name: e.name,
          attribution: (e.attribution || []).map((a) => `${a.containerType}:${a.containerSrc || a.name}`) });
    }).observe({ type: "longtask", buffered: true });
  } catch (e) {
    b.errors.push("longtask: " + e);
  }
  try {
    new PerformanceObserver((l) => {
      for (const e of l.getEntries())
        b.loaf.push({ start: e.startTime, duration: e.duration, blocking: e.blockingDuration,
          scripts: (e.scripts || []).map((s) => ({ src: s.sourceURL, fn: s.sourceFunctionName, invoker: s.invoker,
            type: s.invokerType, duration: Math.round(s.duration) })) });
    }).observe({ type: "long-animation-frame", buffered: true });
  } catch (e) {
    b.errors.push("long-animation-frame: " + e);
  }
};

async function freshPage(part, { isolate = false } = {}) {
  const context = await browser.newContext();
  await context.addInitScript(OBSERVE);
  const page = await context.newPage();
  watch(page, part);
  if (isolate) {
    // COOP/COEP on the document only, so performance.now() is not coarsened to 100 µs; removed
    // once the page is loaded so the agent's own requests go straight to the relay.
    const isDoc = (u) => u.origin === relay.origin && u.pathname === "/";
    await context.route(isDoc, async (route) => {
      const r = await route.fetch();
      await route.fulfill({ response: r, headers: { ...r.headers(),
        "cross-origin-opener-policy": "same-origin", "cross-origin-embedder-policy": "require-corp" } });
    });
    await page.goto(`${relay.origin}/`, { timeout: 15000 });
    await context.unroute(isDoc);
  } else {
    await page.goto(`${relay.origin}/`, { timeout: 15000 });
  }
  await page.waitForFunction(() => typeof window.trueup?.stats === "function", null, { timeout: 15000 });
  // The core constructed and IndexedDB open: the counters carry the device id from then on.
  await until("IndexedDB open", async () => (await page.evaluate(() => window.trueup.stats())).device_id, 15000);
  await bounded("flush", page.evaluate(() => window.trueup.flush()), 15000);
  const cdp = await context.newCDPSession(page);
  await cdp.send("Performance.enable");
  return { context, page, cdp };
}

/** The renderer main thread's cumulative busy time (ms): all tasks, and script within them. */
async function mainThread(cdp) {
  const m = Object.fromEntries((await cdp.send("Performance.getMetrics")).metrics.map((x) => [x.name, x.value]));
  return { task_ms: m.TaskDuration * 1000, script_ms: m.ScriptDuration * 1000 };
}
const busy = (a, b) => ({ task_ms: r2(b.task_ms - a.task_ms), script_ms: r2(b.script_ms - a.script_ms) });

// ---------------------------------------------------------------------------------------------
// Figures.

function quantiles(ms) {
  const s = [...ms].sort((a, b) => a - b);
  const q = (p) => s[Math.min(s.length - 1, Math.max(0, Math.ceil(p * s.length) - 1))] * 1000;
  const mean = (s.reduce((a, b) => a + b, 0) / s.length) * 1000;
  return { n: s.length, median: q(0.5), p90: q(0.9), p99: q(0.99), max: s[s.length - 1] * 1000, mean };
}
const r2 = (x) => Math.round(x * 100) / 100;
const us = (x) => (x >= 100 ? String(Math.round(x)) : x >= 10 ? x.toFixed(1).replace(/\.0$/, "") : x.toFixed(2).replace(/\.?0+$/, ""));
const ms = (x) => (x >= 100 ? String(Math.round(x)) : x.toFixed(1));
const round = (o) => Object.fromEntries(Object.entries(o).map(([k, v]) => [k, typeof v === "number" ? r2(v) : v]));

/** Runs `n` timed calls in the page (track, or a no-op for the floor), in batches that yield. */
function timedCalls(page, { run, n, what }) {
  return bounded(`${n} × ${what}`, page.evaluate(async ({ run, n, batch, what }) => {
    const t = window.trueup;
    let sink = 0;
    const fn = what === "noop" ? (name, props) => (sink += props.i) : (name, props) => t.track(name, props);
    const per = new Array(n);
    const batches = [];
    const gaps = [];
    let last = 0;
    for (let b = 0; b < n; b += batch) {
      const tb = performance.now();
      if (b) gaps.push(tb - last);
      const end = Math.min(n, b + batch);
      for (let i = b; i < end; i++) {
        const t0 = performance.now();
        fn("bench", { run, i, plan: "pro", price: 49.5 });
        per[i] = performance.now() - t0;
      }
      last = performance.now();
      batches.push({ calls: end - b, ms: last - tb });
      await new Promise((r) => setTimeout(r, 0));
    }
    return { per, batches, gaps, sink };
  }, { run, n, batch: BATCH, what }), 60000);
}

function summarize({ per, batches, gaps }) {
  const calls = batches.reduce((a, b) => a + b.calls, 0);
  const total = batches.reduce((a, b) => a + b.ms, 0);
  const slow = per.map((v, i) => [v * 1000, i]).sort((a, b) => b[0] - a[0]).slice(0, 10)
    .map(([v, i]) => ({ i, us: r2(v), position_in_batch: i % BATCH }));
  const firstInBatch = per.filter((_, i) => i % BATCH === 0);
  return {
    ...round(quantiles(per)),
    batch_mean_us: r2((total / calls) * 1000),
    first_call_of_batch: round(quantiles(firstInBatch)),
    yield_gap_ms: gaps.length ? round(Object.fromEntries(Object.entries(quantiles(gaps)).map(([k, v]) => [k, k === "n" ? v : v / 1000]))) : null,
    over_1ms: per.filter((v) => v >= 1).length,
    over_100us: per.filter((v) => v >= 0.1).length,
    slowest: slow,
  };
}

async function longTasks(page, from, to) {
  await sleep(300); // observers are called asynchronously
  const b = await page.evaluate(() => window.__bench);
  const pick = (list, f, t) => list.filter((e) => e.start >= f && e.start <= t);
  const sum = (l) => r2(l.reduce((a, e) => a + e.duration, 0));
  const win = pick(b.lt, from, to);
  const load = pick(b.lt, -Infinity, from - 1e-9);
  return {
    window: { count: win.length, total_ms: sum(win), max_ms: win.length ? r2(Math.max(...win.map((e) => e.duration))) : 0,
      entries: win.map((e) => ({ start_ms: r2(e.start), duration_ms: r2(e.duration), attribution: e.attribution })) },
    before_window: { count: load.length, total_ms: sum(load),
      entries: load.map((e) => ({ start_ms: r2(e.start), duration_ms: r2(e.duration) })) },
    long_animation_frames: b.loaf.filter((e) => e.start >= from - 5000 && e.start <= to).map((e) => ({
      start_ms: r2(e.start), duration_ms: r2(e.duration), blocking_ms: r2(e.blocking ?? 0), scripts: e.scripts })),
    observer_errors: b.errors,
  };
}

/** Waits (bounded) until every run's events are in the warehouse; their delivery figures. */
async function delivered(runs, ms) {
  const complete = () => runs.every(([run, n]) => delivery(relay, run, n).delivered === n);
  try {
    await until("the events in the warehouse", async () => {
      await relay.drained();
      return complete();
    }, ms, 250);
  } catch {}
  await relay.drained().catch(() => {});
  const out = {};
  for (const [run, n] of runs) {
    const d = delivery(relay, run, n);
    const ids = relay.query(`SELECT count(*) AS rows, count(DISTINCT id) AS ids FROM events WHERE props->>'run' = '${run}'`)[0];
    out[run] = { expected: n, delivered: d.delivered, missing: d.missing.length, missing_first: d.missing.slice(0, 10),
      duplicated_i: d.dup, rows: ids.rows, distinct_ids: ids.ids, exactly_once: d.delivered === n && d.dup === 0 && ids.rows === n };
  }
  return out;
}

function seqCheck(runList) {
  const rows = relay.query(
    `SELECT device_id, count(*) AS n, count(DISTINCT seq) AS distinct_seq, min(seq) AS min_seq, max(seq) AS max_seq
     FROM events WHERE props->>'run' IN (${runList.map((r) => `'${r}'`).join(",")}) GROUP BY device_id`);
  return rows.map((r) => ({ ...r, contiguous: r.n === r.distinct_seq && r.max_seq - r.min_seq + 1 === r.n }));
}

const identity = (s) => s.enqueued === s.acked + Object.values(s.dropped || {}).reduce((a, b) => a + b, 0) + s.pending;

// ---------------------------------------------------------------------------------------------

async function partTrack() {
  const { context, page, cdp } = await freshPage("track", { isolate: COI });
  const env = await page.evaluate(() => {
    let min = Infinity;
    let last = performance.now();
    const end = last + 200;
    for (let n = 0; n < 2000; ) {
      const t = performance.now();
      if (t !== last) {
        min = Math.min(min, t - last);
        last = t;
        n++;
      }
      if (t > end) break;
    }
    return { crossOriginIsolated: window.crossOriginIsolated, resolution_us: Math.round(min * 1e6) / 1000, userAgent: navigator.userAgent };
  });
  // Reference costs of pieces a track() call is made of, timed the same way (no agent involved).
  const reference = await bounded("reference costs", page.evaluate(async (batch) => {
    // The stub's own (the npm entry imports nothing and touches no page state when imported).
    const { uuidv7 } = await import("/_r/a/trueup.js");
    const event = (i) => ({ id: uuidv7(), name: "bench", schema: "event/1", ts: Date.now(), source: "client",
      anon_id: "0c1f5b2e-8d4a-4f3e-9b7a-1e2d3c4b5a69", session_id: "5f0e1d2c-3b4a-4968-8776-a5b4c3d2e1f0",
      device_id: "0c1f5b2e-8d4a-4f3e-9b7a-1e2d3c4b5a69.5f0e1d2c-3b4a-4968-8776-a5b4c3d2e1f0", seq: i,
      props: { run: "ref", i, plan: "pro", price: 49.5 }, context: { url: location.href, title: document.title } });
    const pieces = {
      "sessionStorage.setItem": (i) => sessionStorage.setItem("bench.seq", String(i)),
      "uuidv7 (the stub's)": () => uuidv7(),
      "JSON.stringify(an event)": (i) => JSON.stringify(event(i)),
    };
    const out = {};
    for (const [name, fn] of Object.entries(pieces)) {
      const per = [];
      let total = 0;
      for (let b = 0; b < 2000; b += batch) {
        const tb = performance.now();
        for (let i = b; i < b + batch; i++) {
          const t0 = performance.now();
          fn(i);
          per.push(performance.now() - t0);
        }
        total += performance.now() - tb;
        await new Promise((r) => setTimeout(r, 0));
      }
      out[name] = { per, batch_mean_ms: total / per.length };
    }
    sessionStorage.removeItem("bench.seq");
    return out;
  }, BATCH), 30000);
  for (const [k, v] of Object.entries(reference)) reference[k] = { ...round(quantiles(v.per)), batch_mean_us: r2(v.batch_mean_ms * 1000) };
  const run1k = runId();
  const run10k = runId();
  // The floor: the same loop around a function that does nothing but read the props.
  const noop = summarize(await timedCalls(page, { run: "noop", n: 10000, what: "noop" }));
  const tStart = await page.evaluate(() => performance.now());
  const mt0 = await mainThread(cdp);
  const t1k = summarize(await timedCalls(page, { run: run1k, n: 1000, what: "track" }));
  const t10k = summarize(await timedCalls(page, { run: run10k, n: 10000, what: "track" }));
  const tEnd = await page.evaluate(() => performance.now());
  const t0 = Date.now();
  await bounded("flush", page.evaluate(() => window.trueup.flush()), 15000);
  const d = await delivered([[run1k, 1000], [run10k, 10000]], 60000);
  const deliveryMs = Date.now() - t0;
  const mt1 = await mainThread(cdp);
  const inCalls = [t1k, t10k].reduce((a, s) => a + s.batch_mean_us * s.n, 0) / 1000;
  const mainThreadBurst = { ...busy(mt0, mt1), in_track_calls_ms: r2(inCalls),
    outside_calls_per_event_us: r2(((mt1.task_ms - mt0.task_ms - inCalls) / 11000) * 1000) };
  // The counters settle after the relay's answer is read.
  let stats = await page.evaluate(() => window.trueup.stats());
  await until("the counters to settle", async () => {
    stats = await page.evaluate(() => window.trueup.stats());
    return stats.pending === 0;
  }, 10000).catch(() => {});
  const lt = await longTasks(page, tStart, tEnd);
  const seq = seqCheck([run1k, run10k]);
  await context.close();
  return { env, runs: { run1k, run10k }, reference, main_thread_burst: mainThreadBurst, noop, track_1000: t1k, track_10000: t10k, delivery: d,
    delivery_wait_ms: deliveryMs, seq_streams: seq, stats, stats_identity_holds: identity(stats),
    long_tasks_during_burst: { count: lt.window.count, total_ms: lt.window.total_ms, max_ms: lt.window.max_ms,
      entries: lt.window.entries, long_animation_frames: lt.long_animation_frames } };
}

async function partLongTasks(tracking) {
  const part = tracking ? "longtask-tracking" : "longtask-control";
  const { context, page, cdp } = await freshPage(part, { isolate: COI });
  const run = runId();
  const mt0 = await mainThread(cdp);
  const res = await bounded(part, page.evaluate(({ tracking, run, windowMs, every }) => new Promise((resolve) => {
    // The control makes no agent call; on the same schedule it times a piece of plain JS of
    // about a track()'s size (an event object, stringified), to show what a call costs on
    // this machine when it is the only work of its task.
    const reference = (i) => JSON.stringify({ id: crypto.randomUUID(), name: "bench_rate", ts: Date.now(),
      seq: i, props: { run, i, plan: "pro", price: 49.5 }, context: { url: location.href, title: document.title } });
    const t0 = performance.now();
    const target = Math.round(windowMs / every);
    const per = [];
    let i = 0;
    const id = setInterval(() => {
      const s = performance.now();
      if (tracking) window.trueup.track("bench_rate", { run, i, plan: "pro", price: 49.5 });
      else reference(i);
      per.push(performance.now() - s);
      i++;
      if (i >= target || performance.now() - t0 > windowMs + 5000) {
        clearInterval(id);
        resolve({ t0, t1: performance.now(), n: i, per });
      }
    }, every);
  }), { tracking, run, windowMs: WINDOW_MS, every: RATE_EVERY_MS }), WINDOW_MS + 20000);
  const mt1 = await mainThread(cdp);
  const resolution = await page.evaluate(() => {
    let min = Infinity;
    for (let last = performance.now(), n = 0, end = last + 100; n < 500 && last < end; ) {
      const t = performance.now();
      if (t !== last) (min = Math.min(min, t - last)), (last = t), n++;
    }
    return Math.round(min * 1e6) / 1000;
  });
  const lt = await longTasks(page, res.t0, res.t1);
  let d = null;
  if (tracking) {
    await bounded("flush", page.evaluate(() => window.trueup.flush()), 15000);
    d = (await delivered([[run, res.n]], 20000))[run];
  }
  await context.close();
  return { tracking, window_ms: r2(res.t1 - res.t0), ticks: res.n, events: tracking ? res.n : 0,
    rate_per_min: r2(res.n / ((res.t1 - res.t0) / 60000)),
    timer_resolution_us: resolution, main_thread: busy(mt0, mt1),
    [tracking ? "track_call" : "reference_call"]: res.per.length ? round(quantiles(res.per)) : null, long_tasks: lt.window, at_page_load: lt.before_window,
    long_animation_frames: lt.long_animation_frames, observer_errors: lt.observer_errors, delivery: d };
}

async function partTtfr() {
  const context = await browser.newContext();
  await context.addInitScript(OBSERVE);
  const visits = [];
  for (const visit of ["first", "repeat"]) {
    const page = await context.newPage();
    watch(page, `ttfr-${visit}`);
    const run = runId();
    let post;
    page.on("request", (r) => {
      if (!post && r.method() === "POST" && new URL(r.url()).pathname === "/_r/q") post = r;
    });
    await page.goto(`${relay.origin}/?ttfr=${run}`, { waitUntil: "commit", timeout: 15000 });
    await until("the first POST to /_r/q", () => post, 15000);
    const t = await until("its resource timing", () => page.evaluate(() => {
      const res = performance.getEntriesByType("resource");
      const at = (f) => res.find((e) => f(new URL(e.name).pathname));
      const q = res.filter((e) => new URL(e.name).pathname === "/_r/q").sort((a, b) => a.startTime - b.startTime)[0];
      if (!q) return null;
      const nav = performance.getEntriesByType("navigation")[0];
      const span = (e) => e && { start_ms: Math.round(e.startTime * 10) / 10, end_ms: Math.round(e.responseEnd * 10) / 10,
        transfer_bytes: e.transferSize };
      return {
        time_origin: performance.timeOrigin,
        first_post: { ...span(q), initiator: q.initiatorType },
        dom_content_loaded_ms: nav && Math.round(nav.domContentLoadedEventEnd * 10) / 10,
        load_ms: nav && Math.round(nav.loadEventEnd * 10) / 10,
        loader: span(at((p) => p.endsWith("/loader.js"))),
        glue: span(at((p) => /\/trueup_agent\.[^/]*\.js$/.test(p))),
        wasm: span(at((p) => p.endsWith(".wasm"))),
      };
    }), 10000, 100);
    await page.waitForLoadState("load", { timeout: 15000 }).catch(() => {});
    const pw = post.timing().startTime; // epoch ms (Playwright's view of the same request)
    const lt = await longTasks(page, -Infinity, t.first_post.start_ms);
    visits.push({ visit, run, ttfr_ms: t.first_post.start_ms, ttfr_playwright_ms: pw > 0 ? r2(pw - t.time_origin) : null,
      ...t, long_tasks_before_first_post: { count: lt.window.count, total_ms: lt.window.total_ms, entries: lt.window.entries },
      long_animation_frames: lt.long_animation_frames });
    await bounded("flush", page.evaluate(() => window.trueup.flush()), 15000);
    await page.close({ runBeforeUnload: true });
  }
  const d = await delivered(visits.map((v) => [v.run, 1]), 15000);
  for (const v of visits) v.delivery = d[v.run];
  await context.close();
  return visits;
}

async function relayMetrics() {
  const names = ["trueup_events_received_total", "trueup_events_accepted_total", "trueup_events_duplicate_total",
    "trueup_events_rejected_total", "trueup_requests_rejected_total", "trueup_rate_limited_total"];
  const out = {};
  for (const n of names) out[n.replace(/^trueup_|_total$/g, "")] = await relay.metric(n).catch(() => null);
  return out;
}

function gitRev() {
  try {
    const rev = execFileSync("git", ["rev-parse", "--short", "HEAD"], { cwd: ROOT, encoding: "utf8" }).trim();
    const dirty = execFileSync("git", ["status", "--porcelain", "--", "crates/agent"], { cwd: ROOT, encoding: "utf8" }).trim();
    return dirty ? `${rev}+dirty(crates/agent)` : rev;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const started = Date.now();
  relay = await Relay.start({ site: SITE });
  browser = await launch();
  const manifest = JSON.parse(readFileSync(join(ROOT, "dist/manifest.json"), "utf8"));

  const track = await partTrack();
  const ttfr = await partTtfr();
  const tracking = await partLongTasks(true);
  const control = await partLongTasks(false);
  const metrics = await relayMetrics();
  const relayLog = relay.log.split("\n").filter((l) => /WARN|ERROR/.test(l)).slice(0, 50);

  const coarse = track.env.resolution_us > 5;
  const t10 = track.track_10000;
  const medianForTarget = coarse ? t10.batch_mean_us - track.noop.batch_mean_us : t10.median;
  const allDelivered = Object.values(track.delivery).every((d) => d.exactly_once);
  const targets = {
    median_under_20us: { value_us: r2(medianForTarget), basis: coarse ? "batch mean minus no-op floor" : "per-call median", pass: medianForTarget < 20 },
    p99_under_1ms: { value_us: t10.p99, pass: t10.p99 < 1000 },
    no_agent_long_task: { tracking: tracking.long_tasks.count, control: control.long_tasks.count, pass: tracking.long_tasks.count === 0 },
  };

  const result = {
    when: new Date().toISOString(),
    git: gitRev(),
    machine: { cpus: cpus().length, cpu: cpus()[0]?.model, node: process.version, chromium: browser.version() },
    agent: { glue: manifest.glue, wasm: manifest.wasm },
    options: { batch: BATCH, window_ms: WINDOW_MS, rate_every_ms: RATE_EVERY_MS, cross_origin_isolation_route: COI },
    timer: track.env,
    track: track,
    long_tasks: { tracking, control },
    time_to_first_request: ttfr,
    relay_metrics: metrics,
    relay_warnings: relayLog,
    page_issues: issues,
    relay_posts_by_part: posts,
    targets,
    duration_s: r2((Date.now() - started) / 1000),
  };
  mkdirSync(OUT_DIR, { recursive: true });
  writeFileSync(OUT, JSON.stringify(result, null, 2) + "\n");

  const res = `timer resolution ${track.env.resolution_us} µs`;
  const line = (name, s) =>
    `${name}: median ${us(s.median)} µs p90 ${us(s.p90)} µs p99 ${us(s.p99)} µs max ${us(s.max)} µs (${res}); ` +
    `batch mean ${us(s.batch_mean_us)} µs/call` + (s.over_1ms === undefined ? "" : `; calls ≥100 µs ${s.over_100us}, ≥1 ms ${s.over_1ms}`);
  const dl = (d) => `${d.delivered}/${d.expected} delivered, missing ${d.missing}, duplicated ${d.duplicated_i}, rows ${d.rows}`;
  const lt = (r) => `${r.long_tasks.count} long tasks (total ${ms(r.long_tasks.total_ms)} ms, max ${ms(r.long_tasks.max_ms)} ms)`;
  const tt = (v) => `${ms(v.ttfr_ms)} ms (${v.first_post.initiator}; loader.js done ${v.loader ? ms(v.loader.end_ms) : "?"} ms, ` +
    `wasm done ${v.wasm ? ms(v.wasm.end_ms) : "?"} ms, DOMContentLoaded ${ms(v.dom_content_loaded_ms)} ms, load ${ms(v.load_ms)} ms; ` +
    `long tasks before it ${v.long_tasks_before_first_post.count})`;
  const pass = (t) => (t.pass ? "PASS" : "FAIL");
  const stats = track.stats;
  const out = [
    "",
    `== trueup agent bench (Chromium ${browser.version()}, ${cpus().length} cores, crossOriginIsolated ${track.env.crossOriginIsolated}, ${res}) ==`,
    line("noop x10000 (measuring floor)", track.noop),
    ...Object.entries(track.reference).map(([k, v]) => line(`reference ${k} x2000`, v)),
    line("track() x1000", track.track_1000),
    line("track() x10000", t10),
    `track() x10000: first call of each batch of ${BATCH}: median ${us(t10.first_call_of_batch.median)} µs p99 ${us(t10.first_call_of_batch.p99)} µs max ${us(t10.first_call_of_batch.max)} µs`,
    `yield between batches (setTimeout 0 + the agent's persist/send work): median ${ms(t10.yield_gap_ms.median)} ms p99 ${ms(t10.yield_gap_ms.p99)} ms max ${ms(t10.yield_gap_ms.max)} ms (noop: median ${ms(track.noop.yield_gap_ms.median)} ms max ${ms(track.noop.yield_gap_ms.max)} ms)`,
    `main thread during the burst, first call → warehouse complete: ${ms(track.main_thread_burst.task_ms)} ms of tasks (${ms(track.main_thread_burst.script_ms)} ms script), ${ms(track.main_thread_burst.in_track_calls_ms)} ms inside track() calls → ${us(track.main_thread_burst.outside_calls_per_event_us)} µs per event outside track() (persisting, sending, settling)`,
    `long tasks during the 11000-call burst: ${track.long_tasks_during_burst.count} (total ${ms(track.long_tasks_during_burst.total_ms)} ms, max ${ms(track.long_tasks_during_burst.max_ms)} ms)`,
    `delivery x1000: ${dl(track.delivery[track.runs.run1k])}; exactly once: ${track.delivery[track.runs.run1k].exactly_once ? "yes" : "NO"}`,
    `delivery x10000: ${dl(track.delivery[track.runs.run10k])}; exactly once: ${track.delivery[track.runs.run10k].exactly_once ? "yes" : "NO"} (warehouse complete ${ms(track.delivery_wait_ms)} ms after the last call)`,
    `seq streams: ${track.seq_streams.map((s) => `${s.n} events seq ${s.min_seq}..${s.max_seq} contiguous ${s.contiguous}`).join("; ")}`,
    `counters: enqueued ${stats.enqueued} acked ${stats.acked} pending ${stats.pending} dropped ${JSON.stringify(stats.dropped)} retried ${stats.retried}; identity ${track.stats_identity_holds ? "holds" : "BROKEN"}`,
    `long tasks tracking 1000/min for ${ms(tracking.window_ms / 1000)} s (${tracking.events} events): ${lt(tracking)}; at page load ${tracking.at_page_load.count}; delivered ${tracking.delivery.delivered}/${tracking.delivery.expected} exactly once ${tracking.delivery.exactly_once ? "yes" : "NO"}`,
    `long tasks control, no tracking, ${ms(control.window_ms / 1000)} s: ${lt(control)}; at page load ${control.at_page_load.count}`,
    `track() alone in its task, every 60 ms: median ${us(tracking.track_call.median)} µs p90 ${us(tracking.track_call.p90)} µs p99 ${us(tracking.track_call.p99)} µs max ${us(tracking.track_call.max)} µs (timer resolution ${tracking.timer_resolution_us} µs); ` +
      `control, plain JS event + JSON.stringify every 60 ms: median ${us(control.reference_call.median)} µs p99 ${us(control.reference_call.p99)} µs max ${us(control.reference_call.max)} µs`,
    `main thread busy over the window: tracking ${ms(tracking.main_thread.task_ms)} ms of tasks (${ms(tracking.main_thread.script_ms)} ms script), control ${ms(control.main_thread.task_ms)} ms (${ms(control.main_thread.script_ms)} ms script) → agent ≈ ${us(tracking.events ? ((tracking.main_thread.task_ms - control.main_thread.task_ms) / tracking.events) * 1000 : 0)} µs of main thread per event at 1000/min`,
    ...ttfr.map((v) => `time to first request (${v.visit} visit): ${tt(v)}`),
    `relay: received ${metrics.events_received} accepted ${metrics.events_accepted} duplicate ${metrics.events_duplicate} rejected ${metrics.events_rejected}; POSTs to /_r/q by part ${Object.entries(posts).map(([k, v]) => `${k} ${v.requests} ${JSON.stringify(v.statuses)}`).join(", ")}`,
    `page console errors/warnings, page errors, failed requests: ${issues.length}${issues.length ? " — " + [...new Set(issues.map((i) => `[${i.part}] ${i.kind}: ${i.text.split("\n")[0]}`))].slice(0, 8).join(" | ") : ""}`,
    `targets: median < 20 µs ${pass(targets.median_under_20us)} (${us(targets.median_under_20us.value_us)} µs, ${targets.median_under_20us.basis}); ` +
      `p99 < 1 ms ${pass(targets.p99_under_1ms)} (${us(t10.p99)} µs); no long task while tracking ${pass(targets.no_agent_long_task)} ` +
      `(${tracking.long_tasks.count} tracking, ${control.long_tasks.count} control); all delivered exactly once ${allDelivered ? "PASS" : "FAIL"}`,
    `written: ${OUT.slice(ROOT.length + 1)} (run took ${Math.round(result.duration_s)} s)`,
    "",
  ];
  console.log(out.join("\n"));
}

try {
  await main();
} catch (e) {
  console.error(`bench-agent: ${e && e.stack || e}`);
  if (relay?.log) console.error(`relay log (tail):\n${relay.log.slice(-2000)}`);
  process.exitCode = 1;
} finally {
  await bounded("closing the browser", browser?.close() ?? Promise.resolve(), 10000).catch(() => {});
  await relay?.dispose().catch(() => {});
  clearTimeout(watchdog);
}
