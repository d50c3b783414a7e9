/** A boot failure with a one-line cause, meant for the console as is. */
export class BootError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "BootError";
  }
}

/** The one line to log for any thrown value. */
export function describe(e: unknown): string {
  if (e instanceof Error) return e.message;
  return String(e);
}

/**
 * A zod error as "<path>: <message>" for its first issue: the key and what is wrong with it;
 * `top` names the value itself when the issue is about all of it.
 */
export function zodIssue(e: { issues: readonly { path: readonly PropertyKey[]; message: string }[] }, top = "(top level)"): string {
  const i = e.issues[0];
  if (!i) return "invalid";
  return `${i.path.length ? i.path.map(String).join(".") : top}: ${i.message}`;
}
