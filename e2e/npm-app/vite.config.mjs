// Vite config of the npm-path app. e2e/npm.test.mjs builds it (`vite build e2e/npm-app
// --outDir <tmp>`) and serves the result with the relay; by hand: `npx vite e2e/npm-app` with
// a relay on 127.0.0.1:8080 (or TRUEUP_RELAY=http://host:port), after `npm run build`.
//
// How `import ... from "trueup"` resolves here: with no alias. This folder lies inside the
// trueup package (the repository root: package.json named "trueup", with "exports") and has no
// package.json of its own, so the bare specifier is a package self-reference, which Vite's
// resolver handles as Node does: through the root package.json's `exports` map to
// dist/trueup.js, the file an installed node_modules/trueup resolves to. So the test also
// covers the exports map, which an alias to dist/trueup.js would skip, and needs no `file:`
// dependency (nor an install). The one difference from an installed copy, dev-only, is that
// Vite does not pre-bundle it (it is not under node_modules); the test's second case serves the
// packed tarball from node_modules, which covers that.
//
// Nothing here is for the agent: Vite sees `new URL("./trueup_agent_bg.<hash>.wasm",
// import.meta.url)` and the glue's `import("./trueup_agent.<hash>.js")` in dist/trueup.js and
// emits both into assets/. The proxy is what a Vite user needs in dev: the agent posts to
// /_r/q on the page's own origin (allow that origin in the relay's [[sites]] origins).
// (A plain object, no `import from "vite"`, so the file works copied anywhere.)
export default {
  root: import.meta.dirname,
  server: {
    proxy: { "/_r": process.env.TRUEUP_RELAY || "http://127.0.0.1:8080" },
  },
};
