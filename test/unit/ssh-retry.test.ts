// sshWhenUp's retries (qemu/ssh.ts), with the real OpenSSH client against local TCP servers that
// end the connection where a guest's sshd can: before the SSH identification exchange (QEMU's
// forward accepted, nothing listens in the guest yet), and after it began (the server had the
// connection, so an `unlock` may have reached it).
import { createServer, type Server, type Socket } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { isIdempotent, retryable, sshWhenUp } from "../../qemu/ssh.ts";

let server: Server | undefined;
afterEach(() => new Promise<void>((r) => (server ? server.close(() => r()) : r())));

/** A server on a free port; `conn` is called for each connection; counts them. */
async function serve(conn: (s: Socket) => void): Promise<{ port: number; count: () => number }> {
  let n = 0;
  server = createServer((s) => {
    n++;
    s.on("error", () => {});
    conn(s);
  });
  await new Promise<void>((r) => server!.listen(0, "127.0.0.1", r));
  return { port: (server.address() as { port: number }).port, count: () => n };
}
/** Closes before any banner: as a guest with no sshd behind QEMU's forward. */
const beforeBanner = (s: Socket) => s.destroy();
/** Sends a banner, then closes once the client speaks: the exchange had begun. */
const afterBanner = (s: Socket) => {
  s.write("SSH-2.0-OpenSSH_9.2p1 test\r\n");
  s.once("data", () => s.destroy());
};
const retry = { attempts: 3, delayMs: 50 };

describe("sshWhenUp", () => {
  it("retries any command while the connection ends before the identification exchange", async () => {
    const { port, count } = await serve(beforeBanner);
    await expect(sshWhenUp(port, "unlock", { input: "x\n" }, retry)).rejects.toThrow(/never answered "unlock" in 3 attempts; last: kex_exchange_identification/);
    expect(count()).toBe(3);
  });

  it("does not send unlock, reseal or switch-root again after a connection closed once the exchange began", async () => {
    for (const command of ["unlock", "reseal", "switch-root"]) {
      const { port, count } = await serve(afterBanner);
      const r = await sshWhenUp(port, command, { input: "x\n" }, retry);
      expect(r.status).toBe(255);
      expect(r.stderr).toMatch(/Connection (closed|reset)/);
      expect(count()).toBe(1);
      await new Promise<void>((res) => server!.close(() => res()));
      server = undefined;
    }
  });

  it("sends an idempotent command (status) again after the same closed connection", async () => {
    const { port, count } = await serve(afterBanner);
    await expect(sshWhenUp(port, "status", {}, retry)).rejects.toThrow(/never answered "status" in 3 attempts/);
    expect(count()).toBe(3);
  });
});

describe("retryable / isIdempotent", () => {
  it("classifies ssh's messages and the admin commands", () => {
    expect(retryable("kex_exchange_identification: read: Connection reset by peer\r\n", false)).toBe(true);
    expect(retryable("ssh: connect to host 127.0.0.1 port 2: Connection refused\r\n", false)).toBe(true);
    expect(retryable("Connection closed by 127.0.0.1 port 40000\r\n", false)).toBe(false);
    expect(retryable("Connection closed by 127.0.0.1 port 40000\r\n", true)).toBe(true);
    expect(retryable("Host key verification failed.\r\n", true)).toBe(false);
    expect(["status", "log", "jails", "image list", "hostconfig show"].every(isIdempotent)).toBe(true);
    expect(["unlock", "reseal", "switch-root", "update", "reboot", "poweroff", "jail start web", "image import web", "hostconfig set", "commit"].some(isIdempotent)).toBe(false);
  });
});
