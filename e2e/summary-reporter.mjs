// A node:test reporter that prints one summary line at the end of `npm run e2e`, after the
// usual report (the npm script runs it next to the spec reporter):
//
//   e2e summary: S scenarios, A all delivered, D duplicates stored, counter identity held in
//   H/C (that check it); tests P passed, F failed, K skipped
//
// A scenario is a line a test prints in the suite's common form
// `<name>: delivered X/N duplicates [stored ]D` (optionally followed by `counters ok` or
// `counters FAIL: …`), which every e2e file uses; it is read from the tests' output, so test
// files stay plain `node --test` files (`node --test e2e/` still works without this reporter).

const LINE = /(?:^|;\s*)(?:scenario\s+)?([^;:]+?):\s+delivered\s+(\d+)\/(\d+)\s+duplicates(?:\s+stored)?\s+(\d+)(?:\s+counters\s+(ok|FAIL))?/;

export default async function* summary(source) {
  const scenarios = [];
  let passed = 0;
  let failed = 0;
  let skipped = 0;
  const failures = [];
  let pending = ""; // stdout arrives in chunks: whole lines only
  const take = (text) => {
    for (const line of text.split("\n")) {
      const m = LINE.exec(line.trim());
      if (m) {
        scenarios.push({ name: m[1].trim(), delivered: +m[2], expected: +m[3], dup: +m[4], counters: m[5] || null });
      }
    }
  };
  for await (const ev of source) {
    if (ev.type === "test:stdout") {
      pending += ev.data.message;
      const cut = pending.lastIndexOf("\n");
      if (cut >= 0) {
        take(pending.slice(0, cut));
        pending = pending.slice(cut + 1);
      }
    } else if (ev.type === "test:pass" || ev.type === "test:fail") {
      // Leaf tests only: a file (when files run in their own processes) or a suite is a parent.
      const d = ev.data;
      if (d.details?.type === "suite") continue;
      if (d.nesting === 0 && d.file && d.name === d.file) continue;
      if (d.skip || d.todo) skipped++;
      else if (ev.type === "test:pass") passed++;
      else if (d.details?.error?.failureType !== "subtestsFailed") {
        failed++;
        failures.push(d.name);
      }
    }
  }
  if (pending) take(pending);
  const all = scenarios.filter((s) => s.delivered === s.expected).length;
  const dups = scenarios.reduce((a, s) => a + s.dup, 0);
  const checked = scenarios.filter((s) => s.counters);
  const held = checked.filter((s) => s.counters === "ok").length;
  const short = scenarios.filter((s) => s.delivered !== s.expected).map((s) => `${s.name} ${s.delivered}/${s.expected}`);
  yield `\ne2e summary: ${scenarios.length} scenarios, ${all} all delivered, ${dups} duplicates stored, ` +
    `counter identity held in ${held}/${checked.length} (that check it); tests ${passed} passed, ${failed} failed, ${skipped} skipped` +
    (short.length ? `; not all delivered: ${short.join(", ")}` : "") +
    (failures.length ? `; failed: ${failures.slice(0, 10).join(" | ")}` : "") +
    "\n";
}
