// The admin interface: the running PID 1 listens on a unix socket; `initos-agent ctl <cmd>` (and
// an ssh session, whose shell is the agent) sends one JSON request per connection. Every
// request is validated and logged; there is no shell behind it.
import { chmodSync, rmSync } from "node:fs";
import { createConnection, createServer, type Server } from "node:net";
import { z } from "zod";
import type { Logger } from "./log.ts";

export const CTL_SOCKET = "/run/initos/ctl.sock";

export const CtlRequestSchema = z.discriminatedUnion("cmd", [
  z.object({ cmd: z.literal("status") }).strict(),
  z.object({ cmd: z.literal("log") }).strict(),
  z.object({ cmd: z.literal("reboot") }).strict(),
  z.object({ cmd: z.literal("poweroff") }).strict(),
  z.object({ cmd: z.literal("unlock"), passphrase: z.string().min(1).max(1024) }).strict(),
  /** Unlock with the recovery passphrase, then seal a new TPM key to the PCRs as they are now. */
  z.object({ cmd: z.literal("reseal"), passphrase: z.string().min(1).max(1024) }).strict(),
  /** Sidecar mode: leave it and continue the boot into the root (unlocking it if needed). */
  z.object({ cmd: z.literal("switch-root") }).strict(),
]);
export type CtlRequest = z.output<typeof CtlRequestSchema>;
export interface CtlResponse {
  ok: boolean;
  /** Text for the operator. */
  text: string;
}

/** Parses one request line; a one-line error naming what was wrong otherwise. */
export function parseCtlRequest(line: string): CtlRequest | string {
  let json: unknown;
  try {
    json = JSON.parse(line);
  } catch {
    return "request is not JSON";
  }
  const r = CtlRequestSchema.safeParse(json);
  if (r.success) return r.data;
  const i = r.error.issues[0]!;
  return `bad request: ${i.path.join(".") || "(top level)"}: ${i.message}`;
}

export const CTL_COMMANDS = ["status", "log", "unlock", "reseal", "switch-root", "reboot", "poweroff"] as const;

/** The words an operator types (`ctl status`, `ctl unlock` + passphrase on stdin) as a request. */
export function requestFromArgs(args: readonly string[], stdin: () => string): CtlRequest | string {
  const [cmd, ...rest] = args;
  if (!cmd || !(CTL_COMMANDS as readonly string[]).includes(cmd)) return `unknown command ${JSON.stringify(cmd ?? "")}; try: ${CTL_COMMANDS.join(", ")}`;
  if (rest.length) return `ctl ${cmd}: takes no arguments`;
  if (cmd === "unlock" || cmd === "reseal") {
    const passphrase = stdin().trim(); // on stdin: never in argv or logs
    if (!passphrase) return `ctl ${cmd}: give the recovery passphrase on stdin`;
    return { cmd, passphrase };
  }
  return CtlRequestSchema.parse({ cmd });
}

export type CtlHandler = (req: CtlRequest) => Promise<CtlResponse>;

/** Serves requests on the socket (root only: mode 0600). */
export function serveCtl(log: Logger, handle: CtlHandler, path = CTL_SOCKET): Server {
  rmSync(path, { force: true });
  const server = createServer((conn) => {
    let buf = "";
    conn.setEncoding("utf8");
    conn.on("data", async (d: string) => {
      buf += d;
      const nl = buf.indexOf("\n");
      if (nl < 0) {
        if (buf.length > 8192) conn.end(JSON.stringify({ ok: false, text: "request too long" }) + "\n");
        return;
      }
      const req = parseCtlRequest(buf.slice(0, nl));
      buf = "";
      if (typeof req === "string") {
        log.warn(`ctl: refused: ${req}`);
        conn.end(JSON.stringify({ ok: false, text: req }) + "\n");
        return;
      }
      log.info(`ctl: ${req.cmd}`); // never the passphrase
      const res = await handle(req).catch((e: unknown): CtlResponse => ({ ok: false, text: e instanceof Error ? e.message : String(e) }));
      conn.end(JSON.stringify(res) + "\n");
    });
    conn.on("error", () => {});
  });
  server.listen(path, () => chmodSync(path, 0o600));
  return server;
}

/** Client side: one request, the answer. */
export function callCtl(req: CtlRequest, path = CTL_SOCKET): Promise<CtlResponse> {
  return new Promise((resolve, reject) => {
    const c = createConnection(path);
    let buf = "";
    c.setEncoding("utf8");
    c.on("connect", () => c.write(JSON.stringify(req) + "\n"));
    c.on("data", (d: string) => (buf += d));
    c.on("error", (e) => reject(new Error(`cannot reach the agent at ${path}: ${e.message}`)));
    c.on("end", () => {
      try {
        resolve(JSON.parse(buf) as CtlResponse);
      } catch {
        reject(new Error("no answer from the agent"));
      }
    });
  });
}
