// The admin socket's transport: a unix socket where each connection carries one request line
// and gets one reply line. What the lines mean (JSON requests, the commands) is admin.ts's.
import { chmodSync, rmSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import type { LineServer } from "./index.ts";

/** See Sockets.serveLines. */
export function serveLines(path: string, maxLine: number, answer: (line: string | null) => Promise<string>): LineServer {
  // A socket file left by an earlier instance would make listen() fail with EADDRINUSE.
  rmSync(path, { force: true });
  const server = createServer((conn) => {
    let buf = "";
    let answered = false;
    conn.setEncoding("utf8");
    const reply = async (line: string | null) => {
      answered = true;
      conn.end(`${await answer(line)}\n`);
    };
    conn.on("data", (d: string) => {
      if (answered) return;
      buf += d;
      const nl = buf.indexOf("\n");
      if (nl >= 0) void reply(nl > maxLine ? null : buf.slice(0, nl));
      else if (buf.length > maxLine) void reply(null);
    });
    conn.on("error", () => {});
  });
  // Root only: the socket is the admin interface (mode 0600 as soon as it exists).
  server.listen(path, () => chmodSync(path, 0o600));
  return { close: () => new Promise<void>((resolve) => server.close(() => resolve())) };
}

/** Client side: sends one line, resolves with the reply (without its newline). */
export function requestLine(path: string, line: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const c = createConnection(path);
    let buf = "";
    c.setEncoding("utf8");
    c.on("connect", () => c.write(`${line}\n`));
    c.on("data", (d: string) => (buf += d));
    c.on("error", (e) => reject(new Error(`cannot reach the agent at ${path}: ${e.message}`)));
    c.on("end", () => resolve(buf.replace(/\n$/, "")));
  });
}
