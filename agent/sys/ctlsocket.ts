// The admin socket's transport: a unix socket where each connection carries one request line,
// optionally followed by a body (the rest of what the client sends until it half-closes: an
// update bundle), and gets one reply line. What the lines mean (JSON requests, the commands)
// is admin.ts's.
import { chmodSync, rmSync } from "node:fs";
import { createConnection, createServer, type Socket } from "node:net";
import type { LineServer } from "./index.ts";

/**
 * A connection's bytes as a pull stream: paused while nobody asks for more (backpressure down
 * to the client), and never destroying the socket at its end (Node's own async iterator does,
 * which would leave no way to send the reply after reading a body).
 */
function pullStream(conn: Socket): { next(): Promise<Buffer | null>; discard(): void } {
  const queue: Buffer[] = [];
  let ended = false;
  let discarding = false;
  let wake: (() => void) | null = null;
  const poke = () => {
    wake?.();
    wake = null;
  };
  conn.on("data", (d: Buffer) => {
    if (discarding) return;
    queue.push(d);
    conn.pause();
    poke();
  });
  conn.on("end", () => ((ended = true), poke()));
  conn.on("close", () => ((ended = true), poke()));
  return {
    async next() {
      for (;;) {
        const d = queue.shift();
        if (d) return d;
        if (ended) return null;
        conn.resume();
        await new Promise<void>((r) => (wake = r));
      }
    },
    /** From now on what arrives is dropped unread. */
    discard() {
      discarding = true;
      queue.length = 0;
      conn.resume();
    },
  };
}

/** The body: what came with the line's last read, then the rest of the connection. Read once. */
async function* bodyOf(rest: Buffer, pull: { next(): Promise<Buffer | null> }): AsyncGenerator<Buffer> {
  if (rest.length) yield rest;
  for (let d = await pull.next(); d; d = await pull.next()) yield d;
}

/** See Sockets.serveLines. */
export function serveLines(path: string, maxLine: number, answer: (line: string | null, body: AsyncIterable<Buffer>) => Promise<string>): LineServer {
  // A socket file left by an earlier instance would make listen() fail with EADDRINUSE.
  rmSync(path, { force: true });
  // allowHalfOpen: a client that sent a body half-closes its side and still reads the reply.
  const server = createServer({ allowHalfOpen: true }, (conn) => {
    conn.on("error", () => {});
    const pull = pullStream(conn);
    void (async () => {
      let buf = Buffer.alloc(0);
      let line: string | null = null;
      let rest = Buffer.alloc(0);
      for (;;) {
        const nl = buf.indexOf(10);
        if (nl >= 0) {
          if (nl <= maxLine) line = buf.subarray(0, nl).toString("utf8");
          rest = buf.subarray(nl + 1);
          break;
        }
        if (buf.length > maxLine) break; // too long: answered with null, unread
        const d = await pull.next();
        if (!d) break;
        buf = Buffer.concat([buf, d]);
      }
      const reply = await answer(line, bodyOf(rest, pull));
      // A body not read to its end (a refused update) is dropped as it still comes, until the
      // client, which stops sending once it has the reply, closes: closing first would make
      // its next write fail (EPIPE) and could lose the reply it had not read yet (seen, Bun).
      pull.discard();
      conn.end(`${reply}\n`);
    })().catch(() => conn.destroy());
  });
  // Root only: the socket is the admin interface (mode 0600 as soon as it exists).
  server.listen(path, () => chmodSync(path, 0o600));
  return { close: () => new Promise<void>((resolve) => server.close(() => resolve())) };
}

/**
 * Client side: sends one line, then `body` if given (and half-closes); resolves with the reply
 * (without its newline). A reply that comes before the whole body was sent (a refusal) ends
 * the sending: the reply is what counts.
 */
export function requestLine(path: string, line: string, body?: AsyncIterable<Uint8Array>): Promise<string> {
  return new Promise((resolve, reject) => {
    const c = createConnection({ path, allowHalfOpen: true });
    let reply = "";
    let replied = false;
    c.setEncoding("utf8");
    c.on("connect", () => {
      c.write(`${line}\n`);
      if (!body) return void c.end(); // no body: said so at once
      void (async () => {
        for await (const chunk of body) {
          if (replied || c.destroyed) break;
          if (!c.write(chunk)) {
            await new Promise<void>((r) => {
              const done = () => (c.off("drain", done), c.off("close", done), r());
              c.on("drain", done).on("close", done);
            });
          }
        }
        if (!c.destroyed) c.end();
      })().catch(() => {});
    });
    c.on("data", (d: string) => {
      reply += d;
      if (reply.includes("\n")) replied = true; // the agent answered: the rest is not wanted
    });
    c.on("error", (e: NodeJS.ErrnoException) => {
      // EPIPE/ECONNRESET after a reply: the agent refused and stopped reading; its reply stands.
      if (reply.includes("\n")) return void ((replied = true), resolve(reply.replace(/\n$/, "")));
      reject(new Error(`cannot reach the agent at ${path}: ${e.message}`));
    });
    c.on("end", () => {
      replied = true;
      c.end();
      resolve(reply.replace(/\n$/, ""));
    });
  });
}

/**
 * Connects to `address`:`port` and resolves with the first line the server sends (or "" when it
 * sends nothing within the bound but accepted); rejects naming why (refused, timed out). A
 * server that waits for the client to speak first (HTTP) gets a bare request line.
 */
export function tcpProbe(address: string, port: number, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const sock = createConnection({ host: address, port });
    let got = "";
    let connected = false;
    const done = (f: () => void) => {
      clearTimeout(timer);
      sock.destroy();
      f();
    };
    const timer = setTimeout(() => done(() => (connected ? resolve(got.split("\n")[0]!.trim()) : reject(new Error(`no connection within ${timeoutMs}ms`)))), timeoutMs);
    sock.on("connect", () => {
      connected = true;
      sock.write("GET / HTTP/1.0\r\n\r\n");
    });
    sock.on("data", (d: Buffer) => {
      got += d.toString("utf8");
      if (got.includes("\n")) done(() => resolve(got.split("\n")[0]!.trim()));
    });
    sock.on("end", () => done(() => resolve(got.split("\n")[0]!.trim())));
    sock.on("error", (e: NodeJS.ErrnoException) => done(() => reject(new Error(e.code === "ECONNREFUSED" ? "connection refused" : e.message))));
  });
}
