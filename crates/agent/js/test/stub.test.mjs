// The stub against the fake core, with the browser's globals faked: buffering and replay with
// call-time context, and the "no_wasm" fallback's wire envelope, batching and consent.
// (Real browsers, the real core and the relay are exercised by the end-to-end check.)

import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { beforeEach, test } from "node:test";
import { pathToFileURL } from "node:url";
import { buildWithFakeCore, freshStub, settle, UUIDV7 } from "./helpers.mjs";

const out = buildWithFakeCore();
let beacons; // bodies given to sendBeacon
let beaconAccepts; // what sendBeacon answers
let fetches; // [url, init] given to fetch
let listeners;

class MemoryStorage {
  #m = new Map();
  getItem(k) {
    return this.#m.has(k) ? this.#m.get(k) : null;
  }
  setItem(k, v) {
    this.#m.set(k, String(v));
  }
  get length() {
    return this.#m.size;
  }
}

beforeEach(() => {
  beacons = [];
  beaconAccepts = true;
  fetches = [];
  listeners = {};
  globalThis.__fakeCore = { noWasm: true };
  const g = globalThis;
  g.window = g;
  g.document = { referrer: "https://ref.example/", title: "Shop" };
  g.location = { href: "https://shop.example/p/1" };
  g.localStorage = new MemoryStorage();
  g.sessionStorage = new MemoryStorage();
  g.addEventListener = (type, fn) => (listeners[type] = fn);
  Object.defineProperty(g, "navigator", {
    configurable: true,
    value: { sendBeacon: (url, body) => (beacons.push({ url, body: JSON.parse(body), raw: body }), beaconAccepts) },
  });
  g.fetch = async (url, init) => (fetches.push([url, init]), { ok: true });
});

const events = () => beacons.flatMap((b) => b.body.events);

test("calls before the core is ready are replayed in order, once, with call-time context", async () => {
  const t = await freshStub(out);
  const before = Date.now();
  t.track("a", { n: 1 });
  location.href = "https://shop.example/p/2";
  document.title = "Mug";
  t.page({ k: "v" });
  t.consent(true);
  assert.equal((await t.stats()).buffered, 3);
  const options = { site: "demo", custom: { x: 1 } };
  const ready = t.init(options);
  t.track("b"); // still before the Agent exists
  await ready;
  const agent = globalThis.__fakeCore.agent;
  assert.equal(agent.options, options, "options are passed untouched");
  assert.deepEqual(agent.calls.map(([m, a]) => [m, a]),
    [["track", ["a", { n: 1 }]], ["page", [{ k: "v" }]], ["consent", [true]], ["track", ["b"]]]);
  const [first, second] = agent.calls.map(([, , ctx]) => ctx);
  assert.equal(first.url, "https://shop.example/p/1");
  assert.equal(first.title, "Shop");
  assert.equal(second.url, "https://shop.example/p/2");
  assert.equal(second.title, "Mug");
  assert.equal(first.referrer, "https://ref.example/");
  assert.ok(first.ts >= before && first.ts <= second.ts);
  for (const [, , ctx] of agent.calls) assert.match(ctx.id, UUIDV7);
  assert.equal(new Set(agent.calls.map(([, , c]) => c.id)).size, 4);
  assert.equal(parseInt(first.id.replace("-", "").slice(0, 12), 16), first.ts, "id carries ts");

  t.identify("u-1", { plan: "pro" }); // after: straight to the agent
  assert.equal(agent.calls.length, 5);
  assert.deepEqual(t.attribution(), { first: { utm_source: "fake" } });
  assert.equal((await t.stats()).device_id, "fake");
  await t.flush();
  assert.equal(agent.flushes, 1);
  assert.equal(await t.init({ site: "other" }), undefined, "init is once");
  assert.equal(globalThis.__fakeCore.initCalls, 1);
  assert.equal(beacons.length, 0);
});

test("the wasm URL is next to the module, or under options.assets", async () => {
  let t = await freshStub(out);
  await t.init({ site: "demo" });
  assert.match(globalThis.__fakeCore.wasmUrl, /^file:.*\/trueup_agent_bg\.[0-9a-f]{8}\.wasm$/);
  assert.ok(globalThis.__fakeCore.wasmUrl.startsWith(pathToFileURL(out).href + "/"));
  const elsewhere = fs.mkdtempSync(path.join(os.tmpdir(), "trueup-assets-"));
  for (const f of fs.readdirSync(out)) fs.copyFileSync(path.join(out, f), path.join(elsewhere, f));
  delete globalThis.__fakeCore.agent;
  t = await freshStub(out);
  await t.init({ site: "demo", assets: pathToFileURL(elsewhere).href }); // no trailing slash
  assert.ok(globalThis.__fakeCore.agent, "the core loaded from options.assets");
  assert.ok(globalThis.__fakeCore.wasmUrl.startsWith(pathToFileURL(elsewhere).href + "/"));
});

test("when the core cannot load, the fallback sends the v1 envelope by sendBeacon", async () => {
  globalThis.__fakeCore.failInit = "CompileError: refused by CSP";
  const t = await freshStub(out);
  t.track("added_to_cart", { sku: "mug-42" });
  t.page();
  t.identify("user-7", { plan: "pro" });
  t.track("after_identify", "not an object");
  t.reset();
  t.track("after_reset");
  await t.init({ site: "demo", endpoint: "/_r/q" });
  await settle();
  assert.equal(beacons.length, 1, "one batch per microtask");
  const { url, body } = beacons[0];
  assert.equal(url, "/_r/q");
  assert.equal(body.v, 1);
  assert.equal(body.site, "demo");
  assert.ok(body.sent_at > 0);
  const ev = body.events;
  assert.deepEqual(ev.map((e) => [e.name, e.schema, e.seq]), [
    ["added_to_cart", "event/1", 1], ["page_view", "page_view/1", 2], ["identify", "identify/1", 3],
    ["after_identify", "event/1", 4], ["after_reset", "event/1", 5]]);
  assert.deepEqual(ev[0].props, { sku: "mug-42" });
  assert.deepEqual(ev[2].props, { traits: { plan: "pro" } });
  assert.deepEqual(ev[3].props, {});
  assert.equal(ev[0].user_id, undefined);
  assert.equal(ev[2].user_id, "user-7");
  assert.equal(ev[3].user_id, "user-7");
  assert.equal(ev[4].user_id, undefined, "reset forgets the user");
  assert.notEqual(ev[4].anon_id, ev[0].anon_id, "reset gives a new anonymous id");
  for (const e of ev) {
    assert.match(e.id, UUIDV7);
    assert.equal(e.source, "client");
    assert.equal(e.device_id, body.counters.device_id);
    assert.deepEqual(e.context, { url: "https://shop.example/p/1", referrer: "https://ref.example/",
      title: "Shop", degraded: "no_wasm" });
  }
  assert.deepEqual(body.counters, { device_id: ev[0].device_id, enqueued: 5, sent: 5, acked: 0,
    retried: 0, pending: 5, dropped: {}, degraded: "no_wasm" });
  const s = await t.stats();
  assert.equal(s.degraded, "no_wasm");
  assert.match(s.error, /refused by CSP/);

  // Later calls, and the next page: the device and its seq go on.
  t.track("later");
  await settle();
  assert.equal(beacons[1].body.events[0].seq, 6);
  const next = await freshStub(out);
  await next.init({ site: "demo" });
  next.track("next_page");
  await settle();
  const last = beacons[2].body;
  assert.equal(last.events[0].seq, 7);
  assert.equal(last.events[0].device_id, ev[0].device_id);
  assert.equal(last.events[0].anon_id, ev[4].anon_id);
  assert.equal(last.counters.enqueued, 7);
});

test("a trapping core is counted and abandoned; the trapped call goes by the fallback", async () => {
  const t = await freshStub(out);
  await t.init({ site: "demo" });
  const agent = globalThis.__fakeCore.agent;
  t.track("ok");
  t.track("panic!");
  t.track("after");
  await settle();
  assert.equal(agent.calls.length, 1);
  assert.deepEqual(events().map((e) => e.name), ["panic!", "after"]);
  const s = await t.stats();
  assert.equal(s.wasm_panic, 1);
  assert.match(s.error, /RuntimeError/);
});

test("with consent pending the fallback stores and sends nothing until consent(true)", async () => {
  globalThis.__fakeCore.failInit = "no wasm";
  const t = await freshStub(out);
  await t.init({ site: "demo", consent: "pending" });
  t.track("a");
  await settle();
  assert.equal(beacons.length, 0);
  assert.equal(localStorage.length + sessionStorage.length, 0, "nothing stored");
  assert.equal((await t.stats()).buffered, 1);
  t.consent(true);
  await settle();
  assert.deepEqual(events().map((e) => e.name), ["a"]);

  const u = await freshStub(out);
  await u.init({ site: "demo", consent: "pending" });
  u.track("b");
  u.consent(false);
  u.track("c");
  await settle();
  assert.equal(events().length, 1, "refused: discarded, not sent");
});

test("bodies stay under 60 KiB; an oversized event is dropped and counted", async () => {
  globalThis.__fakeCore.failInit = "no wasm";
  const t = await freshStub(out);
  await t.init({ site: "demo" });
  const pad = "é".repeat(1000); // 2000 bytes in UTF-8
  for (let i = 0; i < 100; i++) t.track("big", { i, pad });
  t.track("huge", { pad: "x".repeat(70 * 1024) });
  await settle();
  assert.ok(beacons.length >= 4);
  for (const b of beacons) assert.ok(Buffer.byteLength(b.raw) <= 60 * 1024, `${Buffer.byteLength(b.raw)}`);
  assert.deepEqual(events().map((e) => e.props.i), [...Array(100).keys()]);
  const counters = beacons.at(-1).body.counters;
  assert.deepEqual(counters.dropped, { too_large: 1 });
  assert.equal(counters.enqueued, 101);
  assert.equal(counters.pending, 100);
});

test("sendBeacon refusing falls back to fetch with keepalive; failures are counted", async () => {
  globalThis.__fakeCore.failInit = "no wasm";
  beaconAccepts = false;
  globalThis.fetch = async (url, init) => {
    fetches.push([url, init]);
    if (init.keepalive) throw new TypeError("over the keepalive budget");
    return { ok: false, status: 503 };
  };
  const t = await freshStub(out);
  await t.init({ site: "demo", endpoint: "/custom" });
  t.track("a");
  t.track("b");
  await settle();
  assert.deepEqual(fetches.map(([url, init]) => [url, init.method, init.keepalive]),
    [["/custom", "POST", true], ["/custom", "POST", false]]);
  assert.equal(JSON.parse(fetches[0][1].body).events.length, 2);
  const s = await t.stats();
  assert.deepEqual(s.dropped, { send_failed: 2 });
  assert.equal(s.enqueued, s.acked + s.pending + 2);
});

test("leaving the page before the core is ready sends what is buffered", async () => {
  const t = await freshStub(out);
  t.page();
  const ready = t.init({ site: "demo" });
  listeners.pagehide();
  assert.deepEqual(events().map((e) => e.name), ["page_view"], "sent synchronously");
  await ready;
  t.track("after");
  await settle();
  assert.equal(globalThis.__fakeCore.agent, undefined, "the core is not used once given up");
  assert.deepEqual(events().map((e) => e.name), ["page_view", "after"]);
});

test("no entry point throws, whatever it is given", async () => {
  globalThis.__fakeCore.failInit = "no wasm";
  const t = await freshStub(out);
  const cyclic = {};
  cyclic.self = cyclic;
  await t.init(undefined);
  await t.init({ site: "demo" });
  t.track(undefined, cyclic);
  t.track("n", { big: 1n });
  t.identify(null, 5);
  t.page("string");
  await settle();
  assert.deepEqual((await t.stats()).dropped, { unserializable: 2 });
  assert.deepEqual(events().map((e) => [e.name, e.props]), [["identify", {}], ["page_view", {}]]);
});
