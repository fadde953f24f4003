"""A running job's lease: the heartbeat that keeps it, and the ends of a run written from it.

A claim holds its job only while its lease lasts: past `lease_expires_at` any worker's reconciler takes the job
over, its worker presumed dead. So while a job runs, its `Heartbeat` renews the lease from a thread of its own
(carrying the throttled progress writes off the GPU loop), says when the lease was lost (the run stops and
writes nothing), and ends the job itself where the generation cannot come back to do it: failed `Timeout` past
its deadline, given back to the queue when the worker is leaving (`release`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import structlog

from firegen_core import lifecycle
from firegen_core.claims import WorkerJobs
from firegen_core.dispatches import RUNPOD_JOB_ID
from firegen_core.errors import GenerationError, failure_level
from firegen_core.jobs import ClaimedJob

log = structlog.get_logger("listener.lease")

PROGRESS_STEP = 0.25  # a job writes its progress a handful of times, not at every denoising step...
# ...but a long one (a video on a slower card: a quarter may be a minute or more) also writes how far it got once
# this long has passed since its last write, so its client's progress never stands still that long.
PROGRESS_EVERY_S = 5.0
# A renewal that failed (Firestore away) is tried again this soon, not a beat (a third of the lease) later: after an
# outage a peer's sweep takes over expired leases a lease after it answers again, and an owner whose channel came
# back late then renewed up to a beat after that (a resilience review).
RENEW_RETRY_SECONDS = 5.0


class RunOutcome(StrEnum):
    """How a run ended on this worker: the job's final state written, given back, or not ours any more."""

    COMPLETED = "completed"
    FAILED = "failed"
    RELEASED = "released"  # back in the queue (shutdown, a broken device): another worker runs it
    LOST = "lost"  # the lease was taken over: this worker wrote nothing


@dataclass(eq=False)  # a running thread's holder: compared (and hashed) by identity
class Heartbeat:
    """Renews the job's lease in the background and carries throttled progress writes off the GPU loop.

    Also the backstop of the job's deadline: a generation that does not come back to its progress callback
    (stuck inside one step) is failed `Timeout` from here one beat past its deadline; the runner, finding the
    lease gone, then writes nothing. Likewise the worker's leaving (`abort`, SIGTERM past its grace): the job
    is released from here at once, not once the generation comes back (a video's decode and encode have no
    step to stop at: an audit saw the release 10-15 s past the grace, when RunPod may already have killed the
    worker, and the job then waits out its lease).
    """

    store: WorkerJobs
    job: ClaimedJob
    interval: float
    hard_deadline: float = float("inf")  # time.monotonic() past which this thread fails the job
    overrun: GenerationError | None = None
    abort: threading.Event | None = None  # the worker is leaving: release the job (`JobRunner.release_running`)
    cancel: threading.Event | None = None  # set when a renewal reads that the job's owner asked to cancel it
    lost: threading.Event = field(default_factory=threading.Event)
    ended: RunOutcome | None = None  # `lost` because this thread ended the job itself (written, and logged)
    finishing: threading.Event = field(default_factory=threading.Event)  # the final write is under way
    # Generated, and waiting on Firestore (its fence check) or on its batch-mates' delivery: not the job's own time,
    # so the deadline is held (`hold_deadline`), and moved on by the time held (`resume_deadline`).
    held: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _progress: float | None = None
    _progress_lock: threading.Lock = field(default_factory=threading.Lock)
    _posted: float = 0.0
    _posted_at: float = field(default_factory=time.monotonic)
    _logged: threading.Lock = field(default_factory=threading.Lock)  # the Timeout's `job_failed`: logged once

    def first_to_log(self) -> bool:
        """Whether the caller is the first to log the job's Timeout (this thread, or the runner that settles it
        when this thread's write failed: both may find it written)."""
        return self._logged.acquire(blocking=False)

    def __post_init__(self):
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.job.key.file_uid}", daemon=True)
        self._thread.start()

    def post(self, fraction: float) -> None:
        now = time.monotonic()
        overdue = fraction > self._posted and now - self._posted_at >= PROGRESS_EVERY_S
        if overdue or fraction - self._posted >= PROGRESS_STEP or (fraction >= 1.0 > self._posted):
            self._posted, self._posted_at = fraction, now
            with self._progress_lock:
                self._progress = fraction
            self._wake.set()

    def _run(self) -> None:
        failing = False  # the last renewal failed: the next comes sooner than a beat
        while not self._done.is_set():
            wait = min(self.interval, RENEW_RETRY_SECONDS) if failing else self.interval
            # Its final write under way, `complete` decides its end; held (`_Run.hold`), the deadline waits.
            if self.overrun is not None and not self.finishing.is_set() and not self.held.is_set():
                wait = min(wait, max(self.hard_deadline - time.monotonic(), 0.01))
            self._wake.wait(wait)
            self._wake.clear()
            if self._done.is_set():
                return
            if (
                self.overrun is not None
                and not self.finishing.is_set()
                and not self.held.is_set()
                and time.monotonic() > self.hard_deadline
            ):
                self.ended = RunOutcome.FAILED
                self.lost.set()  # from now on the runner writes nothing; this is the job's end
                failed = quietly(lambda: self.store.fail(self.job, self.overrun), self.job)
                if failed is False:  # fenced off: taken over (this worker stalled), restated or ended meanwhile
                    self.ended = RunOutcome.LOST
                    log.warning("job_lost", reason="no longer this try's at its deadline", **job_ids(self.job))
                elif failed:
                    if self.first_to_log():  # else the runner, past the join, wrote and logged it first
                        log_failure(self.overrun.error_type, self.overrun.message, self.job, by="heartbeat")
                else:  # the write failed (Firestore away): the runner settles it when the step comes back
                    log.warning("job_timeout_forced", failed=failed, **job_ids(self.job))
                return
            if self.abort is not None and self.abort.is_set():
                if self.finishing.is_set():
                    return  # its final write is under way: that is its end
                self.ended = RunOutcome.RELEASED  # before `lost`: a runner past its 5 s join reads no `job_lost`
                self.lost.set()
                self.ended = quietly(lambda: release(self.store, self.job), self.job) or RunOutcome.RELEASED
                return
            with self._progress_lock:  # a fraction posted meanwhile is the next beat's, never dropped
                progress, self._progress = self._progress, None
            try:
                renewed = self.store.renew(self.job, progress=progress)
            except Exception as exc:  # Firestore briefly away: the lease has slack, try again soon
                log.warning("lease_renew_error", error=str(exc), **job_ids(self.job))
                failing = True
                with self._progress_lock:  # the fraction goes with the next try, unless a newer one came
                    self._progress = progress if self._progress is None else self._progress
                continue
            failing = False
            if renewed and renewed.cancel_requested and self.cancel is not None and not self.cancel.is_set():
                log.info("job_cancel_requested", heard="lease renewal", **job_ids(self.job))
                self.cancel.set()
            if not renewed:
                if self.finishing.is_set():
                    return  # the final write landed first: nothing was lost
                log.warning("lease_lost", **job_ids(self.job))
                self.lost.set()
                return

    def resume_deadline(self, held_seconds: float) -> None:
        self.hard_deadline += held_seconds  # before `held` clears: the thread never reads the old deadline as live
        self.held.clear()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._done.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> Heartbeat:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()  # the one place a job's heartbeat ends: before any final write but `complete`


def job_ids(job: ClaimedJob) -> dict[str, Any]:
    ids = {"user_id": job.key.user_id, "file_uid": job.key.file_uid, "attempt": job.lease.attempt}
    request_id = job.doc.get(RUNPOD_JOB_ID)  # the RunPod job that dispatched it: its log lines carry it
    return {**ids, "requestId": request_id} if isinstance(request_id, str) and request_id else ids


def log_failure(error_type: str, message: str, job: ClaimedJob, **more: object) -> None:
    """A job's end as failed: `job_failed`, at the level its error type says (errors.failure_level)."""
    level = failure_level(error_type)
    getattr(log, level)("job_failed", error_type=error_type, error_message=message, **more, **job_ids(job))


def release(store: WorkerJobs, job: ClaimedJob) -> RunOutcome:
    """Give the job back to the queue (fenced; past MAX_RELEASES it fails instead), and say so."""
    written = store.release(job)
    if written is not None and written.get("status") == lifecycle.FAILED:  # past MAX_RELEASES
        log_failure(written["error_type"], written["error_message"], job)
        return RunOutcome.FAILED
    log.info("job_released", released=written is not None, **job_ids(job))
    return RunOutcome.RELEASED


def quietly(call, job: ClaimedJob) -> Any:
    """`call()`, or None where it raised (logged with the job it was for: the heartbeat's thread names none)."""
    try:
        return call()
    except Exception as exc:
        log.warning("write_error", error=str(exc), **job_ids(job))
        return None
