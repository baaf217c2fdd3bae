// trueup side by side with the SDKs people would otherwise use (a benchmark, not a CI gate):
// `npm run bench:peers`.
//
// trueup goes through the real relay as in e2e/harness.mjs (a fresh relay and data dir per run,
// counting in its warehouse; in flaky and ack-lost behind e2e/peers/fault-proxy.mjs, which
// injects the same faults as the collector, from the same seeds). posthog-js, Segment analytics-next, RudderStack v3 and Snowplow's
// browser tracker are bundled from node_modules (e2e/peers/build.mjs, e2e/peers/sdk/*.mjs) and
// run against e2e/peers/collector.mjs, a loopback collector that speaks each one's wire format,
// counts by the SDK's own event id and by the test's own property `i`, serves the config their
// CDNs would serve, and injects faults. Each in headless Chromium, a fresh browser context per
// run, the SDK ready (loaded, configured) before the first event, the same calls in the page
// (`window.__sdk.track(name, {run, i})`).
//
// Scenarios (as e2e/delivery.test.mjs), each `--runs` times (default 3), medians:
//   steady        200 events over 2 s, the page stays open
//   trickle       200 events over 20 s (one every 100 ms), the page stays open: what a steady
//                 trickle costs in requests
//   close-burst   50 events, page.close({runBeforeUnload: true}) at once, the site opened again
//                 in the same context
//   navigate-away 20 events, the tab goes at once to a page without the SDK; 3 s later the site
//                 is opened again in the same tab (so a persisted queue gets its chance)
//   offline       context.setOffline(true), 100 events, 3 s, back online
//   flaky         the collector answers 503 (Retry-After: 1) to a seeded 30 % of requests; 300
//                 events over 3 s
//   ack-lost      the collector stores, then breaks the connection without answering, for a
//                 seeded 30 % of requests; 100 events over 3 s; duplicates counted
//   down-reload   the collector (relay) goes down, 100 events, the page is reloaded while it is
//                 down (page, SDK files and vendor config served from disk through a Playwright
//                 route: the CDN's job, which is not what is down), 2 s later it comes back
//   multi-tab     3 tabs of the site track 100 events each at the same time; the first closes
//                 right after its last event, the others stay open
// Each run ends when every event has arrived and no request has come for 2 s (8 s in ack-lost,
// so late duplicates are seen), or no request has come for 8 s (15 s in offline, flaky, ack-lost
// and down-reload, where retries back off and queues are reclaimed after 10 s), or at its
// deadline (20 s after the last action; 30 s in those four). If events are still missing then,
// one more event is tracked in the open page, the collector healthy again, and the count taken
// again up to 15 s later ("after one more event"): events still waiting in a queue, or gone.
// "duplicates" are copies received beyond the first of an event (what a warehouse without dedupe
// would count twice); "same id" of them carry an id already received (a dedupe by id removes
// them: trueup's relay does, and answers them `duplicate`, which is how they are counted for
// trueup); "new id" are events received under two different ids (nothing can remove those).
//
// Also, per SDK: bytes downloaded (gzip -9 of exactly the JS/wasm files the page loads for it;
// trueup: loader, glue and wasm, as `npm run size`), track() time for 1,000 and 10,000 calls
// (batches of 100 that yield, performance.now() per call in a cross-origin isolated page:
// median per call and total time inside the calls; the 10,000 run stops at --speed-budget
// seconds), the renderer's main-thread time until the 11,000 events were delivered, and time to
// first request (navigation start → the first request to the collection endpoint, with one
// track() at page start; a fresh context, --runs times, median).
//
// Writes e2e/results/peers.json and prints a markdown table (the README's "Compared with other
// SDKs"). Options: --runs=N (3), --sdk=trueup,posthog,… (the five; rudderstack-beacon, RudderStack
// in its beacon mode, only when named), --scenario=steady,… (all),
// --no-speed, --no-scenarios, --speed-budget=S (60), --out=FILE.
// Needs dist/ (npm run build) and target/debug/trueup-relay (cargo build -p trueup-relay).

import { mkdirSync, writeFileSync, readFileSync, existsSync } from "node:fs";
import { cpus } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { execFileSync } from "node:child_process";
import { createRequire } from "node:module";
import { Relay, launch, runId, until, sleep, ROOT, serveFromDisk } from "./harness.mjs";
import { Collector, FaultBag, collectionOf } from "./peers/collector.mjs";
import { buildPeers } from "./peers/build.mjs";
import { FaultProxy } from "./peers/fault-proxy.mjs";

const argv = process.argv.slice(2);
const arg = (name, d) => {
  const a = argv.find((x) => x.startsWith(`--${name}=`));
  return a ? a.slice(name.length + 3) : d;
};
const RUNS = Math.max(1, Number(arg("runs", 3)));
const DEFAULT_SDKS = ["trueup", "posthog", "segment", "rudderstack", "snowplow"];
const ALL_SDKS = [...DEFAULT_SDKS, "rudderstack-beacon"]; // the variant runs only when asked for
const SDKS = arg("sdk", DEFAULT_SDKS.join(",")).split(",").filter((s) => ALL_SDKS.includes(s));
const SPEED = !argv.includes("--no-speed");
const DO_SCENARIOS = !argv.includes("--no-scenarios");
const SPEED_BUDGET_MS = Number(arg("speed-budget", 60)) * 1000;
const OUT = arg("out", join(ROOT, "e2e/results/peers.json"));
const BUDGET_MS = 45 * 60 * 1000; // a watchdog ends the whole run beyond this
const SITE = join(ROOT, "e2e/peers/site");
const BATCH = 100;

const SCENARIOS = {
  steady: { what: "200 events over 2 s" },
  trickle: { what: "200 events over 20 s" },
  "close-burst": { what: "50 events, tab closed at once, site reopened" },
  "navigate-away": { what: "20 events, tab goes to a page without the SDK, site reopened 3 s later" },
  offline: { what: "offline, 100 events, 3 s, online", slow: true },
  flaky: { what: "503 to a seeded 30 % of requests, 300 events over 3 s", faults: { failRatio: 0.3 }, slow: true },
  "ack-lost": { what: "a seeded 30 % of requests stored, then the connection broken unanswered; 100 events over 3 s", faults: { ackLostRatio: 0.3 }, slow: true },
  "down-reload": { what: "collector down, 100 events, page reloaded during the outage, collector back 2 s later", slow: true },
  "multi-tab": { what: "3 tabs × 100 events at once, the first closed after its last event" },
};
const SCENARIO_NAMES = arg("scenario", Object.keys(SCENARIOS).join(",")).split(",").filter((s) => SCENARIOS[s]);

let browser;
let collector;
const cleanup = [];
const watchdog = setTimeout(() => {
  console.error(`bench-peers: still running after ${BUDGET_MS / 60000} min; giving up`);
  for (const f of cleanup) try { f(); } catch {}
  process.exit(2);
}, BUDGET_MS);
watchdog.unref();

const r2 = (x) => Math.round(x * 100) / 100;
const median = (xs) => {
  const s = xs.filter((x) => typeof x === "number" && !Number.isNaN(x)).sort((a, b) => a - b);
  if (!s.length) return null;
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const log = (...a) => console.log(`[${new Date().toISOString().slice(11, 19)}]`, ...a);

function bounded(what, p, ms) {
  let timer;
  return Promise.race([
    p,
    new Promise((_, rej) => (timer = setTimeout(() => rej(new Error(`timed out after ${ms} ms: ${what}`)), ms))),
  ]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------------------------------------
// Targets: trueup through the relay, or a peer SDK through the collector. Same interface.

class TrueupTarget {
  name = "trueup";
  collectPath = "^/_r/q$";

  async begin(faults = {}) {
    this.proxy = null;
    if (faults.failRatio || faults.ackLostRatio) {
      // The same faults as the peers meet at the collector: a proxy in front of the relay.
      // The proxy forwards the Host header, so the relay's default site takes the proxy's
      // origin as its own (allow_same_origin); it listens on a port the system picks.
      this.relay = await Relay.start({ site: SITE });
      this.proxy = new FaultProxy({ port: 0, target: this.relay.port, faults });
      await this.proxy.start();
    } else {
      this.relay = await Relay.start({ site: SITE });
    }
    cleanup.push(() => this.relay?.proc?.kill("SIGKILL"));
    this.lastRequests = -1;
    this.lastActivity = Date.now();
  }

  async end() {
    await this.proxy?.stop();
    this.proxy = null;
    await this.relay?.dispose();
    this.relay = null;
  }

  get origin() {
    return this.proxy ? this.proxy.origin : this.relay.origin;
  }
  url(query = "") {
    return `${this.origin}/trueup/${query}`;
  }
  noagent() {
    return `${this.origin}/noagent/`;
  }

  async ready(page) {
    await page.waitForFunction(() => typeof window.trueup?.stats === "function", null, { timeout: 15000 });
    await bounded("flush", page.evaluate(() => window.trueup.flush()), 15000);
  }

  async metrics() {
    const text = await (await fetch(`http://127.0.0.1:${this.relay.adminPort}/metrics`)).text();
    const sum = (pred) => text.split("\n").filter((l) => pred(l)).reduce((a, l) => a + Number(l.split(" ").pop()), 0);
    return {
      collect_requests: sum((l) => l.startsWith("trueup_requests_total{") && l.includes('path="/_r/q"')),
      by_status: Object.fromEntries(text.split("\n").filter((l) => l.startsWith("trueup_requests_total{") && l.includes('path="/_r/q"'))
        .map((l) => [/status="(\d+)"/.exec(l)?.[1], Number(l.split(" ").pop())])),
      duplicate: sum((l) => l.startsWith("trueup_events_duplicate_total")),
      received: sum((l) => l.startsWith("trueup_events_received_total")),
      faults: sum((l) => l.startsWith("trueup_faults_injected_total")),
    };
  }

  /** The time of the last request to the collection endpoint seen (metrics polled). */
  async activity() {
    if (this.proxy) return this.proxy.lastCollectAt;
    try {
      if (this.relay.proc.exitCode === null) {
        const m = await this.metrics();
        if (m.collect_requests !== this.lastRequests) [this.lastRequests, this.lastActivity] = [m.collect_requests, Date.now()];
      }
    } catch {}
    return this.lastActivity;
  }

  async down() {
    await this.relay.stop(); // SIGTERM: graceful
  }
  /** Fault injection off from now on. */
  async healthy() {
    if (this.proxy) this.proxy.faults = new FaultBag({});
  }
  async up() {
    await this.relay.spawn(); // same config, data dir and port
    this.lastRequests = -1;
  }

  /** The page and the agent's files from disk (what a CDN or the app server would serve). */
  async fromDisk(context) {
    await serveFromDisk(context, this.relay, SITE);
  }

  async count(run, expected) {
    await this.relay.drained().catch(() => {});
    const want = typeof expected === "number" ? Array.from({ length: expected }, (_, i) => i) : expected;
    let rows = [];
    try {
      rows = this.relay.query(`SELECT props->>'i' AS i, count(*) AS n FROM events WHERE props->>'run' = '${run}' GROUP BY 1`);
    } catch {}
    const seen = new Map(rows.map((r) => [Number(r.i), r.n]));
    const wanted = new Set(want);
    const missing = want.filter((i) => !seen.has(i));
    let m = {};
    try {
      m = await this.metrics();
    } catch {}
    const stored = rows.reduce((a, r) => a + r.n, 0);
    // The warehouse stores an id once (so same-id resends never reach it): they are the events
    // the relay answered `duplicate`. Rows of one i under two ids would be new-id duplicates.
    const dupNewId = rows.filter((r) => r.n > 1).length;
    const dupSameId = m.duplicate ?? 0;
    return {
      delivered: want.length - missing.length,
      expected: want.length,
      missing,
      received: stored + dupSameId,
      dup: dupSameId + (stored - seen.size),
      dupSameId,
      dupNewId,
      stored_twice: stored - seen.size,
      extra: [...seen.keys()].filter((i) => !wanted.has(i)),
      relay: m,
      ...(this.proxy ? { requests: proxyRequests(this.proxy) } : {}),
    };
  }
}

function proxyRequests(proxy) {
  const by_status = {};
  for (const r of proxy.requests) {
    const k = r.fault === "ack_lost" ? "ack_lost" : String(r.status);
    by_status[k] = (by_status[k] || 0) + 1;
  }
  return { count: proxy.requests.length, by_status };
}

class PeerTarget {
  constructor(sdk) {
    this.name = sdk;
    this.collectPath = { posthog: "^/ph/", segment: "^/seg/v1/", rudderstack: "^/rs/v1/", snowplow: "^/sp/", "rudderstack-beacon": "^/rsb/" }[sdk];
  }
  async begin(faults = {}) {
    if (!collector.up) await collector.start();
    collector.reset();
    collector.setFaults({ seed: faults.seed ?? 1, failRatio: faults.failRatio ?? 0, ackLostRatio: faults.ackLostRatio ?? 0 });
  }
  async end() {
    collector.setFaults({});
    if (!collector.up) await collector.start();
  }
  get origin() {
    return collector.origin;
  }
  url(query = "") {
    return `${collector.origin}/${this.name}/${query}`;
  }
  noagent() {
    return `${collector.origin}/noagent/`;
  }
  async ready(page) {
    await page.waitForFunction(() => window.__sdk?.ready === true, null, { timeout: 15000 });
  }
  async activity() {
    return collector.lastCollectAt;
  }
  async down() {
    await collector.stop();
  }
  /** Fault injection off from now on. */
  async healthy() {
    collector.setFaults({});
  }
  async up() {
    await collector.start();
  }
  /** Pages, SDK bundles and vendor configs served without the collector (the CDN's job). */
  async fromDisk(context) {
    const origin = collector.origin;
    await context.route((u) => u.origin === origin && !collectionOf("POST", u.pathname), async (route) => {
      const a = collector.assetResponse(new URL(route.request().url()));
      if (!a) return route.fulfill({ status: 404, body: "not found" });
      await route.fulfill({ status: a.status, headers: a.headers, body: a.body });
    });
  }
  async count(run, expected) {
    const c = collector.count(run, expected);
    const mine = collector.requests.filter((r) => r.sdk === this.name);
    const by_status = {};
    for (const r of mine) {
      const k = r.fault === "ack_lost" ? "ack_lost" : String(r.status);
      by_status[k] = (by_status[k] || 0) + 1;
    }
    return { ...c, requests: { count: mine.length, by_status, bad_bodies: mine.filter((r) => r.status === 400).map((r) => r.error).slice(0, 3) } };
  }
}

// ---------------------------------------------------------------------------------------------
// Page helpers.

/** Tracks n events {run, i: from..} in the page, `gap` ms apart (0: all in one task). */
const trackN = (page, run, n, from = 0, gap = 0, name = "bench") =>
  page.evaluate(async ([run, n, from, gap, name]) => {
    let c = 0;
    for (let i = from; i < from + n; i++, c++) {
      window.__sdk.track(name, { run, i });
      if (gap) await new Promise((r) => setTimeout(r, gap));
    }
    return c;
  }, [run, n, from, gap, name]);

async function open(context, target, url = target.url()) {
  const page = await context.newPage();
  watch(page);
  await page.goto(url, { timeout: 15000 });
  await target.ready(page);
  return page;
}

async function closeTab(page) {
  const closed = page.waitForEvent("close", { timeout: 10000 });
  await page.close({ runBeforeUnload: true });
  await closed;
}

let pageIssues = [];
function watch(page) {
  page.on("pageerror", (e) => pageIssues.push(`pageerror: ${String(e).split("\n")[0]}`));
  page.on("console", (m) => m.type() === "error" && pageIssues.push(`console.error: ${m.text().slice(0, 200)}`));
}

/**
 * Waits for the run's events: until all arrived and no request came for `settle` ms, or no
 * request came for `quiet` ms, or `deadline` ms passed. Then the count.
 */
async function drain(target, run, expected, { deadline = 20000, settle = 3000, quiet = 8000 } = {}) {
  const start = Date.now();
  const n = typeof expected === "number" ? expected : expected.length;
  let waited = "deadline";
  for (;;) {
    await sleep(250);
    const now = Date.now();
    const last = Math.max(await target.activity(), start);
    let got = 0;
    try {
      got = (await target.count(run, expected)).delivered;
    } catch {}
    if (got === n && now - last >= settle) {
      waited = "all in, then quiet";
      break;
    }
    if (now - last >= quiet) {
      waited = "quiet";
      break;
    }
    if (now - start >= deadline) break;
  }
  const r = await target.count(run, expected);
  return { ...r, drain_ms: Date.now() - start, drain_end: waited };
}

/**
 * The end of every scenario: drain; then, if events are still missing, one more event (its own
 * run) in the page that is still open, with the collector's fault injection off, and up to 15 s
 * more, to tell events that wait for the next
 * track() call (still in a queue) from events that are gone ({after_one_more_event}).
 */
async function finish(t, page, run, expected, d, extra = {}) {
  const r = await drain(t, run, expected, d);
  if (r.delivered === r.expected) return { ...r, ...extra };
  try {
    await t.healthy();
    await trackN(page, `${run}-nudge`, 1, 0, 0, "bench_nudge");
    const again = await drain(t, run, expected, { deadline: 15000, settle: 2000, quiet: 8000 });
    return { ...r, ...extra, after_one_more_event: again.delivered, dup_after_one_more_event: again.dup };
  } catch (e) {
    return { ...r, ...extra, after_one_more_event: null, nudge_error: String(e.message || e).split("\n")[0] };
  }
}

// ---------------------------------------------------------------------------------------------
// Scenarios: (target, context, run, drainOpts) → count (+ details).

const scenarioFns = {
  async steady(t, context, run, d) {
    const page = await open(context, t);
    const n = await trackN(page, run, 200, 0, 10);
    return finish(t, page, run, n, d);
  },

  async trickle(t, context, run, d) {
    const page = await open(context, t);
    const n = await trackN(page, run, 200, 0, 100);
    return finish(t, page, run, n, d);
  },

  async "close-burst"(t, context, run, d) {
    const page = await open(context, t);
    const n = await trackN(page, run, 50);
    await closeTab(page);
    await sleep(1000);
    const before = await t.count(run, n);
    const again = await open(context, t);
    return finish(t, again, run, n, d, { before_reopen: before.delivered });
  },

  async "navigate-away"(t, context, run, d) {
    const page = await open(context, t);
    const n = await trackN(page, run, 20);
    await page.goto(t.noagent(), { timeout: 15000 });
    await sleep(3000);
    const before = await t.count(run, n);
    await page.goto(t.url(), { timeout: 15000 });
    await t.ready(page);
    return finish(t, page, run, n, d, { before_reopen: before.delivered });
  },

  async offline(t, context, run, d) {
    const page = await open(context, t);
    await context.setOffline(true);
    const n = await trackN(page, run, 100);
    await sleep(3000);
    const during = await t.count(run, n);
    await context.setOffline(false);
    return finish(t, page, run, n, d, { while_offline: during.delivered });
  },

  async flaky(t, context, run, d) {
    const page = await open(context, t);
    const n = await trackN(page, run, 300, 0, 10);
    return finish(t, page, run, n, d);
  },

  async "ack-lost"(t, context, run, d) {
    const page = await open(context, t);
    const n = await trackN(page, run, 100, 0, 30);
    return finish(t, page, run, n, d);
  },

  async "down-reload"(t, context, run, d) {
    const page = await open(context, t);
    await t.fromDisk(context);
    await t.down();
    const n = await trackN(page, run, 100);
    await sleep(500);
    let reloaded = "yes";
    try {
      await page.reload({ timeout: 15000 });
      await t.ready(page);
    } catch (e) {
      reloaded = `failed: ${String(e.message || e).split("\n")[0]}`;
    }
    await sleep(2000);
    const during = await t.count(run, n).catch(() => ({ delivered: 0 }));
    await t.up();
    return finish(t, page, run, n, d, { reloaded, during_outage: during.delivered });
  },

  async "multi-tab"(t, context, run, d) {
    const TABS = 3;
    const PER = 100;
    const pages = [];
    for (let k = 0; k < TABS; k++) pages.push(await open(context, t));
    const counts = await Promise.all(pages.map(async (page, k) => {
      const n = await trackN(page, run, PER, k * PER, 5);
      if (k === 0) await closeTab(page);
      return n;
    }));
    const expected = [];
    counts.forEach((n, k) => {
      for (let j = 0; j < n; j++) expected.push(k * PER + j);
    });
    return finish(t, pages[TABS - 1], run, expected, d);
  },
};

async function runScenario(target, name, k) {
  const sc = SCENARIOS[name];
  const faults = sc.faults ? { seed: 1000 + k, ...sc.faults } : {};
  const d = sc.slow ? { deadline: 30000, settle: 2000, quiet: 15000 } : { deadline: 20000, settle: 2000, quiet: 8000 };
  if (name === "ack-lost") d.settle = 8000; // retries of unanswered requests come seconds later
  await target.begin(faults);
  const context = await browser.newContext();
  pageIssues = [];
  const t0 = Date.now();
  const run = runId();
  try {
    const r = await bounded(`${target.name} ${name}`, scenarioFns[name](target, context, run, d), 90000);
    return { run, ...r, missing: r.missing.length, missing_first: r.missing.slice(0, 10), extra: r.extra?.length ?? 0,
      ms: Date.now() - t0, page_issues: [...new Set(pageIssues)].slice(0, 5) };
  } catch (e) {
    return { run, error: String(e.message || e).split("\n")[0], ms: Date.now() - t0, page_issues: [...new Set(pageIssues)].slice(0, 5) };
  } finally {
    await context.close().catch(() => {});
    await target.end().catch(() => {});
  }
}

function summarizeRuns(runs) {
  const ok = runs.filter((r) => !r.error);
  const pct = ok.map((r) => (100 * r.delivered) / r.expected);
  return {
    runs: runs.length,
    errors: runs.length - ok.length,
    delivered_pct: ok.length ? r2(median(pct)) : null,
    delivered_pct_min: ok.length ? r2(Math.min(...pct)) : null,
    delivered_pct_max: ok.length ? r2(Math.max(...pct)) : null,
    duplicates: median(ok.map((r) => r.dup)),
    duplicates_same_id: median(ok.map((r) => r.dupSameId)),
    duplicates_new_id: median(ok.map((r) => r.dupNewId)),
    after_one_more_event_pct: ok.some((r) => r.after_one_more_event != null)
      ? r2(median(ok.map((r) => (100 * (r.after_one_more_event ?? r.delivered)) / r.expected)))
      : null,
    requests: median(ok.map((r) => r.requests?.count ?? r.relay?.collect_requests)),
    faults: median(ok.map((r) => (r.requests ? (r.requests.by_status["503"] || 0) + (r.requests.by_status.ack_lost || 0) : r.relay?.faults))),
  };
}

// ---------------------------------------------------------------------------------------------
// Speed, time to first request, bytes.

async function isolatedPage(target) {
  const context = await browser.newContext();
  const page = await context.newPage();
  watch(page);
  const doc = target.url();
  const isDoc = (u) => u.href === doc;
  // COOP/COEP on the document, so performance.now() has 5 µs resolution instead of 100 µs.
  await context.route(isDoc, async (route) => {
    const r = await route.fetch();
    await route.fulfill({ response: r, headers: { ...r.headers(), "cross-origin-opener-policy": "same-origin", "cross-origin-embedder-policy": "require-corp" } });
  });
  await page.goto(doc, { timeout: 15000 });
  await context.unroute(isDoc);
  await target.ready(page);
  const cdp = await context.newCDPSession(page);
  await cdp.send("Performance.enable");
  return { context, page, cdp };
}

async function mainThreadMs(cdp) {
  const m = Object.fromEntries((await cdp.send("Performance.getMetrics")).metrics.map((x) => [x.name, x.value]));
  return m.TaskDuration * 1000;
}

function timedCalls(page, run, n, budgetMs) {
  return page.evaluate(async ({ run, n, batch, budgetMs }) => {
    const per = [];
    let inCalls = 0;
    const start = performance.now();
    let stopped = false;
    for (let b = 0; b < n; b += batch) {
      if (performance.now() - start > budgetMs) {
        stopped = true;
        break;
      }
      const tb = performance.now();
      for (let i = b; i < Math.min(n, b + batch); i++) {
        const t0 = performance.now();
        window.__sdk.track("bench", { run, i, plan: "pro", price: 49.5 });
        per.push(performance.now() - t0);
      }
      inCalls += performance.now() - tb;
      await new Promise((r) => setTimeout(r, 0));
    }
    return { per, in_calls_ms: inCalls, wall_ms: performance.now() - start, stopped, resolution_probe: crossOriginIsolated };
  }, { run, n, batch: BATCH, budgetMs });
}

function callStats(res, n) {
  const s = [...res.per].sort((a, b) => a - b);
  const q = (p) => s[Math.min(s.length - 1, Math.max(0, Math.ceil(p * s.length) - 1))] * 1000;
  const done = s.length;
  return {
    calls: done,
    of: n,
    median_us: r2(q(0.5)),
    p99_us: r2(q(0.99)),
    max_us: r2(s[s.length - 1] * 1000),
    mean_us: r2((res.in_calls_ms / done) * 1000),
    total_ms: r2(res.in_calls_ms),
    wall_ms: r2(res.wall_ms),
    stopped_at_budget: res.stopped,
    total_ms_extrapolated: res.stopped ? r2((res.in_calls_ms / done) * n) : null,
    cross_origin_isolated: res.resolution_probe,
  };
}

async function speed(target) {
  await target.begin({});
  const { context, page, cdp } = await isolatedPage(target);
  try {
    const run1 = runId();
    const run10 = runId();
    const mt0 = await mainThreadMs(cdp);
    const t0 = Date.now();
    const a = await bounded("1,000 calls", timedCalls(page, run1, 1000, SPEED_BUDGET_MS), SPEED_BUDGET_MS + 60000);
    const b = await bounded("10,000 calls", timedCalls(page, run10, 10000, SPEED_BUDGET_MS), SPEED_BUDGET_MS + 120000);
    const tracked = a.per.length + b.per.length;
    // Then until both runs are delivered (bounded): how long, and the main thread meanwhile.
    const end = Date.now() + 60000;
    let d1;
    let d10;
    let last = 0;
    let lastChange = Date.now();
    for (;;) {
      await sleep(500);
      d1 = await target.count(run1, a.per.length);
      d10 = await target.count(run10, b.per.length);
      const got = d1.delivered + d10.delivered;
      if (got !== last) [last, lastChange] = [got, Date.now()];
      if (got === tracked || Date.now() > end || Date.now() - lastChange > 15000) break;
    }
    const mt1 = await mainThreadMs(cdp);
    return {
      track_1000: callStats(a, 1000),
      track_10000: callStats(b, 10000),
      delivered_after: { delivered: d1.delivered + d10.delivered, of: tracked, duplicates: d1.dup + d10.dup,
        seconds_after_first_call: r2((lastChange - t0) / 1000) },
      main_thread_ms_first_call_to_delivered: r2(mt1 - mt0),
    };
  } finally {
    await context.close().catch(() => {});
    await target.end().catch(() => {});
  }
}

/** Navigation start → first request to the collection endpoint, one track() at page start. */
async function ttfr(target) {
  await target.begin({});
  const context = await browser.newContext();
  const page = await context.newPage();
  watch(page);
  const run = runId();
  if (collector) collector.assets = [];
  try {
    await page.goto(target.url(`?ttfr=${run}`), { waitUntil: "commit", timeout: 15000 });
    const t = await until("the first request to the collection endpoint", () => page.evaluate((re) => {
      const rx = new RegExp(re);
      const q = performance.getEntriesByType("resource").filter((e) => rx.test(new URL(e.name).pathname)).sort((a, b) => a.startTime - b.startTime)[0];
      return q ? { ms: r(q.startTime), initiator: q.initiatorType } : null;
      function r(x) { return Math.round(x * 10) / 10; }
    }, target.collectPath), 15000, 50);
    await page.waitForLoadState("load", { timeout: 15000 }).catch(() => {});
    const files = collector && target.name !== "trueup" ? collector.assets.map((a) => a.path) : null;
    return { ...t, files };
  } finally {
    await context.close().catch(() => {});
    await target.end().catch(() => {});
  }
}

function trueupBytes() {
  const m = JSON.parse(readFileSync(join(ROOT, "dist/manifest.json"), "utf8"));
  return [m.loader, m.glue, m.wasm].map((name) => {
    const buf = readFileSync(join(ROOT, "dist", name));
    return { name, raw: buf.length, gzip: gzipSync(buf, { level: 9 }).length };
  });
}

// ---------------------------------------------------------------------------------------------
// Output.

function versions() {
  const require = createRequire(import.meta.url);
  const v = (p) => {
    try {
      return require(`${p}/package.json`).version;
    } catch {
      return null;
    }
  };
  const out = {
    trueup: JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")).version,
    posthog: v("posthog-js"),
    segment: v("@segment/analytics-next"),
    rudderstack: JSON.parse(readFileSync(join(ROOT, "node_modules/@rudderstack/analytics-js/package.json"), "utf8")).version,
    snowplow: v("@snowplow/browser-tracker"),
  };
  out["rudderstack-beacon"] = out.rudderstack;
  return out;
}

const CONFIG = {
  trueup: "the agent's defaults (IndexedDB queue, 1 s flush, fetch keepalive, sendBeacon on pagehide), through the relay (fsync, dedupe by id) into its warehouse",
  posthog: "posthog-js from npm; persistence localStorage, request_batching on with flush_interval_ms 1000, disable_compression, client rate limit raised (10/s, burst 100 by default), opt_out_useragent_filter (headless UA), flags/remote config, autocapture, pageviews, recordings, surveys and external scripts off",
  segment: "@segment/analytics-next from npm, AnalyticsBrowser.load with cdnURL → the collector; standard delivery (its localStorage retry queue) with keepalive: true",
  rudderstack: "@rudderstack/analytics-js/lite from npm (XhrQueue built in, its localStorage queue), configUrl → the collector, batching on (flushInterval 1000, maxItems 100)",
  snowplow: "@snowplow/browser-tracker from npm; POST, bufferSize 1, localStorage event store, keepalive: true, encodeBase64 false, stateStorageStrategy localStorage",
  "rudderstack-beacon": "as rudderstack, in its beacon mode: useBeacon true (BeaconQueue: sendBeacon, a batch leaves its localStorage queue once the browser accepts the beacon), beaconQueueOptions maxItems 10, flushQueueInterval 1000",
};
const STUBS = {
  trueup: "nothing: the relay serves the page's agent and takes the events",
  posthog: "nothing fetched from PostHog: flags/remote config disabled (advanced_disable_flags), no external scripts",
  segment: "cdn.segment.com's settings for the write key (/v1/projects/<key>/settings): only the Segment.io destination, apiHost → the collector, no remote plugins, metrics sampleRate 0",
  rudderstack: "RudderStack's control plane (/sourceConfig): an enabled JS source with no destinations; the lite export instead of plugins from its CDN",
  snowplow: "nothing: the tracker takes a collector URL",
  "rudderstack-beacon": "as rudderstack",
};

function cell(s, sdk, scenario) {
  if (!s) return "—";
  const why = FAIRNESS[`${sdk}:${scenario}`];
  if (s.delivered_pct === null) return `error${why ? ` (${why})` : ""}`;
  const range = s.delivered_pct_min !== s.delivered_pct_max ? ` (${fmtPct(s.delivered_pct_min)}–${fmtPct(s.delivered_pct_max)})` : "";
  const dup = s.duplicates ? ` · ${s.duplicates} dup${s.duplicates_same_id ? ` (${s.duplicates_same_id === s.duplicates ? "all" : s.duplicates_same_id} same id)` : ""}` : " · 0 dup";
  const faults = SCENARIOS[scenario]?.faults ? ` · faults ${s.faults}/${s.requests} req.` : "";
  const nudged = s.after_one_more_event_pct != null ? ` (${fmtPct(s.after_one_more_event_pct)} % after one more event)` : "";
  return `${fmtPct(s.delivered_pct)} %${range}${nudged}${dup}${faults}${why ? ` — ${why}` : ""}`;
}
const fmtPct = (x) => (x === 100 || x === 0 ? String(x) : x.toFixed(x >= 10 ? 0 : 1));

// Cells where a peer cannot take part on equal terms, and why (filled in from what was measured).
const FAIRNESS = {};

function table(result) {
  const sdks = result.sdks;
  const head = `| | ${sdks.map((s) => `${s}${result.versions[s] ? ` ${result.versions[s]}` : ""}`).join(" | ")} |`;
  const sep = `|---|${sdks.map(() => "---").join("|")}|`;
  const rows = [];
  for (const sc of Object.keys(result.scenarios)) {
    rows.push(`| ${sc} | ${sdks.map((s) => cell(result.scenarios[sc][s]?.summary, s, sc)).join(" | ")} |`);
  }
  const kb = (b) => `${(b / 1000).toFixed(1)} KB`;
  if (Object.keys(result.bytes).length) {
    rows.push(`| bytes downloaded (gzip -9) | ${sdks.map((s) => (result.bytes[s] ? `${kb(result.bytes[s].gzip_total)} (${result.bytes[s].files.length} file${result.bytes[s].files.length > 1 ? "s" : ""})` : "—")).join(" | ")} |`);
  }
  const us = (x) => (x >= 1000 ? `${(x / 1000).toFixed(1)} ms` : `${x >= 100 ? Math.round(x) : x} µs`);
  const ms = (x) => (x >= 10000 ? `${(x / 1000).toFixed(1)} s` : `${Math.round(x)} ms`);
  if (Object.keys(result.speed).length) {
    for (const k of ["track_1000", "track_10000"]) {
      rows.push(`| track() × ${k === "track_1000" ? "1,000" : "10,000"}: median per call · total in the calls | ${sdks.map((s) => {
        const x = result.speed[s]?.[k];
        if (!x) return "—";
        const total = x.stopped_at_budget
          ? `${ms(x.total_ms_extrapolated)} est. (${x.calls.toLocaleString("en")} calls in the ${SPEED_BUDGET_MS / 1000} s budget)`
          : ms(x.total_ms);
        return `${us(x.median_us)} · ${total}`;
      }).join(" | ")} |`);
    }
    rows.push(`| main thread from the first of those calls until delivered (delivered, when) | ${sdks.map((s) => {
      const x = result.speed[s];
      return x ? `${ms(x.main_thread_ms_first_call_to_delivered)} (${x.delivered_after.delivered.toLocaleString("en")}/${x.delivered_after.of.toLocaleString("en")} after ${x.delivered_after.seconds_after_first_call} s)` : "—";
    }).join(" | ")} |`);
  }
  if (Object.keys(result.ttfr).length) {
    rows.push(`| time to first request (median) | ${sdks.map((s) => (result.ttfr[s]?.median_ms != null ? `${Math.round(result.ttfr[s].median_ms)} ms` : "—")).join(" | ")} |`);
  }
  return [head, sep, ...rows].join("\n");
}

function gitRev() {
  try {
    return execFileSync("git", ["rev-parse", "--short", "HEAD"], { cwd: ROOT, encoding: "utf8" }).trim();
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const started = Date.now();
  if (!existsSync(join(ROOT, "dist/manifest.json"))) throw new Error("dist/ is missing: run npm run build");
  const builds = await buildPeers();
  collector = new Collector({ builds });
  await collector.start();
  cleanup.push(() => collector.stop());
  browser = await launch();
  const targets = Object.fromEntries(SDKS.map((s) => [s, s === "trueup" ? new TrueupTarget() : new PeerTarget(s)]));
  log(`bench-peers: ${SDKS.join(", ")}; ${RUNS} run(s); Chromium ${browser.version()}`);

  const result = {
    when: new Date().toISOString(),
    git: gitRev(),
    command: `npm run bench:peers${argv.length ? ` -- ${argv.join(" ")}` : ""}`,
    machine: { cpus: cpus().length, cpu: cpus()[0]?.model, node: process.version, chromium: browser.version() },
    sdks: SDKS,
    versions: versions(),
    config: Object.fromEntries(SDKS.map((s) => [s, CONFIG[s]])),
    stubbed: Object.fromEntries(SDKS.map((s) => [s, STUBS[s]])),
    options: { runs: RUNS, speed_budget_s: SPEED_BUDGET_MS / 1000, batch: BATCH },
    scenario_definitions: Object.fromEntries(SCENARIO_NAMES.map((s) => [s, SCENARIOS[s].what])),
    bytes: {},
    speed: {},
    ttfr: {},
    scenarios: {},
    fairness: FAIRNESS,
  };

  // Bytes and time to first request.
  for (const s of SDKS) {
    const runs = [];
    for (let k = 0; k < RUNS; k++) {
      try {
        runs.push(await ttfr(targets[s]));
      } catch (e) {
        runs.push({ error: String(e.message || e).split("\n")[0] });
      }
    }
    result.ttfr[s] = { median_ms: median(runs.map((r) => r.ms)), runs };
    let files;
    if (s === "trueup") files = trueupBytes();
    else {
      const loaded = new Set(runs.find((r) => r.files)?.files || []);
      files = builds[s].files.filter((f) => loaded.has(f.name));
      const unloaded = builds[s].files.filter((f) => !loaded.has(f.name));
      result.bytes[s] = { unloaded_chunks: unloaded.length, unloaded_gzip: unloaded.reduce((a, f) => a + f.gzip, 0) };
    }
    result.bytes[s] = { ...result.bytes[s], files, gzip_total: files.reduce((a, f) => a + f.gzip, 0), raw_total: files.reduce((a, f) => a + f.raw, 0) };
    log(`${s}: ${(result.bytes[s].gzip_total / 1000).toFixed(1)} KB gzip -9 in ${files.length} file(s); first request ${result.ttfr[s].median_ms} ms (${runs.map((r) => r.ms ?? r.error).join(", ")})`);
  }

  if (SPEED) {
    for (const s of SDKS) {
      try {
        result.speed[s] = await speed(targets[s]);
        const x = result.speed[s];
        log(`${s}: track() x1000 median ${x.track_1000.median_us} µs total ${x.track_1000.total_ms} ms; x10000 median ${x.track_10000.median_us} µs total ${x.track_10000.total_ms} ms (${x.track_10000.calls} calls${x.track_10000.stopped_at_budget ? ", budget reached" : ""}); delivered ${x.delivered_after.delivered}/${x.delivered_after.of} after ${x.delivered_after.seconds_after_first_call} s; main thread ${x.main_thread_ms_first_call_to_delivered} ms`);
      } catch (e) {
        result.speed[s] = { error: String(e.message || e).split("\n")[0] };
        log(`${s}: speed failed: ${result.speed[s].error}`);
      }
    }
  }

  if (DO_SCENARIOS) {
    for (const sc of SCENARIO_NAMES) {
      result.scenarios[sc] = {};
      for (const s of SDKS) {
        const runs = [];
        for (let k = 0; k < RUNS; k++) {
          const r = await runScenario(targets[s], sc, k);
          runs.push(r);
          log(`${sc} ${s} #${k + 1}: ${r.error ? `ERROR ${r.error}` : `delivered ${r.delivered}/${r.expected} dup ${r.dup} (same id ${r.dupSameId}, new id ${r.dupNewId})` +
            `${r.before_reopen !== undefined ? ` before reopening ${r.before_reopen}` : ""}${r.after_one_more_event !== undefined ? ` after one more event ${r.after_one_more_event}` : ""}${r.during_outage !== undefined ? ` during outage ${r.during_outage}, reload ${r.reloaded}` : ""}` +
            `${r.requests ? ` requests ${JSON.stringify(r.requests.by_status)}` : r.relay ? ` requests ${JSON.stringify(r.relay.by_status)}` : ""}; ${r.drain_end} after ${r.drain_ms} ms`}` +
            `${r.page_issues?.length ? `; page: ${r.page_issues.join(" | ").slice(0, 300)}` : ""}`);
        }
        result.scenarios[sc][s] = { summary: summarizeRuns(runs), runs };
      }
    }
  }

  result.duration_s = Math.round((Date.now() - started) / 1000);
  result.table = table(result);
  mkdirSync(join(ROOT, "e2e/results"), { recursive: true });
  writeFileSync(OUT, JSON.stringify(result, null, 2) + "\n");
  console.log(`\n${result.table}\n\nwritten: ${OUT.startsWith(ROOT) ? OUT.slice(ROOT.length + 1) : OUT} (run took ${Math.round(result.duration_s / 60)} min)`);
}

try {
  await main();
} catch (e) {
  console.error(`bench-peers: ${(e && e.stack) || e}`);
  process.exitCode = 1;
} finally {
  await bounded("closing the browser", browser?.close() ?? Promise.resolve(), 10000).catch(() => {});
  await collector?.stop().catch(() => {});
  clearTimeout(watchdog);
}
