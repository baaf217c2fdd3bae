// Types of the trueup browser agent's npm API (`import { init, track } from "trueup"`).
// Every function is safe to call before init(), during server-side rendering (where it does
// nothing) and after a failure: none of them throws, and no promise they return rejects.

/** Options for {@link init}. The whole object is handed to the wasm core as given. */
export interface Options {
  /** The site key configured in the relay (`[[sites]] key`). Required. */
  site: string;
  /** The collection endpoint, on your own origin. Default `"/_r/q"`. */
  endpoint?: string;
  /**
   * Where the agent's files (`trueup_agent.<hash>.js`, `trueup_agent_bg.<hash>.wasm`) are
   * served from, e.g. `"/_r/a/"`. Default: next to this module (your bundler emits them) or,
   * for the `<script>` loader, next to `loader.js`.
   */
  assets?: string;
  /**
   * `"granted"` (the default): store and send from the start. `"pending"`: nothing is stored or
   * sent until `consent(true)` (no IndexedDB database, no Storage item); events wait in memory,
   * at most 1,000 and 1 MB, the oldest dropped first (counted as `dropped.queue_full` once
   * consent is given); `consent(false)` discards what was held (`dropped.consent`).
   */
  consent?: "granted" | "pending";
  /** Further options the wasm core reads. */
  [option: string]: unknown;
}

/** Event properties: a JSON object. */
export type Props = Record<string, unknown>;

/** One campaign touch: how the visitor arrived. */
export interface Touch {
  utm_source?: string;
  utm_medium?: string;
  utm_campaign?: string;
  utm_term?: string;
  utm_content?: string;
  gclid?: string;
  fbclid?: string;
  msclkid?: string;
  referrer?: string;
  landing_page?: string;
  /** When the touch happened, ms since the epoch. */
  ts?: number;
}

/** First- and last-touch attribution, e.g. to hand to your server with a signup form. */
export interface Attribution {
  first?: Touch;
  last?: Touch;
}

/**
 * The agent's loss counters for this device. At every moment
 * `enqueued = acked + (sum of dropped) + pending`.
 */
export interface Counters {
  device_id: string;
  /** Events accepted by track()/page()/identify() and given an id and a seq. */
  enqueued: number;
  /** Send attempts of events (an event sent twice counts twice). */
  sent: number;
  /** Events the relay answered `accepted` or `duplicate` for. */
  acked: number;
  /** Events sent again after a failed attempt. */
  retried: number;
  /** Events still queued: not yet answered by the relay (beaconed ones included). */
  pending: number;
  /** Events given up, by reason (`queue_full`, `expired`, `rejected`, `too_large`, `consent`, …). */
  dropped: Record<string, number>;
  /** Set when the agent runs degraded: `"memory_queue"`, `"no_wasm"`, … */
  degraded?: string;
}

/** {@link Counters} plus what the stub counted itself. */
export interface Stats extends Counters {
  /** Calls waiting in the stub (before the core is ready, or held for consent). */
  buffered: number;
  /** Calls refused because 1000 were already waiting for the core. */
  buffer_full?: number;
  /** Calls into the wasm core that trapped; the fallback sends from then on. */
  wasm_panic?: number;
  /**
   * Why the core is not running: the last failure to load it while it is tried again (a network
   * failure), or why it was given up for the "no_wasm" fallback.
   */
  error?: string;
}

/**
 * Loads the wasm core and starts sending. Once per page; resolves when running (or degraded).
 * A core that could not be fetched is tried again (on `online`, and after 1 s, 4 s and 16 s while
 * online) before the "no_wasm" fallback takes over, so this can wait until the page is online.
 */
export function init(options: Options): Promise<void>;
/** Records event `name` (schema `event/1`) with `props`. */
export function track(name: string, props?: Props): void;
/** Records a page view (`page_view`). */
export function page(props?: Props): void;
/** Ties later events to `userId` and records an `identify` event with `traits`. */
export function identify(userId: string, traits?: Props): void;
/** Forgets the user (logout): a new anonymous id, no user id. */
export function reset(): void;
/** Grants or refuses consent (see {@link Options.consent}). */
export function consent(granted: boolean): void;
/** Sends what is queued now; resolves when that attempt is over. */
export function flush(): Promise<void>;
/** Flushes, then stops the agent's timers and listeners. */
export function shutdown(): Promise<void>;
/** First- and last-touch attribution (`{}` until the core is running). */
export function attribution(): Attribution;
/** The loss counters (the core reads them from IndexedDB, hence a promise). */
export function stats(): Promise<Stats>;
/** A lowercase UUIDv7 (48-bit ms timestamp, version 7, variant 10). */
export function uuidv7(ms?: number): string;
