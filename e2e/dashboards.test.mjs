// The dashboards in Chromium against ground truth (issue 13). A generator puts a known data
// set through the real relay: a week of signups in the system of record (a SQLite truth
// database), the share of them the pages tracked (30 % missing, except yesterday: 70 %, a
// moved day), the backend's own server events, a retried batch (known duplicates), agents'
// counters with known drops by reason, known seq gaps, rejected events whose props hold an
// e-mail address. Then the quality page is opened as a user would (sign in with the admin
// token), and every figure on it must equal the generator's truth and `trueup-relay
// reconcile --json`. Also: no token, a wrong token, the public listener; the 30-day window;
// a truth database that cannot be reached and a relay with no data yet (clear states, never a
// blank chart).
//
// Screenshots for the README: TRUEUP_SCREENSHOTS=e2e/results node --test e2e/dashboards.test.mjs
// (npm run screenshots).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Relay, launch, until, ROOT } from "./harness.mjs";

const RELAY = process.env.TRUEUP_RELAY_BIN || join(ROOT, "target/debug/trueup-relay");
const TOKEN = "e2e-dashboards-admin-token-0123";
const DAY_MS = 86_400_000;
const SHOTS = process.env.TRUEUP_SCREENSHOTS;

// Per day, 6 days ago … today: signups that happened, signups the pages tracked, signups
// without attribution. Yesterday's tracking collapsed (gap 30 % → 70 %: moved).
const DAYS = [
  { actual: 20, tracked: 14, unknown: 4 },
  { actual: 20, tracked: 14, unknown: 4 },
  { actual: 20, tracked: 14, unknown: 6 },
  { actual: 20, tracked: 14, unknown: 4, seqGaps: [5, 9] },
  { actual: 20, tracked: 14, unknown: 4 },
  { actual: 20, tracked: 6, unknown: 10 },
  { actual: 10, tracked: 7, unknown: 2 },
];
const MOVED = 5; // index of yesterday
const RETRIED = 6; // today's batch is sent twice
const COUNTERS = [
  { device_id: "dev-a", enqueued: 50, sent: 47, acked: 45, retried: 2, pending: 3, dropped: { queue_full: 2 } },
  { device_id: "dev-b", enqueued: 10, sent: 5, acked: 5, retried: 0, pending: 1, dropped: { expired: 4 } },
  { device_id: "dev-c", enqueued: 4, sent: 0, acked: 0, retried: 0, pending: 0, dropped: { consent: 4 } },
];
const REJECTED = 3; // events with an unknown schema, their props an e-mail address
// Behaviour: each day 5 sessions, session k with k + 1 page views (15 a day); today the
// funnel page_view → product_viewed → added_to_cart: sessions 0-2 view a product after their
// page view, session 0 then adds to cart, session 1 adds to cart before viewing (not through).
const VIEW_SESSIONS = 5;
const FUNNEL = ["page_view", "product_viewed", "added_to_cart"];
// Orders (yesterday 3 × 12.50, today 2 × 20.00), each by a known user.
const ORDERS = [
  { back: 1, n: 3, cents: 1250 },
  { back: 0, n: 2, cents: 2000 },
];
/** A known signup's first-touch source: alternately google and direct. */
const sourceOf = (u) => (u % 2 === 0 ? "google" : "direct");
const SECRET_EMAIL = "someone@private.example";

/** The generator's truth, as the quality page must show it. */
function truth(now) {
  const dayOf = (ms) => new Date(ms).toISOString().slice(0, 10);
  const days = DAYS.map((d, i) => ({
    day: dayOf(now - (6 - i) * DAY_MS),
    ...d,
    gap_pct: ((d.actual - d.tracked) / d.actual) * 100,
    unknown_pct: (d.unknown / d.actual) * 100,
    moved: i === MOVED,
    gaps: d.seqGaps?.length || 0,
  }));
  const sum = (f) => COUNTERS.reduce((a, c) => a + f(c), 0);
  const signupsTracked = DAYS.reduce((a, d) => a + d.tracked, 0);
  const viewsPerDay = (VIEW_SESSIONS * (VIEW_SESSIONS + 1)) / 2;
  const funnelEvents = 3 + 2; // product_viewed × 3, added_to_cart × 2 (today)
  const tracked = signupsTracked + 7 * viewsPerDay + funnelEvents;
  const attribution = { google: 0, direct: 0, unknown: 0 };
  for (const d of DAYS) {
    for (let u = 0; u < d.actual; u++) attribution[u < d.unknown ? "unknown" : sourceOf(u)]++;
  }
  const orderDays = Object.fromEntries(ORDERS.map((o) => [dayOf(now - o.back * DAY_MS), o]));
  const actualSignups = DAYS.reduce((a, d) => a + d.actual, 0);
  const dropped = {};
  for (const c of COUNTERS) for (const [r, n] of Object.entries(c.dropped)) dropped[r] = (dropped[r] || 0) + n;
  return {
    days,
    loss: {
      devices: COUNTERS.length,
      created: sum((c) => c.enqueued),
      stored: sum((c) => c.enqueued - (c.dropped.consent || 0)),
      sent: sum((c) => c.sent - c.retried),
      acked: sum((c) => c.acked),
      accepted_by_relay: tracked,
      in_warehouse: tracked,
      duplicates_removed: DAYS[RETRIED].tracked,
      pending: sum((c) => c.pending),
      rejected_by_relay: REJECTED,
      seq_gaps: DAYS.reduce((a, d) => a + (d.seqGaps?.length || 0), 0),
      identity_violations: 0,
    },
    dropped,
    business: {
      signups: days.map((d) => ({ day: d.day, actual: d.actual, server: d.actual, value: null })),
      orders: days.map((d) => {
        const o = orderDays[d.day];
        return { day: d.day, actual: o?.n || 0, server: o?.n || 0, value: o ? (o.n * o.cents) / 100 : null };
      }),
      attribution,
      revenue: ORDERS.reduce((a, o) => a + (o.n * o.cents) / 100, 0),
    },
    behaviour: {
      pageViews: viewsPerDay,
      sessionsPerDay: VIEW_SESSIONS + 1, // the view sessions and the signup tab
      top: { page_view: 7 * viewsPerDay, signup_completed: signupsTracked, product_viewed: 3, added_to_cart: 2 },
      funnel: [7 * VIEW_SESSIONS, 3, 1], // every view session of the week did step 1
      missingPct: ((actualSignups - signupsTracked) / actualSignups) * 100,
      actual: actualSignups,
      tracked: signupsTracked,
    },
  };
}

/** A UUIDv7 for capture time `ms`. */
function uuid7(ms) {
  const b = randomBytes(16);
  b.writeUIntBE(ms, 0, 6);
  b[6] = (b[6] & 0x0f) | 0x70;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = b.toString("hex");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Noon of the day `back` days before `now` (never in the future, never before its day). */
const tsOf = (now, back) => Math.min(now - back * DAY_MS, Math.floor((now - back * DAY_MS) / DAY_MS) * DAY_MS + DAY_MS / 2);

async function post(relay, path, body, headers = {}) {
  const resp = await fetch(`${relay.origin}${path}`, {
    method: "POST",
    headers: { "content-type": "text/plain;charset=UTF-8", origin: "https://shop.example", ...headers },
    body: JSON.stringify(body),
  });
  const answer = await resp.json();
  assert.ok(resp.ok, `${path}: ${resp.status} ${JSON.stringify(answer)}`);
  return answer;
}

/** Puts the generator's data set through the relay's public paths; writes the truth DB. */
async function generate(relay, truthPath, now) {
  const users = [];
  for (const [i, d] of DAYS.entries()) {
    const back = 6 - i;
    const ts = tsOf(now, back);
    const stamp = new Date(ts).toISOString();
    for (let u = 0; u < d.actual; u++) {
      const known = u >= d.unknown;
      users.push(`('u-${i}-${u}', '${stamp}', ${known ? 1 : 0}, ${known ? `'${sourceOf(u)}'` : "NULL"})`);
    }
    // The pages' tracked signups: one tab stream per day, seqs skipping the day's gaps.
    const device = `dev-${back}`;
    const seqs = [];
    for (let s = 1; seqs.length < d.tracked; s++) if (!d.seqGaps?.includes(s)) seqs.push(s);
    const events = seqs.map((seq) => ({
      id: uuid7(ts),
      name: "signup_completed",
      schema: "event/1",
      ts,
      source: "client",
      anon_id: `anon-${device}`,
      device_id: device,
      seq,
      session_id: `s-${back}-signup`,
      props: {},
      context: { url: "https://shop.example/signup" },
    }));
    const batch = { v: 1, site: "demo", events };
    if (i >= 2 && i < 2 + COUNTERS.length) batch.counters = COUNTERS[i - 2];
    if (i === 4) {
      for (let k = 0; k < REJECTED; k++) {
        batch.events.push({ id: uuid7(ts), name: "signup_completed", schema: "nope/1", ts, source: "client",
          anon_id: "anon-x", device_id: "dev-x", seq: k + 1, props: { email: SECRET_EMAIL } });
      }
    }
    const answer = await post(relay, "/_r/q", batch);
    assert.equal(answer.accepted, d.tracked, JSON.stringify(answer));
    if (i === RETRIED) {
      const again = await post(relay, "/_r/q", batch);
      assert.equal(again.duplicate, d.tracked, JSON.stringify(again));
    }
    // Page views (and today the funnel): session k on device view-<back>-<k>, in order.
    const views = [];
    for (let k = 0; k < VIEW_SESSIONS; k++) {
      const device = `view-${back}-${k}`;
      const steps = Array.from({ length: k + 1 }, () => "page_view");
      if (back === 0 && k <= 2) steps.push("product_viewed");
      if (back === 0 && k === 0) steps.push("added_to_cart");
      if (back === 0 && k === 1) steps.splice(0, 0, "added_to_cart"); // before its page view
      steps.forEach((name, n) =>
        views.push({ id: uuid7(ts), name, schema: "event/1", ts: ts - 60000 + k * 1000 + n, source: "client",
          anon_id: `anon-${device}`, device_id: device, seq: n + 1, session_id: `s-${back}-${k}`, props: {} }),
      );
    }
    await post(relay, "/_r/q", { v: 1, site: "demo", events: views });
    // The system of record's own events, once per signup.
    const server = Array.from({ length: d.actual }, (_, u) => ({
      id: uuid7(ts), name: "signup_completed", schema: "event/1", ts, source: "server",
      anon_id: `user-${i}-${u}`, user_id: `user-${i}-${u}`, props: {},
    }));
    await post(relay, "/_r/s", { v: 1, site: "demo", events: server }, {
      "content-type": "application/json",
      authorization: "Bearer e2e-dashboards-server-secret",
    });
  }
  // Orders, by known users of the day before, with their server events.
  const orders = [];
  for (const o of ORDERS) {
    const ts = tsOf(now, o.back);
    const server = [];
    for (let k = 0; k < o.n; k++) {
      orders.push(`('o-${o.back}-${k}', 'u-0-${DAYS[0].unknown + k}', ${o.cents}, '${new Date(ts).toISOString()}')`);
      server.push({ id: uuid7(ts), name: "order_paid", schema: "event/1", ts, source: "server",
        anon_id: `buyer-${k}`, user_id: `u-0-${k}`, props: {} });
    }
    await post(relay, "/_r/s", { v: 1, site: "demo", events: server }, {
      "content-type": "application/json",
      authorization: "Bearer e2e-dashboards-server-secret",
    });
  }
  execFileSync("sqlite3", [truthPath,
    `CREATE TABLE users (id TEXT PRIMARY KEY, created_at TEXT NOT NULL, attribution_known INTEGER NOT NULL, ft_source TEXT);
     INSERT INTO users (id, created_at, attribution_known, ft_source) VALUES ${users.join(",")};
     CREATE TABLE orders (id TEXT PRIMARY KEY, user_id TEXT NOT NULL, amount_cents INTEGER NOT NULL, created_at TEXT NOT NULL);
     INSERT INTO orders VALUES ${orders.join(",")};`]);
  await relay.drained();
  // Drained is stored; the API is asked until the warehouse shows all of it.
  const tracked = truth(now).loss.in_warehouse;
  await until("the warehouse to hold the data set", async () => {
    const q = await (await fetch(`http://127.0.0.1:${relay.adminPort}/api/v1/quality`, { headers: { authorization: `Bearer ${TOKEN}` } })).json();
    return q.loss?.in_warehouse === tracked && q.loss?.devices === COUNTERS.length && q.sinks?.[0]?.backlog_rows === 0;
  });
}

const reconcileToml = (truthUrl) => `
[reconcile]
truth = "${truthUrl}"
days = 7
trailing_days = 7
alert_points = 5.0
interval_secs = 0

[[reconcile.metrics]]
name = "signups"
event = "signup_completed"
truth_sql = """
SELECT substr(created_at, 1, 10) AS day, count(*) AS actual,
       sum(attribution_known = 0) AS unknown_attribution
FROM users GROUP BY 1"""
attribution_sql = """
SELECT substr(created_at, 1, 10) AS day, count(*) AS conversions,
       CASE WHEN attribution_known = 0 THEN NULL ELSE ft_source END AS source
FROM users GROUP BY 1, 3"""

[[reconcile.metrics]]
name = "orders"
event = "order_paid"
truth_sql = """
SELECT substr(created_at, 1, 10) AS day, count(*) AS actual, sum(amount_cents) / 100.0 AS value
FROM orders GROUP BY 1"""
value_label = "revenue (USD)"

[dashboard]
funnel = ${JSON.stringify(FUNNEL)}

[[sites]]
key = "demo"
origins = ["https://shop.example"]
server_secrets = ["e2e-dashboards-server-secret"]
`;

let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

/** Signs in on the admin listener's page like a person: the form, the token. */
async function signIn(page, relay, path = "/dash/quality") {
  const first = await page.goto(`http://127.0.0.1:${relay.adminPort}${path}`);
  assert.equal(first.status(), 401, "the dashboards without a session");
  await page.fill("input[name=token]", TOKEN);
  await Promise.all([page.waitForURL(`**${path}*`), page.click("button[type=submit]")]);
}

const ready = (page, after = 0) =>
  page.waitForFunction((t) => document.body.dataset.state === "ready" && Number(document.body.dataset.generated) > t, after, { timeout: 15000 });

/** Every `[attr]` element's data-value, by its attr value. */
const values = (page, attr) =>
  page.$$eval(`[${attr}]`, (els, a) => Object.fromEntries(els.map((e) => [e.getAttribute(a), e.dataset.value])), attr);

test("the quality page shows the generator's truth and the reconciliation report's figures", async () => {
  const now = Date.now();
  const truthDir = mkdtempSync(join(tmpdir(), "trueup-truth-"));
  const truthFile = join(truthDir, "truth.sqlite");
  const relay = await Relay.start({ site: join(ROOT, "e2e/sites"), token: TOKEN, toml: reconcileToml(`sqlite:${truthFile}`) });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  try {
    await generate(relay, truthFile, now);
    const want = truth(now);
    const report = JSON.parse(
      execFileSync(RELAY, ["--config", relay.config, "reconcile", "--json"], { encoding: "utf8" }),
    );

    const page = await context.newPage();
    const problems = [];
    await signIn(page, relay);
    page.on("pageerror", (e) => problems.push(String(e)));
    page.on("console", (m) => m.type() === "error" && problems.push(m.text()));
    await ready(page);

    // The gap per day: the generator's, and the reconciliation report's, row by row.
    const rows = await page.$$eval("tr[data-metric=signups]", (trs) =>
      trs.map((tr) => ({
        day: tr.dataset.day,
        ...Object.fromEntries([...tr.querySelectorAll("td[data-col]")].map((td) => [td.dataset.col, td.dataset.value])),
      })),
    );
    assert.equal(rows.length, 7, JSON.stringify(rows));
    const num = (v) => (v === "" || v === undefined ? null : Number(v));
    for (const d of want.days) {
      const row = rows.find((r) => r.day === d.day);
      assert.ok(row, `no row for ${d.day}`);
      const r = report.metrics[0].days.find((x) => x.day === d.day);
      assert.equal(num(row.actual), d.actual, d.day);
      assert.equal(num(row.tracked), d.tracked, d.day);
      assert.equal(num(row.server), d.actual, d.day);
      assert.ok(Math.abs(num(row.gap_pct) - d.gap_pct) < 1e-9, `${d.day}: gap ${row.gap_pct} ≠ ${d.gap_pct}`);
      assert.ok(Math.abs(num(row.unknown_pct) - d.unknown_pct) < 1e-9, d.day);
      assert.equal(row.moved, String(d.moved), `${d.day} moved`);
      assert.equal(num(row.gap_pct), r.gap_pct, `${d.day}: the page and the report`);
      assert.equal(num(row.trailing_gap_pct), r.trailing_gap_pct, `${d.day}: trailing`);
      assert.equal(row.moved, String(r.moved), d.day);
    }
    // The moved day is marked where a person looks: in the table and on the chart's legend.
    const movedText = await page.textContent(`tr[data-metric=signups][data-day="${want.days[MOVED].day}"] td[data-col=moved]`);
    assert.match(movedText, /moved/i);

    // Loss by stage, drops by reason, seq gaps per day.
    const loss = await values(page, "data-loss");
    for (const [k, v] of Object.entries(want.loss)) {
      assert.equal(num(loss[k]), v, `loss ${k}`);
      assert.equal(report.loss[k], v, `report loss ${k}`);
    }
    const drops = await values(page, "data-drop");
    assert.deepEqual(Object.fromEntries(Object.entries(drops).map(([k, v]) => [k, Number(v)])), want.dropped);
    const gaps = await values(page, "data-seq-day");
    for (const d of want.days) assert.equal(num(gaps[d.day]), d.gaps, `seq gaps ${d.day}`);

    // Rejects: the count, and samples that never show the e-mail address.
    const rejects = await values(page, "data-reject");
    const rejectTotal = Object.values(rejects).reduce((a, v) => a + Number(v), 0);
    assert.equal(rejectTotal, REJECTED, JSON.stringify(rejects));
    const samples = await page.$$eval("[data-sample]", (els) => els.map((e) => e.textContent));
    assert.ok(samples.length >= 1);
    assert.ok(samples.every((s) => !s.includes(SECRET_EMAIL)), samples.join("\n"));
    assert.ok(!(await page.content()).includes(SECRET_EMAIL));

    // Freshness and the sink.
    const stages = await page.$$eval("tr[data-stage]", (trs) => trs.map((t) => t.dataset.stage));
    assert.deepEqual(stages, ["capture_to_accepted", "accepted_to_warehouse", "capture_to_warehouse"]);
    const sink = await page.$eval("tr[data-sink=warehouse] td[data-col=backlog_rows]", (td) => td.dataset.value);
    assert.equal(Number(sink), 0);
    if (SHOTS) await page.screenshot({ path: join(ROOT, SHOTS, "dash-quality.png"), fullPage: true });

    // 30 days: the same figures, more (empty) days, and the window is in the URL.
    const before30 = Number(await page.evaluate(() => document.body.dataset.generated));
    await page.click("[data-days='30']");
    await ready(page, before30);
    assert.match(page.url(), /days=30/);
    assert.equal(await page.$$eval("tr[data-metric=signups]", (trs) => trs.length), 30);
    assert.equal(await page.getAttribute("[data-days='30']", "aria-pressed"), "true");
    const gapsAfter = await values(page, "data-seq-day");
    assert.equal(Object.keys(gapsAfter).length, 30);
    assert.equal(num(gapsAfter[want.days[3].day]), 2);

    assert.deepEqual(problems, []);
    console.log(
      `dashboards quality: ${rows.length} days, moved ${want.days[MOVED].day}, loss ${JSON.stringify(want.loss)} as generated`,
    );

    // Business: exact, from the system of record; unknown attribution its own row.
    await page.goto(`http://127.0.0.1:${relay.adminPort}/dash/business`);
    await ready(page);
    for (const metric of ["signups", "orders"]) {
      for (const d of want.business[metric]) {
        const cells = await page.$$eval(`tr[data-metric=${metric}][data-day="${d.day}"] td[data-col]`, (tds) =>
          Object.fromEntries(tds.map((td) => [td.dataset.col, td.dataset.value])),
        );
        assert.equal(num(cells.actual), d.actual, `${metric} ${d.day} actual`);
        assert.equal(num(cells.server), d.server, `${metric} ${d.day} server`);
        assert.equal(num(cells.value), d.value, `${metric} ${d.day} value`);
      }
    }
    assert.equal(num(await page.getAttribute("[data-total='orders/value']", "data-value")), want.business.revenue);
    assert.equal(num(await page.getAttribute("[data-total='signups/actual']", "data-value")), want.behaviour.actual);
    const sources = await values(page, "data-attribution");
    assert.deepEqual(
      Object.fromEntries(Object.entries(sources).map(([k, v]) => [k, Number(v)])),
      Object.fromEntries(Object.entries(want.business.attribution).map(([k, v]) => [`signups/${k}`, v])),
    );
    if (SHOTS) await page.screenshot({ path: join(ROOT, SHOTS, "dash-business.png"), fullPage: true });

    // Behaviour: lossy, and every chart says by how much.
    await page.goto(`http://127.0.0.1:${relay.adminPort}/dash/behaviour`);
    await ready(page);
    const banner = await page.getAttribute("[data-loss-banner]", "data-value");
    assert.ok(Math.abs(num(banner) - want.behaviour.missingPct) < 1e-9, `missing ${banner}`);
    const labels = await page.$$eval("[data-loss-label]", (els) => els.map((e) => e.textContent));
    assert.ok(labels.length >= 4, `a loss label on every chart: ${labels.length}`);
    for (const l of labels) assert.match(l, /36\.2 % missing/);
    const views = await values(page, "data-page-views-day");
    const sessions = await values(page, "data-sessions-day");
    for (const d of want.days) {
      assert.equal(num(views[d.day]), want.behaviour.pageViews, `page views ${d.day}`);
      assert.equal(num(sessions[d.day]), want.behaviour.sessionsPerDay, `sessions ${d.day}`);
    }
    const top = await values(page, "data-top-event");
    assert.deepEqual(Object.fromEntries(Object.entries(top).map(([k, v]) => [k, Number(v)])), want.behaviour.top);
    const steps = await values(page, "data-funnel-step");
    assert.deepEqual(FUNNEL.map((e) => num(steps[e])), want.behaviour.funnel);
    if (SHOTS) await page.screenshot({ path: join(ROOT, SHOTS, "dash-behaviour.png"), fullPage: true });
    assert.deepEqual(problems, []);

    // The public listener serves none of it.
    for (const path of ["/dash/quality", "/dash/business", "/api/v1/quality", "/api/v1/business", "/api/v1/behaviour", "/login"]) {
      const pub = await fetch(`${relay.origin}${path}`, { headers: { authorization: `Bearer ${TOKEN}` } });
      assert.equal(pub.status, 404, `${path} on the public listener`);
    }
  } catch (e) {
    console.log(`relay log:\n${relay.log.slice(-3000)}`);
    throw e;
  } finally {
    await context.close();
    await relay.dispose();
    rmSync(truthDir, { recursive: true, force: true });
  }
});

test("the quality page says which store failed and when there is no data yet", async () => {
  // A truth database nothing listens for, and no events at all.
  const relay = await Relay.start({ site: join(ROOT, "e2e/sites"), token: TOKEN, toml: reconcileToml("postgres://u:secretpw@127.0.0.1:1/none") });
  const context = await browser.newContext();
  try {
    const page = await context.newPage();
    // A wrong token first: 401 again, with the form.
    await page.goto(`http://127.0.0.1:${relay.adminPort}/dash/quality`);
    await page.fill("input[name=token]", "not-the-admin-token-0000");
    const [resp] = await Promise.all([page.waitForResponse((r) => r.url().endsWith("/login")), page.click("button[type=submit]")]);
    assert.equal(resp.status(), 401);
    assert.match(await page.textContent("[data-login-message]"), /not the admin token/);

    await signIn(page, relay);
    await ready(page);
    const gapError = await page.textContent("[data-error=gap]");
    assert.match(gapError, /127\.0\.0\.1:1/);
    assert.doesNotMatch(gapError, /secretpw/);
    // No client events yet: said, not drawn as zeros.
    const empty = await page.$$eval("[data-empty]", (els) => els.map((e) => e.dataset.empty));
    assert.ok(empty.includes("rejects"), JSON.stringify(empty));
    if (SHOTS) await page.screenshot({ path: join(ROOT, SHOTS, "dash-quality-errors.png"), fullPage: true });
  } finally {
    await context.close();
    await relay.dispose();
  }
});
