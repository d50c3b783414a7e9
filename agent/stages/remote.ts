// Remote admin while the initrd needs a human: network, the admin socket and sshd. When the TPM
// does not release the key, the machine also listens for the passphrase over ssh (`ssh
// root@host unlock`, passphrase on stdin), as well as on the console; when the boot fails, it
// stays reachable for status, log and reboot. Sidecar mode runs the same services;
// `switch-root` then hands them to the unlock stage instead of starting a second sshd.
// Everything here is stopped before switch_root.
import type { Cmdline } from "../cmdline.ts";
import type { AgentConfig } from "../config.ts";
import { type AdminCaps, adminHandler, type CtlHandler, type CtlResponse, type PassphraseRequest, serveAdmin } from "../admin.ts";
import { describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import { STOP_BOUNDS, type StopBounds, type Supervised } from "../supervise.ts";
import type { Console, LineServer, Sys } from "../sys/index.ts";
import type { Coldplug } from "./devices.ts";
import { handLeasesToOs, networkRequested, setupNetwork } from "./network.ts";
import { startSshd } from "./sidecar.ts";

/** Hands passphrases from `ctl unlock`/`ctl reseal` to the unlock loop, and its verdict back. */
export class RemoteSecrets {
  private waiting?: (passphrase: string) => void;
  private verdict?: (r: { ok: boolean; resealed: boolean }) => void;
  /** A passphrase from ssh opened the disk (its client is being told so). */
  answeredOk = false;
  /** The last passphrase came with `reseal`: the operator asked for a new TPM seal. */
  wantReseal = false;

  /** The ctl side: answers once the unlock loop has tried the passphrase (and resealed). */
  handle = async (req: PassphraseRequest): Promise<CtlResponse> => {
    if (!this.waiting) return { ok: false, text: `${req.cmd}: nothing is waiting for a passphrase right now` };
    const give = this.waiting;
    this.waiting = undefined;
    this.wantReseal = req.cmd === "reseal";
    const r = await new Promise<{ ok: boolean; resealed: boolean }>((resolve) => {
      this.verdict = resolve;
      give(req.passphrase);
    });
    if (!r.ok) return { ok: false, text: "wrong passphrase" };
    if (req.cmd === "unlock") return { ok: true, text: "unlocked; the boot continues" };
    return r.resealed
      ? { ok: true, text: "unlocked and resealed to the current TPM state; the boot continues" }
      : { ok: false, text: "unlocked, but the reseal failed (see log); the boot continues" };
  };

  next(): Promise<string> {
    return new Promise((resolve) => (this.waiting = resolve));
  }

  /**
   * Nobody waits any more (the console answered first): a passphrase sent now is refused at
   * once instead of going to a wait that is over, where its client would hang unanswered.
   */
  cancel(): void {
    this.waiting = undefined;
  }

  /** True when the last secret came from here (and someone waits for the verdict). */
  report(ok: boolean, resealed = false): boolean {
    const v = this.verdict;
    this.verdict = undefined;
    if (v && ok) this.answeredOk = true;
    v?.({ ok, resealed });
    return v !== undefined;
  }
}

/**
 * The recovery passphrase from a human: the console (no echo) or `unlock`/`reseal` over ssh,
 * whichever answers first; and the verdict back to where it came from.
 */
export class PassphrasePrompt {
  /** A console read still pending from the last prompt: it keeps its place (one read at a time). */
  private consoleLine?: Promise<string | null>;
  private lastWasRemote = false;
  private remote: RemoteSecrets | null = null;

  constructor(
    private readonly sys: Console,
    /** Starts remote admin the first time a human is asked; null if none can run. */
    private readonly startRemote?: () => Promise<RemoteSecrets | null>,
  ) {}

  async read(prompt: string): Promise<string | null> {
    const remote = (this.remote = this.startRemote ? await this.startRemote() : null);
    this.consoleLine ??= this.sys.readLine(prompt, false).finally(() => (this.consoleLine = undefined));
    const fromConsole = this.consoleLine.then((line) => ({ line, remote: false }));
    const winner = remote ? await Promise.race([fromConsole, remote.next().then((line) => ({ line, remote: true }))]) : await fromConsole;
    if (!winner.remote) remote?.cancel();
    this.lastWasRemote = winner.remote;
    return winner.line;
  }

  /** Tells an ssh client that sent the last passphrase whether it worked (it waits for that). */
  report(ok: boolean, resealed: boolean): void {
    if (this.lastWasRemote) this.remote?.report(ok, resealed);
  }

  /** A yes/no question (default no). */
  async confirm(question: string): Promise<boolean> {
    // Over ssh the operator chose with the command (reseal vs unlock): nobody may be at the
    // console to answer a question there.
    if (this.lastWasRemote) return this.remote?.wantReseal === true;
    const a = await this.sys.readLine(question, true);
    return /^y(es)?$/i.test(a?.trim() ?? "");
  }
}

/** How long a client that got an answer has, from then, before its ssh session is stopped. */
const ANSWER_GRACE_MS = 2000;

/**
 * Network, the admin socket and sshd, for as long as the initrd needs a human. One per boot:
 * sidecar mode, the recovery passphrase and the failure policy share it (and the network with
 * the agent beside the OS).
 */
export class RemoteAdmin {
  private server?: LineServer;
  private sshd?: Supervised | null;
  private net?: Promise<string | null>;
  /** When the admin socket last answered (sys.now()). */
  private answeredAt = -Infinity;
  private handler: CtlHandler = async (req) => ({ ok: false, text: `${req.cmd}: not available yet` });

  constructor(
    private readonly sys: Sys,
    private readonly log: Logger,
  ) {}

  get running(): boolean {
    return this.server !== undefined;
  }

  /** Answers with these capabilities from now on (the boot moved to another stage). */
  route(caps: AdminCaps): void {
    this.handler = adminHandler(caps);
  }

  /** Starts it, answering with `caps`; false when there are no keys or no address to offer. */
  async start(cold: Coldplug, cfg: AgentConfig, cmdline: Cmdline, caps: AdminCaps): Promise<boolean> {
    this.route(caps);
    if (this.running) return true;
    if (!cfg.ssh.authorizedKeys.length || !networkRequested(cmdline)) return false;
    try {
      await this.network(cold, cmdline, cfg);
      this.serve(cfg);
      return true;
    } catch (e) {
      this.log.err(`recovery: no remote unlock: ${describe(e)}`);
      return false;
    }
  }

  /** Brings the network up once per boot. */
  network(cold: Coldplug, cmdline: Cmdline, cfg: AgentConfig): Promise<string | null> {
    this.net ??= setupNetwork(this.sys, this.log, cold, cmdline, cfg.rootWaitSeconds);
    return this.net;
  }

  /** The admin socket and sshd, once the network is up. */
  serve(cfg: AgentConfig): void {
    const { sys, log } = this;
    this.server = serveAdmin(sys, log, (req, body) =>
      this.handler(req, body).finally(() => {
        this.answeredAt = sys.now();
      }),
    );
    this.sshd = startSshd(sys, log, cfg);
  }

  /**
   * sshd stopped (once the last answer had its grace, as in stop()) and started again: it loads
   * the host key now in /run. The admin socket stays. Used when the pool opened and its key
   * replaced the recovery host key, which the running sshd still holds in its memory.
   */
  async restartSshd(cfg: AgentConfig, bounds: StopBounds = STOP_BOUNDS): Promise<void> {
    const { sshd, sys } = this;
    this.sshd = undefined;
    const grace = this.answeredAt + ANSWER_GRACE_MS - sys.now();
    if (grace > 0) await sys.sleep(Math.min(grace, ANSWER_GRACE_MS));
    if (sshd) await sshd.stop(sys, bounds);
    this.sshd = startSshd(sys, this.log, cfg);
  }

  /**
   * Before switch_root: no new admin requests, and the answers already given reach their clients
   * (`switch-root` was answered moments ago); then sshd, with every session and what runs in it,
   * is stopped and waited for. A DHCP lease is the OS's from now on (network.ts).
   */
  async stop(bounds: StopBounds = STOP_BOUNDS): Promise<void> {
    const { server, sshd, sys } = this;
    this.server = undefined;
    this.sshd = undefined;
    handLeasesToOs();
    // Bounded: a client that keeps its connection open must not hold the boot.
    if (server) await Promise.race([server.close(), sys.sleep(bounds.termMs)]);
    // A client's session still has to print its answer and close; stopped at once, it would see
    // the connection drop instead (pool.ts waits the same way after a remote unlock).
    const grace = this.answeredAt + ANSWER_GRACE_MS - sys.now();
    if (grace > 0) await sys.sleep(Math.min(grace, ANSWER_GRACE_MS));
    if (sshd) await sshd.stop(sys, bounds);
  }
}
