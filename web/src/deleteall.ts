// The Delete all my jobs button: all the user's jobs and files deleted (an app's account deletion), once confirmed,
// through passes of the deleteAllGenerations callable until it says all is deleted (erase.ts); the cards go as the
// listeners hear.
import { httpsCallable } from "firebase/functions";
import { NO_ANSWER } from "./connection";
import { $ } from "./dom";
import { eraseAll, erasedMessage, ERASE_TIMEOUT_MS, type EraseReply } from "./erase";
import { callableMessage, isCode } from "./errors";
import type { JobList, JobsState } from "./joblist";
import type { Session } from "./session";
import { withdraw } from "./status";
import { ERASING } from "./submit";

const ERASE_UNAVAILABLE = "Deleting all needs the deleteAllGenerations function, which this project has not deployed";

export function watchDeleteAll({ functions }: Session, jobs: JobsState, view: JobList): void {
  const deleteAll = $<HTMLButtonElement>("delete-all");
  deleteAll.addEventListener("click", async () => {
    if (jobs.erasing) return;
    if (!window.confirm("Delete all your jobs and their files? Running jobs are stopped. This cannot be undone.")) return;
    const status = $("delete-all-status");
    if (!navigator.onLine || jobs.cached) {
      status.textContent = NO_ANSWER;
      return;
    }
    // Refuses presses but stays enabled, as Generate does: a disabled button would drop the focus to <body>.
    jobs.erasing = true;
    deleteAll.setAttribute("aria-disabled", "true");
    status.textContent = "Deleting all your jobs…";
    try {
      const call = httpsCallable<Record<string, never>, EraseReply>(functions!, "deleteAllGenerations", {
        timeout: ERASE_TIMEOUT_MS,
      });
      const erased = await eraseAll(
        () => call({}).then((reply) => reply.data),
        (sofar) => {
          if (sofar.done) return;
          const running = sofar.stopping ? `, ${sofar.stopping} running stopping` : "";
          status.textContent = `Deleting all your jobs… ${sofar.deleted} deleted${running}`;
        },
      );
      status.textContent = erasedMessage(erased);
    } catch (error) {
      status.textContent = isCode(error, "functions/not-found", "functions/unimplemented")
        ? ERASE_UNAVAILABLE
        : callableMessage(error);
    } finally {
      jobs.erasing = false;
      withdraw(ERASING); // a Generate pressed meanwhile may be pressed again now
      deleteAll.removeAttribute("aria-disabled");
      view.render();
    }
  });
}
