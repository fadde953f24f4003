// What the page makes of an error the Firebase SDK threw: its code, and the message a user is shown.
import { NO_ANSWER } from "./connection";

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
  // Any code alone (a proxy's 502 reads "unknown", a 429 "resource-exhausted"): no message of the server's. But
  // "Unauthenticated" alone is the server's answer (a review: an App Check refusal read "Could not reach the
  // server; check your connection").
  const code = ((error as { code?: string } | null)?.code ?? "").replace(/^functions\//, "");
  if (message(error).toLowerCase() !== code) return message(error);
  return code === "unauthenticated" ? CREDENTIALS_REFUSED : NO_ANSWER;
}
