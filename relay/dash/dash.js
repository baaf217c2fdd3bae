// Shared code of the relay's admin dashboard pages (/dash/*): fetching the JSON API, the
// date-range picker, auto-refresh, the loading / error / unauthorized states, DOM and
// formatting helpers, and uPlot charts over a list of days. An ES module served as is (no
// framework, no build step); uPlot is the classic script /dash/vendor/uPlot.iife.min.js,
// loaded before this module, which leaves it on `window.uPlot`.
//
// Everything that comes from the API is untrusted (reject samples carry client payloads): it
// reaches the page only through text nodes and attribute values, never through innerHTML.

export const RANGES = [
  { days: 1, label: "Today" },
  { days: 7, label: "7 days" },
  { days: 30, label: "30 days" },
];
const DEFAULT_DAYS = 7;
const REFRESH_MS = 30_000;
const TIMEOUT_MS = 15_000;
export const DASH = "–";

// ---- DOM ----------------------------------------------------------------------------------

/** `el("td", {"data-col": "actual"}, "40")`. Attributes that are null or false are left out,
 *  true gives an empty attribute; children are nodes or text (never parsed as HTML). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child != null && child !== false) node.append(child); // strings become text nodes
  }
  return node;
}

/** An API value as a `data-value` attribute: "" for null, "true"/"false", numbers as is. */
export const dataValue = (value) => (value == null ? "" : String(value));

/** A dashboard card: `<section data-section=id>` with a title, an optional note, the content. */
export function section({ id, title, note, wide = false }, ...content) {
  return el(
    "section",
    { class: wide ? "card wide" : "card", id: `section-${id}`, "data-section": id },
    el("h2", {}, title),
    note ? el("p", { class: "note" }, note) : null,
    ...content,
  );
}

/** Shown in place of a section's charts and tables when the API could not compute it. */
export const errorNote = (sectionId, message) =>
  el("div", { class: "error", role: "status", "data-error": sectionId }, message);

/** A section (or part of one) that has nothing to show yet. */
export const emptyNote = (sectionId, message) =>
  el("p", { class: "empty", "data-empty": sectionId }, message);

/** section → its error messages (`errors` of an API answer), joined with "; ". */
export function errorsBySection(errors) {
  const bySection = new Map();
  for (const { section: id, message } of errors ?? []) {
    bySection.set(id, bySection.has(id) ? `${bySection.get(id)}; ${message}` : message);
  }
  return bySection;
}

/** The line above the cards: which site, which UTC days. */
export function scopeLine(data) {
  const days = data.day_list ?? [];
  const span = days.length ? `${fmt.day(days[0])}${days.length > 1 ? ` – ${fmt.day(days.at(-1))} (UTC days)` : " (UTC day)"}` : "";
  return el("p", { class: "scope wide" }, `${data.site == null ? "all sites" : `site ${data.site}`} · ${span}`);
}

/** A horizontal bar, `value / max` of its track's width (for a table cell or a list). */
export function hbar(value, max, className = "") {
  const share = max > 0 && value > 0 ? Math.min(100, (value / max) * 100) : 0;
  return el("span", { class: "hbar-track", "aria-hidden": "true" },
    el("span", { class: className ? `hbar ${className}` : "hbar", style: `width:${share.toFixed(2)}%` }));
}

/** A table. `columns`: {key, label, num?, text?(row), value?(row)}; every cell gets
 *  `data-col=key` and `data-value` (the raw API value: `value(row)`, by default `row[key]`).
 *  `rowAttrs(row)` gives the `<tr>`'s attributes. */
export function dataTable({ columns, rows, rowAttrs = () => ({}), caption }) {
  const head = el("tr", {}, columns.map((c) => el("th", { class: c.num ? "num" : null, scope: "col" }, c.label)));
  const body = rows.map((row) =>
    el(
      "tr",
      rowAttrs(row),
      columns.map((c) => {
        const raw = c.value ? c.value(row) : row[c.key];
        const shown = c.text ? c.text(row) : raw == null ? DASH : String(raw);
        return el("td", { class: c.num ? "num" : null, "data-col": c.key, "data-value": dataValue(raw) }, shown);
      }),
    ),
  );
  return el("div", { class: "table-wrap" },
    el("table", {}, caption ? el("caption", {}, caption) : null, el("thead", {}, head), el("tbody", {}, body)));
}

// ---- Formatting ---------------------------------------------------------------------------

const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

export const fmt = {
  /** 1234 → "1,234". */
  count: (n) => (n == null ? DASH : integer.format(n)),
  /** 30 → "30.0 %". */
  pct: (p) => (p == null ? DASH : `${p.toFixed(1)} %`),
  /** 120 → "120 ms", 1200 → "1.2 s", 210000 → "3.5 min", 2 h and more → "2.0 h". */
  ms(ms) {
    if (ms == null) return DASH;
    if (Math.abs(ms) < 999.5) return `${Math.round(ms)} ms`;
    if (Math.abs(ms) < 59_950) return `${(ms / 1000).toFixed(1)} s`;
    if (Math.abs(ms) < 3_597_000) return `${(ms / 60_000).toFixed(1)} min`;
    return `${(ms / 3_600_000).toFixed(1)} h`;
  },
  seconds: (s) => (s == null ? DASH : fmt.ms(s * 1000)),
  /** 1536 → "1.5 KiB". */
  bytes(b) {
    if (b == null) return DASH;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(b) >= 1024 && i < units.length - 1) (b /= 1024), i++;
    return i === 0 ? `${b} B` : `${b.toFixed(1)} ${units[i]}`;
  },
  /** ms since the epoch → local time of day, "12:54:03". */
  time: (ms) => (ms == null ? DASH : new Date(ms).toLocaleTimeString([], { hour12: false })),
  /** ms since the epoch → local date and time, "Dec 7, 12:54:03". */
  dateTime: (ms) =>
    ms == null
      ? DASH
      : new Date(ms).toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false }),
  /** "2026-12-01" (a UTC day) → "Dec 1", without going through a time zone. */
  day(iso) {
    const [, month, day] = String(iso).split("-").map(Number);
    return month ? `${MONTHS[month - 1]} ${day}` : String(iso);
  },
};

// ---- The JSON API -------------------------------------------------------------------------

/** What went wrong with an API call. `kind`: "unauthorized", "unreachable" or "refused". */
export class ApiError extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}

/** GETs a JSON document from the admin API (the session cookie goes along by itself). */
export async function fetchJson(path, signal) {
  let response, text;
  try {
    response = await fetch(path, { credentials: "same-origin", headers: { accept: "application/json" }, signal });
    text = await response.text();
  } catch (err) {
    throw new ApiError("unreachable", `the relay's admin API is unreachable: ${err?.message ?? err}`);
  }
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: handled below
  }
  // A proxy that redirects to the login form instead of answering 401.
  if (response.status === 401 || (response.redirected && new URL(response.url).pathname === "/login")) {
    throw new ApiError("unauthorized", body?.message ?? "not signed in");
  }
  const detail = body?.message ?? response.statusText ?? "";
  if (response.status >= 500) {
    throw new ApiError("unreachable", `the relay's admin API is unreachable: HTTP ${response.status}${detail ? `: ${detail}` : ""}`);
  }
  if (!response.ok) {
    throw new ApiError("refused", `the relay's admin API refused the request (HTTP ${response.status}${body?.error ? `, ${body.error}` : ""}): ${detail}`);
  }
  if (body === null || typeof body !== "object") {
    throw new ApiError("refused", "the relay's admin API answered with something that is not JSON");
  }
  return body;
}

// ---- Charts (uPlot) -----------------------------------------------------------------------

let pendingCharts = []; // placeholders created by dayChart(), drawn once they are in the page
let liveCharts = []; // {plot, observer}

/** A chart over `days` (x = day index). `series`: {label, values, color, format, dash?,
 *  bars?, pointsOnly?, scale?}; `yLabel` names the y axis with its unit; `formatY` labels its
 *  ticks; `integer` keeps ticks on whole numbers. A series with `scale: "y2"` goes on a second
 *  axis, on the right (`y2Label`, `formatY2`).
 *  Returns a placeholder; the chart is drawn when the page shows it (uPlot needs a width). */
export function dayChart(spec) {
  const slot = el("div", { class: "chart", style: `min-height:${(spec.height ?? 220) + 40}px` });
  pendingCharts.push({ slot, spec });
  return slot;
}

function mountCharts() {
  for (const { slot, spec } of pendingCharts) {
    if (typeof window.uPlot !== "function") {
      slot.replaceChildren(emptyNote("chart", "chart unavailable: /dash/vendor/uPlot.iife.min.js did not load"));
      continue;
    }
    const height = spec.height ?? 220;
    const plot = new window.uPlot(chartOptions(spec, slot.clientWidth, height), chartData(spec), slot);
    const observer = new ResizeObserver(() => {
      if (slot.clientWidth > 0 && slot.clientWidth !== plot.width) plot.setSize({ width: slot.clientWidth, height });
    });
    observer.observe(slot);
    liveCharts.push({ plot, observer });
  }
  pendingCharts = [];
}

function destroyCharts() {
  for (const { plot, observer } of liveCharts) observer.disconnect(), plot.destroy();
  liveCharts = [];
}

const chartData = (spec) => [spec.days.map((_, i) => i), ...spec.series.map((s) => s.values)];

function chartOptions(spec, width, height) {
  const { days } = spec;
  const grid = { stroke: "#e5e7eb", width: 1 };
  const y2 = spec.series.some((s) => s.scale === "y2");
  return {
    width,
    height,
    cursor: { drag: { x: false, y: false } }, // no zooming: a few points per chart
    scales: {
      x: { time: false, range: () => [-0.5, days.length - 0.5] },
      y: { range: (u, min, max) => yRange(min, max, spec.bars) },
      ...(y2 ? { y2: { range: (u, min, max) => yRange(min, max, false) } } : {}),
    },
    axes: [
      { label: "day (UTC)", grid, incrs: [1, 2, 3, 7, 14], space: 48, values: (u, ticks) => ticks.map((i) => (days[i] ? fmt.day(days[i]) : "")) },
      { label: spec.yLabel, grid, size: 64, incrs: spec.integer ? INTEGER_STEPS : undefined, values: (u, ticks) => ticks.map(spec.formatY ?? String) },
      ...(y2 ? [{ scale: "y2", side: 1, label: spec.y2Label, grid: { show: false }, size: 72, values: (u, ticks) => ticks.map(spec.formatY2 ?? String) }] : []),
    ],
    series: [{ label: "day", value: (u, i) => (i == null ? DASH : days[i] ?? "") }, ...spec.series.map(seriesOptions)],
  };
}

// Tick steps for counts: no "0.5 events".
const INTEGER_STEPS = [1, 2, 5].flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8].map((p) => m * p)).sort((a, b) => a - b);

function seriesOptions(s) {
  const base = { label: s.label, stroke: s.color, width: 2, dash: s.dash, spanGaps: false, value: (u, v) => (v == null ? DASH : s.format(v)) };
  if (s.scale) base.scale = s.scale; // only when given: an undefined one would unset uPlot's "y"
  if (s.bars) return { ...base, fill: s.color + "99", paths: window.uPlot.paths.bars({ size: [0.6, 48] }), points: { show: false } };
  if (s.pointsOnly) return { ...base, paths: () => null, points: { show: true, size: 13, width: 2, fill: s.color, stroke: "#fff" } };
  return { ...base, points: { show: true, size: 6, width: 2, fill: "#fff" } };
}

/** The y axis: always includes 0, some headroom above (and below when negative). */
function yRange(min, max, bars) {
  if (min == null || max == null) return [0, 1];
  const lo = Math.min(0, min);
  const hi = Math.max(0, max, lo + 1);
  const pad = (hi - lo) * 0.2;
  return bars ? [0, hi + pad] : [lo < 0 ? lo - pad : 0, hi + pad];
}

// ---- The page controller ------------------------------------------------------------------

const byId = (id) => document.getElementById(id);

function daysFromUrl() {
  const days = Number(new URLSearchParams(location.search).get("days"));
  return RANGES.some((r) => r.days === days) ? days : DEFAULT_DAYS;
}

/** The Today / 7 days / 30 days buttons; the choice goes in `?days=` so a reload keeps it. */
function renderPicker(container, current, onPick) {
  container.replaceChildren(
    ...RANGES.map(({ days, label }) => {
      const button = el("button", { type: "button", "data-days": days, "aria-pressed": days === current ? "true" : "false" }, label);
      button.addEventListener("click", () => onPick(days));
      return button;
    }),
  );
}

/** Runs a dashboard page: loads `api?days=N`, renders it with `render(data)` (which returns
 *  the nodes of `<main id="content">`), refreshes every 30 s and on a range change, and shows
 *  the loading, error and unauthorized states. `body[data-state]` is "loading" | "ready" |
 *  "error" | "unauthorized"; `body[data-generated]` the generated_at_ms of the data shown and
 *  `body[data-shown-days]` its window. The page has #range, #status, #banner and #content. */
export function startDashboard({ api, render }) {
  const ui = { picker: byId("range"), status: byId("status"), banner: byId("banner"), content: byId("content") };
  const body = document.body;
  let days = daysFromUrl();
  let shown = null; // {days, generatedAt} of the data on screen
  let request = null; // the AbortController of the request in flight
  let timer = 0;
  let missedRefresh = false; // a refresh came due while the tab was hidden

  const setState = (state) => (body.dataset.state = state);

  function pick(newDays) {
    if (newDays === days) return;
    days = newDays;
    const url = new URL(location.href);
    url.searchParams.set("days", String(days));
    history.replaceState(null, "", url);
    renderPicker(ui.picker, days, pick);
    load();
  }

  async function load() {
    clearTimeout(timer);
    request?.abort();
    const mine = (request = new AbortController());
    const wanted = days;
    const timeout = setTimeout(() => mine.abort(new Error(`no answer within ${TIMEOUT_MS / 1000} s`)), TIMEOUT_MS);
    if (shown?.days !== wanted) setState("loading"); // a background refresh keeps "ready"
    body.toggleAttribute("data-refreshing", true);
    try {
      const data = await fetchJson(`${api}?days=${wanted}`, mine.signal);
      if (mine === request) showData(data, wanted);
    } catch (err) {
      if (mine === request) showFailure(err, wanted);
    } finally {
      clearTimeout(timeout);
      if (mine === request) {
        request = null;
        body.toggleAttribute("data-refreshing", false);
        timer = setTimeout(tick, REFRESH_MS);
      }
    }
  }

  function tick() {
    if (document.hidden) missedRefresh = true;
    else load();
  }

  function replaceContent(...nodes) {
    destroyCharts();
    ui.content.replaceChildren(...nodes);
    ui.content.classList.remove("stale");
    mountCharts();
  }

  function showData(data, forDays) {
    pendingCharts = [];
    let nodes;
    try {
      nodes = render(data);
    } catch (err) {
      pendingCharts = [];
      console.error(err);
      throw new ApiError("refused", `this page could not read the API's answer: ${err.message}`);
    }
    replaceContent(...nodes);
    shown = { days: forDays, generatedAt: data.generated_at_ms };
    ui.banner.replaceChildren();
    ui.status.textContent = `updated ${fmt.time(data.generated_at_ms)} · refreshes every ${REFRESH_MS / 1000} s`;
    ui.status.title = new Date(data.generated_at_ms).toString();
    Object.assign(body.dataset, { generated: String(data.generated_at_ms), shownDays: String(forDays) });
    delete body.dataset.stale;
    setState("ready");
  }

  function showFailure(err, forDays) {
    const message = err instanceof ApiError ? err.message : `unexpected error: ${err?.message ?? err}`;
    if (err?.kind === "unauthorized") {
      forget();
      replaceContent(
        el("div", { class: "card notice", "data-error": "unauthorized" },
          el("h2", {}, "Sign in to see the dashboards"),
          el("p", {}, `The relay's admin API needs a session (${message}). `, el("a", { href: "/login" }, "Sign in"), " and come back; this page retries every 30 s."),
        ),
      );
      ui.status.textContent = "not signed in";
      return setState("unauthorized");
    }
    if (shown && shown.days === forDays) {
      // Keep the last good data on screen, dimmed and marked stale.
      ui.content.classList.add("stale");
      body.dataset.stale = "true";
      ui.banner.replaceChildren(el("div", { class: "error", role: "alert", "data-error": "api" },
        `${message} — showing the data of ${fmt.time(shown.generatedAt)}, which may be stale.`));
      ui.status.textContent = `updated ${fmt.time(shown.generatedAt)} (stale) · retrying every ${REFRESH_MS / 1000} s`;
    } else {
      forget();
      replaceContent(errorNote("api", message));
      ui.status.textContent = `retrying every ${REFRESH_MS / 1000} s`;
    }
    setState("error");
  }

  function forget() {
    shown = null;
    ui.banner.replaceChildren();
    delete body.dataset.generated;
    delete body.dataset.shownDays;
    delete body.dataset.stale;
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && missedRefresh) (missedRefresh = false), load();
  });
  renderPicker(ui.picker, days, pick);
  setState("loading");
  load();
}
