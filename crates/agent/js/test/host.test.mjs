// The core's host (host.js) in Node, with the browser's globals faked: the event JSON and the
// batch body keep the v1 wire form, Storage failures and refused beacons do not throw, and
// post() reads statuses, Retry-After and answers, and gives up after its timeout. (The core that
// calls these runs in the browser tests: crates/agent/tests/browser.rs and e2e/.)

import assert from "node:assert/strict";
import { afterEach, test } from "node:test";
import { body, host, post } from "../host.js";

afterEach(() => {
  for (const k of ["localStorage", "sessionStorage", "navigator", "fetch"]) delete globalThis[k];
});

const o = { site: "demo", endpoint: "/_r/q" };
const ids = { anon_id: "a-1", session_id: "s-1", device_id: "d-1.t-1" };

test("an event's JSON: the v1 fields in order, empty context fields left out, its record", () => {
  const ctx = { url: "https://shop.example/p/1", referrer: "", title: "Mug" };
  const r = host(o).event("id-1", "added_to_cart", "event/1", 1000, 7, { sku: "m" }, ctx, ids,
    { attribution: { first: { utm_source: "x" } } });
  assert.equal(r.s, '{"id":"id-1","name":"added_to_cart","schema":"event/1","ts":1000,"source":"client",' +
    '"anon_id":"a-1","session_id":"s-1","device_id":"d-1.t-1","seq":7,"props":{"sku":"m"},' +
    '"context":{"url":"https://shop.example/p/1","title":"Mug","attribution":{"first":{"utm_source":"x"}}}}');
  assert.deepEqual(r, { i: "id-1", s: r.s, b: r.s.length, t: 1000 });
  const withUser = host(o).event("id-2", "x", "event/1", 1, 1, {}, {},
    { anon_id: "a-1", user_id: "u", session_id: "s-1", device_id: "d-1.t-1" }, { degraded: "memory_queue" });
  assert.deepEqual(Object.keys(JSON.parse(withUser.s)).slice(5, 9), ["anon_id", "user_id", "session_id", "device_id"]);
  assert.deepEqual(JSON.parse(withUser.s).context, { degraded: "memory_queue" });
});

test("unserialisable props give no record (the core counts the event as too large)", () => {
  const cyclic = {};
  cyclic.self = cyclic;
  assert.equal(host(o).event("i", "x", "event/1", 1, 1, cyclic, {}, ids, {}), undefined);
  assert.equal(host(o).event("i", "x", "event/1", 1, 1, { n: 1n }, {}, ids, {}), undefined);
});

test("the batch body: the events' JSON as is; counters only with a device", () => {
  const records = [{ s: '{"id":"a"}' }, { s: '{"id":"b"}' }];
  const counters = { device_id: "d-1", enqueued: 2, sent: 0, acked: 0, retried: 0, pending: 2, dropped: {} };
  const parsed = JSON.parse(body("demo", records, counters));
  assert.deepEqual(Object.keys(parsed), ["v", "site", "sent_at", "counters", "events"]);
  assert.equal(parsed.v, 1);
  assert.deepEqual(parsed.events, [{ id: "a" }, { id: "b" }]);
  assert.deepEqual(parsed.counters, counters);
  assert.equal(JSON.parse(body("demo", records)).counters, undefined, "beacons carry none");
  assert.equal(JSON.parse(body("demo", records, { device_id: "" })).counters, undefined);
});

test("Storage and sendBeacon failures do not throw", () => {
  globalThis.localStorage = { getItem: () => { throw new Error("denied"); }, setItem: () => { throw new Error("quota"); } };
  Object.defineProperty(globalThis, "sessionStorage", { configurable: true, get: () => { throw new Error("sandboxed"); } });
  Object.defineProperty(globalThis, "navigator", { configurable: true, value: { sendBeacon: () => { throw new TypeError("bad url"); } } });
  const h = host(o);
  assert.equal(h.load(false, "dev"), null);
  assert.equal(h.load(true, "tab"), null);
  h.keep(false, "dev", "x");
  h.keep(true, "seq", 3);
  assert.equal(h.beacon([{ s: "{}" }]), false);
  assert.match(h.uuid(), /^[0-9a-z-]{16,}$/);
});

test("keep: objects as JSON, undefined removes, under trueup.<key>", () => {
  const m = new Map();
  globalThis.localStorage = { setItem: (k, v) => m.set(k, String(v)), removeItem: (k) => m.delete(k), getItem: (k) => m.get(k) ?? null };
  const h = host(o);
  h.keep(false, "attr", { first: { utm_source: "x" } });
  h.keep(false, "sess", "s-1 1000");
  assert.equal(m.get("trueup.attr"), '{"first":{"utm_source":"x"}}');
  assert.equal(h.load(false, "sess"), "s-1 1000");
  h.keep(false, "sess", undefined);
  assert.equal(h.load(false, "sess"), null);
});

test("post: status, Retry-After and the answer of a 2xx; [] for a network error or a timeout", async () => {
  let seen;
  const reply = (status, json, headers = {}) => async (url, init) => {
    seen = { url, init };
    return { status, ok: status < 300, headers: { get: (h) => headers[h] ?? null }, json: async () => json };
  };
  globalThis.fetch = reply(200, { results: [] });
  assert.deepEqual(await post("/_r/q", "{}", 1000), [200, NaN, { results: [] }]);
  assert.equal(seen.init.method, "POST");
  assert.equal(seen.init.keepalive, true);
  assert.equal(typeof seen.init.body, "string", "text/plain: CORS-simple");
  globalThis.fetch = reply(503, null, { "retry-after": "30" });
  assert.deepEqual(await post("/_r/q", "{}", 1000), [503, 30, undefined]);
  globalThis.fetch = async () => ({ status: 200, ok: true, headers: { get: () => null }, json: async () => { throw new SyntaxError("bad"); } });
  assert.deepEqual(await post("/_r/q", "{}", 1000), [200, NaN, undefined], "an unreadable answer");
  globalThis.fetch = async () => { throw new TypeError("Failed to fetch"); };
  assert.deepEqual(await post("/_r/q", "{}", 1000), []);
  globalThis.fetch = (url, init) => new Promise((_, ko) => init.signal.addEventListener("abort", () => ko(init.signal.reason)));
  const t0 = Date.now();
  assert.deepEqual(await post("/_r/q", "{}", 50), []);
  assert.ok(Date.now() - t0 < 1000);
});

test("sizes are UTF-8 bytes, and a body over the keepalive limit is not sent but answered 413", async () => {
  const r = host(o).event("id-u", "x", "event/1", 1, 1, { t: "中".repeat(1000) }, {}, ids, {});
  assert.equal(r.b, Buffer.byteLength(r.s), "what the relay and the keepalive budget count");
  assert.ok(r.b > r.s.length + 1900);
  let sent = 0;
  globalThis.fetch = async () => (sent++, { status: 200, ok: true, headers: { get: () => null }, json: async () => ({}) });
  assert.deepEqual(await post("/_r/q", "中".repeat(22000), 1000), [413], "66 KB in UTF-8");
  assert.equal(sent, 0);
  assert.equal((await post("/_r/q", "x".repeat(60000), 1000))[0], 200);
});
