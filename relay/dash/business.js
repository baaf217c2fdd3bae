// The business page (/dash/business): renders GET /api/v1/business?days=N. These figures come
// from the systems of record (the metrics' truth_sql and attribution_sql in the truth
// database), so they are exact; beside them, the server events the backend emitted through
// trueup, which should equal them. Every number is marked with data-* attributes so a test can
// read it back (the raw API value in data-value).
import { DASH, dataTable, dataValue, dayChart, el, emptyNote, errorNote, errorsBySection, fmt, hbar, scopeLine, section, startDashboard } from "/dash/dash.js";

// Sections this page places itself; an error for any other is shown at the top.
const SECTIONS = ["business", "attribution"];

const COLORS = { actual: "#2563eb", value: "#15803d", differs: "#dc2626" };
const UNKNOWN = "unknown"; // the API's row for conversions without a recorded source
const DIFFERS = "server events differ from the system of record";

/** The page's content for one API answer. */
function renderBusiness(data) {
  const errors = errorsBySection(data.errors);
  const unplaced = [...errors].filter(([id]) => !SECTIONS.includes(id));
  const top = [
    scopeLine(data),
    unplaced.length ? el("div", { class: "card wide" }, unplaced.map(([id, message]) => errorNote(id, `${id}: ${message}`))) : null,
  ];
  // Both the metrics and their attribution come from the truth database: one error for both.
  if (errors.has("business")) {
    return [
      ...top,
      section({ id: "business", title: "Business metrics and attribution", wide: true }, errorNote("business", errors.get("business"))),
    ].filter(Boolean);
  }
  const metrics = data.metrics ?? [];
  return [
    ...top,
    ...(metrics.length
      ? metrics.map((metric) => metricSection(metric, data))
      : [section({ id: "business", title: "Business metrics", wide: true },
          emptyNote("business", "no business metrics are configured ([[reconcile.metrics]] in the relay's config)"))]),
    attributionSection(data.attribution ?? [], errors.get("attribution")),
  ].filter(Boolean);
}

const countColumn = (key, label) => ({ key, label, num: true, text: (row) => fmt.count(row[key]) });

/** Money-like values with cents when any has them ("1,450.25"), whole numbers otherwise. */
function valueFormat(values) {
  const cents = values.some((v) => v != null && !Number.isInteger(v));
  const nf = new Intl.NumberFormat("en-US", cents ? { minimumFractionDigits: 2, maximumFractionDigits: 2 } : { maximumFractionDigits: 0 });
  return (v) => (v == null ? DASH : nf.format(v));
}

// ---- One card per metric -------------------------------------------------------------------

function metricSection(metric, data) {
  const days = data.day_list?.length ? data.day_list : metric.days.map((d) => d.day);
  const byDay = new Map(metric.days.map((d) => [d.day, d]));
  const perDay = (key) => days.map((day) => byDay.get(day)?.[key] ?? null);
  const hasValue = metric.value_label != null || metric.days.some((d) => d.value != null);
  const valueLabel = metric.value_label ?? "value";
  const formatValue = valueFormat([...metric.days.map((d) => d.value), metric.total?.value]);
  const differs = (row) => row.server != null && row.actual != null && row.server !== row.actual;
  const differingDays = metric.days.filter(differs);

  const note =
    `actual: what the system of record counted (the metric's truth_sql), per UTC day: exact. ` +
    `server events: the backend's ${metric.event} events that reached the warehouse through trueup, which should be the same.`;

  const chart = metric.days.some((d) => d.actual > 0 || (d.value ?? 0) !== 0)
    ? dayChart({
        days,
        yLabel: metric.name,
        integer: true,
        formatY: fmt.count,
        y2Label: hasValue ? valueLabel : undefined,
        formatY2: formatValue,
        series: [
          { label: `${metric.name} (system of record)`, values: perDay("actual"), color: COLORS.actual, bars: true, format: fmt.count },
          hasValue ? { label: valueLabel, values: perDay("value"), color: COLORS.value, scale: "y2", format: formatValue } : null,
          differingDays.length
            ? { label: "server events, where they differ", values: days.map((day) => (byDay.has(day) && differs(byDay.get(day)) ? byDay.get(day).server : null)), color: COLORS.differs, pointsOnly: true, format: fmt.count }
            : null,
        ].filter(Boolean),
      })
    : emptyNote(`metric/${metric.name}`, `no ${metric.name} in this period (the system of record counted 0 on every day)`);

  return section(
    { id: `metric-${metric.name}`, title: el("span", {}, metric.name, el("span", { class: "muted" }, ` · exact, from the system of record`)), note, wide: true },
    totals(metric, hasValue, valueLabel, formatValue),
    el("div", { class: "metric-body" },
      el("div", {}, chart),
      el("div", {},
        differingDays.length
          ? el("p", { class: "legend-note" }, el("strong", { class: "bad" },
              `${differingDays.length} day${differingDays.length > 1 ? "s" : ""}: ${DIFFERS}`), " (highlighted below)")
          : el("p", { class: "legend-note" }, `server events equal the system of record on every day of this period`),
        metricTable(metric, valueLabel, formatValue, differs),
      ),
    ),
  );
}

function totals(metric, hasValue, valueLabel, formatValue) {
  const t = metric.total ?? {};
  const serverDiffers = t.server != null && t.actual != null && t.server !== t.actual;
  return el(
    "dl",
    { class: "stats totals" },
    el("div", { class: "stat" },
      el("dt", {}, `${metric.name} in this period (system of record)`),
      el("dd", { "data-total": `${metric.name}/actual`, "data-value": dataValue(t.actual) }, fmt.count(t.actual))),
    hasValue
      ? el("div", { class: "stat" },
          el("dt", {}, valueLabel),
          el("dd", { "data-total": `${metric.name}/value`, "data-value": dataValue(t.value) }, formatValue(t.value)))
      : el("div", { class: "stat none", title: "the metric's truth_sql has no value column" },
          el("dt", {}, "value"),
          el("dd", { "data-total": `${metric.name}/value`, "data-value": "" }, el("span", { class: "muted" }, "none reported"))),
    el("div", { class: serverDiffers ? "stat warn" : "stat", title: serverDiffers ? DIFFERS : null },
      el("dt", {}, `server events (${metric.event})`),
      el("dd", { "data-total": `${metric.name}/server`, "data-value": dataValue(t.server) }, fmt.count(t.server)),
      serverDiffers ? el("small", { class: "bad" }, DIFFERS) : null),
  );
}

function metricTable(metric, valueLabel, formatValue, differs) {
  return dataTable({
    columns: [
      { key: "day", label: "day (UTC)" },
      countColumn("actual", "actual (system of record)"),
      {
        key: "server",
        label: "server events",
        num: true,
        text: (row) => (differs(row)
          ? el("span", { class: "differs", title: DIFFERS }, fmt.count(row.server),
              el("small", {}, `${DIFFERS} (${row.server > row.actual ? "+" : "−"}${fmt.count(Math.abs(row.server - row.actual))})`))
          : fmt.count(row.server)),
      },
      { key: "value", label: valueLabel, num: true, text: (row) => formatValue(row.value) },
    ],
    rows: metric.days,
    rowAttrs: (row) => ({ "data-metric": metric.name, "data-day": row.day, class: differs(row) ? "server-differs" : null }),
  });
}

// ---- Conversions by attribution source -----------------------------------------------------

function attributionSection(list, error) {
  const note =
    "conversions in this period by the source the system of record attributes them to (the metric's attribution_sql); " +
    "share = conversions / all of the metric's conversions. unknown: no source recorded, which is not the same as direct.";
  let content;
  if (error) content = errorNote("attribution", error);
  else if (!list.length) content = emptyNote("attribution", "no attribution query is configured (attribution_sql in [[reconcile.metrics]])");
  else content = el("div", { class: "attribution-grid" }, list.map(attributionBlock));
  return section({ id: "attribution", title: "Conversions by attribution source", note, wide: true }, content);
}

function attributionBlock(a) {
  // The API lists the sources most conversions first and unknown last; keep unknown last.
  const rows = [...(a.rows ?? []).filter((r) => r.source !== UNKNOWN), ...(a.rows ?? []).filter((r) => r.source === UNKNOWN)];
  const widest = Math.max(0, ...rows.map((r) => r.conversions ?? 0));
  const isUnknown = (row) => row.source === UNKNOWN;
  return el(
    "div",
    { class: "attribution", "data-attribution-metric": a.metric },
    el("h3", {}, a.metric, el("span", { class: "muted" }, " · ",
      el("span", { "data-attribution-total": a.metric, "data-value": dataValue(a.total) }, fmt.count(a.total)), " conversions")),
    !a.total
      ? emptyNote(`attribution/${a.metric}`, `no ${a.metric} in this period`)
      : null,
    rows.length
      ? dataTable({
          columns: [
            { key: "source", label: "source", text: (row) => (isUnknown(row) ? "unknown (no attribution recorded)" : row.source) },
            countColumn("conversions", "conversions"),
            { key: "share_pct", label: "share", num: true, text: (row) => fmt.pct(row.share_pct) },
            { key: "bar", label: "", value: (row) => row.share_pct, text: (row) => hbar(row.conversions, widest, isUnknown(row) ? "unknown" : "") },
          ],
          rows,
          rowAttrs: (row) => ({
            "data-attribution": `${a.metric}/${row.source}`,
            "data-value": dataValue(row.conversions),
            class: isUnknown(row) ? "unknown-source" : null,
          }),
        })
      : null,
  );
}

startDashboard({ api: "/api/v1/business", render: renderBusiness });
