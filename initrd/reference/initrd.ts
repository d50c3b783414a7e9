// The contents of the reference initrd `make bench` compares the agent with (besides the
// skeleton and kernel modules, which come from the same code as the agent's base initrd):
// static busybox with a link per applet, veritysetup and cryptsetup with their libraries
// (DT_NEEDED, like everything else), the build-time settings /init reads, the PCR signer's
// public key from the config, and the systemd-tpm2 token functions (tpm2-token.sh, shared with
// the test roots' attack). tpm2 is not here: like the agent, the script runs it from the
// verified tools image.
import { execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import type { AgentConfig } from "../../agent/config.ts";
import { type CpioEntry, fileFrom } from "../cpio.ts";
import { collectLibs } from "../libs.ts";

export const BUSYBOX = "/bin/busybox";
export const REFERENCE_TOOLS = ["/usr/sbin/veritysetup", "/usr/sbin/cryptsetup"];
export const REFERENCE_ENV = "etc/initos-ref.env";
/** The config's PCR signer, for `tpm2 loadexternal` (the token's own copy is data, not trusted). */
export const REFERENCE_PCR_PEM = "etc/initos-ref-pcr.pem";
/** The t2_* shell functions init.sh sources. */
export const TPM2_TOKEN_SH = fileURLToPath(new URL("./tpm2-token.sh", import.meta.url));
export const REFERENCE_TPM2_TOKEN_SH = "usr/lib/initos-ref/tpm2-token.sh";

/** Not links: busybox itself, and applets that would shadow the initrd's own /init. */
const SKIP_APPLETS = new Set(["busybox", "init", "linuxrc"]);

export function busyboxEntries(busybox = BUSYBOX): CpioEntry[] {
  const applets = execFileSync(busybox, ["--list"], { encoding: "utf8" }).split("\n").filter((a) => /^[\w.[-]+$/.test(a) && !SKIP_APPLETS.has(a));
  return [
    fileFrom("usr/bin/busybox", busybox, 0o755),
    ...applets.map((a): CpioEntry => ({ path: `usr/bin/${a}`, type: "symlink", target: "busybox" })),
  ];
}

export function toolEntries(tools = REFERENCE_TOOLS): CpioEntry[] {
  return [
    ...tools.map((t) => fileFrom(`usr/bin/${t.replace(/.*\//, "")}`, t, 0o755)),
    ...collectLibs(tools).map((l) => fileFrom(l.path, l.source, 0o755)),
  ];
}

/** The shell-readable settings: what the agent reads from its signed config, as variables. */
export function referenceEnv(config: AgentConfig, modules: readonly string[]): string {
  const image = (name: string) => {
    const i = config.images.find((x) => x.name === name);
    if (!i) throw new Error(`reference initrd: the config has no image "${name}"`);
    return i;
  };
  const mods = image("modules");
  const tpm = tpmBinding(config);
  const vars: Record<string, string> = {
    MODULES: modules.join(" "),
    ESP_PARTNAME: config.esp.slots[0]!.partLabel,
    ESP_DIR: config.esp.dir,
    ROOT_WAIT: String(config.rootWaitSeconds),
    TPM_WAIT: String(config.tpm.waitSeconds),
    MODULES_ROOTHASH: mods.rootHash,
    MODULES_BINDS: mods.binds.map((b) => `${b.from}:${b.to}`).join(" "),
    TOOLS_ROOTHASH: image("tools").rootHash,
    TPM_BANK: tpm.bank,
    TPM_PCRS: tpm.pcrs.join(","),
    TPM_SIGNED_PCRS: tpm.signedPcrs.join(","),
    TPM_LATCH: String(tpm.latchPcr),
  };
  const lines = Object.entries(vars).map(([k, v]) => {
    if (/["$`\\\n]/.test(v)) throw new Error(`reference initrd: ${k} has characters the shell would interpret: ${v}`);
    return `${k}="${v}"`;
  });
  return `# Written by initrd/build.ts reference-initrd from the signed config and the images' root hashes.\n${lines.join("\n")}\n`;
}

/** The config's TPM binding, read defensively (older configs had no bank/signedPcrs/pcrPublicKey). */
export function tpmBinding(config: AgentConfig): { bank: string; pcrs: number[]; signedPcrs: number[]; latchPcr: number; pcrPublicKey?: string } {
  const t = config.tpm as AgentConfig["tpm"] & { bank?: string; signedPcrs?: number[]; pcrPublicKey?: string };
  return { bank: t.bank ?? "sha256", pcrs: [...t.pcrs], signedPcrs: [...(t.signedPcrs ?? [11])], latchPcr: t.latchPcr, pcrPublicKey: t.pcrPublicKey };
}

export function referenceEntries(config: AgentConfig, modules: readonly string[]): CpioEntry[] {
  const tpm = tpmBinding(config);
  // A signed PCR policy needs the signer's key; without it the reference could never unseal.
  if (tpm.signedPcrs.length && !tpm.pcrPublicKey) {
    throw new Error(`reference initrd: the config binds signed PCR ${tpm.signedPcrs.join(",")} but has no tpm.pcrPublicKey (build it with the PCR signer's public key)`);
  }
  return [
    // /init logs before it mounts devtmpfs.
    { path: "dev/kmsg", type: "char", mode: 0o600, major: 1, minor: 11 },
    { path: REFERENCE_ENV, type: "file", mode: 0o644, data: Buffer.from(referenceEnv(config, modules)) },
    ...(tpm.pcrPublicKey ? [{ path: REFERENCE_PCR_PEM, type: "file", mode: 0o644, data: Buffer.from(tpm.pcrPublicKey) } satisfies CpioEntry] : []),
    fileFrom(REFERENCE_TPM2_TOKEN_SH, TPM2_TOKEN_SH, 0o644),
    ...busyboxEntries(),
    ...toolEntries(),
  ];
}
