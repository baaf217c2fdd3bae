// RudderStack v3 in its beacon mode (`useBeacon: true`): the BeaconQueue plugin (built into the
// `lite` export) sends batches with navigator.sendBeacon to <dataPlaneUrl>/beacon/v1/batch, and
// drops a batch from its localStorage queue as soon as the browser has accepted the beacon (a
// beacon's answer cannot be read, so server errors are not retried). An optional variant of
// e2e/peers/sdk/rudderstack.mjs for npm run bench:peers -- --sdk=rudderstack-beacon.
import { RudderAnalytics } from "@rudderstack/analytics-js/lite";

const rs = new RudderAnalytics();
let ready = false;
window.__sdk = {
  name: "rudderstack-beacon",
  get ready() {
    return ready;
  },
  init(origin) {
    rs.load("trueup_bench", `${origin}/rsb`, {
      configUrl: `${origin}/rs-cdn`,
      pluginsSDKBaseURL: `${origin}/rs-cdn/plugins`,
      destSDKBaseURL: `${origin}/rs-cdn/destinations`,
      plugins: ["BeaconQueue"],
      useBeacon: true,
      beaconQueueOptions: { maxItems: 10, flushQueueInterval: 1000 },
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
