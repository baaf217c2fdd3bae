// The agent's build: `npm run build` from the repository root writes dist/, which the relay
// serves at <prefix>/a/ and which the npm package ships.
//
//   cargo build (wasm32, profile "wasm", no_std)  →  wasm-bindgen --target web
//   →  wasm-opt -Oz (binaryen 132 from npm; else Debian's, before wasm-bindgen)
//   →  esbuild: core.js (the Agent, with host.js and queue.js) and wasm-bindgen's glue, one module
//   →  dist/trueup_agent_bg.<hash>.wasm, dist/trueup_agent.<hash>.js   (long-cache names)
//   →  dist/trueup.js (npm entry, ESM) and dist/loader.js (<script> entry, IIFE; short-cache)
//   →  .gz and .br siblings of each, dist/trueup.d.ts, dist/manifest.json
//
// The hashes are of the final bytes, and the glue's hash covers the wasm's name, so a new wasm
// always comes with a new glue name: the year-long cache never pairs a glue with the wrong wasm.
//
// `node build.mjs --from DIR` skips cargo, wasm-bindgen and core.js and takes DIR/trueup_agent.js
// (a complete core module: default init, initSync, Agent) and DIR/trueup_agent_bg.wasm as they
// are; `--out DIR` writes there instead of dist/ (the tests build a fake core this way);
// `--features LIST` builds the core with crate features (e2e/trap.test.mjs: `test-trap`).

import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";
import zlib from "node:zlib";
import * as esbuild from "esbuild";

const here = import.meta.dirname;
const root = path.resolve(here, "../../..");
const arg = (flag) => {
  const i = process.argv.indexOf(flag);
  return i > 0 ? path.resolve(process.argv[i + 1]) : undefined;
};
const dist = arg("--out") || path.join(root, "dist");
const TARGET = "es2021"; // every browser that runs wasm-bindgen's output
// wasm-opt validates only what is enabled; these are what rustc emits (binaryen 132 also needs
// --enable-bulk-memory-opt).
const WASM_OPT_FEATURES = ["--enable-bulk-memory", "--enable-nontrapping-float-to-int",
  "--enable-sign-ext", "--enable-mutable-globals", "--enable-reference-types",
  "--enable-multivalue"];

const log = (msg) => console.log(`build: ${msg}`);
function run(cmd, args) {
  log(`${cmd} ${args.map((a) => (path.isAbsolute(a) ? path.relative(root, a) : a)).join(" ")}`);
  execFileSync(cmd, args, { cwd: root, stdio: "inherit" });
}
const has = (cmd) => !spawnSync(cmd, ["--version"], { stdio: "ignore" }).error;
const hash8 = (bytes) => createHash("sha256").update(bytes).digest("hex").slice(0, 8);

function compileCore() {
  const dir = arg("--from");
  if (dir) {
    return { glue: path.join(dir, "trueup_agent.js"), wasm: path.join(dir, "trueup_agent_bg.wasm"), bundle: false };
  }
  const meta = JSON.parse(execFileSync("cargo", ["metadata", "--format-version", "1", "--no-deps"],
    { cwd: root, encoding: "utf8" }));
  const work = path.join(meta.target_directory, "trueup-agent-js");
  fs.rmSync(work, { recursive: true, force: true });
  // The workspace's size profile for the wasm (opt-level z, panic = abort, …) when it has one.
  const profile = /^\[profile\.wasm\]/m.test(fs.readFileSync(path.join(root, "Cargo.toml"), "utf8"))
    ? "wasm" : "release";
  // Without the default `std` feature: no_std, with a panic handler that traps (src/lib.rs).
  // `--features LIST` adds crate features (the e2e trap test builds with `test-trap`).
  const features = process.argv.includes("--features") ? ["--features", process.argv[process.argv.indexOf("--features") + 1]] : [];
  run("cargo", ["build", "--profile", profile, "--target", "wasm32-unknown-unknown", "-p", "trueup-agent",
    "--no-default-features", ...features]);
  if (!has("wasm-bindgen")) {
    throw new Error("wasm-bindgen is not installed: cargo install wasm-bindgen-cli --version 0.2.130");
  }
  let wasm = path.join(meta.target_directory, "wasm32-unknown-unknown", profile, "trueup_agent.wasm");
  fs.mkdirSync(work, { recursive: true });
  // binaryen from npm (the `binaryen` dev dependency, 132) runs after wasm-bindgen: only then can
  // it drop what wasm-bindgen leaves behind (a function table of closure shims for imports the
  // core never calls: 2.4 KB gzip). Debian's binaryen 108 cannot run there: it re-points the
  // export of wasm-bindgen's second table (`__wbindgen_externrefs`) at table 0 when it writes a
  // module with two tables, and the page then fails at start with "WebAssembly.Table.set():
  // Argument 1 is invalid for table"; so without the npm one, Debian's runs before wasm-bindgen.
  const npmWasmOpt = path.join(root, "node_modules", ".bin", "wasm-opt");
  const after = fs.existsSync(npmWasmOpt);
  if (!after && has("wasm-opt")) {
    const optimized = path.join(work, "trueup_agent.opt.wasm");
    run("wasm-opt", ["-Oz", ...WASM_OPT_FEATURES, wasm, "-o", optimized]);
    wasm = optimized;
  } else if (!after) {
    console.warn("build: WARNING wasm-opt not found, the wasm is not size-optimized (npm install)");
  }
  run("wasm-bindgen", ["--target", "web", "--remove-name-section", "--remove-producers-section",
    "--out-dir", work, "--out-name", "trueup_agent", wasm]);
  wasm = path.join(work, "trueup_agent_bg.wasm");
  const glue = path.join(work, "trueup_agent.js");
  if (after) {
    run(npmWasmOpt, ["-Oz", "--converge", "--strip-target-features", "--strip-producers",
      ...WASM_OPT_FEATURES, "--enable-bulk-memory-opt", wasm, "-o", wasm]);
    minifyNames(npmWasmOpt, wasm, glue);
  }
  return { glue, wasm, bundle: true };
}

/**
 * Gives the wasm's imports and exports one- and two-letter names (binaryen's
 * `--minify-imports-and-exports-and-modules`) and rewrites wasm-bindgen's glue to match, as a JS
 * minifier does for JS: its names (`__wbg_push_c9f4893fc209f768`, `core_answered`, …) carry a
 * 16-hex-digit hash each and are written twice, in the wasm and in the glue (1.3 KB gzip of
 * names alone). The glue's import object keys and its `wasm.<export>` uses are the only places
 * they appear; anything not found, or left over, fails the build (and the smoke test below
 * instantiates the pair).
 */
function minifyNames(wasmOpt, wasm, glue) {
  log(`${path.relative(root, wasmOpt)} --minify-imports-and-exports-and-modules ${path.relative(root, wasm)}`);
  const printed = execFileSync(wasmOpt, ["--minify-imports-and-exports-and-modules", ...WASM_OPT_FEATURES,
    "--enable-bulk-memory-opt", wasm, "-o", wasm], { cwd: root, encoding: "utf8" });
  const map = JSON.parse(printed.replace(/,(\s*[\]}])/g, "$1")); // (binaryen prints trailing commas)
  const module = new WebAssembly.Module(fs.readFileSync(wasm));
  const modules = new Set(WebAssembly.Module.imports(module).map((i) => i.module));
  const exports = new Set(WebAssembly.Module.exports(module).map((e) => e.name));
  let text = fs.readFileSync(glue, "utf8");
  const replaceOnce = (pattern, by, what) => {
    let n = 0;
    text = text.replace(pattern, (...m) => (n++, by(...m)));
    if (!n) throw new Error(`minifyNames: ${what} not found in wasm-bindgen's glue`);
  };
  const oldModules = new Set(map.imports.map((i) => i[0]));
  const [oldModule] = oldModules;
  if (modules.size != 1 || oldModules.size != 1) {
    throw new Error(`minifyNames: expected the imports of one module, got ${[...modules]}`);
  }
  for (const [, name, short] of map.imports) {
    replaceOnce(new RegExp(`(^|[\\s{,])${name}(\\s*:)`, "gm"), (_, before, colon) => before + short + colon, `import ${name}`);
  }
  replaceOnce(new RegExp(`(["'])${oldModule.replace(/[.]/g, "\\.")}\\1(\\s*:)`, "g"), (_, q, colon) => JSON.stringify([...modules][0]) + colon, `module ${oldModule}`);
  const short = new Map(map.exports);
  text = text.replace(/\bwasm\.(\w+)/g, (m, name) => {
    const to = short.get(name);
    if (!to || !exports.has(to)) throw new Error(`minifyNames: the glue uses export ${name}, which the wasm does not have`);
    return `wasm.${to}`;
  });
  fs.writeFileSync(glue, text);
}

async function main() {
  const core = compileCore();
  fs.rmSync(dist, { recursive: true, force: true });
  fs.mkdirSync(dist);
  const write = (name, bytes) => (fs.writeFileSync(path.join(dist, name), bytes), name);

  const wasmBytes = fs.readFileSync(core.wasm);
  const wasmName = write(`trueup_agent_bg.${hash8(wasmBytes)}.wasm`, wasmBytes);

  // The glue's default URL for the wasm becomes the hashed name, so that bundlers resolving
  // `new URL(…, import.meta.url)` in it find a file that exists.
  const defaultWasm = /(['"])(\.\/)?trueup_agent_bg\.wasm\1/g;
  const glueSource = fs.readFileSync(core.glue, "utf8").replace(defaultWasm, JSON.stringify(`./${wasmName}`));
  let glueCode;
  if (core.bundle) {
    // core.js imports wasm-bindgen's glue as "trueup-glue".
    const patched = core.glue.replace(/\.js$/, ".hashed.js");
    fs.writeFileSync(patched, glueSource);
    const out = await esbuild.build({
      entryPoints: [path.join(here, "core.js")], bundle: true, write: false, format: "esm",
      minify: true, target: TARGET, legalComments: "none", logLevel: "warning",
      plugins: [{ name: "glue", setup: (b) => b.onResolve({ filter: /^trueup-glue$/ }, () => ({ path: patched })) }],
    });
    glueCode = out.outputFiles[0].text;
  } else {
    glueCode = (await esbuild.transform(glueSource, { format: "esm", minify: true, target: TARGET })).code;
  }
  const glueName = write(`trueup_agent.${hash8(glueCode)}.js`, glueCode);

  // Smoke test: the glue instantiates the wasm and runs its start (what a broken optimizer
  // output fails at). Node has WebAssembly; nothing here needs a browser.
  const glueModule = await import(pathToFileURL(path.join(dist, glueName)).href);
  if (typeof glueModule.Agent != "function") throw new Error(`${glueName} exports no Agent`);
  try {
    glueModule.initSync({ module: wasmBytes });
  } catch (e) {
    throw new Error(`${wasmName} does not instantiate with its glue: ${e.message}`);
  }

  const common = { minify: true, target: TARGET, legalComments: "none", logLevel: "warning" };
  const names = { __GLUE__: JSON.stringify(`./${glueName}`), __WASM__: JSON.stringify(`./${wasmName}`) };
  await esbuild.build({
    ...common, entryPoints: [path.join(here, "stub.js")], outfile: path.join(dist, "trueup.js"),
    format: "esm", bundle: false, treeShaking: true,
    define: { ...names, __NPM_GLUE__: names.__GLUE__, __LOADER__: "false" },
  });
  await esbuild.build({
    ...common, entryPoints: [path.join(here, "loader.js")], outfile: path.join(dist, "loader.js"),
    format: "iife", bundle: true,
    define: { ...names, __NPM_GLUE__: "undefined", __LOADER__: "true" },
    logOverride: { "empty-import-meta": "silent" }, // only in the branch the loader never takes
  });
  fs.copyFileSync(path.join(here, "trueup.d.ts"), path.join(dist, "trueup.d.ts"));

  // Precompressed siblings, served by the relay when the browser accepts them.
  const files = {};
  for (const name of ["loader.js", "trueup.js", glueName, wasmName]) {
    const raw = fs.readFileSync(path.join(dist, name));
    const gz = zlib.gzipSync(raw, { level: 9 });
    const br = zlib.brotliCompressSync(raw, {
      params: { [zlib.constants.BROTLI_PARAM_QUALITY]: 11, [zlib.constants.BROTLI_PARAM_SIZE_HINT]: raw.length },
    });
    write(`${name}.gz`, gz);
    write(`${name}.br`, br);
    files[name] = { bytes: raw.length, gzip: gz.length, br: br.length,
      integrity: "sha384-" + createHash("sha384").update(raw).digest("base64") };
  }
  const { version } = JSON.parse(fs.readFileSync(path.join(root, "package.json"), "utf8"));
  const manifest = {
    version,
    loader: "loader.js", // <script src> (cached 5 minutes)
    module: "trueup.js", // npm entry
    types: "trueup.d.ts",
    glue: glueName, // imported by both entries (cached a year)
    wasm: wasmName,
    files,
  };
  write("manifest.json", JSON.stringify(manifest, null, 2) + "\n");
  for (const [name, f] of Object.entries(files)) {
    log(`${path.relative(root, dist)}/${name.padEnd(34)} ${String(f.bytes).padStart(7)} B  gzip ${String(f.gzip).padStart(6)} B  br ${String(f.br).padStart(6)} B`);
  }
  log("done; sizes against the budget: npm run size");
}

main().catch((e) => {
  console.error(`build: FAILED: ${e.message}`);
  process.exit(1);
});
