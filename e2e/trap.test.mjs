// A panic in the real wasm core, in headless Chromium through the real relay. The core is built
// by the real build (build.mjs, size profile, no_std panic handler) with the `test-trap` feature,
// whose marker events make it panic: `trueup:trap` inside the call, `trueup:trap-later` in the
// next write (in the background, from a microtask). Each time: nothing is thrown into the page
// (no error or unhandled rejection reaches it), the stub counts the trap (`wasm_panic`), its
// fallback takes over and delivers the trapped call and every later one exactly once, and
// flush()/stats() still resolve. Run: node --test e2e/trap.test.mjs (builds its own core;
// needs cargo, wasm-bindgen and the relay binary).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Relay, launch, runId, ROOT, ready, stats, trackN, allArrive } from "./harness.mjs";

let relay;
let browser;
let assets;

before(async () => {
  assets = mkdtempSync(join(tmpdir(), "trueup-trap-core-"));
  execFileSync(process.execPath, [join(ROOT, "crates/agent/js/build.mjs"), "--features", "test-trap", "--out", assets],
    { cwd: ROOT, stdio: ["ignore", "ignore", "inherit"] });
  relay = await Relay.start({ site: join(ROOT, "e2e/sites"), assets });
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await relay?.dispose();
  if (assets) rmSync(assets, { recursive: true, force: true });
});

/** A page of the site whose uncaught errors and unhandled rejections are recorded. */
async function openPage() {
  const context = await browser.newContext();
  await context.addInitScript(() => {
    window.__thrown = [];
    addEventListener("error", (e) => window.__thrown.push(`error: ${e.message}`));
    addEventListener("unhandledrejection", (e) => window.__thrown.push(`unhandledrejection: ${e.reason}`));
  });
  const page = await context.newPage();
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  await page.goto(`${relay.origin}/plain/`);
  await ready(page);
  return { context, page, thrown: async () => [...pageErrors, ...(await page.evaluate(() => window.__thrown))] };
}


const via = (run) => relay.query(
  `SELECT props->>'i' AS i, context->>'degraded' AS degraded FROM events WHERE props->>'run' = '${run}' ORDER BY 1`);

test("a panic inside a call: caught, counted, the call and the later ones go by the fallback", async () => {
  const { context, page, thrown } = await openPage();
  const run = runId();
  await trackN(page, run, 3, 0);
  await page.evaluate(() => window.trueup.flush());
  await allArrive(relay, run, 3, "trap (before)", 30000);
  const returned = await page.evaluate((run) => {
    window.trueup.track("trueup:trap", { run, i: 3 });
    return true;
  }, run);
  assert.equal(returned, true, "track() returned normally");
  await trackN(page, run, 3, 4);
  await page.evaluate(() => window.trueup.flush()); // resolves
  const s = await stats(page);
  assert.equal(s.wasm_panic, 1, JSON.stringify(s));
  assert.equal(s.degraded, "no_wasm");
  assert.match(s.error, /RuntimeError: unreachable/);
  await allArrive(relay, run, 7, "trap (call)", 30000);
  const rows = via(run);
  assert.deepEqual(rows.filter((r) => r.degraded === "no_wasm").map((r) => Number(r.i)).sort(), [3, 4, 5, 6],
    "the trapped call and the later ones went by the fallback");
  assert.deepEqual(await thrown(), [], "nothing was thrown into the page");
  await context.close();
});

test("a panic in the background (a write): caught, counted at the next call, the fallback delivers", async () => {
  const { context, page, thrown } = await openPage();
  const run = runId();
  await trackN(page, run, 2, 0);
  await page.evaluate(() => window.trueup.flush());
  await allArrive(relay, run, 2, "trap-later (before)", 30000);
  // The call itself succeeds; the write of this task traps in a microtask. (That task's events
  // die with the core: they were in its memory only. Earlier ones are in IndexedDB.)
  await page.evaluate((run) => window.trueup.track("trueup:trap-later", { run, i: 99 }), run);
  await page.evaluate(() => window.trueup.flush()); // resolves; the stub learns of the trap here
  await trackN(page, run, 3, 2);
  const s = await stats(page);
  assert.equal(s.wasm_panic, 1, JSON.stringify(s));
  assert.equal(s.degraded, "no_wasm");
  assert.match(s.error, /RuntimeError: unreachable/, "the trap itself, not a later symptom of it");
  await allArrive(relay, run, 5, "trap (background)", 30000);
  assert.deepEqual(via(run).filter((r) => r.degraded === "no_wasm").map((r) => Number(r.i)).sort(), [2, 3, 4]);
  assert.deepEqual(await thrown(), [], "nothing was thrown into the page");
  await context.close();
});
