// The UKI's PCR signature (.pcrsig) is byte for byte what systemd-measure sign writes, which
// needs a TPM: a swtpm on loopback. The rest of the signature's tests need none and are in
// test/unit/measure.test.ts.
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { pcrSignature, SYSTEMD_MEASURE } from "../../initrd/measure.ts";
import { measuredParts } from "../measured-parts.ts";

const dir = mkdtempSync(`${tmpdir()}/initos-measure-`);
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const openssl = (...args: string[]) => execFileSync("openssl", args, { stdio: ["ignore", "pipe", "pipe"] });
openssl("genrsa", "-out", `${dir}/pcr.key`, "2048");
openssl("pkey", "-in", `${dir}/pcr.key`, "-pubout", "-out", `${dir}/pcr.pub.pem`);

const parts = measuredParts(dir);

/** Whether process `pid` holds the socket listening on 127.0.0.1:`port` (so it is ours). */
function listensOn(pid: number, port: number): boolean {
  const want = `0100007F:${port.toString(16).toUpperCase().padStart(4, "0")}`;
  const inodes = new Set(
    readFileSync("/proc/net/tcp", "utf8")
      .split("\n")
      .slice(1)
      .map((l) => l.trim().split(/\s+/))
      .filter((f) => f[1] === want && f[3] === "0A")
      .map((f) => f[9]),
  );
  try {
    return readdirSync(`/proc/${pid}/fd`).some((fd) => {
      try {
        const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
        return m !== null && inodes.has(m[1]);
      } catch {
        return false;
      }
    });
  } catch {
    return false;
  }
}

const portFree = (port: number) =>
  new Promise<boolean>((resolve) => {
    const s = createServer();
    s.once("error", () => resolve(false));
    s.listen(port, "127.0.0.1", () => s.close(() => resolve(true)));
  });

/** A fresh swtpm on loopback, on a port pair it verifiably owns (other swtpms may be running). */
async function startSwtpm(state: string): Promise<{ proc: ChildProcess; port: number }> {
  for (let attempt = 0; attempt < 20; attempt++) {
    const port = 20_000 + 2 * Math.floor(Math.random() * 20_000);
    if (!(await portFree(port)) || !(await portFree(port + 1))) continue;
    const proc = spawn(
      "swtpm",
      ["socket", "--tpm2", "--tpmstate", `dir=${state}`, "--server", `type=tcp,port=${port},bindaddr=127.0.0.1`, "--ctrl", `type=tcp,port=${port + 1},bindaddr=127.0.0.1`, "--flags", "not-need-init,startup-clear"],
      { stdio: "ignore" },
    );
    for (let i = 0; i < 100 && proc.exitCode === null; i++) {
      if (listensOn(proc.pid!, port) && listensOn(proc.pid!, port + 1)) return { proc, port };
      await sleep(50);
    }
    proc.kill();
  }
  throw new Error("could not start a swtpm on a free loopback port");
}

describe("PCR signature vs systemd-measure sign", () => {
  let tpm: { proc: ChildProcess; port: number } | undefined;
  beforeAll(async () => {
    mkdirSync(`${dir}/tpm`);
    tpm = await startSwtpm(`${dir}/tpm`);
  });
  afterAll(() => {
    tpm?.proc.kill();
  });

  it("is byte for byte what systemd-measure sign --phase=enter-initrd writes", () => {
    const ours = pcrSignature(parts, `${dir}/pcr.key`);
    const theirs = execFileSync(
      SYSTEMD_MEASURE,
      [
        "sign",
        `--linux=${parts.linux}`,
        `--initrd=${parts.initrd}`,
        `--cmdline=${parts.cmdline}`,
        `--osrel=${parts.osrel}`,
        `--pcrpkey=${parts.pcrpkey}`,
        "--bank=sha256",
        "--phase=enter-initrd",
        `--private-key=${dir}/pcr.key`,
        `--public-key=${parts.pcrpkey}`,
        `--tpm2-device=swtpm:host=127.0.0.1,port=${tpm!.port}`,
        "--json=short",
      ],
      { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] },
    );
    expect(JSON.parse(ours)).toEqual(JSON.parse(theirs));
    expect(ours).toBe(theirs.trim());
    // Only the enter-initrd phase: after leave-initrd nothing matches.
    const entries = (JSON.parse(ours) as { sha256: { pcrs: number[] }[] }).sha256;
    expect(entries).toHaveLength(1);
    expect(entries[0]!.pcrs).toEqual([11]);
  });
});
