// When the wasm core cannot load, in headless Chromium through the real relay: a network failure
// (offline, a 503) is waited out and the core is loaded again, and sends; a CSP without
// 'wasm-unsafe-eval' hands over to the stub's fallback, which holds events while offline (in
// localStorage, for the next page too) and delivers them once back online. Each ends with every
// event in the warehouse exactly once and the counters satisfying
// enqueued = acked + dropped + pending. Every wait is bounded.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { Relay, launch, delivery, runId, until, sleep, ROOT, stats, trackN as trackAs } from "./harness.mjs";

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

const stub = (page) => page.waitForFunction(() => typeof window.trueup?.stats === "function");
const trackN = (page, run, n, from = 0) => trackAs(page, run, n, from, "fallback_test");
const isCore = (url) => new URL(url).pathname.startsWith("/_r/a/trueup_agent");

async function allArrive(run, n, what, page) {
  try {
    await until(`${what}: all ${n} events`, async () => {
      await relay.drained();
      return delivery(relay, run, n).delivered === n;
    }, 30000, 200);
  } catch (e) {
    console.log(`${what} diagnostics`, JSON.stringify(await stats(page).catch(() => null)));
    throw e;
  }
  await sleep(500); // a duplicate would come now
  await relay.drained();
  const r = delivery(relay, run, n);
  console.log(`${what}: delivered ${r.delivered}/${n} duplicates ${r.dup}`);
  assert.deepEqual(r.missing, []);
  assert.equal(r.dup, 0);
}

const degraded = (run) =>
  relay.query(`SELECT DISTINCT context->>'degraded' AS d FROM events WHERE props->>'run' = '${run}'`);

/** The counters once nothing is pending; checks enqueued = acked + dropped + pending. */
async function settled(page, what) {
  let last;
  try {
    return await until(`${what}: the counters to settle`, async () => {
      const s = (last = await stats(page));
      const dropped = Object.values(s.dropped || {}).reduce((a, b) => a + b, 0);
      assert.equal(s.enqueued, s.acked + dropped + s.pending, JSON.stringify(s));
      return s.pending === 0 && s;
    }, 20000, 200);
  } catch (e) {
    console.log(`${what}: last stats`, JSON.stringify(last));
    throw e;
  }
}

test("offline before the core loads: events wait in the stub, and the core sends them once back online", async () => {
  const context = await browser.newContext();
  let offline = true;
  let refused = 0;
  // The loader's import of the glue (and any retry) fails as it does offline.
  await context.route(isCore, (route) => (offline ? (refused++, route.abort("internetdisconnected")) : route.continue()));
  const page = await context.newPage();
  await page.goto(`${relay.origin}/plain/`, { waitUntil: "domcontentloaded" });
  await stub(page); // loader.js itself must get here
  await context.setOffline(true);
  const run = runId();
  await trackN(page, run, 30);
  await sleep(2500);
  const waiting = await stats(page);
  assert.ok(refused > 0, "the core was asked for while offline");
  assert.equal(waiting.buffered, 30, JSON.stringify(waiting));
  assert.equal(waiting.degraded, undefined, "not the fallback");
  assert.match(waiting.error, /fetch/i);
  assert.equal(delivery(relay, run, 30).delivered, 0, "nothing can arrive while offline");
  offline = false;
  await context.setOffline(false);
  await allArrive(run, 30, "offline-core", page);
  assert.deepEqual(degraded(run), [{ d: null }], "sent by the wasm core");
  const s = await settled(page, "offline-core");
  assert.equal(s.degraded, undefined);
  assert.equal(s.error, undefined);
  assert.equal(s.buffered, 0);
  assert.ok(s.acked >= 30);
  await context.close();
});

test("the wasm answered 503 twice: the core is loaded again after a backoff and sends", async () => {
  const context = await browser.newContext();
  let refused = 0;
  await context.route("**/_r/a/*.wasm", (route) =>
    refused < 2 ? (refused++, route.fulfill({ status: 503, body: "busy" })) : route.continue());
  const page = await context.newPage();
  await page.goto(`${relay.origin}/plain/`);
  await stub(page);
  const run = runId();
  await trackN(page, run, 10);
  await allArrive(run, 10, "wasm-503", page);
  assert.equal(refused, 2);
  assert.deepEqual(degraded(run), [{ d: null }], "sent by the wasm core");
  const s = await settled(page, "wasm-503");
  assert.equal(s.degraded, undefined);
  await context.close();
});

test("CSP without 'wasm-unsafe-eval', offline for a while: the fallback holds the events, then delivers them once", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(`${relay.origin}/csp/`);
  await stub(page);
  const s0 = await until("the fallback to take over", async () => {
    const s = await stats(page);
    return s.degraded === "no_wasm" && s;
  });
  assert.match(s0.error, /CompileError/);
  await context.setOffline(true);
  const run = runId();
  await trackN(page, run, 20);
  await sleep(3000);
  assert.equal(delivery(relay, run, 20).delivered, 0, "nothing can arrive while offline");
  const held = await page.evaluate(async () => ({
    stats: await window.trueup.stats(),
    queued: JSON.parse(localStorage.getItem("trueup:nowasm")).q.length,
  }));
  assert.equal(held.stats.pending, 20, JSON.stringify(held.stats));
  assert.equal(held.stats.sent, 0, "nothing was sent into the void");
  assert.equal(held.queued, 20, "kept in localStorage");
  await context.setOffline(false);
  await allArrive(run, 20, "csp-offline", page);
  assert.deepEqual(degraded(run), [{ d: "no_wasm" }]);
  const s = await settled(page, "csp-offline");
  assert.equal(s.acked, s.enqueued, JSON.stringify(s));
  assert.equal(s.acked, 20);
  assert.equal(s.degraded, "no_wasm");
  await context.close();
});

test("a fallback page closed offline: the next page of the site, running the core, delivers its events", async () => {
  const context = await browser.newContext();
  const csp = await context.newPage();
  await csp.goto(`${relay.origin}/csp/`);
  await stub(csp);
  await until("the fallback to take over", async () => (await stats(csp)).degraded === "no_wasm");
  await context.setOffline(true);
  const run = runId();
  await trackN(csp, run, 10);
  await sleep(500);
  await csp.close();
  await context.setOffline(false);
  const page = await context.newPage();
  await page.goto(`${relay.origin}/plain/`);
  await stub(page);
  await allArrive(run, 10, "left-behind", page);
  assert.deepEqual(degraded(run), [{ d: "no_wasm" }], "sent as the fallback's device");
  const left = await until("the left-behind queue to be answered", () => page.evaluate(() => {
    const s = JSON.parse(localStorage.getItem("trueup:nowasm"));
    return s.q.length === 0 && s;
  }));
  assert.equal(left.acked, 10);
  assert.equal((await stats(page)).degraded, undefined, "this page runs the core");
  await context.close();
});

// An opt-out is the device's, whichever mode took it: the fallback honours one the core stored,
// and the core one the fallback stored. Nothing is sent, nothing is queued.
for (const [first, then] of [["plain", "csp"], ["csp", "plain"]]) {
  test(`opted out on a page running the ${first == "plain" ? "core" : "fallback"}: the ${then == "plain" ? "core" : "fallback"} on the next page sends nothing`, async () => {
    const context = await browser.newContext();
    const posts = [];
    context.on("request", (r) => r.method() == "POST" && posts.push(r.url()));
    const a = await context.newPage();
    await a.goto(`${relay.origin}/${first}/`);
    await stub(a);
    if (first == "csp") await until("the fallback to take over", async () => (await stats(a)).degraded === "no_wasm");
    await a.evaluate(() => window.trueup.consent(false));
    await until("the opt-out to be stored", () => a.evaluate(() => localStorage.getItem("trueup.consent") === "denied"));
    await a.close();
    const page = await context.newPage();
    await page.goto(`${relay.origin}/${then}/`);
    await stub(page);
    if (then == "csp") await until("the fallback to take over", async () => (await stats(page)).degraded === "no_wasm");
    const run = runId();
    const before = posts.length;
    await trackN(page, run, 10);
    await sleep(2500);
    await relay.drained();
    assert.equal(delivery(relay, run, 10).delivered, 0, "an opted-out device sends no event");
    assert.deepEqual(posts.slice(before), [], "no request at all");
    const queued = await page.evaluate(() => JSON.parse(localStorage.getItem("trueup:nowasm") || "{}").q?.length ?? 0);
    assert.equal(queued, 0, "nothing queued for later");
    await context.close();
  });
}
