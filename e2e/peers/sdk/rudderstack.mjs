// RudderStack's v3 SDK from npm. The default export loads its plugins at run time from
// RudderStack's CDN (module federation); the `lite` export has the two plugins a site needs to
// send (XhrQueue: its localStorage-backed retry queue; BeaconQueue) built in, so nothing comes
// from a CDN. The source config its control plane would serve comes from the local collector
// (configUrl). Batching on (its /v1/batch endpoint) with trueup's flush interval.
import { RudderAnalytics } from "@rudderstack/analytics-js/lite";

const rs = new RudderAnalytics();
let ready = false;
window.__sdk = {
  name: "rudderstack",
  get ready() {
    return ready;
  },
  init(origin) {
    rs.load("trueup_bench", `${origin}/rs`, {
      configUrl: `${origin}/rs-cdn`,
      pluginsSDKBaseURL: `${origin}/rs-cdn/plugins`, // never used: the lite build has its plugins
      destSDKBaseURL: `${origin}/rs-cdn/destinations`, // no device-mode destinations configured
      plugins: ["XhrQueue"],
      queueOptions: { batch: { enabled: true, maxItems: 100, flushInterval: 1000 } },
      polyfillIfRequired: false,
      logLevel: "ERROR",
      onLoaded: () => {
        ready = true;
      },
    });
  },
  track(name, props) {
    rs.track(name, props);
  },
};
