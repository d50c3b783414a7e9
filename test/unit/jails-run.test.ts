// The jail supervisor (agent/jails/run.ts) on the fake machine, with fake launchers: every jail
// starts, a jail that cannot be prepared costs that jail only, a death is restarted, stop asks
// then cleans up, status says what the host sees, and the admin rows answer.
import { describe, expect, it } from "vitest";
import { parseJails } from "../../agent/jailsconfig.ts";
import { type ImageStore, Jails, type Launcher } from "../../agent/jails/run.ts";
import type { Jail } from "../../agent/jailsconfig.ts";
import { hostConfigFile } from "../../agent/jails/hostfile.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

const flush = () => new Promise((r) => setTimeout(r, 0));

const CONFIG = parseJails(
  "initos.json",
  { address: "10.77.0.1/24" },
  [
    { name: "web", kind: "container", image: "web", address: "10.77.0.10", memory: "64M", probe: 8080 },
    { name: "db", kind: "container", image: "db", address: "10.77.0.11" },
    { name: "vm1", kind: "vm", image: "web", address: "10.77.0.12" },
  ],
);

function machine(failing: string[] = []) {
  const s = new FakeSys().addProcess({ pid: 1, ppid: 0, sid: 0, comm: "initos-agent" });
  const log = silentLog();
  const events: string[] = [];
  const launcher = (kind: string): Launcher => ({
    async prepare(jail: Jail) {
      events.push(`prepare ${jail.name}`);
      if (failing.includes(jail.name)) throw new Error(`image ${jail.image} is not imported (image import ${jail.image})`);
      return { name: jail.name, argv: [`/run/initos/images/tools/usr/bin/${kind}`, jail.name], beforeStart: () => void events.push(`before ${jail.name}`) };
    },
    async cleanup(jail: Jail) {
      events.push(`cleanup ${jail.name}`);
    },
  });
  const images: ImageStore = {
    importImage: async (name) => `image ${name}: imported`,
    list: () => "web  sha256:0123456789ab  3.0 MiB  2026-11-30T22:00:00Z",
    remove: (name, inUse) => {
      if (inUse(name)) throw new Error(`image ${name}: in use by a running jail`);
      return `image ${name}: removed`;
    },
  };
  const jails = new Jails(s, log, CONFIG, { container: launcher("crun"), vm: launcher("qemu") }, images, hostConfigFile(s, log, "/x"));
  return { s, log, events, jails };
}

const running = (s: FakeSys, name: string) => [...s.services.entries()].find(([, v]) => v.argv.at(-1) === name)?.[0];

describe("jail mode's supervisor", () => {
  it("starts every jail; one that cannot be prepared is one line and the others run", async () => {
    const { s, log, events, jails } = machine(["db"]);
    await jails.startAll();
    expect(events).toEqual(["prepare web", "before web", "prepare db", "cleanup db", "prepare vm1", "before vm1"]);
    expect(log.lines).toContain("err: jail db: not started: image db is not imported (image import db)");
    expect(running(s, "web")).toBeDefined();
    expect(running(s, "vm1")).toBeDefined();
    expect(running(s, "db")).toBeUndefined();
    const status = await jails.status();
    expect(status).toMatch(/^db: container 10\.77\.0\.11, image db: stopped \(start failed: image db is not imported/m);
  });

  it("a jail that dies is restarted after the backoff, its runtime's leftovers cleared first", async () => {
    const { s, log, events, jails } = machine();
    await jails.startAll();
    const pid = running(s, "web")!;
    s.endProcess(pid, "killed by SIGKILL");
    await flush();
    expect(log.lines).toContain("warn: supervise: jail web killed by SIGKILL; restarting in 1s");
    s.advance(1000);
    expect(events.filter((e) => e === "before web")).toHaveLength(2);
    const again = running(s, "web")!;
    expect(again).not.toBe(pid);
    expect(await jails.status()).toMatch(new RegExp(`^web: container 10\\.77\\.0\\.10, image web: running, pid ${again}, up 0s, restarts 1 \\(last: killed by SIGKILL\\)$`, "m"));
  });

  it("status shows the init's pid namespace and uid map, the memory and OOM kills, the probe's answer", async () => {
    const { s, jails } = machine();
    await jails.startAll();
    const cg = "/sys/fs/cgroup/initos/web";
    s.writeFile(`${cg}/run/cgroup.procs`, "801\n802\n");
    s.writeFile("/proc/801/status", "Name:\tcrun\nNSpid:\t801\n");
    s.writeFile("/proc/802/status", "Name:\tsh\nNSpid:\t802\t1\n");
    s.writeFile("/proc/802/uid_map", "         0    4849664      65536\n");
    s.writeFile(`${cg}/memory.current`, "1048576\n");
    s.writeFile(`${cg}/run/memory.max`, "67108864\n");
    s.writeFile(`${cg}/memory.events`, "low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n");
    s.probes.set("10.77.0.10:8080", "HTTP/1.0 200 OK");
    const status = await jails.status();
    expect(status).toContain("web: init pid 802 is pid 1 in its namespace; uid 0 inside is uid 4849664 outside (65536 ids)");
    expect(status).toContain("web: memory 1.0 MiB of 64.0 MiB, oom kills 1");
    expect(status).toContain('web: probe 10.77.0.10:8080 answered: "HTTP/1.0 200 OK"');
  });

  it("jail stop stops and cleans up; start again; unknown names are refused with the list", async () => {
    const { s, events, jails } = machine();
    await jails.startAll();
    const admin = jails.admin();
    const stopping = admin.jail("stop", "web");
    for (let i = 0; i < 5 && running(s, "web"); i++) {
      await flush();
      s.advance(50);
    }
    expect(await stopping).toEqual({ ok: true, text: "jail web: stopped" });
    expect(events).toContain("cleanup web");
    expect(running(s, "web")).toBeUndefined();
    expect(await admin.jail("start", "web")).toEqual({ ok: true, text: "jail web: started" });
    expect(await admin.jail("start", "web")).toEqual({ ok: true, text: "jail web: already running" });
    expect(await admin.jail("start", "nope")).toEqual({ ok: false, text: "jail nope: not in the host config (jails: web, db, vm1)" });
  });

  it("image rows: list, import, and rm refused while a running jail uses the image", async () => {
    const { jails } = machine();
    await jails.startAll();
    const admin = jails.admin();
    const empty = (async function* () {})();
    expect(await admin.image("list", undefined, empty)).toEqual({ ok: true, text: "web  sha256:0123456789ab  3.0 MiB  2026-11-30T22:00:00Z" });
    expect(await admin.image("import", "web", empty)).toEqual({ ok: true, text: "image web: imported" });
    await expect(admin.image("rm", "web", empty)).rejects.toThrow("image web: in use by a running jail");
    expect(await admin.image("rm", undefined, empty)).toEqual({ ok: false, text: "image rm: give the image's name" });
  });

  it("hostconfig set checks the new file with the boot's parser, refuses it whole for any refused entry, else writes it for the next boot", async () => {
    const { s, jails } = machine();
    const admin = jails.admin();
    const body = (o: unknown) => (async function* () { yield Buffer.from(JSON.stringify(o)); })();
    s.add("/x", { kind: "dir" });
    const good = { network: { address: "10.77.0.1/24" }, jails: [{ name: "web", kind: "container", image: "web", address: "10.77.0.10" }] };
    expect(await admin.hostConfig("set", body(good))).toEqual({ ok: true, text: "hostconfig: initos.json written (1 jail(s): web); it applies at the next boot" });
    expect(JSON.parse(s.readFile("/x/initos.json")!)).toEqual(good);
    expect((await admin.hostConfig("show", body(null))).text).toBe(JSON.stringify(good));
    const bad = { ...good, jails: [...good.jails, { name: "db", kind: "container", image: "db", address: "10.9.9.9" }] };
    await expect(admin.hostConfig("set", body(bad))).rejects.toThrow(/^hostconfig set: refused: host config initos\.json: refused jails\.1 .*address: 10\.9\.9\.9 is not on the machine's \/24 \(10\.77\.0\.0\/24\)$/);
    await expect(admin.hostConfig("set", (async function* () { yield Buffer.from("{"); })())).rejects.toThrow(/^hostconfig set: refused: host config initos\.json: not JSON/);
    expect(JSON.parse(s.readFile("/x/initos.json")!)).toEqual(good);
  });

  it("hostconfig show reads initos.json as the boot does (a FIFO is refused, not waited for); set never writes through a name left in its way", async () => {
    const { s, jails } = machine();
    const admin = jails.admin();
    s.add("/x", { kind: "dir" }).add("/x/initos.json", { kind: "fifo" });
    await expect(admin.hostConfig("show", (async function* () {})())).rejects.toThrow("hostconfig: refused initos.json on the pool: a FIFO, not a regular file");
    s.add("/x/.initos.json.new", { kind: "link", target: "/usr/bin/initos-agent" });
    const good = { network: { address: "10.77.0.1/24" }, jails: [] };
    await admin.hostConfig("set", (async function* () { yield Buffer.from(JSON.stringify(good)); })());
    expect(s.calls.indexOf("unlink /x/.initos.json.new")).toBeLessThan(s.calls.indexOf("writeFile /x/.initos.json.new"));
    expect(JSON.parse(s.readFile("/x/initos.json")!)).toEqual(good);
  });
});
