// Segment's analytics-next, as a site would bundle it from npm (`AnalyticsBrowser.load`), in its
// standard delivery mode (one request per event), which is the mode with its localStorage
// retry queue (the batching mode keeps its buffer in memory), with keepalive on.
// The settings its CDN would serve come from the local collector (cdnURL).
import { AnalyticsBrowser } from "@segment/analytics-next";

let analytics;
let ready = false;
window.__sdk = {
  name: "segment",
  get ready() {
    return ready;
  },
  init(origin) {
    analytics = AnalyticsBrowser.load(
      { writeKey: "trueup_bench", cdnURL: `${origin}/seg-cdn` },
      {
        integrations: {
          "Segment.io": {
            apiHost: `${new URL(origin).host}/seg/v1`,
            protocol: "http",
            deliveryStrategy: { strategy: "standard", config: { keepalive: true } },
          },
        },
      },
    );
    analytics.then(() => {
      ready = true;
    });
  },
  track(name, props) {
    analytics.track(name, props);
  },
};
