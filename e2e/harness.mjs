// The e2e harness: a real relay (fresh data dir, embedded warehouse) serving the built agent
// (dist/) and a site folder, and headless Chromium driven by playwright-core.
//
// Every wait is bounded. The warehouse is read with the sqlite3 CLI (JSON output).

import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync, rmSync, existsSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, normalize, extname } from "node:path";
import { chromium } from "playwright-core";

export const ROOT = resolve(import.meta.dirname, "..");
const RELAY = process.env.TRUEUP_RELAY_BIN || join(ROOT, "target/debug/trueup-relay");

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Waits for the ready file a trueup binary writes once it listens (`--ready-file`: JSON with
 * the addresses it bound to port 0) and returns it parsed; throws if `proc` exits first.
 */
export async function readyFile(path, proc, log = () => "", ms = 20000) {
  return until(`${path}`, () => {
    if (proc.exitCode !== null) throw new Error(`exited during start (${proc.exitCode}):\n${log()}`);
    try {
      return JSON.parse(readFileSync(path, "utf8"));
    } catch {
      return null;
    }
  }, ms, 20);
}

/** The port of an address `host:port`. */
export const portOf = (addr) => Number(addr.slice(addr.lastIndexOf(":") + 1));

/** Polls `check` (sync or async) until it returns a truthy value or `ms` pass. */
export async function until(what, check, ms = 15000, every = 50) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(every);
  }
}

export class Relay {
  /**
   * Starts the relay binary with a fresh data dir; `site` is served at `/`, `assets` (the
   * agent) at /_r/a/. It binds port 0 and reports its ports in its ready file; the default
   * site accepts pages of the relay's own origin (or of a proxy in front of it that keeps
   * the Host header) through `allow_same_origin`.
   */
  static async start({ site = join(ROOT, "www"), toml = "", assets = join(ROOT, "dist"), token = null } = {}) {
    if (!existsSync(RELAY)) throw new Error(`${RELAY} is missing: run cargo build -p trueup-relay`);
    if (!existsSync(join(assets, "loader.js"))) throw new Error(`${assets} is missing: run npm run build`);
    const r = new Relay();
    r.token = token;
    r.dir = mkdtempSync(join(tmpdir(), "trueup-e2e-"));
    r.config = join(r.dir, "relay.toml");
    writeFileSync(
      r.config,
      [
        `listen = "127.0.0.1:0"`,
        `admin_listen = "127.0.0.1:0"`,
        `data_dir = "${join(r.dir, "data")}"`,
        `asset_dir = "${assets}"`,
        `www_dir = "${site}"`,
        token ? `admin_token = "${token}"` : "",
        toml,
        toml.includes("[rate_limit]") ? "" : "[rate_limit]\nper_ip_per_sec = 0\nper_site_per_sec = 0",
        toml.includes("[[sites]]") ? "" : `[[sites]]\nkey = "demo"\nallow_same_origin = true`,
      ].join("\n"),
    );
    await r.spawn();
    return r;
  }

  /** Starts the process: the first time on port 0, a restart on the ports the first got. */
  async spawn() {
    const readyPath = join(this.dir, "relay.ready.json");
    rmSync(readyPath, { force: true });
    const args = ["--config", this.config, "--ready-file", readyPath];
    if (this.port) args.push("--listen", `127.0.0.1:${this.port}`, "--admin-listen", `127.0.0.1:${this.adminPort}`);
    this.proc = spawn(RELAY, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, TRUEUP_LOG: "warn" } });
    this.log = "";
    this.proc.stdout.on("data", (d) => (this.log += d));
    this.proc.stderr.on("data", (d) => (this.log += d));
    this.exited = new Promise((r) => this.proc.once("exit", r));
    const ready = await readyFile(readyPath, this.proc, () => this.log);
    this.port = portOf(ready.listen);
    this.adminPort = portOf(ready.admin_listen);
    this.origin = `http://127.0.0.1:${this.port}`;
    await until("the relay to be ready", async () => {
      if (this.proc.exitCode !== null) throw new Error(`relay exited:\n${this.log}`);
      try {
        return (await fetch(`http://127.0.0.1:${this.adminPort}/readyz`)).ok;
      } catch {
        return false;
      }
    });
  }

  /** SIGKILL (no cleanup) or SIGTERM (graceful), then wait for the exit. */
  async stop(signal = "SIGTERM") {
    if (!this.proc || this.proc.exitCode !== null) return;
    this.proc.kill(signal);
    let timer;
    await Promise.race([this.exited, new Promise((r) => (timer = setTimeout(r, 30000)))]);
    clearTimeout(timer);
  }

  async metric(name) {
    const headers = this.token ? { authorization: `Bearer ${this.token}` } : {};
    const text = await (await fetch(`http://127.0.0.1:${this.adminPort}/metrics`, { headers })).text();
    return text
      .split("\n")
      .filter((l) => l.startsWith(name + " ") || l.startsWith(name + "{"))
      .reduce((sum, l) => sum + Number(l.split(" ").pop()), 0);
  }

  /** Waits until the spool is empty: everything received is in the warehouse. */
  async drained() {
    await until("the spool to drain", async () => (await this.metric("trueup_spool_depth")) === 0);
  }

  /** Runs a query on the warehouse; rows as objects. */
  query(sql) {
    const db = join(this.dir, "data/warehouse.sqlite");
    const out = execFileSync("sqlite3", ["-json", db, sql], { encoding: "utf8" }).trim();
    return out ? JSON.parse(out) : [];
  }

  async dispose() {
    await this.stop("SIGKILL");
    rmSync(this.dir, { recursive: true, force: true });
  }
}

export const CHROMIUM_ARGS = [
  "--headless=new",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** Debian's Chromium, headless; `{ bfcache: true }` keeps the back/forward cache Playwright turns off. */
export function launch({ bfcache = false } = {}) {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: CHROMIUM_ARGS,
    ...(bfcache ? { ignoreDefaultArgs: ["--disable-back-forward-cache"] } : {}),
  });
}

/** Events of one run (props.run = run) in the warehouse, by props.i: {count, distinct, missing, dup}. */
export function delivery(relay, run, expected) {
  const rows = relay.query(
    `SELECT props->>'i' AS i, count(*) AS n FROM events WHERE props->>'run' = '${run}' GROUP BY 1`,
  );
  const seen = new Map(rows.map((r) => [Number(r.i), r.n]));
  const missing = [];
  for (let i = 0; i < expected; i++) if (!seen.has(i)) missing.push(i);
  const dup = rows.filter((r) => r.n > 1).length;
  return { delivered: seen.size, missing, dup };
}

/**
 * Waits (at most `ms`) until all `n` events of `run` are in the warehouse, prints the suite's
 * report line `<what>: delivered X/N duplicates D`, and asserts none is missing or doubled.
 */
export async function allArrive(relay, run, n, what, ms = 20000) {
  await until(`${what}: all ${n} events`, async () => {
    await relay.drained();
    return delivery(relay, run, n).delivered === n;
  }, ms, 200);
  const r = delivery(relay, run, n);
  console.log(`${what}: delivered ${r.delivered}/${n} duplicates ${r.dup}`);
  assert.deepEqual(r.missing, []);
  assert.equal(r.dup, 0);
}

export function runId() {
  return Math.random().toString(36).slice(2, 10);
}

// Page helpers shared by the scenario files.

/** The loader has run and the core is constructed (flush() waits for it). */
export async function ready(page) {
  await page.waitForFunction(() => typeof window.trueup?.stats === "function", null, { timeout: 15000 });
  await page.evaluate(() => window.trueup.flush());
}

/** The agent's counters. */
export const stats = (page) => page.evaluate(() => window.trueup.stats());

/** Sum of the counters' drops. */
export const droppedSum = (s) => Object.values(s?.dropped || {}).reduce((a, b) => a + b, 0);

/** The agent's counters, asserting enqueued = acked + dropped + pending. */
export async function identity(page) {
  const s = await stats(page);
  assert.equal(s.enqueued, s.acked + droppedSum(s) + s.pending, JSON.stringify(s));
  return s;
}

/** Tracks `n` events `{run, i: from + k}` named `name` in one task; returns how many calls returned. */
export const trackN = (page, run, n, from = 0, name = "e2e") =>
  page.evaluate(([run, n, from, name]) => {
    let c = 0;
    for (let i = from; i < from + n; i++, c++) window.trueup.track(name, { run, i });
    return c;
  }, [run, n, from, name]);

const TYPES = { ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".html": "text/html; charset=utf-8", ".json": "application/json" };

/**
 * Serves `relay`'s pages (from the folder `site`) and the agent's files (dist/, at /_r/a/) from
 * disk through a Playwright route on `context`, as a CDN or the app's own server would, so
 * pages load and reload while the relay is down; the collection and server paths (/_r/q,
 * /_r/s) still go to the relay. Returns a function that removes the route.
 */
export async function serveFromDisk(context, relay, site) {
  const origin = relay.origin;
  const match = (u) => u.origin === origin && !u.pathname.startsWith("/_r/q") && !u.pathname.startsWith("/_r/s");
  const handler = async (route) => {
    const p = decodeURIComponent(new URL(route.request().url()).pathname);
    const base = p.startsWith("/_r/a/") ? join(ROOT, "dist") : site;
    let file = normalize(join(base, p.startsWith("/_r/a/") ? p.slice("/_r/a/".length) : p));
    if (p.endsWith("/")) file = join(file, "index.html");
    if (!file.startsWith(base) || !existsSync(file)) return route.fulfill({ status: 404, body: "not found" });
    await route.fulfill({ status: 200, headers: { "content-type": TYPES[extname(file)] || "application/octet-stream" }, body: readFileSync(file) });
  };
  await context.route(match, handler);
  return () => context.unroute(match, handler);
}
