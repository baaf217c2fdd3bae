// The wasm core's JS side: the Agent that the stub constructs and forwards every call to. It does
// the browser's I/O (host.js, queue.js): listeners, the send lock, timers, IndexedDB, fetch; every
// decision (identity, consent, batches, counters, retries, the schedule) is the Rust core's
// (src/lib.rs). build.mjs bundles this file with wasm-bindgen's glue (imported as "trueup-glue")
// into trueup_agent.<hash>.js, which the stub imports.
//
// What it promises, with the crate docs: the Agent's methods throw only when the core trapped (a
// Rust panic), and the promises they return reject only then; a trap anywhere, also in the
// background (a send, a write, a listener), stops the core for good and is reported that way at
// the next call, so the stub counts it (`wasm_panic`) and its fallback takes over. Nothing is
// thrown into the page from a listener or a timer.

import init, { Core, initSync } from "trueup-glue";
import { body, host, landing, post } from "./host.js";
import { openIdb, queue } from "./queue.js";

export { init as default, initSync };

/** The options and their defaults (README: the agent's options). */
const DEFAULTS = {
  site: "",
  endpoint: "/_r/q",
  consent: "granted",
  storage: "auto",
  maxQueueBytes: 5e6,
  maxAgeMs: 7 * 864e5,
  maxEventBytes: 32e3,
  flushIntervalMs: 5e3,
  batchBytes: 6e4,
  maxBatchEvents: 200,
  sessionTimeoutMs: 18e5,
  requestTimeoutMs: 1e4,
  retryBaseMs: 1e3,
  retryCapMs: 3e5,
};
// Core.wake(how)
const WRITTEN = 0;
const NOW = 1;
const ONLINE = 2;
const EMPTY = 3;
const LEAD = 4;

const noop = () => {};
const hidden = () => document.visibilityState == "hidden";

export class Agent {
  /** Never throws (but for a trap); opens the queue and takes part in sending in the background. */
  constructor(given) {
    const o = (this.o = {});
    this.lost = 0; // connections lost
    for (const k in DEFAULTS) {
      const d = DEFAULTS[k];
      const v = given?.[k];
      o[k] = typeof v == typeof d && (typeof d == "string" || v > 0) ? v : d;
    }
    o.batchBytes = Math.min(o.batchBytes, 63e3); // the page's keepalive budget is 64 KiB
    let memory = o.storage == "memory";
    try {
      memory ||= !indexedDB;
    } catch {
      memory = true;
    }
    const core = (this.core = new Core(o, host(o), ...landing(), memory));
    const on = (target, type, fn) => target.addEventListener(type, (e) => this.guard(() => fn(e)));
    const hide = (e) => {
      if (e.type == "pagehide" || hidden()) {
        core.hide(e.type == "pagehide");
        core.beacon(navigator.onLine === false, !!this.leader);
        if (e.type == "pagehide") {
          this.unlock();
          // A message would evict the page from the bfcache: the channel opens again at pageshow.
          this.channel?.close();
          this.channel = undefined;
        } else {
          this.handOver();
        }
      } else if (!this.leader) {
        this.post("v"); // visible again: a hidden sending tab hands over
      }
    };
    on(window, "pagehide", hide);
    on(document, "visibilitychange", hide);
    on(window, "online", () => this.wake(ONLINE));
    on(window, "pageshow", (e) => {
      if (!e.persisted) return;
      // Back from the bfcache: this tab's stream again, and take part in sending again.
      core.shown();
      this.listen();
      if (!this.leader) this.lock();
      this.wake(WRITTEN);
    });
    on(window, "storage", (e) => {
      // Another tab went away and rescued events it had not committed: adopt them now, not at
      // the next page load.
      if (String(e.key).startsWith("trueup.rescue.") && this.q?.durable && core.granted) {
        this.bg(this.adopt().then(() => ((this.dirty = 1), this.wake(WRITTEN))));
      }
      // Consent given or refused in another tab is this tab's too, at once.
      if (e.key == "trueup.consent") {
        const yes = { granted: true, denied: false }[e.newValue];
        if (yes === true ? !core.granted : yes === false) this.call("consent", [yes], {});
      }
    });
    this.listen();
    this.bg(this.start());
  }

  /**
   * Opens the channel to the other tabs. Messages: "w", a tab wrote (the byte cap is to be
   * enforced); "f", it asks for a flush; "h", the sending tab is hidden (a visible tab answers
   * "v"); "v", a tab is visible (a hidden sending tab hands the lock over: `handOver`).
   */
  listen() {
    try {
      this.channel = new BroadcastChannel("trueup");
      this.channel.onmessage = ({ data }) => this.guard(() => {
        if (data == "f") this.wake(NOW);
        else if (data == "w") (this.dirty = 1), this.wake(WRITTEN);
        else if (data == "h") this.leader || hidden() || this.post("v");
        else if (data == "v" && hidden()) this.handOver();
      });
    } catch {}
  }

  post(message) {
    this.channel?.postMessage(message);
  }

  /**
   * A hidden tab's timers are throttled (to once a minute after a while) or frozen, so a hidden
   * sending tab hands the send lock over (after the batch in flight, if any): it releases it and
   * asks again, behind the tabs that wait. Called when this tab goes hidden and when a visible
   * tab says so ("v"); a tab that gets the lock while hidden keeps it (with no visible tab, a
   * hidden one sends) but asks whether one is visible ("h").
   */
  handOver() {
    if (!this.release) return; // (not holding the lock: without Web Locks, every tab sends)
    if (this.busy) return void (this.handing = 1);
    this.unlock();
    this.lock();
  }

  /**
   * Opens the queue (IndexedDB, else memory), then persists what was tracked meanwhile and takes
   * part in sending; only once consent is granted (nothing is stored before: not even an empty
   * database), so called again when it is.
   */
  async start() {
    if (this.started || !this.core.granted) return;
    this.started = 1;
    await this.open(this.o.storage != "memory");
    this.lock();
  }

  /**
   * Opens the queue: IndexedDB when `idb` (else, or where it cannot be opened, memory); adopts
   * what other tabs rescued and persists what was tracked meanwhile. Opened again when the
   * connection is lost (the site's data cleared, a newer version elsewhere): a few times, then
   * in memory.
   */
  async open(idb) {
    const { core } = this;
    const db = idb ? await openIdb("trueup", () => this.bg(this.open(++this.lost < 4))).catch(noop) : undefined;
    const q = (this.q = queue(db));
    core.opened(!db);
    await q.rw(core, (op, t) => core.stamp(t)).catch((e) => this.fail(e));
    if (db && core.granted) await this.adopt();
    await this.persist();
    if (!db && (this.asked || this.leader)) {
      // Opened again in memory: that queue is this tab's alone, which sends it without the lock.
      this.unlock();
      this.lead();
    }
    this.dirty = 1;
    this.wake(WRITTEN);
  }

  /** Handles `track`, `page`, `identify`, `reset` and `consent` with the call-time context `ctx`. */
  call(method, args, ctx) {
    this.alive();
    const { core } = this;
    const a = args?.[0]; // (a page's snippet queue may hold anything)
    const b = args?.[1];
    const reason = method == "track" ? core.track(a, b, ctx)
      : method == "page" ? core.page(a, ctx)
      : method == "identify" ? core.identify(a, b, ctx)
      : method == "reset" ? core.reset()
      : method == "consent" ? core.consent(!!a)
      : undefined;
    if (reason) this.bg(this.q.clear(core, reason));
    if (method == "consent") this.bg(this.start());
    if (!this.soon) {
      // Every event of this task in one write, issued before the task ends.
      this.soon = 1;
      queueMicrotask(() => this.persist());
    }
  }

  /** Sends what is queued now (in a tab that is not the sender: asks the sending tab to). */
  async flush() {
    this.alive();
    await this.persist();
    this.wake(NOW);
    // (not while backing off or while the relay asked to wait)
    if (this.leader) this.core.due() && (await this.round());
    else this.post("f");
    this.alive();
  }

  /** The loss counters (a promise; the core reads them from IndexedDB). */
  async stats() {
    this.alive();
    const counters = this.q && (await this.q.counters(this.core).catch((e) => this.fail(e)));
    this.alive();
    return this.core.stats(counters);
  }

  /** First- and last-touch attribution. */
  attribution() {
    this.alive();
    return this.core.attribution();
  }

  /** Persists and flushes, then stops sending (timers, lock). */
  async shutdown() {
    await this.flush();
    this.stopped = 1;
    this.unlock();
  }

  // ---------------------------------------------------------------------------------------------

  alive() {
    if (this.dead) throw this.dead;
  }

  /** A trap stops the core for good (another tab takes over sending); other errors are I/O's. */
  fail(e) {
    if (e instanceof WebAssembly.RuntimeError && !this.dead) {
      this.dead = e;
      this.unlock();
    }
  }

  guard(fn) {
    try {
      if (!this.dead) fn();
    } catch (e) {
      this.fail(e);
    }
  }

  bg(promise) {
    promise.catch((e) => this.fail(e));
  }

  /** Writes what this task tracked in one transaction, then tells the sender. */
  async persist(again) {
    this.soon = 0;
    try {
      const taken = this.core.take();
      if (!taken) return;
      // `check`: some were rescued before this write, which adds only those not queued yet.
      const [write, records, deltas, check] = taken;
      const { q } = this;
      const ok = await (check ? q.adopt(this.core, records, deltas) : q.write(records, deltas)).then(() => true, () => false);
      this.core.written(write, ok);
      // Once more at once, to count what failed (storage_unavailable); then with the next write.
      if (!ok) return again || this.persist(1);
      this.dirty = 1;
      this.wake(WRITTEN);
      if (!this.leader) this.post("w");
    } catch (e) {
      this.fail(e);
    }
  }

  /** Adopts the events other tabs rescued when they went away (Core.rescue). */
  async adopt() {
    let keys = [];
    try {
      keys = Object.keys(localStorage).filter((k) => k.startsWith("trueup.rescue."));
    } catch {} // access itself can throw (sandboxed frames, blocked cookies)
    for (const key of keys) {
      try {
        const records = JSON.parse(localStorage.getItem(key)).filter((r) => typeof r.i == "string" &&
          typeof r.s == "string" && typeof r.b == "number" && typeof r.t == "number");
        await this.q.adopt(this.core, records);
        localStorage.removeItem(key);
      } catch (e) {
        this.fail(e); // the list stays: the next page tries again
      }
    }
  }

  /**
   * Becomes the sending tab when the lock is granted (at once, or when the sending tab goes
   * away). Without Web Locks, every tab sends (the relay dedupes); with a queue in memory, each
   * tab sends its own.
   */
  lock() {
    if (this.asked || !this.q || this.stopped || this.dead) return;
    const locks = this.q.durable && navigator.locks;
    if (!locks) return this.lead();
    this.asked = 1;
    const { signal } = (this.asking = new AbortController());
    // (an opaque origin, …): send anyway; but not when the request was withdrawn (unlock)
    const refused = () => signal.aborted || ((this.asked = 0), this.lead());
    try {
      locks.request("trueup-sender", { signal }, () =>
        // Granted to a tab that has stopped meanwhile: handed on at once.
        this.stopped || this.dead || signal.aborted ? 0 : (this.lead(), new Promise((r) => (this.release = r)))).catch(refused);
    } catch {
      refused();
    }
  }

  /**
   * Releases the lock, or withdraws the request for it (pagehide: the page stays
   * bfcache-eligible; another tab takes over; shutdown; a trap).
   */
  unlock() {
    this.asking?.abort();
    this.release?.();
    this.release = this.leader = this.asked = 0;
  }

  lead() {
    if (this.leader || this.stopped || this.dead) return;
    this.leader = 1;
    this.wake(LEAD); // what earlier pages left goes at once
    if (hidden()) this.post("h"); // a visible tab, if any, takes over (`handOver`)
  }

  /** Tells the core (`Core.wake`), then sets the sending tab's timer (`arm`). */
  wake(how) {
    this.core.wake(how);
    this.arm();
  }

  /**
   * The sending tab's one timer, no polling: set for the core's next wake time (a send due,
   * after a backoff or the relay's wait), or at once when tabs wrote (the byte cap to enforce);
   * none while nothing waits, and none after a tick while offline (`online` sets it again).
   * `after` is the shortest wait, in ms.
   */
  arm(after = 0) {
    clearTimeout(this.timer);
    if (!this.leader || this.stopped || this.dead) return;
    const at = this.dirty ? 0 : this.core.next_wake();
    if (at < Infinity) this.timer = setTimeout(() => this.bg(this.tick()), Math.max(after, at - Date.now()));
  }

  /** The timer went off: folds the tabs' deltas and enforces the byte cap, sends if due and online. */
  async tick() {
    if (!this.leader || this.stopped || this.dead || this.ticking) return;
    this.ticking = 1;
    try {
      if (this.dirty) {
        this.dirty = 0;
        await this.q.maintain(this.core, this.o.maxQueueBytes, this.inflight).catch((e) => ((this.dirty = 1), this.fail(e)));
      }
      if (navigator.onLine !== false && this.core.due()) await this.round();
    } finally {
      this.ticking = 0;
    }
    if (navigator.onLine !== false) this.arm(200);
  }

  /** Sends batches until the queue is empty or an attempt fails. */
  async round() {
    const { core, q, o } = this;
    if (!q || this.busy) return;
    this.busy = 1;
    try {
      for (;;) {
        const batch = await q.peek(core);
        if (!batch.length) {
          core.wake(EMPTY);
          break;
        }
        const ids = (this.inflight = batch.map((r) => r.i));
        core.sending(ids);
        const counters = await q.counters(core).catch((e) => this.fail(e));
        const [status, retryAfter, answer] = await post(o.endpoint, body(o.site, batch, counters), o.requestTimeoutMs);
        const [outcomes, retried, more] = core.answered(ids, status, retryAfter, answer, batch.full);
        await q.settle(core, ids, outcomes, ids.length, retried).catch((e) => this.fail(e));
        if (!more) break;
      }
    } catch (e) {
      this.fail(e);
    }
    this.busy = 0;
    this.inflight = undefined;
    this.arm(200);
    if (this.handing) {
      this.handing = 0;
      this.handOver();
    }
  }
}
