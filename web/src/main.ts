// The reference web client of firegen: anonymous sign-in, a form for the contract's request, submission through
// the generateWithRunPod callable (or a queued job document, the contract's other client flow), the user's jobs
// live, their images and videos.
import { jobActions } from "./actions";
import { START_RETRY_MS, watchConnection } from "./connection";
import { watchDeleteAll } from "./deleteall";
import { Dismissed } from "./dismissed";
import { $ } from "./dom";
import { isCode } from "./errors";
import { applyRanges } from "./form";
import { JobList, type JobsState } from "./joblist";
import { showUsage } from "./limits";
import { JobsListener } from "./listening";
import { NETWORK_FAILED, startFailure, startSession } from "./session";
import { fail } from "./status";
import { sender, watchSubmit } from "./submit";

async function main(): Promise<void> {
  const session = await startSession();
  showUsage(session.db, session.uid);

  const form = $<HTMLFormElement>("generate");
  applyRanges(form);
  form.addEventListener("change", (event) => {
    if ((event.target as HTMLInputElement).name === "media") applyRanges(form);
  });

  const jobs: JobsState = { listed: [], cached: false, loadedOnce: false, erasing: false };
  const dismissed = new Dismissed(session.projectId, session.uid);
  const view = new JobList(session, jobs, dismissed);
  const send = sender(session, jobs);
  view.handlers = jobActions({ session, form, jobs, dismissed, view, send });
  watchConnection(() => jobs.cached);
  view.watchDismissed();
  watchDeleteAll(session, jobs, view);
  new JobsListener(session, jobs, dismissed, view).start();
  watchSubmit(form, session, send);

  $<HTMLButtonElement>("submit").disabled = false;
  document.body.dataset.ready = "true";
}

// The bundle ran: public/boot.js says so otherwise (a browser too old to parse it, or a bundle that did not load).
document.documentElement.dataset.started = "true";

main().catch((error) => {
  $("who").textContent = "Not signed in: the app could not start";
  $("no-jobs").hidden = true;
  fail(`The app could not start: ${startFailure(error)}`);
  // A start the network failed starts again once the browser is back online, or (online all along: the server was
  // out of reach) a while later (the review: it stayed failed).
  if (isCode(error, ...NETWORK_FAILED)) {
    window.addEventListener("online", () => location.reload(), { once: true });
    setTimeout(() => navigator.onLine && location.reload(), START_RETRY_MS);
  }
});
