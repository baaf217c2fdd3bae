// The agent's corner cases, in headless Chromium through the real relay: the send lock handed on
// by a tab that stopped, events rescued before IndexedDB opened counted once, the byte cap
// enforced for other tabs' writes, non-ASCII events sized in bytes, IndexedDB cleared under a
// running page, beacons that do not repeat the batch in flight, and a tab waiting for consent
// that adopts nothing. Each checks the counters' identity enqueued = acked + dropped + pending.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { Relay, launch, runId, until, sleep, ROOT, ready, trackN, allArrive, identity } from "./harness.mjs";

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



const settled = (page) => until("the counters to settle", async () => {
  const s = await identity(page);
  return s.pending === 0 && s;
});

/** Serves `/robust/` in `context` as a page with the snippet and `trueup.init(options)`. */
async function withOptions(context, options) {
  await context.route("**/robust/**", (route) => route.fulfill({
    contentType: "text/html",
    body: `<!doctype html><title>robust</title><script>window.trueup=window.trueup||{q:[]};"init track page identify reset consent".split(" ").forEach(m=>trueup[m]=trueup[m]||((...a)=>trueup.q.push([m,a,Date.now(),location.href,document.referrer,document.title])));trueup.init(${JSON.stringify({ site: "demo", ...options })})</script><script async src="/_r/a/loader.js"></script>`,
  }));
  return `${relay.origin}/robust/`;
}

/** The page goes hidden and visible again (a tab switch): rescue and beacons run. */
const tabSwitch = (page) => page.evaluate(() => {
  const set = (v) => Object.defineProperty(document, "visibilityState", { configurable: true, get: () => v });
  set("hidden");
  document.dispatchEvent(new Event("visibilitychange"));
  set("visible");
  document.dispatchEvent(new Event("visibilitychange"));
});

test("a tab that stopped while waiting for the send lock hands it on", async () => {
  const context = await browser.newContext();
  const a = await context.newPage();
  await a.goto(`${relay.origin}/plain/`);
  await ready(a);
  const b = await context.newPage();
  await b.goto(`${relay.origin}/plain/`);
  await ready(b);
  // b waits for the lock, then stops; the sender goes away.
  await b.evaluate(() => window.trueup.shutdown());
  await a.close();
  const c = await context.newPage();
  await c.goto(`${relay.origin}/plain/`);
  await ready(c);
  const run = runId();
  await trackN(c, run, 3);
  await allArrive(relay, run, 3, "after a stopped tab");
  const held = await c.evaluate(async () => (await navigator.locks.query()).held.length);
  assert.equal(held, 1, "the third tab holds the lock");
  await settled(c);
  await context.close();
});

test("events rescued before IndexedDB opened are queued and counted once", async () => {
  const context = await browser.newContext();
  // Another page holds the database open at an older version: this page's open waits.
  const other = await context.newPage();
  await other.goto(`${relay.origin}/noagent/`);
  await other.evaluate(() => new Promise((ok) => {
    const r = indexedDB.open("trueup", 1);
    r.onsuccess = () => ((window.db = r.result), ok());
  }));
  const page = await context.newPage();
  await page.goto(`${relay.origin}/plain/`);
  await ready(page); // (the core is constructed; its queue is not open)
  const run = runId();
  await context.setOffline(true); // the beacons do not arrive: the queue must deliver
  await trackN(page, run, 3);
  await tabSwitch(page);
  assert.equal(await page.evaluate(() => Object.keys(localStorage).filter((k) => k.startsWith("trueup.rescue.")).length), 1);
  await other.evaluate(() => window.db.close());
  await context.setOffline(false);
  await page.evaluate(() => window.trueup.flush());
  await allArrive(relay, run, 3, "rescued early");
  const s = await settled(page);
  assert.equal(s.enqueued, 3, JSON.stringify(s));
  assert.equal(s.acked, 3, JSON.stringify(s));
  await context.close();
});

test("an open blocked for good: the memory queue takes over, with the events rescued meanwhile counted", async () => {
  const context = await browser.newContext();
  const other = await context.newPage();
  await other.goto(`${relay.origin}/noagent/`);
  await other.evaluate(() => new Promise((ok) => {
    const r = indexedDB.open("trueup", 1);
    r.onsuccess = () => ((window.db = r.result), ok());
  }));
  const page = await context.newPage();
  await page.goto(`${relay.origin}/plain/`);
  await ready(page);
  const run = runId();
  await context.setOffline(true);
  await trackN(page, run, 3);
  await tabSwitch(page);
  await context.setOffline(false);
  await allArrive(relay, run, 3, "blocked open");
  const s = await settled(page);
  assert.equal(s.degraded, "memory_queue");
  assert.equal(s.enqueued, 3, JSON.stringify(s));
  await context.close();
});

test("the byte cap holds for events other tabs wrote", async () => {
  const context = await browser.newContext();
  const url = await withOptions(context, { maxQueueBytes: 3000 });
  const a = await context.newPage();
  await a.goto(url);
  await ready(a);
  const b = await context.newPage();
  await b.goto(url);
  await ready(b);
  await context.setOffline(true);
  await trackN(b, runId(), 50); // ~600 bytes each
  const s = await until("evictions", async () => {
    const s = await identity(b);
    return s.dropped.queue_full > 0 && s;
  }, 5000);
  assert.ok(s.pending <= 10, JSON.stringify(s)); // 3000 bytes of ~400-byte events
  await context.close();
});

test("events are sized in UTF-8 bytes: a large non-ASCII event is too large, not stuck", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(`${relay.origin}/plain/`);
  await ready(page);
  const run = runId();
  await page.evaluate((run) => {
    window.trueup.track("e2e", { run, i: 99, text: "中".repeat(25000) }); // 75 KB in UTF-8
    window.trueup.track("e2e", { run, i: 0 });
  }, run);
  await allArrive(relay, run, 1, "after a large non-ASCII event");
  const s = await settled(page);
  assert.equal(s.dropped.too_large, 1);
  await context.close();
});

test("IndexedDB cleared under a running page: the agent opens it again and goes on", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(`${relay.origin}/plain/`);
  await ready(page);
  const run = runId();
  await trackN(page, run, 1);
  await allArrive(relay, run, 1, "before clearing");
  const cdp = await context.newCDPSession(page);
  await cdp.send("Storage.clearDataForOrigin", { origin: relay.origin, storageTypes: "indexeddb" });
  await sleep(300);
  await trackN(page, run, 2, 1);
  await allArrive(relay, run, 3, "after clearing");
  const s = await settled(page);
  assert.ok(s.acked >= 2, JSON.stringify(s));
  assert.deepEqual(errors, []);
  await context.close();
});

test("a beacon does not repeat the batch in flight, nor anything written while offline", async () => {
  const context = await browser.newContext();
  await context.addInitScript(() => {
    window.__beaconed = [];
    const b = navigator.sendBeacon.bind(navigator);
    navigator.sendBeacon = (u, d) => {
      window.__beaconed.push(...JSON.parse(d).events.map((e) => e.props.i));
      return b(u, d);
    };
  });
  let held = 0;
  await context.route("**/_r/q", async (route) => {
    held++;
    await sleep(1500); // the batch stays in flight
    await route.continue();
  });
  const page = await context.newPage();
  await page.goto(`${relay.origin}/plain/`);
  await ready(page);
  const run = runId();
  const sent = held;
  await trackN(page, run, 1);
  await until("the batch in flight", () => held > sent, 5000);
  await tabSwitch(page);
  await allArrive(relay, run, 1, "in flight");
  // Written, then offline: nothing to beacon.
  await context.setOffline(true);
  await trackN(page, run, 1, 1);
  await sleep(200);
  await tabSwitch(page);
  assert.deepEqual(await page.evaluate(() => window.__beaconed), []);
  await context.setOffline(false);
  await allArrive(relay, run, 2, "after offline");
  await settled(page);
  await context.close();
});

test("a tab waiting for consent adopts no rescued events", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(`${relay.origin}/consent/`);
  await ready(page);
  const other = await context.newPage();
  await other.goto(`${relay.origin}/noagent/`);
  const run = runId();
  await other.evaluate((run) => {
    const id = crypto.randomUUID();
    const s = JSON.stringify({ id, name: "e2e", schema: "event/1", ts: Date.now(), source: "client",
      anon_id: "a", session_id: "s", device_id: "d.t", seq: 1, props: { run, i: 0 }, context: {} });
    localStorage.setItem("trueup.rescue.other", JSON.stringify([{ i: id, s, b: s.length, t: Date.now() }]));
  }, run);
  await sleep(1000);
  const s = await identity(page);
  assert.equal(s.enqueued, 0, JSON.stringify(s));
  assert.equal(await page.evaluate(() => localStorage.getItem("trueup.rescue.other") !== null), true, "the list stays");
  await context.close();
});
