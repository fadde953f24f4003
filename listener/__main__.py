"""`python -m listener`: the RunPod worker. Serves runsync and runs the reconciler in one process.

The RunPod SDK's own flags pass through unchanged (`--rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port 8000`
serves its local API). Outside RunPod and without those flags, the worker runs the reconciler alone: it still
picks up every queued doc, it just has no HTTP door.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

_T0 = time.perf_counter()


def make_worker_id() -> str:
    pod = os.environ.get("RUNPOD_POD_ID") or socket.gethostname()
    return f"{pod}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


USAGE = """usage: python -m listener [RunPod SDK flags: --rp_serve_api --rp_api_host H --rp_api_port N, --test_input JSON]

The generation worker: the RunPod serverless handler (the runsync contract) and the Firestore reconciler in one
process. Configured by environment variables only (README "Configuration"): STORAGE_BUCKET is required, the
project comes from GOOGLE_CLOUD_PROJECT or the credentials, FIRESTORE_EMULATOR_HOST and STORAGE_EMULATOR_HOST
point it at the emulators, IMAGE_MODEL and VIDEO_MODEL choose the models (`tiny` for the built-in test models).
A wrong setting stops it with one line naming the variable (exit 2). Without RunPod's job API
(RUNPOD_WEBHOOK_GET_JOB) and without --rp_serve_api it runs the reconciler alone."""

NO_GPU = (
    "torch sees no CUDA device: jobs run on the CPU (on a GPU endpoint, the host's driver may be older than the "
    "image's CUDA: set the endpoint's allowed CUDA versions); FIREGEN_DEVICE=cpu says it is on purpose"
)
FULL_MODELS_ON_CPU = (
    "torch sees no CUDA device: the full models run on the CPU, minutes per image and far longer per video (a venv "
    "with CUDA torch: make TORCH_INDEX=https://download.pytorch.org/whl/cu128 venv); FIREGEN_DEVICE=cpu says it is "
    "on purpose"
)


def no_gpu_note(*, production: bool, device_chosen: bool, device: str, model_refs: list[str]) -> str | None:
    """What the worker warns when torch found no card, or None. On RunPod every job would run on the CPU, for most
    of an hour; elsewhere only a full model (not `tiny`, not `none`) makes that slow enough to say. Said, not
    refused: a CPU endpoint with the tiny models is legitimate, and FIREGEN_DEVICE=cpu chooses the CPU."""
    if device_chosen or device != "cpu":
        return None
    if production:
        return NO_GPU
    from generation.models import DISABLED, TINY

    full = [ref for ref in model_refs if ref.strip().lower() not in (TINY, DISABLED)]
    return FULL_MODELS_ON_CPU if full else None


def _on_runpod_queue(argv: list[str]) -> bool:
    """On RunPod with its job API (the SDK's job loop, or its realtime port), not the local API or a test input:
    the SDK's fitness checks apply."""
    flags = ("--rp_serve_api", "--test_input")
    return bool(os.environ.get("RUNPOD_WEBHOOK_GET_JOB")) and not any(a.split("=")[0] in flags for a in argv)


def _on_runpod(argv: list[str]) -> bool:
    flags = ("--rp_serve_api", "--test_input")
    return bool(os.environ.get("RUNPOD_WEBHOOK_GET_JOB")) or any(a.split("=")[0] in flags for a in argv)


def _configuration_error(exc: Exception) -> int:
    """One line naming the setting on stderr, for a person at a terminal; and the same as a JSON event on stdout,
    for the platforms' log views (an alert on severity sees the one line a worker that never starts writes)."""
    from firegen_core.redaction import redact  # the last guard, as on every other line the worker writes

    said = redact(str(exc))
    print(f"listener: configuration error: {said}", file=sys.stderr)
    event = {"event": "configuration_error", "severity": "ERROR", "message": "configuration_error", "error": said}
    print(json.dumps(event), flush=True)
    return 2


def model_not_available(log: Any, task_type: str, failure: Any) -> None:
    """ERROR: every job of that model fails ModelNotAvailable until the setting or the volume is fixed."""
    log.error("model_not_available", task_type=task_type, error=failure.message)


def _crash_reason(exc: BaseException) -> str:
    return f"crashed: {type(exc).__name__}"


def _crashed(log: Any, exc: BaseException, *, exit_line: bool = True) -> int:
    """An exception nothing in the worker expected: its traceback as an ERROR event (Python would print it in plain
    text on stderr, outside the JSON stream the platforms read), then the worker's exit line."""
    log.error("worker_crashed", exc_info=exc)
    if exit_line:
        log.error("worker_exit", code=1, reason=_crash_reason(exc))
    return 1


def main(argv: list[str] | None = None, *, wrap_generator: Callable[[Any], Any] | None = None) -> int:
    """The worker. `wrap_generator` (the benchmarks' slow worker, the tests' injected faults) wraps the engine
    in another generator; everything else is the production worker."""
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(USAGE)
        return 0
    production = _on_runpod_queue(argv)
    from .allocator import limit_arenas

    arenas = limit_arenas(os.environ)  # before any thread is started: each would take an arena of its own
    # The SDK logs every handler output at DEBUG by default: inline results (base64 media) would flood the logs.
    if not os.environ.get("RUNPOD_LOG_LEVEL", "").strip():
        os.environ["RUNPOD_LOG_LEVEL"] = "INFO"
    # gRPC's core writes its INFO notes in its own plain format on stderr (each fork, for a subprocess, while
    # the Firestore streams run): only its errors are worth a line that breaks the JSON stream.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from .settings import SettingsError, load_settings

    try:
        settings = load_settings()
        from .credentials import clients

        firestore_client, storage_client = clients(settings)
    except SettingsError as exc:  # one line naming the variable; a secret's value is never in it
        return _configuration_error(exc)
    os.environ["RUNPOD_LOG_LEVEL"] = settings.runpod_log_level  # as the SDK spells it, before it is imported

    from .logs import configure, route_runpod_sdk

    worker_id = make_worker_id()
    configure(worker_id, settings.log_level)
    import structlog

    log = structlog.get_logger("listener")

    from firegen_core.contract import TEXT2IMAGE, TEXT2VIDEO
    from generation.engine import Engine, EngineConfig, quiet_loading

    from . import fitness
    from .startup import LOAD_ORDER_SECONDS, Deadline, import_runpod_sdk, load_later, load_order, runpod_report
    from .version import code_version
    from .worker import build_worker

    if _on_runpod(argv):
        import_runpod_sdk()  # before anything of the SDK's (the start deadline's report is)
    imported = time.perf_counter()
    # One JSON event per line: no progress bars in the worker's output. It imports diffusers (torch's compiler with
    # it: ~4 s of CPU), which a worker with no model to load (IMAGE_MODEL and VIDEO_MODEL none) never needs.
    models = EngineConfig(image_model=settings.image_model, video_model=settings.video_model)
    if models.enabled(TEXT2IMAGE) or models.enabled(TEXT2VIDEO):
        quiet_loading()
    # From the first touch of the card (the engine's device detection) to `worker_ready`.
    start = Deadline(
        settings.startup_timeout_seconds,
        event="startup_timed_out",
        fields={"error": f"the start ran past {settings.startup_timeout_seconds:g} s (STARTUP_TIMEOUT_SECONDS)"},
        exit_reason="start-up timed out",
        report=runpod_report("firegen_start_deadline") if production else None,
    )
    try:
        try:
            engine = Engine(EngineConfig.from_settings(settings))
        except ValueError as exc:  # a speed option this card cannot run (FIREGEN_FP8 on a CPU, ...): one line
            start.done()
            return _configuration_error(exc)
        note = no_gpu_note(
            production=production,
            device_chosen=settings.device is not None,
            device=engine.runtime.device,
            model_refs=[models.image_model, models.video_model],
        )
        if note:
            log.warning("no_gpu", note=note)
        generator = wrap_generator(engine) if wrap_generator else engine
        worker = build_worker(settings, generator, firestore_client, storage_client, worker_id=worker_id)
    except BaseException as exc:  # ended here: no deadline may outlive the start
        start.done()
        if isinstance(exc, Exception):
            return _crashed(log, exc)
        raise
    leaving = threading.Event()
    exit_code: int | str | None = None  # a SystemExit's own code, where it is not the worker's
    background: threading.Thread | None = None  # the second model's load, once the worker is ready
    ready_said = threading.Event()
    pid = os.getpid()

    def leave(signum, frame):
        if os.getpid() != pid:
            # The RunPod SDK's ping process, forked with this handler: it has no worker of its own to stop (it said
            # a second `shutdown_started` at every shutdown, from its copy of this one).
            raise SystemExit(0)
        if leaving.is_set():
            # A second signal (Ctrl-C twice, a supervisor's repeat): its SystemExit would end the `finally` below
            # while jobs run, and the process abort in torch's threads, the job left `processing` until its
            # lease ran out. It releases the running jobs now instead of at the grace's end.
            worker.hurry()
            return
        leaving.set()
        worker.reconciler.stop_claiming()  # at the signal: a doc queued from now on is left to other workers
        worker.begin_shutdown()  # the `finally` below waits for the grace period
        raise SystemExit(worker.exit_code)

    # uvicorn (the SDK's local API) restores the handler it found and re-raises the signal once it has shut
    # down: with this one in place, the `finally` below runs instead of the process dying on the spot. RunPod's
    # job loop installs its own; the worker chains this one's first step in front (Worker.concurrency_modifier).
    # Installed before the worker starts claiming (and before it says it is ready): a SIGTERM from then on
    # always ends in the `finally` below, never in the default action that kills the process mid-claim.
    try:
        signal.signal(signal.SIGTERM, leave)
        signal.signal(signal.SIGINT, leave)
        # `--test_input` runs its one job and exits: it neither listens nor sweeps (an audit saw each local test
        # claim a queued video of the project's, hold it through the shutdown grace and release it, until its
        # releases failed it), so there are no listeners to wait for either (on the Hub, which runs the tests with
        # no Firebase behind the worker, that wait was 30 s).
        one_job = any(a.split("=")[0] == "--test_input" for a in argv)
        if _on_runpod(argv):
            serve_api = any(a.split("=")[0] == "--rp_serve_api" for a in argv)
            route_runpod_sdk(local_api=serve_api or os.environ.get("RUNPOD_REALTIME_PORT", "0") not in ("", "0"))
        if not fitness.check(worker, production, settings.fitness_check_timeout_seconds, start):
            return worker.exit_code
        # The models after the checks, none of which needs them: a worker that may not write Firestore or its
        # bucket (a revoked grant, a wrong STORAGE_BUCKET) exits before a load it would pay for at every restart
        # RunPod makes for the queued requests (a review of RunPod's lifecycle). The first (the image model, or the
        # video model where only video jobs wait) before the worker is ready, the other in the background: SDXL loads
        # in seconds, Wan in tens, and each job was held for both; a job of the model still loading is left queued
        # (for a worker that has it) until it is loaded.
        load_started = time.perf_counter()
        enabled = [task_type for task_type in (TEXT2IMAGE, TEXT2VIDEO) if models.enabled(task_type)]
        # `--test_input` loads both: its job runs, then the SDK exits (a load still under way would be cut short).
        if not one_job and not all(engine.loaded(task_type) for task_type in enabled):  # FIREGEN_PRELOAD=on: both
            # Firestore's time, as the fitness check's heartbeat measured it (the claims judge leases by it).
            now = datetime.fromtimestamp(worker.reconciler.server_time(), UTC)
            enabled = load_order(worker.store, enabled, min(LOAD_ORDER_SECONDS, start.left()), now)
        first, later = (enabled, []) if one_job else (enabled[:1], enabled[1:])
        failed_first = engine.preload(first)
        for task_type, failure in failed_first.items():
            model_not_available(log, task_type, failure)
        loaded = time.perf_counter()
        left = start.left()
        # Before the first claim: a deadline that fired as the checks ended holds the process here, and none
        # fires once the worker claims (its readiness below has bounds of its own; a later load's is `left`).
        start.done()
        if later:

            def loaded_later(failures: dict, seconds: float) -> None:
                worker.reconciler.claimable_changed()  # first: its jobs wait for nothing else
                ready_said.wait()  # its lines after `worker_ready`, whose `loading` they end
                for task_type, failure in failures.items():
                    model_not_available(log, task_type, failure)
                done = [task_type for task_type in later if task_type not in failures]
                log.info("models_loaded", task_types=done, failed=sorted(failures), load_seconds=round(seconds, 3))
                gc.freeze()  # as below: what the load left lives as long as the process

            def stuck(frames: list[str]) -> None:
                if not worker.shutting_down:  # leaving already: its running jobs are not hurried
                    worker.model_load_stuck(settings.startup_timeout_seconds, task_types=later, stuck_in=frames)

            background = load_later(engine, later, left, on_loaded=loaded_later, on_stuck=stuck)
        worker.start(listen=not one_job)
        if not one_job and not worker.reconciler.wait_listening(30):
            log.warning("listeners_not_current", note="the sweep covers until they are")
        # torch, diffusers and the Google clients leave ~500k long-lived objects: a full collection then takes
        # 100-200 ms on a request's path (the runsync accept p99). They live as long as the process: take them out
        # of the collector's reach; only what is allocated from here on is ever scanned.
        gc.freeze()
        log.info(
            "worker_ready",
            import_seconds=round(imported - _T0, 3),
            load_seconds=round(loaded - load_started, 3),
            loaded=[task_type for task_type in first if task_type not in failed_first],  # `load_order`'s first
            loading=later,  # the `models_loaded` that follows says when they are (or failed)
            ready_seconds=round(time.perf_counter() - _T0, 3),
            frozen_objects=gc.get_freeze_count(),
            malloc_arena_max=arenas or os.environ.get("MALLOC_ARENA_MAX", "").strip() or None,
            project=worker.store.client.project,
            code_version=code_version(),
            bucket=settings.storage_bucket,
            url_style=settings.url_style,
            image_model=settings.image_model,
            video_model=settings.video_model,
            firestore_emulator_host=settings.firestore_emulator_host,
            storage_emulator_host=settings.storage_emulator_host,
        )
        ready_said.set()
        if _on_runpod(argv):
            import runpod

            if production:
                from .job_api import back_off_job_fetches

                back_off_job_fetches(stopping=lambda: leaving.is_set() or worker.shutting_down)
            _stop_claiming_when_uvicorn_exits(worker.reconciler)
            # `start` installs the SDK's own SIGINT handler (a bare sys.exit): a second Ctrl-C would end the
            # `finally` below while a job runs, as a second SIGTERM did. Where the SDK has it, it is `leave`.
            if callable(getattr(runpod.serverless, "_signal_handler", None)):
                runpod.serverless._signal_handler = leave
            runpod.serverless.start({"handler": worker.handler, "concurrency_modifier": worker.concurrency_modifier})
        else:
            log.info("reconciler_only", reason="not on RunPod and no --rp_serve_api: no runsync door")
            # Not signal.pause(): the kernel may hand SIGTERM to any of the process's threads (gRPC's, the
            # reconciler's), and then pause() in the main thread never returns. Every signal with a Python
            # handler is also written to the wakeup fd, whichever thread got it: reading it wakes the main
            # thread, which then runs `leave`.
            wake_r, wake_w = os.pipe()
            os.set_blocking(wake_w, False)
            signal.set_wakeup_fd(wake_w)
            while True:
                os.read(wake_r, 1)
    except SystemExit as exc:
        # The SDK's local API (uvicorn) exits 3 when it cannot start (its port taken): not a clean shutdown.
        if exc.code not in (None, 0, worker.exit_code) and worker.failure is None:
            worker.failure = f"exit {exc.code}"
            exit_code = exc.code
        raise
    except Exception as exc:  # a bug, or the SDK's: its last line was `worker_exit` code 0, "shutdown"
        _crashed(log, exc, exit_line=False)
        worker.failure = worker.failure or _crash_reason(exc)
        exit_code = 1
    finally:
        start.done()  # a signal while it started: the shutdown below has its own bounds
        # RunPod sends SIGTERM before it stops an idle worker: finish the running job within the grace period,
        # or give it back to the queue for another worker.
        leaving.set()
        worker.shutdown()
        # Here, not after: a signal ends the worker by SystemExit through this `finally`.
        code = worker.exit_code if exit_code is None else exit_code
        (log.error if code else log.info)("worker_exit", code=code, reason=worker.failure or "shutdown")
        if background is not None and background.is_alive():
            _exit_now(code)
    return 1 if exit_code == 1 else worker.exit_code


def _exit_now(code: object) -> NoReturn:
    """The end of a worker whose second model is still loading: torch in a daemon thread at the interpreter's end
    aborts the process (`terminate called without an active exception`, exit 134, a crash to RunPod), and a request
    waiting on the load (an inline one) would hold the end up for good. It ends here instead, its output flushed and
    the RunPod SDK's ping process stopped, as the interpreter's end would have."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.terminate()
        child.join(1)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code if isinstance(code, int) else 1)


def _stop_claiming_when_uvicorn_exits(reconciler) -> None:
    """The SDK's local API (uvicorn) takes SIGTERM and SIGINT for itself while it serves, and hands the signal
    on only once it has shut down (a tick of 0.1 s and its own shutdown later). The reconciler must stop claiming
    at the signal, not then: uvicorn's handler is wrapped so it does both."""
    try:
        from uvicorn.server import Server
    except ImportError:  # pragma: no cover - the SDK's local API always brings uvicorn
        return
    handle_exit = Server.handle_exit

    def stop_claiming_then_exit(server, sig, frame):
        reconciler.stop_claiming()
        handle_exit(server, sig, frame)

    Server.handle_exit = stop_claiming_then_exit  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
