"""Per-user limits and accounting, as pure decisions: a job's estimated GPU cost, what counts as pending or
running, and whether one more job may be admitted.

Counts are derived from the job doc alone, so every transition keeps them exact without knowing about them
(the job store applies `change(before, update)` to the user's usage doc in the same atomic commit):

    pending(doc) = admitted and status in (queued, processing)
    running(doc) = admitted and status == processing

A job is admitted once (`quota_admitted: true`, with its `cost`), at whichever door sees it first: the
callable, the creation trigger, the runsync handler, or a worker (its listener, as it hears of a client's doc;
else its claim). Admission charges the cost to the day's spend; a job that fails without ever being claimed
(`never_ran`: cancelled while queued, never picked up) is refunded the day it was charged (`charged_on`), any
other is not. A job never
admitted (refused, or a doc that breaks the contract) never counts.

The usage doc `usage/{uid}`: running, pending, spent_today, day (UTC date of spent_today: it starts again at 0
at UTC midnight, reset lazily by the next write of a new day), limits, resets_at, updated_at, and, while nothing
of the user's is pending, expire_at (`usage_expiry`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

from .contract import GenerationRequest

USAGE_COLLECTION = "usage"
ADMITTED = "quota_admitted"  # on a job doc: counted in its user's usage while pending
COST = "cost"  # on a job doc: its estimated cost in GPU-seconds, charged at admission
CHARGED_ON = "charged_on"  # on a job doc: the UTC day (YYYY-MM-DD) whose spend its admission charged
# On a job doc its request restated: what its stopped tries used, within its cost, until a worker takes it again
# (a job that ends before that is charged this alone: its new estimate never ran).
STOPPED_COST = "stopped_cost"
# On a job doc: the GPU time its tries ran until their workers left and gave it back (`released_cost`). Not in its
# `cost`: charged only where it ends before running to its end (cancelled, given up), as `STOPPED_COST` says then.
RELEASED_COST = "released_cost"

# --- the cost model: estimated GPU-seconds on an H100 (bf16), from the README's measured figures -----------
# SDXL 1024x1024, 30 steps with CFG: 2.46 s per image. Cost grows with pixels x steps x images.
SDXL_SECONDS = 2.46 / (1024 * 1024 * 30)  # per pixel x step x image
# Wan 2.1 480x832, 81 frames with CFG: 1.32 s per denoising step, and 4.1 s for its VAE decode.
WAN_PIXEL_FRAMES = 480 * 832 * 81
WAN_STEP_SECONDS = 1.32
WAN_DECODE_SECONDS = 4.1  # grows with pixels x frames (the VAE's convolutions)
# A step's self-attention over all of a video's tokens grows with their square: ~70% of its FLOPs at the
# calibration size (issue #14's count). Above that size (up to 1024x1024x81, 2.6 times its pixels) a step costs
# that much more: the largest video's step is 5.6 times the calibration's, not 2.6 (an audit: it was charged 174
# GPU-seconds for ~370 of work). Below it the linear rate is kept: a small video uses the GPU less well than its
# FLOPs say.
WAN_ATTENTION_SHARE = 0.7
# Per job whatever its size: text encoding, encoding the files, upload (an image's decode: a fraction of a second).
JOB_OVERHEAD_SECONDS = 1.0


def wan_step_scale(pixel_frames: float) -> float:
    """A Wan step's time relative to the calibration's (480x832, 81 frames)."""
    scale = pixel_frames / WAN_PIXEL_FRAMES
    return scale if scale <= 1 else (1 - WAN_ATTENTION_SHARE) * scale + WAN_ATTENTION_SHARE * scale**2


def estimate(request: GenerationRequest) -> float:
    """The job's estimated cost in GPU-seconds (3 decimals)."""
    if request.is_video:
        pixel_frames = request.video_width * request.video_height * request.num_frames
        steps = WAN_STEP_SECONDS * wan_step_scale(pixel_frames) * request.num_inference_steps
        work = steps + WAN_DECODE_SECONDS * pixel_frames / WAN_PIXEL_FRAMES
    else:
        pixels = request.width * request.height * request.num_images_per_prompt
        work = SDXL_SECONDS * pixels * request.num_inference_steps
    return round(JOB_OVERHEAD_SECONDS + work, 3)


def number(doc: Mapping[str, Any], name: str) -> float:
    """A count or amount a job or usage doc keeps (`attempts`, `spent_today`, ...): 0 where absent or unreadable.
    An admin's stray value (`attempts: "abc"`) must not wedge a job: every claim of it raised, once a sweep."""
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0
    return max(value, 0)


# The limits' upper bounds: each admission writes them into the usage doc, and Firestore refuses an integer past 64
# bits (an audit: USER_MAX_PENDING=99999999999999999999 for "no limit" started, then every admission failed, "Could
# not record the job"). Past what any app needs, so the bound is "no limit" in practice.
MAX_COUNT_LIMIT = 1_000_000
MAX_DAILY_BUDGET = 1_000_000_000  # GPU-seconds a day: ~31 years of one GPU


@dataclass(frozen=True)
class Limits:
    """USER_MAX_RUNNING, USER_MAX_PENDING, USER_DAILY_BUDGET (GPU-seconds per UTC day)."""

    max_running: int = 2
    max_pending: int = 20
    daily_budget: float = 600.0

    def __post_init__(self):
        counts = (self.max_running, self.max_pending)
        if not (all(1 <= n <= MAX_COUNT_LIMIT for n in counts) and 0 < self.daily_budget <= MAX_DAILY_BUDGET):
            raise ValueError(f"user limits must be positive and within their bounds: {self}")

    def document(self) -> dict[str, Any]:
        return {"max_running": self.max_running, "max_pending": self.max_pending, "daily_budget": self.daily_budget}


def day_of(now: datetime) -> str:
    return now.astimezone(UTC).date().isoformat()


def resets_at(now: datetime) -> datetime:
    """The next UTC midnight: when the day's spend starts again at 0."""
    return datetime.combine(now.astimezone(UTC).date() + timedelta(days=1), time(), tzinfo=UTC)


def usage_expiry(usage: Usage, now: datetime, retention_days: float) -> datetime | None:
    """When a user's usage doc may go (its `expire_at`, for the TTL policy on `usage`): RETENTION_DAYS past the
    day's reset, once nothing of the user's is pending; None while something is (a doc gone would forget what it
    counts) or with retention off. A new uid per browser (anonymous sign-in) left one doc for good per user ever."""
    if retention_days <= 0 or usage.running or usage.pending:
        return None
    return resets_at(now) + timedelta(days=retention_days)


@dataclass(frozen=True)
class Change:
    """What one transition does to its user's usage."""

    running: int = 0
    pending: int = 0
    charge: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.running or self.pending or self.charge)


@dataclass(frozen=True)
class Usage:
    """A user's usage doc as of `day` (spent_today is 0 on a new day)."""

    running: int = 0
    pending: int = 0
    spent_today: float = 0.0
    day: str = ""

    @classmethod
    def read(cls, doc: Mapping[str, Any] | None, now: datetime) -> Usage:
        doc = doc or {}
        today = day_of(now)
        spent = float(number(doc, "spent_today")) if doc.get("day") == today else 0.0
        return cls(int(number(doc, "running")), int(number(doc, "pending")), spent, today)

    def after(self, change: Change) -> Usage:
        # Never below 0: a count can only go negative if a job doc was deleted or edited by hand.
        return Usage(
            max(self.running + change.running, 0),
            max(self.pending + change.pending, 0),
            max(round(self.spent_today + change.charge, 3), 0.0),
            self.day,
        )

    def document(self, limits: Limits, now: datetime, server_time: Any) -> dict[str, Any]:
        return {
            "running": self.running,
            "pending": self.pending,
            "spent_today": self.spent_today,
            "day": self.day,
            "limits": limits.document(),
            "resets_at": resets_at(now),
            "updated_at": server_time,
        }


def admitted(doc: Mapping[str, Any] | None) -> bool:
    return bool(doc and doc.get(ADMITTED) is True)


def pending(doc: Mapping[str, Any] | None) -> bool:
    return doc is not None and admitted(doc) and doc.get("status") in ("queued", "processing")


def running(doc: Mapping[str, Any] | None) -> bool:
    return doc is not None and admitted(doc) and doc.get("status") == "processing"


def merged(before: Mapping[str, Any] | None, update: Mapping[str, Any]) -> dict[str, Any]:
    """The doc as it stands after `update` (the fields quota looks at are plain values, never sentinels)."""
    return {**(before or {}), **update}


def ran(doc: Mapping[str, Any]) -> bool:
    """A worker claimed it once. A release gives its try back to `attempts` (a shutdown is no failure of the
    job) but counts in `releases`: a job released, then queued again, ran on a GPU until its release."""
    return bool(doc.get("attempts") or doc.get("releases"))


def never_ran(doc: Mapping[str, Any]) -> bool:
    """Failed before any worker claimed it: cancelled while queued, never picked up, its dispatch refused."""
    return doc.get("status") == "failed" and not ran(doc)


def charged_on(doc: Mapping[str, Any], today: str | None) -> str | None:
    """The UTC day whose spend the job's cost went to (jobs admitted before `charged_on` was written: the day
    they were created)."""
    created = doc.get("created_at")
    return doc.get(CHARGED_ON) or (day_of(created) if isinstance(created, datetime) else today)


def _charged(doc: Mapping[str, Any] | None, today: str | None) -> float:
    """What the job adds to `today`'s spend: its cost, charged today. An earlier day's spend is gone with that
    day (a change to such a job moves nothing of it to today's), and a job that ended without running used no
    GPU (refunded)."""
    if doc is None or not admitted(doc):
        return 0.0
    if today is not None and (charged_on(doc, today) != today or never_ran(doc)):
        return 0.0
    stopped = doc.get(STOPPED_COST)
    if doc.get("status") == "failed" and isinstance(stopped, int | float) and not isinstance(stopped, bool):
        return float(number(doc, STOPPED_COST))  # ended before a worker took it again (a claim clears it)
    return float(number(doc, COST))


def _try_ran(before: Mapping[str, Any], estimate: float, now: datetime) -> float:
    """The GPU time a running job's try ran: since its `started_at`, at most its estimate. A try whose worker is
    gone (its lease ran out) ran until its last sign of life, the `modified` of its last renewal (a review: a job
    cancelled after its worker was killed was charged the whole lease it waited for a takeover, up to 120 s of
    GPU time nobody ran; the owner's cancel writes no `modified`). A try whose denoising ended (its `progress` 1,
    which a try stopped during its upload also ends with: `lifecycle.DELIVERED`) ran its whole estimate: its results
    may be in the bucket, where their owner can read them before the doc says `completed`."""
    if number(before, "progress") >= 1:
        return estimate
    started = before.get("started_at")
    if not isinstance(started, datetime):
        return estimate
    ended = now
    expires, renewed = before.get("lease_expires_at"), before.get("modified")
    if isinstance(expires, datetime) and expires <= now and isinstance(renewed, datetime):
        ended = min(max(renewed, started), now)
    return min(max((ended - started).total_seconds(), 0.0), estimate)


def _released(before: Mapping[str, Any], charged_today: bool) -> float:
    return float(number(before, RELEASED_COST)) if charged_today else 0.0


def restated_cost(before: Mapping[str, Any], old_estimate: float, new_estimate: float, now: datetime) -> dict:
    """The charge fields of an admitted job restated with other parameters (a request for its file_uid that
    states others): its new estimate, plus what its stopped tries used. A queued job's estimate is replaced; a
    running one's try is stopped, and the GPU time it ran (since its `started_at`, at most its estimate) stays
    charged: restating a running job again and again cannot run it for free, each stopped try counts against
    the budget (the contract's function flow, where a worker took the doc a moment before its request came,
    pays that moment). A job charged on an earlier day is charged its new estimate today, anew: that day's spend
    is gone, and it paid the whole of the stopped try's estimate. Until a worker takes it again, `STOPPED_COST`
    says what it is charged if it ends first (cancelled while queued, given up): what the stopped tries used,
    its released tries' too (`released_cost`)."""
    today = day_of(now)
    charged_today = charged_on(before, today) == today
    charged = float(number(before, COST)) if charged_today else 0.0
    kept = max(charged - old_estimate, 0.0)  # earlier stopped tries (a released try is not in `cost`)
    if before.get("status") == "processing" and charged_today:
        kept += _try_ran(before, old_estimate, now)
    cost = kept + new_estimate
    stopped = kept + _released(before, charged_today)
    ends_first = before.get("status") == "processing" or STOPPED_COST in before
    return {
        COST: round(cost, 3),
        CHARGED_ON: today,
        **({STOPPED_COST: round(min(stopped, cost), 3)} if ends_first else {}),
    }


def cancelled_cost(before: Mapping[str, Any], estimate: float, now: datetime) -> dict:
    """The charge fields of a running job its owner cancelled (`estimate`: its try's): the GPU time that try ran
    (since its `started_at`, at most its estimate), plus what earlier stopped and released tries used, not its
    whole estimate (the web app review: a video cancelled 7 s in was charged its 382 s of the day's 600). None
    where it was charged on an earlier day, whose spend is gone."""
    if before.get("status") != "processing" or charged_on(before, day_of(now)) != day_of(now):
        return {}
    charge = restated_cost(before, estimate, 0.0, now)
    # Never more than it was charged: its estimate today may differ from the one it was admitted at (a deploy of
    # another cost model between), and a cancel must not cost more than running it (a review).
    kept = min(charge[COST] + _released(before, True), float(number(before, COST)))
    return {**charge, COST: round(kept, 3), STOPPED_COST: round(kept, 3)}


def released_cost(before: Mapping[str, Any], estimate: float, now: datetime) -> dict:
    """The charge fields of a running job a leaving worker gives back (`estimate`: its try's), or of its failure
    past MAX_RELEASES. Its `cost` stays: run again to its end, it is charged its estimate once (the shutdowns are
    no fault of the job). Its try's time adds to `RELEASED_COST`, which it is charged, with its stopped tries',
    where it ends otherwise (cancelled, queued or running again; given up; failed past MAX_RELEASES), at most its
    `cost` (a review: a cancel a moment after a release cost its whole estimate, 382 GPU-seconds, where one a
    moment before cost the 7 it ran; and a cancel after a second try forgot the first)."""
    if before.get("status") != "processing" or charged_on(before, day_of(now)) != day_of(now):
        return {}
    released = _released(before, True) + _try_ran(before, estimate, now)
    cost = float(number(before, COST))
    stopped = max(cost - estimate, 0.0) + released  # its restatements' stopped tries are in `cost`
    return {RELEASED_COST: round(released, 3), STOPPED_COST: round(min(stopped, cost), 3)}


def change(before: Mapping[str, Any] | None, update: Mapping[str, Any], now: datetime | None = None) -> Change:
    after = merged(before, update)
    # Charged at admission (and again, as `restated_cost` says, by a restatement).
    today = day_of(now) if now is not None else None
    charge = _charged(after, today) - _charged(before, today)
    return Change(
        running=int(running(after)) - int(running(before)),
        pending=int(pending(after)) - int(pending(before)),
        charge=charge,
    )


def refusal(usage: Usage, cost: float, limits: Limits, now: datetime) -> str | None:
    """Why one more job of `cost` may not be admitted, or None. Messages name the limit."""
    if usage.pending >= limits.max_pending:
        return (
            f"Too many jobs: at most {limits.max_pending} of your jobs may be queued or processing at once "
            "(USER_MAX_PENDING); try again when one has finished"
        )
    return budget_refusal(usage, cost, limits, now)


def budget_refusal(usage: Usage, cost: float, limits: Limits, now: datetime, *, charged: float = 0.0) -> str | None:
    """Why `cost` more GPU-seconds may not be charged today, or None (`charged`: what the job was charged
    already, when it is restated with other parameters)."""
    if usage.spent_today + cost > limits.daily_budget:
        left = max(limits.daily_budget - usage.spent_today, 0.0)
        # One decimal, or as many as tell what it needs from what is left (a review read "needs 1.1 GPU-seconds,
        # 1.1 of 30 are left" for 1.051 and 1.050).
        digits = next((d for d in (1, 2, 3) if f"{cost:.{d}f}" != f"{left:.{d}f}"), 3) if not charged else 1
        needs = f"{cost + charged:.{digits}f} GPU-seconds" + (f" ({charged:.1f} already charged)" if charged else "")
        if cost + charged > limits.daily_budget:  # waiting for the reset would not help
            return (
                f"Daily GPU budget exceeded (USER_DAILY_BUDGET): this job needs {needs}, more than the whole "
                f"daily budget of {limits.daily_budget:g}; ask for fewer steps, images, frames or pixels"
            )
        return (
            f"Daily GPU budget exceeded (USER_DAILY_BUDGET): this job needs {needs}, "
            f"{left:.{digits}f} of {limits.daily_budget:g} are left today; the budget resets at "
            f"{resets_at(now):%Y-%m-%d %H:%M} UTC"
        )
    return None
