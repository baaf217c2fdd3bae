// The npm path, as a user takes it: `import { init, track } from "trueup"` in an app bundled by
// Vite (e2e/npm-app). `vite build` must emit the wasm core and its glue as the app's own assets,
// and the built app, served by the relay, must load the core from there (application/wasm) and
// deliver every event exactly once, sent by the core (not the no-wasm fallback). Then the packed
// package, installed into an app's node_modules, under the Vite dev server; and importing it in
// plain Node (server-side rendering) must be harmless.
// Run: npm run e2e (builds nothing of trueup's; needs dist/ and the relay binary).

import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { Relay, ROOT, launch, delivery, runId, until, droppedSum } from "./harness.mjs";

const APP = join(ROOT, "e2e/npm-app");
const VITE = join(ROOT, "node_modules/vite/bin/vite.js");
const DIST = join(ROOT, "dist");
const manifest = JSON.parse(readFileSync(join(DIST, "manifest.json"), "utf8"));
const N = 50;

/** A cleanup stack for test `t`, emptied (last in, first out) when it ends. */
function cleanups(t) {
  const stack = [];
  t.after(async () => {
    for (const fn of stack.reverse()) await fn();
  });
  return stack;
}

const dropped = droppedSum;

/** Every response the context gets: {path, status, type}. */
function recordResponses(context) {
  const seen = [];
  context.on("response", (r) => {
    const u = new URL(r.url());
    if (u.protocol.startsWith("http")) {
      seen.push({ path: u.pathname, status: r.status(), type: r.headers()["content-type"] || "" });
    }
  });
  return seen;
}

/**
 * Opens the app with `?run=`, waits for the core, clicks "Add to cart" N times and checks that
 * the N events (and the load event) reach the warehouse exactly once, sent by the wasm core, and
 * that the agent's counters add up. Returns the page's responses.
 */
async function clickThrough(browser, relay, origin, label) {
  const context = await browser.newContext();
  const responses = recordResponses(context);
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  let navigations = 0;
  page.on("framenavigated", (f) => f === page.mainFrame() && navigations++);
  const run = runId();
  await page.goto(`${origin}/?run=${run}&utm_source=npm-e2e&utm_campaign=${run}`);
  await page.waitForFunction(() => window.npmApp);
  await page.evaluate(() => window.npmApp.ready);
  const early = await page.evaluate(() => window.npmApp.stats());
  assert.equal(early.error, undefined, `the core did not start: ${early.error}`);
  assert.equal(early.degraded, undefined);
  assert.equal(early.enqueued, early.acked + dropped(early) + early.pending, JSON.stringify(early));
  const attribution = await page.evaluate(() => window.npmApp.attribution());
  assert.equal(attribution.first?.utm_campaign, run, "attribution() comes from the core");

  for (let i = 0; i < N; i++) await page.click("#buy");
  assert.equal(await page.evaluate(() => window.npmApp.clicks()), N);
  await until(`${N} clicks in the warehouse`, async () => {
    await relay.drained();
    return delivery(relay, run, N).delivered === N;
  });
  const r = delivery(relay, run, N);
  console.log(`${label}: delivered ${r.delivered}/${N} duplicates ${r.dup} missing ${r.missing.length}`);
  assert.deepEqual(r.missing, []);
  assert.equal(r.dup, 0);
  const rows = relay.query(
    `SELECT id, name, device_id, context->>'degraded' AS degraded FROM events
     WHERE props->>'run' = '${run}' OR props->>'load' = '${run}'`,
  );
  assert.equal(rows.length, N + 1, "the clicks and the load event, each once");
  assert.equal(new Set(rows.map((e) => e.id)).size, N + 1);
  assert.equal(rows.filter((e) => e.name === "app_loaded").length, 1);
  assert.deepEqual(rows.filter((e) => e.degraded !== null), [], "sent by the wasm core, not the no-wasm fallback");

  // The counters: wait for the last acks to be read, then enqueued = acked + dropped + pending,
  // and everything this device enqueued is in the warehouse.
  const stats = await until("the agent's acks", async () => {
    const s = await page.evaluate(() => window.npmApp.stats());
    return s.acked >= N + 1 && s.pending === 0 && s;
  });
  console.log(`${label}: stats once ready ${JSON.stringify(early)}, at the end ${JSON.stringify(stats)}`);
  assert.equal(stats.enqueued, stats.acked + dropped(stats) + stats.pending);
  assert.equal(dropped(stats), 0);
  assert.equal(stats.degraded, undefined);
  assert.equal(stats.error, undefined);
  // Events carry the core's device id, or "<device>.<tab>" (one sequence stream per tab).
  const devices = [...new Set(rows.map((e) => e.device_id))];
  assert.equal(devices.length, 1, `one device stream: ${devices}`);
  assert.ok(devices[0] === stats.device_id || devices[0].startsWith(stats.device_id + "."),
    `${devices[0]} is the core's device ${stats.device_id}`);
  const byDevice = relay.query(`SELECT count(*) AS n FROM events
    WHERE device_id = '${stats.device_id}' OR device_id LIKE '${stats.device_id}.%'`)[0].n;
  assert.equal(byDevice, stats.enqueued, "all the device enqueued is in the warehouse");

  assert.deepEqual(errors, [], "no uncaught error in the page");
  assert.equal(navigations, 1, "the page was not reloaded");
  await context.close();
  return responses;
}

test("vite build: the app emits the core as its own assets, loads it from there and delivers every event once", async (t) => {
  const cleanup = cleanups(t);
  const out = mkdtempSync(join(tmpdir(), "trueup-npm-app-"));
  cleanup.push(() => rmSync(out, { recursive: true, force: true }));
  const log = execFileSync(process.execPath, [VITE, "build", APP, "--outDir", out, "--emptyOutDir"], {
    cwd: APP, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"],
  });
  console.log(log.trim());

  // The wasm, byte for byte the package's, and the glue, as assets of the app.
  const assets = readdirSync(join(out, "assets"));
  const wasm = assets.filter((f) => f.endsWith(".wasm"));
  assert.equal(wasm.length, 1, `one wasm among ${assets}`);
  assert.ok(readFileSync(join(out, "assets", wasm[0])).equals(readFileSync(join(DIST, manifest.wasm))),
    "the emitted wasm is dist's");
  const glueStem = manifest.glue.replace(/\.js$/, "");
  assert.ok(assets.some((f) => f.startsWith(glueStem) && f.endsWith(".js")), `the glue among ${assets}`);

  const relay = await Relay.start({ site: out });
  cleanup.push(() => relay.dispose());
  const browser = await launch();
  cleanup.push(() => browser.close());
  const responses = await clickThrough(browser, relay, relay.origin, "vite build");

  const wasmLoads = responses.filter((r) => r.path.endsWith(".wasm"));
  assert.deepEqual(wasmLoads, [{ path: `/assets/${wasm[0]}`, status: 200, type: "application/wasm" }]);
  assert.ok(responses.some((r) => r.path.startsWith(`/assets/${glueStem}`) && r.status === 200 && /javascript/.test(r.type)),
    "the glue came from the app's assets");
  assert.deepEqual(responses.filter((r) => r.path.startsWith("/_r/a/")), [], "nothing from the relay's copy");
});

test("installed from the packed tarball, Vite dev server proxying /_r to the relay: the core loads and delivers", async (t) => {
  const cleanup = cleanups(t);
  // What `npm install trueup` puts in an app: the tarball's files under node_modules/trueup.
  const tmp = mkdtempSync(join(tmpdir(), "trueup-npm-dev-"));
  cleanup.push(() => rmSync(tmp, { recursive: true, force: true }));
  const [{ filename }] = JSON.parse(execFileSync("npm", ["pack", "--json", "--pack-destination", tmp], {
    cwd: ROOT, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"],
  }));
  const app = join(tmp, "app");
  const installed = join(app, "node_modules/trueup");
  mkdirSync(installed, { recursive: true });
  execFileSync("tar", ["-xzf", join(tmp, filename), "-C", installed, "--strip-components=1"]);
  for (const f of ["index.html", "main.js", "vite.config.mjs"]) copyFileSync(join(APP, f), join(app, f));

  // Vite's proxy (`changeOrigin`) sends the relay's own Host; with `xfwd` it also sends the
  // page's as X-Forwarded-Host, which the relay reads from a trusted proxy, so its default
  // site takes the page's origin as its own (allow_same_origin) whatever port Vite got.
  const relay = await Relay.start({ site: app, toml: [
    "[rate_limit]", "per_ip_per_sec = 0", "per_site_per_sec = 0", `trusted_proxies = ["127.0.0.1/32"]`,
  ].join("\n") });
  cleanup.push(() => relay.dispose());
  const { createServer } = await import("vite");
  const server = await createServer({
    root: app,
    configFile: join(app, "vite.config.mjs"),
    logLevel: "warn",
    server: { host: "127.0.0.1", port: 0, strictPort: true, proxy: { "/_r": { target: relay.origin, changeOrigin: true, xfwd: true } } },
  });
  cleanup.push(() => server.close());
  await server.listen();
  const origin = `http://127.0.0.1:${server.httpServer.address().port}`;
  const browser = await launch();
  cleanup.push(() => browser.close());
  const responses = await clickThrough(browser, relay, origin, "vite dev (installed)");

  const wasmLoads = responses.filter((r) => r.path.endsWith(".wasm"));
  assert.deepEqual(wasmLoads, [{ path: `/node_modules/trueup/dist/${manifest.wasm}`, status: 200, type: "application/wasm" }]);
});

test("SSR: importing the package in plain Node and calling it throws nothing and touches no browser global", () => {
  // A fresh Node with getters on the browser's globals that record every read (and return what
  // was there, i.e. undefined). `import "trueup"` is the package's self-reference through
  // package.json's exports; it must be the same module as dist/trueup.js.
  const child = `
    const BROWSER = ["window", "document", "location", "navigator", "self", "addEventListener",
      "localStorage", "sessionStorage", "indexedDB", "history", "fetch", "XMLHttpRequest"];
    const touched = [];
    let phase = "import";
    for (const name of BROWSER) {
      const d = Object.getOwnPropertyDescriptor(globalThis, name);
      Object.defineProperty(globalThis, name, { configurable: true, get() {
        touched.push(phase + ":" + name);
        return d && (d.get ? d.get.call(globalThis) : d.value);
      } });
    }
    const before = new Set(Reflect.ownKeys(globalThis));
    const mod = await import(process.argv[1]);
    const viaExports = await import("trueup");
    phase = "calls";
    const returned = [];
    returned.push(mod.track("ssr_event", { a: 1 }), mod.page(), mod.identify("u-1", { plan: "pro" }),
      mod.consent(true), mod.reset());
    const init = await mod.init({ site: "demo" });
    mod.track("after_init", { b: 2 });
    const stats = await mod.stats();
    const attribution = mod.attribution();
    await mod.flush();
    await mod.shutdown();
    await new Promise((r) => setTimeout(r, 100));
    const added = Reflect.ownKeys(globalThis).filter((k) => !before.has(k)).map(String);
    console.log(JSON.stringify({ same: mod === viaExports, touched, added, returned, init, stats, attribution }));
  `;
  const out = execFileSync(process.execPath, ["--input-type=module", "-e", child, pathToFileURL(join(DIST, "trueup.js")).href], {
    cwd: ROOT, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"],
  });
  const r = JSON.parse(out.trim().split("\n").pop());
  console.log(`ssr: ${JSON.stringify(r)}`);
  assert.equal(r.same, true, "import('trueup') resolves to dist/trueup.js");
  assert.deepEqual(r.touched.filter((t) => t.startsWith("import:")), [], "importing reads no browser global");
  // The calls ask whether there is a window (typeof window) and go no further. (They also read
  // `location`, in the default parameters of the stub's _replay, evaluated before its window
  // check: a ReferenceError here, caught by its guard. Harmless, but allowed for, not wanted.)
  const calls = new Set(r.touched);
  calls.delete("calls:location");
  assert.deepEqual([...calls], ["calls:window"]);
  assert.deepEqual(r.added, [], "no global defined");
  assert.deepEqual(r.returned, [null, null, null, null, null]); // undefined, as JSON
  assert.equal(r.init, undefined);
  assert.equal(r.stats.enqueued, 0);
  assert.equal(r.stats.buffered, 0);
  assert.deepEqual(r.attribution, {});
});
