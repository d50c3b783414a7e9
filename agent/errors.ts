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
