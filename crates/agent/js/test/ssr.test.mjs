// On a server (no window, no document) the stub imports, does nothing, throws nothing and
// loads no wasm.

import assert from "node:assert/strict";
import { test } from "node:test";
import { buildWithFakeCore, freshStub } from "./helpers.mjs";

test("importing and calling without a window does nothing", async () => {
  assert.equal(typeof globalThis.window, "undefined");
  const t = await freshStub(buildWithFakeCore());
  await t.init({ site: "demo" });
  t.track("x", { a: 1 });
  t.page();
  t.identify("u");
  t.reset();
  t.consent(true);
  await t.flush();
  await t.shutdown();
  assert.deepEqual(t.attribution(), {});
  assert.equal((await t.stats()).buffered, 0);
  assert.equal(globalThis.__fakeCore, undefined, "the core was not loaded");
});
