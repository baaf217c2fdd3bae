// Delivery, measured (issue 4): the agent in headless Chromium through the real relay, under the
// ways pages and relays go away in practice. Each scenario starts a fresh relay (fresh data dir,
// embedded warehouse) and a fresh browser context, counts what lands in the warehouse by
// `(run, i)`, checks the sending page's counters, and prints one line:
//
//   scenario <name>: delivered X/N duplicates D counters <ok|FAIL: detail> [extra]
//
// where "counters ok" means `await trueup.stats()` satisfies enqueued = acked + dropped + pending
// at every read, and once settled pending = 0, acked + dropped = enqueued, and enqueued is the
// number of events tracked in that browser context (each context is its own device).
// Targets: every event delivered, none stored twice, every run. Every wait is bounded.
//
// Scenarios: steady (200 events over 2 s); close-burst (50 events, the tab closes at once, the
// site is opened again); navigate-away (20 events, the tab goes at once to a page without the
// agent: the beacon must carry them); relay-down (100 events while the relay is stopped, the page
// reloads during the outage, its page and the agent's files served from disk, then the relay
// comes back); relay-killed
// (kill -9 ~100 ms after the stream's first request, restart 500 ms later); multi-tab (5 tabs ×
// 2,000 events; the sending tab and one other closed after a random number of batches; POSTs
// per tab reported); counters-vs-relay (the relay's agent_counters row for the device agrees
// with the agent's). Run: node --test e2e/delivery.test.mjs (needs dist/ and the relay binary).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { Relay, launch, runId, until, sleep, ROOT, ready, stats, droppedSum, trackN, serveFromDisk } from "./harness.mjs";

const SITES = join(ROOT, "e2e/sites");
let browser;

before(async () => {
  browser = await launch();
});

after(async () => {
  await browser?.close();
});

/** A fresh relay and browser context for one scenario, always cleaned up. */
async function withRelay(fn) {
  const relay = await Relay.start({ site: SITES });
  const context = await browser.newContext();
  try {
    return await fn(relay, context);
  } catch (e) {
    if (relay.log) console.log(`relay log:\n${relay.log.slice(-4000)}`);
    throw e;
  } finally {
    await context.close().catch(() => {});
    await relay.dispose();
  }
}

async function openSite(context, relay, path = "/plain/") {
  const page = await context.newPage();
  await page.goto(`${relay.origin}${path}`);
  await ready(page);
  return page;
}

const trackBurst = (page, run, n, from = 0, name = "delivery") => trackN(page, run, n, from, name);

const isCollect = (r) => r.method() === "POST" && new URL(r.url()).pathname === "/_r/q";

/**
 * What of run `run` is in the warehouse: `expected` is a count (i = 0..n-1) or a list of i.
 * {delivered, expected, missing, dup, extra}: dup = values of i stored more than once,
 * extra = values of i that were never tracked (or not counted as tracked).
 */
function countOf(relay, run, expected) {
  const want = typeof expected === "number" ? Array.from({ length: expected }, (_, i) => i) : expected;
  const rows = relay.query(
    `SELECT props->>'i' AS i, count(*) AS n FROM events WHERE props->>'run' = '${run}' GROUP BY 1`,
  );
  const seen = new Map(rows.map((r) => [Number(r.i), r.n]));
  const wanted = new Set(want);
  const missing = want.filter((i) => !seen.has(i));
  return {
    delivered: want.length - missing.length,
    expected: want.length,
    missing,
    dup: rows.filter((r) => r.n > 1).length,
    extra: rows.map((r) => Number(r.i)).filter((i) => !wanted.has(i)),
  };
}

/**
 * Waits (bounded, never throws) until every expected event is in the warehouse, or `ms` pass, or
 * nothing new has arrived for `stallMs` (so a scenario that loses events fails in seconds, not
 * at its full timeout); then the count.
 */
async function arrive(relay, run, expected, ms = 20000, stallMs = 10000) {
  const n = typeof expected === "number" ? expected : expected.length;
  const start = Date.now();
  let last = -1;
  let since = start;
  for (;;) {
    let got = -1;
    try {
      got = countOf(relay, run, expected).delivered;
    } catch {
      // the warehouse file not there yet, or busy
    }
    if (got === n) break;
    if (got !== last) [last, since] = [got, Date.now()];
    if (Date.now() - start > ms || Date.now() - since > stallMs) break;
    await sleep(100);
  }
  // Whatever is still spooled lands first, so a late duplicate would show.
  await until("the spool to drain", async () => (await relay.metric("trueup_spool_depth")) === 0, 10000)
    .catch(() => {});
  return countOf(relay, run, expected);
}

const statsText = (s) =>
  s ? `enqueued ${s.enqueued} acked ${s.acked} dropped ${droppedSum(s)} pending ${s.pending} sent ${s.sent} retried ${s.retried}` : "no stats";

/**
 * The sending page's counters: the identity at every read, then (bounded) pending = 0,
 * acked + dropped = enqueued, and enqueued = `tracked` (the events tracked on this device).
 * (Until a page's core has opened IndexedDB, stats() reports only that page's own unsaved
 * events, so a page just opened reads zeros at first: wait for enqueued to reach `tracked`.)
 */
async function counters(page, tracked, ms = 15000) {
  const problems = [];
  let s;
  try {
    await until("the counters to settle", async () => {
      s = await stats(page);
      if (s.enqueued !== s.acked + droppedSum(s) + s.pending && !problems.length) {
        problems.push(`enqueued != acked + dropped + pending (${JSON.stringify(s)})`);
      }
      return s.pending === 0 && s.enqueued >= tracked;
    }, ms, 100);
  } catch {
    if (s?.pending !== 0) problems.push(`pending ${s?.pending} after ${ms} ms`);
  }
  if (s && s.pending === 0 && s.acked + droppedSum(s) !== s.enqueued) {
    problems.push(`acked ${s.acked} + dropped ${droppedSum(s)} != enqueued ${s.enqueued}`);
  }
  if (s && s.enqueued !== tracked) problems.push(`enqueued ${s.enqueued} but ${tracked} events were tracked`);
  return { ok: !problems.length, line: problems.length ? `FAIL: ${problems.join("; ")}` : "ok", stats: s };
}

/** Closes a page the way a user closes a tab, and waits (bounded) until it is gone. */
async function closeTab(page) {
  const closed = page.waitForEvent("close", { timeout: 10000 });
  await page.close({ runBeforeUnload: true });
  await closed;
}

/** The relay's agent_counters row for a device, in short. */
function relayRow(relay, device) {
  const row = relay.query(`SELECT * FROM agent_counters WHERE device_id = '${device}'`)[0];
  return row ? `enqueued ${row.enqueued} acked ${row.acked} pending ${row.pending} dropped ${row.dropped}` : "none";
}

function report(name, r, c, extra = "") {
  console.log(
    `scenario ${name}: delivered ${r.delivered}/${r.expected} duplicates ${r.dup} counters ${c.line}` +
      (extra ? ` [${extra}]` : ""),
  );
}

function verdict(name, r, c) {
  assert.deepEqual(r.missing.slice(0, 20), [], `${name}: ${r.missing.length} events missing`);
  assert.equal(r.dup, 0, `${name}: events stored twice`);
  assert.deepEqual(r.extra, [], `${name}: events that were not tracked`);
  assert.ok(c.ok, `${name}: counters ${c.line}`);
}

test("steady: 200 events over 2 s, the page stays open", () =>
  withRelay(async (relay, context) => {
    const page = await openSite(context, relay);
    const run = runId();
    const n = await page.evaluate(async (run) => {
      let c = 0;
      for (let i = 0; i < 200; i++, c++) {
        window.trueup.track("steady", { run, i });
        await new Promise((r) => setTimeout(r, 10));
      }
      return c;
    }, run);
    const r = await arrive(relay, run, n);
    const c = await counters(page, n);
    report("steady", r, c, statsText(c.stats));
    verdict("steady", r, c);
  }));

test("close-burst: 50 events, the tab closes at once, the site opens again", () =>
  withRelay(async (relay, context) => {
    const page = await openSite(context, relay);
    const device = (await stats(page)).device_id;
    const run = runId();
    const n = await trackBurst(page, run, 50, 0, "close_burst");
    await closeTab(page);
    // What the closing tab's beacon delivered (a moment for it to land; the queue covers the rest).
    const first = await arrive(relay, run, n, 3000);
    const rowAfterBeacon = relayRow(relay, device);
    const again = await openSite(context, relay);
    const r = await arrive(relay, run, n);
    const c = await counters(again, n);
    report(
      "close-burst",
      r,
      c,
      `before reopening ${first.delivered}/${n}; relay's counters row then: ${rowAfterBeacon}; ${statsText(c.stats)}`,
    );
    verdict("close-burst", r, c);
  }));

test("navigate-away: 20 events, the tab goes at once to a page without the agent", () =>
  withRelay(async (relay, context) => {
    const page = await openSite(context, relay);
    const run = runId();
    const n = await trackBurst(page, run, 20, 0, "navigate_away");
    await page.goto(`${relay.origin}/noagent/`);
    // The beacon (pagehide) is the only way out now: nothing of the site's runs any more.
    const beaconed = await arrive(relay, run, n, 5000);
    // Then the site again, in the same tab: its sender settles the queue (and would send what
    // the beacon did not).
    await page.goto(`${relay.origin}/plain/`);
    await ready(page);
    const r = await arrive(relay, run, n);
    const c = await counters(page, n);
    report("navigate-away", r, c, `before reopening (by beacon) ${beaconed.delivered}/${n}; ${statsText(c.stats)}`);
    verdict("navigate-away", r, c);
    assert.equal(beaconed.delivered, n, "navigate-away: all events by beacon, before the site is opened again");
  }));

test("relay-down: 100 events while the relay is stopped, the page reloads during the outage, then the relay comes back", () =>
  withRelay(async (relay, context) => {
    const page = await openSite(context, relay);
    // From now on the page and the agent's files come from disk (as from a CDN or the app's
    // server), so the reload below succeeds while the collection path is down.
    await serveFromDisk(context, relay, SITES);
    await relay.stop(); // SIGTERM: graceful
    const run = runId();
    const n = await trackBurst(page, run, 100, 0, "relay_down");
    // The page reloads while the relay is down: its beacon cannot land, and the reloaded page
    // finds the events in the IndexedDB queue (and the localStorage rescue), and retries.
    assert.notEqual(relay.proc.exitCode, null, "the relay is down for the reload");
    const reloaded = await page.reload({ timeout: 15000 });
    assert.equal(reloaded?.status(), 200, "the page reloaded during the outage");
    await ready(page);
    await sleep(1000);
    const during = countOf(relay, run, n);
    await relay.spawn(); // same config, same data dir, same port
    const r = await arrive(relay, run, n, 30000, 15000);
    const c = await counters(page, n);
    report("relay-down", r, c, `page reloaded during the outage; delivered during the outage ${during.delivered}; ${statsText(c.stats)}`);
    verdict("relay-down", r, c);
    assert.equal(during.delivered, 0, "nothing can arrive while the relay is down");
  }));

test("relay-killed: kill -9 mid-stream, restarted 500 ms later", () =>
  withRelay(async (relay, context) => {
    const page = await openSite(context, relay);
    const posts = { sent: 0, failed: 0 };
    page.on("request", (r) => isCollect(r) && posts.sent++);
    page.on("requestfailed", (r) => isCollect(r) && posts.failed++);
    const run = runId();
    const t0 = Date.now();
    const tracking = page.evaluate(async (run) => {
      let c = 0;
      for (let i = 0; i < 300; i++, c++) {
        window.trueup.track("relay_killed", { run, i });
        await new Promise((r) => setTimeout(r, 5));
      }
      return c;
    }, run);
    // The agent's first send can come up to a flush interval (1 s) after the first event: so
    // that the kill lands mid-stream (requests in flight, answers lost after storing), it comes
    // ~100 ms after the stream's first request rather than 100 ms after its first event.
    await until("the stream's first request", () => posts.sent > 0, 10000);
    await sleep(100);
    const killedAt = Date.now() - t0;
    const sentBeforeKill = posts.sent;
    await relay.stop("SIGKILL");
    await sleep(500);
    await relay.spawn();
    const n = await tracking;
    const trackedUntil = Date.now() - t0;
    const r = await arrive(relay, run, n, 30000, 15000);
    const c = await counters(page, n);
    report(
      "relay-killed",
      r,
      c,
      `killed at ${killedAt} ms (tracking ended at ${trackedUntil} ms) after ${sentBeforeKill} requests; POSTs ${posts.sent} failed ${posts.failed}; ${statsText(c.stats)}`,
    );
    verdict("relay-killed", r, c);
  }));

test("multi-tab: 5 tabs × 2,000 events, 2 closed at random moments, the others drain", () =>
  withRelay(async (relay, context) => {
    const TABS = 5;
    const PER_TAB = 2000;
    const BATCH = 100;
    const BATCHES = PER_TAB / BATCH;
    const pages = [];
    const posts = Array.from({ length: TABS }, () => ({ fetch: 0, other: 0 }));
    const inflight = new Array(TABS).fill(0);
    let overlaps = 0;
    for (let t = 0; t < TABS; t++) {
      const page = await context.newPage();
      page.on("request", (r) => {
        if (!isCollect(r)) return;
        if (r.resourceType() !== "fetch") return void posts[t].other++;
        posts[t].fetch++;
        if (inflight.some((k, u) => u !== t && k > 0)) overlaps++;
        inflight[t]++;
      });
      const done = (r) => isCollect(r) && r.resourceType() === "fetch" && (inflight[t] = Math.max(0, inflight[t] - 1));
      page.on("requestfinished", done);
      page.on("requestfailed", done);
      await page.goto(`${relay.origin}/plain/`);
      await ready(page);
      pages.push(page);
    }
    // Which tab sends (holds the Web Lock): one event, and the tab that POSTs it.
    const warm = runId();
    await trackBurst(pages[TABS - 1], warm, 1, 0, "multi_tab_warmup");
    await arrive(relay, warm, 1);
    const sender = posts.findIndex((p) => p.fetch > 0);
    // Two tabs closed, each after a random number of batches (1..19), between two evaluate
    // calls, so every event counted as tracked had its track() return: the sending tab (so
    // that another must take over) and one other at random.
    const others = [...Array(TABS).keys()].filter((t) => t !== sender);
    const victims = sender < 0 ? others.slice(0, 2) : [sender, others[Math.floor(Math.random() * others.length)]];
    const closeAfter = new Map(victims.map((t) => [t, 1 + Math.floor(Math.random() * (BATCHES - 1))]));
    const run = runId();
    const tracked = new Array(TABS).fill(0);
    const expected = [];
    const t0 = Date.now();
    await Promise.all(
      pages.map(async (page, t) => {
        for (let b = 0; b < BATCHES; b++) {
          if (closeAfter.get(t) === b) {
            await closeTab(page);
            inflight[t] = 0;
            return;
          }
          const from = t * PER_TAB + b * BATCH;
          const n = await page.evaluate(async ([run, from, n]) => {
            let c = 0;
            for (let i = from; i < from + n; i++, c++) window.trueup.track("multi_tab", { run, i });
            await new Promise((r) => setTimeout(r, 0)); // yield to the page between batches
            return c;
          }, [run, from, BATCH]);
          for (let k = 0; k < n; k++) expected.push(from + k);
          tracked[t] += n;
        }
      }),
    );
    const trackMs = Date.now() - t0;
    const r = await arrive(relay, run, expected, 60000);
    const drainMs = Date.now() - t0 - trackMs;
    const open = pages.filter((_, t) => !closeAfter.has(t));
    const c = await counters(open[0], expected.length + 1); // and the warm-up event
    const closed = [...closeAfter].map(([t, b]) => `tab ${t}${t === sender ? " (the sender)" : ""} after ${b * BATCH}`).join(", ");
    const lostByTab = new Array(TABS).fill(0);
    for (const i of r.missing) lostByTab[Math.floor(i / PER_TAB)]++;
    const perTab = posts.map((p, t) => `${t}:${p.fetch}${p.other ? `+${p.other} beacon` : ""}`).join(" ");
    report(
      "multi-tab",
      r,
      c,
      `closed ${closed}; tracked ${tracked.join("/")}; missing by tab ${lostByTab.join("/")}; POSTs per tab ${perTab}; concurrent sends across tabs ${overlaps}; tracking ${trackMs} ms, drain ${drainMs} ms; ${statsText(c.stats)}`,
    );
    verdict("multi-tab", r, c);
    assert.equal(r.delivered, tracked.reduce((a, b) => a + b, 0));
  }));

test("counters-vs-relay: the relay's agent_counters row for the device agrees with the agent", () =>
  withRelay(async (relay, context) => {
    const page = await openSite(context, relay);
    const run = runId();
    const n = await trackBurst(page, run, 50, 0, "counters");
    await page.evaluate(() => window.trueup.flush());
    const r = await arrive(relay, run, n);
    const settled = await counters(page, n);
    // Counters travel with batches and are read before the batch is sent, so the relay's row
    // trails by that batch; a flush of an empty queue sends nothing. So: one probe event, one
    // batch; the relay's row must then read as the agent did just before it (the probe enqueued
    // and pending), and the agent's as after (the probe acked).
    await page.evaluate((run) => window.trueup.track("counters_probe", { run: `${run}-probe`, i: 0 }), run);
    await page.evaluate(() => window.trueup.flush());
    await until("the probe in the warehouse", () => countOf(relay, `${run}-probe`, 1).delivered === 1, 15000);
    const c = await counters(page, n + 1);
    const s = c.stats;
    const rows = relay.query(`SELECT * FROM agent_counters WHERE device_id = '${s.device_id}'`);
    const problems = [];
    if (!settled.ok) problems.push(`before the probe: ${settled.line}`);
    if (!c.ok) problems.push(c.line);
    const row = rows[0];
    if (!row) problems.push(`no agent_counters row for device ${s.device_id}`);
    else {
      const rowDropped = droppedSum({ dropped: JSON.parse(row.dropped) });
      if (row.enqueued !== row.acked + rowDropped + row.pending) {
        problems.push(`relay row: enqueued ${row.enqueued} != acked ${row.acked} + dropped ${rowDropped} + pending ${row.pending}`);
      }
      const want = { enqueued: s.enqueued, acked: s.acked - 1, pending: 1, dropped: droppedSum(s) };
      const got = { enqueued: row.enqueued, acked: row.acked, pending: row.pending, dropped: rowDropped };
      if (JSON.stringify(want) !== JSON.stringify(got)) {
        problems.push(`relay row ${JSON.stringify(got)} != agent before the probe's answer ${JSON.stringify(want)}`);
      }
    }
    const line = { ok: !problems.length, line: problems.length ? `FAIL: ${problems.join("; ")}` : "ok" };
    report(
      "counters-vs-relay",
      r,
      line,
      `agent ${statsText(s)}; relay row ${row ? `enqueued ${row.enqueued} acked ${row.acked} dropped ${row.dropped} pending ${row.pending} sent ${row.sent} retried ${row.retried}` : "none"}`,
    );
    verdict("counters-vs-relay", r, line);
  }));
