// The behaviour page (/dash/behaviour): renders GET /api/v1/behaviour?days=N. Everything on it
// counts client events (what the browsers sent and the warehouse stored), which are lossy: the
// page says by how much, measured over the same period against a business metric of the system
// of record, in a banner and on every card, so that no lossy number can be read as exact. Every
// number is marked with data-* attributes so a test can read it back (the raw API value in
// data-value).
import { DASH, dataTable, dataValue, dayChart, el, emptyNote, errorNote, errorsBySection, fmt, hbar, scopeLine, section, startDashboard } from "/dash/dash.js";

// Sections this page places itself; an error for any other is shown at the top.
const SECTIONS = ["loss", "behaviour"];

const COLORS = { views: "#2563eb", sessions: "#7c3aed" };

/** The page's content for one API answer. */
function renderBehaviour(data) {
  const errors = errorsBySection(data.errors);
  const unplaced = [...errors].filter(([id]) => !SECTIONS.includes(id));
  // The warehouse unreadable: the loss could not be measured either (tracked comes from it).
  const loss = lossWords(data.loss, errors.get("loss"), errors.get("behaviour"));
  const label = () => lossLabel(loss);
  const top = [
    scopeLine(data),
    lossBanner(loss),
    unplaced.length ? el("div", { class: "card wide" }, unplaced.map(([id, message]) => errorNote(id, `${id}: ${message}`))) : null,
  ];
  if (errors.has("behaviour")) {
    // The warehouse could not be read: no chart of this page can be drawn.
    return [
      ...top,
      section({ id: "behaviour", title: "Client events", note: "page views, sessions, top events and the funnel: all read from the warehouse.", wide: true },
        label(), errorNote("behaviour", errors.get("behaviour"))),
    ].filter(Boolean);
  }
  return [
    ...top,
    perDaySection(data, { id: "page_views", title: "Page views per day", unit: "page views", rows: data.page_views ?? [], attr: "data-page-views-day", color: COLORS.views, label }),
    perDaySection(data, { id: "sessions", title: "Sessions per day", unit: "sessions", rows: data.sessions ?? [], attr: "data-sessions-day", color: COLORS.sessions, label }),
    topEventsSection(data.top_events ?? [], label),
    funnelSection(data.funnel, label),
  ].filter(Boolean);
}

// ---- The measured loss, in words -----------------------------------------------------------

/** "36.2": one decimal, halves away from zero (36.15 → 36.2, as a reader rounds). */
const oneDecimal = (p) => (Math.sign(p) * Math.round(Math.abs(p) * 10) / 10).toFixed(1);

/** {text, value, measured, error?, title?} for the banner and the labels. */
function lossWords(loss, error, warehouseError) {
  if (error) return { text: `loss not measured: ${error}`, value: null, measured: false, error };
  if (!loss && warehouseError) return { text: `loss not measured: ${warehouseError}`, value: null, measured: false };
  if (!loss) return { text: "loss not measured: no business metric to measure it against", value: null, measured: false };
  const against = `${loss.reference} (system of record ${fmt.count(loss.actual)}, tracked ${fmt.count(loss.tracked)})`;
  if (loss.missing_pct == null) {
    return {
      text: `loss not measured: the system of record counted no ${loss.reference} in this period (tracked ${fmt.count(loss.tracked)})`,
      value: null,
      measured: false,
    };
  }
  const p = loss.missing_pct;
  const text = p >= 0
    ? `client events: about ${oneDecimal(p)} % missing in this period, measured against ${against}`
    : `client events: about ${oneDecimal(-p)} % more tracked than the system of record in this period (counted twice, or not real conversions), measured against ${against}`;
  return { text, value: p, measured: true, title: `${loss.reference}: the ${loss.event} client events in the warehouse vs. the system of record` };
}

function lossBanner(loss) {
  return el(
    "div",
    { class: loss.measured ? "loss-banner wide" : "loss-banner unmeasured wide", role: "note", "data-loss-banner": true, "data-value": dataValue(loss.value), title: loss.title },
    el("strong", {}, loss.error ? ["loss not measured: ", el("span", { "data-error": "loss" }, loss.error)] : loss.text),
    el("p", {},
      "Every number on this page counts client events, the ones browsers sent and the warehouse stored: some never arrive " +
        "(ad blockers, closed tabs, consent, offline devices). Read them as lower bounds and trends, not as exact counts; " +
        "the exact figures are on the ",
      el("a", { href: "/dash/business" }, "Business"),
      " page."),
  );
}

/** The small label on each card. */
const lossLabel = (loss) =>
  el("p", { class: loss.measured ? "loss-label" : "loss-label unmeasured", "data-loss-label": true, "data-value": dataValue(loss.value), title: loss.title }, loss.text);

// ---- Page views and sessions per day -------------------------------------------------------

function perDaySection(data, { id, title, unit, rows, attr, color, label }) {
  const days = data.day_list?.length ? data.day_list : rows.map((r) => r.day);
  const byDay = new Map(rows.map((r) => [r.day, r.count]));
  const note = `${unit} the warehouse stored per UTC day (tracked client events, not exact).`;
  // Nothing tracked: said, not drawn as a flat line (the table still lists the days).
  const chart = rows.some((r) => r.count > 0)
    ? dayChart({
        days,
        yLabel: `${unit} (tracked)`,
        integer: true,
        formatY: fmt.count,
        series: [{ label: `${unit} (tracked)`, values: days.map((d) => byDay.get(d) ?? 0), color, bars: true, format: fmt.count }],
      })
    : emptyNote(id, `no ${unit} in this period: no client events reached the warehouse`);
  return section(
    { id, title, note },
    label(),
    chart,
    rows.length
      ? dataTable({
          columns: [{ key: "day", label: "day (UTC)" }, { key: "count", label: `${unit} (tracked)`, num: true, text: (row) => fmt.count(row.count) }],
          rows,
          rowAttrs: (row) => ({ [attr]: row.day, "data-value": dataValue(row.count) }),
        })
      : null,
  );
}

// ---- Top events ----------------------------------------------------------------------------

function topEventsSection(rows, label) {
  const note = "the client events stored most often in this period, by name (tracked, not exact).";
  const widest = Math.max(0, ...rows.map((r) => r.count ?? 0));
  const content = rows.length
    ? dataTable({
        columns: [
          { key: "name", label: "event", text: (row) => el("code", {}, row.name) },
          { key: "count", label: "events (tracked)", num: true, text: (row) => fmt.count(row.count) },
          { key: "bar", label: "", value: (row) => row.count, text: (row) => hbar(row.count, widest) },
        ],
        rows,
        rowAttrs: (row) => ({ "data-top-event": row.name, "data-value": dataValue(row.count) }),
      })
    : emptyNote("top_events", "no client events in this period");
  return section({ id: "top_events", title: "Top events", note }, label(), content);
}

// ---- The funnel ----------------------------------------------------------------------------

function funnelSection(funnel, label) {
  const note =
    "sessions that did each step in this order, in this period (a session reaches a step when it did it no earlier than the step before). " +
    "change: from the step above. Each step's events can be lost on their own: the drop between steps includes loss.";
  let content;
  if (!funnel) content = emptyNote("funnel", "no funnel is configured (funnel = [...] under [dashboard] in the relay's config)");
  else if (!funnel.steps?.length) content = emptyNote("funnel", "the funnel has no steps (funnel = [...] under [dashboard] in the relay's config)");
  else {
    const steps = funnel.steps;
    const first = steps[0].sessions ?? 0;
    const widest = Math.max(0, ...steps.map((s) => s.sessions ?? 0));
    content = [
      first === 0 ? emptyNote("funnel/none", `no session did ${steps[0].event} in this period`) : null,
      dataTable({
        columns: [
          { key: "step", label: "#", value: (row) => steps.indexOf(row) + 1 },
          { key: "event", label: "step", text: (row) => el("code", {}, row.event) },
          { key: "sessions", label: "sessions", num: true, text: (row) => fmt.count(row.sessions) },
          { key: "pct_of_first", label: "% of first", num: true, text: (row) => fmt.pct(row.pct_of_first) },
          {
            key: "drop",
            label: "change",
            num: true,
            value: (row) => (steps.indexOf(row) > 0 ? (row.sessions ?? 0) - (steps[steps.indexOf(row) - 1].sessions ?? 0) : null),
            text: (row) => {
              const i = steps.indexOf(row);
              const change = i > 0 ? (row.sessions ?? 0) - (steps[i - 1].sessions ?? 0) : null;
              return change == null ? DASH : el("span", { class: "muted" }, change < 0 ? `−${fmt.count(-change)}` : change > 0 ? `+${fmt.count(change)}` : "0");
            },
          },
          { key: "bar", label: "", value: (row) => row.pct_of_first, text: (row) => hbar(row.sessions, widest) },
        ],
        rows: steps,
        rowAttrs: (row) => ({ "data-funnel-step": row.event, "data-value": dataValue(row.sessions) }),
      }),
    ];
  }
  return section({ id: "funnel", title: "Funnel", note }, label(), content);
}

startDashboard({ api: "/api/v1/behaviour", render: renderBehaviour });
