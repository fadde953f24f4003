"""The Firestore job store: every transition of `lifecycle` runs here, each as one atomic read-decide-write.

`JobStore.transition` is the only place that writes a job document: it reads the doc, asks a pure decision
function what to write given the server's read time, and writes exactly that, only if the doc is unchanged
since the read (else it reads and decides again), or nothing. Claim, renew, complete, fail and release are one line each on top of it, so the
fencing (status + worker_id + attempt) can never be skipped by one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.api_core import retry as retries
from google.api_core.exceptions import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InternalServerError,
    NotFound,
    ResourceExhausted,
    ServiceUnavailable,
)
from google.cloud import firestore
from google.cloud.firestore import SERVER_TIMESTAMP

from . import lifecycle
from .contract import MEDIA_TYPE, GenerationRequest
from .errors import GenerationError
from .lifecycle import Lease

COLLECTION = "generations"
MEDIA_TYPES = tuple(MEDIA_TYPE.values())
MAX_CONFLICTS = 10
CALL_TIMEOUT = 15.0  # seconds, retries included: a runsync caller must not hang on a Firestore outage
# The client's own retry has a 60 s deadline of its own, whatever `timeout` says: each call gets both bounds.
BOUND: dict[str, Any] = {
    "timeout": CALL_TIMEOUT,
    "retry": retries.Retry(
        predicate=retries.if_exception_type(
            ServiceUnavailable, DeadlineExceeded, ResourceExhausted, InternalServerError
        ),
        initial=0.1,
        maximum=2.0,
        timeout=CALL_TIMEOUT,
    ),
}

Decide = Callable[[dict[str, Any], datetime], "dict | None"]


@dataclass(frozen=True)
class JobKey:
    user_id: str
    media_type: str
    file_uid: str

    @classmethod
    def of(cls, request: GenerationRequest) -> JobKey:
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


class JobStore:
    def __init__(self, client: firestore.Client, *, worker_id: str, lease_seconds: float = 120, max_attempts: int = 3):
        self.client = client
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts

    def ref(self, key: JobKey) -> firestore.DocumentReference:
        return self.client.document(key.path)

    def transition(self, key: JobKey, decide: Decide) -> Outcome:
        """Read the doc, let `decide` choose the update from it and the server time, and write it atomically.

        The write is a compare-and-set: it carries the read's `update_time` as a precondition (or must create
        the doc where none was), so it lands only if nobody wrote in between; otherwise we read again and
        decide again. That is a transaction's guarantee without its locks: with lock-based transactions, idle
        workers racing for the same new doc deadlock each other until a lock timeout (seconds on the emulator),
        which stalls throughput exactly when more workers are added.
        """
        ref = self.ref(key)
        for _ in range(MAX_CONFLICTS):
            snapshot = ref.get(**BOUND)
            before = (
                {"user_id": key.user_id, "file_uid": key.file_uid, **snapshot.to_dict()} if snapshot.exists else None
            )
            update = decide(before, snapshot.read_time)
            if update is None:
                return Outcome(before, None, snapshot.read_time)
            try:
                if snapshot.exists:
                    precondition = self.client.write_option(last_update_time=snapshot.update_time)
                    ref.update(update, option=precondition, **BOUND)
                else:
                    ref.create(update, **BOUND)
            except (FailedPrecondition, AlreadyExists, NotFound):
                continue  # someone wrote first: decide again on what they wrote
            return Outcome(before, update, snapshot.read_time)
        raise Aborted(f"{key.path}: still contended after {MAX_CONFLICTS} tries")

    def _fenced(self, job: ClaimedJob, make: Callable[[dict, datetime], dict]) -> bool:
        return self.transition(
            job.key, lambda doc, now: make(doc, now) if lifecycle.holds(doc, job.lease) else None
        ).applied

    # --- the transitions -------------------------------------------------------------------------------------

    def claim(self, key: JobKey) -> ClaimedJob | None:
        """Take the job if it is queued or its lease ran out; exactly one of many racing workers wins."""
        outcome = self.transition(
            key,
            lambda doc, now: lifecycle.claim(
                doc, now, worker_id=self.worker_id, lease_seconds=self.lease_seconds, max_attempts=self.max_attempts
            ),
        )
        if not outcome.applied or outcome.written.get("status") != lifecycle.PROCESSING:
            return None
        lease = Lease(self.worker_id, outcome.written["attempts"])
        return ClaimedJob(key, lease, outcome.before, outcome.read_time)

    def renew(self, job: ClaimedJob, progress: float | None = None) -> bool:
        """Extend the lease (and record progress) while this worker still owns the job."""
        return self._fenced(
            job, lambda doc, now: lifecycle.renewal(now, lease_seconds=self.lease_seconds, progress=progress)
        )

    def complete(self, job: ClaimedJob, fields: Mapping[str, Any]) -> bool:
        return self._fenced(job, lambda doc, now: dict(fields))

    def fail(self, job: ClaimedJob, error: GenerationError) -> bool:
        return self._fenced(
            job, lambda doc, now: lifecycle.failure(error, user_id=job.key.user_id, file_uid=job.key.file_uid)
        )

    def release(self, job: ClaimedJob) -> bool:
        return self._fenced(job, lambda doc, now: lifecycle.release(doc))

    def holds(self, job: ClaimedJob) -> bool:
        """Whether the job is still this claim's (a read: the fence a worker checks before uploading results)."""
        snapshot = self.ref(job.key).get(**BOUND)
        return lifecycle.holds(snapshot.to_dict() if snapshot.exists else None, job.lease)

    def fail_unclaimed(self, key: JobKey, error: GenerationError) -> bool:
        """Fail a queued job without running it (for example when the callable's request was rejected)."""
        return self.transition(
            key,
            lambda doc, now: (
                lifecycle.failure(error, user_id=key.user_id, file_uid=key.file_uid)
                if doc is not None and doc.get("status") == lifecycle.QUEUED
                else None
            ),
        ).applied

    def ensure_queued(self, request: GenerationRequest) -> dict[str, Any]:
        """Create the job's queued doc from the request unless a doc exists; return the doc as it now stands.

        A doc that exists (written by the callable, the client, or an earlier call) is never touched. Create
        comes first because it is atomic on its own: a new job costs one round trip on the accept path.
        """
        ref = self.ref(JobKey.of(request))
        doc = queued_document(request)
        try:
            ref.create(doc, **BOUND)
            return doc
        except AlreadyExists:
            snapshot = ref.get(**BOUND)
        return snapshot.to_dict() if snapshot.exists else self.ensure_queued(request)  # deleted in between


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
    }
