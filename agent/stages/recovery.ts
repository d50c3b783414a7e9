// The recovery sidecar: when the TPM does not release the key, the machine also listens for the
// passphrase over ssh (`ssh root@host unlock`, passphrase on stdin), as well as on the console;
// and when the boot fails, it stays reachable for status, log and reboot. Sidecar mode runs the
// same services; `switch-root` then hands them to the unlock stage instead of starting a second
// sshd. Everything here is stopped before switch_root.
import type { Server } from "node:net";
import type { Cmdline } from "../cmdline.ts";
import type { AgentConfig } from "../config.ts";
import type { CtlHandler, CtlRequest, CtlResponse } from "../ctl.ts";
import { describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import { STOP_BOUNDS, type StopBounds, type Supervised } from "../supervise.ts";
import type { Sys } from "../sys/index.ts";
import type { Coldplug } from "./devices.ts";
import { handLeasesToOs, networkRequested, setupNetwork } from "./network.ts";
import { startCtl, startSshd } from "./sidecar.ts";

/** Hands passphrases from `ctl unlock`/`ctl reseal` to the unlock loop, and its verdict back. */
export class RemoteSecrets {
  private waiting?: (passphrase: string) => void;
  private verdict?: (r: { ok: boolean; resealed: boolean }) => void;
  /** A passphrase from ssh opened the disk (its client is being told so). */
  answeredOk = false;
  /** The last passphrase came with `reseal`: the operator asked for a new TPM seal. */
  wantReseal = false;

  /** The ctl side: answers once the unlock loop has tried the passphrase (and resealed). */
  handle = async (req: CtlRequest): Promise<CtlResponse> => {
    if (req.cmd !== "unlock" && req.cmd !== "reseal") return { ok: false, text: `${req.cmd}: not available while waiting for the recovery passphrase` };
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

  /** True when the last secret came from here (and someone waits for the verdict). */
  report(ok: boolean, resealed = false): boolean {
    const v = this.verdict;
    this.verdict = undefined;
    if (v && ok) this.answeredOk = true;
    v?.({ ok, resealed });
    return v !== undefined;
  }
}

/** How long a client that got an answer has, from then, before its ssh session is stopped. */
const ANSWER_GRACE_MS = 2000;

/** Closes `server` and waits (at most `ms`) until its open connections have ended. */
function closeServer(server: Server, ms: number): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    server.close(() => (clearTimeout(timer), resolve()));
  });
}

/** Network, the admin socket and sshd, for as long as the initrd needs a human. */
export class RecoverySidecar {
  private server?: Server;
  private sshd?: Supervised | null;
  private net?: Promise<string | null>;
  private sys?: Sys;
  /** When the admin socket last answered (sys.now()). */
  private answeredAt = -Infinity;
  private handler: CtlHandler = async (req) => ({ ok: false, text: `${req.cmd}: not available yet` });

  get running(): boolean {
    return this.server !== undefined;
  }

  /** Serves requests with `handle` from now on (the boot moved to another stage). */
  route(handle: CtlHandler): void {
    this.handler = handle;
  }

  /** Starts it with `handle` behind the socket; false when there are no keys or no address to offer. */
  async start(sys: Sys, log: Logger, cold: Coldplug, cfg: AgentConfig, cmdline: Cmdline, handle: CtlHandler): Promise<boolean> {
    this.route(handle);
    if (this.running) return true;
    if (!cfg.ssh.authorizedKeys.length || !networkRequested(cmdline)) return false;
    try {
      await this.network(sys, log, cold, cmdline, cfg);
      this.serve(sys, log, cfg);
      return true;
    } catch (e) {
      log.err(`recovery: no remote unlock: ${describe(e)}`);
      return false;
    }
  }

  /** Brings the network up once per boot (sidecar mode, recovery and the sidecar beside the OS share it). */
  network(sys: Sys, log: Logger, cold: Coldplug, cmdline: Cmdline, cfg: AgentConfig): Promise<string | null> {
    this.net ??= setupNetwork(sys, log, cold, cmdline, cfg.rootWaitSeconds);
    return this.net;
  }

  /** The admin socket and sshd, once the network is up. */
  serve(sys: Sys, log: Logger, cfg: AgentConfig): void {
    this.sys = sys;
    this.server = startCtl(log, (req) =>
      this.handler(req).finally(() => {
        this.answeredAt = sys.now();
      }),
    );
    this.sshd = startSshd(sys, log, cfg);
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
    if (server) await closeServer(server, bounds.termMs);
    // A client's session still has to print its answer and close; stopped at once, it would see
    // the connection drop instead (pool.ts waits the same way after a remote unlock).
    const grace = this.answeredAt + ANSWER_GRACE_MS - (sys?.now() ?? 0);
    if (sys && grace > 0) await sys.sleep(Math.min(grace, ANSWER_GRACE_MS));
    if (sshd && sys) await sshd.stop(sys, bounds);
  }
}
