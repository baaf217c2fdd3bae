// Regenerates relay/dash/vendor/ (the dashboard's third-party files, served first-party by the
// relay's admin listener) from node_modules: `npm install && npm run vendor:dash`.
import { copyFileSync, mkdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const uplotDir = join(here, "..", "..", "node_modules", "uplot");
const vendorDir = join(here, "vendor");

// The version is pinned in package.json; say which one was copied.
const { version } = JSON.parse(readFileSync(join(uplotDir, "package.json"), "utf8"));

const files = [
  ["dist/uPlot.iife.min.js", "uPlot.iife.min.js"],
  ["dist/uPlot.min.css", "uPlot.min.css"],
  ["LICENSE", "LICENSE"],
];

mkdirSync(vendorDir, { recursive: true });
for (const [from, to] of files) {
  copyFileSync(join(uplotDir, from), join(vendorDir, to));
}
console.log(`copied uplot@${version} (${files.map(([, to]) => to).join(", ")}) into ${vendorDir}`);
