// The agent's corner cases, in headless Chromium through the real relay: the send lock handed on
// by a tab that stopped, events rescued before IndexedDB opened counted once, the byte cap
// enforced for other tabs' writes, non-ASCII events sized in bytes, IndexedDB cleared under a
// running page, beacons that do not repeat the batch in flight, a tab waiting for consent
// that adopts nothing, consent refused or given in one tab holding in the others at once, and a
// hidden sending tab handing the lock to a visible one. Each checks the counters' identity enqueued = acked + dropped + pending.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { Relay, launch, runId, until, sleep, ROOT, ready, trackN, allArrive, identity, delivery, stats } from "./harness.mjs";

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
  const held = await c.evaluate(async () => (await navigator.locks.query()).held.filter((l) => l.name == "trueup-sender").length);
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
  // Sent now (not at the end of the 5 s flush interval), and still in flight when hidden.
  await page.evaluate(() => void window.trueup.flush());
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

// Consent is the device's: refused in one tab, the other open tabs stop at once (no reload), and
// given again, they send again. For the core and for the no-wasm fallback (/csp/).
for (const site of ["plain", "csp"]) {
  test(`an opt-out in one tab stops the other open tabs at once (${site == "plain" ? "core" : "fallback"})`, async () => {
    const context = await browser.newContext();
    const posts = [];
    context.on("request", (r) => r.method() == "POST" && posts.push(r.url()));
    const open = async () => {
      const page = await context.newPage();
      await page.goto(`${relay.origin}/${site}/`);
      await page.waitForFunction(() => typeof window.trueup?.stats === "function", null, { timeout: 15000 });
      if (site == "csp") await until("the fallback to take over", async () => (await stats(page)).degraded === "no_wasm");
      else await ready(page);
      return page;
    };
    const a = await open();
    const b = await open();
    await a.evaluate(() => window.trueup.consent(false));
    await sleep(300);
    const run = runId();
    const before = posts.length;
    await trackN(b, run, 10);
    await sleep(2500);
    await relay.drained();
    assert.equal(delivery(relay, run, 10).delivered, 0, "the other tab sent nothing after the opt-out");
    assert.deepEqual(posts.slice(before), [], "no request at all");
    // Given again in the first tab: the second sends what it tracks from then on.
    await a.evaluate(() => window.trueup.consent(true));
    await sleep(300);
    const again = runId();
    await trackN(b, again, 5);
    await allArrive(relay, again, 5, `${site}: after consent given again`);
    await context.close();
  });
}

// A steady trickle: 200 events over 20 s in one tab, on a network where an answer takes 300 ms.
// The sender goes on at once only after a full batch; otherwise what was tracked while a request
// was in flight waits for the flush interval (5 s by default), so the requests follow the
// interval, not the round trips (it sent one per round trip: 60 and more here).
test("200 events tracked steadily over 20 s cost a request per flush interval, not per round trip", async () => {
  const context = await browser.newContext();
  let requests = 0;
  await context.route((url) => url.pathname == "/_r/q", async (route) => {
    requests++;
    await sleep(300);
    await route.continue();
  });
  const page = await context.newPage();
  await page.goto(await withOptions(context, {}));
  await ready(page);
  const run = runId();
  await sleep(500); // the tab holds the send lock (it sends what it finds at once when it gets it)
  const before = requests;
  // One event every 100 ms, paced in the page.
  await page.evaluate(async (run) => {
    for (let i = 0; i < 200; i++) {
      window.trueup.track("e2e", { run, i });
      await new Promise((r) => setTimeout(r, 100));
    }
  }, run);
  await allArrive(relay, run, 200, "steady trickle");
  const n = requests - before;
  console.log(`steady trickle: 200 events over 20 s in ${n} requests (flush interval 5 s)`);
  assert.ok(n <= 5, `${n} requests`);
  const s = await settled(page);
  assert.equal(s.acked, s.enqueued, JSON.stringify(s));
  await context.close();
});

/** The run's events by stream: `{device_id: [seq, …]}`, seqs in order. */
const streams = (relay, run) => {
  const out = {};
  for (const r of relay.query(`SELECT device_id, seq FROM events WHERE props->>'run' = '${run}' ORDER BY seq`)) {
    (out[r.device_id] ||= []).push(r.seq);
  }
  return out;
};

// A duplicated tab (window.open of the page, as the browser's "duplicate tab" does, starts with
// a copy of the original's sessionStorage) gets its own stream: it shared the original's tab
// id, so both numbered the same seqs in one stream (a lost event there hidden by its twin) and
// shared one rescue list.
test("a duplicated tab gets its own stream: no seq is numbered twice", async () => {
  const context = await browser.newContext();
  await context.addInitScript(() => (window.__copiedTab = sessionStorage.getItem("trueup.tab")));
  const a = await context.newPage();
  await a.goto(`${relay.origin}/plain/`);
  await ready(a);
  const run = runId();
  await trackN(a, run, 3);
  await a.evaluate(() => window.trueup.flush());
  const [b] = await Promise.all([context.waitForEvent("page"), a.evaluate(() => window.open(location.href))]);
  await ready(b);
  const original = await a.evaluate(() => sessionStorage.getItem("trueup.tab"));
  assert.equal(await b.evaluate(() => window.__copiedTab), original, "the copy starts with the original's tab id");
  assert.notEqual(await b.evaluate(() => sessionStorage.getItem("trueup.tab")), original);
  await trackN(a, run, 3, 3);
  await trackN(b, run, 3, 6);
  await a.evaluate(() => window.trueup.flush());
  await b.evaluate(() => window.trueup.flush());
  await allArrive(relay, run, 9, "duplicated tab");
  const s = streams(relay, run);
  assert.deepEqual(Object.values(s).sort((x, y) => y.length - x.length), [[1, 2, 3, 4, 5, 6], [1, 2, 3]], JSON.stringify(s));
  // A reload keeps the tab's stream (the page that went away took it off the live tabs).
  await b.reload();
  await ready(b);
  await trackN(b, run, 1, 9);
  await b.evaluate(() => window.trueup.flush());
  await allArrive(relay, run, 10, "after a reload");
  const after = streams(relay, run);
  assert.equal(Object.keys(after).length, 2, JSON.stringify(after));
  assert.ok(Object.values(after).some((x) => x.join() == "1,2,3,4"), JSON.stringify(after));
  await context.close();
});

// Back from the back/forward cache, a page begins a new stream: the pages shown in the tab
// meanwhile went on with its stream (it numbered on from its own count, so its next seq was
// one they had used), and what they numbered reaches it asynchronously.
test("a page back from the bfcache begins a new stream: no seq is numbered twice", async () => {
  const cached = await launch({ bfcache: true });
  try {
    const context = await cached.newContext();
    await context.addInitScript(() => addEventListener("pageshow", (e) => (window.__restored = e.persisted)));
    const page = await context.newPage();
    const cdp = await context.newCDPSession(page);
    await cdp.send("Page.enable");
    let notRestored;
    cdp.on("Page.backForwardCacheNotUsed", (e) => (notRestored = JSON.stringify(e.notRestoredExplanations)));
    await page.goto(`${relay.origin}/plain/`);
    await ready(page);
    const run = runId();
    let n = 0;
    const track = async (k) => {
      await trackN(page, run, k, n);
      await page.evaluate(() => window.trueup.flush());
      n += k;
    };
    await track(3);
    // Away and back until the page is restored (Chromium sometimes evicts it: then the way back
    // is a new page of the tab, which goes on with the tab's stream, as a reload does).
    let restored = false;
    for (let attempt = 0; attempt < 4 && !restored; attempt++) {
      notRestored = undefined;
      await page.goto(`${relay.origin}/plain/?next`);
      await ready(page);
      await track(3);
      await page.goBack({ waitUntil: "commit" }); // a page restored from the bfcache fires no load
      restored = await until("the page restored from the bfcache, or loaded again", async () =>
        (await page.evaluate(() => window.__restored)) || (notRestored && (await ready(page), "evicted")), 5000) === true;
      if (!restored) console.log(`bfcache: not restored (${notRestored}), again`);
      await track(1);
    }
    assert.ok(restored, "restored from the bfcache");
    await allArrive(relay, run, n, "bfcache");
    // No seq twice in a stream: the restored page began a new one (it numbered 4, 5, 6 again
    // in the tab's, which the page shown meanwhile had used).
    const s = streams(relay, run);
    for (const seqs of Object.values(s)) assert.deepEqual(seqs, seqs.map((_, k) => k + 1), JSON.stringify(s));
    assert.ok(Object.values(s).some((seqs) => seqs.join() == "1"), JSON.stringify(s));
    await context.close();
  } finally {
    await cached.close();
  }
});

// The relay's Retry-After holds for the device: `online` does not clear it, and neither a
// reload nor another tab that becomes the sender sends before it is over (they did at once).
test("the relay's Retry-After holds across online, a reload and the next sending tab", async () => {
  const context = await browser.newContext();
  const times = [];
  let refused = 0;
  await context.route((url) => url.pathname == "/_r/q", async (route) => {
    times.push(Date.now());
    if (!refused++) return route.fulfill({ status: 503, headers: { "retry-after": "4" }, body: "busy" });
    await route.continue();
  });
  const url = await withOptions(context, { flushIntervalMs: 200, retryBaseMs: 100 });
  const page = await context.newPage();
  await page.goto(url);
  await page.waitForFunction(() => typeof window.trueup?.stats === "function");
  const run = runId();
  await trackN(page, run, 2);
  await until("the 503", () => refused > 0, 8000);
  const refusedAt = times[0];
  await page.evaluate(() => dispatchEvent(new Event("online")));
  await page.reload();
  await page.waitForFunction(() => typeof window.trueup?.stats === "function");
  await trackN(page, run, 2, 2);
  await page.evaluate(() => window.trueup.flush());
  await allArrive(relay, run, 4, "after Retry-After");
  const early = times.slice(1).filter((t) => t - refusedAt < 3900).map((t) => t - refusedAt);
  assert.deepEqual(early, [], "nothing sent before the relay's 4 s were over");
  await settled(page);
  await context.close();
});

// A memory queue (no IndexedDB) is gone with its page: what it holds at page hide is rescued
// like what IndexedDB has not committed yet (it counted as persisted, so a tab closed while
// offline lost it all), and the next page with IndexedDB sends it.
test("a memory queue's events are rescued when the tab closes offline, and the next page sends them", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(await withOptions(context, { storage: "memory" }));
  await ready(page);
  assert.equal((await stats(page)).degraded, "memory_queue");
  await context.setOffline(true);
  const run = runId();
  await trackN(page, run, 5);
  await sleep(300); // written to the memory queue
  await page.close({ runBeforeUnload: true });
  const again = await context.newPage();
  await context.setOffline(false);
  await again.goto(`${relay.origin}/plain/`);
  await ready(again);
  await allArrive(relay, run, 5, "memory queue rescued");
  await context.close();
});

// A hidden tab's timers are throttled (to once a minute after a while; a background tab may be
// frozen): a sending tab that goes hidden hands the send lock over; one that gets it while hidden
// asks whether a tab is visible, and hands it to that one. Headless Chromium shows every page as
// visible and does not freeze them (CDP's Page.setWebLifecycleState "frozen" leaves timers
// running here), so the pages are made hidden as a page sees it (visibilityState and the event)
// and the test checks who sends: before, the hidden tab kept the lock and sent everything.
test("a sending tab that goes hidden hands the lock to a visible tab, past other hidden ones", async () => {
  const context = await browser.newContext();
  await context.addInitScript(() => {
    window.__fetches = 0;
    const f = window.fetch;
    window.fetch = function (u, o) {
      if (o && o.method === "POST" && String(u).endsWith("/_r/q")) window.__fetches++;
      return f.apply(this, arguments);
    };
  });
  const fetches = (page) => page.evaluate(() => window.__fetches);
  const hide = (page) => page.evaluate(() => {
    Object.defineProperty(document, "visibilityState", { configurable: true, get: () => "hidden" });
    document.dispatchEvent(new Event("visibilitychange"));
  });
  // a sends; b and c wait for the lock, in that order.
  const [a, b, c] = [await context.newPage(), await context.newPage(), await context.newPage()];
  await a.goto(`${relay.origin}/plain/`);
  await ready(a);
  const warm = runId();
  await trackN(a, warm, 1);
  await allArrive(relay, warm, 1, "hidden sender (warm-up)");
  assert.ok((await fetches(a)) > 0, "the first tab sends");
  for (const p of [b, c]) {
    await p.goto(`${relay.origin}/plain/`);
    await ready(p);
  }
  await hide(b);
  // a goes hidden: b (hidden too) gets the lock, and passes it to c, the visible one.
  await hide(a);
  await sleep(1500);
  const before = [await fetches(a), await fetches(b)];
  const run = runId();
  await trackN(c, run, 10);
  await allArrive(relay, run, 10, "hidden sender handed over", 20000);
  assert.ok((await fetches(c)) > 0, "the visible tab sends");
  assert.deepEqual([await fetches(a), await fetches(b)], before, "the hidden tabs send nothing");
  await settled(c);
  await context.close();
});

// The counters are one device's, and every tab of the site is that device: two tabs that waited
// for consent each had an identity of their own (nothing stored), and the second to hear of the
// consent stored its own over the first's, so their events and counters split or overwrote each
// other; after an opt-out, the next device inherited the old one's counters (and the relay
// counted them twice).
test("counters add up across tabs and identities: one device for the tabs, a new one after an opt-out, starting at zero", async () => {
  const context = await browser.newContext();
  const [a, b] = [await context.newPage(), await context.newPage()];
  for (const p of [a, b]) {
    await p.goto(`${relay.origin}/consent/`);
    await ready(p);
  }
  const devicesOf = (run) => [...new Set(relay.query(
    `SELECT device_id FROM events WHERE props->>'run' = '${run}'`).map((r) => r.device_id.split(".")[0]))];
  const consentIs = (p, v) => until(`consent ${v} in the other tab`, () =>
    p.evaluate((v) => localStorage.getItem("trueup.consent") === v, v));
  const run = runId();
  await trackN(a, run, 5);
  await trackN(b, run, 5, 5);
  await a.evaluate(() => window.trueup.consent(true));
  await allArrive(relay, run, 10, "two tabs given consent in one");
  const [device] = devicesOf(run);
  assert.deepEqual(devicesOf(run), [device], "both tabs' events are one device's");
  await settled(b);
  for (const p of [a, b]) {
    const s = await identity(p);
    assert.equal(s.device_id, device);
    assert.equal(s.enqueued, 10, "both tabs' events, each counted once");
    assert.equal(s.acked, 10);
  }
  // Opt-out in a (b hears of it), then consent again: a new device, counted from zero.
  await a.evaluate(() => window.trueup.consent(false));
  await consentIs(b, "denied");
  await a.evaluate(() => window.trueup.consent(true));
  await consentIs(b, "granted");
  const again = runId();
  await trackN(b, again, 3);
  await allArrive(relay, again, 3, "after an opt-out and a new consent");
  const [fresh] = devicesOf(again);
  assert.deepEqual(devicesOf(again), [fresh]);
  assert.notEqual(fresh, device, "a new device after the opt-out");
  await settled(b);
  const s = await identity(b);
  assert.equal(s.device_id, fresh);
  assert.equal(s.enqueued, 3, "the new device does not inherit the old one's counters");
  assert.equal(s.acked, 3);
  await b.evaluate(() => window.trueup.flush());
  await relay.drained();
  const reported = relay.query(`SELECT enqueued FROM agent_counters WHERE device_id = '${fresh}'`);
  assert.ok(reported.length == 0 || reported[0].enqueued <= 3, JSON.stringify(reported));
  await context.close();
});

// One timer, set for the core's next wake time: an idle sending tab sets none (it polled every
// 200 ms before, waking the renderer five times a second for as long as the page lived).
test("an idle sending tab sets no timers: no polling", async () => {
  const context = await browser.newContext();
  await context.addInitScript(() => {
    window.__timers = 0;
    const set = window.setTimeout;
    window.setTimeout = function (...args) {
      window.__timers++;
      return set.apply(this, args);
    };
  });
  const page = await context.newPage();
  await page.goto(`${relay.origin}/plain/`);
  await ready(page);
  const run = runId();
  await trackN(page, run, 3);
  await page.evaluate(() => window.trueup.flush());
  await allArrive(relay, run, 3, "idle timers (warm-up)");
  await settled(page);
  await sleep(500);
  const before = await page.evaluate(() => window.__timers);
  await sleep(3000);
  const idle = (await page.evaluate(() => window.__timers)) - before;
  assert.ok(idle <= 1, `${idle} timers set in 3 s of idling`);
  // And it still wakes when something is due.
  const later = runId();
  await trackN(page, later, 2);
  await allArrive(relay, later, 2, "idle timers (after idling)");
  await context.close();
});
