// Jail mode's supervisor: PID 1 keeps the hardware and runs the host config's jails, each as a
// supervised service (agent/supervise.ts: restarted with backoff, its console logged line by line
// under its name, stopped with everything it started). How a jail of each kind is prepared and
// run (crun, QEMU) is a Launcher's business (launchers.ts); this file decides when.
//
// A jail's death, or a jail that cannot even be prepared (its image missing, a share refused),
// costs that jail only: one line naming it, and the others and the agent go on.
import type { CtlResponse, ImageAction, JailAction, JailAdmin } from "../admin.ts";
import { describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import { STOP_BOUNDS, type Service, type StopBounds, type Supervised, type SuperviseSys, supervise } from "../supervise.ts";
import type { Files } from "../sys/index.ts";
import type { Jail, JailsConfig } from "../jailsconfig.ts";
import { jailCgroup } from "./container.ts";
import type { HostConfigFile } from "./hostfile.ts";

/** How long a start may take before the admin's answer says "starting" (it goes on). */
const START_ANSWER_MS = 60_000;
/** A jail asked to stop (SIGTERM, the power button) has this long before it is killed. */
export const JAIL_STOP_BOUNDS: StopBounds = { ...STOP_BOUNDS, termMs: 10_000 };

/** How one kind of jail is run. */
export interface Launcher {
  /** Everything a start needs (a fresh rootfs, the network, the runtime's files): the service to run. Throws one line. */
  prepare(jail: Jail): Promise<Service>;
  /** After it stopped for good: removes what prepare made (never the image or the shares). */
  cleanup(jail: Jail): Promise<void>;
}

/** The image store (images.ts), as jail mode's admin commands use it: each answers a line or throws one. */
export interface ImageStore {
  importImage(name: string, body: AsyncIterable<Uint8Array>): Promise<string>;
  list(): string;
  remove(name: string, inUse: (name: string) => boolean): string;
}

/** What the supervisor touches, besides what its launchers do. */
export type JailsSys = SuperviseSys & Pick<Files, "readFile"> & { tcpProbe(address: string, port: number, timeoutMs: number): Promise<string> };

interface Slot {
  jail: Jail;
  svc?: Supervised;
  /** A start or stop in progress: the next one waits for it. */
  busy?: Promise<unknown>;
  /** Why the last start failed before anything ran. */
  error?: string;
}

export class Jails {
  private readonly slots = new Map<string, Slot>();
  /** Imports in progress by image name: a second import of a name waits for the first. */
  private readonly imports = new Map<string, Promise<unknown>>();

  constructor(
    private readonly sys: JailsSys,
    private readonly log: Logger,
    config: JailsConfig,
    private readonly launchers: Record<Jail["kind"], Launcher>,
    private readonly images: ImageStore,
    private readonly hostFile: HostConfigFile,
  ) {
    for (const jail of config.jails) this.slots.set(jail.name, { jail });
  }

  /** Starts every jail, one after the other (a start snapshots and shifts a tree: disk-bound). */
  async startAll(): Promise<void> {
    for (const name of this.slots.keys()) await this.start(name).catch(() => {}); // logged by start
  }

  /** Starts a jail that is not running; a failure is logged, kept for status and returned. */
  start(name: string): Promise<string> {
    return this.serialized(name, async (slot) => {
      if (slot.svc) return `jail ${name}: already running`;
      try {
        const service = await this.launchers[slot.jail.kind].prepare(slot.jail);
        slot.svc = supervise(this.sys, this.log, { ...service, name: `jail ${name}` });
        slot.error = undefined;
        return `jail ${name}: started`;
      } catch (e) {
        slot.error = describe(e);
        this.log.err(`jail ${name}: not started: ${slot.error}`);
        await this.launchers[slot.jail.kind].cleanup(slot.jail).catch(() => {});
        throw e;
      }
    });
  }

  /** Stops a jail cleanly (asked first, killed after a bound) and removes what its start made. */
  stop(name: string, bounds = JAIL_STOP_BOUNDS): Promise<string> {
    return this.serialized(name, async (slot) => {
      const svc = slot.svc;
      slot.svc = undefined;
      if (svc) await svc.stop(this.sys, bounds);
      await this.launchers[slot.jail.kind].cleanup(slot.jail).catch((e: unknown) => this.log.warn(`jail ${name}: cleanup: ${describe(e)}`));
      return svc ? `jail ${name}: stopped` : `jail ${name}: was not running`;
    });
  }

  /** Before a power action: every jail at once, each with its bound. */
  async stopAll(bounds = JAIL_STOP_BOUNDS): Promise<void> {
    await Promise.all([...this.slots.keys()].map((name) => this.stop(name, bounds).catch(() => {})));
  }

  /** Whether a running jail uses the image (it may not be removed then). */
  imageInUse(image: string): boolean {
    return [...this.slots.values()].some((s) => s.svc && s.jail.image === image);
  }

  /** One or more lines per jail: its state, then what the host sees of it. */
  async status(): Promise<string> {
    if (!this.slots.size) return "no jails in the host config";
    const lines: string[] = [];
    for (const slot of this.slots.values()) lines.push(...(await this.describe(slot)));
    return lines.join("\n");
  }

  /** The admin rows' side (admin.ts: jails, jail, image). */
  admin(): JailAdmin {
    return {
      status: () => this.status(),
      jail: (action, name) => this.jailCommand(action, name),
      image: (action, name, body) => this.imageCommand(action, name, body),
      hostConfig: async (action, body) => ({ ok: true, text: action === "show" ? this.hostFile.show() : await this.hostFile.set(body) }),
    };
  }

  private async jailCommand(action: JailAction, name: string): Promise<CtlResponse> {
    if (!this.slots.has(name)) return { ok: false, text: `jail ${name}: not in the host config (jails: ${[...this.slots.keys()].join(", ") || "none"})` };
    const run = async () => {
      if (action !== "start") await this.stop(name);
      return action === "stop" ? `jail ${name}: stopped` : this.start(name);
    };
    // A start can take long (a large image's ids shifted under TCG): answer when it is done, or
    // say it goes on; its outcome is in the log and in `jails`.
    const done = run().then(
      (text): CtlResponse => ({ ok: true, text }),
      (e: unknown): CtlResponse => ({ ok: false, text: `jail ${name}: ${describe(e)}` }),
    );
    let cancel = () => {};
    const later = new Promise<CtlResponse>((resolve) => {
      cancel = this.sys.after(START_ANSWER_MS, () => resolve({ ok: true, text: `jail ${name}: ${action} still in progress (see jails)` }));
    });
    return Promise.race([done, later]).finally(cancel);
  }

  private async imageCommand(action: ImageAction, name: string | undefined, body: AsyncIterable<Buffer>): Promise<CtlResponse> {
    if (action === "list") return { ok: true, text: this.images.list() };
    if (!name) return { ok: false, text: `image ${action}: give the image's name` };
    if (action === "rm") return { ok: true, text: this.images.remove(name, (n) => this.imageInUse(n)) };
    // The store clears an interrupted import's leftovers of the same name: a second import
    // running meanwhile would take the first one's for those.
    const before = this.imports.get(name) ?? Promise.resolve();
    const run = before.catch(() => {}).then(() => this.images.importImage(name, body));
    this.imports.set(name, run);
    try {
      return { ok: true, text: await run };
    } finally {
      if (this.imports.get(name) === run) this.imports.delete(name);
    }
  }

  /** One start or stop at a time per jail: a `jail restart` during a start waits for it. */
  private serialized(name: string, fn: (slot: Slot) => Promise<string>): Promise<string> {
    const slot = this.slots.get(name);
    if (!slot) return Promise.reject(new Error(`jail ${name}: not in the host config`));
    const run = (slot.busy ?? Promise.resolve()).catch(() => {}).then(() => fn(slot));
    slot.busy = run;
    return run;
  }

  private async describe(slot: Slot): Promise<string[]> {
    const { jail, svc } = slot;
    const st = svc?.state();
    const head = `${jail.name}: ${jail.kind} ${jail.address}, image ${jail.image}`;
    if (!st) return [`${head}: stopped${slot.error ? ` (start failed: ${slot.error})` : ""}`];
    const since = `${((this.sys.now() - st.since) / 1000).toFixed(0)}s`;
    const restarts = st.restarts ? `, restarts ${st.restarts} (last: ${st.last})` : "";
    const lines = [`${head}: ${st.running ? `running, pid ${st.pid}, up ${since}` : `restarting (${st.last})`}${restarts}`];
    if (jail.kind === "container") lines.push(...containerView(this.sys, jail));
    if (jail.probe !== undefined) {
      const answer = await this.sys.tcpProbe(jail.address, jail.probe, 2000).then(
        (first) => `answered: ${JSON.stringify(first.slice(0, 80))}`,
        (e: unknown) => `no answer: ${describe(e)}`,
      );
      lines.push(`${jail.name}: probe ${jail.address}:${jail.probe} ${answer}`);
    }
    return lines;
  }
}

/**
 * What the host's /proc and cgroup say of a container: its init (the process that is PID 1 in
 * its own pid namespace) and whom its uid 0 is outside; its memory, its limit, the OOM kills.
 */
export function containerView(sys: Pick<Files, "readFile">, jail: Jail): string[] {
  const cg = jailCgroup(jail.name);
  const out: string[] = [];
  for (const pid of (sys.readFile(`${cg}/run/cgroup.procs`) ?? "").split("\n").filter(Boolean)) {
    const nspid = /^NSpid:\s+(.*)$/m.exec(sys.readFile(`/proc/${pid}/status`) ?? "")?.[1]?.trim().split(/\s+/);
    if (!nspid || nspid.length < 2 || nspid.at(-1) !== "1") continue;
    const map = (sys.readFile(`/proc/${pid}/uid_map`) ?? "").trim().split(/\s+/);
    out.push(`${jail.name}: init pid ${pid} is pid 1 in its namespace; uid ${map[0] ?? "?"} inside is uid ${map[1] ?? "?"} outside (${map[2] ?? "?"} ids)`);
    break;
  }
  const mib = (v: string | null) => (v === null ? "?" : v.trim() === "max" ? "no limit" : `${(Number(v) / 1048576).toFixed(1)} MiB`);
  const oom = /^oom_kill (\d+)$/m.exec(sys.readFile(`${cg}/memory.events`) ?? "")?.[1];
  out.push(`${jail.name}: memory ${mib(sys.readFile(`${cg}/memory.current`))} of ${mib(sys.readFile(`${cg}/run/memory.max`))}, oom kills ${oom ?? "?"}`);
  return out;
}
