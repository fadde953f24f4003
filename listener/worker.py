"""One function wires a worker: `build_worker(settings, generator, firestore_client, storage_client)`.

The entry point (`python -m listener`), the benchmarks and the tests all build their worker here, so they run
the same job store, runner, reconciler and runsync handler; only the generator differs (the real `Engine`, a
no-op one, a slow one).

The `Worker` also owns the process-level decisions:
- shutdown (SIGTERM): stop claiming at once, finish the running job within SHUTDOWN_GRACE_SECONDS or release
  it to the queue; idempotent, and started off the signal handler so the SDK's loop keeps answering meanwhile;
- a broken accelerator: a CUDA error that is not out-of-memory (raised by a job), or a failed fitness check at
  start-up, releases the job (never fails it: the job is fine, the card is not), stops claiming and makes the
  process exit non-zero, so RunPod replaces the worker instead of it failing every job it claims;
- a model loaded after the worker is ready (`Engine.preload_later`) that never ends loading: the same exit.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import structlog

from firegen_core.claims import WorkerJobs
from firegen_core.contract import TASK_TYPE
from firegen_core.errors import Interrupted
from firegen_core.jobs import JobKey
from firegen_core.quota import Limits
from generation.engine import batch_key, is_device_failure

from .handler import RunsyncHandler
from .reconciler import Reconciler
from .runner import BatchGenerator, Generator, JobRunner, deadline_from
from .settings import Settings
from .storage import ResultStore

log = structlog.get_logger("listener.worker")
# How often a main thread waiting for the shutdown runs Python again, so that a signal's handler runs (`shutdown`).
SIGNAL_SLICE_SECONDS = 0.1


class DeviceFailed(Interrupted):
    """The accelerator failed under a job: the job is released (an Interrupted), and the worker leaves."""


class DeviceGuard:
    """Wraps a generator: a device failure during `generate` reports to `on_failure` and cancels the job."""

    def __init__(self, generator: Generator, on_failure: Callable[[BaseException], None]):
        self.generator = generator
        self.on_failure = on_failure

    def generate(self, request, progress=None, **options):
        try:
            return self.generator.generate(request, progress=progress, **options)
        except Exception as exc:
            self._check(exc)
            raise

    def generate_batch(self, requests, progress=None, **options):
        try:
            results = cast(BatchGenerator, self.generator).generate_batch(requests, progress=progress, **options)
        except Exception as exc:
            self._check(exc)
            raise
        for result in results:  # the batch's own error, handed to each job
            if isinstance(result, Exception):
                self._check(result)
        return results

    def _check(self, exc: Exception) -> None:
        if is_device_failure(exc):
            self.on_failure(exc)
            raise DeviceFailed() from exc

    def __getattr__(self, name: str) -> Any:  # check_device, preload, ... of the wrapped generator
        return getattr(self.generator, name)


class FirestoreAccessError(RuntimeError):
    """At start-up: the worker may not write Firestore, or the project has no database (`Worker.fitness_check`)."""


@dataclass
class Worker:
    settings: Settings
    store: WorkerJobs
    runner: JobRunner
    reconciler: Reconciler
    handler: RunsyncHandler
    generator: Any
    failure: str | None = None  # why the worker must be replaced (exit non-zero)
    _shutdown_lock: threading.Lock = field(default_factory=threading.Lock)
    _shutdown_started: bool = False
    _stopped: threading.Event = field(default_factory=threading.Event)
    _signals_chained: bool = False

    @property
    def exit_code(self) -> int:
        return 1 if self.failure else 0

    @property
    def shutting_down(self) -> bool:
        return self._shutdown_started

    def start(self, listen: bool = True) -> Worker:
        self.reconciler.start(listen)
        return self

    # --- shutdown ---------------------------------------------------------------------------------------------
    def shutdown(self, grace: float | None = None) -> None:
        """Stop claiming; finish running jobs within `grace` (default SHUTDOWN_GRACE_SECONDS), then release
        them; returns once that is done (a second call, once the first's is). The wait is in slices: a signal
        the kernel hands to another of the process's threads runs its Python handler in the main thread only when
        that thread runs Python again, and a main thread blocked here until the job ended took a second SIGTERM
        (which releases the job at once) only after the job had ended (a flaky test, then the cause)."""
        self.begin_shutdown(grace)
        while not self._stopped.wait(SIGNAL_SLICE_SECONDS):
            pass

    def begin_shutdown(self, grace: float | None = None) -> None:
        """Start the shutdown in a thread of its own: safe from a signal handler (it never blocks the caller)."""
        with self._shutdown_lock:
            if self._shutdown_started:
                return
            self._shutdown_started = True
        threading.Thread(target=self._stop, args=(grace,), name="worker-shutdown", daemon=True).start()

    def _stop(self, grace: float | None) -> None:
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        # Said at once: a SIGTERM's only trace was the jobs released or `reconciler_stopped` up to the grace later.
        log.info("shutdown_started", grace_seconds=grace, running=self.reconciler.busy)
        try:
            self.reconciler.stop(grace)
        finally:
            self._stopped.set()

    def hurry(self) -> None:
        """Release the running jobs now rather than at the shutdown grace's end (a second signal): they stop at
        their next step, and go back to the queue, as at the grace's end (one generated already delivers)."""
        if not self.runner.abort.is_set():
            log.info("shutdown_hurried", releasing=self.reconciler.busy)
            self.runner.release_running()

    # --- a broken accelerator ---------------------------------------------------------------------------------
    def device_failed(self, exc: BaseException) -> None:
        """A job hit a CUDA error: stop claiming, and have the process leave."""
        self._leave(
            "device_failed",
            f"device failure: {type(exc).__name__}",
            error_type=type(exc).__name__,
            error=" ".join(str(exc).split())[:300],  # which CUDA error: an ECC error is the host's, an assert ours
        )

    def storage_refused(self, exc: BaseException) -> None:
        """The bucket refused a job's upload for want of access: every later job's would be refused too, after
        its GPU time. Stop claiming and leave (the job is released); a replacement's start-up check refuses to
        start until the access is back, and the jobs wait queued."""
        self._leave("storage_refused", "storage refused the upload", error=str(exc)[:300])

    def model_load_stuck(self, seconds: float, **fields: Any) -> None:
        """A model loaded after the start (`Engine.preload_later`) is still loading past the start's deadline (a
        network volume that stalls): its jobs would wait queued for good. Leave, as the start would have."""
        error = f"a model's load ran past the start's {seconds:g} s (STARTUP_TIMEOUT_SECONDS)"
        self._leave("model_load_timed_out", "model load timed out", action="exit", error=error, **fields)

    def _leave(self, event: str, failure: str, action: str = "release the job and exit", **fields: Any) -> None:
        """Stop claiming, and have the process leave non-zero (SIGTERM to itself, so whichever loop runs, the
        SDK's or uvicorn's, ends the way it does on RunPod's own SIGTERM)."""
        with self._shutdown_lock:  # two jobs failing at once: one SIGTERM (a second would hurry the others)
            first, self.failure = self.failure is None, self.failure or failure
        if first:
            log.error(event, **fields, action=action)
            self.begin_shutdown()
            os.kill(os.getpid(), signal.SIGTERM)

    def fitness_check(self) -> None:
        """The start-up check of the accelerator and of the results' bucket, run before the worker claims a job
        (on RunPod by the SDK's fitness runner, which reports a failure and exits 1: `listener.fitness.check`). On
        failure: stop claiming, release any job at once, and raise. A worker that cannot write its results would fail every job after its GPU
        time; stopped, it leaves them queued for a worker that can. Firestore and the bucket are checked on Google
        Cloud only: under the emulators (make dev, the tests, the Hub's test with no Firebase behind it) there is
        no IAM."""
        checks = [getattr(self.generator, "check_device", None)]
        if not self.settings.firestore_emulator_host:
            checks.append(self._check_firestore)
        if not self.settings.storage_emulator_host:
            checks.append(getattr(self.runner.results, "check_access", None))
        try:
            for check in checks:
                if check is not None:
                    check()
        except Exception as exc:
            self.failure = f"fitness check failed: {type(exc).__name__}"
            log.error("fitness_check_failed", error_type=type(exc).__name__, error=str(exc)[:300])
            self.shutdown(grace=0)
            raise
        log.info("fitness_check_passed")

    def _check_firestore(self) -> None:
        """The worker's first heartbeat, a write: a project without a Firestore database, or credentials that may
        not write it, would leave the worker up and idle, every request answered "Could not record the job"."""
        from google.api_core import exceptions

        project = self.store.client.project
        try:
            self.reconciler.beat()
        except exceptions.PermissionDenied as exc:  # also a project whose Firestore API is off: Google's words say so
            raise FirestoreAccessError(
                f"the worker's credentials may not write Firestore of project {project} (grant its service account "
                f"roles/datastore.user): {str(exc.message)[:200]}"
            ) from None
        except exceptions.NotFound:
            raise FirestoreAccessError(
                f"project {project} has no Firestore database (GOOGLE_CLOUD_PROJECT, or the key's project_id)"
            ) from None

    # --- the RunPod SDK ---------------------------------------------------------------------------------------
    def concurrency_modifier(self, current: int) -> int:
        """The SDK's `concurrency_modifier`: runsync jobs taken at once (each answers in milliseconds).

        The SDK calls it from its job loop, on the main thread, after it installed its own SIGTERM handler
        (which only ends its loop once its current job-take poll returns): the first call chains ours in front,
        so that the worker stops claiming the moment the signal arrives."""
        if not self._signals_chained and threading.current_thread() is threading.main_thread():
            self._signals_chained = True
            for signum in (signal.SIGTERM, signal.SIGINT):
                _chain(signum, self.on_signal)
        return self.settings.runsync_concurrency

    def on_signal(self) -> None:
        """A signal on RunPod's job loop: the first begins the shutdown; a repeat releases the running jobs now,
        as elsewhere (a review: the SDK's handler replaced the one that did, and a second SIGTERM did nothing)."""
        if self.shutting_down:
            self.hurry()
        else:
            self.begin_shutdown()


def _chain(signum: int, first: Callable[[], None]) -> None:
    previous = signal.getsignal(signum)

    def handler(sig, frame):
        first()
        if callable(previous):
            previous(sig, frame)

    signal.signal(signum, handler)


def build_worker(
    settings: Settings,
    generator: Generator,
    firestore_client: Any,
    storage_client: Any,
    *,
    worker_id: str,
) -> Worker:
    """The worker's parts, wired; call `.start()` to start claiming."""
    store = WorkerJobs(
        firestore_client,
        worker_id=worker_id,
        lease_seconds=settings.lease_seconds,
        max_attempts=settings.max_attempts,
        max_releases=settings.max_releases,
        limits=Limits(settings.user_max_running, settings.user_max_pending, settings.user_daily_budget),
        retention_days=settings.retention_days,
    )
    results = ResultStore.from_settings(storage_client, settings)
    worker: Worker
    guarded = DeviceGuard(generator, lambda exc: worker.device_failed(exc))
    device = getattr(getattr(generator, "runtime", None), "device", None)  # the engine's; a stand-in has none
    runner = JobRunner(store, guarded, results, deadline=deadline_from(settings, device))
    runner.on_storage_refused = lambda exc: worker.storage_refused(exc)
    store.on_ended_after_run = runner.remove_left_behind
    batches = callable(getattr(generator, "generate_batch", None))  # a stand-in generator may not batch
    loading = getattr(generator, "loading", None)  # the engine's models loading in the background
    reconciler = Reconciler(
        store,
        runner,
        concurrency=settings.concurrency,
        sweep_interval=settings.sweep_interval_seconds,
        batch_max=settings.batch_max if batches else 1,
        batch_key=batch_key if batches else None,
        placeholder_grace=settings.placeholder_grace_seconds,
        claimable=_loaded(loading) if callable(loading) else None,
    )
    results.server_time = reconciler.server_time
    handler = RunsyncHandler(
        store,
        reconciler.submit,
        guarded,
        preempt=reconciler.preempt,
        leaving=lambda: worker.shutting_down or not reconciler.claiming,  # uvicorn's exit stops claiming alone
    )
    worker = Worker(settings, store, runner, reconciler, handler, guarded)
    return worker


def _loaded(loading: Callable[[str], bool]) -> Callable[[JobKey], bool]:
    """Whether a job's model is not loading (loaded, failed, or never to be loaded) by its path's media type."""
    return lambda key: not loading(TASK_TYPE[key.media_type])
