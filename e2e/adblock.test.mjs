// Ad-block exposure: uBlock Origin's own engine (npm @gorhill/ubo-core) loaded with the filter
// lists Debian's webext-ublock-origin-chromium package ships (EasyList, EasyPrivacy, uBO's
// filters/privacy/badware/quick-fixes/unbreak, URLhaus, and any other list it has).
//
// 1. None of trueup's default first-party URLs (the page, loader, glue, wasm, the collection and
//    server paths) is blocked on a site https://shop.example.com; the peers' default hosted URLs
//    and first-party proxy shapes are evaluated too, for the record (at least one must be
//    blocked, or the engine is not working).
// 2. In Chromium, every request of the context is routed through the same engine and aborted
//    when it blocks (as the extension would); the steady scenario (200 events over 2 s) arrives
//    in the warehouse exactly once, while a control request to a peer URL in the same page is
//    aborted.
//
// Verdicts go to e2e/results/adblock.json. Run: node --test e2e/adblock.test.mjs
// (TRUEUP_UBO_ASSETS overrides where the package's assets/ folder is looked for.)

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync, existsSync, readdirSync, mkdirSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { createRequire } from "node:module";
import { Relay, launch, delivery, runId, until, ROOT } from "./harness.mjs";

const ASSETS = process.env.TRUEUP_UBO_ASSETS || "/usr/share/chromium/extensions/ublock-origin/assets";
const SITE = "https://shop.example.com";
// What uBO on Chromium puts in its environment (vapi-common.js: ublock, webext, ipaddress,
// native_css_has, chromium, user_stylesheet): used to resolve the lists' `!#if` blocks as the
// extension does before compiling them.
const ENV = ["ublock", "webext", "ipaddress", "native_css_has", "chromium", "user_stylesheet"];
// The lists every uBO install has on by default and this package must ship.
const REQUIRED = ["easylist", "easyprivacy", "ublock-filters", "ublock-privacy", "ublock-badware", "ublock-quick-fixes", "ublock-unbreak"];
const MISSING = "apt-get install webext-ublock-origin-chromium (uBlock Origin's filter lists; .ci/setup installs it)";

let engine; // the single StaticNetFilteringEngine instance
let lists = []; // [{name, file, raw (pruned), lines: Set}]
const results = { engine: {}, lists: [], trueup: [], peers: [], browser: null };

/** The package's filter lists, as the extension would compile them. */
function loadLists(utils) {
  const index = join(ASSETS, "assets.json");
  if (!existsSync(index)) throw new Error(`${index} is missing: ${MISSING}`);
  const assets = JSON.parse(readFileSync(index, "utf8"));
  const out = [];
  const seen = new Set();
  for (const [name, a] of Object.entries(assets)) {
    if (a.content !== "filters") continue;
    const file = [].concat(a.contentURL || [])
      .filter((u) => typeof u === "string" && u.startsWith("assets/"))
      .map((u) => join(ASSETS, u.slice("assets/".length)))
      .find((f) => existsSync(f));
    if (!file) continue;
    seen.add(file);
    out.push({ name, file });
  }
  // Any other list text the package has that assets.json does not name (not badlists.txt, which
  // lists bad lists, not filters).
  const walk = (dir) => readdirSync(dir, { withFileTypes: true }).flatMap((d) =>
    d.isDirectory() ? walk(join(dir, d.name)) : d.name.endsWith(".txt") ? [join(dir, d.name)] : []);
  for (const file of walk(ASSETS)) {
    if (seen.has(file) || file.endsWith("/badlists.txt")) continue;
    out.push({ name: file.slice(ASSETS.length + 1), file });
  }
  const missing = REQUIRED.filter((n) => !out.some((l) => l.name === n));
  if (missing.length) throw new Error(`filter lists ${missing.join(", ")} not found under ${ASSETS}: ${MISSING}`);
  for (const l of out) {
    l.raw = utils.preparser.prune(readFileSync(l.file, "utf8"), ENV);
    l.lines = new Set(l.raw.split(/\r?\n/).map((s) => s.trim()));
  }
  return out;
}

/** Matches one request; {verdict: blocked|allowed|none, filter, list}. */
function match(url, type, originURL = `${SITE}/`) {
  const r = engine.matchRequest({ originURL, url, type });
  const out = { verdict: r === 1 ? "blocked" : r === 2 ? "allowed" : "none" };
  if (r !== 0) {
    const log = engine.toLogData() || {};
    out.filter = log.raw;
    Object.assign(out, source(log.raw));
  }
  return out;
}

/** Which list (and line) a filter comes from: the engine logs it normalized ($3p for
 * $third-party, from= for domain=, …), so an exact line, else the lines with its pattern. */
function source(raw) {
  if (!raw) return {};
  const exact = lists.filter((l) => l.lines.has(raw));
  if (exact.length) return { list: exact.map((l) => l.name).join(",") };
  const cut = raw.indexOf("$");
  const pattern = cut < 0 ? raw : raw.slice(0, cut);
  const hits = [];
  for (const l of lists) for (const line of l.lines) if (line === pattern || line.startsWith(pattern + "$")) hits.push({ l: l.name, line });
  if (!hits.length) return {};
  return { list: [...new Set(hits.map((h) => h.l))].join(","), lines: hits.map((h) => `${h.l}: ${h.line}`).slice(0, 5) };
}

before(async () => {
  const t0 = Date.now();
  const require = createRequire(import.meta.url);
  let ubo;
  try {
    ubo = await import("@gorhill/ubo-core");
  } catch (e) {
    throw new Error(`@gorhill/ubo-core is missing: npm install (${e.message})`);
  }
  const { utils } = await import("@gorhill/ubo-core/js/static-filtering-parser.js");
  lists = loadLists(utils);
  // The public suffix list the package ships (first/third party is decided with it).
  const psl = join(ASSETS, "thirdparties/publicsuffix.org/list/effective_tld_names.dat");
  const ownPsl = existsSync(psl) && ubo.pslInit(readFileSync(psl, "utf8"));
  engine = await ubo.StaticNetFilteringEngine.create({ noPSL: !!ownPsl });
  await engine.useLists(lists.map(({ name, raw }) => ({ name, raw })));
  let deb = "unknown";
  try {
    deb = execFileSync("dpkg-query", ["-W", "-f=${Version}", "webext-ublock-origin-chromium"], { encoding: "utf8" });
  } catch {}
  results.engine = {
    ubo_core: require("@gorhill/ubo-core/package.json").version,
    debian_package: `webext-ublock-origin-chromium ${deb}`,
    env: ENV,
    public_suffix_list: ownPsl ? psl : "ubo-core's bundled copy",
    load_ms: Date.now() - t0,
  };
  results.lists = lists.map((l) => ({ name: l.name, file: l.file, lines: l.lines.size }));
  console.log(`adblock: engine ${results.engine.ubo_core}, ${results.engine.debian_package}, ${lists.length} lists (${lists.map((l) => l.name).join(", ")}) in ${results.engine.load_ms} ms`);
});

after(() => {
  const dir = join(ROOT, "e2e/results");
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, "adblock.json"), JSON.stringify({ when: new Date().toISOString(), site: SITE, ...results }, null, 2) + "\n");
});

/** The agent's file names: dist/manifest.json, else what dist/ holds. */
function agentFiles() {
  const dist = join(ROOT, "dist");
  if (existsSync(join(dist, "manifest.json"))) {
    const m = JSON.parse(readFileSync(join(dist, "manifest.json"), "utf8"));
    return { loader: m.loader, glue: m.glue, wasm: m.wasm };
  }
  const files = existsSync(dist) ? readdirSync(dist) : [];
  const glue = files.find((f) => /^trueup_agent\.[0-9a-f]+\.js$/.test(f));
  const wasm = files.find((f) => /^trueup_agent_bg\.[0-9a-f]+\.wasm$/.test(f));
  assert.ok(glue && wasm, "dist/ has no agent build: run npm run build");
  return { loader: "loader.js", glue, wasm };
}

// trueup's defaults (relay: prefix /_r, assets a/, collection q, server s), with every type a
// browser (and uBO on Chromium) would give the request, plus the types other browsers use.
function trueupURLs() {
  const f = agentFiles();
  const A = `${SITE}/_r/a/`;
  const send = ["xmlhttprequest", "ping", "beacon", "other"];
  return [
    { what: "page", url: `${SITE}/`, types: ["main_frame", "sub_frame"], originURL: `${SITE}/` },
    { what: "page (path)", url: `${SITE}/plain/`, types: ["main_frame"], originURL: `${SITE}/plain/` },
    { what: "loader", url: A + f.loader, types: ["script"] },
    { what: "glue", url: A + f.glue, types: ["script", "other"] },
    { what: "glue (retry)", url: `${A}${f.glue}?retry=1`, types: ["script"] },
    { what: "wasm", url: A + f.wasm, types: ["xmlhttprequest", "other"] },
    { what: "collect", url: `${SITE}/_r/q`, types: send },
    { what: "collect gzip", url: `${SITE}/_r/q?z=gzip`, types: send },
    { what: "server", url: `${SITE}/_r/s`, types: ["xmlhttprequest", "other"] },
  ];
}

const PEERS = [
  { what: "posthog capture", url: "https://us.i.posthog.com/e/", type: "xmlhttprequest" },
  { what: "posthog capture (v0)", url: "https://us.i.posthog.com/i/v0/e/", type: "xmlhttprequest" },
  { what: "posthog array.js", url: "https://us-assets.i.posthog.com/static/array.js", type: "script" },
  { what: "segment cdn", url: "https://cdn.segment.com/analytics.js/v1/abc123/analytics.min.js", type: "script" },
  { what: "segment api", url: "https://api.segment.io/v1/batch", type: "xmlhttprequest" },
  { what: "rudderstack cdn", url: "https://cdn.rudderlabs.com/v3/modern/rsa.min.js", type: "script" },
  { what: "rudderstack dataplane", url: "https://acme.dataplane.rudderstack.com/v1/batch", type: "xmlhttprequest" },
  { what: "snowplow jsdelivr", url: "https://cdn.jsdelivr.net/npm/@snowplow/javascript-tracker@4/dist/sp.js", type: "script" },
  { what: "snowplow collector", url: "https://collector.snowplowanalytics.com/com.snowplowanalytics.snowplow/tp2", type: "xmlhttprequest" },
  { what: "1p proxy: segment cdn shape", url: `${SITE}/analytics.js/v1/x/analytics.min.js`, type: "script" },
  { what: "1p proxy: segment beacon shape", url: `${SITE}/beacon/v1/batch?`, type: "xmlhttprequest" },
  { what: "1p proxy: snowplow tp2 shape", url: `${SITE}/com.snowplowanalytics.snowplow/tp2`, type: "xmlhttprequest" },
];

const summary = {};

test("static: trueup's default first-party URLs are not blocked; which peer URLs are", () => {
  for (const u of trueupURLs()) {
    for (const type of u.types) {
      results.trueup.push({ what: u.what, url: u.url, type, ...match(u.url, type, u.originURL) });
    }
  }
  for (const p of PEERS) results.peers.push({ ...p, ...match(p.url, p.type) });

  const byURL = new Map();
  for (const r of results.trueup) byURL.set(r.url, (byURL.get(r.url) || false) || r.verdict === "blocked");
  const blocked = results.trueup.filter((r) => r.verdict === "blocked");
  const peersBlocked = results.peers.filter((r) => r.verdict === "blocked");
  summary.trueup = `${[...byURL.values()].filter(Boolean).length}/${byURL.size}`;
  summary.peers = `${peersBlocked.length}/${PEERS.length} (${peersBlocked.map((p) => p.what).join(", ")})`;
  for (const r of results.trueup) if (r.verdict !== "none") console.log(`  trueup ${r.what} [${r.type}] ${r.verdict} by ${r.filter} (${r.list})`);
  for (const r of results.peers) console.log(`  peer ${r.verdict === "blocked" ? "BLOCKED" : r.verdict} ${r.what} ${r.url}${r.filter ? ` by ${r.filter} (${r.list})` : ""}`);
  assert.deepEqual(blocked.map((r) => `${r.url} [${r.type}] by ${r.filter} (${r.list})`), [], "a trueup default URL is blocked");
  assert.ok(peersBlocked.length > 0, "no peer URL is blocked: the engine is not working");
});

// Playwright's resourceType() → the type Chromium's webRequest gives uBO.
const TYPES = {
  stylesheet: "stylesheet", image: "image", media: "media", font: "font", script: "script",
  xhr: "xmlhttprequest", fetch: "xmlhttprequest", websocket: "websocket", ping: "ping",
  cspviolationreport: "csp_report", texttrack: "other", eventsource: "other", manifest: "other", other: "other",
};

test("browser: under the engine, the steady scenario arrives exactly once and a peer control is blocked", async () => {
  const relay = await Relay.start({ site: join(ROOT, "e2e/sites") });
  const browser = await launch();
  const seen = []; // {url, type, verdict, filter}
  const aborted = [];
  // Evaluate the relay's URLs as if they were on https://shop.example.com.
  const asSite = (u) => (u.startsWith(relay.origin) ? SITE + u.slice(relay.origin.length) : u);
  try {
    const context = await browser.newContext();
    await context.route("**/*", async (route) => {
      const req = route.request();
      let frame = null;
      try {
        frame = req.frame();
      } catch {}
      const rt = req.resourceType();
      const type = rt === "document" ? (frame && frame.parentFrame() ? "sub_frame" : "main_frame") : TYPES[rt] || "other";
      const url = asSite(req.url());
      const originURL = type === "main_frame" ? url : asSite((frame && frame.url()) || `${relay.origin}/`);
      const m = match(url, type, originURL.startsWith("http") ? originURL : `${SITE}/`);
      seen.push({ url: req.url(), as: url, type, verdict: m.verdict, filter: m.filter });
      if (m.verdict === "blocked") {
        aborted.push(req.url());
        await route.abort("blockedbyclient");
      } else {
        await route.continue();
      }
    });
    const page = await context.newPage();
    await page.goto(`${relay.origin}/plain/`);
    await page.waitForFunction(() => typeof window.trueup?.stats === "function");
    await page.evaluate(() => window.trueup.flush());

    // Steady: 200 events over 2 s (10 every 100 ms).
    const run = runId();
    await page.evaluate(async (run) => {
      for (let i = 0; i < 200; i++) {
        window.trueup.track("adblock_steady", { run, i });
        if (i % 10 === 9) await new Promise((r) => setTimeout(r, 100));
      }
    }, run);

    // The controls, in the same page: a fetch and a <script> tag to peers' hosted URLs.
    const control = {
      fetch: "https://cdn.segment.com/analytics.js/v1/abc123/analytics.min.js",
      script: "https://us-assets.i.posthog.com/static/array.js",
    };
    const outcome = await page.evaluate(async (c) => {
      const f = await fetch(c.fetch, { mode: "no-cors" }).then(() => "loaded", (e) => "failed: " + e.message);
      const s = await new Promise((res) => {
        const el = document.createElement("script");
        el.src = c.script;
        el.onload = () => res("loaded");
        el.onerror = () => res("failed");
        document.head.append(el);
      });
      return { fetch: f, script: s };
    }, control);

    await until("all 200 steady events in the warehouse", async () => {
      await relay.drained();
      return delivery(relay, run, 200).delivered === 200;
    }, 20000);
    await relay.drained();
    const r = delivery(relay, run, 200);
    const stats = await page.evaluate(() => window.trueup.stats());
    await context.close();

    const agent = agentFiles();
    const firstParty = seen.filter((s) => s.url.startsWith(relay.origin));
    results.browser = {
      delivered: r.delivered, expected: 200, duplicates: r.dup, missing: r.missing.length,
      degraded: stats.degraded || null, control: { ...control, outcome }, aborted,
      requests: seen,
    };
    summary.browser = `delivered ${r.delivered}/200 duplicates ${r.dup}`;
    console.log(`adblock: trueup URLs blocked ${summary.trueup ?? "?"}; peers blocked ${summary.peers ?? "?"}; steady under the engine: ${summary.browser}`);

    // The engine saw trueup's real requests, and let them through.
    for (const [what, path, type] of [
      ["page", "/plain/", "main_frame"], ["loader", `/_r/a/${agent.loader}`, "script"],
      ["glue", `/_r/a/${agent.glue}`, "script"], ["wasm", `/_r/a/${agent.wasm}`, "xmlhttprequest"],
      ["collect", "/_r/q", "xmlhttprequest"],
    ]) {
      assert.ok(firstParty.some((s) => new URL(s.url).pathname === path && s.type === type),
        `the ${what} request (${path}, ${type}) went through the engine: ${JSON.stringify(firstParty.map((s) => [s.url, s.type]))}`);
    }
    assert.deepEqual(firstParty.filter((s) => s.verdict === "blocked"), [], "a trueup request was blocked in the browser");
    assert.ok(!stats.degraded, `the core ran (not degraded): ${JSON.stringify(stats)}`);
    // The controls were blocked by the route, so this test can fail.
    assert.ok(aborted.includes(control.fetch), `the control fetch was not blocked: ${JSON.stringify(aborted)}`);
    assert.ok(aborted.includes(control.script), `the control script was not blocked: ${JSON.stringify(aborted)}`);
    assert.match(outcome.fetch, /^failed/);
    assert.equal(outcome.script, "failed");
    assert.deepEqual(r.missing, []);
    assert.equal(r.dup, 0);
  } finally {
    await browser.close();
    await relay.dispose();
  }
});
