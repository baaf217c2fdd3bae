// The data-quality page (/dash/quality): renders GET /api/v1/quality?days=N. Every number is
// marked with data-* attributes (see the README of the dashboards) so a test can read it back.
import { DASH, dataTable, dataValue, dayChart, el, emptyNote, errorNote, fmt, section, startDashboard } from "/dash/dash.js";

const SECTIONS = ["gap", "loss", "seq_gaps", "freshness", "rejects", "sinks"];

const COLORS = { gap: "#2563eb", trailing: "#6b7280", moved: "#dc2626", seq: "#d97706" };

const FUNNEL = [
  ["created", "created in page"],
  ["stored", "stored in queue"],
  ["sent", "sent"],
  ["acked", "acked"],
  ["accepted_by_relay", "accepted by the relay"],
  ["in_warehouse", "in the warehouse"],
];

// Counters beside the funnel; `warn`: a value above 0 deserves a look.
const LOSS_SIDE = [
  { key: "duplicates_removed", label: "duplicates removed" },
  { key: "pending", label: "pending in browsers" },
  { key: "rejected_by_relay", label: "rejected by the relay", warn: true },
  { key: "seq_gaps", label: "seq gaps", warn: true },
  { key: "identity_violations", label: "identity violations", warn: true },
  { key: "devices", label: "devices reporting" },
];

const FRESHNESS_STAGES = {
  capture_to_accepted: "capture in page → accepted by the relay",
  accepted_to_log: "accepted → written to the log",
  log_to_warehouse: "log → stored in the warehouse",
  accepted_to_warehouse: "accepted → stored in the warehouse",
  capture_to_warehouse: "capture in page → stored in the warehouse (end to end)",
};

const REJECT_STAGES = { ingest: "refused at ingest", sink: "dead-lettered by a sink" };

/** The page's content for one API answer. */
function renderQuality(data) {
  const errors = errorsBySection(data.errors ?? []);
  const unplaced = [...errors].filter(([id]) => !SECTIONS.includes(id));
  return [
    scopeLine(data),
    unplaced.length ? el("div", { class: "card wide" }, unplaced.map(([id, message]) => errorNote(id, `${id}: ${message}`))) : null,
    gapSection(data, errors.get("gap")),
    lossSection(data.loss, errors.get("loss")),
    seqGapsSection(data, errors.get("seq_gaps")),
    freshnessSection(data.freshness ?? [], errors.get("freshness")),
    rejectsSection(data.rejects ?? [], errors.get("rejects")),
    sinksSection(data.sinks ?? [], errors.get("sinks")),
  ].filter(Boolean);
}

/** section → its error messages, joined. */
function errorsBySection(errors) {
  const bySection = new Map();
  for (const { section: id, message } of errors) {
    bySection.set(id, bySection.has(id) ? `${bySection.get(id)}; ${message}` : message);
  }
  return bySection;
}

function scopeLine(data) {
  const days = data.day_list ?? [];
  const span = days.length ? `${fmt.day(days[0])}${days.length > 1 ? ` – ${fmt.day(days.at(-1))} (UTC days)` : " (UTC day)"}` : "";
  return el("p", { class: "scope wide" }, `${data.site == null ? "all sites" : `site ${data.site}`} · ${span}`);
}

const points = (p) => (Number.isInteger(p) ? p.toFixed(1) : String(p));
const countColumn = (key, label) => ({ key, label, num: true, text: (row) => fmt.count(row[key]) });
const pctColumn = (key, label) => ({ key, label, num: true, text: (row) => fmt.pct(row[key]) });

// ---- 1. Gap between analytics and the system of record -------------------------------------

function gapSection(data, error) {
  const note =
    "gap % = (actual − tracked) / actual × 100 per UTC day, where actual is what the system of record counted " +
    "and tracked the client events in the warehouse; trailing % is the average gap of the previous days.";
  let content;
  if (error) content = errorNote("gap", error);
  else if (!data.gap?.length) content = emptyNote("gap", "no business metrics are configured ([[reconcile.metrics]] in the relay's config)");
  else content = data.gap.map((metric) => metricBlock(metric, data));
  return section({ id: "gap", title: "Gap between analytics and the system of record", note, wide: true }, content);
}

function metricBlock(metric, data) {
  const days = data.day_list?.length ? data.day_list : metric.days.map((d) => d.day);
  const byDay = new Map(metric.days.map((d) => [d.day, d]));
  const perDay = (key) => days.map((day) => byDay.get(day)?.[key] ?? null);
  const gaps = perDay("gap_pct");
  const moved = days.map((day, i) => (byDay.get(day)?.moved ? gaps[i] : null));
  const movedDays = metric.days.filter((d) => d.moved).length;
  const chart = gaps.some((v) => v != null)
    ? dayChart({
        days,
        yLabel: "gap (%)",
        formatY: (v) => `${v} %`,
        series: [
          { label: "gap", values: gaps, color: COLORS.gap, format: fmt.pct },
          { label: "trailing average", values: perDay("trailing_gap_pct"), color: COLORS.trailing, dash: [6, 4], format: fmt.pct },
          { label: "moved", values: moved, color: COLORS.moved, pointsOnly: true, format: fmt.pct },
        ],
      })
    : emptyNote(`gap/${metric.name}`, "no day of this period has an actual (the system of record counted 0): no gap to chart");
  return el(
    "div",
    { class: "metric" },
    el("h3", {}, metric.name, el("span", { class: "muted" }, ` · client event ${metric.event}`)),
    chart,
    el(
      "p",
      { class: "legend-note" },
      el("span", { class: "moved-dot", "aria-hidden": "true" }),
      ` moved: the gap moved beyond the trailing average by > ${points(data.alert_points)} points (complete days only) — `,
      movedDays ? el("strong", { class: "bad" }, `${movedDays} day${movedDays > 1 ? "s" : ""} in this period`) : "none in this period",
    ),
    gapTable(metric),
  );
}

function gapTable(metric) {
  return dataTable({
    columns: [
      { key: "day", label: "day" },
      countColumn("actual", "actual"),
      countColumn("tracked", "tracked"),
      countColumn("server", "server"),
      countColumn("unknown_attribution", "unknown attribution"),
      pctColumn("gap_pct", "gap %"),
      pctColumn("unknown_pct", "unknown %"),
      pctColumn("trailing_gap_pct", "trailing %"),
      { key: "moved", label: "moved", text: (row) => (row.moved ? el("span", { class: "badge bad" }, "moved") : DASH) },
    ],
    rows: metric.days,
    rowAttrs: (row) => ({ "data-metric": metric.name, "data-day": row.day, class: row.moved ? "moved" : null }),
  });
}

// ---- 2. Loss by stage ----------------------------------------------------------------------

function lossSection(loss, error) {
  const note = "client events, all time (not only this period): the agents' counters, the relay's tally and the warehouse.";
  let content;
  if (error) content = errorNote("loss", error);
  else if (!loss || isEmptyLoss(loss)) content = emptyNote("loss", "no client events yet");
  else content = el("div", { class: "loss" }, funnel(loss), lossSide(loss));
  return section({ id: "loss", title: "Loss by stage", note, wide: true }, content);
}

const isEmptyLoss = (loss) =>
  Object.values(loss).every((v) => (typeof v === "number" ? v === 0 : Object.keys(v ?? {}).length === 0));

function funnel(loss) {
  const widest = Math.max(1, ...FUNNEL.map(([key]) => loss[key] ?? 0));
  return el(
    "ol",
    { class: "funnel" },
    FUNNEL.map(([key, label], i) => {
      const value = loss[key] ?? 0;
      const previous = i > 0 ? loss[FUNNEL[i - 1][0]] ?? 0 : value;
      const share = loss.created ? `${((value / loss.created) * 100).toFixed(1)} % of created` : "";
      const change = value === previous ? "" : `${value < previous ? "−" : "+"}${fmt.count(Math.abs(previous - value))} from the stage above`;
      return el(
        "li",
        { class: "funnel-step" },
        el("span", { class: "funnel-label" }, label),
        el("span", { class: "funnel-track" }, el("span", { class: "funnel-bar", style: `width:${((value / widest) * 100).toFixed(2)}%` })),
        el("span", { class: "funnel-num" }, el("strong", { "data-loss": key, "data-value": dataValue(loss[key]) }, fmt.count(loss[key]))),
        el("small", { class: value < previous ? "funnel-change bad" : "funnel-change" }, [share, change].filter(Boolean).join(" · ")),
      );
    }),
  );
}

function lossSide(loss) {
  const stats = el(
    "dl",
    { class: "stats" },
    LOSS_SIDE.map(({ key, label, warn }) =>
      el("div", { class: warn && loss[key] > 0 ? "stat warn" : "stat" },
        el("dt", {}, label),
        el("dd", { "data-loss": key, "data-value": dataValue(loss[key]) }, fmt.count(loss[key]))),
    ),
  );
  const drops = Object.entries(loss.dropped ?? {}).map(([reason, count]) => ({ reason, count }));
  const dropTable = drops.length
    ? dataTable({
        caption: "dropped by the agents",
        columns: [{ key: "reason", label: "reason" }, countColumn("count", "events")],
        rows: drops,
        rowAttrs: (row) => ({ "data-drop": row.reason, "data-value": dataValue(row.count) }),
      })
    : emptyNote("drops", "no events dropped by the agents");
  return el("div", { class: "loss-side" }, stats, dropTable);
}

// ---- 3. Seq gaps per day -------------------------------------------------------------------

function seqGapsSection(data, error) {
  const note = "seq numbers a tab gave to events that have not reached the warehouse (yet), per UTC day.";
  const rows = data.seq_gaps ?? [];
  let content;
  if (error) content = errorNote("seq_gaps", error);
  else if (!rows.length) content = emptyNote("seq_gaps", "no client events in this period yet");
  else {
    const days = data.day_list?.length ? data.day_list : rows.map((r) => r.day);
    const byDay = new Map(rows.map((r) => [r.day, r.gaps]));
    // All zeros: said, not drawn as a flat line (the table below still lists the days).
    const chart = rows.every((r) => r.gaps === 0)
      ? emptyNote("seq_gaps", "no seq gaps in this period")
      : dayChart({
          days,
          yLabel: "missing events",
          integer: true,
          height: 180,
          formatY: fmt.count,
          series: [{ label: "seq gaps", values: days.map((d) => byDay.get(d) ?? null), color: COLORS.seq, bars: true, format: fmt.count }],
        });
    content = [
      chart,
      dataTable({
        columns: [{ key: "day", label: "day" }, countColumn("gaps", "missing events")],
        rows,
        rowAttrs: (row) => ({ "data-seq-day": row.day, "data-value": dataValue(row.gaps), class: row.gaps > 0 ? "warn" : null }),
      }),
    ];
  }
  return section({ id: "seq_gaps", title: "Seq gaps per day", note }, content);
}

// ---- 4. Freshness lag ----------------------------------------------------------------------

function freshnessSection(rows, error) {
  const note = "how long events took between two stamps, over the events captured in this period (p50 = median).";
  let content;
  if (error) content = errorNote("freshness", error);
  else if (!rows.length) content = emptyNote("freshness", "no events with these stamps in this period yet");
  else {
    content = dataTable({
      columns: [
        { key: "stage", label: "stage", text: (row) => el("span", { title: row.stage }, FRESHNESS_STAGES[row.stage] ?? row.stage) },
        countColumn("events", "events"),
        { key: "p50_ms", label: "p50", num: true, text: (row) => fmt.ms(row.p50_ms) },
        { key: "p95_ms", label: "p95", num: true, text: (row) => fmt.ms(row.p95_ms) },
      ],
      rows,
      rowAttrs: (row) => ({ "data-stage": row.stage }),
    });
  }
  return section({ id: "freshness", title: "Freshness lag", note }, content);
}

// ---- 5. Rejects and dead letters -----------------------------------------------------------

function rejectsSection(rows, error) {
  const note = "events the relay refused at ingest or a sink dead-lettered, received in this period; samples are the latest few, redacted (values replaced by their length).";
  let content;
  if (error) content = errorNote("rejects", error);
  else if (!rows.length) content = emptyNote("rejects", "no rejects or dead letters in this period");
  else {
    content = dataTable({
      columns: [
        { key: "stage", label: "stage", text: (row) => REJECT_STAGES[row.stage] ?? row.stage },
        { key: "reason", label: "reason", text: (row) => el("code", {}, row.reason) },
        countColumn("count", "events"),
        { key: "samples", label: "latest samples", value: (row) => row.samples?.length ?? 0, text: (row) => samples(row.samples ?? []) },
      ],
      rows,
      rowAttrs: (row) => ({ "data-reject": `${row.stage}/${row.reason}`, "data-value": dataValue(row.count) }),
    });
  }
  return section({ id: "rejects", title: "Rejects and dead letters", note, wide: true }, content);
}

/** The samples of one reason. Untrusted text: only ever textContent. */
function samples(list) {
  if (!list.length) return el("span", { class: "muted" }, "no samples kept");
  return list.map((s) => {
    const meta = [fmt.dateTime(s.received_at_ms), s.detail, s.event_id && `event ${s.event_id}`, s.sink && `sink ${s.sink}`];
    return el("div", { class: "sample" },
      el("div", { class: "sample-meta" }, meta.filter(Boolean).join(" · ")),
      el("pre", { "data-sample": true }, s.raw ?? ""));
  });
}

// ---- 6. Sinks ------------------------------------------------------------------------------

function sinksSection(rows, error) {
  const note = "where the relay delivers events, as of now (not only this period).";
  let content;
  if (error) content = errorNote("sinks", error);
  else if (!rows.length) content = emptyNote("sinks", "no sinks");
  else {
    content = dataTable({
      columns: [
        { key: "name", label: "name", text: (row) => el("strong", {}, row.name) },
        { key: "kind", label: "kind" },
        countColumn("backlog_rows", "backlog (events)"),
        { key: "backlog_bytes", label: "backlog (bytes)", num: true, text: (row) => fmt.bytes(row.backlog_bytes) },
        { key: "lag_seconds", label: "lag", num: true, text: (row) => fmt.seconds(row.lag_seconds) },
        { key: "failing_since_ms", label: "failing since", text: (row) => (row.failing_since_ms == null ? el("span", { class: "ok" }, "ok") : el("span", { class: "bad" }, fmt.dateTime(row.failing_since_ms))) },
        { key: "last_error", label: "last error", text: (row) => el("span", { class: "last-error" }, row.last_error ?? DASH) },
        countColumn("delivered", "delivered"),
        countColumn("retries", "retries"),
        countColumn("dead_lettered", "dead-lettered"),
      ],
      rows,
      rowAttrs: (row) => ({ "data-sink": row.name, class: row.failing_since_ms == null ? null : "failing" }),
    });
  }
  return section({ id: "sinks", title: "Sinks", note, wide: true }, content);
}

startDashboard({ api: "/api/v1/quality", render: renderQuality });
