// What the page makes of an error the Firebase SDK threw: its code, and the message a user is shown. Pure (no
// DOM): erase.ts, which runs in Node too, uses it.

/** The callable failing without an answer of its own (offline, or a server error page): the SDK says just "internal". */
export const NO_ANSWER = "Could not reach the server; check your connection and try again";
/** What a Try again met, beside the card it was pressed on: said so, it is not read as that job's own failure (the
 * web app review: a refusal of the new job's, "Daily GPU budget exceeded…", under a card that said Cancelled). */
export const RETRY_NOTE = "Try again: ";

export function message(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

export function isCode(error: unknown, ...codes: string[]): boolean {
  return typeof error === "object" && error !== null && codes.includes((error as { code?: string }).code ?? "");
}

/** What the Functions SDK refuses a call with where the server did not take the caller's credentials: an App
 * Check token missing or refused (reCAPTCHA blocked by an extension, the key's domains), an ID token it refused. */
export const CREDENTIALS_REFUSED =
  "The server did not accept this page's credentials (its sign-in, or its App Check token where the project " +
  "enforces App Check): reload the page and try again";

/** What to show for a failed callable: its own message, unless it got no answer it could read (offline, a server
 * error page, a timeout: the SDK's message is then its code, "internal", or "INTERNAL" for a server's 500). */
export function callableMessage(error: unknown): string {
  if (unanswered(error)) return NO_ANSWER;
  return isCode(error, "functions/unauthenticated") && !answered(error) ? CREDENTIALS_REFUSED : message(error);
}

/** Whether a failed callable got no answer of the server's own: its message is then its bare code (a proxy's 502
 * reads "unknown", a 429 "resource-exhausted"), but for "Unauthenticated" alone, which is the server's answer (a
 * review: an App Check refusal read "Could not reach the server; check your connection"). */
export function unanswered(error: unknown): boolean {
  return !answered(error) && !isCode(error, "functions/unauthenticated");
}

function answered(error: unknown): boolean {
  const code = ((error as { code?: string } | null)?.code ?? "").replace(/^functions\//, "");
  return message(error).toLowerCase() !== code;
}
