// The list of the user's jobs as the page shows it: the cards (jobs.ts renders them), less those dismissed, and
// around them the no-jobs line, Show N dismissed, Delete all my jobs, the page's title; and where the focus goes
// when a card goes from under it.
import type { Dismissed } from "./dismissed";
import { $, announce } from "./dom";
import { dismissable, keyOf, renderJobs, titled, type CardHandlers, type Job } from "./jobs";
import type { Session } from "./session";

const TITLE = document.title;

/** What the page knows of the user's jobs: listed by the listeners, shown here, acted on and sent elsewhere. */
export interface JobsState {
  listed: Job[];
  cached: boolean;
  loadedOnce: boolean;
  erasing: boolean; // while Delete all my jobs calls (erase.ts)
}

export class JobList {
  readonly list = $<HTMLOListElement>("jobs");
  private readonly showDismissed = $<HTMLButtonElement>("show-dismissed");
  private readonly deleteAll = $<HTMLButtonElement>("delete-all");
  handlers!: CardHandlers;

  constructor(
    private readonly session: Session,
    private readonly jobs: JobsState,
    private readonly dismissed: Dismissed,
  ) {}

  private readonly hidden = (job: Job) => dismissable(job) && this.dismissed.has(keyOf(job));

  card(job: Job): HTMLLIElement | null {
    return this.list.querySelector<HTMLLIElement>(`li[data-key="${CSS.escape(keyOf(job))}"]`);
  }

  cards(): HTMLLIElement[] {
    return [...this.list.children] as HTMLLIElement[];
  }

  /** The jobs as last listed, less those dismissed; returns what to tell screen readers. A card that goes from
   * under the focus (dismissed in another tab, deleted at its expiry) passes it on as Dismiss does (audit: the
   * focus fell to <body>). */
  render(): string[] {
    const cards = this.cards();
    const focused = document.activeElement?.closest<HTMLLIElement>("li.job") ?? null;
    const said = this.renderList();
    if (focused && (focused.hidden || !focused.isConnected)) this.passFocus(focused, cards);
    return said;
  }

  private renderList(): string[] {
    const { listed, cached, loadedOnce, erasing } = this.jobs;
    const count = listed.filter(this.hidden).length;
    // Until both collections have answered, no job listed is no news: "No jobs yet." would flash on a reload.
    // Nor is it from the cache alone (the server unreachable at a reload): the jobs are not known yet.
    $("no-jobs").textContent = loadedOnce && !cached ? "No jobs yet." : "Loading your jobs…";
    $("no-jobs").hidden = listed.length > 0;
    this.showDismissed.textContent = `Show ${count} dismissed`;
    if (!count && document.activeElement === this.showDismissed) $("jobs-title").focus();
    this.showDismissed.hidden = count === 0;
    const eraseShown = erasing || (this.session.signedIn && this.session.functions !== null && listed.length > 0);
    if (!eraseShown && document.activeElement === this.deleteAll) $("jobs-title").focus();
    this.deleteAll.hidden = !eraseShown;
    document.title = titled(TITLE, listed);
    return renderJobs(this.list, listed, this.handlers, this.hidden);
  }

  /** The focus of a card that went (hidden or removed): to the next card shown as `cards` were ordered, else the
   * one before, else Show N dismissed (else the list's title), never to <body>. */
  passFocus(gone: HTMLLIElement, cards: HTMLLIElement[]): void {
    const at = cards.indexOf(gone);
    const shown = (li: HTMLLIElement | undefined) => li !== undefined && li.isConnected && !li.hidden;
    const next = cards.slice(at + 1).find(shown) ?? cards.slice(0, Math.max(at, 0)).reverse().find(shown);
    const target: HTMLElement = next ?? (this.showDismissed.hidden ? $("jobs-title") : this.showDismissed);
    if (next) next.tabIndex = -1;
    target.focus();
  }

  /** Show N dismissed, and the jobs dismissed or shown again in another tab. */
  watchDismissed(): void {
    this.showDismissed.addEventListener("click", () => {
      const back = this.jobs.listed.filter(this.hidden);
      this.dismissed.clear();
      this.render();
      announce(`${back.length} dismissed ${back.length === 1 ? "job" : "jobs"} shown again`);
      // The button goes: the focus goes to the first job it brought back.
      const first = back.length ? this.card(back[0]) : null;
      const target = first ?? $("jobs-title");
      if (first) first.tabIndex = -1;
      target.focus();
    });
    window.addEventListener("storage", (event) => {
      if (!this.dismissed.concerns(event)) return;
      this.dismissed.reload();
      this.render();
    });
  }
}
