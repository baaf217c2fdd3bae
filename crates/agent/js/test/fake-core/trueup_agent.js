// A stand-in for wasm-bindgen's output (trueup_agent.js + trueup_agent_bg.wasm, an empty
// module) that keeps the Agent contract, for testing the stub without the Rust core.
// `globalThis.__fakeCore` steers it and records what happened:
//   failInit: "message"  → init() rejects with an Error (as when the wasm cannot run), or with
//                          failInit itself when it is not a string (e.g. a WebAssembly.CompileError)
//   failNext: n          → the next n init() calls reject with TypeError("Failed to fetch"), as
//                          when the glue or the wasm cannot be fetched (offline)
//   noWasm: true         → init() does not fetch and instantiate the wasm (Node)
//   agent                → the constructed Agent: .options, .calls ([method, args, ctx]), .flushes
// A call whose first argument is "panic!" throws a RuntimeError, as a trapped Rust panic does.

const state = () => (globalThis.__fakeCore ||= {});

export default async function init({ module_or_path } = {}) {
  const f = state();
  f.initCalls = (f.initCalls || 0) + 1;
  module_or_path ||= new URL('trueup_agent_bg.wasm', import.meta.url);
  f.wasmUrl = String(module_or_path);
  if (f.failNext > 0) {
    f.failNext--;
    throw new TypeError("Failed to fetch");
  }
  if (f.failInit) throw typeof f.failInit == "string" ? new Error(f.failInit) : f.failInit;
  if (!f.noWasm) {
    const bytes = await (await fetch(module_or_path)).arrayBuffer();
    await WebAssembly.instantiate(bytes); // what a CSP without 'wasm-unsafe-eval' refuses
  }
}

export function initSync({ module }) {
  new WebAssembly.Instance(new WebAssembly.Module(module)); // the build's smoke test
}

export class Agent {
  constructor(options) {
    this.options = options;
    this.calls = [];
    this.flushes = 0;
    state().agent = this;
  }
  call(method, args, ctx) {
    if (args[0] === "panic!") throw new WebAssembly.RuntimeError("unreachable");
    this.calls.push([method, args, ctx]);
  }
  async flush() {
    this.flushes++;
  }
  async stats() { // the real core reads its counters from IndexedDB
    const n = this.calls.length;
    return { device_id: "fake", enqueued: n, sent: 0, acked: 0, retried: 0, pending: n, dropped: {} };
  }
  attribution() {
    return { first: { utm_source: "fake" } };
  }
  async shutdown() {
    this.stopped = true;
  }
}
