// Per-host builds (issue #15): hosts/<name>/host.json says what differs between the machines of
// a fleet. One build serves them all: the base and agent segments, the kernel and the images
// are shared; a host gets its own config segment (hostname, services, update policy, ssh keys
// from hosts/<name>/authorized_keys) and its own UKI (that segment, and the installed
// machine's cmdline plus the host's words and address). See hosts/example/.
import { readFileSync } from "node:fs";
import { basename, dirname } from "node:path";
import { z } from "zod";
import { AgentConfigSchema } from "../agent/config.ts";
import { VM_HOST_IMAGE } from "../agent/jails/vm.ts";
import { parseCmdline } from "../agent/cmdline.ts";
import { zodIssue } from "../agent/errors.ts";

/** A host's name: its directory under hosts/, its build directory and the bundle's `host`. */
export const HOST_NAME = /^[a-z0-9][a-z0-9-]{0,62}$/;

const ipv4 = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;
/**
 * Cmdline keys the host gives as `address`, not as words: one place for the address, so a word
 * cannot silently override it (the kernel and the agent let the last occurrence win).
 */
const ADDRESS_KEYS = ["initos.ip", "initos.gw", "initos.if", "xip"];

export const HostSchema = z
  .object({
    /** The machine's name in the signed config (the sidecar's hostname). */
    hostname: AgentConfigSchema.shape.hostname.unwrap(),
    /** Kernel cmdline words appended to the installed machine's cmdline (TARGET_CMDLINE). */
    cmdline: z
      .array(
        z
          .string()
          // The words are joined with spaces and split again by the kernel, which also groups
          // quoted text: a word with a space or a quote would not stay one word.
          .regex(/^[^\s"]+$/, "expected one word (no spaces or quotes)")
          .refine((w) => !ADDRESS_KEYS.includes(w.split("=")[0]!), "the address goes in \"address\", not in cmdline"),
      )
      .max(64)
      .default([]),
    /** A static address (cmdline initos.ip=, initos.gw=, initos.if=); none: DHCP. */
    address: z
      .object({
        ip: z
          .string()
          .regex(/^[^/]+\/(3[0-2]|[12]?\d)$/, "expected address/prefix, e.g. 192.168.1.10/24")
          .refine((s) => ipv4.test(s.split("/")[0]!), "expected address/prefix, e.g. 192.168.1.10/24"),
        gw: z.string().regex(ipv4, "expected an IPv4 address").optional(),
        /** The interface, by name or MAC (the first one with a link when absent). */
        interface: z.string().regex(/^([\w.-]{1,15}|([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2})$/, "expected an interface name or a MAC address").optional(),
      })
      .strict()
      .optional(),
    /** More services the sidecar supervises (config.services rows), after the template's. */
    services: AgentConfigSchema.shape.services,
    /**
     * Update policy overrides (config.update without signers: who may sign updates is the
     * build's, SIGNERS, not a host's). Checked here with the config's own rules.
     */
    update: z
      .object({ healthSeconds: z.number(), commit: z.string(), trialSeconds: z.number(), watchdogSeconds: z.number() })
      .partial()
      .strict()
      .optional(),
    /**
     * The host runs VM jails: its signed config names the vmhost image (QEMU and the VM kernel,
     * 72 MB, verified at first use only), and its update bundles carry it. Hosts without VM
     * jails do not pay for it.
     */
    vmJails: z.boolean().optional(),
  })
  .strict()
  .superRefine((h, ctx) => {
    if (!h.update) return;
    const r = AgentConfigSchema.shape.update.safeParse(h.update);
    const i = r.success ? undefined : r.error.issues[0];
    if (i) ctx.addIssue({ code: "custom", message: i.message, path: ["update", ...i.path] });
  });

export type Host = z.output<typeof HostSchema>;

export interface HostDef {
  /** The directory's name: hosts/<name>/. */
  name: string;
  host: Host;
}

/** Reads and checks `hosts/<name>/host.json`; throws one line naming the file and the bad key. */
export function readHost(file: string): HostDef {
  const name = basename(dirname(file));
  if (!HOST_NAME.test(name)) throw new Error(`${file}: the host's directory name ${JSON.stringify(name)} is not a host name (a-z, 0-9, -)`);
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(file, "utf8"));
  } catch (e) {
    throw new Error(`${file}: ${(e as Error).message}`);
  }
  return { name, host: parseHost(json, file) };
}

export function parseHost(json: unknown, what = "host.json"): Host {
  const r = HostSchema.safeParse(json);
  if (!r.success) throw new Error(`${what}: ${zodIssue(r.error)}`);
  return r.data;
}

/**
 * The host's UKI cmdline: `base` (the installed machine's) with the host's address and words
 * added before any `--` (what follows it is the init's arguments). Checked with the agent's
 * own cmdline parser: a key it would reject at boot fails the build instead.
 */
export function hostCmdline(base: string, host: Host, what = "host.json"): string {
  const words = base.trim().split(/\s+/).filter(Boolean);
  const a = host.address;
  const added = [...(a ? [`initos.ip=${a.ip}`, ...(a.gw ? [`initos.gw=${a.gw}`] : []), ...(a.interface ? [`initos.if=${a.interface}`] : [])] : []), ...host.cmdline];
  const dash = words.indexOf("--");
  const all = dash < 0 ? [...words, ...added] : [...words.slice(0, dash), ...added, ...words.slice(dash)];
  const text = all.join(" ");
  const errors = parseCmdline(text).errors;
  if (errors.length) throw new Error(`${what}: ${errors[0]!.replace(/; using .*$/, "")}`);
  return text;
}

/** The host's part of the signed config, merged into the template (initrd/config.json). */
export function withHost(template: Record<string, unknown>, host: Host): Record<string, unknown> {
  const services = (template.services ?? []) as unknown[];
  const update = (template.update ?? {}) as Record<string, unknown>;
  return {
    ...template,
    hostname: host.hostname,
    services: [...services, ...host.services],
    ...(host.update ? { update: { ...update, ...host.update } } : {}),
    ...(host.vmJails ? { images: [...((template.images ?? []) as unknown[]), { name: VM_HOST_IMAGE, onDemand: true }] } : {}),
  };
}
