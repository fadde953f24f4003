// The signed-in user's usage of the per-user limits (usage/{uid}, which its owner may read: firestore.rules), as one
// line above their jobs: what is left before a job is refused `QuotaExceeded` (README "Per-user limits").
import type { UsageDoc } from "./contract.gen";

/** A count or an amount as the doc holds it: 0 where an admin's write left something else. */
function amount(value: unknown): number {
  return typeof value === "number" && Number.isFinite(value) && value > 0 ? value : 0;
}

/** GPU-seconds: whole where whole, else to a tenth. */
function seconds(value: number): string {
  return Number.isInteger(value) ? String(value) : value.toFixed(1);
}

const HOUR = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });

/** When the day's budget is back: the next UTC midnight, and in the reader's time where that is another (an audit:
 * "until 00:00 UTC" left the sum to the user). */
function resets(now: Date): string {
  const next = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate() + 1));
  return next.getTimezoneOffset() === 0 ? "00:00 UTC" : `00:00 UTC (${HOUR.format(next)} your time)`;
}

/** The line for the usage doc as it stands at `now` (undefined: no doc, nothing admitted so far or gone by its TTL). */
export function usageLine(usage: Partial<UsageDoc> | undefined, now: Date): string {
  const limits = usage?.limits;
  if (!usage || !limits) return "Your limits: nothing used yet";
  // Another day's spend is 0 today (the doc is written again only when a job of the user's moves).
  const spent = usage.day === now.toISOString().slice(0, 10) ? amount(usage.spent_today) : 0;
  const pending = amount(usage.pending);
  const budget = amount(limits.daily_budget);
  const jobs = `${pending} of ${amount(limits.max_pending)} jobs queued or running (${amount(usage.running)} of ${amount(limits.max_running)} at once)`;
  const refused =
    spent >= budget
      ? `: today's budget is spent, new jobs are refused until ${resets(now)}`
      : pending >= amount(limits.max_pending)
        ? ": new jobs are refused until one of these ends"
        : "";
  return `Your limits: ${jobs}; ${seconds(spent)} of ${seconds(budget)} GPU-seconds used today${refused}`;
}

/** How far this browser's clock may plausibly be from Firestore's; a write heard further off was heard late. */
const PLAUSIBLE_SKEW_MS = 10 * 60_000;

/**
 * Firestore's clock as this page can tell it: the usage doc's `updated_at` is the server's time of its write (the
 * clock review: "today" was the browser's, so a clock minutes fast showed a spent budget as free at midnight, and
 * one slow showed it spent after the server's reset). Each write heard says the server's now was at least its time
 * when heard: the closest such bound is the measure, as a write heard late (a reconnection) only lowers its own.
 * One read at load counts only where it shows this clock behind (an old write says nothing of one ahead).
 */
export class ServerClock {
  private offset: number | null = null;

  /** A write of the server's at `serverMs`, heard at `localMs`; `fresh`: heard as it happened (not a first read). */
  observe(serverMs: number, localMs: number, fresh: boolean): void {
    const atLeast = serverMs - localMs;
    if (!Number.isFinite(atLeast) || Math.abs(atLeast) > PLAUSIBLE_SKEW_MS || (!fresh && atLeast <= 0)) return;
    this.offset = Math.max(this.offset ?? atLeast, atLeast);
  }

  now(localMs: number = Date.now()): Date {
    return new Date(localMs + (this.offset ?? 0));
  }
}
