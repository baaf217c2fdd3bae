// The agent's queue: IndexedDB database `trueup` (version 2: stores q, kv, d), or the same stores
// in memory where IndexedDB is unavailable. The layout, the counter deltas and why they exist are
// documented in src/counters.rs. Every count is the wasm core's: each read-write transaction reads
// the stores, asks the core (`acc`: its `totals`, `pick`, `limit`, and the Totals it returns)
// what that means, writes the answer and the new totals back, and commits.
//
// Self-contained (no imports): core.js bundles it, and the Rust tests in Chromium import it as is.

const noop = () => {};

/**
 * Opens (creating or upgrading) the database `name`; rejects where IndexedDB is unavailable, and
 * when the open is blocked (another connection at an older version that does not close) for 3 s
 * or hangs for 10 s. The connection closes itself when another one asks for a new version, and
 * then, or when the browser closes it (its data cleared), calls `lost`.
 */
export const openIdb = (name, lost = noop) =>
  new Promise((ok, ko) => {
    let done;
    const give = (e) => done || ((done = 1), ko(e));
    setTimeout(give, 1e4);
    const r = indexedDB.open(name, 2);
    r.onupgradeneeded = () => {
      const db = r.result;
      ["q", "kv", "d"].forEach((s, i) => db.objectStoreNames.contains(s) ||
        db.createObjectStore(s, { autoIncrement: i > 1 }));
    };
    r.onblocked = () => setTimeout(give, 3e3);
    r.onsuccess = () => {
      const db = r.result;
      if (done) return db.close(); // given up already
      done = 1;
      db.onclose = db.onversionchange = () => (db.close(), lost());
      ok(db);
    };
    r.onerror = () => give(r.error);
  });

/** The queue in database `db` (an IDBDatabase), or in memory when `db` is undefined. */
export function queue(db) {
  const mem = !db && { q: new Map(), kv: new Map(), d: new Map(), n: 0 };
  let chain = Promise.resolve(); // read-write transactions of this page, one after the other

  // One transaction: its stores as operations (reads return promises, writes are issued and
  // fail the transaction if they fail) and `end()`, which commits and resolves when committed.
  // A request is continued in a microtask of its success event, while the transaction is still
  // active, so more requests can be made in it.
  function begin(stores, mode) {
    if (mem) {
      const all = (s, n) => {
        const e = [...mem[s]].slice(0, n);
        return Promise.resolve([e.map((x) => x[0]), e.map((x) => x[1])]);
      };
      return {
        get: (s, k) => Promise.resolve(mem[s].get(k)), all,
        put: (s, v, k) => mem[s].set(k, v), add: (s, v) => mem[s].set(++mem.n, v),
        del: (s, k) => mem[s].delete(k), end: () => Promise.resolve(), abort: noop,
      };
    }
    const tx = db.transaction(stores, mode);
    const done = new Promise((ok, ko) => {
      tx.oncomplete = ok;
      tx.onerror = tx.onabort = () => ko(tx.error);
    });
    done.catch(noop); // awaited by `end`; not an unhandled rejection when it is not
    const store = (s) => tx.objectStore(s);
    const req = (r) => new Promise((ok, ko) => {
      r.onsuccess = () => ok(r.result);
      r.onerror = () => ko(r.error);
    });
    return {
      get: (s, k) => req(store(s).get(k)),
      all: (s, n) => Promise.all([req(store(s).getAllKeys(null, n)), req(store(s).getAll(null, n))]),
      put: (s, v, k) => store(s).put(v, k),
      add: (s, v) => store(s).add(v),
      del: (s, k) => store(s).delete(k),
      end: () => (tx.commit?.(), done), // commit now rather than when the renderer is idle
      abort: () => tx.abort(),
    };
  }

  /** A read-write transaction: `fn(op, t)` with the totals `t`, which are then stored. */
  function rw(acc, fn) {
    const run = async () => {
      const op = begin(["q", "kv", "d"], "readwrite");
      try {
        const [c, qb, [deltaKeys, deltas]] = await Promise.all([op.get("kv", "c"), op.get("kv", "qb"), op.all("d")]);
        const t = acc.totals(c, qb, deltas);
        const out = await fn(op, t);
        for (const k of deltaKeys) op.del("d", k); // folded into t
        op.put("kv", t.counters(), "c");
        op.put("kv", t.qb, "qb");
        t.free();
        await op.end();
        return out;
      } catch (e) {
        try {
          op.abort(); // nothing half-counted is committed
        } catch {}
        throw e;
      }
    };
    const p = chain.then(run);
    chain = p.catch(noop);
    return p;
  }

  return {
    durable: !!db,
    rw,

    /** Writes events (records `{i, s, b, t}`) and delta records, without reading, in this task. */
    async write(records, deltas) { // (async: a connection that is closed rejects, not throws)
      const op = begin(["q", "d"], "readwrite");
      for (const { i, s, b, t } of records) op.put("q", { s, b, t }, i);
      for (const d of deltas) op.add("d", d);
      return op.end();
    },

    /** The counters: what is stored plus the deltas not yet folded in. */
    async counters(acc) {
      const op = begin(["kv", "d"], "readonly");
      const [c, [, deltas]] = await Promise.all([op.get("kv", "c"), op.all("d")]);
      const t = acc.totals(c, 0, deltas);
      const counters = t.counters();
      t.free();
      return counters;
    },

    /** The next batch, oldest first (records `{i, s}`); the expired events on the way go. */
    peek: (acc) => rw(acc, async (op, t) => {
      // Two bulk reads (no cursor round trips) keep the sending tab's transaction short, so the
      // other tabs' writes wait as little as possible. A window of expired events only is
      // deleted, and the next one read (the reads see the deletes).
      for (;;) {
        const [keys, values] = await op.all("q", acc.limit);
        const out = [];
        let j = 0;
        for (let total = 0; j < keys.length; j++) {
          const { s, b, t: ts } = values[j];
          const verdict = acc.pick(t, b, ts, out.length, total);
          if (!verdict) break;
          if (verdict > 1) op.del("q", keys[j]);
          else out.push({ i: keys[j], s }), (total += b);
        }
        // Full: events wait behind this batch (a window read in full, or one cut short).
        out.full = keys.length >= acc.limit || j < keys.length;
        if (out.length || !j) return out;
      }
    }),

    /**
     * Removes the batch `ids` settled with `outcomes` (per event: true, a drop reason, or
     * undefined to keep it) and counts them; an event already gone (settled by another path) is
     * not counted twice. `sent` and `retried` are counted in the same transaction.
     */
    settle: (acc, ids, outcomes, sent, retried) => rw(acc, async (op, t) => {
      t.sent(sent, retried);
      const found = await Promise.all(ids.map((id, j) => outcomes[j] !== undefined && op.get("q", id)));
      found.forEach((v, j) => v && (op.del("q", ids[j]), t.settle(outcomes[j], v.b)));
    }),

    /**
     * Folds the deltas, and evicts the oldest events while the queue is over `max` bytes, but
     * not those of the batch in flight (`busy`, ids): the relay may be storing them.
     */
    maintain: (acc, max, busy = []) => rw(acc, async (op, t) => {
      while (t.over(max)) {
        const [keys, values] = await op.all("q", 100 + busy.length);
        let evicted = 0;
        for (let j = 0; j < keys.length && t.over(max); j++) {
          if (!busy.includes(keys[j])) op.del("q", keys[j]), t.evict(values[j].b), evicted++;
        }
        if (!evicted) break;
      }
    }),

    /**
     * Adds the events rescued (records) that are not queued, counting those added, and the
     * delta records `deltas` (Core.take with `check`).
     */
    adopt: (acc, records, deltas = []) => rw(acc, async (op, t) => {
      const found = await Promise.all(records.map((r) => op.get("q", r.i)));
      records.forEach(({ i, s, b, t: ts }, j) => found[j] || (op.put("q", { s, b, t: ts }, i), t.adopt(b)));
      for (const d of deltas) op.add("d", d);
    }),

    /** Drops everything queued with `reason` (opt-out). */
    clear: (acc, reason) => rw(acc, async (op, t) => {
      const [keys, values] = await op.all("q");
      keys.forEach((k, j) => (op.del("q", k), t.settle(reason, values[j].b)));
    }),
  };
}
