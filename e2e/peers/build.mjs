// Bundles each peer SDK from node_modules for the browser (esbuild, minified) into
// e2e/peers/dist/: one ES module per SDK (e2e/peers/sdk/<name>.mjs, which sets
// window.__sdk = {name, ready, init(origin), track(name, props)}) plus the chunks it imports
// lazily. ES modules with code splitting rather than one IIFE each, so that what an SDK only
// loads on demand (Segment's analytics-next splits its plugins into chunks) is downloaded, and
// counted, only when the page really asks for it, as on a site that bundles it.
//
// Used by e2e/bench-peers.mjs; `node e2e/peers/build.mjs` on its own prints the files.

import * as esbuild from "esbuild";
import { rmSync, readFileSync } from "node:fs";
import { join, basename } from "node:path";
import { gzipSync } from "node:zlib";

export const PEERS_DIR = import.meta.dirname;
export const DIST = join(PEERS_DIR, "dist");
export const SDKS = ["posthog", "segment", "rudderstack", "snowplow", "rudderstack-beacon"];

/** Builds every SDK; {sdk: {entry, files: [{name, raw, gzip}]}} (entry: the file to import). */
export async function buildPeers() {
  rmSync(DIST, { recursive: true, force: true });
  const out = {};
  for (const sdk of SDKS) {
    const dir = join(DIST, sdk);
    const r = await esbuild.build({
      entryPoints: { [sdk]: join(PEERS_DIR, "sdk", `${sdk}.mjs`) },
      bundle: true,
      minify: true,
      format: "esm",
      splitting: true,
      outdir: dir,
      target: "es2020",
      platform: "browser",
      define: { "process.env.NODE_ENV": '"production"' },
      metafile: true,
      logLevel: "warning",
      legalComments: "none",
    });
    const files = Object.keys(r.metafile.outputs)
      .filter((f) => f.endsWith(".js"))
      .map((f) => {
        const buf = readFileSync(f);
        return { name: `${sdk}/${basename(f)}`, raw: buf.length, gzip: gzipSync(buf, { level: 9 }).length };
      });
    out[sdk] = { entry: `${sdk}/${sdk}.js`, files };
  }
  return out;
}

if (process.argv[1] === import.meta.filename) {
  const built = await buildPeers();
  for (const [sdk, b] of Object.entries(built)) {
    const gz = b.files.reduce((a, f) => a + f.gzip, 0);
    console.log(`${sdk}: ${b.files.length} file(s), ${(gz / 1000).toFixed(1)} KB gzip -9 in all; entry ${b.entry}`);
  }
}
