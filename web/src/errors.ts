// What the page makes of an error the Firebase SDK threw: its code, and the message a user is shown.
import { NO_ANSWER } from "./connection";

export function message(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

export function isCode(error: unknown, ...codes: string[]): boolean {
  return typeof error === "object" && error !== null && codes.includes((error as { code?: string }).code ?? "");
}

/** What to show for a failed callable: its own message, unless it got no answer it could read (offline, a server
 * error page, a timeout: the SDK's message is then its code, "internal", or "INTERNAL" for a server's 500). */
export function callableMessage(error: unknown): string {
  // Any code alone (a proxy's 502 reads "unknown", a 429 "resource-exhausted"): no message of the server's.
  const code = (error as { code?: string } | null)?.code ?? "";
  return message(error).toLowerCase() === code.replace(/^functions\//, "") ? NO_ANSWER : message(error);
}
