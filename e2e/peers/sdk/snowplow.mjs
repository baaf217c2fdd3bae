// Snowplow's browser tracker v4 from npm: POST, one event per request (its recommended
// bufferSize 1), its localStorage event store (on by default), keepalive on, plain JSON
// (no base64) so the collector reads the payload as is.
import { newTracker, trackSelfDescribingEvent } from "@snowplow/browser-tracker";

window.__sdk = {
  name: "snowplow",
  ready: false,
  init(origin) {
    newTracker("sp", origin, {
      appId: "trueup-bench",
      platform: "web",
      eventMethod: "post",
      postPath: "/sp/com.snowplowanalytics.snowplow/tp2",
      bufferSize: 1,
      useLocalStorage: true,
      keepalive: true,
      encodeBase64: false,
      stateStorageStrategy: "localStorage",
      contexts: { webPage: true },
    });
    window.__sdk.ready = true;
  },
  track(name, props) {
    trackSelfDescribingEvent({
      event: { schema: "iglu:dev.trueup/bench_event/jsonschema/1-0-0", data: { name, ...props } },
    });
  },
};
