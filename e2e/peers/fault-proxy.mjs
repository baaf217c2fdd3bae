// A loopback HTTP proxy in front of trueup's relay for npm run bench:peers, so that trueup meets
// exactly the faults the peers meet at the collector (the same FaultBag, same seeds), instead of
// the relay's own fault injection (independent rolls, which a batching sender making a handful of
// requests may not meet at all). Everything is forwarded as is (the Host header too, so the relay
// sees the page as same-origin); on POST /_r/q the fault decides:
//   "503"       the body is read, not forwarded; 503 with Retry-After: 1
//   "ack_lost"  forwarded and answered by the relay (so stored), then the client's connection is
//               destroyed without an answer
// Every request to /_r/q is recorded ({t, status, fault}).

import { createServer, request, Agent } from "node:http";
import { FaultBag } from "./collector.mjs";

export class FaultProxy {
  constructor({ port, target, faults = {} }) {
    this.port = port;
    this.target = target; // the relay's port
    this.faults = new FaultBag(faults);
    this.agent = new Agent({ keepAlive: true });
    this.requests = [];
    this.lastCollectAt = 0;
    this.sockets = new Set();
  }

  get origin() {
    return `http://127.0.0.1:${this.port}`;
  }

  async start() {
    this.server = createServer((req, res) => this.handle(req, res));
    this.server.on("connection", (s) => {
      this.sockets.add(s);
      s.on("close", () => this.sockets.delete(s));
    });
    await new Promise((res, rej) => {
      this.server.once("error", rej);
      this.server.listen(this.port, "127.0.0.1", res);
    });
    this.port = this.server.address().port;
  }

  async stop() {
    if (!this.server) return;
    const closed = new Promise((r) => this.server.close(r));
    for (const s of this.sockets) s.destroy();
    await closed;
    this.server = null;
    this.agent.destroy();
  }

  handle(req, res) {
    const collect = req.method === "POST" && req.url.split("?")[0] === "/_r/q";
    const fault = collect ? this.faults.next() : null;
    const rec = collect ? { t: Date.now(), status: 0, fault } : null;
    if (rec) {
      this.requests.push(rec);
      this.lastCollectAt = rec.t;
    }
    if (fault === "503") {
      req.resume();
      req.on("end", () => {
        rec.status = 503;
        res.writeHead(503, { "retry-after": "1", "content-type": "application/json" }).end('{"error":"unavailable"}');
      });
      return;
    }
    const up = request({ host: "127.0.0.1", port: this.target, method: req.method, path: req.url, headers: req.headers, agent: this.agent }, (ur) => {
      if (rec) rec.status = ur.statusCode;
      if (fault === "ack_lost") {
        ur.resume();
        ur.on("end", () => req.socket.destroy());
        return;
      }
      res.writeHead(ur.statusCode, ur.headers);
      ur.pipe(res);
    });
    up.on("error", () => res.destroy());
    req.pipe(up);
  }
}
