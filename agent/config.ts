// The agent's own configuration, built into the signed initrd at /etc/initos/config.json. It is
// trusted (it is signed), but still validated: a build mistake must produce a clear line, and
// the agent then boots with safe defaults rather than not at all.
import { z } from "zod";
import { zodIssue, describe } from "./errors.ts";

export const CONFIG_PATH = "/etc/initos/config.json";

export const AgentConfigSchema = z
  .object({
    /**
     * Modules (names or aliases) loaded before looking for the root device, with their deps.
     * The build's list (initrd/config.json) ends with sha256_ssse3: the kernel's SHA-NI/AVX2
     * sha256, which dm-verity then checks the images with instead of sha256-generic (seen in
     * the log: "verity: sha256 using implementation"). Not loading on a CPU without SSSE3 is a
     * warning, not an error.
     */
    modules: z.array(z.string().regex(/^[\w-]+$/, "expected a module name")).default([]),
    /** How long to wait for the root device when the cmdline does not say (initos.rootwait). */
    rootWaitSeconds: z.number().int().min(0).max(3600).default(30),
    /** Delay before the failure policy reboots (cmdline initos.reboot_delay, then panic=, win). */
    rebootDelaySeconds: z.number().int().min(0).max(86400).default(30),
    /** The boot partitions: two ESPs (A/B slots) found by GPT partition name. */
    esp: z
      .object({
        slots: z
          .array(z.object({ name: z.string().regex(/^[a-z0-9]+$/), partLabel: z.string().min(1) }))
          .min(1)
          .default([
            { name: "a", partLabel: "initos-a" },
            { name: "b", partLabel: "initos-b" },
          ]),
        /** Directory on the ESP holding <image>.sqfs and <image>.verity. */
        dir: z.string().regex(/^[\w.-]+$/).default("initos"),
        waitSeconds: z.number().int().min(0).max(3600).default(30),
      })
      .strict()
      .default({ slots: [{ name: "a", partLabel: "initos-a" }, { name: "b", partLabel: "initos-b" }], dir: "initos", waitSeconds: 30 }),
    /**
     * dm-verity squashfs images on the ESP. The root hash is what makes them trusted: it is in
     * this signed config. `binds` maps directories of the image over paths of the initramfs.
     */
    images: z
      .array(
        z
          .object({
            name: z.string().regex(/^[a-z][a-z0-9-]*$/),
            rootHash: z.string().regex(/^[0-9a-f]{64}$/, "expected a sha256 root hash (64 hex digits)"),
            /**
             * What `veritysetup format` was given, pinned: the hash device's superblock is
             * unsigned data on the ESP and must say exactly this. (The number of data blocks is
             * the one the root hash does not bind: fewer keep the top hash block, and so the
             * root hash, unchanged.) Filled in by the build from build/images/<name>.json.
             */
            verity: z
              .object({
                hashType: z.union([z.literal(0), z.literal(1)]),
                hashAlgorithm: z.string().regex(/^[a-z0-9-]+$/, "expected a hash name such as sha256"),
                dataBlockSize: z.number().int().min(512).max(524288).refine((n) => (n & (n - 1)) === 0, "expected a power of two"),
                hashBlockSize: z.number().int().min(512).max(524288).refine((n) => (n & (n - 1)) === 0, "expected a power of two"),
                dataBlocks: z.number().int().min(1),
                /** Hex; "" for none. */
                salt: z.string().regex(/^([0-9a-f]{2}){0,256}$/, "expected the salt in hex (at most 256 bytes)"),
              })
              .strict(),
            binds: z.array(z.object({ from: z.string().regex(/^[\w.-]+$/), to: z.string().regex(/^\//) }).strict()).default([]),
            /**
             * Not opened by the images stage: the part that needs it opens it (openImage) when
             * it does, so a boot that does not pays nothing. The VM jails' image (QEMU and the
             * VM kernel + initrd, 72 MB against tools' 13 MB) is one: verifying it belongs to
             * starting a VM jail, not to every boot (issue #17).
             */
            onDemand: z.boolean().optional(),
          })
          .strict(),
      )
      .default([]),
    /**
     * The disk key's binding, the only source of TPM policy: a LUKS2 token (data on the disk) is
     * used only when it is bound to exactly this. The default, as systemd-cryptenroll with
     * --tpm2-public-key: PCR 7 (Secure Boot state) by value, plus PCR 11 through a policy the PCR
     * signer signed for each production UKI (`pcrPublicKey`, filled in by the build). The latch
     * PCR, zero at boot, is extended on every boot path so nothing later can unseal again.
     */
    tpm: z
      .object({
        waitSeconds: z.number().int().min(0).max(600).default(5),
        bank: z.literal("sha256").default("sha256"),
        pcrs: z.array(z.number().int().min(0).max(23)).default([7]),
        signedPcrs: z.array(z.number().int().min(0).max(23)).default([11]),
        pcrPublicKey: z.string().regex(/^-----BEGIN PUBLIC KEY-----\n[A-Za-z0-9+/=\n]+-----END PUBLIC KEY-----\n?$/, "expected a PEM public key").optional(),
        latchPcr: z.number().int().min(0).max(23).default(15),
      })
      .strict()
      .refine((t) => t.pcrs.length + t.signedPcrs.length > 0, "a key bound to no PCR would unseal on any boot")
      .refine((t) => ![...t.pcrs, ...t.signedPcrs].includes(t.latchPcr), "the latch PCR cannot also be a bound PCR")
      .default({ waitSeconds: 5, bank: "sha256", pcrs: [7], signedPcrs: [11], latchPcr: 15 }),
    /** sshd in sidecar mode: every key may only run the admin commands. */
    ssh: z
      .object({
        port: z.number().int().min(1).max(65535).default(15022),
        authorizedKeys: z.array(z.string().regex(/^(ssh-ed25519|ecdsa-sha2-nistp\d+|ssh-rsa) [A-Za-z0-9+/=]+( [^\n]*)?$/, "expected one public key line")).default([]),
        /** Keep the sidecar running beside the OS after switch_root (cmdline initos.sidecar= wins). */
        besideOs: z.boolean().default(false),
        /**
         * Offer busybox sh from the verified tools image to the authorized keys. Off by default:
         * then an ssh session can only run the admin commands, whatever it asks for.
         */
        shell: z.boolean().default(false),
      })
      .strict()
      .default({ port: 15022, authorizedKeys: [], besideOs: false, shell: false }),
    /** More services the sidecar supervises (argv[0] an absolute path, e.g. in the tools image). */
    services: z
      .array(z.object({ name: z.string().regex(/^[\w-]+$/), argv: z.array(z.string()).min(1).refine((a) => a[0]!.startsWith("/"), "argv[0] must be an absolute path") }).strict())
      .default([]),
    /**
     * This build's version: a positive integer, higher for every newer build (the Makefile's
     * default is the commit's time). An update must carry a higher one (anti-rollback).
     */
    version: z.number().int().min(0).max(2 ** 53 - 1).default(0),
    /** The machine's name (per host: hosts/<name>/host.json); the sidecar's hostname. */
    hostname: z.string().regex(/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/, "expected a hostname label (a-z, 0-9, -)").optional(),
    /** A/B updates of the boot chain (issue #15): who may sign one, and when a trial commits. */
    update: z
      .object({
        /**
         * The db certificates (PEM) an update's UKI must be Authenticode-signed by: one of
         * these, checked with sbverify from the tools image. None: updates are refused.
         */
        signers: z.array(z.string().regex(/^-----BEGIN CERTIFICATE-----\n[A-Za-z0-9+/=\n]+-----END CERTIFICATE-----\n?$/, "expected a PEM certificate")).default([]),
        /** The trial commits only once the OS has been up this long after the switch. */
        healthSeconds: z.number().int().min(0).max(86400).default(120),
        /** "manual": the trial also waits for `commit` from the control plane. */
        commit: z.enum(["auto", "manual"]).default("auto"),
        /**
         * A trial not committed this long after power-on is abandoned: the watchdog is no
         * longer petted, and the machine resets into the old slot.
         */
        trialSeconds: z.number().int().min(30).max(86400).default(900),
        /** The watchdog's timeout during a trial (petted every third of it). */
        watchdogSeconds: z.number().int().min(5).max(600).default(60),
      })
      .strict()
      .refine((u) => u.trialSeconds > u.healthSeconds, "trialSeconds must be longer than healthSeconds")
      .default({ signers: [], healthSeconds: 120, commit: "auto", trialSeconds: 900, watchdogSeconds: 60 }),
    /** Recovery passphrase attempts on the console before the failure policy. */
    passphraseTries: z.number().int().min(1).max(10).default(3),
    /** Tried in order when the cmdline has no init=. */
    initCandidates: z.array(z.string().regex(/^\//)).min(1).default(["/sbin/init", "/etc/init", "/bin/init", "/lib/systemd/systemd"]),
  })
  .strict();

export type AgentConfig = z.output<typeof AgentConfigSchema>;

export const DEFAULT_CONFIG: AgentConfig = AgentConfigSchema.parse({});

export interface ConfigResult {
  config: AgentConfig;
  error?: string;
}

/** Parses the config text; `null` (no file) means defaults. Never throws. */
export function parseConfig(text: string | null, path = CONFIG_PATH): ConfigResult {
  if (text === null) return { config: DEFAULT_CONFIG, error: `config: ${path} missing; using defaults` };
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    return { config: DEFAULT_CONFIG, error: `config: ${path} is not JSON (${describe(e)}); using defaults` };
  }
  const r = AgentConfigSchema.safeParse(json);
  if (r.success) return { config: r.data };
  return { config: DEFAULT_CONFIG, error: `config: ${path}: ${zodIssue(r.error)}; using defaults` };
}
