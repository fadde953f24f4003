"""Running one claimed job: parse → generate → upload → complete, under a lease kept alive by a heartbeat.

The runner never decides who owns a job (the store's fenced transitions do). It only makes sure that a job it
runs ends in exactly one of: completed, failed with a contract error type, or released back to the queue on
shutdown; and that a worker that lost its lease stops generating and writes nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from firegen_core import lifecycle
from firegen_core.contract import GenerationRequest, parse_document
from firegen_core.errors import Cancelled, classify
from firegen_core.jobs import ClaimedJob, WorkerJobs

log = structlog.get_logger("listener.runner")

PROGRESS_STEP = 0.25  # a job writes its progress a handful of times, not at every denoising step


class Generator(Protocol):
    def generate(self, request: GenerationRequest, progress=None) -> Any: ...


class Results(Protocol):
    def upload(self, user_id: str, file_uid: str, task_type: str, files: Sequence[tuple]) -> list[str]: ...


@dataclass
class Heartbeat:
    """Renews the job's lease in the background and carries throttled progress writes off the GPU loop."""

    store: WorkerJobs
    job: ClaimedJob
    interval: float
    lost: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _progress: float | None = None
    _posted: float = 0.0

    def __post_init__(self):
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.job.key.file_uid}", daemon=True)
        self._thread.start()

    def post(self, fraction: float) -> None:
        if fraction - self._posted >= PROGRESS_STEP or (fraction >= 1.0 > self._posted):
            self._posted = fraction
            self._progress = fraction
            self._wake.set()

    def _run(self) -> None:
        while not self._done.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._done.is_set():
                return
            progress, self._progress = self._progress, None
            try:
                if not self.store.renew(self.job, progress=progress):
                    log.warning("lease_lost", **_ids(self.job))
                    self.lost.set()
                    return
            except Exception as exc:  # Firestore briefly away: the lease has slack, try again next beat
                log.warning("lease_renew_error", error=str(exc), **_ids(self.job))

    def stop(self) -> None:
        self._done.set()
        self._wake.set()
        self._thread.join(timeout=5)


def _ids(job: ClaimedJob) -> dict[str, Any]:
    return {"user_id": job.key.user_id, "file_uid": job.key.file_uid, "attempt": job.lease.attempt}


class JobRunner:
    def __init__(
        self, store: WorkerJobs, generator: Generator, results: Results, *, renew_interval: float | None = None
    ):
        self.store = store
        self.generator = generator
        self.results = results
        self.renew_interval = renew_interval or max(store.lease_seconds / 3, 0.2)
        self.abort = threading.Event()  # set on shutdown past the grace period: release running jobs

    def run(self, job: ClaimedJob) -> str:
        """Run a claimed job to its end; returns the final state written (or 'lost' / 'released')."""
        started = time.monotonic()
        heartbeat = Heartbeat(self.store, job, self.renew_interval)

        def progress(fraction: float) -> None:
            if heartbeat.lost.is_set() or self.abort.is_set():
                raise Cancelled()
            heartbeat.post(fraction)

        try:
            request = parse_document(job.key.user_id, job.key.media_type, job.key.file_uid, job.doc)
            log.info("job_started", task_type=request.task_type, **_ids(job))
            t0 = time.monotonic()
            result = self.generator.generate(request, progress=progress)
            t1 = time.monotonic()
            progress(1.0)
            urls = self.results.upload(request.user_id, request.file_uid, request.task_type, result.files)
            t2 = time.monotonic()
            fields = lifecycle.success(
                task_type=request.task_type,
                user_id=request.user_id,
                file_uid=request.file_uid,
                urls=urls,
                seed=result.seed,
                video_info=result.video_info,
                timings={
                    "queue_seconds": _queue_seconds(job),
                    "generation_seconds": t1 - t0,
                    "upload_seconds": t2 - t1,
                },
            )
            heartbeat.stop()
            if heartbeat.lost.is_set() or not self.store.complete(job, fields):
                return self._lost(job)
            log.info("job_completed", seconds=round(time.monotonic() - started, 3), outputs=len(urls), **_ids(job))
            return lifecycle.COMPLETED
        except Cancelled:
            heartbeat.stop()
            if heartbeat.lost.is_set():
                return self._lost(job)
            released = self.store.release(job)
            log.info("job_released", released=released, **_ids(job))
            return "released"
        except Exception as exc:
            heartbeat.stop()
            error = classify(exc)
            log.warning("job_failed", error_type=error.error_type, error_message=error.message, **_ids(job))
            if not self.store.fail(job, error):
                return self._lost(job)
            return lifecycle.FAILED

    @staticmethod
    def _lost(job: ClaimedJob) -> str:
        log.warning("job_lost", reason="lease taken over; nothing written", **_ids(job))
        return "lost"


def _queue_seconds(job: ClaimedJob) -> float:
    created = job.doc.get("created_at")
    if created is None or not hasattr(created, "timestamp"):
        return 0.0
    return max(job.claimed_at.timestamp() - created.timestamp(), 0.0)
