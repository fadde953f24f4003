export const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

/** How long a line of the jobs' live region stands before the next replaces it: lines set within a frame of each
 * other reach a screen reader as the last alone (the web app review logged "beta started" replaced after 1 ms). */
const NEWS_HOLD_MS = 500;
const waiting: string[] = [];
let shownAt = -Infinity;
let timer: ReturnType<typeof setTimeout> | null = null;

/** Tell screen readers `text` (`#job-news`, a polite live region), each line in turn, none cut short. */
export function announce(text: string): void {
  waiting.push(text);
  if (timer === null) next();
}

function next(): void {
  timer = null;
  const wait = shownAt + NEWS_HOLD_MS - performance.now();
  if (wait > 0) {
    timer = setTimeout(next, wait);
    return;
  }
  const text = waiting.shift();
  if (text === undefined) return;
  $("job-news").textContent = text;
  shownAt = performance.now();
  if (waiting.length) timer = setTimeout(next, NEWS_HOLD_MS);
}

/** A new job's `file_uid`: `crypto.randomUUID()` where the page has it; Safari before 15.4 lacks it, and so does
 * any page over plain http from another host (a phone on the LAN reaching a dev machine's Hosting emulator), where
 * Generate threw and said nothing (a review). Then 16 random bytes in hex, as the callable makes its own ids. */
export function newFileUid(): string {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (byte) => byte.toString(16).padStart(2, "0")).join("");
}
