"""listener/startup.py's deadlines, each in a process of its own (a deadline ends its process): the races at the
deadline, a report that raises, a hang that holds the GIL, and nested deadlines; and the background load's
(`load_later`), which ends no process, in this one. The worker's own hung starts are in tests/test_runpod_loop.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from devtools import emulators as emu
from devtools.worker import REPO
from listener import startup

PRELUDE = """
import ctypes, sys, threading, time
import structlog
structlog.configure(processors=[structlog.processors.JSONRenderer()])
from listener import startup
"""


def run(script: str, timeout: float = 60) -> tuple[int, list[dict], str]:
    result = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    plain = [line for line in result.stdout.splitlines() if not line.startswith("{")]
    return result.returncode, lines, "\n".join(plain) + result.stderr


def backstop_after(said: str) -> float:
    """The seconds the faulthandler's exit waited, from its "Timeout (0:00:01.99)!" line."""
    found = re.search(r"Timeout \((\d+):(\d+):([\d.]+)\)!", said)
    assert found, said
    hours, minutes, seconds = found.groups()
    return round(int(hours) * 3600 + int(minutes) * 60 + float(seconds), 1)


def test_a_start_done_in_time_goes_on_and_its_deadline_never_fires():
    code, lines, said = run(
        """
        deadline = startup.Deadline(0.5, event="late", fields={}, exit_reason="late")
        deadline.done()
        time.sleep(1.5)  # past the deadline: what is tested is that nothing happens
        print("went on")
        """
    )
    assert (code, lines) == (0, []) and "went on" in said, said


def test_done_after_the_deadline_began_never_returns():
    """A check that passed as its deadline fired: `done()` must not hand back to a caller that would go on to
    claim jobs while the process ends."""
    code, lines, said = run(
        """
        reporting = threading.Event()

        def slow_report(reason):
            reporting.set()
            time.sleep(2)

        deadline = startup.Deadline(0.2, event="late", fields={}, exit_reason="late", report=slow_report)
        assert reporting.wait(30)
        deadline.done()
        print("went on")
        """
    )
    assert code == 1 and "went on" not in said, said
    assert [line["event"] for line in lines] == ["late", "worker_exit"]


@pytest.mark.parametrize("inner_seconds", [30, 0.4])
def test_an_inner_done_after_the_outer_deadline_began_never_returns_and_one_deadline_says_so(inner_seconds):
    """The start's deadline fired while the checks (an inner deadline, far from its own end or past it too) ran
    and then ended: the checks' `done()` must not hand back either; an inner one that fired meanwhile says
    nothing more."""
    code, lines, said = run(
        f"""
        reporting = threading.Event()

        def slow_report(reason):
            reporting.set()
            time.sleep(2)

        outer = startup.Deadline(0.2, event="start", fields={{}}, exit_reason="start", report=slow_report)
        inner = startup.Deadline({inner_seconds}, event="checks", fields={{}}, exit_reason="checks", outer=outer)
        assert reporting.wait(30)
        time.sleep(0.5)  # past the inner's 0.4 s too, while the outer's report runs
        inner.done()
        print("went on")
        """
    )
    assert code == 1 and "went on" not in said, said
    assert [line["event"] for line in lines] == ["start", "worker_exit"]


def test_a_signal_while_done_holds_does_not_end_the_process_cleanly():
    """A SIGTERM (the worker's handler raises SystemExit) while `done()` holds: the process still ends 1, by the
    deadline, not 0 by the signal's `finally`."""
    code, lines, said = run(
        """
        import os, signal

        def leave(signum, frame):
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, leave)
        reporting = threading.Event()

        def slow_report(reason):
            reporting.set()
            time.sleep(2)

        def holding() -> bool:
            frame = sys._current_frames().get(threading.main_thread().ident)
            while frame is not None and frame.f_code.co_name != "_hold":
                frame = frame.f_back
            return frame is not None

        def signal_soon():
            deadline = time.monotonic() + 30
            while not holding() and time.monotonic() < deadline:  # the main thread in done(), entered below
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)

        # As in the worker: the checks' deadline inside the start's, whose done() is in main's `finally`.
        start = startup.Deadline(30, event="start", fields={}, exit_reason="start")
        checks = startup.Deadline(0.2, event="late", fields={}, exit_reason="late", report=slow_report, outer=start)
        assert reporting.wait(30)
        threading.Thread(target=signal_soon).start()
        try:
            checks.done()
        finally:
            start.done()
            print("went on")
        """
    )
    assert code == 1 and "went on" not in said, said
    assert [line["event"] for line in lines] == ["late", "worker_exit"]  # the signal's `finally` said nothing


def test_a_report_that_raises_still_ends_the_process():
    """The SDK's report is private: a later SDK may give it another signature. The exit is the guarantee."""
    code, lines, said = run(
        """
        def report(reason, *, exc):
            pass

        startup.Deadline(0.2, event="late", fields={"error": "x"}, exit_reason="late", report=report)
        threading.Event().wait(30)
        print("still alive")
        """
    )
    assert code == 1 and "still alive" not in said, said
    assert [line["event"] for line in lines] == ["late", "worker_exit"]


def test_a_hang_that_holds_the_gil_ends_at_the_backstop():
    """A call in C that never lets go of the GIL: the timer's thread never runs; the faulthandler's exit does,
    with every thread's stack on stderr."""
    code, lines, said = run(
        """
        startup.BACKSTOP_SECONDS = 0.5
        startup.Deadline(0.5, event="late", fields={}, exit_reason="late")
        ctypes.PyDLL(None).sleep(20)  # PyDLL: called with the GIL held
        print("went on")
        """
    )
    assert code == 1 and "went on" not in said, said
    assert backstop_after(said) == 1.0 and "Thread" in said, said
    assert lines == []  # the timer's thread never got the GIL


def test_a_model_load_that_holds_the_gil_ends_at_the_backstop():
    """The video model's load, once the worker is ready (`load_later`): stuck in C code that holds the GIL, no
    thread of the worker runs again (the deadline's timer, the jobs' heartbeats): the faulthandler's exit does. A
    stand-in for the engine: no load here can be made to hold the GIL."""
    code, lines, said = run(
        """
        startup.BACKSTOP_SECONDS = 0.5

        class Engine:
            def loading(self, task_type):
                return True

            def preload_later(self, task_types, on_end):
                stuck = threading.Thread(target=lambda: ctypes.PyDLL(None).sleep(20), daemon=True)
                stuck.start()
                return stuck

        startup.load_later(Engine(), ["text2video"], 0.5, on_loaded=print, on_stuck=print)
        time.sleep(20)
        print("went on")
        """
    )
    assert code == 1 and "went on" not in said, said
    assert backstop_after(said) == 1.0 and "Thread" in said, said
    assert lines == []


@pytest.mark.parametrize("load", ["ends at once", "waits, letting go of the GIL"])
def test_a_model_load_that_ends_or_is_said_stuck_leaves_no_backstop(load):
    """Its end, or its deadline's timer that ran (the worker then leaves by its shutdown, which takes its grace),
    cancels the backstop: it would have ended the process BACKSTOP_SECONDS later, whatever it was doing."""
    code, _, said = run(
        f"""
        startup.BACKSTOP_SECONDS = 0.5
        ends = {load == "ends at once"}

        class Engine:
            def loading(self, task_type):
                return not ends

            def preload_later(self, task_types, on_end):
                work = (lambda: on_end({{}})) if ends else threading.Event().wait
                thread = threading.Thread(target=work, daemon=True)
                thread.start()
                return thread

        startup.load_later(
            Engine(), ["text2video"], 0.5, on_loaded=lambda *_: print("loaded"), on_stuck=lambda _: print("stuck")
        )
        time.sleep(2.5)
        print("went on")
        """
    )
    assert code == 0 and "went on" in said, said
    assert ("loaded" if load == "ends at once" else "stuck") in said, said


def test_an_inner_deadline_done_hands_the_backstop_back_to_the_outer_one():
    code, lines, said = run(
        """
        startup.BACKSTOP_SECONDS = 0.5
        outer = startup.Deadline(1.5, event="start", fields={}, exit_reason="start")
        inner = startup.Deadline(30, event="checks", fields={}, exit_reason="checks", outer=outer)
        inner.done()
        ctypes.PyDLL(None).sleep(20)
        print("went on")
        """
    )
    assert code == 1 and "went on" not in said, said
    assert 1.0 <= backstop_after(said) <= 2.0, said  # the outer's remaining time, not the inner's 30 s
    assert lines == []


def test_an_inner_deadline_never_puts_off_the_outer_ones_backstop():
    code, lines, said = run(
        """
        startup.BACKSTOP_SECONDS = 0.5
        outer = startup.Deadline(1.0, event="start", fields={}, exit_reason="start")
        inner = startup.Deadline(30, event="checks", fields={}, exit_reason="checks", outer=outer)
        ctypes.PyDLL(None).sleep(20)
        print("went on")
        """
    )
    assert code == 1 and "went on" not in said, said
    assert backstop_after(said) <= 1.5, said  # the outer's end, not the inner's 30 s
    assert lines == []


def test_where_it_was_stuck_is_said():
    code, lines, said = run(
        """
        def stuck_here():
            threading.Event().wait(30)

        startup.Deadline(0.3, event="late", fields={"error": "too slow"}, exit_reason="too slow")
        stuck_here()
        """
    )
    assert code == 1, said
    late, exit_line = lines
    assert late["event"] == "late" and late["error"] == "too slow"
    assert any(":stuck_here:" in frame for frame in late["stuck_in"]), late
    assert late["stuck_in"][-1].startswith("threading:wait:")
    assert all(frame.count(":") == 2 for frame in late["stuck_in"])  # module:function:line, no source text
    assert exit_line == {"event": "worker_exit", "code": 1, "reason": "too slow"}


def test_a_signal_another_thread_takes_reaches_a_main_thread_waiting_for_the_shutdown():
    """A flaky test, then its cause: the kernel may hand SIGTERM to any of the process's threads, and its Python
    handler then runs in the main thread only once that thread runs Python again. A main thread blocked in
    `Worker.shutdown` until the running job ended took the second SIGTERM (which releases the job at once) only
    after the job had ended. Here the signal is sent to another thread, and the handler is what ends the stop."""
    code, lines, said = run(
        """
        import signal
        from types import SimpleNamespace
        from listener.worker import Worker

        released, stopping = threading.Event(), threading.Event()

        class Reconciler:
            busy = 1

            def stop(self, grace):
                stopping.set()
                print("released" if released.wait(20) else "ran to its end")

        signal.signal(signal.SIGTERM, lambda signum, frame: released.set())  # as `leave` hurries the job

        def signal_this_thread():
            stopping.wait(20)
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

        threading.Thread(target=signal_this_thread).start()
        worker = Worker(SimpleNamespace(shutdown_grace_seconds=120), None, None, Reconciler(), None, None)
        worker.shutdown()
        """
    )
    assert code == 0 and said.strip() == "released", said
    assert [line["event"] for line in lines] == ["shutdown_started"]


def test_a_model_loaded_later_is_said_loaded_and_its_deadline_never_fires(tiny_cache):
    """`load_later`: one of its two ends, once. In this process: its deadline does not end the process (the
    worker leaves through `on_stuck`)."""
    from generation.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(image_model="none", video_model="tiny", device="cpu"))
    loaded, stuck = [], []
    ended = threading.Event()
    thread = startup.load_later(
        engine,
        ["text2video"],
        120,
        on_loaded=lambda failures, seconds: (loaded.append((failures, seconds)), ended.set()),
        on_stuck=stuck.append,
    )
    assert ended.wait(120)
    thread.join(10)
    [(failures, seconds)] = loaded
    assert failures == {} and 0 < seconds < 120 and engine.loaded("text2video")
    timers = [t for t in threading.enumerate() if t.name == "load-deadline"]
    for timer in timers:
        timer.join(5)
    assert stuck == [] and not any(t.is_alive() for t in timers)


def test_a_model_load_past_its_deadline_says_where_it_is_stuck_and_never_says_it_loaded(monkeypatch):
    """A stand-in for a network volume that stalls (no file here can be made to stall a read): the video model's
    load waits on an event, past the deadline, then fails."""
    from firegen_core import errors
    from generation.engine import Engine, EngineConfig
    from generation.video import VideoPipeline

    stalled = threading.Event()

    def stalled_load(cls, *args, **kwargs):
        stalled.wait(60)
        raise errors.ModelNotAvailable("Video model tiny is not available: the volume stalled")

    monkeypatch.setattr(VideoPipeline, "load", classmethod(stalled_load))
    engine = Engine(EngineConfig(image_model="none", video_model="tiny", device="cpu"))
    loaded: list = []
    stuck = threading.Event()
    frames: list = []
    thread = startup.load_later(
        engine,
        ["text2video"],
        0.3,
        on_loaded=lambda failures, seconds: loaded.append(failures),
        on_stuck=lambda where: (frames.extend(where), stuck.set()),
    )
    assert stuck.wait(30)
    assert any(":stalled_load:" in frame for frame in frames), frames
    assert engine.loading("text2video")
    stalled.set()
    thread.join(30)
    assert not thread.is_alive() and loaded == []  # the load's end after its deadline: said by neither
    assert not engine.loading("text2video")


def test_where_only_video_jobs_wait_the_video_model_loads_first(firestore_client):
    """A worker woken for a video loaded SDXL before Wan: the video waited for both loads. Where the jobs waiting are
    all videos, Wan loads first. Where images wait too, or nothing does, SDXL first as before: it loads in seconds
    and its jobs run while Wan loads. An image that cannot start whichever model is loaded does not count: one being
    cancelled, one whose user is at USER_MAX_RUNNING, another app's doc; nor one dated by no timestamp (Firestore
    orders null and numbers first: such a doc hid the rest)."""
    from firegen_core.jobs import JobKey, JobStore

    both, video_first = ["text2image", "text2video"], ["text2video", "text2image"]
    store, t0 = JobStore(firestore_client), datetime(2026, 1, 1, tzinfo=UTC)

    def order(task_types: list[str] = both) -> list[str]:
        return startup.load_order(store, task_types, 5, datetime.now(UTC))

    def queue(path: str, created_at: object, **fields: object) -> None:
        firestore_client.document(path).set({"status": "queued", "prompt": "p", "created_at": created_at, **fields})

    assert order() == both
    queue(JobKey("bob", "videos", "done").path, t0, status="completed")
    queue(JobKey("ann", "images", "done").path, t0, status="completed")
    assert order() == both
    queue(JobKey("bob", "videos", "waiting").path, t0 + timedelta(minutes=5))
    assert order() == video_first
    assert order(["text2image"]) == ["text2image"]
    queue(JobKey("ann", "images", "waiting").path, t0 + timedelta(minutes=10))
    assert order() == both
    firestore_client.document(JobKey("ann", "images", "waiting").path).update({"cancel_requested": True})
    assert order() == video_first
    queue(JobKey("eve", "images", "held").path, t0)
    assert order() == both
    firestore_client.document("usage/eve").set({"running": store.limits.max_running, "pending": 3})
    assert order() == video_first
    queue("apps/other/images/theirs", t0 - timedelta(days=3))
    queue(JobKey("cyd", "images", "millis").path, t0.timestamp() * 1000)
    queue(JobKey("cyd", "images", "null").path, None)
    assert order() == video_first
    queue(JobKey("dan", "images", "dated").path, t0 + timedelta(hours=1))
    assert order() == both


def test_a_dead_workers_job_waits_as_a_queued_one_does(firestore_client):
    """A job whose worker died (its lease ran out, by Firestore's time: the `now` given) waits for this worker as a
    queued one does."""
    from firegen_core.jobs import JobKey, JobStore

    store, now = JobStore(firestore_client), datetime.now(UTC)
    both, video_first = ["text2image", "text2video"], ["text2video", "text2image"]
    running = firestore_client.document(JobKey("bob", "videos", "running").path)
    running.set(
        {"status": "processing", "prompt": "p", "created_at": now, "lease_expires_at": now + timedelta(minutes=2)}
    )
    assert startup.load_order(store, both, 5, now) == both  # its worker is alive
    assert startup.load_order(store, both, 5, now + timedelta(minutes=5)) == video_first  # Firestore's clock ahead
    running.update({"lease_expires_at": now - timedelta(seconds=1)})
    assert startup.load_order(store, both, 5, now) == video_first
    firestore_client.document(JobKey("ann", "images", "queued").path).set(
        {"status": "queued", "prompt": "p", "created_at": now}
    )
    assert startup.load_order(store, both, 5, now) == both


@pytest.mark.parametrize("server", ["refusing", "silent"])
def test_a_queue_that_cannot_be_read_in_time_holds_the_start_up_no_longer(firestore_client, monkeypatch, server):
    """Firestore away (nothing listens), or a connection that never answers: the models load in the order given,
    within the bound the start gives the reads."""
    import socket

    from google.auth.credentials import AnonymousCredentials
    from google.cloud import firestore

    from firegen_core.jobs import JobStore

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    if server == "silent":  # accepts, and says nothing: the TCP connection stands, no answer ever comes
        listener.listen(16)
    host, port = listener.getsockname()
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"{host}:{port}")
    down = firestore.Client(project=firestore_client.project, credentials=AnonymousCredentials())
    order = ["text2video", "text2image"]
    try:
        started = time.monotonic()
        assert startup.load_order(JobStore(down), order, 2, datetime.now(UTC)) == order
        assert time.monotonic() - started < 4
    finally:
        emu.close_firestore(down)
        listener.close()
