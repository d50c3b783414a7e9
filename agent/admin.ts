// The admin commands: what an operator can ask of initos, over ssh (the agent is root's login
// shell) or on the admin socket. One table says which commands exist and what each takes; a
// capability object says what the process answering may do (PID 1 in the initrd, the agent
// beside the OS); one formatter writes `status`. Every request is validated and logged (never
// a passphrase), and there is no shell behind it.
//
// A new command is one row in COMMANDS, plus a capability where it depends on the process.
import { z } from "zod";
import { describe, zodIssue } from "./errors.ts";
import { imageName, jailName } from "./jailsconfig.ts";
import type { Logger } from "./log.ts";
import type { LineServer, Sockets } from "./sys/index.ts";

export const CTL_SOCKET = "/run/initos/ctl.sock";
/** The longest request line; longer ones are refused unread. */
const MAX_REQUEST = 8192;

export interface CtlResponse {
  ok: boolean;
  /** Text for the operator. */
  text: string;
}

/** A capability: what to do, or why this process cannot (the answer is "<cmd>: <refused>"). */
export type Cap<F> = { run: F } | { refused: string };

export type PowerAction = "reboot" | "poweroff";

/** What the process answering the admin commands can do. */
export interface AdminCaps {
  /** `status`: the fields to show, in order. */
  status(): readonly StatusField[];
  /** `log`: the recent log lines. */
  log(): string[];
  /** `reboot`, `poweroff`: starts it (after the answer has gone out); the answer's text. */
  power(action: PowerAction): string;
  /** `unlock`, `reseal`: only while a boot waits for the recovery passphrase. */
  passphrase: Cap<(req: PassphraseRequest) => Promise<CtlResponse>>;
  /** `switch-root`: only in sidecar mode, where it continues the boot; the answer's text. */
  switchRoot: Cap<() => string>;
  /** `update`: a bundle (the request's body) into the inactive slot, then its trial (update/). */
  update: Cap<(opts: UpdateOptions, bundle: AsyncIterable<Buffer>) => Promise<CtlResponse>>;
  /** `commit`: the control plane's word that the trial boot is good (policy "manual"). */
  commit: Cap<() => Promise<CtlResponse>>;
  /** `jails`, `jail`, `image`: jail mode only (agent/jails/). */
  jails: Cap<JailAdmin>;
}

/** What jail mode answers: the jails' status, a jail's start or stop, the image store. */
export interface JailAdmin {
  status(): Promise<string>;
  jail(action: JailAction, name: string): Promise<CtlResponse>;
  /** `image import NAME` reads the archive from `body`; `list` and `rm` leave it unread. */
  image(action: ImageAction, name: string | undefined, body: AsyncIterable<Buffer>): Promise<CtlResponse>;
  /** `hostconfig show`, `hostconfig set` (the new initos.json on stdin, checked, for the next boot). */
  hostConfig(action: "show" | "set", body: AsyncIterable<Buffer>): Promise<CtlResponse>;
}
export type JailAction = "start" | "stop" | "restart";
export type ImageAction = "import" | "list" | "rm";

/** `update --force --reboot`. */
export interface UpdateOptions {
  /** Install even a version that is not newer, or one whose trial failed (logged). */
  force: boolean;
  /** Reboot into the trial once the bundle is written. */
  reboot: boolean;
}

const none = {};
const passphrase = { passphrase: z.string().min(1).max(1024) };
/** Flags: given on the command line as `--force`. */
const updateFlags = { force: z.boolean().default(false), reboot: z.boolean().default(false) };

/** A command's arguments as parsed: `{}` for none, `{ passphrase: string }`. */
type ArgsOf<A> = { [P in keyof A]: A[P] extends z.ZodType ? z.output<A[P]> : never };

/** `jail start web`, `image import web`: the words after the command, in this order. */
const jailArgs = { action: z.enum(["start", "stop", "restart"]), name: jailName };
const imageArgs = { action: z.enum(["import", "list", "rm"]), name: imageName.optional() };
const hostConfigArgs = { action: z.enum(["show", "set"]) };

/**
 * A command: its arguments, and what it does. `body`: whether a request reads the rest of the
 * connection (an update bundle, an image archive: the ssh session's stdin); the others never
 * read it. `positional`: the arguments given as plain words, in order (the rest are --flags).
 */
function command<A extends z.ZodRawShape>(
  args: A,
  run: (caps: AdminCaps, req: ArgsOf<A>, body: AsyncIterable<Buffer>) => CtlResponse | Promise<CtlResponse>,
  opts: { body?: boolean | ((req: ArgsOf<A>) => boolean); positional?: readonly (keyof A & string)[] } = {},
) {
  const body = opts.body ?? false;
  return { args, run, body: typeof body === "function" ? body : () => body, positional: opts.positional ?? [] };
}

const ok = (text: string): CtlResponse => ({ ok: true, text });
function withCap<F>(cmd: string, cap: Cap<F>, use: (f: F) => CtlResponse | Promise<CtlResponse>): CtlResponse | Promise<CtlResponse> {
  return "run" in cap ? use(cap.run) : { ok: false, text: `${cmd}: ${cap.refused}` };
}

/** The commands, in the order an unknown command's answer lists them. */
const COMMANDS = {
  status: command(none, (c) => ok(formatStatus(c.status()))),
  log: command(none, (c) => ok(c.log().join("\n"))),
  unlock: command(passphrase, (c, r) => withCap("unlock", c.passphrase, (f) => f({ cmd: "unlock", passphrase: r.passphrase }))),
  /** Unlock with the recovery passphrase, then seal a new TPM key to the PCRs as they are now. */
  reseal: command(passphrase, (c, r) => withCap("reseal", c.passphrase, (f) => f({ cmd: "reseal", passphrase: r.passphrase }))),
  /** Sidecar mode: leave it and continue the boot into the root (unlocking it if needed). */
  "switch-root": command(none, (c) => withCap("switch-root", c.switchRoot, (f) => ok(f()))),
  /** A bundle on stdin into the inactive slot; the next boot is its trial. */
  update: command(updateFlags, (c, r, body) => withCap("update", c.update, (f) => f({ force: r.force, reboot: r.reboot }, body)), { body: true }),
  /** The trial boot is good: make its slot the default (when the policy waits for this). */
  commit: command(none, (c) => withCap("commit", c.commit, (f) => f())),
  /** Jail mode: each jail's state. */
  jails: command(none, (c) => withCap("jails", c.jails, async (j) => ok(await j.status()))),
  /** Jail mode: `jail start|stop|restart NAME`. */
  jail: command(jailArgs, (c, r) => withCap("jail", c.jails, (j) => j.jail(r.action, r.name)), { positional: ["action", "name"] }),
  /** Jail mode: `image import NAME` (an OCI archive on stdin), `image list`, `image rm NAME`. */
  image: command(imageArgs, (c, r, body) => withCap("image", c.jails, (j) => j.image(r.action, r.name, body)), {
    body: (r) => r.action === "import",
    positional: ["action", "name"],
  }),
  /** Jail mode: the pool's host config (initos.json): `hostconfig show`, `hostconfig set` < file. */
  hostconfig: command(hostConfigArgs, (c, r, body) => withCap("hostconfig", c.jails, (j) => j.hostConfig(r.action, body)), {
    body: (r) => r.action === "set",
    positional: ["action"],
  }),
  reboot: command(none, (c) => ok(c.power("reboot"))),
  poweroff: command(none, (c) => ok(c.power("poweroff"))),
};
type Commands = typeof COMMANDS;
export type Cmd = keyof Commands;
export const CTL_COMMANDS = Object.keys(COMMANDS) as Cmd[];

export type CtlRequest = { [K in Cmd]: { cmd: K } & ArgsOf<Commands[K]["args"]> }[Cmd];
/** `unlock` and `reseal` (spelled out: the table's types refer to AdminCaps, which needs this). */
export interface PassphraseRequest {
  cmd: "unlock" | "reseal";
  passphrase: string;
}
export type CtlHandler = (req: CtlRequest, body?: AsyncIterable<Buffer>) => Promise<CtlResponse>;
const noBody = (): AsyncIterable<Buffer> => (async function* () {})();

const isCmd = (c: unknown): c is Cmd => typeof c === "string" && Object.hasOwn(COMMANDS, c);

/** Parses one request line; a one-line error naming what was wrong otherwise. */
export function parseCtlRequest(line: string): CtlRequest | string {
  let json: unknown;
  try {
    json = JSON.parse(line);
  } catch {
    return "request is not JSON";
  }
  const cmd = (json as { cmd?: unknown } | null)?.cmd;
  if (!isCmd(cmd)) return `bad request: cmd: expected one of ${CTL_COMMANDS.join(", ")}`;
  const r = z.object({ cmd: z.literal(cmd), ...COMMANDS[cmd].args }).strict().safeParse(json);
  return r.success ? (r.data as CtlRequest) : `bad request: ${zodIssue(r.error)}`;
}

/**
 * The words an operator types (`ctl status`, `ctl unlock` + passphrase on stdin, `update
 * --force` + bundle on stdin) as a request. A command's boolean arguments are its flags.
 */
export function requestFromArgs(args: readonly string[], stdin: () => string): CtlRequest | string {
  const [cmd, ...rest] = args;
  if (!isCmd(cmd)) return `unknown command ${JSON.stringify(cmd ?? "")}; try: ${CTL_COMMANDS.join(", ")}`;
  const shape: z.ZodRawShape = COMMANDS[cmd].args;
  const flags = Object.keys(shape).filter((k) => shape[k] instanceof z.ZodDefault && shape[k]._def.innerType instanceof z.ZodBoolean);
  const positional: readonly string[] = COMMANDS[cmd].positional;
  const req: Record<string, unknown> = { cmd };
  let next = 0;
  for (const word of rest) {
    if (!word.startsWith("--") && next < positional.length) {
      req[positional[next++]!] = word;
      continue;
    }
    const flag = word.startsWith("--") ? word.slice(2) : "";
    if (!flags.includes(flag)) {
      const takes = [...positional.map((p) => p.toUpperCase()), ...flags.map((f) => `--${f}`)];
      return takes.length ? `ctl ${cmd}: unknown argument ${JSON.stringify(word)}; it takes ${takes.join(", ")}` : `ctl ${cmd}: takes no arguments`;
    }
    req[flag] = true;
  }
  if ("passphrase" in shape) {
    const passphrase = stdin().trim(); // on stdin: never in argv or logs
    if (!passphrase) return `ctl ${cmd}: give the recovery passphrase on stdin`;
    req.passphrase = passphrase;
  }
  const r = parseCtlRequest(JSON.stringify(req));
  return typeof r === "string" ? `ctl ${cmd}: ${r}` : r;
}

/** Whether the request reads a body (its stdin) after the request line. */
export function takesBody(req: CtlRequest): boolean {
  return (COMMANDS[req.cmd].body as (r: CtlRequest) => boolean)(req);
}

/** The handler for a process with these capabilities. */
export function adminHandler(caps: AdminCaps): CtlHandler {
  return async (req, body = noBody()) => COMMANDS[req.cmd].run(caps, req as never, body);
}

/** A `status` field: "name: value". */
export type StatusField = readonly [name: string, value: string | number];

/** The one status format: a "name: value" line per field. */
export function formatStatus(fields: readonly StatusField[]): string {
  return fields.map(([k, v]) => `${k}: ${v}`).join("\n");
}

/** One request line in, one response out: validated, logged by command (never a passphrase). */
export async function answerLine(log: Logger, handle: CtlHandler, line: string | null, body: AsyncIterable<Buffer> = noBody()): Promise<CtlResponse> {
  if (line === null) return { ok: false, text: "request too long" };
  const req = parseCtlRequest(line);
  if (typeof req === "string") {
    log.warn(`ctl: refused: ${req}`);
    return { ok: false, text: req };
  }
  log.info(`ctl: ${req.cmd}${Object.entries(req).filter(([k, v]) => k !== "cmd" && k !== "passphrase" && v === true).map(([k]) => ` --${k}`).join("")}`);
  return handle(req, body).catch((e: unknown): CtlResponse => ({ ok: false, text: describe(e) }));
}

/** Serves the admin commands on the socket (root only: mode 0600). */
export function serveAdmin(sys: Sockets, log: Logger, handle: CtlHandler, path = CTL_SOCKET): LineServer {
  return sys.serveLines(path, MAX_REQUEST, async (line, body) => JSON.stringify(await answerLine(log, handle, line, body)));
}

/** Client side: one request over `send` (a line transport to the socket), the answer. */
export async function callAdmin(req: CtlRequest, send: (line: string) => Promise<string>): Promise<CtlResponse> {
  const reply = await send(JSON.stringify(req)); // the body, if any, is the transport's to send
  try {
    return JSON.parse(reply) as CtlResponse;
  } catch {
    throw new Error("no answer from the agent");
  }
}
