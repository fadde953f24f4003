// What a card's buttons do (jobs.ts `CardHandlers`): cancel a job, fill the form from it, send it again, dismiss it,
// delete it. Each is a plain function of the job and of the page's context.
import { doc, getDoc, getDocFromServer, updateDoc } from "firebase/firestore";
import { httpsCallable } from "firebase/functions";
import { NO_ANSWER } from "./connection";
import { FINAL_STATES } from "./contract.gen";
import type { Dismissed } from "./dismissed";
import { $, announce, newFileUid } from "./dom";
import { callableMessage, isCode, message } from "./errors";
import { fillForm, requestOf } from "./form";
import type { JobList, JobsState } from "./joblist";
import { capital, dismissable, keyOf, named as nameOf, type CardHandlers, type Job } from "./jobs";
import type { Session } from "./session";
import { ended, fail, name, report, say, settle } from "./status";
import { viaOf, type Send } from "./submit";
import { contractMessage } from "./validate";

/** A cancel through the doc that firestore.rules refused, on a job that has not finished (their text names nothing). */
const CANCEL_REFUSED = "Cancel failed: the server refused it";
/** The cancel callable's own limit is 30 s: past it (and a margin) no answer will come. */
const CANCEL_TIMEOUT_MS = 35_000;
/** deleteGeneration's own timeout (60 s) and a little more. */
const DELETE_TIMEOUT_MS = 65_000;
const DELETE_UNAVAILABLE = "Deleting needs the deleteGeneration function, which this project has not deployed";

export interface ActionContext {
  session: Session;
  form: HTMLFormElement;
  jobs: JobsState;
  dismissed: Dismissed;
  view: JobList;
  send: Send;
}

export function jobActions(context: ActionContext): CardHandlers {
  return {
    cancel: (job) => cancel(context, job),
    edit: (job) => edit(context.form, job),
    retry: (job) => retry(context, job),
    dismiss: (job) => dismiss(context, job),
    remove: (job) => remove(context, job),
  };
}

/** Ask a job to stop; resolves to what its card says of a failure, which the form's alert says too (the card's
 * line, beside its Cancel: on a phone the form's is a screen away, the review). */
async function cancel({ session, jobs }: ActionContext, job: Job): Promise<string | null> {
  const { db, functions, uid } = session;
  const failed = (text: string) => {
    fail(text, false);
    return text;
  };
  // The job ended first: the form's alert says so, not the card, which shows how it ended (a note there would stay
  // on the finished card for good, nothing moving it on).
  const over = (status: string) => {
    fail(`Generation already ${status}: nothing to cancel`, false);
    return null;
  };
  const asked = () => {
    report(`Cancel requested for ${nameOf(job)}`);
    name(job.id); // the line goes when the job ends (ended already: a while later, as when the call answers)
    settle(jobs.listed);
    return null;
  };
  // Offline (or the server unreachable, as the listeners found), the callable fails as it does where it is not
  // deployed, and the doc's write would wait unseen (audit: "Cancelling…" for a minute, the button refusing
  // presses).
  if (!navigator.onLine || jobs.cached) return failed(NO_ANSWER);
  say(`Cancelling ${nameOf(job)}…`);
  name(job.id); // the line goes when the job ends, whatever the call comes to
  try {
    if (!functions) throw Object.assign(new Error("no functions"), { code: "functions/not-found" });
    const call = httpsCallable(functions, "cancelGeneration", { timeout: CANCEL_TIMEOUT_MS });
    await call({ fileUid: job.id, mediaType: job.media });
  } catch (error) {
    // A call that failed once the job had ended anyway (a flaky connection): say so as the callable would (an
    // audit saw "Could not reach the server" beside a Completed card).
    const end = jobs.listed.find((listedJob) => listedJob.id === job.id && ended(jobs.listed, job.id));
    if (end && end.doc.error_type !== "Cancelled") return over(end.doc.status);
    if (end) return asked();
    // Where cancelGeneration is not deployed the call fails as not-found, or as internal when the 404 carries
    // no CORS headers (the emulator's does not).
    if (!isCode(error, "functions/not-found", "functions/unimplemented", "functions/internal")) {
      return failed(callableMessage(error));
    }
    // No cancelGeneration callable here: ask through the doc (the rules let an owner set exactly this flag).
    const ref = doc(db, "generations", uid, job.media, job.id);
    try {
      await updateDoc(ref, { cancel_requested: true });
    } catch (docError) {
      if (!isCode(docError, "permission-denied")) return failed(`Cancel failed: ${message(docError)}`);
      // The rules allow the flag only on a job that has not finished (their own text is no message for a
      // user): say so as the callable does, where the job has finished meanwhile.
      // A call that got no answer may have cancelled it still (a review: "already failed: nothing to cancel" of
      // the job this very call cancelled, its end not heard yet).
      const [status, errorType] = await getDoc(ref).then(
        (snapshot) => [String(snapshot.get("status")), snapshot.get("error_type")],
        () => ["", undefined],
      );
      if (status === "failed" && errorType === "Cancelled") return asked();
      const finished = (FINAL_STATES as readonly string[]).includes(status);
      return finished ? over(status) : failed(CANCEL_REFUSED);
    }
  }
  return asked();
}

/** Fill the form with an ended job's request, to change it and send it as a new job; the focus goes to the
 * prompt. A job refused for its input shows its message, on the field it names, as the form's own refusal. */
function edit(form: HTMLFormElement, job: Job): void {
  fillForm(form, job.written, job.media);
  const filled = `Form filled from ${nameOf(job)}: change it and press Generate`;
  if (job.doc.status === "failed" && job.doc.error_type === "ValidationError") fail(job.doc.error_message ?? "Generation failed");
  else say("");
  $("form-status").textContent = filled;
  $<HTMLTextAreaElement>("prompt").focus();
}

/** Send a failed or cancelled job's request again, as the form sends its own: as a new job, but for a job refused
 * for its user's limits, which the callable takes again under its own id (the contract's "try again": the same
 * request re-admitted, its card back to queued, no new card). A doc the page writes is always a new job. */
async function retry({ session, form, send }: ActionContext, job: Job): Promise<string | null> {
  const via = viaOf(form, session.functions);
  const again = via !== "document" && refusedAtAdmission(job);
  const request = requestOf(job.written, job.media, session.uid, again ? job.id : newFileUid());
  // The contract's own check first, in either flow: the doc's values may be past what the page sends exactly (a
  // seed beyond 2^53 read from another client's doc), and the page says so as its form does.
  const refused = contractMessage(request);
  if (refused) {
    fail(refused, false);
    return refused;
  }
  return send(request, job.media, via, false);
}

/** Refused for its user's limits and never run (firegen_core/lifecycle.py `refused`): the callable admits it
 * again under its id. One that ran (a running job restated past the budget) keeps its answer: a new job. */
function refusedAtAdmission(job: Job): boolean {
  return (
    job.doc.status === "failed" &&
    job.doc.error_type === "QuotaExceeded" &&
    !job.written.attempts &&
    !job.written.releases
  );
}

/** Hide a failed or cancelled job in this browser; the focus goes to the card that takes its place. */
function dismiss({ dismissed, view }: ActionContext, job: Job): void {
  if (!dismissable(job)) return;
  const li = view.card(job);
  const cards = view.cards();
  dismissed.add(keyOf(job));
  view.render();
  announce(`${capital(nameOf(job))} dismissed`);
  if (li) view.passFocus(li, cards);
}

/** Delete a finished job, its files and its doc (the deleteGeneration callable), once the user confirms: its card
 * goes as the listener hears the doc is gone, the focus passed on as a Dismiss passes it. Resolves to what the card
 * says of a failure, which the live region says too: the card's note is no live region (the review: a failed
 * Delete was silent to a screen reader, its button back as if nothing had happened). */
async function remove({ session, jobs }: ActionContext, job: Job): Promise<string | null> {
  if (!window.confirm(`Delete ${nameOf(job)} and its files? This cannot be undone.`)) return null;
  const failed = !navigator.onLine || jobs.cached ? NO_ANSWER : await deleteCall(session, job);
  announce(failed ? `Could not delete ${nameOf(job)}: ${failed}` : `${capital(nameOf(job))} deleted`);
  return failed;
}

/** The deleteGeneration call; resolves to its failure, if any (a job gone meanwhile, deleted in another tab, is
 * none: as asked). */
async function deleteCall(session: Session, job: Job): Promise<string | null> {
  const { functions } = session;
  try {
    if (!functions) throw Object.assign(new Error("no functions"), { code: "functions/not-found" });
    const call = httpsCallable(functions, "deleteGeneration", { timeout: DELETE_TIMEOUT_MS });
    await call({ fileUid: job.id, mediaType: job.media });
    return null;
  } catch (error) {
    if (message(error) === "No such generation") return null;
    // Where deleteGeneration is not deployed the call fails as not-found (or unimplemented).
    if (isCode(error, "functions/not-found", "functions/unimplemented")) return DELETE_UNAVAILABLE;
    // The answer lost on its way (a dropped connection, a timeout) once the server had deleted the job: as asked
    // (the race review: "Could not delete" of a card the listener had taken away).
    if (await gone(session, job)) return null;
    return callableMessage(error);
  }
}

/** Whether the job's doc is gone, by the server's word (not the cache's); false where that cannot be read. */
async function gone({ db, uid }: Session, job: Job): Promise<boolean> {
  const ref = doc(db, "generations", uid, job.media, job.id);
  return getDocFromServer(ref).then((snapshot) => !snapshot.exists(), () => false);
}
