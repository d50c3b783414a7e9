// A line-speaking client of a unix socket (QEMU's QMP): lines are read as they come, each read
// bounded, so a peer that goes silent costs a timeout, never a hang. Errors do not repeat the
// path: the caller's line names it.
import { createConnection } from "node:net";
import type { LineConnection } from "./index.ts";

/** Lines longer than this end the connection: QMP's replies to our two commands are tiny. */
const MAX_LINE = 64 * 1024;

export function connectUnix(path: string, timeoutMs: number): Promise<LineConnection> {
  return new Promise((resolve, reject) => {
    const sock = createConnection(path);
    const lines: string[] = [];
    let rest = "";
    let ended = false;
    let failure: Error | null = null;
    let wake: (() => void) | null = null;
    const poke = () => {
      wake?.();
      wake = null;
    };
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new Error(`no connection within ${timeoutMs}ms`));
    }, timeoutMs);
    sock.setEncoding("utf8");
    sock.on("data", (d: string) => {
      const parts = (rest + d).split("\n");
      rest = parts.pop()!;
      if (rest.length > MAX_LINE) {
        failure = new Error(`a line longer than ${MAX_LINE} bytes`);
        sock.destroy();
      }
      lines.push(...parts.map((l) => l.replace(/\r$/, "")));
      poke();
    });
    sock.on("end", () => ((ended = true), poke()));
    sock.on("close", () => ((ended = true), poke()));
    sock.on("error", (e) => {
      failure = new Error(e.message);
      ended = true;
      clearTimeout(timer);
      reject(failure);
      poke();
    });
    sock.on("connect", () => {
      clearTimeout(timer);
      resolve({
        async readLine(ms) {
          const until = Date.now() + ms;
          for (;;) {
            const l = lines.shift();
            if (l !== undefined) return l;
            if (failure) throw failure;
            if (ended) return null;
            const wait = until - Date.now();
            if (wait <= 0) throw new Error(`no answer within ${ms}ms`);
            await new Promise<void>((r) => {
              const t = setTimeout(r, wait);
              wake = () => (clearTimeout(t), r());
            });
          }
        },
        write: (text) => void sock.write(text),
        close: () => void sock.destroy(),
      });
    });
  });
}
