// A local collector for the peer SDKs (npm run bench:peers): one node http server on loopback
// that plays, for each SDK, the vendor's ingestion API and CDN, so every SDK runs self-hosted:
//
//   /<sdk>/                the page for that SDK (the bundle from e2e/peers/dist, init, and at
//                          ?ttfr=<run> one track() at page start); /noagent/ has no SDK
//   /_sdk/<sdk>/<file>.js  the bundles (e2e/peers/build.mjs)
//   /ph/e/ /ph/batch/ …    posthog-js capture (JSON, or gzip / base64 / form-encoded bodies)
//   /seg/v1/{t,p,i,b,batch}  Segment tracking API; /seg-cdn/v1/projects/<key>/settings: its CDN settings
//   /rs/v1/{batch,track,…}   RudderStack data plane; /rs-cdn/sourceConfig/: its control plane's config
//   /rsb/beacon/v1/batch     RudderStack's beacon mode (the rudderstack-beacon variant)
//   /sp/com.snowplowanalytics.snowplow/tp2   Snowplow collector (payload_data POST, or GET /sp/i)
//
// Every event is decoded and recorded with the SDK's own event id (posthog `uuid`, Segment and
// RudderStack `messageId`, Snowplow `eid`) and the test's own properties `run` and `i`.
// Fault injection on the collection paths only (seeded; the ratio exact in every 10 consecutive
// requests): `failRatio` of requests answered 503 (Retry-After: 1, nothing recorded, as the
// relay's fault injection), `ackLostRatio` of requests read, recorded and then the socket
// destroyed without an answer; `stop()` / `start()` take the whole server down
// and up on the same port (connections refused in between). `assetResponse()` serves the pages,
// bundles and vendor configs without the server, for a Playwright route while it is down.
//
// `node e2e/peers/collector.mjs [port]` runs it on its own (after node e2e/peers/build.mjs).

import { createServer } from "node:http";
import { readFileSync, existsSync } from "node:fs";
import { join, normalize } from "node:path";
import { gunzipSync } from "node:zlib";
import { DIST } from "./build.mjs";

/** mulberry32: a small seeded generator, so a fault pattern can be repeated. */
export function seeded(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Which requests get a fault: {seed, failRatio, ackLostRatio}, exact per block of 10
 * consecutive requests (e.g. 3 of every 10), at positions drawn from the seeded generator, so
 * an SDK that makes few requests (batching) still meets its share. `next()`: "503",
 * "ack_lost" or null. Used by the collector and by the proxy in front of trueup's relay
 * (fault-proxy.mjs), so every SDK meets the same faults.
 */
export class FaultBag {
  constructor({ seed = 1, failRatio = 0, ackLostRatio = 0 } = {}) {
    Object.assign(this, { seed, failRatio, ackLostRatio });
    this.rand = seeded(seed);
    this.bag = [];
  }

  next() {
    if (!this.failRatio && !this.ackLostRatio) return null;
    if (!this.bag.length) {
      const slots = new Array(10).fill(null);
      let k = 0;
      for (let j = 0; j < Math.round(10 * this.failRatio); j++) slots[k++] = "503";
      for (let j = 0; j < Math.round(10 * this.ackLostRatio); j++) slots[k++] = "ack_lost";
      for (let j = slots.length - 1; j > 0; j--) {
        const r = Math.floor(this.rand() * (j + 1));
        [slots[j], slots[r]] = [slots[r], slots[j]];
      }
      this.bag = slots;
    }
    return this.bag.shift();
  }
}

/** The page for one SDK: its bundle as a module, init, and an optional track() at start. */
export function sdkPage(sdk, entry) {
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${sdk}</title><link rel="icon" href="data:,">
<script type="module">
import "/_sdk/${entry}";
window.__sdk.init(location.origin);
const run = new URLSearchParams(location.search).get("ttfr");
if (run) window.__sdk.track("bench_ttfr", { run, i: 0 });
</script>
</head><body>${sdk} through the local collector</body></html>
`;
}

const NOAGENT = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>no agent</title><link rel="icon" href="data:,"></head>
<body>a page of the same site without any SDK</body></html>
`;

/** Which SDK a collection request is for, from its path; null for anything else. */
export function collectionOf(method, pathname) {
  if (method === "POST" && pathname.startsWith("/ph/")) return "posthog";
  if (method === "POST" && pathname.startsWith("/seg/v1/")) return "segment";
  if (method === "POST" && pathname.startsWith("/rs/v1/")) return "rudderstack";
  if (method === "POST" && pathname.startsWith("/rsb/")) return "rudderstack-beacon";
  if (pathname.startsWith("/sp/")) return "snowplow";
  return null;
}

/** Decodes a body to JSON, whatever the SDK did to it (gzip, form field, base64). */
function decodeBody(buf, url, headers) {
  let b = buf;
  if (b.length >= 2 && b[0] === 0x1f && b[1] === 0x8b) b = gunzipSync(b);
  let text = b.toString("utf8");
  const ctype = headers["content-type"] || "";
  if (ctype.includes("x-www-form-urlencoded") || text.startsWith("data=")) {
    text = new URLSearchParams(text).get("data") ?? text;
  }
  const t = text.trim();
  if (t.startsWith("{") || t.startsWith("[")) return JSON.parse(t);
  // base64 (posthog's compression=base64)
  const decoded = Buffer.from(t, "base64");
  if (decoded.length >= 2 && decoded[0] === 0x1f && decoded[1] === 0x8b) return JSON.parse(gunzipSync(decoded).toString("utf8"));
  return JSON.parse(decoded.toString("utf8"));
}

const b64url = (s) => Buffer.from(s.replace(/-/g, "+").replace(/_/g, "/"), "base64").toString("utf8");

/** The events of one decoded request: [{id, name, run, i}] (run/i null when absent). */
export function eventsOf(sdk, body, url) {
  const out = [];
  const push = (id, name, props) =>
    out.push({ id: id ?? null, name: name ?? null, run: props?.run ?? null, i: props?.i ?? null });
  if (sdk === "posthog") {
    const list = Array.isArray(body) ? body : Array.isArray(body?.batch) ? body.batch : [body];
    for (const e of list) push(e.uuid, e.event, e.properties);
  } else if (sdk === "segment" || sdk === "rudderstack" || sdk === "rudderstack-beacon") {
    const list = Array.isArray(body?.batch) ? body.batch : [body];
    for (const e of list) push(e.messageId, e.event, e.properties);
  } else if (sdk === "snowplow") {
    const list = body ? (Array.isArray(body.data) ? body.data : [body]) : [Object.fromEntries(url.searchParams)];
    for (const e of list) {
      let ue = null;
      try {
        if (e.ue_pr) ue = JSON.parse(e.ue_pr);
        else if (e.ue_px) ue = JSON.parse(b64url(e.ue_px));
      } catch {}
      const data = ue?.data?.data;
      push(e.eid, data?.name ?? e.e, data);
    }
  }
  return out;
}

const TYPES = { ".js": "text/javascript", ".html": "text/html; charset=utf-8", ".json": "application/json" };

export class Collector {
  constructor({ port = 0, builds = {} } = {}) {
    this.port = port;
    this.builds = builds; // {sdk: {entry}} from buildPeers()
    this.sockets = new Set();
    this.reset();
    this.setFaults({});
  }

  /** Forgets every recorded event and request. */
  reset() {
    this.events = []; // {sdk, id, name, run, i, t, req}
    this.requests = []; // {t, method, path, sdk, status, fault, events, bytes}
    this.assets = []; // {t, path} of /_sdk/ files served
    this.others = []; // {t, method, path, status}: anything not a page, bundle, config or collection
    this.lastCollectAt = 0;
    this.requestSeq = 0;
  }

  /** {seed, failRatio, ackLostRatio}: faults on the collection paths from now on (FaultBag). */
  setFaults(faults) {
    this.faults = new FaultBag(faults);
  }

  get origin() {
    return `http://127.0.0.1:${this.port}`;
  }

  async start() {
    this.server = createServer((req, res) => this.handle(req, res));
    this.server.keepAliveTimeout = 5000;
    this.server.on("connection", (s) => {
      this.sockets.add(s);
      s.on("close", () => this.sockets.delete(s));
    });
    await new Promise((res, rej) => {
      this.server.once("error", rej);
      this.server.listen(this.port, "127.0.0.1", () => {
        this.server.off("error", rej);
        res();
      });
    });
    this.port = this.server.address().port;
    this.up = true;
  }

  /** Down: stops listening and breaks every open connection (the port then refuses). */
  async stop() {
    if (!this.server) return;
    this.up = false;
    const closed = new Promise((r) => this.server.close(r));
    for (const s of this.sockets) s.destroy();
    this.server.closeAllConnections?.();
    await closed;
    this.server = null;
  }

  /** A page, bundle or vendor config for `url` ({status, headers, body}), or null. */
  assetResponse(url) {
    const p = url.pathname;
    const json = (o) => ({ status: 200, headers: { "content-type": "application/json" }, body: JSON.stringify(o) });
    if (p === "/noagent/") return { status: 200, headers: { "content-type": TYPES[".html"] }, body: NOAGENT };
    const page = /^\/(posthog|segment|rudderstack|snowplow|rudderstack-beacon)\/$/.exec(p);
    if (page && this.builds[page[1]]) {
      return { status: 200, headers: { "content-type": TYPES[".html"], "cache-control": "no-store" }, body: sdkPage(page[1], this.builds[page[1]].entry) };
    }
    if (p.startsWith("/_sdk/")) {
      const file = normalize(join(DIST, p.slice("/_sdk/".length)));
      if (!file.startsWith(DIST) || !existsSync(file)) return { status: 404, headers: {}, body: "no such bundle" };
      this.assets.push({ t: Date.now(), path: p.slice("/_sdk/".length) });
      return { status: 200, headers: { "content-type": TYPES[".js"], "cache-control": "no-cache" }, body: readFileSync(file) };
    }
    // Segment's CDN settings (what cdn.segment.com serves for a write key): only its own
    // destination, pointed at this collector; no remote plugins, middleware or metrics.
    if (/^\/seg-cdn\/v1\/projects\/[^/]+\/settings$/.test(p)) {
      return json({
        integrations: {
          "Segment.io": { apiKey: "trueup_bench", apiHost: `${url.host}/seg/v1`, protocol: "http", retryQueue: true },
        },
        plan: { track: { __default: { enabled: true, integrations: {} } }, identify: { __default: { enabled: true } }, group: { __default: { enabled: true } } },
        edgeFunction: {},
        analyticsNextEnabled: true,
        middlewareSettings: {},
        enabledMiddleware: {},
        metrics: { sampleRate: 0 },
        legacyVideoPluginsEnabled: false,
        remotePlugins: [],
      });
    }
    // RudderStack's source config (what api.rudderstack.com/sourceConfig serves): an enabled
    // JavaScript source with no device-mode destinations.
    if (p.startsWith("/rs-cdn/sourceConfig")) {
      return json({
        isHosted: false,
        source: {
          id: "trueup-bench-source",
          name: "trueup bench",
          writeKey: "trueup_bench",
          workspaceId: "trueup-bench",
          enabled: true,
          config: { statsCollection: { errors: { enabled: false }, metrics: { enabled: false } } },
          sourceDefinitionId: "js",
          destinations: [],
        },
        updatedAt: new Date().toISOString(),
      });
    }
    return null;
  }

  handle(req, res) {
    const url = new URL(req.url, `http://${req.headers.host || "127.0.0.1"}`);
    const cors = {
      "access-control-allow-origin": req.headers.origin || "*",
      "access-control-allow-credentials": "true",
      "access-control-allow-headers": req.headers["access-control-request-headers"] || "*",
      "access-control-allow-methods": "GET, POST, OPTIONS",
    };
    if (req.method === "OPTIONS") {
      res.writeHead(204, cors).end();
      return;
    }
    const sdk = collectionOf(req.method, url.pathname);
    if (!sdk) {
      const a = this.assetResponse(url);
      if (a) {
        res.writeHead(a.status, { ...cors, ...a.headers }).end(a.body);
      } else {
        this.others.push({ t: Date.now(), method: req.method, path: url.pathname + url.search, status: 404 });
        res.writeHead(404, cors).end("not here");
      }
      return;
    }
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("error", () => {});
    req.on("end", () => {
      const t = Date.now();
      this.lastCollectAt = t;
      const n = ++this.requestSeq;
      const body = Buffer.concat(chunks);
      const entry = { n, t, method: req.method, path: url.pathname, sdk, status: 0, fault: null, events: 0, bytes: body.length };
      this.requests.push(entry);
      const fault = this.faults.next();
      if (fault === "503") {
        entry.status = 503;
        entry.fault = "503";
        res.writeHead(503, { ...cors, "retry-after": "1", "content-type": "application/json" }).end('{"error":"unavailable"}');
        return;
      }
      let events = [];
      try {
        const decoded = req.method === "GET" ? null : decodeBody(body, url, req.headers);
        events = eventsOf(sdk, decoded, url);
      } catch (e) {
        entry.status = 400;
        entry.error = String(e.message || e);
        res.writeHead(400, cors).end("bad body");
        return;
      }
      entry.events = events.length;
      for (const e of events) this.events.push({ sdk, ...e, t, req: n });
      if (fault === "ack_lost") {
        // Stored, and the answer lost: the sender cannot know.
        entry.fault = "ack_lost";
        req.socket.destroy();
        return;
      }
      entry.status = 200;
      const answer = sdk === "posthog" ? '{"status":1}' : sdk.startsWith("rudderstack") ? "OK" : "";
      res.writeHead(200, { ...cors, "content-type": sdk === "posthog" ? "application/json" : "text/plain" }).end(answer);
    });
  }

  /**
   * What arrived of run `run` (expected: a count, i = 0..n-1, or a list of i):
   * {delivered, expected, missing, received, dup, dupSameId, dupNewId, ids, extra}.
   * received: events of the run that arrived (all copies); dup = received - distinct i
   * (copies a warehouse without dedupe would count twice); dupSameId of them are resends with
   * an id already received (a dedupe by id removes them); dupNewId = the i that arrived under
   * more than one distinct id (no dedupe by id can remove those).
   */
  count(run, expected) {
    const want = typeof expected === "number" ? Array.from({ length: expected }, (_, i) => i) : expected;
    const evs = this.events.filter((e) => e.run === run);
    const byI = new Map();
    const byId = new Map();
    for (const e of evs) {
      const i = Number(e.i);
      if (!byI.has(i)) byI.set(i, new Set());
      byI.get(i).add(e.id);
      byId.set(e.id, (byId.get(e.id) || 0) + 1);
    }
    const wanted = new Set(want);
    const missing = want.filter((i) => !byI.has(i));
    const dupSameId = [...byId.values()].reduce((a, c) => a + c - 1, 0);
    const dupNewId = [...byI.values()].filter((s) => s.size > 1).length;
    return {
      delivered: want.length - missing.length,
      expected: want.length,
      missing,
      received: evs.length,
      dup: evs.length - byI.size,
      dupSameId,
      dupNewId,
      extra: [...byI.keys()].filter((i) => !wanted.has(i)),
    };
  }
}

if (process.argv[1] === import.meta.filename) {
  const { buildPeers } = await import("./build.mjs");
  const builds = await buildPeers();
  const c = new Collector({ port: Number(process.argv[2] || 8099), builds });
  await c.start();
  console.log(`collector on ${c.origin}: ${Object.keys(builds).map((s) => `${c.origin}/${s}/`).join(" ")}`);
  setInterval(() => {
    const byRun = {};
    for (const e of c.events) byRun[`${e.sdk}:${e.run}`] = (byRun[`${e.sdk}:${e.run}`] || 0) + 1;
    if (c.events.length) console.log(JSON.stringify({ requests: c.requests.length, events: c.events.length, byRun, others: c.others.slice(-5) }));
  }, 5000).unref?.();
}
