// Sending a request: the form's own, or a card's again (actions.ts), through the generateWithRunPod callable or as
// a queued job document (the contract's other client flow), and what the form's lines say of it meanwhile.
import { doc, serverTimestamp, setDoc, type Firestore } from "firebase/firestore";
import { httpsCallable, type Functions } from "firebase/functions";
import type { GenerationRequest, MediaType } from "./contract.gen";
import { $, newFileUid } from "./dom";
import { callableMessage, isCode } from "./errors";
import { mediaType, readRequest, reveal } from "./form";
import type { JobsState } from "./joblist";
import { capital, nameFor, QUIET_MS } from "./jobs";
import * as session from "./session";
import type { Session } from "./session";
import { fail, name, say, settle } from "./status";
import { contractMessage } from "./validate";

/** The callable's reply (functions/dispatch.py `generate`). */
interface GenerateReply {
  success: boolean;
  fileUid: string;
  mediaType: MediaType;
  status: "accepted" | "queued";
  message: string;
}

export type Via = "callable" | "document";

/** Send a request through the callable or as a queued doc, saying how it goes on the form's lines; resolves to
 * the error shown, if any. `mark`: a refusal marks the form's field it names (the form's own request). */
export type Send = (request: GenerationRequest, media: MediaType, via: Via, mark: boolean) => Promise<string | null>;

/** A job document firestore.rules refused although the contract's check passed (their own text names no field). */
const RULES_REFUSED = "The job could not be queued: the server refused its document";
/** How long a queued doc's write may wait before the page says it waits for the connection (offline, it waits). */
const SLOW_WRITE_MS = 4000;
/** Offline, a queued doc's write waits in this tab alone (the SDK's cache is in memory): closing it loses the job. */
const WAIT_OFFLINE = "Waiting for the connection… (keep this page open: the job is sent once it is back)";

export function viaOf(form: HTMLFormElement, functions: Functions | null): Via {
  const via = functions ? new FormData(form).get("via") : "document";
  return via === "document" ? "document" : "callable";
}

/** Generate (or Try again) pressed while Delete all my jobs runs. */
export const ERASING = "Wait until Delete all my jobs has finished";

export function sender({ db, functions }: Session, jobs: JobsState): Send {
  // A queued doc not yet sent lives in this tab alone (offline, the SDK's memory cache holds it): leaving the page
  // would lose the job without a word (the review), so the browser asks first.
  let unsent = 0;
  window.addEventListener("beforeunload", (event) => {
    // Not when the user changed (session.ts reloads): the old user's write is refused anyway, and a "Stay" kept the
    // page the old user's for good (the race review).
    if (unsent > 0 && !session.reloading) {
      event.preventDefault();
      event.returnValue = ""; // what Chrome and Edge before 119 ask for instead
    }
  });
  return async (request, media, via, mark) => {
    // Delete all's next pass would delete a job sent now, "Generation started" said of a job that then vanished
    // (the race review).
    if (jobs.erasing) {
      fail(ERASING, false);
      return ERASING;
    }
    // Offline, a queued doc's write waits (the SDK sends it once the connection is back): say so, at once where the
    // browser knows it is offline (a web review: "Submitting…" for 4 s first).
    const waiting = () => say(navigator.onLine ? "Still waiting for the server…" : WAIT_OFFLINE);
    if (via === "document" && !navigator.onLine) waiting();
    else say("Submitting…");
    const slow = via === "document" ? setTimeout(waiting, SLOW_WRITE_MS) : undefined;
    try {
      if (via === "document") {
        unsent += 1;
        await writeJob(db, request, media).finally(() => (unsent -= 1));
        say(`${capital(nameFor(media, request.prompt))} queued`);
        name(request.file_uid);
        settle(jobs.listed);
      } else {
        const reply = await httpsCallable<GenerationRequest, GenerateReply>(functions!, "generateWithRunPod")(request);
        say(`${reply.data.message} (${nameFor(media, request.prompt)})`);
        name(reply.data.fileUid);
        settle(jobs.listed);
      }
      return null;
    } catch (error) {
      // The callable's refusal carries its own message: the user's limits (resource-exhausted), or, were the page's
      // check and the contract's ever to differ, the contract's message, which marks its field.
      const text = isCode(error, "permission-denied") && via === "document" ? RULES_REFUSED : callableMessage(error);
      // Only a refusal of the request's values names a field to fix: a job that cannot come back under its id
      // (failed-precondition: "…so send it as a new job") names one the form holds right (audit: Width marked).
      fail(text, mark && isCode(error, "invalid-argument", "functions/invalid-argument"));
      return text;
    } finally {
      clearTimeout(slow);
    }
  };
}

/** The contract's other client flow: write the queued doc; the dispatchQueuedJob trigger (or a worker) takes it. */
async function writeJob(db: Firestore, request: GenerationRequest, media: MediaType): Promise<void> {
  const { user_id, file_uid, ...fields } = request;
  await setDoc(doc(db, "generations", user_id, media, file_uid), {
    ...fields,
    status: "queued",
    created_at: serverTimestamp(),
    generated: false,
    error: false,
  });
}

export function watchSubmit(form: HTMLFormElement, { uid, functions }: Session, send: Send): void {
  const button = $<HTMLButtonElement>("submit");
  // While a request is sent, and for a second at least, the button refuses presses but stays enabled: a disabled
  // button would drop the keyboard's focus to <body>.
  let sending = false;
  // Ctrl+Enter (⌘+Enter) in a prompt sends, as in most apps' text boxes, where Enter is a new line (an audit:
  // nothing but the mouse or Tab to Generate sent a prompt typed in).
  form.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey) || !(event.target instanceof HTMLTextAreaElement)) return;
    event.preventDefault();
    form.requestSubmit();
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (sending) return;
    const request = readRequest(form, uid, newFileUid());
    const media = mediaType(form);
    const via = viaOf(form, functions);
    // The contract's own check first, in either flow: a request it refuses is sent nowhere. A document write has
    // only the rules' verdict, which names no field; the callable would answer with the contract's message but
    // record the refusal as a failed job, one more card for a typo (newcomer audit). Text in a number field that
    // the browser cannot read is refused here too (its value would be lost on the way).
    const refused = contractMessage(request);
    if (refused) {
      // The focus goes to the field to fix, which reads the message as its description (the review: it stayed on
      // Generate, and a keyboard user went looking for the field). Not on a later refusal of the callable's: by
      // then the user may be typing elsewhere.
      reveal(fail(refused));
      return;
    }
    sending = true;
    button.setAttribute("aria-disabled", "true");
    // For a second at least, whatever the request takes: a queued doc's write takes tens of ms, and a double press
    // (Enter twice, 150-400 ms apart) made two jobs (audit).
    const held = new Promise((resolve) => setTimeout(resolve, QUIET_MS));
    try {
      await send(request, media, via, true);
    } finally {
      await held;
      sending = false;
      button.removeAttribute("aria-disabled");
    }
  });
}
