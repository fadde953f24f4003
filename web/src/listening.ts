// The user's jobs heard live (jobs.ts `listenToJobs`) and shown as they come: a page more at each Show older jobs,
// and, after a listener failed, listening again a while later.
import type { Unsubscribe } from "firebase/firestore";
import { notify, showConnection } from "./connection";
import type { Dismissed } from "./dismissed";
import { $, announce } from "./dom";
import { isCode } from "./errors";
import type { JobList, JobsState } from "./joblist";
import { dismissable, keyOf, listenToJobs, PAGE, QUIET_MS, type Job } from "./jobs";
import type { Session } from "./session";
import { settle } from "./status";

/** After a listener failed, the page listens again this long later, doubling up to LISTEN_RETRY_MAX_MS. */
const LISTEN_RETRY_MS = 2000;
const LISTEN_RETRY_MAX_MS = 60_000;

/** The wait before listening again after a failure, given the last one (0: the server had answered since). */
export function nextRetry(last: number): number {
  return Math.min(LISTEN_RETRY_MAX_MS, last ? last * 2 : LISTEN_RETRY_MS);
}

export class JobsListener {
  private readonly showOlder = $<HTMLButtonElement>("show-older");
  private shown = PAGE;
  private olderFrom: number | null = null; // Show older jobs was pressed with this many cards listed
  private widening = false; // until the wider listener has heard from the server
  private widenedAt = -Infinity; // when Show older jobs was last pressed (performance.now())
  private retryIn = 0; // the wait before listening again after a failure; 0 once the server answered
  private retryTimer: ReturnType<typeof setTimeout> | undefined;
  private stopListening: Unsubscribe = () => {};

  constructor(
    private readonly session: Session,
    private readonly jobs: JobsState,
    private readonly dismissed: Dismissed,
    private readonly view: JobList,
  ) {}

  start(): void {
    this.stopListening = this.listen();
    this.showOlder.addEventListener("click", () => this.older());
  }

  private listen(): Unsubscribe {
    return listenToJobs(
      this.session.db,
      this.session.uid,
      this.shown,
      (jobs, fromCache, more) => this.heard(jobs, fromCache, more),
      (error) => this.failed(error),
    );
  }

  private heard(jobs: Job[], fromCache: boolean, more: boolean): void {
    // A wider listener's first answer is the cache's (the narrower one's docs): no news of the connection (it
    // flashed "Cannot reach the server").
    if (!(this.widening && fromCache)) {
      this.jobs.cached = fromCache;
      showConnection(this.jobs.cached);
    }
    if (!fromCache) this.widening = false;
    if (!fromCache) this.retryIn = 0;
    this.jobs.listed = jobs;
    this.jobs.loadedOnce = true;
    const olderFocused = document.activeElement === this.showOlder;
    // As the server says it: the cache's first answer to a wider listener holds only the narrower one's docs.
    if (!fromCache) this.showOlder.hidden = !more;
    settle(this.jobs.listed);
    // Jobs deleted at their expiry are forgotten, once the server has said which there are: all of them, none
    // older left unlisted (a dismissed job past the newest listed is not gone).
    if (!fromCache && !more) this.dismissed.keepOnly(new Set(jobs.map(keyOf)));
    // A dismissed job that runs again is dismissed no more: failed again, it is news, shown (audit: it was hidden
    // again under the focus, and the live region spoke of a card nobody saw). As the server says it, not a cache.
    if (!fromCache) this.dismissed.forget(jobs.filter((job) => !dismissable(job)).map(keyOf));
    const news = this.view.render();
    // Screen readers hear a job start or end (not its every percent), and what failed it.
    if (news.length) announce(news.join(". "));
    // As Show N dismissed does: the focus goes to the first job it brought, or, none come, from the button
    // that went to the list's title, never to <body>; once the server has said which there are.
    const cards = this.view.cards();
    const first =
      this.olderFrom === null || fromCache ? undefined : cards.slice(this.olderFrom).find((li) => !li.hidden);
    if (!fromCache) this.olderFrom = null;
    // Only from where the press left it: a user who moved on (typing a prompt while a slow answer came) keeps
    // the focus (the race review: the rest of the prompt went to a card).
    if (first && (olderFocused || document.activeElement === document.body)) {
      first.tabIndex = -1;
      first.focus();
    } else if (olderFocused && this.showOlder.hidden) $("jobs-title").focus();
  }

  private failed(error: Error): void {
    // The listeners are over: said where the connection's state is, and heard again from the server a while
    // later (the review: a failed listener was never restarted, its cards froze
    // at their last percent, and the error, on the form's line, went with the next thing said there).
    this.widening = false;
    this.olderFrom = null;
    this.retryIn = nextRetry(this.retryIn);
    // The rules' own text (the emulator's quotes a rule) is no message for a user.
    const why = isCode(error, "permission-denied") ? "the server refused to list them" : error.message;
    notify(`Your jobs stopped updating: ${why}.`, ` Listening again in ${this.retryIn / 1000} s.`);
    this.jobs.cached = true;
    this.retryTimer = setTimeout(() => this.relisten(), this.retryIn);
  }

  private relisten(): void {
    const old = this.stopListening;
    this.stopListening = this.listen();
    old();
  }

  private older(): void {
    // A double click read (and billed) two pages more: a press while the last one's wider listener has not heard
    // from the server counts once it is a while old (offline, the server may not answer for long).
    if (this.widening && performance.now() - this.widenedAt < QUIET_MS) return;
    this.widenedAt = performance.now();
    clearTimeout(this.retryTimer);
    this.shown += PAGE;
    this.olderFrom = this.view.list.children.length;
    this.widening = true;
    // The wider listener first: the SDK answers it from the docs the narrower one holds, so no card goes meanwhile.
    this.relisten();
    announce("Older jobs listed");
  }
}
