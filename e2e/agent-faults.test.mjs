// The agent under faults, in headless Chromium through the real relay: offline and back,
// a relay answering 503, a second tab taking over sending, consent withheld then given (nothing
// stored before, not even a database, and a bounded hold), no IndexedDB, and a CSP that blocks WebAssembly. Each ends with every event in the warehouse
// exactly once and the agent's counters satisfying enqueued = acked + dropped + pending.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { Relay, launch, delivery, runId, until, sleep, ROOT, ready, stats, trackN, allArrive, identity } from "./harness.mjs";

let relay;
let browser;

before(async () => {
  relay = await Relay.start({ site: join(ROOT, "e2e/sites") });
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await relay?.dispose();
});



test("offline: events wait while offline and go when back online", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(`${relay.origin}/plain/`);
  await ready(page);
  const run = runId();
  await context.setOffline(true);
  await trackN(page, run, 30);
  await sleep(2000);
  assert.equal(delivery(relay, run, 30).delivered, 0, "nothing can arrive while offline");
  await context.setOffline(false);
  const online = Date.now();
  try {
    await allArrive(relay, run, 30, "offline");
  } catch (e) {
    const s = await stats(page);
    console.log("offline diagnostics", JSON.stringify(s), "delivered", delivery(relay, run, 30).delivered, "ms since online", Date.now() - online);
    throw e;
  }
  await until("the counters to settle", async () => (await identity(page)).pending === 0);
  await context.close();
});

test("503: a relay refusing batches gets them again later, with the same ids", async () => {
  const context = await browser.newContext();
  let refused = 0;
  await context.route("**/_r/q", async (route) => {
    if (refused < 3) {
      refused++;
      await route.fulfill({ status: 503, headers: { "retry-after": "1" }, body: '{"error":"spool_full","message":"test"}' });
    } else {
      await route.continue();
    }
  });
  const page = await context.newPage();
  await page.goto(`${relay.origin}/plain/`);
  await ready(page);
  const run = runId();
  await trackN(page, run, 40);
  await allArrive(relay, run, 40, "503");
  assert.equal(refused, 3);
  const s = await until("the counters to settle", async () => {
    const s = await identity(page);
    return s.pending === 0 && s;
  });
  assert.ok(s.retried > 0, "the retries are counted");
  await context.close();
});

test("multi-tab: one tab sends; when it closes, another takes over", async () => {
  const context = await browser.newContext();
  // Each page counts its own collection POSTs (fetch and sendBeacon), in the page itself:
  // DevTools' request events can lag behind keepalive requests on a loaded machine.
  await context.addInitScript(() => {
    window.__posts = 0;
    const isCollect = (u) => String(u).endsWith("/_r/q");
    const f = window.fetch;
    window.fetch = function (u, o) {
      if (o && o.method === "POST" && isCollect(u)) window.__posts++;
      return f.apply(this, arguments);
    };
    const b = navigator.sendBeacon.bind(navigator);
    navigator.sendBeacon = (u, d) => {
      if (isCollect(u)) window.__posts++;
      return b(u, d);
    };
  });
  const posts = (page) => page.evaluate(() => window.__posts);
  const a = await context.newPage();
  await a.goto(`${relay.origin}/plain/`);
  await ready(a);
  // The only tab becomes the sender: wait until it has sent something.
  const warm = runId();
  await trackN(a, warm, 1);
  await allArrive(relay, warm, 1, "multi-tab (warm-up)");
  assert.ok((await posts(a)) > 0);
  const b = await context.newPage();
  await b.goto(`${relay.origin}/plain/`);
  await ready(b);
  const before = await posts(a);
  const run = runId();
  await trackN(b, run, 10, 0);
  await allArrive(relay, run, 10, "multi-tab (sent by the first tab)");
  assert.ok((await posts(a)) > before, "the first tab holds the send lock and sends the second tab's events");
  assert.equal(await posts(b), 0, "the second tab only writes to the shared queue");
  await a.close();
  await trackN(b, run, 10, 10);
  await allArrive(relay, run, 20, "multi-tab (after the sending tab closed)");
  assert.ok((await posts(b)) > 0, "the second tab took over");
  await context.close();
});

test("consent pending: nothing is stored or sent until consent(true)", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(`${relay.origin}/consent/`);
  await ready(page);
  const run = runId();
  await trackN(page, run, 5);
  await sleep(1500);
  assert.equal(delivery(relay, run, 5).delivered, 0);
  const before = await page.evaluate(async () => ({
    stats: await window.trueup.stats(),
    stored: Object.keys(localStorage).filter((k) => k.startsWith("trueup.")),
  }));
  assert.equal(before.stats.enqueued, 0, "nothing queued before consent");
  assert.deepEqual(before.stored, [], "nothing stored before consent");
  await page.evaluate(() => window.trueup.consent(true));
  await allArrive(relay, run, 5, "consent");
  await until("the counters to settle", async () => (await identity(page)).pending === 0);
  // Opt-out: the queue is cleared (and counted) and nothing more is sent.
  await context.setOffline(true);
  await trackN(page, run, 3, 5);
  await page.evaluate(() => window.trueup.consent(false));
  await context.setOffline(false);
  await sleep(1500);
  assert.equal(delivery(relay, run, 8).delivered, 5);
  const s = await identity(page);
  assert.equal(s.dropped.consent, 3);
  await context.close();
});

test("consent pending: not even a database before consent; the hold keeps the newest 1,000, the rest counted at consent(true)", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  let posted = 0;
  page.on("request", (r) => r.url().includes("/_r/q") && posted++);
  await page.goto(`${relay.origin}/consent/`);
  await ready(page);
  const run = runId();
  await trackN(page, run, 1200);
  await page.evaluate(() => window.trueup.flush());
  await sleep(1500);
  const before = await page.evaluate(async () => ({
    databases: (await indexedDB.databases()).map((d) => d.name),
    local: Object.keys(localStorage).filter((k) => k.startsWith("trueup")),
    session: Object.keys(sessionStorage).filter((k) => k.startsWith("trueup")),
    stats: await window.trueup.stats(),
  }));
  assert.deepEqual(before.databases, [], "no IndexedDB database before consent");
  assert.deepEqual(before.local, [], "nothing in localStorage before consent");
  assert.deepEqual(before.session, [], "nothing in sessionStorage before consent");
  assert.equal(posted, 0, "nothing sent before consent");
  assert.equal(before.stats.enqueued, 0, "nothing counted before consent");
  await page.evaluate(() => window.trueup.consent(true));
  // The oldest 200 were dropped by the hold (1,000 events at most): the newest 1,000 arrive.
  await until("the held events to arrive", async () => (await relay.drained(), delivery(relay, run, 1200).delivered === 1000), 30000, 200);
  const r = delivery(relay, run, 1200);
  assert.deepEqual(r.missing, [...Array(200).keys()], "the oldest went first");
  assert.equal(r.dup, 0);
  await until("the counters to settle", async () => (await identity(page)).pending === 0, 20000);
  const s = await identity(page);
  assert.equal(s.enqueued, 1200);
  assert.equal(s.acked, 1000);
  assert.deepEqual(s.dropped, { queue_full: 200 }, "what the hold dropped is counted once");
  await context.close();
});

test("no IndexedDB: a memory queue, flagged degraded, still delivers", async () => {
  const context = await browser.newContext();
  await context.addInitScript(() => {
    Object.defineProperty(window, "indexedDB", { get: () => undefined });
  });
  const page = await context.newPage();
  await page.goto(`${relay.origin}/plain/`);
  await ready(page);
  const run = runId();
  await trackN(page, run, 10);
  await allArrive(relay, run, 10, "no-indexeddb");
  const rows = relay.query(`SELECT DISTINCT context->>'degraded' AS d FROM events WHERE props->>'run' = '${run}'`);
  assert.deepEqual(rows, [{ d: "memory_queue" }]);
  const s = await until("the counters", async () => {
    const s = await identity(page);
    return s.pending === 0 && s;
  });
  assert.equal(s.degraded, "memory_queue");
  await context.close();
});

test("CSP without 'wasm-unsafe-eval': the stub delivers the events itself", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(`${relay.origin}/csp/`);
  const run = runId();
  await page.evaluate((run) => {
    for (let i = 0; i < 10; i++) window.trueup.track("fault_test", { run, i });
  }, run);
  await allArrive(relay, run, 10, "csp-no-wasm");
  const rows = relay.query(`SELECT DISTINCT context->>'degraded' AS d FROM events WHERE props->>'run' = '${run}'`);
  assert.deepEqual(rows, [{ d: "no_wasm" }]);
  await context.close();
});

test("ack lost and flaky relay: stored batches whose answer is lost are retried and stored once", async () => {
  const flaky = await Relay.start({
    site: join(ROOT, "e2e/sites"),
    toml: "[faults]\nseed = 42\nfail_ratio = 0.3\nack_lost_ratio = 0.3\n",
  });
  const context = await browser.newContext();
  try {
    const page = await context.newPage();
    await page.goto(`${flaky.origin}/plain/`);
    await ready(page);
    const run = runId();
    // One batch per round (flush), so the seeded faults hit a dozen requests.
    for (let round = 0; round < 12; round++) {
      await trackN(page, run, 10, round * 10);
      await page.evaluate(() => window.trueup.flush());
    }
    await until("all 120 events through the flaky relay", async () => {
      await flaky.drained();
      return delivery(flaky, run, 120).delivered === 120;
    }, 60000);
    const r = delivery(flaky, run, 120);
    const injected = await flaky.metric("trueup_faults_injected_total");
    const dups = await flaky.metric("trueup_events_duplicate_total");
    console.log(`ack-lost+flaky: delivered ${r.delivered}/120 duplicates stored ${r.dup} faults injected ${injected} retries answered duplicate ${dups}`);
    assert.deepEqual(r.missing, []);
    assert.equal(r.dup, 0);
    assert.ok(injected > 0, "faults were injected");
    const s = await until("the counters to settle", async () => {
      const s = await identity(page);
      return s.pending === 0 && s;
    }, 60000);
    assert.ok(s.retried > 0);
  } finally {
    await context.close();
    await flaky.dispose();
  }
});

test("413 splits the batch until it fits; another 4xx drops the events with a counted reason", async () => {
  const context = await browser.newContext();
  let refusedTooLarge = 0;
  let badRequest = false;
  await context.route("**/_r/q", async (route) => {
    const events = JSON.parse(route.request().postData() || "{}").events || [];
    if (badRequest) {
      await route.fulfill({ status: 400, body: '{"error":"malformed_batch","message":"test"}' });
    } else if (events.length > 5) {
      refusedTooLarge++;
      await route.fulfill({ status: 413, body: '{"error":"too_many_events","message":"test"}' });
    } else {
      await route.continue();
    }
  });
  const page = await context.newPage();
  await page.goto(`${relay.origin}/plain/`);
  await ready(page);
  const run = runId();
  await trackN(page, run, 30);
  await allArrive(relay, run, 30, "413-split");
  assert.ok(refusedTooLarge > 0, "the relay refused batches as too large");
  await until("the counters to settle", async () => (await identity(page)).pending === 0);
  badRequest = true;
  const lost = runId();
  await trackN(page, lost, 3);
  const s = await until("the 400 to be counted", async () => {
    const s = await identity(page);
    return s.dropped.rejected >= 3 && s;
  });
  assert.equal(s.pending, 0);
  assert.equal(delivery(relay, lost, 3).delivered, 0);
  await context.close();
});
