// The form's two lines, its status and its alert: what the page says of the request sent last, of a card's
// action, or of an error (one that names a field of the form marks that field).
import { FINAL_STATES } from "./contract.gen";
import { $ } from "./dom";
import { markInvalid } from "./form";
import type { Job } from "./jobs";

/** How long the form's line about a job stays at least, once the job ended (a quick job's went in half a second). */
const MIN_SHOWN_MS = 4000;

/** The job the form's status line speaks of, until it ends, and since when. */
let named: string | null = null;
let namedAt = 0;

export function name(id: string): void {
  named = id;
  namedAt = Date.now();
}

export function say(text: string): void {
  named = null;
  $("form-error").textContent = "";
  markInvalid(null, "form-error");
  $("form-status").textContent = text;
}

/** The form's alert goes where it still says `text`: news that is over (Delete all's "Wait until…", once it ended:
 * an audit saw it beside "All your jobs are deleted"). */
export function withdraw(text: string): void {
  if ($("form-error").textContent !== text) return;
  $("form-error").textContent = "";
  markInvalid(null, "form-error");
}

/** A card action's line (Cancel's answer): the form's status, leaving its alert, which may be a refusal of the form's
 * own request sent meanwhile (the race review: a late Cancel answer wiped "Your daily budget is spent"). */
export function report(text: string): void {
  named = null;
  $("form-status").textContent = text;
}

/** Show an error; one that names a field of the form marks that field invalid and is its description (not for a
 * card's request, which the form does not hold: `mark` false). Returns the field marked, if any. */
export function fail(text: string, mark = true): HTMLElement | null {
  $("form-status").textContent = "";
  $("form-error").textContent = text;
  return markInvalid(mark ? text : null, "form-error");
}

export function ended(listed: Job[], id: string | null): boolean {
  return listed.some((job) => job.id === id && (FINAL_STATES as readonly string[]).includes(job.doc.status));
}

/** The form's line about a job is old news once the job ended (its card says how): it goes, a while later. */
export function settle(listed: Job[]): void {
  if (!ended(listed, named)) return;
  const id = named;
  setTimeout(() => {
    if (named !== id) return; // the line speaks of something else by now
    $("form-status").textContent = "";
    named = null;
  }, Math.max(0, namedAt + MIN_SHOWN_MS - Date.now()));
}
