// The host config's jails (agent/jailsconfig.ts): each entry checked on its own, clashes
// refused with the earlier jail named, id ranges stable whatever the order, and a config that
// names neither a root nor jails refused whole.
import { describe, expect, it } from "vitest";
import { idBase, parseJails } from "../../agent/jailsconfig.ts";
import { parseHostJson } from "../../agent/hostconfig.ts";

const NET = { address: "10.77.0.1/24" };
const web = { name: "web", kind: "container", image: "web", address: "10.77.0.10" };

describe("jails in the host config", () => {
  it("defaults: 1 cpu, 256 MiB, no shares, the id range from the name; sizes in M or G", () => {
    const c = parseJails("initos.json", NET, [web, { ...web, name: "db", address: "10.77.0.11", memory: "2G", cpus: 0.5 }]);
    expect(c.refused).toEqual([]);
    expect(c.network).toEqual({ bridge: "initos0", address: "10.77.0.1", prefix: 24 });
    expect(c.jails[0]).toEqual({ name: "web", kind: "container", image: "web", cpus: 1, memoryMiB: 256, address: "10.77.0.10", shares: [], command: undefined, env: {}, probe: undefined, idBase: idBase("web") });
    expect([c.jails[1]!.memoryMiB, c.jails[1]!.cpus]).toEqual([2048, 0.5]);
  });

  it("the id range depends on the name only: 65536-aligned, above the host's own ids, the same in any order", () => {
    for (const n of ["web", "db", "a", "zzzzzzzzzzz"]) {
      expect(idBase(n) % 65536).toBe(0);
      expect(idBase(n)).toBeGreaterThanOrEqual(16 * 65536);
    }
    const a = parseJails("f", NET, [web, { ...web, name: "db", address: "10.77.0.11" }]).jails.map((j) => j.idBase);
    const b = parseJails("f", NET, [{ ...web, name: "db", address: "10.77.0.11" }, web]).jails.map((j) => j.idBase);
    expect(a).toEqual([...b].reverse());
  });

  it("a bad or clashing entry costs that jail, one line naming it and the key; the others run", () => {
    const c = parseJails("initos.json", NET, [
      web,
      { ...web, address: "10.77.0.12" }, // the name again
      { ...web, name: "db" }, // the address again
      { ...web, name: "ids", address: "10.77.0.13", ids: idBase("web") }, // the range again
      { ...web, name: "Bad", address: "10.77.0.14" },
      { ...web, name: "gw", address: "10.77.0.1" },
      { ...web, name: "far", address: "10.78.0.2" },
      { ...web, name: "sh", address: "10.77.0.15", shares: [{ subvol: "@d", dir: "..", path: "/d" }] },
      { ...web, name: "ok", address: "10.77.0.16" },
    ]);
    expect(c.jails.map((j) => j.name)).toEqual(["web", "ok"]);
    expect(c.refused.map((l) => l.replace(/ \{.*\}: /, ": "))).toEqual([
      "host config initos.json: refused jails.1: name already used by jail web; not started",
      "host config initos.json: refused jails.2: address already used by jail web; not started",
      'host config initos.json: refused jails.3: id range (set "ids") already used by jail web; not started',
      "host config initos.json: refused jails.4: name: expected 1-11 characters: a-z first, then a-z, 0-9 or -; not started",
      "host config initos.json: refused jails.5: address: 10.77.0.1 is the host's, the network's or the broadcast address; not started",
      "host config initos.json: refused jails.6: address: 10.78.0.2 is not on the machine's /24 (10.77.0.0/24); not started",
      'host config initos.json: refused jails.7: shares.0.dir: "." and ".." are not allowed; not started',
    ]);
  });

  it("no network, or a bad one: no jail runs, one line", () => {
    expect(parseJails("initos.json", undefined, [web]).refused).toEqual(["host config initos.json: network: required with jails; no jail runs"]);
    expect(parseJails("initos.json", { address: "10.77.0.1/16" }, [web]).jails).toEqual([]);
  });

  it("the host config names a root, or jails, or is refused whole", () => {
    expect(parseHostJson(JSON.stringify({ network: NET, jails: [web] })).root).toBeUndefined();
    expect(parseHostJson(JSON.stringify({ network: NET, jails: [web] })).jails?.jails.map((j) => j.name)).toEqual(["web"]);
    expect(parseHostJson(JSON.stringify({ root: "@root" })).jails).toBeUndefined();
    expect(() => parseHostJson("{}")).toThrow("host config initos.json: root: expected root (a subvolume to boot) or jails");
  });
});
