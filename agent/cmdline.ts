// The kernel command line: the agent's only input besides the signed config. Every known key is
// validated with zod; a malformed value is reported in one line naming the key and the value,
// and the safe default is used instead, so a typo never stops the machine from booting.
import { z } from "zod";
import { subvolumeName } from "./hostconfig.ts";

export const MODES = ["host", "vm", "sidecar", "install"] as const;
export type Mode = (typeof MODES)[number];

const ipv4 = z.string().regex(/^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/, "expected an IPv4 address");
const cidr4 = z
  .string()
  .regex(/^[^/]+\/(3[0-2]|[12]?\d)$/, "expected address/prefix, e.g. 10.0.2.15/24")
  .refine((s) => ipv4.safeParse(s.split("/")[0]).success, "expected address/prefix, e.g. 10.0.2.15/24");
const seconds = (max: number) =>
  z
    .string()
    .regex(/^\d+$/, `expected whole seconds 0-${max}`)
    .transform(Number)
    .refine((n) => n <= max, `expected whole seconds 0-${max}`);
const bool01 = z.enum(["0", "1", "yes", "no", "true", "false"]).transform((v) => v === "1" || v === "yes" || v === "true");
const devSpec = z
  .string()
  .regex(/^(\/dev\/[^\s]+|(LABEL|UUID|PARTUUID|PARTLABEL)=[^\s]+)$/, "expected /dev/..., LABEL=, UUID=, PARTUUID= or PARTLABEL=");
const absPath = z.string().regex(/^\/[^\s]*$/, "expected an absolute path");

/** Kernel `ip=` (Documentation/admin-guide/nfs/nfsroot.rst): either a method or the colon form. */
export interface KernelIp {
  method: "off" | "dhcp" | "static";
  client?: string;
  gateway?: string;
  netmask?: string;
  hostname?: string;
  device?: string;
  dns: string[];
}
const kernelIp = z.string().transform((v, ctx): KernelIp => {
  const methods: Record<string, KernelIp["method"]> = { off: "off", none: "off", dhcp: "dhcp", on: "dhcp", any: "dhcp", both: "dhcp" };
  if (methods[v]) return { method: methods[v], dns: [] };
  const f = v.split(":");
  if (f.length < 2) {
    ctx.addIssue({ code: "custom", message: "expected dhcp, off, or client:server:gw:netmask:hostname:device:autoconf[:dns0:dns1]" });
    return z.NEVER;
  }
  const [client, , gateway, netmask, hostname, device, autoconf, dns0, dns1] = f;
  for (const [name, val] of [["client", client], ["gateway", gateway], ["netmask", netmask], ["dns0", dns0], ["dns1", dns1]] as const) {
    if (val && !ipv4.safeParse(val).success) {
      ctx.addIssue({ code: "custom", message: `${name} ${JSON.stringify(val)} is not an IPv4 address` });
      return z.NEVER;
    }
  }
  const auto = autoconf ? (methods[autoconf] ?? "static") : "static";
  return {
    method: client ? "static" : auto,
    client: client || undefined,
    gateway: gateway || undefined,
    netmask: netmask || undefined,
    hostname: hostname || undefined,
    device: device || undefined,
    dns: [dns0, dns1].filter((d): d is string => !!d),
  };
});

/** Each known key: its schema and the value used when it is absent or malformed. */
const KEYS = {
  root: { schema: devSpec, fallback: undefined },
  rootfstype: { schema: z.string().regex(/^[a-z0-9_]+(,[a-z0-9_]+)*$/, "expected a filesystem type, e.g. btrfs"), fallback: undefined },
  rootflags: { schema: z.string().min(1).regex(/^\S+$/, "expected comma-separated mount options"), fallback: undefined },
  init: { schema: absPath, fallback: undefined },
  panic: { schema: z.string().regex(/^-?\d+$/, "expected whole seconds").transform(Number), fallback: undefined },
  ip: { schema: kernelIp, fallback: undefined },
  xip: { schema: cidr4, fallback: undefined },
  "initos.mode": { schema: z.enum(MODES), fallback: undefined },
  "initos.rootwait": { schema: seconds(3600), fallback: undefined },
  "initos.reboot_delay": { schema: seconds(86400), fallback: undefined },
  "initos.ip": { schema: cidr4, fallback: undefined },
  "initos.gw": { schema: ipv4, fallback: undefined },
  "initos.if": { schema: z.string().regex(/^([\w.-]{1,15}|([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2})$/, "expected an interface name or a MAC address"), fallback: undefined },
  "initos.insecure": { schema: bool01, fallback: false },
  "initos.latchcheck": { schema: bool01, fallback: false },
  // A plain name at the top of the pool, as in the host config: no ".", "..", "/" or leading dot.
  "initos.root": { schema: subvolumeName, fallback: undefined },
  "initos.sidecar": { schema: bool01, fallback: undefined },
  "initos.share": { schema: z.string().regex(/^[\w.-]{1,36}(:\/[\w./-]*)?$/, "expected a share tag, optionally :/mountpoint, e.g. z or z:/z"), fallback: undefined },
  "initos.disks": { schema: z.string().regex(/^\/dev\/[\w/-]+:\/[\w./-]*(,\/dev\/[\w/-]+:\/[\w./-]*)*$/, "expected /dev/DISK:/mountpoint[,...], e.g. /dev/vdb:/x"), fallback: undefined },
  "initos.hostname": { schema: z.string().regex(/^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$/, "expected a host name (letters, digits, -)"), fallback: undefined },
} as const;
type Keys = typeof KEYS;
type Parsed<K extends keyof Keys> = z.output<Keys[K]["schema"]> | Keys[K]["fallback"];

export interface Cmdline {
  root?: string;
  rootfstype?: string;
  rootflags?: string;
  init?: string;
  /** The kernel's default is read-only root unless `rw` is given. */
  rw: boolean;
  quiet: boolean;
  debug: boolean;
  panic?: number;
  ip?: KernelIp;
  mode?: Mode;
  rootWaitSeconds?: number;
  rebootDelaySeconds?: number;
  /** Static address for VMs: `initos.ip=` or its InitOS alias `xip=`. */
  staticIp?: string;
  gateway?: string;
  /** The interface for initos.ip, by name or MAC (the kernel's ip= cannot hold a MAC). */
  netInterface?: string;
  insecure: boolean;
  /** Root subvolume of the encrypted pool, instead of the host config's (e.g. a snapshot). */
  rootSubvolume?: string;
  /** After unlocking, prove the TPM latch: a second unseal must fail. */
  latchCheck: boolean;
  /** Keep the sidecar (sshd + admin commands) running beside the OS after switch_root. */
  sidecarBeside?: boolean;
  /** vm mode: the virtiofs/9p share `tag[:/mountpoint]` (mounted on /z unless said). */
  share?: string;
  /** vm mode: extra disks, `/dev/vdb:/x,...`, mounted in the root. */
  disks?: string;
  hostname?: string;
  /** Everything after `--`: the app (or the root init's extra arguments). */
  app: string[];
}

export interface CmdlineResult {
  cmdline: Cmdline;
  /** One line per malformed known key, ready to log. */
  errors: string[];
}

/** Splits like the kernel does: whitespace separates, double quotes group and are removed. */
export function tokenize(text: string): string[] {
  const out: string[] = [];
  let cur = "";
  let inQuote = false;
  let has = false;
  for (const ch of text) {
    if (ch === '"') {
      inQuote = !inQuote;
      has = true;
    } else if (!inQuote && /\s/.test(ch)) {
      if (has) out.push(cur);
      cur = "";
      has = false;
    } else {
      cur += ch;
      has = true;
    }
  }
  if (has) out.push(cur);
  return out;
}

export function parseCmdline(text: string): CmdlineResult {
  const tokens = tokenize(text);
  const dash = tokens.indexOf("--");
  const params = dash >= 0 ? tokens.slice(0, dash) : tokens;
  const app = dash >= 0 ? tokens.slice(dash + 1) : [];

  const raw = new Map<string, string>();
  const flags = new Set<string>();
  for (const t of params) {
    const eq = t.indexOf("=");
    // The kernel lets the last occurrence win; so do we.
    if (eq < 0) flags.add(t);
    else raw.set(t.slice(0, eq), t.slice(eq + 1));
  }

  const errors: string[] = [];
  const get = <K extends keyof Keys>(key: K): Parsed<K> => {
    const { schema, fallback } = KEYS[key];
    const v = raw.get(key);
    if (v === undefined) return fallback;
    const r = (schema as z.ZodType).safeParse(v);
    if (r.success) return r.data as Parsed<K>;
    const why = r.error.issues[0]?.message ?? "invalid";
    errors.push(`cmdline: ${key}=${JSON.stringify(v)} is invalid (${why}); using ${fallback === undefined ? "the default" : JSON.stringify(fallback)}`);
    return fallback;
  };

  const ip = get("ip");
  const cmdline: Cmdline = {
    root: get("root"),
    rootfstype: get("rootfstype"),
    rootflags: get("rootflags"),
    init: get("init"),
    rw: flags.has("rw") && !(flags.has("ro") && params.lastIndexOf("ro") > params.lastIndexOf("rw")),
    quiet: flags.has("quiet"),
    debug: flags.has("debug") || flags.has("initos.debug"),
    panic: get("panic"),
    ip,
    mode: get("initos.mode"),
    rootWaitSeconds: get("initos.rootwait"),
    rebootDelaySeconds: get("initos.reboot_delay"),
    staticIp: get("initos.ip") ?? get("xip"),
    gateway: get("initos.gw"),
    netInterface: get("initos.if"),
    insecure: get("initos.insecure") ?? false,
    latchCheck: get("initos.latchcheck") ?? false,
    rootSubvolume: get("initos.root"),
    sidecarBeside: get("initos.sidecar"),
    share: get("initos.share"),
    disks: get("initos.disks"),
    hostname: get("initos.hostname") ?? ip?.hostname,
    app,
  };
  return { cmdline, errors };
}
