// `npm run size`: what a browser downloads for the agent, per path, against the budget.
// Reads dist/manifest.json (written by `npm run build`) and measures each file raw, gzip -9 and
// brotli (quality 11, as the relay's precompressed siblings). The budget is a report, not a
// check: it always exits 0 once dist/ exists. `--dir DIR` measures another build.

import fs from "node:fs";
import path from "node:path";
import zlib from "node:zlib";

const BUDGET_GZIP = 30_000; // bytes, gzip -9, everything one path downloads (1 KB = 1000 B)

const i = process.argv.indexOf("--dir");
const dir = i > 0 ? path.resolve(process.argv[i + 1]) : path.resolve(import.meta.dirname, "../../../dist");
let manifest;
try {
  manifest = JSON.parse(fs.readFileSync(path.join(dir, "manifest.json"), "utf8"));
} catch {
  console.error(`size: no ${path.join(dir, "manifest.json")}; run \`npm run build\` first`);
  process.exit(1);
}

const measure = (name) => {
  const raw = fs.readFileSync(path.join(dir, name));
  return {
    name,
    raw: raw.length,
    gzip: zlib.gzipSync(raw, { level: 9 }).length,
    br: zlib.brotliCompressSync(raw, { params: { [zlib.constants.BROTLI_PARAM_QUALITY]: 11 } }).length,
  };
};
const kb = (n) => `${(n / 1000).toFixed(1)} KB`;
const row = (cells) => console.log(cells[0].padEnd(34) + cells.slice(1).map((c) => c.padStart(11)).join(""));

for (const [title, entry] of [["<script> path", manifest.loader], ["npm path", manifest.module]]) {
  const files = [entry, manifest.glue, manifest.wasm].map(measure);
  const total = { raw: 0, gzip: 0, br: 0 };
  for (const f of files) for (const k in total) total[k] += f[k];
  console.log(`\n${title}`);
  row(["file", "raw", "gzip -9", "brotli"]);
  for (const f of files) row([f.name, kb(f.raw), kb(f.gzip), kb(f.br)]);
  row(["total", kb(total.raw), kb(total.gzip), kb(total.br)]);
  const verdict = total.gzip <= BUDGET_GZIP
    ? `within budget (${kb(BUDGET_GZIP - total.gzip)} left)`
    : `OVER budget by ${kb(total.gzip - BUDGET_GZIP)}`;
  console.log(`budget: ${kb(BUDGET_GZIP)} gzip total → ${verdict}`);
}
