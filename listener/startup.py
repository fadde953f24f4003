"""Deadlines on the worker's start: a step that never returns must end the process, not keep it starting.

A card whose driver hangs hangs `nvidia-smi` (which the RunPod SDK's system checks ask with no time limit) and
CUDA's initialisation (the engine's device detection, the models' move to the card); a network volume that stalls
hangs a model's load. Each kept the worker initializing for good: neither ready nor gone for RunPod to replace.
Nothing is claimed before the start ends, so there is nothing to give back: past its deadline the process says
where it was stuck and ends with os._exit(1) (the stuck thread cannot be interrupted), as the SDK does after a
failed fitness check. The second model loads once the worker claims (`load_later`): past the rest of the deadline
the worker leaves as a shutdown does, its running jobs finished or released; the first is the image model, but
where only the other's jobs wait (`load_order`). (And a start's cost: the RunPod SDK imported without the CPU
probe it runs on import.)
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import platform
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable
from datetime import datetime
from typing import Any

# The faulthandler's exit, this long after a deadline whose timer could not run: a call in C that holds the GIL
# (the timer thread then never gets it) still ends the process, its threads' stacks on stderr.
BACKSTOP_SECONDS = 15.0
LOAD_ORDER_SECONDS = 3.0  # `load_order`'s reads of the queue: past it, the models load in the usual order
LOAD_ORDER_SEEN = 10  # `load_order`'s oldest queued docs read per media type
LOAD_ORDER_DEAD = 3  # ... and dead workers' jobs (a foreign or cancelled one may come first)
REPORT_SECONDS = 5.0  # the unhealthy report's own bound (its HTTP timeout leaves out the name lookup)
# Held by the deadline that ends the process: one says so, once; a `done()` that comes after never returns.
_EXITING = threading.Lock()
_STDLIB = sysconfig.get_paths()["stdlib"]


def stuck_in(thread_id: int, depth: int = 8) -> list[tuple[str, bool]]:
    """The innermost `depth` frames of a thread, "module:function:line", innermost last, each with whether it
    is the standard library's. Source files are not read (a stalled file system must not stall the exit)."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return []
    stack = traceback.StackSummary.extract(traceback.walk_stack(frame), limit=depth, lookup_lines=False)
    return [
        (f"{_module(entry.filename)}:{entry.name}:{entry.lineno}", _stdlib(entry.filename)) for entry in reversed(stack)
    ]


def _stdlib(filename: str) -> bool:
    return filename.startswith(("<frozen", _STDLIB)) and "site-packages" not in filename


def _module(filename: str) -> str:
    parts = filename.replace("\\", "/").split("/")
    for root in ("site-packages", "listener", "generation", "firegen_core"):
        if root in parts:
            return ".".join(parts[parts.index(root) + (root == "site-packages") :]).removesuffix(".py")
    return parts[-1].removesuffix(".py")


class Deadline:
    """Ends the process (exit 1) unless `done()` is called within `seconds` of its creation.

    `event` and `fields` are the ERROR line it writes then (with `stuck_in`, where the main thread was), before
    `worker_exit`; `report(reason)` (RunPod's unhealthy report) is given REPORT_SECONDS. `done()` and the timer
    decide under one lock: once the timer has begun, `done()` never returns (the process is ending: the caller
    must not go on to claim jobs), and once `done()` has, the timer does nothing. One deadline ends the process
    (`_EXITING`): a `done()` of any while it does never returns either. Deadlines nest: an inner one's backstop
    is no later than the outer's, and its `done()` hands the backstop back to the outer one."""

    def __init__(
        self,
        seconds: float,
        *,
        event: str,
        fields: dict[str, Any],
        exit_reason: str,
        report: Callable[[str], None] | None = None,
        outer: Deadline | None = None,
    ):
        self.seconds = seconds
        self.event, self.fields, self.exit_reason = event, fields, exit_reason
        self.report = report
        self.outer = outer
        self._ends = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._done = self._expired = False
        self._main = threading.main_thread().ident or 0
        # The backstop first (it may raise, e.g. a stderr with no file behind it): a timer started then would be
        # left running with nobody to stop it. An outer deadline's nearer end stays the backstop's.
        _backstop(min(seconds, outer.left()) if outer is not None else seconds)
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.name = f"{event}-deadline"
        self._timer.start()

    def done(self) -> None:
        with self._lock:
            self._done = True
            expired = self._expired
        self._timer.cancel()
        if expired or _EXITING.locked():  # this deadline or another is ending the process
            _hold()
        faulthandler.cancel_dump_traceback_later()
        if self.outer is not None:
            self.outer._rearm()

    def left(self) -> float:
        return max(self._ends - time.monotonic(), 0.0)

    def _rearm(self) -> None:
        with self._lock:
            if not self._done:
                _backstop(self.left())

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self._expired = True
        if not _EXITING.acquire(blocking=False):
            return  # another deadline is ending the process, and says so
        try:
            import structlog

            log = structlog.get_logger("listener")
            frames = stuck_in(self._main)
            where = [name for name, _ in frames]
            log.error(self.event, stuck_in=where, **self.fields)
            log.error("worker_exit", code=1, reason=self.exit_reason)
            if self.report is not None:
                # The innermost frame outside the standard library: `threading:wait` would say little.
                step = next((name for name, stdlib in reversed(frames) if not stdlib), where[-1] if where else None)
                reason = f"{self.fields.get('error', self.event)} (in {step or 'an unknown step'})"
                reporter = threading.Thread(target=self.report, args=(reason,), daemon=True)
                reporter.start()
                reporter.join(REPORT_SECONDS)
        finally:  # whatever the lines or the report raised: the point is the exit
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):  # a closed stream must not stop the exit
                    stream.flush()
            os._exit(1)


def load_order(store: Any, task_types: list[str], seconds: float, now: datetime) -> list[str]:
    """`task_types` in the order their models load at the start (the worker is ready once the first is loaded; the
    other loads in the background). Where the jobs waiting are all of one model, that model first: a worker woken
    for a video loaded SDXL before Wan, the video waiting for both loads. Where jobs of both wait, or none, the
    order given, the image model first: it loads in seconds, and its jobs run while Wan loads (with Wan first, they
    waited for both loads and then for the video; this way the video waits for SDXL's load alone, a few seconds).

    A job waits for this worker where it is a dead worker's (its lease ran out, judged at `now`, Firestore's time),
    or among each media type's oldest queued docs (LOAD_ORDER_SEEN) with a user who may start one more job
    (USER_MAX_RUNNING: a backlog its limit holds waits whichever model is loaded); of this product's paths, not
    being cancelled, a queued one dated by a timestamp (as every flow of the contract dates it; an admin's number
    or null, which Firestore orders first, would hide the rest). Where the reads (not retried) do not answer
    within `seconds` together, the order given."""
    if len(task_types) < 2:
        return task_types
    # Here, not at the top: the deadlines above are imported by the start's first steps (and by tests' processes).
    from firegen_core import lifecycle, quota
    from firegen_core.contract import MEDIA_TYPE
    from firegen_core.jobs import JobKey

    ends = time.monotonic() + seconds

    def left() -> float:
        remaining = ends - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the load order's reads ran out of time")
        return remaining

    def ours(query: Any) -> list[Any]:
        """The jobs a query found, of this product's paths, not being cancelled: their keys."""
        found = []
        for snapshot in query.get(timeout=left(), retry=None):
            try:
                key = JobKey.from_path(snapshot.reference.path)
            except ValueError:  # another app's `images`/`videos` doc (the reconciler skips those too)
                continue
            if not (snapshot.to_dict() or {}).get(lifecycle.CANCEL_REQUESTED):
                found.append(key)
        return found

    try:
        waiting: set[str] = set()
        queued: list[tuple[str, Any]] = []
        for task_type in task_types:
            media = MEDIA_TYPE[task_type]
            if ours(store.expired(media, now, limit=LOAD_ORDER_DEAD)):
                waiting.add(task_type)
            else:
                queued += [
                    (task_type, key) for key in ours(store.oldest_queued(media, limit=LOAD_ORDER_SEEN, dated=True))
                ]
        users = sorted({key.user_id for _, key in queued})
        usage = (
            store.client.get_all([store.usage_ref(user) for user in users], timeout=left(), retry=None) if users else []
        )
        running = {snapshot.id: quota.number(snapshot.to_dict() or {}, "running") for snapshot in usage}
    except Exception:  # the queue is read again once the worker claims: only the order is lost
        return task_types
    waiting |= {task_type for task_type, key in queued if running.get(key.user_id, 0) < store.limits.max_running}
    if len(waiting) != 1:
        return task_types
    [alone] = waiting
    return [alone, *(task_type for task_type in task_types if task_type != alone)]


def load_later(
    engine: Any,
    task_types: list[str],
    seconds: float,
    *,
    on_loaded: Callable[[dict[str, Any], float], None],
    on_stuck: Callable[[list[str]], None],
) -> threading.Thread:
    """`engine.preload_later(task_types)`, the rest of the start's deadline (`seconds`) on it: then either
    `on_loaded(failures, seconds it took)`, or past `seconds` still loading, `on_stuck(where its thread is)`
    (`stuck_in`). One of the two, once. Jobs are claimed meanwhile: the process is not ended here, but by the
    backstop, BACKSTOP_SECONDS later, where the load holds the GIL in C code (the timer's thread then never runs,
    nor any of the worker's)."""
    decided = threading.Lock()
    started = time.monotonic()

    def ended(failures: dict[str, Any]) -> None:
        if decided.acquire(blocking=False):
            timer.cancel()
            faulthandler.cancel_dump_traceback_later()
            on_loaded(failures, time.monotonic() - started)

    def expired() -> None:
        if not any(engine.loading(task_type) for task_type in task_types):
            return  # loaded (or failed) as the time ran out: `ended` says so
        if decided.acquire(blocking=False):
            faulthandler.cancel_dump_traceback_later()  # this thread runs: the worker leaves by its shutdown
            on_stuck([name for name, _ in stuck_in(thread.ident or 0)])

    timer = threading.Timer(seconds, expired)  # started once `thread` is: a cancel before then still holds
    timer.daemon = True
    timer.name = "load-deadline"
    _backstop(seconds)
    thread = engine.preload_later(task_types, ended)
    timer.start()
    return thread


def _hold() -> None:
    """Never return: the process is ending (by the deadline's timer, or its backstop). A signal's SystemExit
    must not end the wait either: the caller would go on, and a `finally` cancel the backstop."""
    while True:
        with contextlib.suppress(BaseException):
            threading.Event().wait()


def _backstop(seconds: float) -> None:
    faulthandler.dump_traceback_later(seconds + BACKSTOP_SECONDS, exit=True)


def runpod_report(check: str) -> Callable[[str], None] | None:
    """RunPod's unhealthy report of a failed check, named `check` (the SDK's; private, so looked up: a later SDK
    without it, or with another signature, exits unreported)."""
    try:
        import_runpod_sdk()
        from runpod.serverless.modules import rp_fitness
    except ImportError:  # pragma: no cover - the worker's image always has the SDK
        return None
    report = getattr(rp_fitness, "_report_unhealthy", None)
    if not callable(report):
        return None

    def send(reason: str) -> None:
        with contextlib.suppress(Exception):
            report(check, reason)

    return send


def import_runpod_sdk() -> None:
    """The RunPod SDK, imported without the CPU probe it runs on import: its debugger module asks py-cpuinfo for
    the processor's name (shown only under --rp_debugger), and py-cpuinfo starts a Python interpreter of its own
    to answer, 1.3 s of CPU on every worker start. The name is read from /proc/cpuinfo instead. Every first import
    of the SDK in the worker comes here (once imported, this does nothing)."""
    if "runpod.serverless" in sys.modules:
        return
    try:
        import cpuinfo
    except ImportError:  # an SDK without it probes nothing
        cpuinfo = None
    probe = getattr(cpuinfo, "get_cpu_info", None)
    if cpuinfo is not None:
        cpuinfo.get_cpu_info = lambda: {"brand_raw": processor_name()}
    try:
        import runpod.serverless  # noqa: F401
    finally:
        if cpuinfo is not None:
            cpuinfo.get_cpu_info = probe


def processor_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "Unable to get processor info."
