// The agent in headless Chromium through the real relay: a tab closed right after tracking
// loses nothing and doubles nothing once the site is opened again; calls queued by the page
// snippet before the loader arrives are replayed in order, exactly once, with their call-time
// context. Run: npm run e2e (builds nothing; needs dist/ and the relay binary).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Relay, launch, delivery, runId, until, sleep } from "./harness.mjs";

let relay;
let browser;

before(async () => {
  relay = await Relay.start();
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await relay?.dispose();
});

const report = (name, r) =>
  console.log(`${name}: delivered ${r.delivered}/${r.expected} duplicates ${r.dup} missing ${r.missing.length}`);

test("close-tab: 50 events, the tab closes at once, the site is opened again: all arrive exactly once", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(`${relay.origin}/`);
  await page.waitForFunction(() => typeof window.trueup?.stats === "function");
  const run = runId();
  await page.evaluate((run) => {
    for (let i = 0; i < 50; i++) window.trueup.track("close_burst", { run, i });
  }, run);
  await page.close({ runBeforeUnload: true });
  // What the closing tab's beacon delivered (given a moment to arrive; not asserted: a browser
  // may refuse a beacon, and the queue covers it).
  await until("the beacon", async () => (await relay.drained(), delivery(relay, run, 50).delivered === 50), 2000).catch(() => {});
  const first = delivery(relay, run, 50);
  console.log(`close-tab, before reopening (by the beacon): ${first.delivered}/50`);

  const again = await context.newPage();
  await again.goto(`${relay.origin}/`);
  await until("every event of the closed tab in the warehouse", async () => {
    await relay.drained();
    return delivery(relay, run, 50).delivered === 50;
  });
  const r = delivery(relay, run, 50);
  report("close-tab", { ...r, expected: 50 });
  assert.deepEqual(r.missing, []);
  assert.equal(r.dup, 0);
  const ids = relay.query(`SELECT count(*) AS n, count(DISTINCT id) AS d FROM events WHERE props->>'run' = '${run}'`)[0];
  assert.equal(ids.n, 50);
  assert.equal(ids.d, 50);
  // The agent's counters, as reported by the sending tab, satisfy the identity.
  const stats = await again.evaluate(() => window.trueup.stats());
  assert.equal(stats.enqueued, stats.acked + Object.values(stats.dropped).reduce((a, b) => a + b, 0) + stats.pending);
  await context.close();
});

test("snippet: calls made before the loader arrives are replayed in order, once, with call-time context", async () => {
  const context = await browser.newContext();
  // Hold the loader back so the page's calls queue in the snippet.
  await context.route("**/_r/a/loader.js", async (route) => {
    await sleep(800);
    await route.continue();
  });
  const page = await context.newPage();
  const run = runId();
  // (An async script delays `load`, so wait only for the DOM.)
  await page.goto(`${relay.origin}/?utm_source=e2e&utm_campaign=${run}`, { waitUntil: "domcontentloaded" });
  const before = await page.evaluate((run) => {
    const t0 = Date.now();
    window.trueup.track("early_a", { run, i: 0 });
    window.trueup.identify("user-" + run);
    window.trueup.track("early_b", { run, i: 1 });
    history.replaceState(null, "", "/moved");
    window.trueup.track("early_c", { run, i: 2 });
    return { t0, loaded: typeof window.trueup.stats === "function" };
  }, run);
  assert.equal(before.loaded, false, "the calls must happen before the loader ran");
  await page.waitForFunction(() => typeof window.trueup.stats === "function");
  await page.evaluate(() => window.trueup.flush());
  await until("the early events", async () => {
    await relay.drained();
    return delivery(relay, run, 3).delivered === 3;
  });
  const rows = relay.query(
    `SELECT name, user_id, seq, ts, context->>'url' AS url, context->'attribution'->'last'->>'utm_campaign' AS campaign
     FROM events WHERE props->>'run' = '${run}' ORDER BY seq`,
  );
  assert.deepEqual(rows.map((r) => r.name), ["early_a", "early_b", "early_c"]);
  assert.equal(rows[0].user_id, null, "identify came after the first track");
  assert.equal(rows[1].user_id, "user-" + run);
  assert.ok(rows[0].ts >= before.t0 && rows[0].ts < before.t0 + 500, "capture time is the call's, not the replay's");
  assert.match(rows[1].url, /utm_source=e2e/);
  assert.match(rows[2].url, /\/moved$/, "each call keeps its own URL");
  assert.equal(rows[0].campaign, run, "attribution from the landing URL");
  const identify = relay.query(`SELECT count(*) AS n FROM events WHERE name = 'identify' AND user_id = 'user-${run}'`)[0];
  assert.equal(identify.n, 1);
  await context.close();
});
