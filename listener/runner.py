"""Running one claimed job: parse → generate → upload → complete, under a lease kept alive by a heartbeat.

The runner never decides who owns a job (the store's fenced transitions do). It only makes sure that a job it
runs ends in exactly one of: completed, failed with a contract error type, or released back to the queue on
shutdown; and that a worker that lost its lease stops generating and writes nothing: it checks the fence in the
store right before uploading, so a stale worker never overwrites the objects (or download tokens) of the
worker that took the job over, and its final write is fenced by the store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from google.api_core.exceptions import Aborted, RetryError
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from firegen_core import lifecycle
from firegen_core.contract import GenerationRequest, parse_document
from firegen_core.errors import Cancelled, classify
from firegen_core.jobs import ClaimedJob, JobStore

from .storage import is_transient

log = structlog.get_logger("listener.runner")

PROGRESS_STEP = 0.25  # a job writes its progress a handful of times, not at every denoising step
FINAL_WRITE_WAIT = (0.2, 5.0)  # backoff of the fence check and the final write: first wait, longest wait (s)


def transient(exc: BaseException) -> bool:
    """A Firestore error worth another try: unavailable, timed out, or contended (`Aborted`)."""
    return isinstance(exc, (Aborted, RetryError)) or is_transient(exc)


class Generator(Protocol):
    def generate(self, request: GenerationRequest, progress=None) -> Any: ...


class Results(Protocol):
    def upload(self, user_id: str, file_uid: str, task_type: str, files: Sequence[tuple]) -> list[str]: ...


@dataclass
class Heartbeat:
    """Renews the job's lease in the background and carries throttled progress writes off the GPU loop."""

    store: JobStore
    job: ClaimedJob
    interval: float
    lost: threading.Event = field(default_factory=threading.Event)
    finishing: threading.Event = field(default_factory=threading.Event)  # the final write is under way
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
                    if self.finishing.is_set():
                        return  # the final write landed first: nothing was lost
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
    def __init__(self, store: JobStore, generator: Generator, results: Results, *, renew_interval: float | None = None):
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
            # The fence, right before anything leaves this worker: a worker that lost its lease (presumed dead,
            # taken over) must not overwrite the new owner's objects or download tokens.
            if not self._while_held(heartbeat, lambda: self.store.holds(job)):
                return self._lost(job, heartbeat)
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
            # The heartbeat keeps the lease while a Firestore blip makes `complete` wait: the upload is done, so
            # the job neither fails nor runs again for it.
            heartbeat.finishing.set()
            completed = self._while_held(heartbeat, lambda: self.store.complete(job, fields))
            heartbeat.stop()
            if not completed:
                return self._lost(job, heartbeat)
            log.info("job_completed", seconds=round(time.monotonic() - started, 3), outputs=len(urls), **_ids(job))
            return lifecycle.COMPLETED
        except Cancelled:
            heartbeat.stop()
            if heartbeat.lost.is_set():
                return self._lost(job, heartbeat)
            released = self.store.release(job)
            log.info("job_released", released=released, **_ids(job))
            return "released"
        except Exception as exc:
            heartbeat.stop()
            error = classify(exc)
            log.warning("job_failed", error_type=error.error_type, error_message=error.message, **_ids(job))
            if not self.store.fail(job, error):
                return self._lost(job, heartbeat)
            return lifecycle.FAILED

    def _while_held(self, heartbeat: Heartbeat, call: Callable[[], bool]) -> bool:
        """`call()` (a fenced store call), tried again on transient Firestore errors for as long as the lease
        may still be ours: until the heartbeat reports it lost, or for one lease period at most."""
        if heartbeat.lost.is_set():
            return False
        first, longest = FINAL_WRITE_WAIT
        lease_period = stop_after_delay(self.store.lease_seconds)
        retrying = Retrying(
            retry=retry_if_exception(transient),
            stop=lambda state: heartbeat.lost.is_set() or lease_period(state),
            wait=wait_exponential_jitter(initial=first, max=longest),
            before_sleep=lambda state: log.warning(
                "store_retry",
                error=str(state.outcome and state.outcome.exception()),
                try_number=state.attempt_number,
                **_ids(heartbeat.job),
            ),
            reraise=True,
        )
        return retrying(call)

    @staticmethod
    def _lost(job: ClaimedJob, heartbeat: Heartbeat) -> str:
        heartbeat.stop()
        log.warning("job_lost", reason="lease taken over; nothing written", **_ids(job))
        return "lost"


def _queue_seconds(job: ClaimedJob) -> float:
    created = job.doc.get("created_at")
    if created is None or not hasattr(created, "timestamp"):
        return 0.0
    return max(job.claimed_at.timestamp() - created.timestamp(), 0.0)
