// Deleting all of a user's jobs and files, as an app deletes an account's data: the deleteAllGenerations callable
// (functions/owner_calls.py `delete_all`) does one pass a call, and is called again until it says all is deleted
// (README "Deletion": at once while nothing is stopping, a moment later while running jobs stop).
import { unanswered } from "./errors";

/** deleteAllGenerations' reply. */
export interface EraseReply {
  success: boolean;
  status: "deleted" | "deleting";
  /** The jobs this pass deleted (not a running total). */
  deleted: number;
  /** The running jobs this pass asked to stop: deleted by a later pass once they have. */
  stopping: number;
  message: string;
}

/** The callable's own limit is 120 s (a pass starts no job after 60 s): past it, and a margin, no answer comes. */
export const ERASE_TIMEOUT_MS = 125_000;
/** Between passes while running jobs stop (at their worker's next step). */
const STOPPING_WAIT_MS = 2000;
/** How long the page keeps calling in all: a running job whose worker died ends only once its lease runs out. */
const ERASE_PATIENCE_MS = 5 * 60_000;
/** `unavailable` (Firestore or Storage failing), or no answer at all (a connection that broke: a CI run saw the
 * Functions emulator hang up on one pass), is tried again this many times, a backoff apart, then said. A pass
 * does what is left to do: calling again is safe. */
const UNAVAILABLE_TRIES = 3;
const UNAVAILABLE_WAIT_MS = 2000;

export interface Erased {
  /** Nothing is left. */
  done: boolean;
  /** Jobs deleted, all passes together. */
  deleted: number;
  /** Running jobs still stopping when the page stopped calling (not done). */
  stopping: number;
}

/** Call `pass` until all is deleted or ERASE_PATIENCE_MS is spent; `progress` hears after each pass. A refusal, or
 * `unavailable` past its tries, is thrown as the callable threw it (the passes' work stays done). */
export async function eraseAll(
  pass: () => Promise<EraseReply>,
  progress: (erased: Erased) => void,
  sleep: (ms: number) => Promise<void> = (ms) => new Promise((resolve) => setTimeout(resolve, ms)),
  now: () => number = Date.now,
): Promise<Erased> {
  const start = now();
  let deleted = 0;
  let failures = 0;
  for (;;) {
    let reply: EraseReply;
    try {
      reply = await pass();
      failures = 0;
    } catch (error) {
      const code = (error as { code?: string } | null)?.code;
      failures += 1;
      if (!(code === "functions/unavailable" || unanswered(error)) || failures >= UNAVAILABLE_TRIES) throw error;
      await sleep(UNAVAILABLE_WAIT_MS * 2 ** (failures - 1));
      continue;
    }
    deleted += reply.deleted;
    const erased = { done: reply.status === "deleted", deleted, stopping: reply.stopping };
    progress(erased);
    if (erased.done || now() - start >= ERASE_PATIENCE_MS) return erased;
    if (reply.stopping > 0) await sleep(STOPPING_WAIT_MS);
  }
}

/** What the page says of the erasure once it stopped calling. */
export function erasedMessage(erased: Erased): string {
  const jobs = `${erased.deleted} ${erased.deleted === 1 ? "job" : "jobs"} deleted`;
  if (erased.done) return `All your jobs are deleted (${jobs})`;
  const running = erased.stopping === 1 ? "1 running job is" : `${erased.stopping} running jobs are`;
  return erased.stopping
    ? `${jobs}; ${running} still stopping: press Delete all my jobs again in a few minutes`
    : `${jobs}; some are left: press Delete all my jobs again`;
}
