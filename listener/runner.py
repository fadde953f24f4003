"""Running one claimed job: parse → generate → upload → complete, under a lease kept alive by a heartbeat (`lease`).

The runner never decides who owns a job (the store's fenced transitions do). It only makes sure that a job it
runs ends in exactly one of: completed, failed with a contract error type (or `Cancelled` when its owner asked,
`Timeout` past its deadline), or released back to the queue on shutdown; and that a worker that lost its lease
stops generating and writes nothing: it checks the fence in the store right before uploading, so a stale worker
never overwrites the objects (or download tokens) of the worker that took the job over, and its final write is
fenced by the store. Generation is stopped through its progress callback, so it stops at the next denoising step.
"""

from __future__ import annotations

import contextvars
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import structlog
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from firegen_core import lifecycle
from firegen_core.claims import WorkerJobs
from firegen_core.contract import TASK_TYPE, GenerationRequest, parse_document
from firegen_core.deadline import Deadline, timeout_message
from firegen_core.errors import (
    CANCELLED,
    CANCELLED_MESSAGE,
    TIMEOUT,
    GenerationError,
    Interrupted,
    classify,
)
from firegen_core.jobs import BOUND, ClaimedJob, JobKey
from firegen_core.results import most

from .lease import Heartbeat, RunOutcome, job_ids, log_failure, log_lost, quietly, release, transient, why_lost
from .storage import StorageUnavailable, Superseded, UploadStopped, claim_stamp, refused_access
from .storage_outage import StorageOutage

log = structlog.get_logger("listener.runner")

T = TypeVar("T")


# How long a generated job's completion waits for the lease renewal its progress 1 set under way (`Heartbeat.quiet`).
QUIET_WAIT_SECONDS = 1.0
FINAL_WRITE_WAIT = (0.2, 5.0)  # backoff of the fence check and the final write: first wait, longest wait (s)
# How long a generated job's fence check and completion are tried while Firestore is away (at least a lease): a
# failure would wait for Firestore just the same and throw the generation away, and no claim lands meanwhile.
FINISH_PATIENCE_SECONDS = 600.0
# A generated job's upload once its worker leaves (SIGTERM past the grace): then it is released, so that the
# worker's stop (which waits 5 s more, for the release) never leaves it `processing` for its lease to run out (a
# Storage audit: an upload retrying a hung Storage outlived the stop, and the job lost a try to it).
LEAVING_DELIVERY_SECONDS = 25.0
STORAGE_WAIT_STEP_SECONDS = 0.5  # how often a job waiting for Storage to answer looks whether it must stop


class NotRecorded(Exception):
    """Firestore stayed away through a generated job's fence check or completion (FINISH_PATIENCE_SECONDS)."""


class Generator(Protocol):
    """One with `calls_on_generated` (generation.engine.Engine) takes `on_generated` and calls it once the device
    is done with the job, before encoding its files; for another the runner calls it once it returns."""

    def generate(self, request: GenerationRequest, progress=None) -> Any: ...


class BatchGenerator(Generator, Protocol):
    """A generator that can run compatible jobs in one call (generation.engine.Engine): per job, in order, its
    result or the GenerationError / Interrupted it ended with."""

    def generate_batch(self, requests: list[GenerationRequest], progress: list | None = None) -> list[Any]: ...


class Results(Protocol):
    def upload(
        self,
        user_id: str,
        file_uid: str,
        task_type: str,
        files: Sequence[tuple],
        *,
        claim: int | None = None,
        until: Callable[[], float] | None = None,
    ) -> list[str]: ...

    def remove(self, user_id: str, file_uid: str, task_type: str, count: int, *, strict: bool = False) -> int: ...

    def remove_beyond(self, user_id: str, file_uid: str, task_type: str, count: int) -> int: ...

    def remove_written(self, user_id: str, file_uid: str, task_type: str, count: int, claim: int) -> int: ...


@dataclass
class _Run:
    """One job of a generation call (alone or in a batch): what stops it, and its lease's heartbeat."""

    job: ClaimedJob
    request: GenerationRequest
    cancel: threading.Event  # its owner asked to stop it
    started: float  # time.monotonic()
    deadline: float  # time.monotonic() past which it stops, `Timeout`
    overrun: GenerationError  # the error it ends with past its deadline
    heartbeat: Heartbeat
    abort: threading.Event  # the worker is leaving: release it, unless generated (it delivers)
    # In a batch the pipeline goes on for the other jobs after this one stops: `on_stop` writes this job's end
    # at once (on a thread of its own, off the GPU loop), and `outcome` is what it wrote.
    on_stop: Callable[[_Run], None] | None = None
    ending: threading.Thread | None = None
    outcome: RunOutcome | None = None

    held_since: float | None = None  # generated, and held (`hold`) since
    waited_for_storage: bool = False  # its upload waited for Storage to answer (`JobRunner._wait_for_storage`)
    leaving_since: Callable[[], float | None] = lambda: None  # its runner's `leaving_since`

    def seconds(self) -> float:
        """Since it started, as its end's log line says it."""
        return round(time.monotonic() - self.started, 3)

    @property
    def expired(self) -> bool:
        return self.held_since is None and time.monotonic() > self.deadline

    def hold(self) -> None:
        """Generated within its time: what follows until its own upload (waiting on batch-mates' delivery, its
        fence check waiting out a Firestore outage) is not its time (a review: a 4 s outage after a batch's
        generation failed its second job `Timeout`, its images thrown away)."""
        if not self.expired:
            self.held_since = time.monotonic()
            self.heartbeat.generated.set()
            self.heartbeat.held.set()

    def resume(self) -> None:
        """Its own upload starts: the deadline runs again, moved on by the time held."""
        if self.held_since is not None:
            held, self.held_since = time.monotonic() - self.held_since, None
            self.deadline += held
            self.heartbeat.resume_deadline(held)

    @property
    def must_stop(self) -> bool:
        leaving = self.abort.is_set() and (not self.heartbeat.generated.is_set() or self._delivered_too_long)
        return self.heartbeat.lost.is_set() or leaving or self.cancel.is_set() or self.expired

    @property
    def _delivered_too_long(self) -> bool:
        """A generated job delivers as its worker leaves, within LEAVING_DELIVERY_SECONDS: past them, one still in
        its encode (an MP4's frames ask) stops and is released, rather than hold the worker's exit (a review)."""
        since = self.leaving_since()
        return since is not None and time.monotonic() > since + LEAVING_DELIVERY_SECONDS

    def progress(self, fraction: float) -> None:
        """The generation's progress callback: stops it (Interrupted) at its next step when it must stop."""
        if self.must_stop:
            if self.on_stop is not None and self.ending is None:
                self.ending = threading.Thread(target=self.on_stop, args=(self,), name="job-end", daemon=True)
                self.ending.start()
            raise Interrupted()
        self.heartbeat.post(fraction)


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
        # The encoding (a PNG: ~0.15 s of zlib; a video's MP4: seconds) is then off the device's path.
        self._says_generated = getattr(generator, "calls_on_generated", False) is True
        self.deadline = deadline or Deadline()
        self.abort = threading.Event()  # set on shutdown past the grace period: release running jobs
        self.leaving_since: float | None = None  # time.monotonic() when `abort` was first set
        # Called when the bucket refuses an upload for want of access (the worker's part: stop claiming and leave).
        self.on_storage_refused: Callable[[BaseException], None] | None = None
        # Told when Storage failed an upload past its retries (the reconciler's: claim nothing until it answers).
        self.storage_outage: StorageOutage | None = None
        self._heartbeats: set[Heartbeat] = set()  # of the jobs running now

    def release_running(self) -> None:
        """The worker is leaving (its shutdown grace is over, or a second signal): every running job goes back
        to the queue now, from its heartbeat, whether or not its generation reaches a step to stop at; one generated
        already delivers, within LEAVING_DELIVERY_SECONDS."""
        if self.leaving_since is None:
            self.leaving_since = time.monotonic()
        self.abort.set()
        for heartbeat in list(self._heartbeats):
            heartbeat.wake()

    def run(self, job: ClaimedJob, cancel: threading.Event | None = None) -> RunOutcome:
        """Run a claimed job to its end; returns the final state written (or 'lost' / 'released').

        `cancel` is set (by the reconciler's cancel listener) when the owner asks to stop the job: generation
        stops at its next step and the job ends `failed` / `Cancelled`. Past its deadline it ends `Timeout`.
        """
        return self.run_batch([(job, cancel)])[0]

    def run_batch(
        self,
        jobs: Sequence[tuple[ClaimedJob, threading.Event | None]],
        *,
        on_generated: Callable[[], None] | None = None,
        on_ended: Callable[[ClaimedJob, RunOutcome], None] | None = None,
    ) -> list[RunOutcome]:
        """Run claimed jobs through one generation call (`generate_batch`; a single job: `generate`), each as
        `run` would: its own lease, progress, cancel signal, fence, upload and final write, so one job's cancel,
        lost lease or bad document ends that job alone. Their deadline is the batch's: the deadline of their
        summed estimates (they finish together). Outcomes in the order of `jobs`. `on_generated`: called once the
        generation call is over (the device is free for another job; what is left is each job's fence check,
        upload and completion: round trips to Firestore and Storage). `on_ended`: told of a batched job whose end
        was written while the batch went on for the others (it stopped early: cancelled, restated, taken over)."""
        started = time.monotonic()
        if on_generated is not None:
            on_generated = _once(on_generated)
        outcomes: dict[int, RunOutcome] = {}
        parsed: dict[int, tuple[ClaimedJob, threading.Event, GenerationRequest]] = {}
        for index, (job, cancel) in enumerate(jobs):
            try:
                request = parse_document(job.key.user_id, job.key.media_type, job.key.file_uid, job.doc)
            except Exception as exc:
                outcomes[index] = (
                    quietly(lambda exc=exc, job=job: self._fail(job, _caused(exc)), job) or RunOutcome.LOST
                )
                continue
            parsed[index] = (job, cancel or threading.Event(), request)
        limit = self.deadline.seconds_for([request for _, _, request in parsed.values()])
        overrun = GenerationError(TIMEOUT, timeout_message(limit))
        hard_deadline = started + limit + self.renew_interval
        with ExitStack() as stack:
            # Every line of this thread names its job(s): also the libraries' (a prompt cut to CLIP's 77 tokens).
            if len(jobs) == 1:
                stack.enter_context(structlog.contextvars.bound_contextvars(**job_ids(jobs[0][0])))
            else:
                stack.enter_context(
                    structlog.contextvars.bound_contextvars(file_uids=[j.key.file_uid for j, _ in jobs])
                )
            runs = {
                index: _Run(
                    job,
                    request,
                    cancel,
                    started,
                    started + limit,
                    overrun,
                    stack.enter_context(self._heartbeat(job, hard_deadline, overrun, cancel)),
                    self.abort,
                    (lambda run: self._end_now(run, on_ended)) if len(parsed) > 1 else None,
                    leaving_since=lambda: self.leaving_since,
                )
                for index, (job, cancel, request) in parsed.items()
            }
            for run in runs.values():
                extra = {"batch_size": len(runs)} if len(runs) > 1 else {}
                log.info(
                    "job_started",
                    task_type=run.request.task_type,
                    deadline_seconds=round(limit, 1),
                    **extra,
                    **job_ids(run.job),
                )
            t0 = time.monotonic()
            generated = self._generate(list(runs.values()), on_generated)
            seconds = time.monotonic() - t0
            for run in runs.values():
                run.hold()
            # Said already where the generator encodes after it (`Generator`). Not for a generation that failed before
            # the device was done (a broken device among the causes): its slot is kept until its end is written, by
            # when the worker's leaving has stopped its claims.
            if on_generated is not None and any(not isinstance(result, BaseException) for result in generated):
                on_generated()
            # Each job's writes wait out a Firestore outage until then: the batch's jobs share it.
            patient_until = self._patient_until()

            def deliver(run: _Run, result: Any) -> RunOutcome:
                try:
                    return self._deliver(run, result, seconds, patient_until)
                except Exception as exc:  # its lease lapses and another try runs it; the batch's others go on
                    log.error("job_runner_crashed", error=repr(exc), exc_info=exc, **job_ids(run.job))
                    return RunOutcome.LOST

            if len(runs) <= 1:
                for (index, run), result in zip(runs.items(), generated, strict=True):
                    outcomes[index] = deliver(run, result)
            else:
                # A batch's jobs delivered at once, each under its own lease and fence (a latency audit: the 4th of
                # a batch was done ~0.5 s a job after the 1st); each thread with this one's log context.
                with ThreadPoolExecutor(len(runs), thread_name_prefix="deliver") as pool:
                    delivering = {
                        index: pool.submit(contextvars.copy_context().run, deliver, run, result)
                        for (index, run), result in zip(runs.items(), generated, strict=True)
                    }
                outcomes.update({index: future.result() for index, future in delivering.items()})
        return [outcomes[index] for index in range(len(jobs))]

    def _generate(self, runs: list[_Run], on_generated: Callable[[], None] | None = None) -> list[Any]:
        """Per run: its generation result, or the GenerationError / Interrupted it ended with."""
        if not runs:
            return []

        def device_done() -> None:
            # What is left is their encoding (a video's MP4: seconds): a worker leaving now lets them deliver, as
            # once generated, rather than give them back to run in full again elsewhere (a review of the hand-over).
            for run in runs:
                if not run.expired:
                    run.heartbeat.generated.set()
            if on_generated is not None:
                on_generated()

        said = {"on_generated": device_done} if self._says_generated else {}
        try:
            if len(runs) == 1:
                return [self.generator.generate(runs[0].request, progress=runs[0].progress, **said)]
            return cast(BatchGenerator, self.generator).generate_batch(
                [run.request for run in runs], progress=[run.progress for run in runs], **said
            )
        except Interrupted as exc:
            return [exc] * len(runs)
        except Exception as exc:
            return [_caused(exc)] * len(runs)

    def _deliver(
        self,
        run: _Run,
        result: Any,
        generation_seconds: float,
        patient_until: float,
    ) -> RunOutcome:
        """Upload a generated job's files and complete it; or fail, stop or release it. The job's heartbeat stops
        before its last write, except `complete`, which it covers (the upload is done by then)."""
        job, heartbeat, request = run.job, run.heartbeat, run.request
        if run.ending is not None:  # a batched job that stopped early: its end is written already
            run.ending.join()
            if run.outcome is not None:
                return run.outcome
        written: str | None = None
        uploading = False  # some of its objects may be written
        try:
            if isinstance(result, BaseException):
                raise result
            # Not `run.progress`: in a batch that would also start `_end_now`, and the end would be written twice.
            if run.must_stop:
                raise Interrupted()
            heartbeat.post(1.0)
            # The fence, right before anything leaves this worker: a worker that lost its lease (presumed
            # dead, taken over) must not overwrite the new owner's objects or download tokens.
            if not self._recorded(job, lambda: self.store.holds(job), heartbeat, patient_until):
                heartbeat.stop()
                return self._lost_or_timed_out(run)
            run.resume()
            t1 = time.monotonic()
            uploading = True
            urls = self._upload(run, result.files, patient_until)
            if run.waited_for_storage:  # its completion waits out Firestore as long again (a review: one try left)
                patient_until = self._patient_until()
            fields = lifecycle.success(
                task_type=request.task_type,
                user_id=job.key.user_id,
                file_uid=job.key.file_uid,
                urls=urls,
                seed=result.seed,
                video_info=result.video_info,
                prompt_truncated=getattr(result, "prompt_truncated", False),  # a stand-in generator's says nothing
                timings={
                    "queue_seconds": _queue_seconds(job),
                    "generation_seconds": generation_seconds,
                    "upload_seconds": time.monotonic() - t1,
                },
            )
            heartbeat.quiet(QUIET_WAIT_SECONDS)
            # The heartbeat keeps the lease while a Firestore blip makes `complete` wait: the upload is done,
            # so the job neither fails nor runs again for it.
            heartbeat.finishing.set()
            written = self._recorded(job, lambda: self.store.complete(job, fields), heartbeat, patient_until)
        except Interrupted:
            heartbeat.stop()  # every write from here on is the job's last
            return self._interrupted(run)
        except UploadStopped as exc:  # cancelled, timed out or taken over, or the worker leaving, mid-upload
            heartbeat.stop()
            if exc.storage_away and self.storage_outage is not None:
                # Storage was failing it: claims wait for Storage as after a failure (a review: the next job was
                # claimed and generated into it); a probe resumes them within seconds where Storage answers.
                self.storage_outage.begin(exc)
            outcome = self._interrupted(run, later=exc.storage_away, delivered=True)
            if outcome == RunOutcome.LOST:  # not this claim's (taken over, restated, deleted): no doc names them
                self._drop_this_try(job, request, later=exc.storage_away)
            return outcome
        except Superseded:  # taken over during its upload (this worker stalled): the new owner's objects stand
            heartbeat.stop()
            self._drop_this_try(job, request)  # what its other uploads wrote meanwhile
            return self._lost(job, heartbeat, reason="lease taken over during the upload; later objects left alone")
        except NotRecorded as exc:  # left `processing`: it runs again once its lease ends, its objects written over
            heartbeat.stop()
            if heartbeat.lost.is_set():  # ended by the heartbeat meanwhile (its deadline, the worker leaving)
                return self._lost_or_timed_out(run)
            log.error("job_not_recorded", error=str(exc.__cause__), **job_ids(job))
            return RunOutcome.LOST
        except Exception as exc:
            heartbeat.stop()
            timed_out = self._timed_out(run)
            if timed_out:  # failed `Timeout` by the heartbeat mid-upload: what it stored goes
                self._remove_results(job, request)
            if heartbeat.lost.is_set():  # failed `Timeout` by the heartbeat, or taken over: not ours to fail
                if not timed_out:
                    self._drop_this_try(job, request)
                return self._lost(job, heartbeat)
            if refused_access(exc) and self.on_storage_refused is not None:
                # The bucket refuses this worker (a resilience review: its grant revoked mid-run, every job it
                # claimed next was generated, charged and failed, the queue drained into failures). The job goes
                # back to the queue and the worker leaves; its replacement's start-up check says what is wrong.
                self.on_storage_refused(exc)
                return release(self.store, job)
            # Its owner's cancel wins over the failure it met meanwhile (an upload failing as it was cancelled).
            error = GenerationError(CANCELLED, CANCELLED_MESSAGE) if run.cancel.is_set() else _caused(exc)
            outcome = self._fail(job, error, delivered=uploading, seconds=run.seconds())
            if outcome == RunOutcome.FAILED and (uploading or job.lease.attempt > 1):
                # No doc names them: what this try uploaded before it failed (a job's files go up at once), or an
                # earlier try's, stopped during its upload (restated, taken over), that no later try wrote over
                # (an accounting fuzz: a failed job's bucket kept them).
                self._remove_results(job, request, every=True, later=isinstance(exc, StorageUnavailable))
            return outcome
        heartbeat.landed = written is not None
        heartbeat.stop()
        if written is None and self._timed_out(run):  # failed `Timeout` during its upload: no doc names its objects
            self._remove_results(job, request)
            return RunOutcome.FAILED
        if written is None:  # no doc will name what this try wrote
            self._drop_this_try(job, request)
            return self._lost(job, heartbeat, when="during its upload")
        if written == lifecycle.FAILED:  # cancelled while it uploaded: its results go too
            self._remove_results(job, request)
            log.info("job_cancelled", during="upload", **job_ids(job))
            return RunOutcome.FAILED
        if job.lease.attempt > 1:  # an earlier try may have uploaded more images (its request then restated it)
            quietly(
                lambda: self.results.remove_beyond(job.key.user_id, job.key.file_uid, request.task_type, len(urls)),
                job,
            )
        # What it cost, where an operator reads (the doc has them too): a GPU-seconds jump shows here first.
        timings = {name: fields[name] for name in ("queue_seconds", "generation_seconds", "upload_seconds")}
        log.info(
            "job_completed",
            seconds=run.seconds(),
            outputs=len(urls),
            task_type=request.task_type,
            **timings,
            **job_ids(job),
        )
        return RunOutcome.COMPLETED

    def _upload(self, run: _Run, files: Sequence[tuple], patient_until: float) -> list[str]:
        """The job's files uploaded: their URLs. Where Storage fails past the retries, the job whose failure begins
        the outage fails (claims pause: listener/storage_outage.py); another generated meanwhile (its slot was
        handed over as the generation before it ended) or in the same batch waits for Storage to answer, until
        `patient_until`, and tries again, rather than throw its generation away too (a review of the hand-over: with
        its own failure, the outage cost two jobs). UploadStopped where it must stop meanwhile."""
        job = run.job
        while True:
            try:
                with structlog.contextvars.bound_contextvars(**job_ids(job)):  # its retries' log lines name the job
                    return self.results.upload(
                        job.key.user_id,
                        job.key.file_uid,
                        run.request.task_type,
                        files,
                        claim=claim_stamp(job.claimed_at),
                        until=lambda: self._upload_until(run),
                    )
            except StorageUnavailable as exc:
                if self.storage_outage is None or self.storage_outage.begin(exc):
                    raise
                log.warning("job_waits_for_storage", error=str(exc), **job_ids(job))
                if not self._wait_for_storage(run, self.storage_outage, patient_until):
                    raise  # as long as a Firestore outage is waited out: then it fails as the first did

    def _patient_until(self) -> float:
        """Until when a generated job's writes wait out a Firestore outage, from now."""
        return time.monotonic() + max(FINISH_PATIENCE_SECONDS, self.store.lease_seconds)

    def _wait_for_storage(self, run: _Run, outage: StorageOutage, patient_until: float) -> bool:
        """Until Storage answers again (True), or `patient_until` (False). Held meanwhile: the wait is not the job's
        own time, and its lease is kept. UploadStopped where it must stop first: cancelled, its lease lost, or the
        worker leaving (released at once: with Storage away it has nothing to deliver in the leaving's time)."""
        run.hold()
        try:
            while (left := patient_until - time.monotonic()) > 0:
                if self.abort.is_set() or self._upload_until(run) <= time.monotonic():
                    # Storage away still: claims stay paused (not paused again where it has just answered).
                    raise UploadStopped("stopped while waiting for Storage", storage_away=outage.ongoing)
                if outage.wait_over(min(STORAGE_WAIT_STEP_SECONDS, left)):
                    run.waited_for_storage = True
                    return True
            return False
        finally:
            run.resume()

    def _timed_out(self, run: _Run) -> bool:
        """Whether the heartbeat failed the job `Timeout` (or set out to), by Firestore's word: its write may still
        be under way past the heartbeat's join, or have landed with its answer lost, so the failure is written (or
        found written: `fail` knows its own landed write) here too, retried like the final writes."""
        if run.heartbeat.ended != RunOutcome.FAILED:
            return False
        end = run.heartbeat.verdict or run.overrun  # `Cancelled` where its owner had asked
        delivered = run.heartbeat.generated.is_set()  # as the heartbeat wrote it
        settled = bool(
            quietly(
                lambda: self._while_held(run.job, lambda: self.store.fail(run.job, end, delivered=delivered)), run.job
            )
        )
        if settled and run.heartbeat.first_to_log():  # the heartbeat's own write failed: the runner's is the end
            log_failure(end.error_type, end.message, run.job, by="runner", seconds=run.seconds())
        return settled

    def _lost_or_timed_out(self, run: _Run, *, later: bool = False) -> RunOutcome:
        """A run whose lease the heartbeat gave up: failed `Timeout` (settled here: the heartbeat's own write may
        have failed in the Firestore blip that timeouts cluster in, and the job would then wait out its lease and
        run again), else lost."""
        if self._timed_out(run):
            self._remove_results(run.job, run.request, later=later)  # an earlier attempt's partial upload
            return RunOutcome.FAILED
        return self._lost(run.job, run.heartbeat)

    def _end_now(self, run: _Run, on_ended: Callable[[ClaimedJob, RunOutcome], None] | None = None) -> None:
        """A job of a batch that must stop (its owner cancelled it, its lease is lost...): its end is written
        now, while the batch goes on for the others, not when they finish (its images are dropped then), and
        `on_ended` hears of it then (a restated job runs again without waiting for the batch to deliver)."""
        try:
            run.heartbeat.stop()
            run.outcome = self._interrupted(run)
        except Exception as exc:  # written again once the batch ends (`_deliver`)
            log.warning("write_error", error=str(exc), **job_ids(run.job))
            return
        if on_ended is not None:
            try:
                on_ended(run.job, run.outcome)
            except Exception as exc:  # the batch's own end settles it
                log.error("job_runner_crashed", error=repr(exc), exc_info=exc, **job_ids(run.job))

    def _interrupted(self, run: _Run, *, later: bool = False, delivered: bool = False) -> RunOutcome:
        """A job whose generation (or upload) stopped: nothing to write when its lease was lost; failed `Cancelled`
        or `Timeout` when its owner or its deadline stopped it; else (shutdown, a broken device) released. `later`:
        what it uploaded is removed on a thread of its own (Storage was failing its upload). `delivered`: stopped
        during its upload (see `_fail`)."""
        job = run.job
        if run.heartbeat.lost.is_set():
            return self._lost_or_timed_out(run, later=later)
        if run.cancel.is_set() or run.expired:
            error = GenerationError(CANCELLED, CANCELLED_MESSAGE) if run.cancel.is_set() else run.overrun
            outcome = self._fail(job, error, delivered=delivered, seconds=run.seconds())
            if outcome == RunOutcome.FAILED:
                self._remove_results(job, run.request, later=later)  # its upload's, or an earlier attempt's
            return outcome
        return release(self.store, job)

    def _upload_until(self, run: _Run) -> float:
        """When a generated job's upload must be over by (time.monotonic()): now once its owner cancelled it or its
        lease is gone (failed `Timeout`, taken over); LEAVING_DELIVERY_SECONDS past the worker's leaving; else no
        sooner than its retry budget (a Storage audit: a cancel that came while Storage failed the upload was
        lost, the job failed `ConnectionError` a minute later)."""
        if run.cancel.is_set() or run.heartbeat.lost.is_set():
            return -math.inf
        if self.leaving_since is not None:
            return self.leaving_since + LEAVING_DELIVERY_SECONDS
        return math.inf

    @contextmanager
    def _heartbeat(
        self, job: ClaimedJob, hard_deadline: float, overrun: GenerationError, cancel: threading.Event
    ) -> Iterator[Heartbeat]:
        with Heartbeat(self.store, job, self.renew_interval, hard_deadline, overrun, self.abort, cancel) as heartbeat:
            self._heartbeats.add(heartbeat)
            if self.abort.is_set():  # `release_running` may have woken the others before this one was added
                heartbeat.wake()
            try:
                yield heartbeat
            finally:
                self._heartbeats.discard(heartbeat)

    def _fail(self, job: ClaimedJob, error: GenerationError, *, delivered: bool = False, **more: Any) -> RunOutcome:
        """`delivered`: its upload had begun, its results readable by their owner: a cancel then is charged the
        whole estimate (`WorkerJobs.fail`)."""
        if not self._while_held(job, lambda: self.store.fail(job, error, delivered=delivered)):
            # Not this claim's job any more: nothing was failed (a restated job's `job_preempted` came first).
            return self._lost(job)
        log_failure(error.error_type, error.message, job, cause=error.__cause__, **more)
        return RunOutcome.FAILED

    def _remove_results(
        self, job: ClaimedJob, request: GenerationRequest, *, every: bool = False, later: bool = False
    ) -> None:
        """Delete the job's objects; only ever called right after this worker wrote the job's end (it held the
        lease, so no other worker is writing the same names). `every`, and for any try after the first: as many
        as a job of its type may have (an earlier try's request may have asked for more images, and stopped
        during its upload), not only this request's (a storage review: a cancelled second try left the first's).
        `later`, where Storage was failing: on a thread of its own, not to hold the worker's slot through its
        retries, and only what this try wrote (a job deleted and sent again meanwhile writes the same names); a
        try that timed out for the worker may still have landed (a Storage audit: such an object was left)."""
        every = every or job.lease.attempt > 1
        count = most(request.task_type) if every else 1 if request.is_video else request.num_images_per_prompt
        ids = job.key.user_id, job.key.file_uid, request.task_type, count

        def remove() -> None:
            if later:
                removed = quietly(lambda: self.results.remove_written(*ids, claim_stamp(job.claimed_at)), job)
            else:
                removed = quietly(lambda: self.results.remove(*ids), job)
            if removed:
                log.info("job_results_removed", objects=removed, **job_ids(job))

        if later:
            threading.Thread(target=remove, name=f"remove-{job.key.file_uid}", daemon=True).start()
        else:
            remove()

    def remove_left_behind(self, key: JobKey) -> None:
        """The objects of a job that a claim here ended (cancelled, given up) after a try of it ran, whose worker is
        gone with no runner left to remove them: every name a job of its type may have, those its metadata names
        its own only (`strict`). On a thread of its own, off the claim's. A try that still uploads, its worker
        alive but its lease lost, removes its own once its completion is refused (`_drop_this_try`)."""
        task_type = TASK_TYPE[key.media_type]
        ids = {"user_id": key.user_id, "file_uid": key.file_uid}

        def remove() -> None:
            try:
                removed = self.results.remove(key.user_id, key.file_uid, task_type, most(task_type), strict=True)
            except Exception as exc:
                log.warning("write_error", error=str(exc), **ids)
                return
            if removed:
                log.info("job_results_removed", objects=removed, reason="job ended after its worker was gone", **ids)

        threading.Thread(target=remove, name=f"remove-{key.file_uid}", daemon=True).start()

    def _drop_this_try(self, job: ClaimedJob, request: GenerationRequest, *, later: bool = False) -> None:
        """After an upload whose completion found the job no longer this claim's (restated, taken over, or ended
        by another's write: deleted by its owner, failed by the functions' sweep giving it up, completed by a later
        claim): no doc names what this try wrote, and none will (a later try writes objects of its own, recording
        its own claim), so it goes: the objects that record this claim, no other (the fencing review: a failed
        job's were left in the bucket for good; a storage review: a restated job's, left for its next try to write
        over, stayed where that try asked for fewer images or the job was cancelled before it ran again). `later`:
        on a thread of its own (Storage was failing the upload: its retries would hold the worker's slot)."""
        count = 1 if request.is_video else request.num_images_per_prompt
        stamp = claim_stamp(job.claimed_at)

        def drop() -> None:
            doc = quietly(lambda: self.store.ref(job.key).get(**BOUND), job)  # what became of it, for the log line
            if doc is None:
                ended = "not this claim's"
            elif not doc.exists:
                ended = "job deleted"
            else:
                status = doc.get("status")
                ended = f"job {status} by another" if status in lifecycle.FINAL_STATES else f"job {status} again"
            removed = quietly(
                lambda: self.results.remove_written(job.key.user_id, job.key.file_uid, request.task_type, count, stamp),
                job,
            )
            if removed:
                log.info("job_results_removed", objects=removed, reason=ended, **job_ids(job))

        if later:
            threading.Thread(target=drop, name=f"drop-{job.key.file_uid}", daemon=True).start()
        else:
            drop()

    def _recorded(self, job: ClaimedJob, call: Callable[[], T], heartbeat: Heartbeat, until: float) -> T | None:
        """A generated job's fence check or completion: tried while Firestore is away until `until` (its batch's
        FINISH_PATIENCE_SECONDS from the generation's end), not one lease period, as the fence is the claim, not
        the clock (audit: a 36 s Firestore pause under a 10 s lease failed a finished job `ConnectionError`).
        Past it, `NotRecorded`."""
        try:
            return self._while_held(job, call, heartbeat, within=max(until - time.monotonic(), 0.0))
        except Exception as exc:
            if transient(exc):
                raise NotRecorded() from exc
            raise

    def _while_held(
        self, job: ClaimedJob, call: Callable[[], T], heartbeat: Heartbeat | None = None, within: float | None = None
    ) -> T | None:
        """`call()` (a fenced store call), tried again on transient Firestore errors for as long as the lease
        may still be ours: until the heartbeat (if any) reports it lost, or for one lease period at most (or
        `within` seconds). None when the lease is already known lost."""
        lost = heartbeat.lost if heartbeat is not None else threading.Event()
        if lost.is_set():
            return None
        first, longest = FINAL_WRITE_WAIT
        lease_period = stop_after_delay(within if within is not None else self.store.lease_seconds)
        retrying = Retrying(
            retry=retry_if_exception(transient),
            stop=lambda state: lost.is_set() or lease_period(state),
            wait=wait_exponential_jitter(multiplier=first, max=longest),
            before_sleep=lambda state: log.warning(
                "store_retry",
                error=str(state.outcome and state.outcome.exception()),
                try_number=state.attempt_number,
                **job_ids(job),
            ),
            reraise=True,
        )
        return retrying(call)

    def _lost(
        self, job: ClaimedJob, heartbeat: Heartbeat | None = None, reason: str | None = None, **more: Any
    ) -> RunOutcome:
        """`reason`: what this run saw (a later try's object in the bucket); else why, as its doc says
        (`lifecycle.lost_to`)."""
        if heartbeat is not None and heartbeat.ended is not None:  # ended by the heartbeat, which logged it
            return heartbeat.ended
        if reason is not None:
            log.warning("job_lost", reason=reason, **more, **job_ids(job))
        else:
            lost_to = heartbeat.lost_to if heartbeat is not None else None
            log_lost(log, "job_lost", job, lost_to or why_lost(self.store, job), **more)
        return RunOutcome.LOST


# The deadline's estimates are H100 figures, which say nothing of a CPU (make dev's tiny models): there, the largest
# image the contract allows (4 at 1024x1024, 50 steps) took 120 s on a 2-core machine, its 120 s limit, and the
# largest video 688 s of its 871. Unless JOB_TIMEOUT_MULTIPLE is set, a worker on no CUDA card uses this multiple.
CPU_TIMEOUT_MULTIPLE = 50.0


def _once(call: Callable[[], None]) -> Callable[[], None]:
    """`call` at its first call only: the generator and the runner may both say a generation ended."""
    lock, said = threading.Lock(), threading.Event()

    def first() -> None:
        with lock:
            if said.is_set():
                return
            said.set()
        call()

    return first


def deadline_from(settings, device: str | None = None) -> Deadline:
    """The deadline policy of JOB_TIMEOUT_FLOOR_SECONDS and JOB_TIMEOUT_MULTIPLE, for jobs run on `device` (None:
    not known, a stand-in generator)."""
    multiple = settings.job_timeout_multiple
    if device is not None and not device.startswith("cuda") and "job_timeout_multiple" not in settings.model_fields_set:
        multiple = CPU_TIMEOUT_MULTIPLE
    return Deadline(settings.job_timeout_floor_seconds, multiple)


def _queue_seconds(job: ClaimedJob) -> float:
    created = job.doc.get("created_at")
    if created is None or not hasattr(created, "timestamp"):
        return 0.0
    return max(job.claimed_at.timestamp() - created.timestamp(), 0.0)


def _caused(exc: Exception) -> GenerationError:
    """`classify(exc)`, keeping `exc` as its cause: the log line of a job a bug failed shows where it was raised."""
    error = classify(exc)
    if error is not exc and error.__cause__ is None:
        error.__cause__ = exc
    return error
