// Issue 14, defect 11, reproduced (a command, not yet a test: it shows the loss the fix is to
// end, and becomes an e2e test with the fix): `node e2e/crash-mid-task.mjs`.
//
// A page tracks 50 events and its task goes on (8 s of synchronous work); the renderer process
// is killed meanwhile (SIGKILL, as an out-of-memory kill or a mobile OS would), with no
// `pagehide`. The next visit of the site then shows how many of the 50 arrived. On 2026-12-08
// (d1f7d6f, Chromium 156): 0 of 50, because the agent issues its IndexedDB write in a microtask
// after the task. In the same kill, 50 localStorage items written in that task survive: a
// synchronous journal in localStorage would make the events durable before `track()` returns.
// Needs dist/ (npm run build) and target/debug/trueup-relay.

import { Relay, launch, ready, trackN, runId, delivery, sleep, ROOT } from "./harness.mjs";
import { join } from "node:path";
const relay = await Relay.start({ site: join(ROOT, "e2e/sites") });
const b = await launch();
try {
  const ctx = await b.newContext();
  const p = await ctx.newPage();
  await p.goto(`${relay.origin}/plain/`);
  await ready(p);
  const bs = await b.newBrowserCDPSession();
  const before = (await bs.send("SystemInfo.getProcessInfo")).processInfo.filter((x) => x.type === "renderer");
  const run = runId();
  // 50 events tracked, then the task goes on (8 s of work) and the renderer is killed meanwhile.
  p.evaluate((run) => { for (let i = 0; i < 50; i++) window.trueup.track("e2e", { run, i }); const t = Date.now(); while (Date.now() - t < 8000) {} }, run).catch(() => {});
  await sleep(1500);
  const after = (await bs.send("SystemInfo.getProcessInfo")).processInfo.filter((x) => x.type === "renderer");
  const busy = after.map((a) => [a, a.cpuTime - (before.find((x) => x.id === a.id)?.cpuTime || 0)]).sort((x, y) => y[1] - x[1])[0][0];
  process.kill(busy.id, "SIGKILL");
  await sleep(1000);
  const p2 = await ctx.newPage();
  await p2.goto(`${relay.origin}/plain/`);
  await ready(p2);
  await sleep(8000);
  await relay.drained();
  console.log("delivered after a renderer kill mid-task:", delivery(relay, run, 50).delivered, "/ 50");
} finally {
  await b.close();
  await relay.dispose();
}
