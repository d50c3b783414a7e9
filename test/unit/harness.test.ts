// The QEMU harness's own parts that need no QEMU: the arguments it builds for a machine that
// keeps its firmware variables and reboots in place, and the console waits that look at one
// boot's part of a log that accumulates across boots (on a real child process's output).
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, unlinkSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { monitorQuery, parseHostForwards, promptPattern, qemuArgs, spawnLogged, Vm } from "../../qemu/harness.ts";

const dir = mkdtempSync(`${tmpdir()}/initos-harness-`);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const pflash = (args: string[]) => args.filter((a) => a.startsWith("if=pflash"));

describe("qemuArgs", () => {
  const template = `${dir}/template.fd`;
  writeFileSync(template, "pristine vars");

  it("firmware.file: made from the template when missing, then used in place, never overwritten", () => {
    const file = `${dir}/machine-vars.fd`;
    const tmp = mkdtempSync(`${dir}/vm-`);
    const args = qemuArgs({ name: "t", firmware: { vars: template, file } }, tmp);
    expect(pflash(args)[1]).toBe(`if=pflash,format=raw,unit=1,file=${file}`);
    expect(readFileSync(file, "utf8")).toBe("pristine vars");
    expect(existsSync(`${tmp}/vars.fd`)).toBe(false);
    // What the guest wrote (BootOrder, BootNext, Boot####) is what the next start uses.
    writeFileSync(file, "written by the guest");
    const ino = statSync(file).ino;
    qemuArgs({ name: "t", firmware: { vars: template, file } }, mkdtempSync(`${dir}/vm-`));
    expect(readFileSync(file, "utf8")).toBe("written by the guest");
    expect(statSync(file).ino).toBe(ino);
    expect(readFileSync(template, "utf8")).toBe("pristine vars");
  });

  it("without firmware.file: a fresh copy of the template in the VM's temp dir, as before", () => {
    const tmp = mkdtempSync(`${dir}/vm-`);
    const args = qemuArgs({ name: "t", firmware: { vars: template } }, tmp);
    expect(pflash(args)[1]).toBe(`if=pflash,format=raw,unit=1,file=${tmp}/vars.fd`);
    expect(readFileSync(`${tmp}/vars.fd`, "utf8")).toBe("pristine vars");
  });

  it("reboot: no -no-reboot, so a reset continues in the same process; the default keeps it", () => {
    expect(qemuArgs({ name: "t", firmware: { vars: template } }, mkdtempSync(`${dir}/vm-`))).toContain("-no-reboot");
    expect(qemuArgs({ name: "t", firmware: { vars: template }, reboot: true }, mkdtempSync(`${dir}/vm-`))).not.toContain("-no-reboot");
  });

  it("i6300esb only when asked, and never on microvm", () => {
    const direct = { kernel: "k", initrd: "i", append: "" };
    expect(qemuArgs({ name: "t", direct }, dir).join(" ")).not.toContain("i6300esb");
    expect(qemuArgs({ name: "t", direct, i6300esb: true }, dir).join(" ")).toContain("-device i6300esb");
    expect(() => qemuArgs({ name: "t", direct, machine: "microvm", i6300esb: true }, dir)).toThrow(/microvm has no PCI/);
  });
});

/** A "VM" that is a shell script, its output written to its log file as QEMU's is. */
function shVm(name: string, script: string): Vm {
  const log = `${dir}/${name}.log`;
  return new Vm(name, log, spawnLogged("sh", ["-c", script], log), () => {}, `${dir}/none.sock`);
}

describe("Vm: waiting on the output after a mark", () => {
  /** A real process printing two "boots", the second after a pause. */
  function twoBoots(): Vm {
    return shVm("two-boots", "echo 'boot: slot a'; echo 'INITOS-TEST-ROOT up'; sleep 0.5; echo 'boot: slot b'; echo 'INITOS-TEST-ROOT up'");
  }

  it("waitFor with `from` matches only what came after the mark, with indexes relative to it", async () => {
    const vm = twoBoots();
    await vm.waitFor(/INITOS-TEST-ROOT up/, 5000);
    const mark = vm.mark();
    expect(mark).toBeGreaterThan(0);
    // The first boot's line is before the mark: the wait goes on until the second boot's.
    const m = await vm.waitFor(/boot: slot (\w)\n(INITOS-TEST-ROOT up)/, 5000, false, mark);
    expect(m[1]).toBe("b");
    expect(vm.since(mark).slice(m.index!)).toMatch(/^boot: slot b\n/);
    expect(vm.since(mark)).not.toMatch(/slot a/);
    await vm.exited;
  });

  it("a pattern only before the mark is not found after it: the wait fails at the exit, naming the offset", async () => {
    const vm = twoBoots();
    await vm.waitFor(/slot b/, 5000);
    const mark = vm.mark();
    await expect(vm.waitFor(/slot a/, 5000, false, mark)).rejects.toThrow(new RegExp(`VM exited \\(code 0\\) before /slot a/ \\(after output offset ${mark}\\)`));
    expect(await vm.waitFor(/slot a/, 5000)).toBeTruthy();
  });
});

describe("Vm: prompts", () => {
  // Reads a line per answer, as the agent's passphrase prompt does, and prints kernel-like lines
  // after each prompt (no newline before them: the kernel does not know the prompt's line is open).
  const asker = (name: string) =>
    shVm(
      name,
      `for i in 1 2 3; do printf 'Recovery passphrase (attempt %s of 3): ' $i; sleep 0.1; echo '[   12.345678] random: crng init done'; read -r a; echo "got $a"; done; printf 'Reseal? [y/N] '; read -r a; echo "reseal=$a"`,
    );

  it("a $-anchored prompt is found though a kernel line came after it", async () => {
    const vm = asker("prompt-kernel-line");
    await new Promise((r) => setTimeout(r, 400));
    expect(vm.output).toMatch(/attempt 1 of 3\): \[ {3}12\.345678\] random/); // the prompt is not the end of the output
    const m = await vm.waitFor(/Recovery passphrase \(attempt (\d) of 3\): $/, 5000, true);
    expect(m[1]).toBe("1");
    vm.kill();
  });

  it("a prompt already answered is not matched again: the next wait gets the next prompt", async () => {
    const vm = asker("prompt-answered");
    const seen: string[] = [];
    for (let i = 0; i < 3; i++) {
      // The same pattern each time: only the prompt after the last answer matches.
      const m = await vm.waitFor(/Recovery passphrase \(attempt (\d) of 3\): $/, 5000, true);
      seen.push(m[1]!);
      vm.send(`pass${i}\n`);
    }
    expect(seen).toEqual(["1", "2", "3"]);
    await vm.waitFor(/Reseal\? \[y\/N\] $/, 5000, { prompt: true });
    vm.send("y\n");
    await vm.waitFor(/reseal=y/, 5000);
    // Answered, and no new one: a wait for it again fails at the exit instead of matching an old one.
    await expect(vm.waitFor(/Recovery passphrase \(attempt (\d) of 3\): $/, 5000, true)).rejects.toThrow(/VM exited \(code 0\)/);
    expect(vm.output.match(/got pass\d/g)).toEqual(["got pass0", "got pass1", "got pass2"]);
  });

  it("promptPattern drops only a final unescaped $", () => {
    expect(promptPattern(/a: $/).source).toBe("a: ");
    expect(promptPattern(/cost \$/).source).toBe("cost \\$");
    expect(promptPattern(/cost \\$/).source).toBe("cost \\\\");
    expect(promptPattern(/a$/gm).flags).toBe("m");
  });
});

describe("Vm: failOn", () => {
  it("rejects as soon as the failure appears, not at the timeout, quoting it", async () => {
    const vm = shVm("fail-on", "echo 'initos: unlock: TPM did not release the key'; printf 'Recovery passphrase (attempt 1 of 3): '; sleep 30");
    const t = Date.now();
    await expect(vm.waitFor(/INITOS-TEST-ROOT pid=1/, 20_000, { failOn: /Recovery passphrase/ })).rejects.toThrow(/"Recovery passphrase" \(\/Recovery passphrase\/\) while waiting for \/INITOS-TEST-ROOT pid=1\//);
    expect(Date.now() - t).toBeLessThan(5000);
    vm.kill();
  });

  it("only looks after `from`", async () => {
    const vm = shVm("fail-on-from", "echo 'Recovery passphrase (attempt 1 of 3): '; echo second; sleep 0.3; echo 'INITOS-TEST-ROOT pid=1'");
    await vm.waitFor(/second/, 5000);
    const mark = vm.mark();
    await vm.waitFor(/INITOS-TEST-ROOT pid=1/, 5000, { from: mark, failOn: /Recovery passphrase/ });
    await vm.exited;
  });
});

describe("Vm: the console is a file the child writes, not a pipe this process drains", () => {
  // 1 MB of output, far more than a pipe holds (64 KiB), then the time the writer finished.
  const script = (done: string) => `head -c 1000000 /dev/zero | tr '\\0' x; echo; date +%s%N > ${done}`;
  /** Blocks the event loop for `ms`, as a synchronous child (openssl, sbsign, tar) does. */
  const blockLoop = (ms: number) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);

  it("a writer is never held up by this process's busy event loop", async () => {
    const done = `${dir}/writer-done`;
    const start = Date.now();
    const vm = shVm("busy-loop", script(done));
    blockLoop(1500);
    // The writer finished while the loop was blocked: its output did not wait for a reader.
    expect(existsSync(done)).toBe(true);
    expect(Number(readFileSync(done, "utf8")) / 1e6 - start).toBeLessThan(1500);
    await vm.waitFor(/x{1000000}\n/, 5000);
    expect(vm.output.length).toBe(1000001);
  });

  it("control: through a pipe (as before) the same writer stalls until the loop drains it", async () => {
    const done = `${dir}/piped-done`;
    const child = spawn("sh", ["-c", script(done)], { stdio: ["ignore", "pipe", "ignore"] });
    let got = 0;
    child.stdout.on("data", (d: Buffer) => (got += d.length));
    blockLoop(1500);
    expect(existsSync(done)).toBe(false);
    await new Promise((r) => child.on("close", r));
    expect(got).toBe(1000001);
    expect(existsSync(done)).toBe(true);
  });
});

describe("host forwards", () => {
  it("a forward without a host port asks QEMU for port 0 (it binds a free one itself); a given port is kept", () => {
    const direct = { kernel: "k", initrd: "i", append: "" };
    const args = qemuArgs({ name: "t", direct, net: { forward: [{ guest: 15022 }, { host: 2222, guest: 22 }] } }, dir).join(" ");
    expect(args).toContain("user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:0-:15022,hostfwd=tcp:127.0.0.1:2222-:22");
  });
});

describe("parseHostForwards", () => {
  it("reads the host port QEMU bound for each guest port from `info usernet`", () => {
    // As QEMU 7.2 prints it (after the banner and the echoed command).
    const table = [
      "QEMU 7.2.22 monitor - type 'help' for more information",
      "(qemu) info usernet",
      "Hub -1 (net0):",
      "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ",
      "  TCP[HOST_FORWARD]   8       127.0.0.1 33301       10.0.2.15 15022     0     0",
      "  TCP[HOST_FORWARD]   3       127.0.0.1 33957       10.0.2.15    22     0     0",
      "  TCP[ESTABLISHED]   12       127.0.0.1 40000       10.0.2.15 15022     0     0",
      "(qemu) ",
    ].join("\r\n");
    expect([...parseHostForwards(table)]).toEqual([
      [15022, 33301],
      [22, 33957],
    ]);
  });
});

describe("monitorQuery", () => {
  it("waits through a socket that is not there yet and one that refuses (bound, not listening), then gets the answer", async () => {
    const sock = `${dir}/monitor-race.sock`;
    // A socket file nobody listens on: its process was killed (connect: ECONNREFUSED), as QEMU's
    // is between bind() and listen().
    const stale = spawn(process.execPath, ["-e", `require("net").createServer().listen(${JSON.stringify(sock)}, () => console.log("up"))`], { stdio: ["ignore", "pipe", "ignore"] });
    await new Promise((r) => stale.stdout.once("data", r));
    stale.kill("SIGKILL");
    await new Promise((r) => stale.on("exit", r));
    expect(existsSync(sock)).toBe(true);
    const refused = await monitorQuery(sock, "info usernet", { timeoutMs: 100 }).catch((e: NodeJS.ErrnoException) => e.code);
    expect(refused).toBe("ECONNREFUSED");
    // 300 ms later the file goes (ENOENT) and a monitor answers.
    const server = createServer((c) => {
      c.write("QEMU monitor\r\n(qemu) ");
      c.on("data", (d) => c.end(`${d.toString().trim()}\r\nanswer\r\n`));
    });
    setTimeout(() => {
      unlinkSync(sock);
      setTimeout(() => server.listen(sock), 100);
    }, 300);
    const t = Date.now();
    const out = await monitorQuery(sock, "info usernet", { timeoutMs: 5000 });
    expect(out).toContain("info usernet\r\nanswer");
    expect(Date.now() - t).toBeGreaterThanOrEqual(350);
    await new Promise((r) => server.close(r));
  });

  it("stops retrying once the process is gone", async () => {
    const t = Date.now();
    await expect(monitorQuery(`${dir}/never.sock`, "info usernet", { alive: () => Date.now() - t < 200, timeoutMs: 10_000 })).rejects.toThrow(/ENOENT/);
    expect(Date.now() - t).toBeLessThan(2000);
  });
});
