"""A worker's claim on a job, and every write it makes under that claim: claim, renew, complete, fail, release.

`WorkerJobs.claim` is the claim transaction: it takes a queued job (or one whose lease ran out) through
`JobStore.transition`, knowing its own earlier tries. Every later write of the claim (renew, complete, fail,
release) goes through `WorkerJobs._fenced`, which checks first that the job is still `processing` under this
worker and attempt: a worker that lost its lease writes nothing. `drop` fails a queued job its owner cancelled,
without a claim. `firegen_core.jobs` (the store, the queries) knows no worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import tenacity
from google.api_core.exceptions import GoogleAPIError
from google.cloud import firestore

from . import lifecycle, quota
from .errors import CANCELLED, QUOTA_EXCEEDED, VALIDATION_ERROR, GenerationError, failure_level
from .jobs import ClaimedJob, JobKey, JobStore, Outcome, contract_failure, forget_counted
from .lifecycle import Lease

# The events a claim logs keep the logger they were always written under (the JSON logs' `logger`).
log = logging.getLogger("firegen_core.jobs")
CLAIM_TRIES = 3  # a claim's calls that failed (Firestore briefly away), tried again knowing its earlier tries


class WorkerJobs(JobStore):
    """One worker's side of the store: its claims under its id and lease, fenced on (worker_id, attempt). What a
    worker does without its id (the runsync handler, the reconciler's queries) is the store's own."""

    def __init__(
        self,
        client: firestore.Client,
        *,
        worker_id: str,
        lease_seconds: float = 120,
        max_attempts: int = 3,
        max_releases: int = 3,
        limits: quota.Limits = quota.Limits(),
        retention_days: float = lifecycle.RETENTION_DAYS_DEFAULT,
    ):
        super().__init__(client, limits=limits, retention_days=retention_days)
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.max_releases = max_releases
        # Told of a job a claim or drop here ended (cancelled, given up) after a try of it ran: that try's worker is gone, and
        # what it uploaded is no doc's (a review: a cancelled job's partial upload stayed; README "Cancellation").
        self.on_ended_after_run: Callable[[JobKey], None] | None = None

    def claim(
        self, key: JobKey, *, takeover: bool = True, at_limit: Callable[[JobKey], None] | None = None
    ) -> ClaimedJob | None:
        """Take the job if it is queued or its lease ran out (`takeover` False: queued only); exactly one of many
        racing workers wins.

        A job not yet admitted is admitted here (a doc its client wrote, seen first by this worker); a job
        past its user's USER_MAX_RUNNING stays queued (None; `at_limit(key)` is told so).

        A commit may land while its answer is lost (a timeout, a cancelled call): sent again, it then conflicts
        with itself. A claim that finds its own earlier try in the doc is this claim, not a lost race, or the job
        would sit `processing` under this worker, unrun, until its lease ran out. So a failed call is tried again
        here, where the earlier tries are known (the caller's own retry would not know them): a listener that
        offers the key meanwhile is not heard, and a dropped candidate would wait for the next sweep."""
        tried: list[Lease] = []
        failed_at: list[datetime] = []  # the server times of tries that failed the job (see `_ended_unanswered`)

        def decide(doc: lifecycle.Doc | None, now: datetime) -> dict | None:
            if any(lifecycle.holds(doc, lease) for lease in tried):
                return None  # ours already
            if not takeover and doc is not None and doc.get("status") == lifecycle.PROCESSING:
                return None
            if doc is not None and doc.get("status") == lifecycle.QUEUED and not doc.get(lifecycle.CANCEL_REQUESTED):
                broken = contract_failure(key, doc)
                if broken is not None:  # failed as its admission would have: no slot, no attempt
                    return broken
            update = lifecycle.claim(
                doc, now, worker_id=self.worker_id, lease_seconds=self.lease_seconds, max_attempts=self.max_attempts
            )
            if update is not None and update.get("status") == lifecycle.PROCESSING:
                tried.append(Lease(self.worker_id, update["attempts"]))
            elif update is not None and update.get("status") == lifecycle.FAILED:
                failed_at.append(now)
            return update

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(
                (GoogleAPIError, OSError)
            ),  # Firestore's or the network's, not a bug
            stop=tenacity.stop_after_attempt(CLAIM_TRIES),
            wait=tenacity.wait_exponential(0.1, max=1),
            reraise=True,
        )
        outcome = retrying(self.transition, key, decide, admit=True)
        written, before = outcome.written, outcome.before
        if before is None:
            return None
        if written is None:
            landed = next((lease for lease in tried if lifecycle.holds(before, lease)), None)
            if landed:
                return ClaimedJob(key, landed, before, outcome.read_time)
            if not self._ended_unanswered(before, failed_at):
                # It would have started: its user's running jobs held it (USER_MAX_RUNNING).
                held = tried and before.get("status") == lifecycle.QUEUED and not before.get(lifecycle.CANCEL_REQUESTED)
                if held and at_limit is not None:
                    at_limit(key)
                return None
            # This claim failed it, its answer lost: said, and a run's objects removed, as if answered (a review:
            # neither happened). The doc as it is now tells both: a failure leaves attempts and releases.
            written = before
        if written.get("status") == lifecycle.FAILED:  # past MAX_ATTEMPTS, cancelled, or breaks the contract
            error_type = written.get("error_type")
            fields = {"user_id": key.user_id, "file_uid": key.file_uid, "error_type": error_type}
            # Refused on sight is `job_refused`, as at its admission (README "Logs"), whichever door saw it first.
            event = "job_refused" if error_type in (VALIDATION_ERROR, QUOTA_EXCEEDED) else "job_failed"
            level = logging.getLevelName(failure_level(error_type).upper())
            log.log(level, event, extra={**fields, "error_message": written.get("error_message")})
            if quota.ran(before) and self.on_ended_after_run is not None:
                self.on_ended_after_run(key)
        if written.get("status") != lifecycle.PROCESSING:
            return None
        return ClaimedJob(key, Lease(self.worker_id, written["attempts"]), before, outcome.read_time)

    def _fenced(self, job: ClaimedJob, make: Callable[[lifecycle.Doc, datetime], dict | None]) -> Outcome:
        """A transition of a claimed job, decided by `make` only while this claim still holds it (processing under
        this worker and attempt): a worker that lost its lease writes nothing."""

        def decide(doc: lifecycle.Doc | None, now: datetime) -> dict | None:
            if lifecycle.holds(doc, job.lease):
                return make(doc, now)
            if lifecycle.written_over(doc, job.lease):
                forget_counted(self.client.project, job.key.user_id)
            return None

        return self.transition(job.key, decide)

    def renew(self, job: ClaimedJob, progress: float | None = None) -> Renewal:
        """Extend the lease (and record progress) while this worker still owns the job; true while it does."""
        outcome = self._fenced(
            job, lambda doc, now: lifecycle.renewal(now, lease_seconds=self.lease_seconds, progress=progress)
        )
        return Renewal(
            outcome.applied,
            outcome.applied and bool((outcome.before or {}).get(lifecycle.CANCEL_REQUESTED)),
            None if outcome.applied else lifecycle.lost_to(outcome.before, job.lease),
        )

    def lost_to(self, job: ClaimedJob) -> tuple[str, bool]:
        """Why the claim no longer holds its job (`lifecycle.lost_to`), by a read of its doc: for a log line, so it
        waits 5 s at most (the line says less where Firestore is away)."""
        snapshot = self.ref(job.key).get(retry=None, timeout=5.0)
        return lifecycle.lost_to(snapshot.to_dict() if snapshot.exists else None, job.lease)

    def complete(self, job: ClaimedJob, fields: Mapping[str, Any]) -> str | None:
        """Record the result; returns the status written: `completed`, or `failed` when the owner cancelled the
        job meanwhile (lifecycle.completion); None when the lease was lost."""
        outcome = self._fenced(job, lambda doc, now: lifecycle.completion(doc, fields))
        if outcome.written is not None:
            return outcome.written.get("status")
        # This completion landed on an earlier try whose answer was lost (see `claim`): nobody else ends it. It
        # was written `failed` where the owner had cancelled the job (lifecycle.completion).
        if _landed(outcome.before, job, lifecycle.COMPLETED):
            return lifecycle.COMPLETED
        return lifecycle.FAILED if _landed(outcome.before, job, lifecycle.FAILED, CANCELLED) else None

    def fail(self, job: ClaimedJob, error: GenerationError, *, delivered: bool = False) -> bool:
        """`delivered`: its upload had begun (`lifecycle.DELIVERED`: a cancel is charged the whole estimate)."""
        failed = lifecycle.failure(error, user_id=job.key.user_id, file_uid=job.key.file_uid)
        outcome = self._fenced(job, lambda doc, now: {**failed, **(lifecycle.DELIVERED if delivered else {})})
        # Applied, or applied by an earlier try whose answer was lost (its retry finds the job failed so).
        if outcome.applied:
            return True
        # Its own message too: a claim past MAX_ATTEMPTS fails the job under the old claim's worker and attempt.
        wrote = lifecycle.failure(error, user_id=job.key.user_id, file_uid=job.key.file_uid)
        landed = _landed(outcome.before, job, lifecycle.FAILED, error.error_type)
        return landed and (outcome.before or {}).get("error_message") == wrote.get("error_message")

    def release(self, job: ClaimedJob) -> dict | None:
        """Give the job back to the queue (shutdown); past `max_releases` releases it fails instead. Returns what
        was written (its `status` says which), None when the lease was lost."""
        outcome = self._fenced(job, lambda doc, now: lifecycle.counted_release(doc, max_releases=self.max_releases))
        if outcome.written is not None:
            return outcome.written
        # A failure past max_releases that landed unanswered (see `claim`) keeps this claim's worker and attempt, and
        # a count of releases only a release past the limit writes: it is this release's, and its end is said.
        before = outcome.before or {}
        if _landed(before, job, lifecycle.FAILED) and quota.number(before, lifecycle.RELEASES) > self.max_releases:
            return {name: before.get(name) for name in ("status", "error_type", "error_message", lifecycle.RELEASES)}
        return None

    def drop(self, key: JobKey) -> bool:
        """Fail a queued job its owner cancelled (one write, no claim); True where this call's write landed.

        Like a claim's (see `claim`), its commit may land while its answer is lost: the retry then reads the job
        failed and decides nothing. A drop carries no lease to know its own write by, but it carries `expire_at`,
        computed from its try's server time: a doc whose `expire_at` is one of this call's, to the microsecond,
        was failed by this call. (With no retention, no `expire_at`: such a landing stays unknown.)"""
        tried: list[datetime] = []

        def decide(doc: lifecycle.Doc | None, now: datetime) -> dict | None:
            update = lifecycle.drop_cancelled(doc)
            if update is not None:
                tried.append(now)
            return update

        outcome = self.transition(key, decide)
        doc = outcome.before or {}
        if not outcome.applied and not (doc.get("error_type") == CANCELLED and self._ended_unanswered(doc, tried)):
            return False
        if quota.ran(doc) and self.on_ended_after_run is not None:
            self.on_ended_after_run(key)  # queued again after a try whose worker died mid-upload
        return True

    def _ended_unanswered(self, doc: lifecycle.Doc, tried: list[datetime]) -> bool:
        """Whether the job was failed by one of this call's tries (at the server times `tried`), its answer lost:
        its `expire_at`, computed from that try's time, is one of them to the microsecond. With no retention, no
        `expire_at`: such a landing stays unknown."""
        expire_at = doc.get(lifecycle.EXPIRE_AT)
        return (
            doc.get("status") == lifecycle.FAILED
            and expire_at is not None
            and any(lifecycle.expiry(self.retention_days, now).get(lifecycle.EXPIRE_AT) == expire_at for now in tried)
        )


@dataclass(frozen=True)
class Renewal:
    """A lease renewal's answer: whether the claim still holds the job, and whether its owner asked to cancel it
    (the renewal read the doc anyway: a cancel the worker's listener missed, its window full of other requests, stops
    the run a beat later instead of its running to the end, charged)."""

    held: bool
    cancel_requested: bool = False
    lost_to: tuple[str, bool] | None = None  # not held: why (`lifecycle.lost_to`)

    def __bool__(self) -> bool:
        return self.held


def _landed(doc: Mapping[str, Any] | None, job: ClaimedJob, status: str, error_type: str | None = None) -> bool:
    """Whether the doc is in `status` (with `error_type`) under this claim: a write of this claim landed."""
    doc = doc or {}
    ours = (doc.get("worker_id"), doc.get("attempts")) == (job.lease.worker_id, job.lease.attempt)
    return ours and doc.get("status") == status and (error_type is None or doc.get("error_type") == error_type)
