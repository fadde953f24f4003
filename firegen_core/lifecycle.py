"""One job's life, as pure decisions: given a job document and the server's time, what to write.

Every function here is a guard plus an update: it looks at the current document and returns the fields to
write, or None when the transition is not allowed (someone else owns the job, it is finished, ...). The job
store runs each of them as one compare-and-set (read, decide, write only if unchanged since the read), so a
decision is always made on fresh data.

    queued ──claim──► processing ──complete──► completed
      ▲                 │  │ └──────fail─────► failed
      └────release──────┘  └─(lease expired)─► claimable again, until max_attempts ► failed

Cancellation: the owner sets `cancel_requested: true` on a queued or processing doc (firestore.rules allow
that one field). A queued doc is then failed `Cancelled` instead of claimed; a running one's worker stops at
its next step and fails it (fenced); a completion that meets the flag fails the job instead. Releases on
shutdown are counted (`releases`), so a job cannot bounce between leaving workers for ever.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, TypeGuard

from google.cloud.firestore import DELETE_FIELD, SERVER_TIMESTAMP

from . import quota
from .contract import KNOWN_FIELDS, REQUESTED_AT, clip, field_name
from .errors import CANCELLED, CANCELLED_MESSAGE, EXCEPTION, QUOTA_EXCEEDED, VALIDATION_ERROR, GenerationError
from .redaction import got


class JobStatus(StrEnum):
    """A job doc's `status`: the contract's values (a StrEnum member is the plain string, in docs and comparisons)."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


# Plain strings where a value leaves the process (docs, replies, logs): a StrEnum member prints as its repr.
QUEUED, PROCESSING, COMPLETED, FAILED = (status.value for status in JobStatus)
CANCEL_REQUESTED = "cancel_requested"  # set by the job's owner (client or the cancelGeneration callable)
RELEASES = "releases"  # how many times leaving workers gave the job back
RESTATED = "restated"  # how many running tries its requests stopped (lifecycle.restate): not failures
FINAL_STATES = (COMPLETED, FAILED)
# Why the functions' last dispatch of the job did not reach a worker (functions/dispatch.py); removed by the
# next dispatch, and by the job's completion.
DISPATCH_ERROR = "dispatch_error"
DISPATCH_COUNT = "dispatch_count"  # the functions' count of dispatches (functions/dispatch.py)
EXPIRE_AT = "expire_at"
PROMPT_TRUNCATED = "prompt_truncated"  # on a completed job: the model took only the start of its prompt
REFUSAL_FIELDS = ("error_type", "error_message", "failed_at", EXPIRE_AT)  # of `failure`, gone when queued again

Doc = Mapping[str, Any]

# Retention: a finished job's doc carries `expire_at` (finish time + RETENTION_DAYS) for a Firestore TTL policy on
# that field, which deletes the doc some time after (the policy is the operator's choice; README "Retention").
RETENTION_DAYS_DEFAULT = 30.0
RETENTION_DAYS_MAX = 36500.0  # a century: past it a date overflows Python's (audit: 1e300 crashed every job's end)


def retention_days(env: Mapping[str, str]) -> float:
    """RETENTION_DAYS from `env` (default 30; 0: finished docs get no `expire_at`). ValueError naming it when it
    is wrong. Read at the edges (the worker's settings, the functions), which hand it to their `JobStore`."""
    raw = (env.get("RETENTION_DAYS") or "").strip()
    if not raw:
        return RETENTION_DAYS_DEFAULT
    try:
        days = float(raw)
    except ValueError:
        days = math.nan
    if not (math.isfinite(days) and 0 <= days <= RETENTION_DAYS_MAX):
        raise ValueError(f"RETENTION_DAYS must be a number of days from 0 to {RETENTION_DAYS_MAX:g} {got(raw)}")
    return days


def expiry(days: float, now: datetime) -> dict:
    """`{"expire_at": now + days}`, or nothing when retention is off (0 days). The job store adds it to every
    write that ends a job, `now` being that write's server time: a TTL field needs a value, and a server-side
    "timestamp plus days" does not exist."""
    return {EXPIRE_AT: now + timedelta(days=days)} if days > 0 else {}


@dataclass(frozen=True)
class Lease:
    """The fencing token of one claim: a write is allowed only while the doc still carries both values."""

    worker_id: str
    attempt: int


def holds(doc: Doc | None, lease: Lease) -> TypeGuard[Doc]:
    return (
        doc is not None
        and doc.get("status") == PROCESSING
        and doc.get("worker_id") == lease.worker_id
        and doc.get("attempts") == lease.attempt
    )


def written_over(doc: Doc | None, lease: Lease) -> bool:
    """The claim's doc is gone, holds fewer attempts than the claim, or its attempt under another worker: deleted
    or written over by a write of one's own (an admin, the contract's function's `setDoc` again), then maybe
    claimed anew; never by a transition (a restatement, a release keep the attempt; a takeover adds one)."""
    attempts = None if doc is None else doc.get("attempts")
    if not isinstance(attempts, int) or attempts < lease.attempt:
        return True
    return attempts == lease.attempt and doc is not None and doc.get("worker_id") not in (None, lease.worker_id)


def lost_to(doc: Doc | None, lease: Lease) -> tuple[str, bool]:
    """Why a claim no longer holds its job, by the job's doc: the reason its worker logs, and whether that was its
    owner's doing (deleted, restated, refused or cancelled by a request, written over: nothing a worker did wrong,
    an INFO line) rather than another worker's or the functions' (taken over, ended: a WARNING)."""
    if doc is None:
        return "deleted", True
    status = doc.get("status")
    if status == QUEUED and doc.get("attempts") == lease.attempt:  # a restatement keeps the attempt
        return "restated by its request", True
    if status == FAILED and doc.get("error_type") in (QUOTA_EXCEEDED, VALIDATION_ERROR):  # never a worker's end
        return "refused with its request", True
    if status == FAILED and doc.get("error_type") == CANCELLED:
        return "cancelled", True
    if written_over(doc, lease):
        return "written over", True
    if status == PROCESSING:
        return "taken over by another worker", False
    return f"{status} by another", False


def lease_expired(doc: Doc, now: datetime) -> bool:
    expires = doc.get("lease_expires_at")
    return not isinstance(expires, datetime) or expires <= now  # none, or unreadable: nobody holds it


def claimable(doc: Doc | None, now: datetime) -> TypeGuard[Doc]:
    if doc is None:
        return False
    status = doc.get("status")
    return status == QUEUED or (status == PROCESSING and lease_expired(doc, now))


def claim(doc: Doc | None, now: datetime, *, worker_id: str, lease_seconds: float, max_attempts: int) -> dict | None:
    """Claim a queued doc, or one whose owner's lease ran out; past max_attempts, fail it instead."""
    if not claimable(doc, now):
        return None
    if doc.get(CANCEL_REQUESTED):
        return cancelled(doc)
    attempts = int(quota.number(doc, "attempts"))
    if attempts - int(quota.number(doc, RESTATED)) >= max_attempts:
        last = "its worker stopped responding" if doc.get("status") == PROCESSING else "it was given up"
        return failure(
            GenerationError(EXCEPTION, f"Generation failed after {attempts} attempt{'s' * (attempts != 1)}: {last}"),
            user_id=doc.get("user_id"),
            file_uid=doc.get("file_uid"),
        )
    return {
        "status": PROCESSING,
        "worker_id": worker_id,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
        "attempts": attempts + 1,
        "started_at": SERVER_TIMESTAMP,
        "modified": SERVER_TIMESTAMP,
        "progress": 0.0,
        # It runs again, with its whole cost: no longer what a restatement stopped alone.
        **({quota.STOPPED_COST: DELETE_FIELD} if quota.STOPPED_COST in doc else {}),
    }


def renewal(now: datetime, *, lease_seconds: float, progress: float | None = None) -> dict:
    update: dict[str, Any] = {"lease_expires_at": now + timedelta(seconds=lease_seconds), "modified": SERVER_TIMESTAMP}
    if progress is not None:
        update["progress"] = round(min(max(progress, 0.0), 1.0), 3)
    return update


def release(doc: Doc) -> dict:
    """Give a job back to the queue on shutdown; the interrupted try does not count as an attempt."""
    return {
        "status": QUEUED,
        "worker_id": DELETE_FIELD,
        "lease_expires_at": DELETE_FIELD,
        "progress": DELETE_FIELD,
        "attempts": max(int(quota.number(doc, "attempts") or 1) - 1, 0),
        "modified": SERVER_TIMESTAMP,
    }


def refused(doc: Doc | None) -> bool:
    """Refused, never run: failed `QuotaExceeded` at its admission (its refusal says to try again when the
    limits allow), or `ValidationError` (a request the contract refused: the contract's answer is "fix
    parameters and retry"). The next request with its file_uid is that try (`restate`)."""
    if doc is None or doc.get("status") != FAILED:
        return False
    # Never charged (a doc that breaks the contract is never admitted), or refunded: admitted, then failed before it
    # ran (its request refused, its restatement past the budget). One a worker ran stays charged: its answer stands.
    refunded = not doc.get(quota.ADMITTED) or quota.never_ran(doc)
    if doc.get("error_type") == QUOTA_EXCEEDED:
        return refunded and not quota.ran(doc)
    return doc.get("error_type") == VALIDATION_ERROR and refunded


RAN_BEFORE_REFUSAL = "a worker ran it before its request was refused, so send it as a new job (a new file_uid)"
FAILED_OTHERWISE = "it failed with other parameters ({}), so send them as a new job (a new file_uid)"


def recorded_error(doc: Doc, changes: Iterable[str] = ()) -> str:
    """What a later request for a failed job is told: its recorded message. A job refused for its parameters
    after a worker took it (its doc alone, before its request came) keeps that answer, as any job that ran (its
    run stays charged): a fixed request under its file_uid is told to come as a new job, not the old refusal as
    if it were this request's. So is a request whose parameters (`changes`: contract.restatement's) differ from
    the job's that failed (not cancelled) (an audit: the contract's "fix parameters and retry" after an out-of-memory failure read the
    old error back, as if the smaller request had run out of memory too)."""
    message = doc.get("error_message") or "Generation failed"
    if doc.get("error_type") == VALIDATION_ERROR and not refused(doc):
        return f"{message}; {RAN_BEFORE_REFUSAL}"
    # A cancel's message says why on its own: the request's parameters were never the job's to run. So does a
    # budget refusal of a job that ran: a restatement past the budget leaves the doc's old parameters, so this very
    # request's refusal would read as an earlier run's failure (and its code turn failed-precondition).
    if changes and not refused(doc) and doc.get("error_type") not in (CANCELLED, QUOTA_EXCEEDED):
        return f"{message}; {FAILED_OTHERWISE.format(', '.join(changes))}"
    return message


def restate(doc: Doc | None, changes: Mapping[str, Any], stated: Mapping[str, Any] | None = None) -> dict | None:
    """A live job's parameters changed by the request that states it (`contract.restatement`). A queued job just
    takes them; a running one is queued again with them, its try stopped (the fence ends it: its lease is gone,
    and `attempts` keeps counting, so a later claim's fence can never match the stale run's; `restated` counts
    such tries, which `claim` does not hold against max_attempts). A job refused for its user's limits or its
    parameters (`refused`) is queued again, to be admitted again (or refused again, under the limits as they now
    stand); `stated`, the request's fields as given (`GenerationRequest.parameters`), then replace the doc's
    request fields, so that a field the refused doc broke the contract with, and the new request leaves out, is
    gone. Any other finished job is left as it is: its answer says it ran with other parameters. A live job whose
    owner asked to cancel it (`cancel_requested`) takes no parameters: a queued one ends cancelled now."""
    if doc is None:
        return None
    # A camelCase spelling the doc holds would now say the opposite of its snake_case field.
    aliases = {name: DELETE_FIELD for name in doc if name not in changes and field_name(name) in changes}
    update: dict[str, Any] = {**changes, **aliases, "modified": SERVER_TIMESTAMP}
    if refused(doc):
        if stated is not None:  # the request states the whole job now: its job (`requested_at`), as if it made it
            stale = {name: DELETE_FIELD for name in doc if field_name(name) in KNOWN_FIELDS and name not in stated}
            update = {**stale, **stated, "modified": SERVER_TIMESTAMP, REQUESTED_AT: SERVER_TIMESTAMP}
        # Admitted again, under the limits as they now stand (its refusal refunded it, or never charged it); a
        # cancel asked of the refused job is not one of the new request's, nor are its dispatches (they count
        # toward giving up on a job no worker picks up).
        gone: tuple[str, ...] = (*REFUSAL_FIELDS, "worker_id", "lease_expires_at", "progress", quota.ADMITTED)
        gone = (*gone, CANCEL_REQUESTED, DISPATCH_COUNT, DISPATCH_ERROR)
        return {**update, "status": QUEUED, "error": False, **dict.fromkeys(gone, DELETE_FIELD)}
    if doc.get("status") not in (QUEUED, PROCESSING):
        return None
    if doc.get(CANCEL_REQUESTED):
        # The owner's cancel wins over a request that states the job again, as over its completion: a queued job
        # ends now, a running one at its next step. Queued again with the request's parameters, it would be
        # charged its new estimate for a run that never comes (ledger audit).
        return cancelled(doc) if doc.get("status") == QUEUED else None
    if not changes:
        return None
    if doc.get("status") == PROCESSING:
        restated = int(quota.number(doc, RESTATED)) + 1
        update.update(
            status=QUEUED,
            worker_id=DELETE_FIELD,
            lease_expires_at=DELETE_FIELD,
            progress=DELETE_FIELD,
            **{RESTATED: restated},
        )
    return update


def counted_release(doc: Doc, *, max_releases: int) -> dict:
    """`release`, counted: a release past the job's `max_releases` fails it instead (it keeps landing on workers
    that shut down before it ends, so it would never end)."""
    releases = int(quota.number(doc, RELEASES)) + 1
    if releases > max_releases:
        message = f"Generation stopped: its workers shut down before it ended {releases} times; please try again"
        error = GenerationError(EXCEPTION, message)
        return {**failure(error, user_id=doc.get("user_id"), file_uid=doc.get("file_uid")), RELEASES: releases}
    return {**release(doc), RELEASES: releases}


def cancelled(doc: Doc) -> dict:
    """The failure fields of a job its owner cancelled."""
    error = GenerationError(CANCELLED, CANCELLED_MESSAGE)
    return failure(error, user_id=doc.get("user_id"), file_uid=doc.get("file_uid"))


def cancel(doc: Doc | None) -> dict | None:
    """The owner's cancel (the callable's): a queued job ends now; a running one is asked to stop (its worker
    fails it at its next step); a finished one is left as it is."""
    if doc is None:
        return None
    if doc.get("status") == QUEUED:
        return cancelled(doc)
    if doc.get("status") == PROCESSING and not doc.get(CANCEL_REQUESTED):
        return {CANCEL_REQUESTED: True}
    return None


def being_cancelled(doc: Doc | None) -> bool:
    """A live job whose owner asked to cancel it: it ends cancelled (queued: at once; running: at its worker's
    next step), whatever a request for it now says (`restate`)."""
    return doc is not None and doc.get("status") in (QUEUED, PROCESSING) and bool(doc.get(CANCEL_REQUESTED))


def drop_cancelled(doc: Doc | None) -> dict | None:
    """A queued job whose owner asked to cancel it: failed without running (a worker's listener saw the flag)."""
    if doc is None or doc.get("status") != QUEUED or not doc.get(CANCEL_REQUESTED):
        return None
    return cancelled(doc)


# What a try's end carries where its upload had begun: its progress 1. Its results were readable by their owner
# before the doc said `completed`; a cancel then is charged its whole estimate (`quota._try_ran`; the security
# review: a cancel timed to the first object's arrival kept the images and paid 0.29 GPU-seconds of their 1.05).
DELIVERED = {"progress": 1.0}


def completion(doc: Doc, fields: Mapping[str, Any]) -> dict:
    """What a finished run writes: its success fields, unless the owner cancelled it meanwhile. A dispatch that
    failed on its way (`dispatch_error`) is no news once a worker completed the job."""
    if doc.get(CANCEL_REQUESTED):
        return {**cancelled(doc), **DELIVERED}
    return {**fields, **({DISPATCH_ERROR: DELETE_FIELD} if DISPATCH_ERROR in doc else {})}


def success(
    *,
    task_type: str,
    user_id: str,
    file_uid: str,
    urls: list[str],
    seed: int,
    video_info: dict | None = None,
    timings: Mapping[str, float] | None = None,
    prompt_truncated: bool = False,
) -> dict:
    """The contract's success document fields, plus the job's timings so users can see what it cost, and
    `prompt_truncated: true` where the model took only the start of the prompt."""
    if not urls:
        raise ValueError("a completed job has at least one result")
    fields: dict[str, Any] = {
        "generated": True,
        "error": False,
        "status": COMPLETED,
        "completed_at": SERVER_TIMESTAMP,
        "modified": SERVER_TIMESTAMP,
        "seed": seed,
        "task_type": task_type,
        "file_uid": file_uid,
        "user_id": user_id,
        "progress": 1.0,
    }
    if video_info is None:
        fields.update(images=list(urls), image_url=urls[0], image_count=len(urls))
    else:
        fields.update(videos=list(urls), video_url=urls[0], video_info=dict(video_info))
    fields.update({name: round(value, 3) for name, value in (timings or {}).items()})
    if prompt_truncated:
        fields[PROMPT_TRUNCATED] = True
    return fields


def failure(error: GenerationError, *, user_id: str | None, file_uid: str | None) -> dict:
    """The contract's error document fields (the message at most 300 characters, whatever built the error)."""
    fields: dict[str, Any] = {
        "generated": False,
        "error": True,
        "status": FAILED,
        "error_message": clip(str(error.message)),
        "error_type": error.error_type,
        "failed_at": SERVER_TIMESTAMP,
        "modified": SERVER_TIMESTAMP,
    }
    fields.update({k: v for k, v in (("user_id", user_id), ("file_uid", file_uid)) if v is not None})
    return fields
