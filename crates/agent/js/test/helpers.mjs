// Test helpers: build the agent with the fake core (test/fake-core) into a temporary directory
// with the real build script, and give each test a fresh copy of the stub module.

import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";

const here = import.meta.dirname;

/** Builds once per test file; returns the output directory. */
export function buildWithFakeCore() {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), "trueup-js-test-"));
  execFileSync(process.execPath, [path.join(here, "../build.mjs"), "--from",
    path.join(here, "fake-core"), "--out", out], { stdio: "pipe" });
  return out;
}

let instance = 0;
/** A new instance of dist/trueup.js (module state is per URL). */
export const freshStub = (out) => import(`${pathToFileURL(path.join(out, "trueup.js"))}?i=${++instance}`);

/** Waits for queued microtasks and promise callbacks. */
export const settle = () => new Promise((resolve) => setTimeout(resolve, 5));

export const UUIDV7 = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
