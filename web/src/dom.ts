export const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

/** A new job's `file_uid`: `crypto.randomUUID()` where the page has it; Safari before 15.4 lacks it, and so does
 * any page over plain http from another host (a phone on the LAN reaching a dev machine's Hosting emulator), where
 * Generate threw and said nothing (a review). Then 16 random bytes in hex, as the callable makes its own ids. */
export function newFileUid(): string {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (byte) => byte.toString(16).padStart(2, "0")).join("");
}
