// `hostconfig show|set`: the pool's host config (initos.json), read and written over ssh in jail
// mode, where the admin has no other way to the pool. A new file is checked with the boot's own
// parser before it is written, and refused whole when any entry would be refused at boot: the
// admin hears why now, not from the next boot's log. It applies at the next boot.
import { describe } from "../errors.ts";
import { HOST_CONFIG_JSON, parseHostJson } from "../hostconfig.ts";
import type { Logger } from "../log.ts";
import { type Files, RefusedFile } from "../sys/index.ts";
import { POOL_MOUNT } from "../jailsconfig.ts";

/** Bigger than any sensible host config; a body past it is refused unread. */
const MAX_BYTES = 64 << 10;

export interface HostConfigFile {
  show(): string;
  set(body: AsyncIterable<Uint8Array>): Promise<string>;
}

export function hostConfigFile(sys: Pick<Files, "lstat" | "readRegular" | "writeBytes" | "rename" | "fsyncPath" | "unlink">, log: Logger, pool = POOL_MOUNT): HostConfigFile {
  const path = `${pool}/${HOST_CONFIG_JSON}`;
  const fresh = `${pool}/.${HOST_CONFIG_JSON}.new`;
  const notLink = () => {
    if (sys.lstat(path).kind === "link") throw new Error(`hostconfig: ${HOST_CONFIG_JSON} on the pool is a symlink; refusing it`);
  };
  return {
    show() {
      // As the boot reads it (pool.ts readHostConfig): a FIFO there would block PID 1, and with
      // it every jail's supervision, until someone wrote to it.
      let bytes: Uint8Array | null;
      try {
        bytes = sys.readRegular(pool, HOST_CONFIG_JSON, MAX_BYTES);
      } catch (e) {
        if (e instanceof RefusedFile) throw new Error(`hostconfig: refused ${HOST_CONFIG_JSON} on the pool: ${e.why}`);
        throw e;
      }
      return bytes ? Buffer.from(bytes).toString("utf8") : `hostconfig: no ${HOST_CONFIG_JSON} at the top of the pool`;
    },
    async set(body) {
      notLink();
      const chunks: Uint8Array[] = [];
      let n = 0;
      for await (const c of body) {
        n += c.length;
        if (n > MAX_BYTES) throw new Error(`hostconfig set: more than ${MAX_BYTES} bytes; refused`);
        chunks.push(c);
      }
      const text = Buffer.concat(chunks).toString("utf8");
      let summary: string;
      try {
        const c = parseHostJson(text);
        const refused = [...c.refused, ...(c.jails?.refused ?? [])];
        if (refused.length) throw new Error(refused[0]!.replace(/; (not mounted|not started|no jail runs)$/, ""));
        summary = c.root ? `root ${c.root}` : `${c.jails?.jails.length ?? 0} jail(s): ${c.jails?.jails.map((j) => j.name).join(", ") || "none"}`;
      } catch (e) {
        throw new Error(`hostconfig set: refused: ${describe(e)}`);
      }
      // A name left there (a symlink, say) is removed, never written through.
      if (sys.lstat(fresh).kind !== "missing") sys.unlink(fresh);
      sys.writeBytes(fresh, Buffer.from(text), 0o600);
      sys.fsyncPath(fresh);
      sys.rename(fresh, path);
      sys.fsyncPath(pool);
      const line = `hostconfig: ${HOST_CONFIG_JSON} written (${summary}); it applies at the next boot`;
      log.info(line);
      return line;
    },
  };
}
