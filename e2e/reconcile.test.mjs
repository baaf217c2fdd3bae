// Reconciliation with known ground truth. A generator signs N users up through the demo shop
// (the real `trueup-demo` system of record in front of the real relay) in real Chromium, and
// pays one order for each, while a known share of their client events is lost the way it is
// in the wild:
//   - an ad blocker blocks the relay's path for some visitors (the agent never loads; their
//     attribution is unknown too, because the page could not read it);
//   - some tabs are killed after the shop committed the signup but before the page's
//     `track()` ran (they never reach checkout);
//   - some visitors arrive without any campaign parameters or referrer (unknown attribution).
// Checkout answers 503 after committing for 30 % of requests, so the page retries with the same
// idempotency key. `trueup-relay reconcile --json` must then report exactly the gaps and
// unknown-attribution shares the generator decided in advance, and the server events must
// equal the truth: no retried checkout counted twice.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { Relay, launch, until, ready, readyFile, ROOT } from "./harness.mjs";

const DEMO = process.env.TRUEUP_DEMO_BIN || join(ROOT, "target/debug/trueup-demo");
const RELAY_BIN = process.env.TRUEUP_RELAY_BIN || join(ROOT, "target/debug/trueup-relay");
const N = 20;
const blocked = (i) => i % 5 === 0; // ad-blocked: 0, 5, 10, 15
const killed = (i) => i % 10 === 3; // tab killed before track(): 3, 13
const noCampaign = (i) => i % 4 === 1; // arrives with no UTM: 1, 5, 9, 13, 17

/** The demo shop on a port the system picks (from its ready file); returns its origin too. */
async function startDemo(relay, db) {
  if (!existsSync(DEMO)) throw new Error(`${DEMO} is missing: run cargo build -p trueup-demo`);
  const readyPath = join(relay.dir, "demo.ready.json");
  const proc = spawn(
    DEMO,
    ["--listen", "127.0.0.1:0", "--ready-file", readyPath, "--relay", relay.origin, "--db", db, "--www", join(ROOT, "www"), "--flaky-checkout", "0.3", "--seed", "5"],
    { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, RUST_LOG: "warn", TRUEUP_LOG: "warn" } },
  );
  let log = "";
  proc.stdout.on("data", (d) => (log += d));
  proc.stderr.on("data", (d) => (log += d));
  const origin = `http://${(await readyFile(readyPath, proc, () => log, 40000)).listen}`;
  await until("the demo shop to answer", async () => {
    if (proc.exitCode !== null) throw new Error(`trueup-demo exited:\n${log}`);
    try {
      return (await fetch(`${origin}/signup.html`)).ok;
    } catch {
      return false;
    }
  });
  return { proc, origin, log: () => log };
}

/** One visitor: lands on the signup page, signs up, and (unless the tab dies) pays. */
async function visitor(browser, origin, i) {
  const context = await browser.newContext();
  try {
    if (blocked(i)) await context.route(/\/_r\//, (route) => route.abort("blockedbyclient"));
    const page = await context.newPage();
    const query = noCampaign(i) ? "" : `?utm_source=newsletter&utm_medium=email&utm_campaign=c${i}`;
    await page.goto(`${origin}/signup.html${query}`);
    if (!blocked(i)) await ready(page);
    await page.fill("input[name=email]", `user${i}@example.test`);
    if (killed(i)) {
      // The shop commits the signup; the tab dies before the page sees the answer.
      const committed = new Promise((resolve) =>
        page.route("**/api/signup", async (route) => {
          const res = await route.fetch();
          resolve(res.status());
          await page.close();
        }),
      );
      await page.click("button");
      assert.equal(await committed, 201, `signup ${i} committed`);
      return;
    }
    await page.click("button");
    await page.waitForFunction(() => document.getElementById("out").textContent.startsWith("Welcome"), null, { timeout: 15000 });
    await page.goto(`${origin}/checkout.html`);
    if (!blocked(i)) await ready(page);
    await page.click("button");
    await page.waitForFunction(() => /Paid: order/.test(document.getElementById("out").textContent), null, { timeout: 30000 });
    const attempts = Number((await page.textContent("#out")).match(/\((\d+) attempts?\)/)[1]);
    if (!blocked(i)) await page.evaluate(() => window.trueup.flush());
    await page.close({ runBeforeUnload: true });
    return attempts;
  } finally {
    await context.close();
  }
}

test("reconciliation reports exactly the gap and unknown-attribution share the generator created", { timeout: 240000 }, async () => {
  const relay = await Relay.start({
    toml: [
      `schemas_file = "${join(ROOT, "relay/schemas.example.toml")}"`,
      `[rate_limit]\nper_ip_per_sec = 0\nper_site_per_sec = 0\ntrusted_proxies = ["127.0.0.1/32"]`,
      `[[sites]]\nkey = "demo"\nallow_same_origin = true\nserver_secrets = ["demo-server-secret-change-me"]`,
    ].join("\n"),
  });
  const db = join(relay.dir, "demo.sqlite");
  // The relay's own config plus the metrics, for the reconcile command.
  const config = join(relay.dir, "reconcile.toml");
  execFileSync("sh", ["-c", `cat "$1" - > "$2"`, "sh", relay.config, config], {
    input: `
[reconcile]
truth = "sqlite:${db}"
days = 1
trailing_days = 0
interval_secs = 0
[[reconcile.metrics]]
name = "signups"
event = "signup_completed"
truth_sql = "SELECT substr(created_at, 1, 10) AS day, count(*) AS actual, sum(attribution_known = 0) AS unknown_attribution FROM users GROUP BY 1"
[[reconcile.metrics]]
name = "orders"
event = "order_paid"
truth_sql = "SELECT substr(o.created_at, 1, 10) AS day, count(*) AS actual, sum(u.attribution_known = 0) AS unknown_attribution FROM orders o JOIN users u ON u.id = o.user_id GROUP BY 1"
`,
  });
  // The shop's proxy passes its Host as X-Forwarded-Host, which the relay trusts from
  // loopback: its pages count as the relay's own origin (allow_same_origin).
  const demo = await startDemo(relay, db);
  const demoOrigin = demo.origin;
  const browser = await launch();
  try {
    let attempts = 0;
    for (let i = 0; i < N; i++) attempts += (await visitor(browser, demoOrigin, i)) || 0;

    const ids = [...Array(N).keys()];
    const signupsTracked = ids.filter((i) => !blocked(i) && !killed(i)).length;
    const orders = ids.filter((i) => !killed(i)).length;
    const ordersTracked = signupsTracked;
    const unknownSignups = ids.filter((i) => noCampaign(i) || blocked(i)).length;
    const unknownOrders = ids.filter((i) => !killed(i) && (noCampaign(i) || blocked(i))).length;

    const count = (name, source) =>
      relay.query(`SELECT count(*) AS n FROM events WHERE name = '${name}' AND source = '${source}'`)[0].n;
    await until(
      "client and server events to reach the warehouse",
      async () => {
        await relay.drained();
        return count("signup_completed", "client") >= signupsTracked && count("order_paid", "client") >= ordersTracked &&
          count("signup_completed", "server") >= N && count("order_paid", "server") >= orders;
      },
      30000,
      250,
    );

    const report = JSON.parse(execFileSync(RELAY_BIN, ["--config", config, "reconcile", "--json"], { encoding: "utf8" }));
    const today = (name) => report.metrics.find((m) => m.name === name).days.at(-1);
    const signups = today("signups");
    const paid = today("orders");
    const pct = (a, b) => ((a - b) / a) * 100;
    assert.deepEqual(
      { actual: signups.actual, tracked: signups.tracked, server: signups.server, unknown: signups.unknown_attribution },
      { actual: N, tracked: signupsTracked, server: N, unknown: unknownSignups },
    );
    assert.equal(signups.gap_pct, pct(N, signupsTracked));
    assert.equal(signups.unknown_pct, (unknownSignups / N) * 100);
    assert.deepEqual(
      { actual: paid.actual, tracked: paid.tracked, server: paid.server, unknown: paid.unknown_attribution },
      { actual: orders, tracked: ordersTracked, server: orders, unknown: unknownOrders },
    );
    assert.equal(paid.gap_pct, pct(orders, ordersTracked));
    // The shop answered some checkouts 503 after committing and the page retried them, yet
    // the truth has one order per checkout and the server emitted one order_paid per order.
    assert.ok(attempts > orders, `some checkouts were retried (${attempts} attempts for ${orders} orders)`);
    const rows = execFileSync("sqlite3", [db, "SELECT count(*), count(DISTINCT idempotency_key) FROM orders"], { encoding: "utf8" }).trim();
    assert.equal(rows, `${orders}|${orders}`);
    const l = report.loss;
    assert.equal(l.identity_violations, 0, JSON.stringify(l));
    assert.equal(l.accepted_by_relay, l.in_warehouse, JSON.stringify(l));
    console.log(
      `reconcile: ${N} signups, ${signupsTracked} tracked (gap ${signups.gap_pct.toFixed(2)} %, expected ${pct(N, signupsTracked).toFixed(2)} %), ` +
        `unknown ${signups.unknown_pct.toFixed(2)} %; ${orders} orders, ${ordersTracked} tracked (gap ${paid.gap_pct.toFixed(2)} %), ` +
        `${attempts} checkout attempts, server events = truth; loss by stage: created ${l.created} → sent ${l.sent} → accepted ${l.accepted_by_relay} → warehouse ${l.in_warehouse}, ` +
        `duplicates removed ${l.duplicates_removed}`,
    );
  } finally {
    await browser.close();
    demo.proc.kill("SIGKILL");
    await relay.dispose();
  }
});
