// Jail mode's part of the host config (initos.json at the top of the pool): the machine's /24
// on a bridge, and the jails that run on it. Written by the admin, over ssh; read by PID 1 at
// each boot. Like the rest of the host config it is data from the pool, so every value is
// validated and a bad jail costs that jail (one line naming it and the key), not the others.
import { z } from "zod";
import { zodIssue } from "./errors.ts";

/**
 * A subvolume at the top of the pool, by its plain name: no "/", and no leading "." (so neither
 * "." nor ".."), which btrfs would otherwise take as a path. Shared with `initos.root=` and the
 * host config's root and binds (hostconfig.ts re-exports it).
 */
export const subvolumeName = z.string().regex(/^@?[A-Za-z0-9_-][A-Za-z0-9_.-]*$/, "expected a subvolume name such as @root");

/** Where the unlocked pool stays mounted in jail mode (its top level, subvolid 5). */
export const POOL_MOUNT = "/x";
/** The bridge every jail is attached to; it holds the host's address on the machine's /24. */
export const BRIDGE = "initos0";

/**
 * A jail's name: it becomes a cgroup, a netns file, an interface name ("vj-<name>", and
 * IFNAMSIZ leaves 15 characters) and a subvolume, so it is short and plain.
 */
export const jailName = z.string().regex(/^[a-z][a-z0-9-]{0,10}$/, "expected 1-11 characters: a-z first, then a-z, 0-9 or -");

/** An image's name: its subvolume is @img-<name>. */
export const imageName = jailName;
export const imageSubvolume = (name: string) => `@img-${name}`;
/** The running copy of a jail's image (a snapshot made at each start). */
export const jailSubvolume = (name: string) => `@jail-${name}`;

const ipv4 = z.string().regex(/^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/, "expected an IPv4 address");

/** A path inside the jail: absolute, no "." or ".." components. */
const jailPath = z
  .string()
  .regex(/^\/[\w./-]*$/, "expected an absolute path")
  .refine((p) => !p.split("/").some((c) => c === "." || c === ".."), '"." and ".." are not allowed')
  .refine((p) => p.split("/").some(Boolean), "expected a directory below the root, e.g. /data");

/** A directory inside a subvolume: relative, no "." or ".." components. */
const subdir = z
  .string()
  .regex(/^[\w.-][\w./-]*$/, "expected a relative path")
  .refine((p) => !p.split("/").some((c) => c === "." || c === ".."), '"." and ".." are not allowed');

const ShareSchema = z
  .object({
    /** A subvolume at the top of the pool... */
    subvol: subvolumeName,
    /** ...or a directory in it (resolved inside the subvolume, never through a symlink). */
    dir: subdir.optional(),
    /** Where the jail sees it. */
    path: jailPath,
    readOnly: z.boolean().default(false),
  })
  .strict();
export type JailShare = z.output<typeof ShareSchema>;

/** "64M", "1G", or a number of MiB. */
const memory = z.union([
  z.number().int().min(16).max(1 << 20),
  z
    .string()
    .regex(/^\d+[MG]$/, 'expected a size such as "256M" or "2G"')
    .transform((s) => Number(s.slice(0, -1)) * (s.endsWith("G") ? 1024 : 1))
    .pipe(z.number().int().min(16, "at least 16M").max(1 << 20)),
]);

/** The first uid/gid of a jail's range when the config gives none (see idBase). */
const ID_RANGE = 65536;
/** Ranges start here: below are the host's own users (the pool's files keep their owners). */
const FIRST_RANGE = 16;
const RANGES = 60000;

const JailSchema = z
  .object({
    name: jailName,
    kind: z.enum(["container", "vm"]),
    /** The image it runs: subvolume @img-<image>, made by `image import`. */
    image: imageName,
    cpus: z.number().positive().max(256).default(1),
    memory: memory.default(256),
    /** Its address on the machine's /24 (the bridge's network). */
    address: ipv4,
    shares: z.array(ShareSchema).max(16).default([]),
    /** What runs as its PID 1: for a container its init or an app; default: the image's own. */
    command: z.array(z.string().min(1).max(4096)).min(1).max(256).optional(),
    env: z.record(z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, "expected an environment variable name"), z.string().max(4096)).optional(),
    /** A TCP port the host connects to over the bridge to tell whether the jail answers. */
    probe: z.number().int().min(1).max(65535).optional(),
    /** The first host uid/gid of its 65536 ids (containers); default: derived from the name. */
    ids: z.number().int().min(FIRST_RANGE * ID_RANGE).max((FIRST_RANGE + RANGES) * ID_RANGE).multipleOf(ID_RANGE).optional(),
  })
  .strict();

export interface Jail {
  name: string;
  kind: "container" | "vm";
  image: string;
  cpus: number;
  memoryMiB: number;
  address: string;
  shares: JailShare[];
  command?: string[];
  env: Record<string, string>;
  probe?: number;
  /** The first host uid (and gid) that the jail's ids 0..65535 map to. */
  idBase: number;
}

/** The machine's /24: the bridge's address (the jails' gateway). */
const NetworkSchema = z
  .object({
    address: z
      .string()
      .regex(/^[\d.]+\/24$/, "expected the host's address on the machine's /24, e.g. 10.77.0.1/24")
      .refine((a) => ipv4.safeParse(a.slice(0, -3)).success, "expected an IPv4 address before /24"),
  })
  .strict();

export interface JailNetwork {
  bridge: string;
  /** The host's address on the bridge: every jail's default gateway. */
  address: string;
  prefix: 24;
}

export interface JailsConfig {
  network: JailNetwork;
  jails: Jail[];
  /** One line per jail entry that was refused (already says it does not run), for the log. */
  refused: string[];
}

/** The FNV-1a hash of the name picks its range: stable whatever the order of the config. */
export function idBase(name: string): number {
  let h = 0x811c9dc5;
  for (const ch of Buffer.from(name)) h = Math.imul(h ^ ch, 0x01000193) >>> 0;
  return (FIRST_RANGE + (h % RANGES)) * ID_RANGE;
}

const net24 = (a: string) => a.split(".").slice(0, 3).join(".");

/**
 * The `network` and `jails` keys of the host config. A jail entry that does not parse, or that
 * collides with one before it (name, address, id range), is refused with one line and the rest
 * run; a bad `network` refuses every jail (none could be reached).
 */
export function parseJails(file: string, network: unknown, entries: readonly unknown[]): JailsConfig {
  const refused: string[] = [];
  const n = NetworkSchema.safeParse(network);
  if (!n.success) {
    const why = network === undefined ? "network: required with jails" : `network.${zodIssue(n.error, "(value)")}`;
    return { network: { bridge: BRIDGE, address: "", prefix: 24 }, jails: [], refused: [`host config ${file}: ${why}; no jail runs`] };
  }
  const host = n.data.address.slice(0, -3);
  const jails: Jail[] = [];
  entries.forEach((entry, i) => {
    const shown = (JSON.stringify(entry) ?? String(entry)).slice(0, 120);
    const refuse = (why: string) => refused.push(`host config ${file}: refused jails.${i} ${shown}: ${why}; not started`);
    const r = JailSchema.safeParse(entry);
    if (!r.success) return refuse(zodIssue(r.error, "(entry)"));
    const j = r.data;
    const jail: Jail = {
      name: j.name,
      kind: j.kind,
      image: j.image,
      cpus: j.cpus,
      memoryMiB: j.memory,
      address: j.address,
      shares: j.shares,
      command: j.command,
      env: j.env ?? {},
      probe: j.probe,
      idBase: j.ids ?? idBase(j.name),
    };
    if (net24(jail.address) !== net24(host)) return refuse(`address: ${jail.address} is not on the machine's /24 (${net24(host)}.0/24)`);
    if (jail.address === host || /\.(0|255)$/.test(jail.address)) return refuse(`address: ${jail.address} is the host's, the network's or the broadcast address`);
    const clash = jails.find((o) => o.name === jail.name || o.address === jail.address || o.idBase === jail.idBase);
    if (clash) {
      const what = clash.name === jail.name ? "name" : clash.address === jail.address ? "address" : "id range (set \"ids\")";
      return refuse(`${what} already used by jail ${clash.name}`);
    }
    jails.push(jail);
  });
  return { network: { bridge: BRIDGE, address: host, prefix: 24 }, jails, refused };
}
