"""The Firestore job store: every transition of `lifecycle` runs here, each as one atomic read-decide-write.

`JobStore.transition` is the only place that writes a job document: it reads the doc (and its user's usage
doc), asks a pure decision function what to write given the server's read time, and writes exactly that, only
if both docs are unchanged since the read (else it reads and decides again), or nothing. It also keeps the
user's usage (`quota`) exact: whatever a transition does to a job's status, the usage doc gets the change in
the same commit. `JobStore` knows no worker: a worker's claim and every write it makes under it are
`claims.WorkerJobs`'s; the marks of a job's dispatches that a transition writes are `dispatches`'. The queries
every reader needs (queued jobs, expired leases) live here too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import tenacity
from google.api_core import retry as retries
from google.api_core.exceptions import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    GoogleAPICallError,
    InternalServerError,
    NotFound,
    ResourceExhausted,
    RetryError,
    ServiceUnavailable,
)
from google.cloud import firestore
from google.cloud.firestore import DELETE_FIELD, SERVER_TIMESTAMP, ArrayUnion, FieldFilter

from . import lifecycle, quota
from .contract import (
    KNOWN_FIELDS,
    MEDIA_TYPE,
    PARAMETER_FIELDS,
    REQUESTED_AT,
    ContractError,
    GenerationRequest,
    awaits_parameters,
    field_name,
    normalise_document_fields,
    parse_document,
    restatement,
)
from .dispatches import (
    ARRIVED_DISPATCHES,
    DELETED_JOBS,
    RUNPOD_JOB_ID,
    arrived,
    brought,
    dispatched,
    heard,
    undelivered,
)
from .errors import CANCELLED, QUOTA_EXCEEDED, VALIDATION_ERROR, GenerationError
from .lifecycle import Lease

log = logging.getLogger(__name__)


class _Conflict(Exception):
    """A compare-and-set whose precondition failed: another write landed between its read and its write."""


class Misfiled(ContractError):
    """A request whose client filed its job's doc under the other media type (`key`), whose contract it breaks."""

    def __init__(self, message: str, key: JobKey):
        super().__init__(message)
        self.key = key


COLLECTION = "generations"
MEDIA_TYPES = tuple(MEDIA_TYPE.values())
# What a refusal keeps of the request it refuses: its RunPod job, whose redelivery is that request again.
REQUEST_MARKS = (RUNPOD_JOB_ID, ARRIVED_DISPATCHES)
TOMBSTONE_TRIES = 5
MAX_CONFLICTS = 40
RECOUNT_EVERY = 30.0  # seconds: a user's counts held at a limit are recounted from their docs at most this often
END_RECOUNT_SECONDS = 2.0  # seconds: an end's count of the user's jobs, at most (the end is written without it)
# The tail of a refused restatement of a job that ran: its file_uid will answer this refusal from now on.
RAN_BEFORE = "it ran before this request restated it, so send it as a new job (a new file_uid)"
CALL_TIMEOUT = 15.0  # seconds, retries included: a runsync caller must not hang on a Firestore outage
# A runsync request's Firestore work in all (its read and write, or a refusal's record on the waiting doc): the
# Cloud Functions wait RUNPOD_TIMEOUT_SECONDS (default 20) for the answer, and take one that comes later for a
# cold start's (a docs review: with Firestore away the answer came in 15-20 s, at times past the functions' wait,
# and the dispatch was taken as queued where the worker had said "Could not record the job").
ANSWER_TIMEOUT = 10.0
# Conflicts back off exponentially with full jitter (first ~10 ms, at most 250 ms a wait): racers for one user's
# usage doc (one user's burst of requests) spread out instead of colliding again on the next round trip.
CONFLICT_BACKOFF, CONFLICT_BACKOFF_MAX = 0.01, 0.25
# A conditional write that did not land, for another's write since the read: decide again on what is there now.
# Aborted: production Firestore's "Too much contention" on a hot doc (one user's usage doc, written by each of
# their jobs' moves), which the emulator never answers; it wrote nothing either.
COMMIT_CONFLICTS = (FailedPrecondition, AlreadyExists, NotFound, Aborted)
# The client's own retry has a 60 s deadline of its own, whatever `timeout` says: each call gets both bounds.
BOUND: dict[str, Any] = {
    "timeout": CALL_TIMEOUT,
    "retry": retries.Retry(
        # Cancelled: the emulator's "call already cancelled" while other streams close; every write here is a
        # compare-and-set or a create, so sending it again is safe.
        predicate=retries.if_exception_type(
            ServiceUnavailable, DeadlineExceeded, ResourceExhausted, InternalServerError, Cancelled
        ),
        initial=0.1,
        maximum=2.0,
        timeout=CALL_TIMEOUT,
    ),
}

Decide = Callable[[dict[str, Any] | None, datetime], "dict | None"]


def _sooner(ends: float | None) -> float:
    """CALL_TIMEOUT from now, or `ends` where that is sooner (time.monotonic())."""
    return min(time.monotonic() + CALL_TIMEOUT, ends if ends is not None else math.inf)


def bound(ends: float) -> dict[str, Any]:
    """BOUND cut to what is left before `ends` (time.monotonic()): the calls of a transition and their retries
    end by then together (a review: its 15 s was checked between tries alone, and a slow Firestore held a
    transition, and a runsync's answer, 45 s). At least a second: a last try that could not succeed is no use."""
    most = BOUND["timeout"]  # each call's own bound still (shortened, where a caller shortens it)
    left = max(min(ends - time.monotonic(), most), min(1.0, most))
    return {"timeout": left, "retry": BOUND["retry"].with_timeout(min(left, BOUND["retry"].timeout or left))}


@dataclass(frozen=True)
class JobKey:
    user_id: str
    media_type: str
    file_uid: str

    @classmethod
    def of(cls, request: GenerationRequest) -> JobKey:
        if request.user_id is None or request.file_uid is None:
            raise ValueError("a job needs its user_id and file_uid")
        return cls(request.user_id, request.media_type, request.file_uid)

    @classmethod
    def from_path(cls, path: str) -> JobKey:
        root, user_id, media_type, file_uid = path.split("/")
        if root != COLLECTION or media_type not in MEDIA_TYPES:
            raise ValueError(f"not a job document path: {path}")
        return cls(user_id, media_type, file_uid)

    @property
    def path(self) -> str:
        return f"{COLLECTION}/{self.user_id}/{self.media_type}/{self.file_uid}"

    def other_media(self) -> JobKey:
        """The same user's and file_uid's job under the other media type."""
        return JobKey(self.user_id, next(media for media in MEDIA_TYPES if media != self.media_type), self.file_uid)


@dataclass(frozen=True)
class ClaimedJob:
    key: JobKey
    lease: Lease
    doc: dict[str, Any]  # the document as it was claimed
    claimed_at: datetime  # server time


@dataclass(frozen=True)
class Outcome:
    """What a transition saw and, when it was allowed, what it wrote."""

    before: dict[str, Any] | None
    written: dict | None
    read_time: datetime

    @property
    def applied(self) -> bool:
        return self.written is not None

    @property
    def after(self) -> dict[str, Any]:
        """The doc as it stands after this transition ({} where there is none)."""
        return _present(quota.merged(self.before, self.written or {}))

    @property
    def ended_after_a_run(self) -> bool:
        """This transition failed a job a try of which ran: what that try uploaded is no doc's. A runner still
        alive removes its own once its completion is refused; a gone one's is the caller's to remove."""
        return (self.written or {}).get("status") == lifecycle.FAILED and quota.ran(self.before or {})

    @property
    def displaced(self) -> Lease | None:
        """The claim this transition took the job from (a running job queued again), whose run must stop."""
        before = self.before
        if not self.applied or before is None or before.get("status") != lifecycle.PROCESSING:
            return None
        return (
            None if self.after.get("status") == lifecycle.PROCESSING else Lease(before["worker_id"], before["attempts"])
        )


class JobStore:
    """Job docs and their users' usage docs. No worker id: the Cloud Functions use it as it is."""

    def __init__(
        self,
        client: firestore.Client,
        *,
        limits: quota.Limits = quota.Limits(),
        retention_days: float = lifecycle.RETENTION_DAYS_DEFAULT,
    ):
        self.client = client
        self.limits = limits
        # RETENTION_DAYS: each write that ends a job sets `expire_at`, and each usage write of an idle user
        self.retention_days = retention_days

    def ref(self, key: JobKey) -> firestore.DocumentReference:
        return self.client.document(key.path)

    def usage_ref(self, user_id: str) -> firestore.DocumentReference:
        return self.client.collection(quota.USAGE_COLLECTION).document(user_id)

    def _read(self, key: JobKey, ends: float, *more: firestore.DocumentReference) -> tuple[Any, ...]:
        """The job doc, its user's usage doc and `more`, in one round trip, at one read time."""
        refs = [self.ref(key), self.usage_ref(key.user_id), *more]
        snapshots = {s.reference.path: s for s in self.client.get_all(refs, **bound(ends))}
        return tuple(snapshots[ref.path] for ref in refs)

    def transition(
        self,
        key: JobKey,
        decide: Decide,
        *,
        admit: bool = False,
        read: tuple | None = None,
        ends: float | None = None,
    ) -> Outcome:
        """Read the doc, let `decide` choose the update from it and the server time, and write it atomically.

        The write is a compare-and-set: it carries the read's `update_time` as a precondition (or must create
        the doc where none was), so it lands only if nobody wrote in between; otherwise we read again and
        decide again. That is a transaction's guarantee without its locks: with lock-based transactions, idle
        workers racing for the same new doc deadlock each other until a lock timeout (seconds on the emulator),
        which stalls throughput exactly when more workers are added.

        Where the update changes what the job counts for (`quota.change`), the user's usage doc is written in
        the same batch, under a precondition of its own: both land or neither. With `admit`, a job left live
        and not yet admitted is admitted (or refused, failed `QuotaExceeded`), and any transition that would
        start a job past USER_MAX_RUNNING leaves it queued instead. `read`: the job's and its usage doc's snapshots
        (`_read`), read together just before, for the first try (a later one reads again). `ends`
        (time.monotonic()): when a caller's answer is due, where that is sooner than CALL_TIMEOUT from now.
        """
        reads = [read[:2]] if read is not None else []
        ends = _sooner(ends)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Conflict),  # someone wrote first: decide again on what they wrote
            # The bound a runsync caller is promised, conflicts included
            stop=tenacity.stop_after_attempt(MAX_CONFLICTS) | tenacity.stop_after_delay(ends - time.monotonic()),
            wait=tenacity.wait_random_exponential(CONFLICT_BACKOFF, max=CONFLICT_BACKOFF_MAX),
        )
        try:
            return retrying(self._compare_and_set, key, decide, admit, ends, reads)
        except tenacity.RetryError as exc:
            raise Aborted(f"{key.path}: still contended after {exc.last_attempt.attempt_number} tries") from None

    def _compare_and_set(self, key: JobKey, decide: Decide, admit: bool, ends: float, reads: list) -> Outcome:
        """One read-decide-write of `transition`, its calls ending by `ends`; `_Conflict` where a precondition
        failed. `reads`: a read made for it, used once."""
        snapshot, usage_snapshot = reads.pop() if reads else self._read(key, ends)
        now = snapshot.read_time
        before = {"user_id": key.user_id, "file_uid": key.file_uid, **snapshot.to_dict()} if snapshot.exists else None
        update = decide(before, now)
        recount: tuple[quota.Usage, quota.Usage] | None = None  # (as read, as the docs count it)
        if update is not None:
            usage = quota.Usage.read(usage_snapshot.to_dict() if usage_snapshot.exists else None, now)
            recounted = self._recount(key, usage, before, update, ends, admit=admit)
            if recounted:
                recount, usage = (usage, recounted), recounted
            update = self._limit(key, before, update, usage, now, admit=admit)
        if update and update.get("status") in lifecycle.FINAL_STATES:  # from the finish's server time
            update = {**update, **lifecycle.expiry(self.retention_days, now)}
        if not update:  # nothing to write (an admission of a doc that breaks the contract decides nothing)
            return Outcome(before, None, now)
        batch = self.client.batch()
        if snapshot.exists:
            batch.update(snapshot.reference, update, option=self._unchanged(snapshot))
        else:
            batch.create(snapshot.reference, update)
        change = quota.change(before, update, now)
        if change or recount:  # lowered counts are written even where this transition counts for nothing
            after = usage.after(change) if change else usage
            fields = after.document(self.limits, now, SERVER_TIMESTAMP)
            expire_at = quota.usage_expiry(after, now, self.retention_days)
            if expire_at is not None:
                fields[lifecycle.EXPIRE_AT] = expire_at
            elif usage_snapshot.exists and lifecycle.EXPIRE_AT in (usage_snapshot.to_dict() or {}):
                fields[lifecycle.EXPIRE_AT] = DELETE_FIELD
            if usage_snapshot.exists:
                batch.update(usage_snapshot.reference, fields, option=self._unchanged(usage_snapshot))
            else:
                batch.create(usage_snapshot.reference, fields)
        try:
            batch.commit(**bound(ends))
        except COMMIT_CONFLICTS as exc:
            raise _Conflict from exc
        if recount:  # said once written: counts read just before another's transition landed were no drift
            read, counted = recount
            log.warning(
                "usage_recounted",
                extra={
                    "user_id": key.user_id,
                    "pending": [read.pending, counted.pending],
                    "running": [read.running, counted.running],
                },
            )
        return Outcome(before, update, now)

    def _recount(
        self, key: JobKey, usage: quota.Usage, before: dict | None, update: dict, ends: float, *, admit: bool
    ) -> quota.Usage | None:
        """The user's counts as their docs show them, where the usage doc's would refuse this transition (`admit`:
        admit a job past USER_MAX_PENDING, start one past USER_MAX_RUNNING), or a counted job ends and the usage
        doc still counts others, and the docs show fewer: a live job doc failed, deleted or written over by a write
        of one's own, past the counts (an admin, the contract's function's `updateDoc`, its `setDoc` retried over a
        running job), stayed counted for ever, and enough of them refused every job or kept the user's jobs from
        starting; a user's line read a job running that no longer ran (a review: a setDoc over a running job, then
        its one job completed, left running 1 and pending 1). Lowered only, and written with the transition's
        change of the counts under the usage doc's precondition (a count that moved meanwhile makes it read and
        decide again). Counts found right are not counted again for RECOUNT_EVERY seconds in this process (two
        count queries per media type, ending by `ends`), at a limit and at an end apart, unless a claim here found
        its doc written over meanwhile (`forget_counted`: a diff review, a drift made just after an end found the
        counts right was missed by the user's last end); counting at every end took a third of a no-op worker's
        throughput on the emulator (`make bench`, lifecycle), where the workers admit a backlog as they take it
        (its pending stays low). An end's count is bounded by END_RECOUNT_SECONDS and its failure skips it: the
        end is written all the same."""
        after = quota.merged(before, update)
        live = after.get("status") in (lifecycle.QUEUED, lifecycle.PROCESSING)
        admits = admit and live and not quota.admitted(before) and usage.pending >= self.limits.max_pending
        starts = admit and after.get("status") == lifecycle.PROCESSING and not quota.running(before)
        leaves = (
            after.get("status") in lifecycle.FINAL_STATES
            and quota.pending(before)
            and (usage.pending > 1 or usage.running > int(quota.running(before)))
        )
        at_a_limit = admits or (starts and usage.running >= self.limits.max_running)
        if not at_a_limit and not leaves:
            return None
        user = (self.client.project, key.user_id, at_a_limit)
        if time.monotonic() - _COUNTED_RIGHT.get(user, -RECOUNT_EVERY) < RECOUNT_EVERY:
            return None
        try:
            pending, running = self._counted(key.user_id, ends if at_a_limit else min(ends, _end_recount_ends()))
        except (GoogleAPICallError, RetryError) as exc:
            if at_a_limit:
                raise
            log.info("usage_recount_skipped", extra={"user_id": key.user_id, "error": type(exc).__name__})
            _remember(user)  # not tried again at each end of the user's for a while
            return None
        if pending >= usage.pending and running >= usage.running:
            _remember(user)  # right: a user truly at a limit, or with a backlog, is not counted often
            return None
        return replace(usage, pending=min(pending, usage.pending), running=min(running, usage.running))

    def _counted(self, user_id: str, ends: float) -> tuple[int, int]:
        """The user's (pending, running) jobs as their docs show them. DeadlineExceeded at `ends`: each call's own
        bound is a second at least, so none is begun past it."""
        counts = []
        for media in MEDIA_TYPES:
            mine = self.client.collection(COLLECTION, user_id, media).where(
                filter=FieldFilter(quota.ADMITTED, "==", True)
            )
            for statuses in ([lifecycle.QUEUED, lifecycle.PROCESSING], [lifecycle.PROCESSING]):
                if time.monotonic() >= ends:
                    raise DeadlineExceeded(f"the jobs of {user_id} were not counted in time")
                counts.append(_count(mine.where(filter=FieldFilter("status", "in", statuses)), ends))
        return sum(counts[0::2]), sum(counts[1::2])

    def _unchanged(self, snapshot):
        return self.client.write_option(last_update_time=snapshot.update_time)

    def _limit(
        self, key: JobKey, before: dict | None, update: dict, usage: quota.Usage, now: datetime, *, admit: bool
    ) -> dict | None:
        """The user's limits applied to a decided update: admission, then USER_MAX_RUNNING."""
        after = quota.merged(before, update)
        if admit and quota.pending(after) and quota.admitted(before) and PARAMETER_FIELDS & update.keys():
            # Restated with other parameters: charged as quota.restated_cost says, within the budget.
            cost, old = _cost(key, after), _cost(key, before or {})
            if cost is not None:
                charge = quota.restated_cost(before or {}, old or 0.0, cost, now)
                extra = quota.change(before, {**update, **charge}, now).charge
                charged = round(charge[quota.COST] - extra, 3)  # of its whole charge, what it paid already
                why = quota.budget_refusal(usage, extra, self.limits, now, charged=charged) if extra > 0 else None
                if why is not None:
                    if quota.ran(before or {}):
                        # A job that ran keeps its answer (`lifecycle.refused`): this file_uid cannot come back.
                        why += f"; {RAN_BEFORE}"
                    marks = {k: update[k] for k in REQUEST_MARKS if k in update}
                    return {
                        **marks,
                        **lifecycle.failure(
                            GenerationError(QUOTA_EXCEEDED, why), user_id=key.user_id, file_uid=key.file_uid
                        ),
                    }
                update = {**update, **charge}
                after = quota.merged(before, update)
        cancelled = update.get("status") == lifecycle.FAILED and update.get("error_type") == CANCELLED
        if cancelled and before is not None and quota.admitted(before):
            cost = _cost(key, before)  # a running job's cancel charges the time it ran
            if cost is not None:
                # As far as its try went: its end's own progress (`lifecycle.DELIVERED`) where it says one.
                ran = {**before, **{k: update[k] for k in lifecycle.DELIVERED if k in update}}
                update = {**update, **quota.cancelled_cost(ran, cost, now)}
                after = quota.merged(before, update)
        # Given back by a leaving worker (`counted_release`: queued again, or failed past MAX_RELEASES).
        released = lifecycle.RELEASES in update and quota.running(before) and quota.STOPPED_COST not in update
        if released and before is not None:
            cost = _cost(key, before)
            if cost is not None:
                update = {**update, **quota.released_cost(before, cost, now)}
                after = quota.merged(before, update)
        if admit and after.get("status") in (lifecycle.QUEUED, lifecycle.PROCESSING) and not quota.admitted(after):
            cost = _cost(key, after)
            if cost is not None:  # a doc that breaks the contract is failed by whoever parses it, never counted
                why = quota.refusal(usage, cost, self.limits, now)
                if why is not None:
                    failed = lifecycle.failure(
                        GenerationError(QUOTA_EXCEEDED, why), user_id=key.user_id, file_uid=key.file_uid
                    )
                    if before is None:
                        return {**_request_part(update), **failed}
                    # The request refused, as it asked (a refused job it queued again: `lifecycle.restate`, whose
                    # fields replace the doc's), and unadmitted: it may come back.
                    asked = {
                        k: v
                        for k, v in update.items()
                        if field_name(k) in KNOWN_FIELDS or k in (quota.ADMITTED, *REQUEST_MARKS)
                    }
                    return {**asked, **failed}
                update = {**update, quota.ADMITTED: True, quota.COST: cost, quota.CHARGED_ON: quota.day_of(now)}
                after = quota.merged(before, update)
        if quota.running(after) and not quota.running(before) and usage.running >= self.limits.max_running:
            # Past USER_MAX_RUNNING the job stays queued (admitted, if it was just now); it never fails for it.
            admission = {k: update[k] for k in (quota.ADMITTED, quota.COST, quota.CHARGED_ON) if k in update}
            return admission if admission and not quota.admitted(before) else None
        return update

    def holds(self, job: ClaimedJob) -> bool:
        """Whether the job is still this claim's (a read: the fence a worker checks before uploading results)."""
        snapshot = self.ref(job.key).get(**BOUND)
        return lifecycle.holds(snapshot.to_dict() if snapshot.exists else None, job.lease)

    def fail_unclaimed(self, key: JobKey, error: GenerationError) -> Outcome:
        """Fail a queued job without running it (for example when the callable's request was rejected); `.applied`
        says whether it was still queued."""
        return self._fail_where(key, error, (lifecycle.QUEUED,), awaiting=False)

    def fail_awaiting(self, key: JobKey, error: GenerationError, ends: float | None = None) -> Outcome:
        """Fail a doc that awaits its request's parameters (`awaits_parameters`: the contract's function flow
        writes the doc, then sends the parameters to runsync) when that runsync is refused: the doc stands for a
        job nobody asked for as it is. Left queued, its defaults would run after the grace; one a worker took
        after the grace (a cold start's runsync comes late) is failed too (`.displaced`: the run to stop), since
        the contract's function would fail it with a write of its own, past the user's usage counts. `ends`: as
        `transition`'s."""
        return self._fail_where(key, error, (lifecycle.QUEUED, lifecycle.PROCESSING), awaiting=True, ends=ends)

    def _fail_where(
        self,
        key: JobKey,
        error: GenerationError,
        statuses: tuple[str, ...],
        *,
        awaiting: bool,
        ends: float | None = None,
    ) -> Outcome:
        def decide(doc: dict | None, now: datetime) -> dict | None:
            if doc is None or doc.get("status") not in statuses or (awaiting and not awaits_parameters(doc)):
                return None
            failed = lifecycle.failure(error, user_id=key.user_id, file_uid=key.file_uid)
            return {**failed, **refused_try(key, doc, now)}

        return self.transition(key, decide, ends=ends)

    def cancel(self, key: JobKey) -> Outcome:
        """The owner's cancel: fail a queued job now, ask a running one's worker to stop (lifecycle.cancel)."""
        return self.transition(key, lambda doc, now: lifecycle.cancel(doc))

    def admit(self, key: JobKey) -> Outcome:
        """Admit a queued job its client wrote (or refuse it, failed `QuotaExceeded`), as soon as a worker hears
        of it: USER_MAX_PENDING bounds a user's backlog of docs even where no function sees them, which a claim,
        taking them one at a time, never would. A job already admitted, or being cancelled, is left alone. A doc
        that breaks the contract (firestore.rules let a client write one, so that it reads the contract's
        message) is failed `ValidationError` here, without taking a generation slot."""

        def decide(doc: dict | None, now: datetime) -> dict | None:
            if doc is None or doc.get("status") != lifecycle.QUEUED or doc.get(lifecycle.CANCEL_REQUESTED):
                return None
            if quota.admitted(doc):
                return None
            return contract_failure(key, doc) or {}

        return self.transition(key, decide, admit=True)

    def filed_elsewhere(self, key: JobKey, data: Mapping[str, Any], ends: float | None = None) -> JobKey | None:
        """Where the client filed the job a request (`key`, its fields `data`) names, when not under `key`'s media
        type: the contract's client sample files its doc under `videos` by `numFrames` alone, while a request is a
        video by any video field. It is the client's own doc (no request wrote it: no `requested_at`) for the
        file_uid under the other media type, with none under `key`'s, while it is live or refused, or once it
        ended if it states no parameter the request does not state equally (the sample writes its options into
        both; one file_uid may also name another job of the other media type). `ends`: as `transition`'s."""
        other = key.other_media()
        refs = [self.ref(key), self.ref(other)]
        docs = {snapshot.reference.path: snapshot for snapshot in self.client.get_all(refs, **bound(_sooner(ends)))}
        return _filed_under(other, data, docs.get(key.path), docs.get(other.path))

    def as_filed(self, request: GenerationRequest, data: Mapping[str, Any]) -> GenerationRequest:
        """The request as the job its client filed (`filed_elsewhere`): `{fps: 10}` had its doc under `images`
        failed ("fps is a video field") while the request ran, charged, a video under `videos` that no client
        listened to. `data` (the request's fields) read as that doc's media type; raises `Misfiled` (a
        ContractError naming that doc) where they break it."""
        return _as_filed(request, data, self.filed_elsewhere(JobKey.of(request), data))

    def accept(
        self,
        request: GenerationRequest,
        data: Mapping[str, Any],
        request_id: str | None = None,
        ends: float | None = None,
    ) -> tuple[GenerationRequest, Outcome]:
        """A runsync request's job: `as_filed`, then `ensure_queued` (the request as filed, and the outcome). Its
        first read takes in one round trip the docs both look at (the job's, the other media type's, its user's
        usage doc, its tombstone): a latency review counted four round trips before the answer, where the job is
        new (as a runsync's almost always is) two now, that read and the write. `ends`: when the answer is due,
        both included (runsync: `ANSWER_TIMEOUT` from the request's arrival)."""
        key = JobKey.of(request)
        other = key.other_media()
        ends = _sooner(ends)
        own, usage, filed, grave = self._read(key, ends, self.ref(other), tombstone_ref(self.client, key))
        elsewhere = _filed_under(other, data, own, filed)
        if elsewhere is not None:  # its client's doc is under the other media type: that job, read there
            request = _as_filed(request, data, elsewhere)
            return request, self.ensure_queued(request, request_id, ends=ends)
        return request, self.ensure_queued(request, request_id, read=(own, usage, grave), ends=ends)

    def ensure_queued(
        self,
        request: GenerationRequest,
        request_id: str | None = None,
        *,
        read: tuple | None = None,
        ends: float | None = None,
    ) -> Outcome:
        """Create the job's queued doc, admitted, unless a doc exists (`.after`: the doc as it now stands).

        A doc that exists (written by the callable, the client, or an earlier call) keeps its state; a live one
        takes the parameters the request gives where it says otherwise (`lifecycle.restate`: a running one is
        queued again), unless the request is a dispatch of the functions arriving (`dispatched`: marked arrived,
        nothing else changed). A job past the user's limits is created failed `QuotaExceeded`. `request_id`: the
        RunPod job that brought the request, on the doc it creates (whichever path of a worker claims the job then logs
        it as the job's requestId, also a listener that hears of the doc before the request reaches the slot).
        `read`: the job's, its usage doc's and its tombstone's snapshots, read together just before (`accept`).
        `ends`: as `transition`'s.
        """
        key = JobKey.of(request)
        graves = [read[2]] if read is not None else []  # the tombstone as read with the doc: the first try's
        created = {**queued_document(request), **(brought(request_id, {}) if request_id else {})}

        def decide(doc: dict | None, now: datetime) -> dict | None:
            # This try's own (the first's): a later try that finds the doc deleted meanwhile reads its tombstone anew.
            grave = graves.pop() if graves else None
            if doc is None:
                # Read with or after the doc found missing: a deletion writes its tombstone in the doc's own commit.
                return None if self._deleted_dispatch(key, request, request_id, grave, ends) else created
            if dispatched(doc, request, request_id):
                return arrived(doc, request, request_id)
            update = lifecycle.restate(doc, restatement(doc, request), request.parameters())
            # A RunPod job brought a live doc with none to this worker: the functions' trigger, waiting on the
            # client's doc for its request, then wakes no second worker for it (the review: the contract's own
            # function flow, its doc and then its runsync, was dispatched twice, one more RunPod job, maybe one more
            # GPU). Likewise a refused job this request queues again.
            live = doc.get("status") in (lifecycle.QUEUED, lifecycle.PROCESSING)
            brings = (live and not doc.get(RUNPOD_JOB_ID)) or lifecycle.refused(doc)
            if request_id and (update or brings):
                # RunPod's redelivery of this request is this request again (`dispatched`), not a new one: once the
                # doc moved on it would put back what a later call replaced, and once the doc was deleted create
                # the job again (its tombstone keeps these ids). Only where it changes the doc: one that changes
                # nothing writes nothing (a finished doc stays as it was; eight at once contend for nothing).
                update = {**(update or {}), **heard(doc, request_id), **(brought(request_id, doc) if brings else {})}
            return update

        return self.transition(key, decide, admit=True, read=read, ends=ends)

    def _deleted_dispatch(
        self,
        key: JobKey,
        request: GenerationRequest,
        request_id: str | None,
        grave_read: Any = None,
        ends: float | None = None,
    ) -> bool:
        """Whether `request` is a dispatch of a job its owner deleted (`deletion`), arriving late: it must not create
        the job again, a GPU run nobody asked for. Its mark is used up as on a doc (`arrived`): the same request
        sent afterwards is the owner's new job. `grave_read`: its snapshot, read with the doc (the first try's)."""
        ref = tombstone_ref(self.client, key)
        for _ in range(TOMBSTONE_TRIES):
            snapshot = grave_read if grave_read is not None else ref.get(**bound(_sooner(ends)))
            grave_read = None
            grave = snapshot.to_dict() if snapshot.exists else None
            if grave is None or not dispatched(grave, request, request_id):
                return False
            seen = grave.get(ARRIVED_DISPATCHES)
            if request_id and isinstance(seen, list) and request_id in seen:
                return True  # RunPod's redelivery of a dispatch that arrived: its record stays
            # As `arrived` marks one on a doc, but none of the tombstone's ids dropped to make room: each one dropped
            # would let its redelivery run the job again.
            used = {
                **(undelivered(grave, request) or {}),
                **({ARRIVED_DISPATCHES: ArrayUnion([request_id])} if request_id else {}),
            }
            if not used:
                return True
            try:
                written = self.client.write_option(last_update_time=snapshot.update_time)
                ref.update(used, option=written, **bound(_sooner(ends)))
                return True
            except COMMIT_CONFLICTS:  # another late dispatch used a mark meanwhile: read again
                continue
        return True  # contended past its tries: refused, which runs nothing twice

    # --- queries ---------------------------------------------------------------------------------------------

    def queued(self, media: str, *, user_id: str | None = None) -> firestore.Query:
        """Queued jobs of one media type: everyone's (a collection-group query, for listeners), or one user's."""
        source = self.client.collection(COLLECTION, user_id, media) if user_id else self.client.collection_group(media)
        return source.where(filter=FieldFilter("status", "==", lifecycle.QUEUED))

    def oldest_queued(
        self,
        media: str,
        *,
        limit: int,
        user_id: str | None = None,
        created_before: datetime | None = None,
        dated: bool = False,
        after: firestore.DocumentSnapshot | None = None,
    ) -> firestore.Query:
        """Queued jobs oldest first (by `created_at`; a doc without one is not in it), at most `limit`, after the
        `after` of an earlier page. `dated`: only those whose `created_at` is a timestamp (Firestore orders other
        types first: null, booleans, numbers)."""
        query = self.queued(media, user_id=user_id)
        if created_before is not None:
            query = query.where(filter=FieldFilter("created_at", "<=", created_before))
        elif dated:
            query = query.where(filter=FieldFilter("created_at", ">=", datetime(1, 1, 1, tzinfo=UTC)))
        query = query.order_by("created_at").limit(limit)
        return query.start_after(after) if after is not None else query

    def users_with_pending(self, *, limit: int, after: firestore.DocumentSnapshot | None = None) -> firestore.Query:
        """Users with jobs queued or running (their usage docs: `pending` counts both), at most `limit`, after
        the `after` of an earlier page."""
        query = (
            self.client.collection(quota.USAGE_COLLECTION)
            .where(filter=FieldFilter("pending", ">", 0))
            .order_by("pending")
            .limit(limit)
        )
        return query.start_after(after) if after is not None else query

    def cancelling(self, media: str) -> firestore.Query:
        """Unfinished jobs whose owner asked to cancel them (everyone's: for a worker's cancel listener)."""
        return (
            self.client.collection_group(media)
            .where(filter=FieldFilter(lifecycle.CANCEL_REQUESTED, "==", True))
            .where(filter=FieldFilter("status", "in", [lifecycle.QUEUED, lifecycle.PROCESSING]))
        )

    def in_document_order(
        self, media: str, status: str, *, limit: int, after: firestore.DocumentSnapshot | None = None
    ) -> firestore.Query:
        """Jobs of one status in document order, at most `limit`, after the `after` of an earlier page: the only
        way to find a processing one whose lease is missing or unreadable (an admin's write), which `expired` never
        returns, or a queued one without `created_at`, which no ordered query does."""
        query = (
            self.client.collection_group(media)
            .where(filter=FieldFilter("status", "==", status))
            .order_by("__name__")
            .limit(limit)
        )
        return query.start_after(after) if after is not None else query

    def expired(
        self, media: str, now: datetime, *, limit: int, after: firestore.DocumentSnapshot | None = None
    ) -> firestore.Query:
        """Processing jobs whose lease ran out before `now` (their worker is gone), at most `limit`, after the
        `after` of an earlier page."""
        query = (
            self.client.collection_group(media)
            .where(filter=FieldFilter("status", "==", lifecycle.PROCESSING))
            .where(filter=FieldFilter("lease_expires_at", "<", now))
            .order_by("lease_expires_at")
            .limit(limit)
        )
        return query.start_after(after) if after is not None else query


def contract_failure(key: JobKey, doc: Mapping[str, Any]) -> dict[str, Any] | None:
    """The failure a queued doc that breaks the contract ends with (`ValidationError`, the contract's message);
    None for a doc that states a job."""
    try:
        parse_document(key.user_id, key.media_type, key.file_uid, doc)
    except ContractError as exc:
        error = GenerationError(VALIDATION_ERROR, exc.message)
        return lifecycle.failure(error, user_id=key.user_id, file_uid=key.file_uid)
    return None


def _request_part(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A new doc's request and creation fields, the RunPod job that brought it (a refused job was never dispatched
    nor run: no other marks), and `requested_at`: a request's job, refused or not (a review: without it, the job
    sent again and running was a client's doc to the next bad call of its file_uid, which failed it)."""
    kept = ("created_at", "task_type", REQUESTED_AT, *REQUEST_MARKS)
    return {k: v for k, v in doc.items() if k in KNOWN_FIELDS or k in kept}


def _filed_under(other: JobKey, data: Mapping[str, Any], own: Any, filed: Any) -> JobKey | None:
    """`filed_elsewhere`'s verdict on the snapshots of the job's doc (`own`) and its `other` media type's."""
    if (own is not None and own.exists) or filed is None or not filed.exists:
        return None
    doc = filed.to_dict() or {}
    if REQUESTED_AT in doc:
        return None  # the other media type's own job, which a request created
    live = doc.get("status") in (lifecycle.QUEUED, lifecycle.PROCESSING)
    return other if live or lifecycle.refused(doc) or _states_no_more_than(doc, data) else None


def _as_filed(request: GenerationRequest, data: Mapping[str, Any], other: JobKey | None) -> GenerationRequest:
    """`as_filed` where the job's client filed it under `other` (None: where the request says)."""
    if other is None:
        return request
    try:
        return parse_document(other.user_id, other.media_type, other.file_uid, data)
    except ContractError as exc:
        raise Misfiled(exc.message, other) from None


def _present(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A doc as it stands after an update: the fields that update deletes are gone."""
    return {name: value for name, value in doc.items() if value is not DELETE_FIELD}


def refused_try(key: JobKey, doc: Mapping[str, Any], now: datetime) -> dict:
    """The charge fields of a running job that its request's refusal fails (a worker took the client's doc before
    the refused request came): the time its try ran, as a cancel is charged, not its whole estimate (the security
    review: a 0.1 s try cost 17.4). Nothing for a job no worker runs."""
    cost = _cost(key, doc) if doc.get("status") == lifecycle.PROCESSING and quota.admitted(doc) else None
    return {} if cost is None else quota.cancelled_cost(doc, cost, now)


def _cost(key: JobKey, doc: Mapping[str, Any]) -> float | None:
    try:
        return quota.estimate(parse_document(key.user_id, key.media_type, key.file_uid, _present(doc)))
    except ContractError:
        return None


def tombstone_ref(client: firestore.Client, key: JobKey) -> firestore.DocumentReference:
    return client.collection(COLLECTION, key.user_id, DELETED_JOBS).document(f"{key.media_type}-{key.file_uid}")


def stated_request(key: JobKey, doc: Mapping[str, Any]) -> GenerationRequest | None:
    """The request a job's doc states, or None where it breaks the contract."""
    try:
        return parse_document(key.user_id, key.media_type, key.file_uid, doc)
    except ContractError:
        return None


def queued_document(request: GenerationRequest) -> dict[str, Any]:
    return {
        **request.parameters(),
        "status": lifecycle.QUEUED,
        "created_at": SERVER_TIMESTAMP,
        "modified": SERVER_TIMESTAMP,
        "generated": False,
        "error": False,
        "task_type": request.task_type,
        "user_id": request.user_id,
        "file_uid": request.file_uid,
        REQUESTED_AT: SERVER_TIMESTAMP,
    }


def _states_no_more_than(doc: Mapping[str, Any], data: Mapping[str, Any]) -> bool:
    """Whether every parameter the doc states is stated, equal, by the request (the client sample writes its
    options into both): a misfiled doc of this request, not another job that shares its file_uid."""
    try:
        stated, given = normalise_document_fields(doc), normalise_document_fields(data)
    except ContractError:
        return False
    return all(
        given.get(name) == value for name, value in stated.items() if name in PARAMETER_FIELDS and value is not None
    )


# Per (project, user), when `JobStore._recount` last found their counts right (monotonic): shared by every store of the
# process (the functions make one per call).
_COUNTED_RIGHT: dict[tuple[str, str, bool], float] = {}  # (project, user, at a limit: else at an end)


def _remember(user: tuple[str, str, bool]) -> None:
    if len(_COUNTED_RIGHT) >= 10_000:
        _COUNTED_RIGHT.clear()
    _COUNTED_RIGHT[user] = time.monotonic()


def forget_counted(project: str, user_id: str) -> None:
    """The user's counts may be wrong again: a claim here found its job's doc gone or written over (its counts,
    left behind, are found at the user's next end or limit, not skipped as found right a moment ago)."""
    for at_a_limit in (False, True):
        _COUNTED_RIGHT.pop((project, user_id, at_a_limit), None)


def _end_recount_ends() -> float:
    return time.monotonic() + END_RECOUNT_SECONDS


def _count(query: firestore.Query, ends: float) -> int:
    """How many docs a query matches (an aggregation: one read per 1,000 index entries)."""
    results: Any = query.count(alias="n").get(**bound(ends))
    first = results[0]
    return int((first[0] if isinstance(first, list) else first).value)  # one list per query run, by version
