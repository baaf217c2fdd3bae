// posthog-js, as a site would bundle it from npm (`import posthog from "posthog-js"`), set up
// for the fastest delivery it offers with its own durability features on, everything
// self-hosted (e2e/peers/README in bench-peers.mjs's header says what and why).
import posthog from "posthog-js";

let ready = false;
window.__sdk = {
  name: "posthog",
  get ready() {
    return ready;
  },
  init(origin) {
    posthog.init("phc_trueup_bench", {
      api_host: `${origin}/ph`, // the local collector (e2e/peers/collector.mjs)
      persistence: "localStorage", // identity and super properties (the event queue is in memory in posthog-js)
      request_batching: true, // its default: events go in batches from its request queue
      request_queue_config: { flush_interval_ms: 1000 }, // trueup's flush interval (posthog's default: 3000)
      disable_compression: true, // plain JSON on the wire (the collector also decodes gzip and base64)
      rate_limiting: { events_per_second: 100000, events_burst_limit: 100000 }, // its client-side limit (10/s, burst 100) would drop the scenarios' bursts
      opt_out_useragent_filter: true, // headless Chromium's user agent is on its bot list (its docs: set this in end-to-end tests)
      advanced_disable_flags: true, // no /flags or remote config calls (a server we do not run)
      disable_external_dependency_loading: true, // no lazy scripts from the assets host
      autocapture: false,
      capture_pageview: false,
      capture_pageleave: false,
      capture_performance: false,
      capture_heatmaps: false,
      capture_dead_clicks: false,
      capture_exceptions: false,
      disable_session_recording: true,
      disable_surveys: true,
      disable_product_tours: true,
      disable_conversations: true,
      loaded: () => {
        ready = true;
      },
    });
  },
  track(name, props) {
    posthog.capture(name, props);
  },
};
