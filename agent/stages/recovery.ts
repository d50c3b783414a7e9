// The recovery sidecar: when the TPM does not release the key, the machine also listens for the
// passphrase over ssh (`ssh root@host unlock`, passphrase on stdin), as well as on the console;
// and when the boot fails, it stays reachable for status, log and reboot. Started only when
// needed, and stopped before the boot goes on.
import type { Server } from "node:net";
import type { Cmdline } from "../cmdline.ts";
import type { AgentConfig } from "../config.ts";
import type { CtlHandler, CtlRequest, CtlResponse } from "../ctl.ts";
import { describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import type { Supervised } from "../supervise.ts";
import type { Sys } from "../sys/index.ts";
import type { Coldplug } from "./devices.ts";
import { setupNetwork, staticIpFrom } from "./network.ts";
import { startCtl, startSshd } from "./sidecar.ts";

/** Hands passphrases from `ctl unlock` to the unlock loop, and its verdict back to the client. */
export class RemoteSecrets {
  private waiting?: (passphrase: string) => void;
  private verdict?: (ok: boolean) => void;
  /** A passphrase from ssh opened the disk (its client is being told so). */
  answeredOk = false;

  /** The ctl side: answers once the unlock loop has tried the passphrase. */
  handle = async (req: CtlRequest): Promise<CtlResponse> => {
    if (req.cmd !== "unlock") return { ok: false, text: `${req.cmd}: not available while waiting for the recovery passphrase` };
    if (!this.waiting) return { ok: false, text: "unlock: nothing is waiting for a passphrase right now" };
    const give = this.waiting;
    this.waiting = undefined;
    const ok = await new Promise<boolean>((resolve) => {
      this.verdict = resolve;
      give(req.passphrase);
    });
    return ok ? { ok: true, text: "unlocked; the boot continues" } : { ok: false, text: "wrong passphrase" };
  };

  next(): Promise<string> {
    return new Promise((resolve) => (this.waiting = resolve));
  }

  /** True when the last secret came from here (and someone waits for the verdict). */
  report(ok: boolean): boolean {
    const v = this.verdict;
    this.verdict = undefined;
    if (v && ok) this.answeredOk = true;
    v?.(ok);
    return v !== undefined;
  }
}

/** Network, the admin socket and sshd, for as long as the initrd needs a human. */
export class RecoverySidecar {
  private server?: Server;
  private sshd?: Supervised | null;

  /** Starts it with `handle` behind the socket; false when there are no keys or no address to offer. */
  async start(sys: Sys, log: Logger, cold: Coldplug, cfg: AgentConfig, cmdline: Cmdline, handle: CtlHandler): Promise<boolean> {
    if (!cfg.ssh.authorizedKeys.length || !(staticIpFrom(cmdline) || cmdline.ip?.method === "dhcp")) return false;
    try {
      await setupNetwork(sys, log, cold, cmdline, cfg.rootWaitSeconds);
      this.server = startCtl(log, handle);
      this.sshd = startSshd(sys, log, cfg);
      return true;
    } catch (e) {
      log.err(`recovery: no remote unlock: ${describe(e)}`);
      return false;
    }
  }

  stop(): void {
    this.sshd?.stop();
    this.server?.close();
  }
}
