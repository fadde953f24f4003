// The notice at the top of the page about the connection: offline, or the server unreachable, the jobs listed are
// the last the page heard of (and the live region says so once); errors the connection caused go once it is back.
import { $ } from "./dom";
import { NO_ANSWER, RETRY_NOTE } from "./errors";
import { markInvalid } from "./form";

export { NO_ANSWER };
const OFFLINE = "Offline: your jobs as last seen; they update when the connection is back.";
const UNREACHABLE = "Cannot reach the server: your jobs as last seen; they update once it answers.";

/** How long after a start the network failed, online, the page starts again. */
export const START_RETRY_MS = 30_000;
/** How long "Offline" may stay once the browser is online again, while the listeners catch up. */
const CATCH_UP_MS = 10_000;
/** When the browser last came online (Date.now()). */
let onlineAt = 0;

/** The browser is online again: "Offline" may stay a moment while the listeners catch up (`showConnection`). */
function cameOnline(): void {
  onlineAt = Date.now();
}

/** The notice follows the browser going online and offline; `cached`: whether the jobs listed are the cache's. */
export function watchConnection(cached: () => boolean): void {
  window.addEventListener("online", () => {
    cameOnline();
    showConnection(cached());
    setTimeout(() => showConnection(cached()), CATCH_UP_MS + 50);
  });
  window.addEventListener("offline", () => showConnection(cached()));
}

/** Show the notice at the top, `news` and, when the page listens again, `retry` beside it; `news` is said in the
 * live region too, written only when it changes (the review: each write is heard anew, and every answer of a
 * listener from the cache wrote "Offline…" again, every retry its whole line). */
export function notify(news: string, retry = ""): void {
  $("connection-text").textContent = news;
  const live = $("connection-news");
  if (live.textContent !== news) live.textContent = news;
  $("connection-retry").textContent = retry;
  $("connection").hidden = false;
}

/** The notice goes, emptied: the same news later (offline once more) is written, and heard, again. */
function unnotify(): void {
  $("connection").hidden = true;
  for (const id of ["connection-text", "connection-news", "connection-retry"]) $(id).textContent = "";
}

/** The jobs listed are the last the page heard of: offline, or the server unreachable (audit: a finished job
 * read "Processing 0%" for as long as the connection was gone, and nothing said so). */
export function showConnection(cached: boolean): void {
  const notice = $("connection");
  if (navigator.onLine && !cached) {
    if (!notice.hidden) clearConnectionError();
    unnotify();
    return;
  }
  // Back online, the listeners catch up a moment later: "Offline" stays until they do (not a flash of "Cannot
  // reach the server" in a live region), for CATCH_UP_MS at most (the review: online on a network that cannot reach
  // the server, a captive portal's, it said "Offline" for good).
  const catchingUp = Date.now() - onlineAt < CATCH_UP_MS;
  if (navigator.onLine && !notice.hidden && $("connection-news").textContent === OFFLINE && catchingUp) return;
  notify(navigator.onLine ? UNREACHABLE : OFFLINE);
}

/** An error the connection caused goes once the connection is back (an audit saw it stay beside a finished job). */
function clearConnectionError(): void {
  const error = $("form-error").textContent ?? "";
  if (connectionError(error)) {
    $("form-error").textContent = "";
    markInvalid(null, "form-error");
  }
  // A card's note of a try again that the connection failed goes with it, as does Delete all my jobs' line.
  for (const note of document.querySelectorAll<HTMLElement>(".job .note, #delete-all-status")) {
    if (connectionError((note.textContent ?? "").replace(RETRY_NOTE, ""))) note.textContent = "";
  }
}

function connectionError(text: string): boolean {
  return text === NO_ANSWER || text.startsWith("Could not record the");
}
