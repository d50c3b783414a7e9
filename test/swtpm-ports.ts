// Loopback ports for a swtpm the tests start with its TCP interface (tpm2-tss's swtpm TCTI,
// which finds the control port at port+1): used by the TPM system test and the attacker's tools.
import { createConnection, createServer } from "node:net";

function canListen(p: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once("error", () => resolve(false));
    s.listen(p, "127.0.0.1", () => s.close(() => resolve(true)));
  });
}

/** Two consecutive free loopback ports: tpm2-tss's swtpm TCTI finds the control port at port+1. */
export async function freePortPair(): Promise<number> {
  for (let i = 0; i < 50; i++) {
    const p = await new Promise<number>((resolve) => {
      const s = createServer();
      s.listen(0, "127.0.0.1", () => {
        const a = s.address();
        s.close(() => resolve(typeof a === "object" && a ? a.port : 0));
      });
    });
    if (p > 0 && p < 65535 && (await canListen(p + 1))) return p;
  }
  throw new Error("no two free consecutive loopback ports");
}

/** Resolves once 127.0.0.1:`p` accepts a connection; throws after `ms`. */
export async function waitForPort(p: number, ms: number): Promise<void> {
  const until = Date.now() + ms;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const c = createConnection(p, "127.0.0.1", () => c.end(() => resolve(true)));
      c.once("error", () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > until) throw new Error(`swtpm did not listen on 127.0.0.1:${p} within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
