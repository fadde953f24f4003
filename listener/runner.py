"""Running one claimed job: parse → generate → upload → complete, under a lease kept alive by a heartbeat.

The runner never decides who owns a job (the store's fenced transitions do). It only makes sure that a job it
runs ends in exactly one of: completed, failed with a contract error type (or `Cancelled` when its owner asked,
`Timeout` past its deadline), or released back to the queue on shutdown; and that a worker that lost its lease
stops generating and writes nothing: it checks the fence in the store right before uploading, so a stale worker
never overwrites the objects (or download tokens) of the worker that took the job over, and its final write is
fenced by the store. Generation is stopped through its progress callback, so it stops at the next denoising step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar

import structlog
from google.api_core.exceptions import Aborted, RetryError
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from firegen_core import lifecycle
from firegen_core.contract import GenerationRequest, parse_document
from firegen_core.deadline import Deadline, timeout_message
from firegen_core.errors import CANCELLED, CANCELLED_MESSAGE, TIMEOUT, GenerationError, Interrupted, classify
from firegen_core.jobs import ClaimedJob, WorkerJobs

from .storage import is_transient

log = structlog.get_logger("listener.runner")

PROGRESS_STEP = 0.25  # a job writes its progress a handful of times, not at every denoising step
T = TypeVar("T")


class RunOutcome(StrEnum):
    """How a run ended on this worker: the job's final state written, given back, or not ours any more."""

    COMPLETED = "completed"
    FAILED = "failed"
    RELEASED = "released"  # back in the queue (shutdown, a broken device): another worker runs it
    LOST = "lost"  # the lease was taken over: this worker wrote nothing


FINAL_WRITE_WAIT = (0.2, 5.0)  # backoff of the fence check and the final write: first wait, longest wait (s)


def transient(exc: BaseException) -> bool:
    """A Firestore error worth another try: unavailable, timed out, or contended (`Aborted`)."""
    return isinstance(exc, (Aborted, RetryError)) or is_transient(exc)


class Generator(Protocol):
    def generate(self, request: GenerationRequest, progress=None) -> Any: ...


class Results(Protocol):
    def upload(self, user_id: str, file_uid: str, task_type: str, files: Sequence[tuple]) -> list[str]: ...

    def remove(self, user_id: str, file_uid: str, task_type: str, count: int) -> int: ...


@dataclass
class Heartbeat:
    """Renews the job's lease in the background and carries throttled progress writes off the GPU loop.

    Also the backstop of the job's deadline: a generation that does not come back to its progress callback
    (stuck inside one step) is failed `Timeout` from here one beat past its deadline; the runner, finding the
    lease gone, then writes nothing.
    """

    store: WorkerJobs
    job: ClaimedJob
    interval: float
    hard_deadline: float = float("inf")  # time.monotonic() past which this thread fails the job
    overrun: GenerationError | None = None
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
            self._wake.wait(min(self.interval, max(self.hard_deadline - time.monotonic(), 0.01)))
            self._wake.clear()
            if self._done.is_set():
                return
            if self.overrun is not None and time.monotonic() > self.hard_deadline:
                self.lost.set()  # from now on the runner writes nothing; this is the job's end
                failed = _quietly(lambda: self.store.fail(self.job, self.overrun))
                log.warning("job_timeout_forced", failed=failed, **_ids(self.job))
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

    def __enter__(self) -> Heartbeat:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()  # the one place a job's heartbeat ends: before any final write but `complete`


def _ids(job: ClaimedJob) -> dict[str, Any]:
    return {"user_id": job.key.user_id, "file_uid": job.key.file_uid, "attempt": job.lease.attempt}


def _quietly(call) -> Any:
    try:
        return call()
    except Exception as exc:
        log.warning("write_error", error=str(exc))
        return None


class JobRunner:
    def __init__(
        self,
        store: WorkerJobs,
        generator: Generator,
        results: Results,
        *,
        renew_interval: float | None = None,
        deadline: Deadline | None = None,
    ):
        self.store = store
        self.generator = generator
        self.results = results
        self.renew_interval = renew_interval or max(store.lease_seconds / 3, 0.2)
        self.deadline = deadline or Deadline()
        self.abort = threading.Event()  # set on shutdown past the grace period: release running jobs

    def run(self, job: ClaimedJob, cancel: threading.Event | None = None) -> RunOutcome:
        """Run a claimed job to its end; returns the final state written (or 'lost' / 'released').

        `cancel` is set (by the reconciler's cancel listener) when the owner asks to stop the job: generation
        stops at its next step and the job ends `failed` / `Cancelled`. Past its deadline it ends `Timeout`.
        """
        started = time.monotonic()
        cancel = cancel or threading.Event()
        try:
            request = parse_document(job.key.user_id, job.key.media_type, job.key.file_uid, job.doc)
        except Exception as exc:
            return self._fail(job, classify(exc))
        limit = self.deadline.seconds(request)
        overrun = GenerationError(TIMEOUT, timeout_message(limit))
        interrupted, error = False, None
        with Heartbeat(
            self.store, job, self.renew_interval, started + limit + self.renew_interval, overrun=overrun
        ) as heartbeat:

            def progress(fraction: float) -> None:
                expired = time.monotonic() > started + limit
                if heartbeat.lost.is_set() or self.abort.is_set() or cancel.is_set() or expired:
                    raise Interrupted()
                heartbeat.post(fraction)

            try:
                log.info("job_started", task_type=request.task_type, deadline_seconds=round(limit, 1), **_ids(job))
                t0 = time.monotonic()
                result = self.generator.generate(request, progress=progress)
                t1 = time.monotonic()
                progress(1.0)
                # The fence, right before anything leaves this worker: a worker that lost its lease (presumed
                # dead, taken over) must not overwrite the new owner's objects or download tokens.
                if not self._while_held(heartbeat, lambda: self.store.holds(job)):
                    return self._lost(job)
                urls = self.results.upload(job.key.user_id, job.key.file_uid, request.task_type, result.files)
                t2 = time.monotonic()
                fields = lifecycle.success(
                    task_type=request.task_type,
                    user_id=job.key.user_id,
                    file_uid=job.key.file_uid,
                    urls=urls,
                    seed=result.seed,
                    video_info=result.video_info,
                    timings={
                        "queue_seconds": _queue_seconds(job),
                        "generation_seconds": t1 - t0,
                        "upload_seconds": t2 - t1,
                    },
                )
                # The heartbeat keeps the lease while a Firestore blip makes `complete` wait: the upload is done,
                # so the job neither fails nor runs again for it.
                heartbeat.finishing.set()
                written = self._while_held(heartbeat, lambda: self.store.complete(job, fields))
            except Interrupted:
                interrupted = True
            except Exception as exc:
                error = classify(exc)
        # The heartbeat has stopped: every write from here on is the job's last.
        if interrupted:
            if heartbeat.lost.is_set():
                return self._lost(job)
            if cancel.is_set() or time.monotonic() > started + limit:
                outcome = self._fail(job, GenerationError(CANCELLED, CANCELLED_MESSAGE) if cancel.is_set() else overrun)
                if outcome == RunOutcome.FAILED:
                    self._remove_results(job, request)  # an earlier attempt's partial upload
                return outcome
            released = self.store.release(job)
            log.info("job_released", released=released, **_ids(job))
            return RunOutcome.RELEASED
        if error is not None:
            return self._fail(job, error)
        if written is None:
            return self._lost(job)
        if written == lifecycle.FAILED:  # cancelled while it uploaded: its results go too
            self._remove_results(job, request)
            log.info("job_cancelled", during="upload", **_ids(job))
            return RunOutcome.FAILED
        log.info("job_completed", seconds=round(time.monotonic() - started, 3), outputs=len(urls), **_ids(job))
        return RunOutcome.COMPLETED

    def _fail(self, job: ClaimedJob, error: GenerationError) -> RunOutcome:
        log.warning("job_failed", error_type=error.error_type, error_message=error.message, **_ids(job))
        if not self.store.fail(job, error):
            return self._lost(job)
        return RunOutcome.FAILED

    def _remove_results(self, job: ClaimedJob, request: GenerationRequest) -> None:
        """Delete the job's objects; only ever called right after this worker wrote the job's end (it held the
        lease, so no other worker is writing the same names)."""
        count = 1 if request.is_video else request.num_images_per_prompt
        removed = _quietly(lambda: self.results.remove(job.key.user_id, job.key.file_uid, request.task_type, count))
        if removed:
            log.info("job_results_removed", objects=removed, **_ids(job))

    def _while_held(self, heartbeat: Heartbeat, call: Callable[[], T]) -> T | None:
        """`call()` (a fenced store call), tried again on transient Firestore errors for as long as the lease
        may still be ours: until the heartbeat reports it lost, or for one lease period at most. None when the
        lease is already known lost."""
        if heartbeat.lost.is_set():
            return None
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
    def _lost(job: ClaimedJob) -> RunOutcome:
        log.warning("job_lost", reason="lease taken over; nothing written", **_ids(job))
        return RunOutcome.LOST


def deadline_from(settings) -> Deadline:
    """The deadline policy of JOB_TIMEOUT_FLOOR_SECONDS and JOB_TIMEOUT_MULTIPLE."""
    return Deadline(settings.job_timeout_floor_seconds, settings.job_timeout_multiple)


def _queue_seconds(job: ClaimedJob) -> float:
    created = job.doc.get("created_at")
    if created is None or not hasattr(created, "timestamp"):
        return 0.0
    return max(job.claimed_at.timestamp() - created.timestamp(), 0.0)
