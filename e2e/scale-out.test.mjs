// Scale out, with the real agent as the sender (issue 12): browsers (three Chromium contexts,
// three devices) load the demo page through a round-robin TCP balancer in front of two relays;
// both relays produce to one log (NATS JetStream from Debian's nats-server, and the
// Kafka-protocol broker tansu when TRUEUP_TANSU names it: `export TRUEUP_TANSU=$(.ci/tansu)`);
// one loader consumes the log into PostgreSQL (TRUEUP_TEST_POSTGRES; `.ci/postgres`) or, without
// it, the SQLite warehouse. While the pages track, one relay is killed with SIGKILL (the agents'
// retries go to the other relay; the killed one comes back 3 s later and drains its spool),
// then the loader is killed with SIGKILL and started again. It prints
//
//   scale-out <log>: delivered X/N duplicates D counters ok; <when the faults came, what the
//   restarted loader absorbed (redeliveries of what it had stored but not committed)>
//
// and asserts every tracked event is in the warehouse exactly once and every page's counters
// settle (acked = enqueued, nothing dropped or pending). Every wait is bounded.
// Run: node --test e2e/scale-out.test.mjs (needs dist/ and target/debug/trueup-relay).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { createServer, connect } from "node:net";
import { mkdtempSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Relay, launch, runId, until, sleep, ROOT, ready, stats, droppedSum, readyFile, trackN } from "./harness.mjs";

const SITES = join(ROOT, "e2e/sites");
const RELAY = process.env.TRUEUP_RELAY_BIN || join(ROOT, "target/debug/trueup-relay");
const DEVICES = 3;
const ROUNDS = 10;
const PER_ROUND = 40;

let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

/** A child process whose output is kept (for the failure message) and whose exit is awaited. */
function child(bin, args, env = {}) {
  const proc = spawn(bin, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...env } });
  proc.out = "";
  proc.stdout.on("data", (d) => (proc.out += d));
  proc.stderr.on("data", (d) => (proc.out += d));
  proc.exited = new Promise((r) => proc.once("exit", r));
  return proc;
}

async function kill(proc, signal = "SIGKILL") {
  if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
  proc.kill(signal);
  await proc.exited;
}

/** The log: nats-server binds port 0 and logs the port; tansu cannot (it must advertise its
 * port), so it is started on a random port and again on another if that one is taken. */
async function startLog(kind, dir) {
  if (kind === "nats") {
    const proc = child("nats-server", ["-js", "-a", "127.0.0.1", "-p", "-1", "-sd", join(dir, "nats")]);
    const addr = await until("nats-server to listen", () => {
      if (proc.exitCode !== null) throw new Error(`nats-server exited:\n${proc.out}`);
      return proc.out.match(/Listening for client connections on (\S+)/)?.[1];
    }, 10000, 20);
    return {
      proc,
      sink: `kind = "nats"\nurl = "nats://${addr}"\n`,
      loader: `from = "nats"\nurl = "nats://${addr}"\nack_wait_secs = 5\n`,
    };
  }
  for (let attempt = 0; attempt < 20; attempt++) {
    const port = 20000 + Math.floor(Math.random() * 40000);
    const url = `tcp://127.0.0.1:${port}`;
    const proc = child(process.env.TRUEUP_TANSU, ["broker", "--listener-url", url, "--advertised-listener-url", url], { RUST_LOG: "warn" });
    const up = await until("tansu to listen", async () => {
      if (proc.exitCode !== null) return "exited";
      return (await canConnect(port)) && "up";
    }, 10000, 50);
    if (up === "up") {
      return {
        proc,
        sink: `kind = "kafka"\nbrokers = "127.0.0.1:${port}"\n`,
        loader: `brokers = "127.0.0.1:${port}"\nproperties = { "session.timeout.ms" = "6000", "max.poll.interval.ms" = "10000" }\n`,
      };
    }
  }
  throw new Error("tansu did not start on any of 20 ports");
}

const canConnect = (port) =>
  new Promise((resolve) => {
    const s = connect(port, "127.0.0.1");
    s.once("connect", () => (s.destroy(), resolve(true)));
    s.once("error", () => resolve(false));
  });

/** A round-robin TCP balancer on loopback: each connection goes to the next backend; a backend
 * that refuses is skipped (a balancer's passive health check). Resolves to {port, close}. */
function balancer(ports) {
  let next = 0;
  const open = new Set();
  const server = createServer((inbound) => {
    open.add(inbound);
    inbound.on("error", () => {});
    inbound.once("close", () => open.delete(inbound));
    inbound.pause();
    const attempt = (left) => {
      if (left === 0 || inbound.destroyed) return inbound.destroy();
      const out = connect(ports[next++ % ports.length], "127.0.0.1");
      out.once("error", () => attempt(left - 1));
      out.once("connect", () => {
        open.add(out);
        out.removeAllListeners("error");
        out.on("error", () => inbound.destroy());
        out.once("close", () => (open.delete(out), inbound.destroy()));
        inbound.once("close", () => out.destroy());
        inbound.pipe(out);
        out.pipe(inbound);
        inbound.resume();
      });
    };
    attempt(ports.length);
  });
  return new Promise((resolve) =>
    server.listen(0, "127.0.0.1", () =>
      resolve({
        port: server.address().port,
        close: () => {
          for (const s of open) s.destroy();
          return new Promise((r) => server.close(r));
        },
      }),
    ),
  );
}

/** Where the loader writes and how the test reads it: a fresh PostgreSQL schema, or SQLite. */
function store(dir, name) {
  const pg = process.env.TRUEUP_TEST_POSTGRES;
  if (!pg) {
    const path = join(dir, "loader-data/warehouse.sqlite");
    return {
      toml: `to = "warehouse"\npath = "${path}"\n`,
      query: (sql) => {
        if (!existsSync(path)) return [];
        const out = execFileSync("sqlite3", ["-json", "-readonly", path, sql], { encoding: "utf8" }).trim();
        return out ? JSON.parse(out) : [];
      },
      drop: () => {},
    };
  }
  const schema = `wh_e2e_${name}_${process.pid}`;
  const psql = (url, sql) =>
    execFileSync("psql", [url, "-qAt", "-v", "ON_ERROR_STOP=1", "-c", sql], {
      encoding: "utf8",
      env: { ...process.env, PGOPTIONS: "-c client_min_messages=warning" },
    });
  psql(pg, `DROP SCHEMA IF EXISTS ${schema} CASCADE; CREATE SCHEMA ${schema}`);
  const url = `${pg}${pg.includes("?") ? "&" : "?"}options=-csearch_path%3D${schema}`;
  const secret = join(dir, "pg.secret");
  writeFileSync(secret, url);
  return {
    toml: `to = "postgres"\nsecret_file = "${secret}"\n`,
    query: (sql) => {
      if (psql(url, "SELECT to_regclass('events') IS NOT NULL").trim() !== "t") return [];
      return JSON.parse(psql(url, `SELECT coalesce(json_agg(q), '[]') FROM (${sql}) AS q`));
    },
    drop: () => psql(pg, `DROP SCHEMA IF EXISTS ${schema} CASCADE`),
  };
}

/** `trueup-relay load`: started, killed and started again on the same config. */
class Loader {
  constructor(dir, log, wh) {
    this.dir = dir;
    this.config = join(dir, "loader.toml");
    writeFileSync(
      this.config,
      `admin_listen = "127.0.0.1:0"\ndata_dir = "${join(dir, "loader-data")}"\n\n[loader]\nbatch_size = 500\nmax_wait_ms = 50\n${wh.toml}${log.loader}`,
    );
  }

  async start() {
    const path = join(this.dir, "loader.ready.json");
    rmSync(path, { force: true });
    this.proc = child(RELAY, ["--config", this.config, "--ready-file", path, "load"], { TRUEUP_LOG: "warn" });
    const r = await readyFile(path, this.proc, () => this.proc.out);
    this.admin = r.admin_listen;
  }

  async metric(name) {
    const text = await (await fetch(`http://${this.admin}/metrics`)).text();
    return text
      .split("\n")
      .filter((l) => l.startsWith(name + " ") || l.startsWith(name + "{"))
      .reduce((sum, l) => sum + Number(l.split(" ").pop()), 0);
  }
}

/** What of run `run` is stored: {delivered, missing, dup} over i = 0..n-1. */
function countOf(wh, run, n) {
  const rows = wh.query(`SELECT props->>'i' AS i, count(*) AS n FROM events WHERE props->>'run' = '${run}' GROUP BY 1`);
  const seen = new Map(rows.map((r) => [Number(r.i), Number(r.n)]));
  const missing = [];
  for (let i = 0; i < n; i++) if (!seen.has(i)) missing.push(i);
  return { delivered: seen.size, missing, dup: rows.filter((r) => Number(r.n) > 1).length };
}

async function scaleOut(kind) {
  const dir = mkdtempSync(join(tmpdir(), `trueup-e2e-scale-${kind}-`));
  const cleanup = [];
  const logs = [];
  try {
    const log = await startLog(kind, dir);
    cleanup.push(() => kill(log.proc));
    logs.push(() => `${kind} log:\n${log.proc.out.slice(-2000)}`);
    const sink = `[forwarder]\ninitial_backoff_ms = 50\nmax_backoff_ms = 500\n\n[[sinks]]\nname = "log"\n${log.sink}timeout_secs = 5\n`;
    const relays = [];
    for (let k = 0; k < 2; k++) {
      const r = await Relay.start({ site: SITES, toml: sink });
      cleanup.push(() => r.dispose());
      logs.push(() => `relay ${k} log:\n${r.log.slice(-3000)}`);
      relays.push(r);
    }
    const lb = await balancer(relays.map((r) => r.port));
    cleanup.push(() => lb.close());
    const wh = store(dir, kind);
    cleanup.push(() => wh.drop());
    const loader = new Loader(dir, log, wh);
    await loader.start();
    cleanup.push(() => kill(loader.proc));
    logs.push(() => `loader log:\n${loader.proc.out.slice(-3000)}`);

    const origin = `http://127.0.0.1:${lb.port}`;
    let failed = 0;
    const pages = [];
    for (let d = 0; d < DEVICES; d++) {
      const context = await browser.newContext();
      cleanup.push(() => context.close().catch(() => {}));
      const page = await context.newPage();
      page.on("requestfailed", (r) => r.method() === "POST" && r.url().includes("/_r/q") && failed++);
      await page.goto(`${origin}/plain/`);
      await ready(page);
      pages.push(page);
    }

    const run = runId();
    const n = DEVICES * ROUNDS * PER_ROUND;
    // The faults come when the stream is under way, not at a fixed time: the relay that has
    // accepted more is killed once a quarter of the events are accepted (what it acknowledged
    // waits in its spool until it is back), the loader once a quarter are in the warehouse.
    let relayKilled = null;
    let loaderKilled = null;
    let restarted; // the loader's restart, 2 s after it was killed
    const accepted = () => Promise.all(relays.map((r) => r.metric("trueup_events_accepted_total").catch(() => 0)));
    const deadline = Date.now() + 60000;
    for (let round = 0; round < ROUNDS || relayKilled === null || loaderKilled === null; round++) {
      if (Date.now() > deadline) throw new Error(`faults not reached in 60 s (relay ${relayKilled}, loader ${loaderKilled})`);
      if (round < ROUNDS) {
        await Promise.all(pages.map((p, d) => trackN(p, run, PER_ROUND, (round * DEVICES + d) * PER_ROUND, "scale_out")));
      }
      if (relayKilled === null) {
        const a = await accepted();
        if (a[0] + a[1] >= n / 4) {
          const victim = a[0] >= a[1] ? 0 : 1;
          relayKilled = { victim, accepted: a, tracked: Math.min(round + 1, ROUNDS) * DEVICES * PER_ROUND };
          await relays[victim].stop("SIGKILL");
          setTimeout(() => relays[victim].spawn().catch((e) => console.log(`relay ${victim} restart: ${e}`)), 3000);
        }
      }
      if (loaderKilled === null) {
        const stored = countOf(wh, run, n).delivered;
        if (stored >= n / 4) {
          loaderKilled = stored;
          await kill(loader.proc);
          restarted = sleep(2000).then(() => loader.start()).catch((e) => console.log(`loader restart: ${e}`));
        }
      }
      await sleep(round < ROUNDS ? 300 : 50);
    }
    await Promise.all(pages.map((p) => p.evaluate(() => window.trueup.flush())));

    await until(`all ${n} events in the warehouse`, () => countOf(wh, run, n).delivered === n, 60000, 250);
    const settled = await until("every page's counters to settle", async () => {
      const all = await Promise.all(pages.map(stats));
      return all.every((s) => s.pending === 0) && all;
    }, 20000, 200);
    // Everything is in; a last look at whether anything arrives twice late.
    await sleep(1000);
    const r = countOf(wh, run, n);
    await restarted; // (its metrics are read from the restarted loader)
    const absorbed = await loader.metric("trueup_loader_duplicates_total");
    const bad = settled.filter((s) => s.acked !== s.enqueued || droppedSum(s) !== 0);
    const enqueued = settled.reduce((a, s) => a + s.enqueued, 0);
    console.log(
      `scale-out ${kind}: delivered ${r.delivered}/${n} duplicates ${r.dup} ` +
        `counters ${bad.length || enqueued !== n ? `FAIL: ${JSON.stringify(settled)}` : "ok"}; ` +
        `relay ${relayKilled.victim} killed at ${relayKilled.accepted.join("+")} accepted of ${relayKilled.tracked} tracked, ` +
        `loader killed at ${loaderKilled} stored, redeliveries the restarted loader absorbed ${absorbed}, ` +
        `collection requests failed ${failed}`,
    );
    assert.deepEqual(r.missing, []);
    assert.equal(r.dup, 0);
    assert.equal(enqueued, n);
    assert.deepEqual(bad, []);
  } catch (e) {
    for (const l of logs) console.log(l());
    throw e;
  } finally {
    for (const f of cleanup.reverse()) await f();
    rmSync(dir, { recursive: true, force: true });
  }
}

test("scale-out nats: two relays behind a balancer, one killed mid-stream, the loader killed; every event once", () =>
  scaleOut("nats"));

test(
  "scale-out kafka (tansu): two relays behind a balancer, one killed mid-stream, the loader killed; every event once",
  { skip: !process.env.TRUEUP_TANSU && "TRUEUP_TANSU is not set (export TRUEUP_TANSU=$(.ci/tansu))" },
  () => scaleOut("kafka"),
);
