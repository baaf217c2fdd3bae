// trueup's <script> entry, built by build.mjs into dist/loader.js (an IIFE containing stub.js).
//
// What it promises:
// - It takes over `window.trueup`: the calls the page snippet queued in `trueup.q` (each
//   `[method, args, ts, url, referrer, title]`, captured when the page made it) are replayed in
//   order, exactly once, keeping their captured time, URL, referrer and title; then the snippet's
//   methods are replaced by the real ones (and `q` is gone).
// - Options come from its own tag (`data-site`, `data-endpoint`, `data-consent`), then from a
//   queued `init(options)`, which wins. The wasm core is loaded from the loader's own directory
//   unless `assets` says otherwise.
// - Loaded twice, the second copy does nothing. It never throws into the page.
//
// The snippet (README), one line before the loader's tag:
//   <script>window.trueup=window.trueup||{q:[]};"init track page identify reset consent".split(" ").forEach(m=>trueup[m]=trueup[m]||((...a)=>trueup.q.push([m,a,Date.now(),location.href,document.referrer,document.title])))</script>
//   <script async src="/_r/a/loader.js" data-site="YOUR_SITE"></script>

import { _replay, attribution, consent, flush, identify, init, page, reset, shutdown, stats, track } from "./stub.js";

(() => {
  try {
    const previous = window.trueup;
    if (previous && previous.stats) return; // a real agent is already there
    const api = (window.trueup = { init, track, page, identify, reset, consent, flush, shutdown, stats, attribution });
    const tag = document.currentScript || document.querySelector("script[data-site]");
    const data = (tag && tag.dataset) || {};
    const options = {};
    for (const key of ["site", "endpoint", "consent"]) if (data[key]) options[key] = data[key];
    options.assets = new URL(".", (tag && tag.src) || location.href).href;
    for (const entry of (previous && previous.q) || []) {
      if (entry[0] == "init") Object.assign(options, entry[1][0]);
      else _replay(...entry);
    }
    if (options.site) api.init(options);
  } catch {}
})();
