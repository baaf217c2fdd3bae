// The stub against the fake core, with the browser's globals faked: buffering and replay with
// call-time context, retrying a core that could not be fetched, and the "no_wasm" fallback's
// wire envelope, batching, consent, answers, retries, offline hold and storage.
// (Real browsers, the real core and the relay are exercised by the end-to-end checks.)

import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, mock, test } from "node:test";
import { pathToFileURL } from "node:url";
import { buildWithFakeCore, freshStub, settle, UUIDV7 } from "./helpers.mjs";

const out = buildWithFakeCore();
let requests; // every body sent, in order: { via: "beacon" | "fetch", url, init, body, raw }
let beaconAccepts; // what sendBeacon answers
let answer; // (body) => the fake relay's Response for a fetch (default: a relay storing ids once)
let stored; // the fake relay's events by id
let online; // navigator.onLine
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

const response = (status, json, headers = {}) => ({
  ok: status >= 200 && status < 300, status,
  headers: { get: (h) => headers[h.toLowerCase()] ?? null },
  json: async () => json,
});
/** What the relay answers: each id stored once, `accepted` then `duplicate`. */
const relay = (body) => response(200, {
  results: body.events.map((e) => {
    const status = stored.has(e.id) ? "duplicate" : "accepted";
    stored.set(e.id, e);
    return { id: e.id, status };
  }),
});

beforeEach(() => {
  requests = [];
  beaconAccepts = true;
  stored = new Map();
  answer = relay;
  online = true;
  listeners = {};
  globalThis.__fakeCore = { noWasm: true };
  const g = globalThis;
  g.window = g;
  g.document = { referrer: "https://ref.example/", title: "Shop", visibilityState: "visible" };
  g.location = { href: "https://shop.example/p/1" };
  g.localStorage = new MemoryStorage();
  g.sessionStorage = new MemoryStorage();
  g.addEventListener = (type, fn) => (listeners[type] = fn);
  Object.defineProperty(g, "navigator", {
    configurable: true,
    value: {
      get onLine() {
        return online;
      },
      sendBeacon: (url, raw) => {
        if (!beaconAccepts) return false;
        requests.push({ via: "beacon", url, body: JSON.parse(raw), raw });
        for (const e of JSON.parse(raw).events) stored.set(e.id, e);
        return true;
      },
    },
  });
  g.fetch = async (url, init) => {
    const body = JSON.parse(init.body);
    requests.push({ via: "fetch", url, init, body, raw: init.body });
    return answer(body);
  };
});

afterEach(() => {
  mock.timers.reset();
  mock.restoreAll();
});

const events = () => requests.flatMap((b) => b.body.events);
const names = (evs = events()) => evs.map((e) => e.name);
const storedQueue = () => JSON.parse(localStorage.getItem("trueup:nowasm") || "{}").q || [];
/** Lets promise callbacks and pending I/O run (with setTimeout mocked, settle() would not). */
const turn = async (n = 5) => {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
};
const lost = (s) => Object.values(s.dropped).reduce((a, b) => a + b, 0);
const identity = (s) => assert.equal(s.enqueued, s.acked + lost(s) + s.pending, JSON.stringify(s));

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
  assert.equal(requests.length, 0);
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

test("a core that could not be fetched while offline: calls stay buffered, the core gets them once online", async () => {
  online = false;
  globalThis.__fakeCore.failNext = 5; // more failures than retries: offline ones do not count
  const t = await freshStub(out);
  t.track("a");
  let done = false;
  t.init({ site: "demo" }).then(() => (done = true));
  await t.flush(); // the first try is over
  for (let i = 0; i < 4; i++) {
    listeners.online(); // a flaky signal: still offline, the fetch fails again
    await turn();
    await t.flush();
  }
  t.track("b");
  t.page();
  const s = await t.stats();
  assert.equal(s.buffered, 3);
  assert.equal(s.degraded, undefined, "not the fallback");
  assert.match(s.error, /TypeError: Failed to fetch/);
  assert.equal(done, false);
  assert.equal(globalThis.__fakeCore.initCalls, 5);
  online = true;
  listeners.online();
  await turn();
  await t.flush();
  await turn();
  assert.equal(done, true);
  const agent = globalThis.__fakeCore.agent;
  assert.deepEqual(agent.calls.map(([m, a]) => [m, a[0]]), [["track", "a"], ["track", "b"], ["page", undefined]]);
  assert.equal(requests.length, 0, "nothing sent by the stub");
  assert.equal((await t.stats()).error, undefined);
  assert.equal(localStorage.length, 0);
});

test("online, a core that could not be fetched is tried again after 1 s, 4 s and 16 s", async () => {
  mock.timers.enable({ apis: ["setTimeout"] });
  globalThis.__fakeCore.failNext = 3;
  const t = await freshStub(out);
  t.init({ site: "demo", assets: pathToFileURL(out).href }); // the loader's path: ?retry=k URLs
  t.track("a");
  await t.flush();
  for (const ms of [1000, 4000, 16000]) {
    assert.equal(globalThis.__fakeCore.agent, undefined);
    mock.timers.tick(ms - 1);
    await turn();
    assert.equal(globalThis.__fakeCore.initCalls, 1 + [1000, 4000, 16000].indexOf(ms), `not before ${ms} ms`);
    mock.timers.tick(1);
    await turn(20);
    await t.flush();
  }
  assert.equal(globalThis.__fakeCore.initCalls, 4);
  assert.deepEqual(globalThis.__fakeCore.agent.calls.map(([, a]) => a[0]), ["a"]);
  assert.equal(requests.length, 0);
});

test("a fourth network failure in a row gives up to the fallback, which delivers", async () => {
  mock.timers.enable({ apis: ["setTimeout"] });
  globalThis.__fakeCore.failNext = 4;
  const t = await freshStub(out);
  t.track("a");
  const ready = t.init({ site: "demo" });
  for (const ms of [0, 1000, 4000, 16000]) {
    mock.timers.tick(ms);
    await turn();
    await t.flush();
  }
  await ready;
  await turn();
  assert.deepEqual(names(), ["a"]);
  const s = await t.stats();
  assert.equal(s.degraded, "no_wasm");
  assert.match(s.error, /Failed to fetch/);
  assert.equal(globalThis.__fakeCore.initCalls, 4);
});

test("a CSP refusing WebAssembly: no retry; the fallback sends the v1 envelope by fetch and reads the answers", async () => {
  globalThis.__fakeCore.failInit = new WebAssembly.CompileError("WebAssembly.instantiateStreaming(): " +
    "Compiling or instantiating WebAssembly module violates the following Content Security policy " +
    "directive because 'unsafe-eval' is not an allowed source of script");
  const t = await freshStub(out);
  t.track("added_to_cart", { sku: "mug-42" });
  t.page();
  t.identify("user-7", { plan: "pro" });
  t.track("after_identify", "not an object");
  t.reset();
  t.track("after_reset");
  await t.init({ site: "demo", endpoint: "/_r/q" });
  await settle();
  assert.equal(globalThis.__fakeCore.initCalls, 1, "a compile error is not retried");
  assert.equal(requests.length, 1, "one batch per microtask");
  const { via, url, init, body } = requests[0];
  assert.equal(via, "fetch");
  assert.equal(url, "/_r/q");
  assert.equal(init.method, "POST");
  assert.equal(init.keepalive, true);
  assert.equal(typeof init.body, "string", "text/plain: CORS-simple");
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
  assert.match(s.error, /CompileError: .*unsafe-eval/);
  assert.deepEqual({ ...s, error: "" }, { device_id: ev[0].device_id, enqueued: 5, sent: 5, acked: 5,
    retried: 0, pending: 0, dropped: {}, degraded: "no_wasm", buffered: 0, error: "" });
  assert.deepEqual(storedQueue(), [], "answered: nothing left queued");

  // Later calls, and the next page: the device and its seq go on.
  t.track("later");
  await settle();
  assert.equal(requests[1].body.events[0].seq, 6);
  const next = await freshStub(out);
  await next.init({ site: "demo" });
  next.track("next_page");
  await settle();
  const last = requests[2].body;
  assert.equal(last.events[0].seq, 7);
  assert.equal(last.events[0].device_id, ev[0].device_id);
  assert.equal(last.events[0].anon_id, ev[4].anon_id);
  assert.equal(last.counters.enqueued, 7);
  assert.equal(last.counters.acked, 6);
  assert.equal((await next.stats()).acked, 7);
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
  assert.deepEqual(names(), ["panic!", "after"]);
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
  assert.equal(requests.length, 0);
  assert.equal(localStorage.length + sessionStorage.length, 0, "nothing stored");
  assert.equal((await t.stats()).buffered, 1);
  t.consent(true);
  await settle();
  assert.deepEqual(names(), ["a"]);

  const u = await freshStub(out);
  await u.init({ site: "demo", consent: "pending" });
  u.track("b");
  u.consent(false);
  u.track("c");
  await settle();
  assert.equal(events().length, 1, "refused: discarded, not sent");
});

test("consent(false) also empties the fallback's stored queue, counted as dropped", async () => {
  globalThis.__fakeCore.failInit = "no wasm";
  online = false;
  const t = await freshStub(out);
  await t.init({ site: "demo" });
  t.track("a");
  t.track("b");
  await settle();
  assert.equal(storedQueue().length, 2);
  t.consent(false);
  await settle();
  assert.deepEqual(storedQueue(), []);
  const s = await t.stats();
  assert.deepEqual(s.dropped, { consent: 2 });
  identity(s);
  online = true;
  listeners.online();
  await settle();
  assert.equal(requests.length, 0);
});

test("bodies stay under 60 KiB and 200 events; an oversized event is dropped and counted", async () => {
  globalThis.__fakeCore.failInit = "no wasm";
  const t = await freshStub(out);
  await t.init({ site: "demo" });
  const pad = "é".repeat(1000); // 2000 bytes in UTF-8
  for (let i = 0; i < 50; i++) t.track("big", { i, pad });
  t.track("huge", { pad: "x".repeat(70 * 1024) });
  for (let i = 50; i < 300; i++) t.track("small", { i });
  await settle();
  assert.ok(requests.length >= 4, `${requests.length}`);
  for (const b of requests) {
    assert.ok(Buffer.byteLength(b.raw) <= 60 * 1024, `${Buffer.byteLength(b.raw)}`);
    assert.ok(b.body.events.length <= 200);
  }
  assert.deepEqual(events().map((e) => e.props.i), [...Array(300).keys()]);
  const s = await t.stats();
  assert.deepEqual(s.dropped, { too_large: 1 });
  assert.equal(s.enqueued, 301);
  assert.equal(s.acked, 300);
  assert.equal(s.pending, 0);
});

test("failed sends keep the events and retry them with the same ids; answers are counted", async () => {
  mock.timers.enable({ apis: ["setTimeout"] });
  globalThis.__fakeCore.failInit = "no wasm";
  const plan = [
    () => Promise.reject(new TypeError("Failed to fetch")), // network
    () => response(503, { error: "spool_full" }, { "retry-after": "30" }),
    () => response(200, { results: [] }), // an answer that does not match the batch
    (body) => response(200, { results: body.events.map((e) => (e.name == "bad"
      ? { id: e.id, status: "rejected", reason: "invalid", detail: "test" }
      : { id: e.id, status: "accepted" })) }),
  ];
  answer = (body) => plan.shift()(body);
  mock.method(Math, "random", () => 0.99);
  const t = await freshStub(out);
  await t.init({ site: "demo", endpoint: "/custom" });
  t.track("a");
  t.track("bad");
  await turn();
  assert.equal(requests.length, 1);
  mock.timers.tick(989); // 0.99 × 1 s
  await turn();
  assert.equal(requests.length, 1, "backoff");
  mock.timers.tick(1);
  await turn();
  assert.equal(requests.length, 2);
  mock.timers.tick(29_999);
  await turn();
  assert.equal(requests.length, 2, "Retry-After is honoured");
  mock.timers.tick(1);
  await turn();
  assert.equal(requests.length, 3);
  listeners.online(); // retries at once
  await turn();
  assert.equal(requests.length, 4);
  const ids = requests.map((r) => r.body.events.map((e) => e.id).join());
  assert.equal(new Set(ids).size, 1, "the same ids every time");
  assert.ok(requests.every((r) => r.url == "/custom" && r.init.keepalive));
  const s = await t.stats();
  assert.deepEqual(s.dropped, { rejected: 1 });
  assert.equal(s.acked, 1);
  assert.equal(s.pending, 0);
  assert.equal(s.sent, 8);
  assert.equal(s.retried, 6);
  identity(s);

  // A 4xx drops the batch as rejected; a 413 halves it, then drops a single event as too_large.
  answer = (body) => (body.events.length > 1 ? response(413, {})
    : body.events[0].name == "x" ? response(400, {}) : response(413, {}));
  t.track("x");
  t.track("y");
  await turn(10);
  assert.deepEqual(requests.slice(4).map((r) => names(r.body.events)), [["x", "y"], ["x"], ["y"]]);
  const s2 = await t.stats();
  assert.deepEqual(s2.dropped, { rejected: 2, too_large: 1 });
  identity(s2);
  assert.equal(s2.pending, 0);
});

test("offline, the fallback sends nothing and keeps the events in localStorage; online, it sends them", async () => {
  globalThis.__fakeCore.failInit = "no wasm";
  online = false;
  const t = await freshStub(out);
  await t.init({ site: "demo" });
  for (let i = 0; i < 5; i++) t.track("e", { i });
  await settle();
  await t.flush();
  listeners.pagehide(); // no beacon into the void either
  await settle();
  assert.equal(requests.length, 0);
  assert.equal(storedQueue().length, 5);
  let s = await t.stats();
  assert.equal(s.pending, 5);
  identity(s);
  online = true;
  listeners.online();
  await settle();
  assert.deepEqual(events().map((e) => e.props.i), [0, 1, 2, 3, 4]);
  assert.equal(requests[0].via, "fetch");
  s = await t.stats();
  assert.equal(s.acked, 5);
  assert.equal(s.pending, 0);
  assert.deepEqual(storedQueue(), []);
});

test("the fallback's queue is bounded: 1000 events, the overflow counted", async () => {
  globalThis.__fakeCore.failInit = "no wasm";
  online = false;
  const t = await freshStub(out);
  await t.init({ site: "demo" });
  for (let i = 0; i < 1010; i++) t.track("e", { i });
  await settle();
  const s = await t.stats();
  assert.deepEqual(s.dropped, { queue_full: 10 });
  assert.equal(storedQueue().length, 1000);
  // The oldest went first, as from the core's queue.
  assert.deepEqual(storedQueue().map((e) => JSON.parse(e[1]).props.i), [...Array(1000).keys()].map((i) => i + 10));
  identity(s);
});

test("the fallback's queue is bounded: 512 KiB, the overflow counted", async () => {
  globalThis.__fakeCore.failInit = "no wasm";
  online = false;
  const t = await freshStub(out);
  await t.init({ site: "demo" });
  const pad = "x".repeat(10_000);
  for (let i = 0; i < 60; i++) t.track("big", { i, pad });
  await settle();
  const s = await t.stats();
  assert.ok(s.dropped.queue_full >= 5, JSON.stringify(s.dropped));
  assert.equal(storedQueue().length, 60 - s.dropped.queue_full);
  assert.ok(localStorage.getItem("trueup:nowasm").length < 600_000);
  identity(s);
  online = true;
  listeners.online();
  await settle();
  const kept = 60 - s.dropped.queue_full;
  assert.deepEqual(events().map((e) => e.props.i), [...Array(kept).keys()].map((i) => i + 60 - kept), "the newest kept");
});

test("the fallback follows the core's rules: events older than maxAgeMs expire, sessions end after sessionTimeoutMs idle and continue the core's", async () => {
  globalThis.__fakeCore.failInit = "no wasm";
  online = false;
  const now = Date.now();
  // The core's session, active a minute ago: the fallback goes on with it.
  localStorage.setItem("trueup.sess", `core-session ${now - 60_000}`);
  localStorage.setItem("trueup.anon", "core-visitor");
  const t = await freshStub(out);
  await t.init({ site: "demo", maxAgeMs: 864e5, sessionTimeoutMs: 600_000 });
  t._replay("track", ["stale", { i: 0 }], now - 2 * 864e5); // two days old: past maxAgeMs
  t._replay("track", ["a", { i: 1 }], now - 30_000);
  t._replay("track", ["b", { i: 2 }], now - 20_000);
  await settle();
  online = true;
  listeners.online();
  await settle();
  const got = events();
  assert.deepEqual(got.map((e) => e.name), ["a", "b"], "the stale event expired");
  assert.deepEqual(got.map((e) => e.session_id), ["core-session", "core-session"]);
  assert.ok(got.every((e) => e.anon_id == "core-visitor"), "the core's visitor");
  // Eleven idle minutes later (timeout 10): a new session, kept for the core too.
  t._replay("track", ["c", { i: 3 }], now + 660_000);
  await settle();
  const c = events().at(-1);
  assert.notEqual(c.session_id, "core-session");
  assert.equal(localStorage.getItem("trueup.sess"), `${c.session_id} ${now + 660_000}`);
  const s = await t.stats();
  assert.equal(s.dropped.expired, 1);
  identity(s);
});

test("while consent is pending, the fallback holds at most 1000 calls, the oldest dropped and counted at consent(true)", async () => {
  globalThis.__fakeCore.failInit = "no wasm";
  const t = await freshStub(out);
  await t.init({ site: "demo", consent: "pending" });
  for (let i = 0; i < 1005; i++) t.track("held", { i });
  await settle();
  assert.equal(requests.length, 0);
  assert.equal(localStorage.getItem("trueup:nowasm"), null, "nothing stored before consent");
  t.consent(true);
  await settle();
  assert.deepEqual(events().map((e) => e.props.i), [...Array(1000).keys()].map((i) => i + 5));
  const s = await t.stats();
  assert.deepEqual(s.dropped, { queue_full: 5 });
  assert.equal(s.enqueued, 1005);
  identity(s);
});

test("a page that closes offline leaves its events to the next page, even one running the core", async () => {
  globalThis.__fakeCore.failInit = "no wasm";
  online = false;
  const first = await freshStub(out);
  await first.init({ site: "demo" });
  first.track("left_behind");
  listeners.pagehide();
  await settle();
  assert.equal(requests.length, 0);
  online = true;
  delete globalThis.__fakeCore.failInit;
  const next = await freshStub(out);
  await next.init({ site: "demo" });
  await settle();
  assert.ok(globalThis.__fakeCore.agent, "the next page runs the core");
  assert.deepEqual(names(), ["left_behind"]);
  assert.deepEqual(storedQueue(), []);
  const store = JSON.parse(localStorage.getItem("trueup:nowasm"));
  assert.equal(store.acked, 1);
});

test("leaving the page before the core is ready beacons what is buffered; it stays queued until answered", async () => {
  const t = await freshStub(out);
  t.page();
  const ready = t.init({ site: "demo" });
  listeners.pagehide();
  assert.deepEqual(requests.map((r) => [r.via, names(r.body.events)]), [["beacon", ["page_view"]]],
    "sent synchronously");
  await ready;
  t.track("after");
  await settle();
  assert.equal(globalThis.__fakeCore.agent, undefined, "the core is not used once given up");
  assert.deepEqual(requests.map((r) => [r.via, names(r.body.events)]),
    [["beacon", ["page_view"]], ["fetch", ["after"]]], "what was beaconed is not sent twice meanwhile");
  let s = await t.stats();
  assert.equal(s.pending, 1, "no answer read for the beacon");
  // Back from the back/forward cache: the beaconed event is sent again for an answer.
  document.visibilityState = "visible";
  listeners.visibilitychange();
  await settle();
  assert.deepEqual(names(requests[2].body.events), ["page_view"]);
  s = await t.stats();
  assert.equal(s.pending, 0);
  assert.equal(s.acked, 2);
  assert.equal(stored.size, 2, "the relay stored each once");
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

test("uuidv7: version 7, variant 10, the capture time first; with or without randomUUID", async () => {
  const { uuidv7 } = await freshStub(out);
  const randomUUID = crypto.randomUUID;
  try {
    for (const secure of [true, false]) {
      // Outside a secure context (plain http), there is no randomUUID.
      Object.defineProperty(crypto, "randomUUID", { configurable: true, value: secure ? randomUUID : undefined });
      const ids = Array.from({ length: 200 }, () => uuidv7(0x0123456789ab));
      for (const id of ids) assert.match(id, UUIDV7);
      assert.ok(ids.every((id) => id.startsWith("01234567-89ab-7")), "the time is the first 48 bits");
      assert.equal(new Set(ids).size, ids.length, "random bits differ");
      assert.ok(uuidv7(1000) < uuidv7(2000), "ids sort by time");
      // What a page's snippet queued may be anything: the id is then of now, still well-formed.
      for (const bad of ["x", -1, NaN, 2 ** 48, {}]) assert.match(uuidv7(bad), UUIDV7);
    }
  } finally {
    Object.defineProperty(crypto, "randomUUID", { configurable: true, value: randomUUID });
  }
});
