// The agent used the way an npm user does: a bare import of the package, bundled by Vite, which
// emits the wasm core and its glue as assets of this app (no /_r/a/ needed).
import { init, track, stats, attribution } from "trueup";

// `?run=<id>` tags the events (the e2e test's run id); a person opening the page gets "manual".
const run = new URLSearchParams(location.search).get("run") || "manual";

const ready = init({ site: "demo" });
track("app_loaded", { app: "npm-app", load: run }); // on load (no `i`: not one of the clicks)

let clicks = 0;
document.querySelector("#buy").addEventListener("click", () => {
  track("added_to_cart", { run, i: clicks++, sku: "mug-42" });
});
document.querySelector("#show").addEventListener("click", async () => {
  const out = { stats: await stats(), attribution: attribution() };
  document.querySelector("#out").textContent = JSON.stringify(out, null, 2);
});

// For the e2e test (e2e/npm.test.mjs): the init promise and the read-only calls.
window.npmApp = { ready, stats, attribution, clicks: () => clicks };
