"""The scheduled sweep (`redispatchStaleJobs`): a job nobody picked up gets a worker woken for it again.

A dispatch may reach no worker (RunPod down, a worker that died mid-run, one scaled away with its backlog), and
nothing else would wake one for the job. So `redispatch_stale` dispatches stale jobs again, a bounded number of
times, then fails them with a clear message, but only when no worker has been alive for the whole stale period
(`workers/{id}` docs, firegen_core.workers): a long backlog on live workers never fails a job. Each job's
re-dispatch is marked in one compare-and-set as `dispatch` marks its own (`Marking`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any

from dispatch import (
    BY_SCHEDULER,
    DISPATCH_COUNT,
    DISPATCHED_AT,
    Marking,
    Policy,
    deliver,
    failed_outcome,
    job_store,
    refused_or_marked,
    remove_left_behind,
)
from google.cloud import firestore
from runpod_client import RunPodClient

from firegen_core import lifecycle, quota, workers
from firegen_core.contract import parse_document
from firegen_core.errors import EXCEPTION, GenerationError
from firegen_core.jobs import MEDIA_TYPES, JobKey, JobStore
from firegen_core.quota import Limits

# Its records keep the logger they were always written under (each log entry names it: README "Logs").
log = logging.getLogger("functions.dispatch")
# A job at MAX_DISPATCHES that working workers left queued is dispatched again, up to this many times MAX_DISPATCHES.
LEFT_BEHIND_FACTOR = 2
# Pages of `scan_limit` docs a sweep reads per media type and query at most, past docs with nothing to do now.
SCAN_PAGES = 10


def _last_dispatch(doc: Mapping[str, Any]) -> datetime | None:
    """When the job was last sent to a worker (None: no date to tell; an admin's doc may hold anything there)."""
    for field in (DISPATCHED_AT, "created_at"):
        if isinstance(value := doc.get(field), datetime):
            return value
    return None


def _stale(doc: Mapping[str, Any] | None, now: datetime, policy: Policy) -> bool:
    """Queued and not dispatched for a while, or processing under an expired lease (its worker is gone)."""
    if doc is None:
        return False
    status = doc.get("status")
    if status == lifecycle.PROCESSING:
        if not lifecycle.lease_expired(doc, now):
            return False
    elif status != lifecycle.QUEUED:
        return False
    last = _last_dispatch(doc)
    return last is None or last <= now - policy.redispatch_after


def _given_up(count: int, policy: Policy) -> GenerationError:
    minutes = policy.redispatch_after.total_seconds() / 60
    return GenerationError(
        EXCEPTION,
        f"No GPU worker picked up the job after {count} dispatches, {minutes:g} minute{'' if minutes == 1 else 's'} "
        "apart; please try again",
    )


def _waited_its_dispatches(doc: Mapping[str, Any], now: datetime, policy: Policy) -> bool:
    """Queued as long as MAX_DISPATCHES stale periods (a job without a creation date: as if so). Its client's calls
    retrying an undelivered dispatch spend its count in seconds (the functions review: three calls in 3 s, and the
    first sweep failed the job "after 3 dispatches, 10 minutes apart" minutes after it was made)."""
    created = doc.get("created_at")
    return not isinstance(created, datetime) or now - created >= policy.redispatch_after * policy.max_dispatches


def redispatch_stale(
    db: firestore.Client,
    runpod: RunPodClient,
    *,
    policy: Policy = Policy(),
    now: datetime | None = None,
    limits: Limits = Limits(),
    clock: Callable[[], float] = time.monotonic,
    bucket: Callable[[], Any] | None = None,
) -> Counter:
    """The scheduled sweep. Returns counts: redispatched, failed, waiting (dispatched enough, in a live worker's
    backlog: left queued), cancelled (its owner's cancel flag on it: ended, not dispatched), skipped,
    invalid, foreign (a doc outside generations/ the queries met: skipped), error (its dispatch failed unexpectedly:
    logged `redispatch_error`, the next sweep tries again), deferred (found past the sweep's budget: untouched, for the next sweep), and each verdict outcome."""
    now = now or datetime.now(UTC)
    cutoff = now - policy.redispatch_after
    counts: Counter = Counter()
    store = job_store(db, limits)
    ends = clock() + policy.sweep_budget.total_seconds()
    # Workers running (seen within the stale period, not left) are working through a backlog: nothing fails for want
    # of a worker. Nor does a job that a worker was seen after its last dispatch: workers came, and went leaving it.
    seen = workers.sightings(db, cutoff)
    # Read whole first (a query's stream held open across dispatches of up to 50 s each could outlive its
    # deadline), in the order the budget serves them: jobs whose worker died mid-run, then the queued ones oldest
    # first, videos and images alike.
    queries = [partial(store.expired, media, now) for media in MEDIA_TYPES]
    expired = [s for query in queries for s in _due(query, policy, now, seen, counts)]
    queries = [partial(store.oldest_queued, media, created_before=cutoff) for media in MEDIA_TYPES]
    queued = [s for query in queries for s in _due(query, policy, now, seen, counts)]
    queued.sort(key=lambda snapshot: snapshot.get("created_at"))
    for snapshot in expired + queued:
        try:
            key = JobKey.from_path(snapshot.reference.path)
        except ValueError:  # another app's `images` or `videos` (see the README's "Into an existing Firebase project")
            counts["foreign"] += 1
            continue
        if clock() >= ends:
            counts["deferred"] += 1
            continue
        try:
            counts[_redispatch_one(store, runpod, key, policy, seen=seen, bucket=bucket)] += 1
        except Exception as exc:  # one job's trouble (Firestore contended, away a moment) leaves the others theirs
            counts["error"] += 1
            log.warning("redispatch_error", extra={"path": key.path, "error": f"{type(exc).__name__}: {exc}"[:300]})
    if counts:
        # ERROR where it failed jobs: no worker picked them up (the endpoint scaled to no worker, its workers fail to
        # start, the RunPod key or endpoint is wrong), which an alert on errors must see.
        (log.error if counts.get("failed") else log.info)("redispatch_sweep", extra={"counts": dict(counts)})
    return counts


def _due(
    query: Callable[..., firestore.Query], policy: Policy, now: datetime, seen: workers.Sightings, counts: Counter
) -> list[Any]:
    """Up to `scan_limit` docs of `query`'s pages (each after the last page's end) that a dispatch or a failure
    may be due for, at most SCAN_PAGES pages read. Docs with nothing to do now are counted here (`skipped`:
    dispatched within the stale period; `waiting`: at MAX_DISPATCHES with workers running) and passed: a page that
    held only those was all a sweep read before (a scale review: re-dispatched jobs keep their place at the head,
    so with 100 of them the 101st was never reached, and the last of 10,000 stale jobs failed 50 hours late)."""
    found: list[Any] = []
    after = None
    for _ in range(SCAN_PAGES):
        page = list(query(limit=policy.scan_limit, after=after).stream())
        for snapshot in page:
            doc = snapshot.to_dict() or {}
            if not _ours(snapshot):
                found.append(snapshot)  # counted `foreign` as it is met, whatever it holds
            elif not _stale(doc, now, policy):
                counts["skipped"] += 1
            elif (
                int(quota.number(doc, DISPATCH_COUNT)) >= policy.max_dispatches
                and seen.running
                and not doc.get(lifecycle.CANCEL_REQUESTED)
            ):
                counts["waiting"] += 1
            else:
                found.append(snapshot)
        if len(page) < policy.scan_limit or len(found) >= policy.scan_limit:
            return found[: policy.scan_limit]
        after = page[-1]
    return found[: policy.scan_limit]


def _ours(snapshot: Any) -> bool:
    try:
        JobKey.from_path(snapshot.reference.path)
    except ValueError:
        return False
    return True


def _redispatch_one(
    store: JobStore,
    runpod: RunPodClient,
    key: JobKey,
    policy: Policy,
    *,
    seen: workers.Sightings,
    bucket: Callable[[], Any] | None = None,
) -> str:
    waiting = False
    marking = Marking()

    def decide(doc: dict | None, now: datetime) -> dict | None:
        nonlocal waiting
        if marking.landed_here(doc):
            return None
        if not _stale(doc, now, policy):
            return None
        if doc.get(lifecycle.CANCEL_REQUESTED):  # ended as a claim would end it: no worker woken for it
            return lifecycle.cancelled(doc)
        count = int(quota.number(doc, DISPATCH_COUNT))
        if count >= policy.max_dispatches:
            waiting = seen.running  # in a running worker's backlog: it waits its turn
            if waiting:
                return None
            last = _last_dispatch(doc)
            worked = seen.last_worked is not None and last is not None and seen.last_worked > last
            given_up = not worked and _waited_its_dispatches(doc, now, policy)
            if given_up or count >= policy.max_dispatches * LEFT_BEHIND_FACTOR:
                return lifecycle.failure(_given_up(count, policy), user_id=key.user_id, file_uid=key.file_uid)
            # Workers that ran jobs to their end were seen after its last dispatch, and left it queued (RunPod scaled
            # them down while the backlog waited, or the one running it died): the endpoint runs jobs, so one is
            # woken for it again; or its dispatches came closer than the stale period apart (a client's retries):
            # it is dispatched again. Up to LEFT_BEHIND_FACTOR times MAX_DISPATCHES in all, whatever comes.
        return refused_or_marked(key, doc, BY_SCHEDULER, marking)

    outcome = marking.transition(store, key, decide)
    if not outcome.applied:
        return "waiting" if waiting else "skipped"
    if outcome.written.get("status") == lifecycle.FAILED:
        if quota.ran(outcome.before or {}) and bucket is not None:
            remove_left_behind(bucket, key)
        return failed_outcome(outcome.written, otherwise="failed")
    request = parse_document(key.user_id, key.media_type, key.file_uid, outcome.before)
    verdict, _ = deliver(store, runpod, key, request, outcome.written[DISPATCH_COUNT], bucket)
    return "redispatched" if verdict.delivered else verdict.outcome
