// The reference web client of firegen: anonymous sign-in, a form for the contract's request, submission through
// the generateWithRunPod callable (or a queued job document, the contract's other client flow), the user's jobs
// live, their images and videos.
import { initializeApp } from "firebase/app";
import { initializeAppCheck, ReCaptchaEnterpriseProvider } from "firebase/app-check";
import { connectAuthEmulator, getAuth, onAuthStateChanged, signInAnonymously } from "firebase/auth";
import {
  connectFirestoreEmulator,
  doc,
  getDoc,
  getFirestore,
  onSnapshot,
  serverTimestamp,
  setDoc,
  Timestamp,
  updateDoc,
} from "firebase/firestore";
import { connectFunctionsEmulator, getFunctions, httpsCallable, type Functions } from "firebase/functions";
import { hostPort, loadConfig } from "./config";
import { FINAL_STATES, type GenerationRequest, type MediaType } from "./contract.gen";
import { Dismissed } from "./dismissed";
import { applyRanges, fillForm, markInvalid, mediaType, readRequest, requestOf } from "./form";
import { eraseAll, erasedMessage, ERASE_TIMEOUT_MS, type EraseReply } from "./erase";
import { CATCH_UP_MS, cameOnline, NO_ANSWER, notify, showConnection, START_RETRY_MS } from "./connection";
import { ServerClock, usageLine } from "./usage";
import { dismissable, keyOf, listenToJobs, nameFor, named as nameOf, PAGE, QUIET_MS, renderJobs, titled, type Job } from "./jobs";
import { contractMessage } from "./validate";

/** The callable's reply (functions/dispatch.py `generate`). */
interface GenerateReply {
  success: boolean;
  fileUid: string;
  mediaType: MediaType;
  status: "accepted" | "queued";
  message: string;
}

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const TITLE = document.title;

/** A job document firestore.rules refused although the contract's check passed (their own text names no field). */
const RULES_REFUSED = "The job could not be queued: the server refused its document";
/** A cancel through the doc that firestore.rules refused, on a job that has not finished (their text names nothing). */
const CANCEL_REFUSED = "Cancel failed: the server refused it";
/** How long a queued doc's write may wait before the page says it waits for the connection (offline, it waits). */
const SLOW_WRITE_MS = 4000;
/** How long the form's line about a job stays at least, once the job ended (a quick job's went in half a second). */
const MIN_SHOWN_MS = 4000;
/** The cancel callable's own limit is 30 s: past it (and a margin) no answer will come. */
const CANCEL_TIMEOUT_MS = 35_000;
/** deleteGeneration's own timeout (60 s) and a little more. */
const DELETE_TIMEOUT_MS = 65_000;
const DELETE_UNAVAILABLE = "Deleting needs the deleteGeneration function, which this project has not deployed";
const ERASE_UNAVAILABLE = "Deleting all needs the deleteAllGenerations function, which this project has not deployed";
/** After a listener failed, the page listens again this long later, doubling up to LISTEN_RETRY_MAX_MS. */
const LISTEN_RETRY_MS = 2000;
const LISTEN_RETRY_MAX_MS = 60_000;
/** Offline, a queued doc's write waits in this tab alone (the SDK's cache is in memory): closing it loses the job. */
const WAIT_OFFLINE = "Waiting for the connection… (keep this page open: the job is sent once it is back)";

/** The job the form's status line speaks of, until it ends, and since when. */
let named: string | null = null;
let namedAt = 0;

function name(id: string): void {
  named = id;
  namedAt = Date.now();
}

function say(text: string): void {
  named = null;
  $("form-error").textContent = "";
  markInvalid(null, "form-error");
  $("form-status").textContent = text;
}

/** Show an error; one that names a field of the form marks that field invalid and is its description (not for a
 * card's request, which the form does not hold: `mark` false). Returns the field marked, if any. */
function fail(text: string, mark = true): HTMLElement | null {
  $("form-status").textContent = "";
  $("form-error").textContent = text;
  return markInvalid(mark ? text : null, "form-error");
}

function capital(text: string): string {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

function message(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function isCode(error: unknown, ...codes: string[]): boolean {
  return typeof error === "object" && error !== null && codes.includes((error as { code?: string }).code ?? "");
}

/** What to show for a failed callable: its own message, unless it got no answer it could read (offline, a server
 * error page, a timeout: the SDK's message is then its code, "internal", or "INTERNAL" for a server's 500). */
function callableMessage(error: unknown): string {
  // Any code alone (a proxy's 502 reads "unknown", a 429 "resource-exhausted"): no message of the server's.
  const code = (error as { code?: string } | null)?.code ?? "";
  return message(error).toLowerCase() === code.replace(/^functions\//, "") ? NO_ANSWER : message(error);
}

async function main(): Promise<void> {
  const config = await loadConfig();
  const app = initializeApp(config.options);
  if (config.settings.appCheckSiteKey) {
    // Before any other service: deployed, the callables (and Firestore, once enforced) refuse calls without a
    // token, and each service asks App Check for one from its first request on.
    const provider = new ReCaptchaEnterpriseProvider(config.settings.appCheckSiteKey);
    initializeAppCheck(app, { provider, isTokenAutoRefreshEnabled: true });
  }
  const db = getFirestore(app);
  const emulators = config.emulators;
  let functions: Functions | null = getFunctions(app, config.settings.functionsRegion ?? undefined);
  let uid: string;
  let signedIn = false; // through Firebase Auth: the callables know who calls
  if (emulators) {
    connectFirestoreEmulator(db, ...hostPort(emulators.firestore));
    if (emulators.functions) connectFunctionsEmulator(functions, ...hostPort(emulators.functions));
    else functions = null;
  }
  if (emulators && !emulators.auth) {
    // make dev's fallback (no Auth or Functions emulator, no rules): a fixed user, job documents only.
    uid = emulators.uid ?? "local-user";
    $("who").textContent = `Local user ${uid} (no Auth emulator: jobs are submitted as documents)`;
    (document.querySelector("input[name=via][value=document]") as HTMLInputElement).checked = true;
    (document.querySelector("input[name=via][value=callable]") as HTMLInputElement).disabled = true;
  } else {
    const auth = getAuth(app);
    if (emulators?.auth) connectAuthEmulator(auth, `http://${emulators.auth}`, { disableWarnings: true });
    await signInAnonymously(auth);
    uid = await new Promise<string>((resolve) => onAuthStateChanged(auth, (user) => user && resolve(user.uid)));
    $("who").textContent = `Signed in anonymously as ${uid}`;
    signedIn = true;
    // Signed out later (in another tab, or the account deleted, as apps do with old anonymous users: its token
    // refresh then fails): the page was still the old user's, its listeners refused, its calls unauthenticated
    // (the review). It starts again, signed in anew.
    const started = uid;
    onAuthStateChanged(auth, (user) => {
      if (user?.uid !== started) location.reload();
    });
  }
  document.body.dataset.uid = uid;

  // What is left of the user's limits, live; the day's spend goes back to 0 at midnight UTC without a write, so the
  // line is drawn again each minute too. A listener the server refuses (rules without the usage match) hides it.
  let usage: Record<string, unknown> | undefined;
  let heardUsage = false;
  const serverClock = new ServerClock();
  const showUsage = () => ($("usage").textContent = usageLine(usage, serverClock.now()));
  onSnapshot(
    doc(db, "usage", uid),
    (snapshot) => {
      usage = snapshot.data();
      const written = usage?.updated_at;
      if (written instanceof Timestamp && !snapshot.metadata.fromCache && !snapshot.metadata.hasPendingWrites) {
        serverClock.observe(written.toMillis(), Date.now(), heardUsage);
        heardUsage = true;
      }
      showUsage();
      $("usage").hidden = false;
    },
    () => ($("usage").hidden = true),
  );
  setInterval(showUsage, 60_000);

  const form = $<HTMLFormElement>("generate");
  const list = $<HTMLOListElement>("jobs");
  applyRanges(form);
  form.addEventListener("change", (event) => {
    if ((event.target as HTMLInputElement).name === "media") applyRanges(form);
  });

  let cached = false;
  let listed: Job[] = [];
  const deleteAll = $<HTMLButtonElement>("delete-all");
  let erasing = false; // while Delete all my jobs calls (erase.ts)
  const dismissed = new Dismissed(config.options.projectId ?? "", uid);
  const ended = (id: string | null) =>
    listed.some((job) => job.id === id && (FINAL_STATES as readonly string[]).includes(job.doc.status));
  /** The form's line about a job is old news once the job ended (its card says how): it goes, a while later. */
  const settle = () => {
    if (!ended(named)) return;
    const id = named;
    setTimeout(() => {
      if (named !== id) return; // the line speaks of something else by now
      $("form-status").textContent = "";
      named = null;
    }, Math.max(0, namedAt + MIN_SHOWN_MS - Date.now()));
  };
  /** Ask a job to stop; resolves to what its card says of a failure, which the form's alert says too (the card's
   * line, beside its Cancel: on a phone the form's is a screen away, the review). */
  const cancel = async (job: Job): Promise<string | null> => {
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
    // Offline (or the server unreachable, as the listeners found), the callable fails as it does where it is not
    // deployed, and the doc's write would wait unseen (audit: "Cancelling…" for a minute, the button refusing
    // presses).
    if (!navigator.onLine || cached) return failed(NO_ANSWER);
    say(`Cancelling ${nameOf(job)}…`);
    name(job.id); // the line goes when the job ends, whatever the call comes to
    try {
      if (!functions) throw Object.assign(new Error("no functions"), { code: "functions/not-found" });
      const call = httpsCallable(functions, "cancelGeneration", { timeout: CANCEL_TIMEOUT_MS });
      await call({ fileUid: job.id, mediaType: job.media });
    } catch (error) {
      // A call that failed once the job had ended anyway (a flaky connection): say so as the callable would (an
      // audit saw "Could not reach the server" beside a Completed card).
      const end = listed.find((listedJob) => listedJob.id === job.id && ended(job.id));
      if (end && end.doc.error_type !== "Cancelled") return over(end.doc.status);
      if (end) {
        say(`Cancel requested for ${nameOf(job)}`);
        return null;
      }
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
        const status = await getDoc(ref).then((snapshot) => String(snapshot.get("status")), () => "");
        const finished = (FINAL_STATES as readonly string[]).includes(status);
        return finished ? over(status) : failed(CANCEL_REFUSED);
      }
    }
    say(`Cancel requested for ${nameOf(job)}`);
    name(job.id);
    settle();
    return null;
  };

  window.addEventListener("online", () => {
    cameOnline();
    showConnection(cached);
    setTimeout(() => showConnection(cached), CATCH_UP_MS + 50);
  });
  window.addEventListener("offline", () => showConnection(cached));
  /** Fill the form with an ended job's request, to change it and send it as a new job; the focus goes to the
   * prompt. A job refused for its input shows its message, on the field it names, as the form's own refusal. */
  const edit = (job: Job) => {
    fillForm(form, job.written, job.media);
    const filled = `Form filled from ${nameOf(job)}: change it and press Generate`;
    if (job.doc.status === "failed" && job.doc.error_type === "ValidationError") fail(job.doc.error_message ?? "Generation failed");
    else say("");
    $("form-status").textContent = filled;
    $<HTMLTextAreaElement>("prompt").focus();
  };
  /** Send a failed or cancelled job's request again, as the form sends its own: as a new job, but for a job refused
   * for its user's limits, which the callable takes again under its own id (the contract's "try again": the same
   * request re-admitted, its card back to queued, no new card). A doc the page writes is always a new job. */
  const retry = async (job: Job): Promise<string | null> => {
    const via = functions ? new FormData(form).get("via") : "document";
    const again = via !== "document" && refusedAtAdmission(job);
    const request = requestOf(job.written, job.media, uid, again ? job.id : crypto.randomUUID());
    // The contract's own check first, in either flow: the doc's values may be past what the page sends exactly (a
    // seed beyond 2^53 read from another client's doc), and the page says so as its form does.
    const refused = contractMessage(request);
    if (refused) {
      fail(refused, false);
      return refused;
    }
    return send(request, job.media, via === "document" ? "document" : "callable", false);
  };
  /** Refused for its user's limits and never run (firegen_core/lifecycle.py `refused`): the callable admits it
   * again under its id. One that ran (a running job restated past the budget) keeps its answer: a new job. */
  const refusedAtAdmission = (job: Job) =>
    job.doc.status === "failed" &&
    job.doc.error_type === "QuotaExceeded" &&
    !job.written.attempts &&
    !job.written.releases;
  /** Hide a failed or cancelled job in this browser; the focus goes to the card that takes its place. */
  const dismiss = (job: Job) => {
    if (!dismissable(job)) return;
    const li = list.querySelector<HTMLLIElement>(`li[data-key="${CSS.escape(keyOf(job))}"]`);
    const cards = [...list.children] as HTMLLIElement[];
    dismissed.add(keyOf(job));
    render();
    $("job-news").textContent = `${capital(nameOf(job))} dismissed`;
    if (li) passFocus(li, cards);
  };
  /** The focus of a card that went (hidden or removed): to the next card shown as `cards` were ordered, else the
   * one before, else Show N dismissed (else the list's title), never to <body>. */
  const passFocus = (gone: HTMLLIElement, cards: HTMLLIElement[]) => {
    const at = cards.indexOf(gone);
    const shown = (li: HTMLLIElement | undefined) => li !== undefined && li.isConnected && !li.hidden;
    const next = cards.slice(at + 1).find(shown) ?? cards.slice(0, Math.max(at, 0)).reverse().find(shown);
    const target: HTMLElement = next ?? (showDismissed.hidden ? $("jobs-title") : showDismissed);
    if (next) next.tabIndex = -1;
    target.focus();
  };
  /** Delete a finished job, its files and its doc (the deleteGeneration callable), once the user confirms: its card
   * goes as the listener hears the doc is gone, the focus passed on as a Dismiss passes it. Resolves to what the card
   * says of a failure, which the live region says too: the card's note is no live region (the review: a failed
   * Delete was silent to a screen reader, its button back as if nothing had happened). */
  const remove = async (job: Job): Promise<string | null> => {
    if (!window.confirm(`Delete ${nameOf(job)} and its files? This cannot be undone.`)) return null;
    const failed = !navigator.onLine || cached ? NO_ANSWER : await deleteCall(job);
    $("job-news").textContent = failed ? `Could not delete ${nameOf(job)}: ${failed}` : `${capital(nameOf(job))} deleted`;
    return failed;
  };
  /** The deleteGeneration call; resolves to its failure, if any (a job gone meanwhile, deleted in another tab, is
   * none: as asked). */
  const deleteCall = async (job: Job): Promise<string | null> => {
    try {
      if (!functions) throw Object.assign(new Error("no functions"), { code: "functions/not-found" });
      const call = httpsCallable(functions, "deleteGeneration", { timeout: DELETE_TIMEOUT_MS });
      await call({ fileUid: job.id, mediaType: job.media });
      return null;
    } catch (error) {
      if (message(error) === "No such generation") return null;
      // Where deleteGeneration is not deployed the call fails as not-found (or unimplemented).
      if (isCode(error, "functions/not-found", "functions/unimplemented")) return DELETE_UNAVAILABLE;
      return callableMessage(error);
    }
  };
  const handlers = { cancel, edit, retry, dismiss, remove };
  const showDismissed = $<HTMLButtonElement>("show-dismissed");
  showDismissed.addEventListener("click", () => {
    const back = listed.filter((job) => dismissable(job) && dismissed.has(keyOf(job)));
    dismissed.clear();
    render();
    $("job-news").textContent = `${back.length} dismissed ${back.length === 1 ? "job" : "jobs"} shown again`;
    // The button goes: the focus goes to the first job it brought back.
    const first = back.length ? list.querySelector<HTMLLIElement>(`li[data-key="${CSS.escape(keyOf(back[0]))}"]`) : null;
    const target = first ?? $("jobs-title");
    if (first) first.tabIndex = -1;
    target.focus();
  });
  let loadedOnce = false;
  /** The jobs as last listed, less those dismissed; returns what to tell screen readers. A card that goes from
   * under the focus (dismissed in another tab, deleted at its expiry) passes it on as Dismiss does (audit: the
   * focus fell to <body>). */
  const render = (): string[] => {
    const cards = [...list.children] as HTMLLIElement[];
    const focused = document.activeElement?.closest<HTMLLIElement>("li.job") ?? null;
    const said = renderList();
    if (focused && (focused.hidden || !focused.isConnected)) passFocus(focused, cards);
    return said;
  };
  const renderList = (): string[] => {
    const hidden = (job: Job) => dismissable(job) && dismissed.has(keyOf(job));
    const count = listed.filter(hidden).length;
    // Until both collections have answered, no job listed is no news: "No jobs yet." would flash on a reload.
    // Nor is it from the cache alone (the server unreachable at a reload): the jobs are not known yet.
    $("no-jobs").textContent = loadedOnce && !cached ? "No jobs yet." : "Loading your jobs…";
    $("no-jobs").hidden = listed.length > 0;
    showDismissed.textContent = `Show ${count} dismissed`;
    if (!count && document.activeElement === showDismissed) $("jobs-title").focus();
    showDismissed.hidden = count === 0;
    const eraseShown = erasing || (signedIn && functions !== null && listed.length > 0);
    if (!eraseShown && document.activeElement === deleteAll) $("jobs-title").focus();
    deleteAll.hidden = !eraseShown;
    document.title = titled(TITLE, listed);
    return renderJobs(list, listed, handlers, hidden);
  };
  window.addEventListener("storage", (event) => {
    if (!dismissed.concerns(event)) return;
    dismissed.reload();
    render();
  });
  /** Delete all the user's jobs and files (an app's account deletion), once confirmed: passes of the
   * deleteAllGenerations callable until it says all is deleted (erase.ts); the cards go as the listeners hear. */
  deleteAll.addEventListener("click", async () => {
    if (erasing) return;
    if (!window.confirm("Delete all your jobs and their files? Running jobs are stopped. This cannot be undone.")) return;
    const status = $("delete-all-status");
    if (!navigator.onLine || cached) {
      status.textContent = NO_ANSWER;
      return;
    }
    // Refuses presses but stays enabled, as Generate does: a disabled button would drop the focus to <body>.
    erasing = true;
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
      erasing = false;
      deleteAll.removeAttribute("aria-disabled");
      render();
    }
  });
  const showOlder = $<HTMLButtonElement>("show-older");
  let shown = PAGE;
  let olderFrom: number | null = null; // Show older jobs was pressed with this many cards listed
  let widening = false; // until the wider listener has heard from the server
  let widenedAt = -Infinity; // when Show older jobs was last pressed (performance.now())
  const listen = () =>
    listenToJobs(
      db,
      uid,
      shown,
      (jobs, fromCache, more) => {
        // A wider listener's first answer is the cache's (the narrower one's docs): no news of the connection (it
        // flashed "Cannot reach the server").
        if (!(widening && fromCache)) {
          cached = fromCache;
          showConnection(cached);
        }
        if (!fromCache) widening = false;
        if (!fromCache) retryIn = 0;
        listed = jobs;
        loadedOnce = true;
        const olderFocused = document.activeElement === showOlder;
        // As the server says it: the cache's first answer to a wider listener holds only the narrower one's docs.
        if (!fromCache) showOlder.hidden = !more;
        settle();
        // Jobs deleted at their expiry are forgotten, once the server has said which there are: all of them, none
        // older left unlisted (a dismissed job past the newest listed is not gone).
        if (!fromCache && !more) dismissed.keepOnly(new Set(jobs.map(keyOf)));
        // A dismissed job that runs again is dismissed no more: failed again, it is news, shown (audit: it was hidden
        // again under the focus, and the live region spoke of a card nobody saw). As the server says it, not a cache.
        if (!fromCache) dismissed.forget(jobs.filter((job) => !dismissable(job)).map(keyOf));
        const news = render();
        // Screen readers hear a job start or end (not its every percent), and what failed it.
        if (news.length) $("job-news").textContent = news.join(". ");
        // As Show N dismissed does: the focus goes to the first job it brought, or, none come, from the button
        // that went to the list's title, never to <body>; once the server has said which there are.
        const cards = [...list.children] as HTMLLIElement[];
        const first = olderFrom === null || fromCache ? undefined : cards.slice(olderFrom).find((li) => !li.hidden);
        if (!fromCache) olderFrom = null;
        if (first) {
          first.tabIndex = -1;
          first.focus();
        } else if (olderFocused && showOlder.hidden) $("jobs-title").focus();
      },
      (error) => {
        // The listeners are over: said where the connection's state is, and heard again from the server a while
        // later (the review: a failed listener was never restarted, its cards froze
        // at their last percent, and the error, on the form's line, went with the next thing said there).
        widening = false;
        olderFrom = null;
        retryIn = Math.min(LISTEN_RETRY_MAX_MS, retryIn ? retryIn * 2 : LISTEN_RETRY_MS);
        // The rules' own text (the emulator's quotes a rule) is no message for a user.
        const why = isCode(error, "permission-denied") ? "the server refused to list them" : error.message;
        notify(`Your jobs stopped updating: ${why}.`, ` Listening again in ${retryIn / 1000} s.`);
        cached = true;
        retryTimer = setTimeout(() => {
          const failed = stopListening;
          stopListening = listen();
          failed();
        }, retryIn);
      },
    );
  let retryIn = 0; // the wait before listening again after a failure; 0 once the server answered
  let retryTimer: ReturnType<typeof setTimeout> | undefined;
  let stopListening = listen();
  showOlder.addEventListener("click", () => {
    // A double click read (and billed) two pages more: a press while the last one's wider listener has not heard
    // from the server counts once it is a while old (offline, the server may not answer for long).
    if (widening && performance.now() - widenedAt < QUIET_MS) return;
    widenedAt = performance.now();
    clearTimeout(retryTimer);
    shown += PAGE;
    olderFrom = list.children.length;
    widening = true;
    // The wider listener first: the SDK answers it from the docs the narrower one holds, so no card goes meanwhile.
    const narrower = stopListening;
    stopListening = listen();
    narrower();
    $("job-news").textContent = "Older jobs listed";
  });

  const button = $<HTMLButtonElement>("submit");
  // While a request is sent, and for a second at least, the button refuses presses but stays enabled: a disabled
  // button would drop the keyboard's focus to <body>.
  let sending = false;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (sending) return;
    const request = readRequest(form, uid, crypto.randomUUID());
    const media = mediaType(form);
    const via = functions ? new FormData(form).get("via") : "document";
    // The contract's own check first, in either flow: a request it refuses is sent nowhere. A document write has
    // only the rules' verdict, which names no field; the callable would answer with the contract's message but
    // record the refusal as a failed job, one more card for a typo (newcomer audit). Text in a number field that
    // the browser cannot read is refused here too (its value would be lost on the way).
    const refused = contractMessage(request);
    if (refused) {
      // The focus goes to the field to fix, which reads the message as its description (the review: it stayed on
      // Generate, and a keyboard user went looking for the field). Not on a later refusal of the callable's: by
      // then the user may be typing elsewhere.
      fail(refused)?.focus();
      return;
    }
    sending = true;
    button.setAttribute("aria-disabled", "true");
    // For a second at least, whatever the request takes: a queued doc's write takes tens of ms, and a double press
    // (Enter twice, 150-400 ms apart) made two jobs (audit).
    const held = new Promise((resolve) => setTimeout(resolve, QUIET_MS));
    try {
      await send(request, media, via === "document" ? "document" : "callable", true);
    } finally {
      await held;
      sending = false;
      button.removeAttribute("aria-disabled");
    }
  });

  /** Send a request through the callable or as a queued doc, saying how it goes on the form's lines; resolves to
   * the error shown, if any. `mark`: a refusal marks the form's field it names (the form's own request). */
  async function send(
    request: GenerationRequest,
    media: MediaType,
    via: "callable" | "document",
    mark: boolean,
  ): Promise<string | null> {
    say("Submitting…");
    // Offline, a queued doc's write waits (the SDK sends it once the connection is back): say so.
    const waiting = () => say(navigator.onLine ? "Still waiting for the server…" : WAIT_OFFLINE);
    const slow = via === "document" ? setTimeout(waiting, SLOW_WRITE_MS) : undefined;
    try {
      if (via === "document") {
        unsent += 1;
        await writeJob(request, media).finally(() => (unsent -= 1));
        say(`${capital(nameFor(media, request.prompt))} queued`);
        name(request.file_uid);
        settle();
      } else {
        const reply = await httpsCallable<GenerationRequest, GenerateReply>(functions!, "generateWithRunPod")(request);
        say(`${reply.data.message} (${nameFor(media, request.prompt)})`);
        name(reply.data.fileUid);
        settle();
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
  }

  /** The contract's other client flow: write the queued doc; the dispatchQueuedJob trigger (or a worker) takes it. */
  async function writeJob(request: GenerationRequest, media: MediaType): Promise<void> {
    const { user_id, file_uid, ...fields } = request;
    await setDoc(doc(db, "generations", user_id, media, file_uid), {
      ...fields,
      status: "queued",
      created_at: serverTimestamp(),
      generated: false,
      error: false,
    });
  }

  // A queued doc not yet sent lives in this tab alone (offline, the SDK's memory cache holds it): leaving the page
  // would lose the job without a word (the review), so the browser asks first.
  let unsent = 0;
  window.addEventListener("beforeunload", (event) => {
    if (unsent > 0) event.preventDefault();
  });

  button.disabled = false;
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
  if (isCode(error, "auth/network-request-failed")) {
    window.addEventListener("online", () => location.reload(), { once: true });
    setTimeout(() => navigator.onLine && location.reload(), START_RETRY_MS);
  }
});

/** Why the start failed, for the page's user: the SDK's own text ("Firebase: Error (auth/...)") says little. */
function startFailure(error: unknown): string {
  if (isCode(error, "auth/network-request-failed")) {
    return "could not reach the server; check your connection (the page starts again once it is back)";
  }
  if (isCode(error, "auth/admin-restricted-operation", "auth/operation-not-allowed")) {
    return "anonymous sign-in is not enabled in this Firebase project (Firebase console > Authentication > Sign-in method)";
  }
  return message(error);
}
