"""The reconciler and the job runner on the real Firestore and Storage emulators.

The diffusion engine is replaced by `StubGenerator` here, on purpose: the engine is tested with real tiny
pipelines in test_generation.py, and these tests are about the lifecycle (claims, leases, listeners, uploads),
which a stand-in that blocks on demand lets us drive deterministically.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest
import structlog
from google.cloud.firestore import DELETE_FIELD, SERVER_TIMESTAMP
from PIL import Image

from firegen_core import jobs as jobs_module
from firegen_core import workers
from firegen_core.claims import Renewal, WorkerJobs
from firegen_core.deadline import Deadline
from firegen_core.jobs import JobKey
from firegen_core.quota import Limits
from listener import lease as lease_module
from listener import runner as runner_module
from listener.listeners import HEARD_MARGIN_SECONDS, Listeners
from listener.reconciler import Reconciler
from listener.runner import JobRunner
from listener.storage import ResultStore, RetryPolicy


def png_bytes(color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


class StubGenerator:
    """Returns small PNGs at once, or holds each job until `gate` is set while still reporting progress."""

    def __init__(self, gate: threading.Event | None = None):
        self.gate = gate
        self.started = threading.Event()
        self.calls: list[str] = []

    def generate(self, request, progress=None):
        self.calls.append(request.file_uid)
        self.started.set()
        progress = progress or (lambda fraction: None)
        while self.gate is not None and not self.gate.wait(0.02):
            progress(0.1)  # a long denoising loop: each step may be told to stop
        for step in range(1, 5):
            progress(step / 4)
        files = [(png_bytes(), "png", "image/png")] * request.num_images_per_prompt
        return SimpleNamespace(seed=42 if request.seed is None else request.seed, files=files, video_info=None)


# How long a test waits for a new worker's listeners to attach: under a second on an idle machine, far longer
# under the parallel suite's load (a 10 s wait failed there).
LISTENING_SECONDS = 60.0


@contextlib.contextmanager
def started_reconcilers():
    """`start(reconciler)`: starts a worker and waits for its listeners; on leaving, each worker started is
    stopped, its running jobs aborted."""
    started: list[Reconciler] = []

    def start(reconciler: Reconciler) -> Reconciler:
        started.append(reconciler.start())
        assert reconciler.wait_listening(LISTENING_SECONDS)
        return reconciler

    try:
        yield start
    finally:
        for reconciler in started:
            reconciler.runner.abort.set()
            reconciler.stop(grace=0)


def wait_until(predicate, timeout=15.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture
def results(storage_client, bucket, storage_emulator):
    return ResultStore(
        storage_client,
        bucket.name,
        retry=RetryPolicy(attempts=3, max_seconds=10.0, initial_wait=0.05),  # a stopped emulator refuses at once
        emulator_host=storage_emulator.url,
    )


class CountingReconciler(Reconciler):
    """The reconciler, counting its sweeps (the periodic ones and any a test runs by hand)."""

    sweeps = 0

    def sweep(self) -> int:
        found = super().sweep()
        self.sweeps += 1
        return found


@pytest.fixture
def make_worker(firestore_client, results):
    with started_reconcilers() as start:

        def make(name="w1", generator=None, lease=30.0, sweep=0.3, concurrency=1, grace=0.0, limits=Limits()):
            store = WorkerJobs(firestore_client, worker_id=name, lease_seconds=lease, limits=limits)
            return start(
                CountingReconciler(
                    store,
                    JobRunner(store, generator or StubGenerator(), results),
                    concurrency=concurrency,
                    sweep_interval=sweep,
                    placeholder_grace=grace,
                )
            )

        yield make


@pytest.fixture
def runner_logs(monkeypatch):
    """The runner's events (its heartbeat's too), as structlog's capture sees them, on loggers made inside the
    capture: a test that configured the worker's logs in this process (tests/test_credentials.py) left the
    modules' loggers cached (`cache_logger_on_first_use`), which a capture alone does not reach."""
    with structlog.testing.capture_logs() as logs:
        for module in (runner_module, lease_module):
            monkeypatch.setattr(module, "log", structlog.get_logger(module.__name__))
        yield logs


def write_job(client, key: JobKey, **fields):
    """A queued doc as the contract's client sample writes it (created_at: serverTimestamp())."""
    client.document(key.path).set(
        {
            "status": "queued",
            "created_at": SERVER_TIMESTAMP,
            "prompt": "A red sports car",
            "generated": False,
            "error": False,
            **fields,
        }
    )


def doc(client, key):
    return client.document(key.path).get().to_dict()


def finished(client, key):
    data = doc(client, key)
    return data if data and data["status"] in ("completed", "failed") else None


def test_a_client_written_doc_is_picked_up_and_completed(make_worker, firestore_client, bucket):
    make_worker(sweep=30)  # the listener alone must find it
    key = JobKey("user123", "images", "file456")
    write_job(firestore_client, key, numImagesPerPrompt=2, seed=7)
    data = wait_until(lambda: finished(firestore_client, key))
    assert data["status"] == "completed" and data["generated"] is True and data["error"] is False
    assert data["image_count"] == 2 and data["image_url"] == data["images"][0] and data["seed"] == 7
    assert (data["task_type"], data["user_id"], data["file_uid"]) == ("text2image", "user123", "file456")
    assert data["progress"] == 1.0 and data["attempts"] == 1
    assert {"completed_at", "modified", "queue_seconds", "generation_seconds", "upload_seconds"} <= data.keys()
    names = sorted(blob.name for blob in bucket.list_blobs())
    assert names == ["generating/user123/image/file456.png", "generating/user123/image/file456_1.png"]
    with urllib.request.urlopen(data["images"][1], timeout=5) as response:
        assert response.read() == png_bytes()


def test_a_bad_client_doc_fails_with_the_contracts_message(make_worker, firestore_client):
    make_worker()
    key = JobKey("u1", "images", "bad")
    write_job(firestore_client, key, width=2048)
    data = wait_until(lambda: finished(firestore_client, key))
    assert (data["status"], data["error"], data["generated"]) == ("failed", True, False)
    assert data["error_message"] == "width must be between 256 and 1024"
    assert data["error_type"] == "ValidationError" and "failed_at" in data
    # firestore.rules let clients write such docs so that they read this message: no GPU time, nothing charged.
    assert not data.get("cost") and not data.get("quota_admitted")
    # Failed on sight, by its admission or its claim: it took no generation slot and no attempt.
    assert "started_at" not in data and not data.get("attempts") and "worker_id" not in data
    usage = firestore_client.document("usage/u1").get().to_dict() or {}
    assert not usage.get("spent_today") and not usage.get("pending"), usage
    # A doc's use_cloud_storage: false is refused as the callable refuses it (the doc's results go to Storage).
    key = JobKey("u1", "images", "inline-doc")
    write_job(firestore_client, key, use_cloud_storage=False)
    data = wait_until(lambda: finished(firestore_client, key))
    assert (data["error_type"], data["error_message"]) == (
        "ValidationError",
        "Validation failed: use_cloud_storage must be true: results go to Cloud Storage",
    )


def test_a_killed_workers_job_is_finished_by_another_after_its_lease(make_worker, firestore_client, bucket):
    key = JobKey("u1", "images", "orphan")
    write_job(firestore_client, key)
    # The "killed" worker: claimed the job, then never renewed or finished it.
    assert WorkerJobs(firestore_client, worker_id="killed", lease_seconds=0.5).claim(key) is not None
    make_worker("survivor", sweep=0.2)
    data = wait_until(lambda: finished(firestore_client, key))
    assert (data["status"], data["worker_id"], data["attempts"]) == ("completed", "survivor", 2)
    assert [blob.name for blob in bucket.list_blobs()] == ["generating/u1/image/orphan.png"]


SLOW_SWEEP = 120.0  # the periodic sweep runs once at start, then not again within any test


@pytest.fixture
def reconciler_logs(monkeypatch):
    """The reconciler's events, its listeners' and admissions', on loggers made inside the capture (as runner_logs)."""
    import listener.admission as admission_module
    import listener.listeners as listeners_module
    import listener.reconciler as reconciler_module
    import listener.sweep as sweep_module

    with structlog.testing.capture_logs() as logs:
        for module in (reconciler_module, sweep_module, listeners_module, admission_module):
            monkeypatch.setattr(module, "log", structlog.get_logger(module.__name__))
        yield logs


def restarts(logs: list[dict]) -> list[tuple]:
    return sorted((e["listener"], e["reason"], e["log_level"]) for e in logs if e["event"] == "listener_restarted")


def test_another_apps_images_docs_are_skipped_and_said_once_each(make_worker, firestore_client, reconciler_logs):
    """The queries are collection groups: docs of an `images` collection outside generations/ (an existing app's,
    in the same project) that look queued or expired are met by the listeners and by every sweep. They are never
    touched, and the operator is told once each (they take places in the queries' bounded pages)."""
    from datetime import UTC, datetime, timedelta

    foreign = ["posts/p1/images/queued", "users/u9/images/expired"]
    firestore_client.document(foreign[0]).set({"status": "queued", "created_at": SERVER_TIMESTAMP, "prompt": "x"})
    past = datetime.now(UTC) - timedelta(hours=1)
    firestore_client.document(foreign[1]).set({"status": "processing", "lease_expires_at": past, "created_at": past})
    worker = make_worker(sweep=SLOW_SWEEP)
    key = JobKey("u1", "images", "ours")
    write_job(firestore_client, key)
    assert wait_until(lambda: finished(firestore_client, key))["status"] == "completed"
    worker.sweep()
    worker.sweep()
    said = [e for e in reconciler_logs if e["event"] == "foreign_doc_skipped"]
    assert sorted(e["path"] for e in said) == sorted(foreign)
    assert all("Into an existing Firebase project" in e["why"] and e["log_level"] == "warning" for e in said)
    assert firestore_client.document(foreign[0]).get().to_dict()["status"] == "queued"  # untouched
    assert firestore_client.document(foreign[1]).get().to_dict() == {
        "status": "processing",
        "lease_expires_at": past,
        "created_at": past,
    }


def test_a_closed_listener_is_restarted_by_the_watchdog(make_worker, firestore_client, reconciler_logs):
    """The watchdog (one sweep, run here by hand) restarts a listener that closed. The doc is written after that
    sweep, with the next one two minutes away: only the restarted listener can deliver it."""
    worker = make_worker(sweep=SLOW_SWEEP)
    assert wait_until(lambda: worker.sweeps == 1)  # the sweep at start is done; the next is far away
    dead = worker.listeners._watches["images"]
    dead.unsubscribe()  # what a listener that died looks like from the outside: closed, no more events
    worker.sweep()
    assert worker.listeners._watches["images"] is not dead
    key = JobKey("u1", "images", "after-close")
    write_job(firestore_client, key)
    assert wait_until(lambda: finished(firestore_client, key))["status"] == "completed"
    assert worker.sweeps == 2  # no periodic sweep ran: the listener found it
    assert restarts(reconciler_logs) == [("images", "closed", "warning")]


def test_a_silent_listener_is_restarted_by_the_watchdog(make_worker, firestore_client, reconciler_logs):
    """A listener that stays open but stops delivering: a sweep finds a queued doc older than two sweep
    intervals that the listener never spoke of, and restarts it. Then a new doc, written with the periodic sweep
    two minutes away, is delivered by the restarted listener."""
    worker = make_worker(sweep=SLOW_SWEEP)
    assert wait_until(lambda: worker.sweeps == 1)
    # Both windows of the queued images (the oldest docs, the newest docs): open, connected, and saying nothing.
    silent = [worker.listeners._watches["images"], worker.listeners._watches["images:newest"]]
    for watch in silent:
        watch._snapshot_callback = lambda *args: None
    worker.sweep_interval = 0.2  # what the watchdog counts as "older than two sweeps"; the loop still waits
    # Silent since well before the doc's write (past the margin for the measure of Firestore's clock).
    assert wait_until(lambda: time.monotonic() - worker.listeners._heard["images"] > HEARD_MARGIN_SECONDS + 0.5)
    missed = JobKey("u1", "images", "missed")
    write_job(firestore_client, missed)
    created = doc_time(firestore_client, missed)
    wait_until(lambda: time.time() - created > 1.0)  # older than two (0.2 s) sweep intervals, by a margin
    worker.sweep()  # the watchdog's tick: it offers the missed doc, and restarts the silent listener
    replaced = [worker.listeners._watches["images"], worker.listeners._watches["images:newest"]]
    assert all(new is not old and old._closed for new, old in zip(replaced, silent))  # replaced, old ones closed
    assert wait_until(lambda: finished(firestore_client, missed))["status"] == "completed"
    key = JobKey("u1", "images", "after-silence")
    write_job(firestore_client, key)
    assert wait_until(lambda: finished(firestore_client, key))["status"] == "completed"
    assert worker.sweeps == 2
    assert restarts(reconciler_logs) == [("images", "silent", "warning"), ("images:newest", "silent", "warning")]


def test_a_listener_that_spoke_as_a_doc_was_written_is_not_silent_about_it():
    """A leak audit: a video waiting its turn in a quiet window restarted both its listeners as "silent" in half
    the cases: its age, by Firestore's clock as the worker measures it (to within half a heartbeat's round trip),
    came out a few milliseconds short of the time since its listener spoke, a few milliseconds after the write."""
    listeners = Listeners(
        None, on_queued=print, on_gone=print, on_cancel=print, on_stop=print, not_ours=print
    )  # no store: `missed` reads none
    listeners._heard["images"] = time.monotonic() - 30.0  # spoke as the doc was written, 30 s ago by this host
    assert not listeners.missed("images", 29.95, sweep_interval=1.0)  # its age, the clock's measure 50 ms off
    assert not listeners.missed("images", 29.2, sweep_interval=1.0)
    assert listeners.missed("images", 28.0, sweep_interval=1.0)  # written 2 s after the listener last spoke
    assert not listeners.missed("images", 1.5, sweep_interval=1.0)  # younger than two sweeps: not yet


def doc_time(client, key) -> float:
    return client.document(key.path).get().update_time.timestamp()


def hold_a_job(make_worker, client, name: str, key: JobKey, **fields):
    """A worker running `key` until its generator's gate is set."""
    generator = StubGenerator(threading.Event())
    worker = make_worker(name, generator)
    write_job(client, key, **fields)
    assert generator.started.wait(10)
    return worker, generator


def test_a_busy_worker_leaves_new_work_to_an_idle_one(make_worker, firestore_client):
    first = JobKey("u1", "images", "first")
    busy, busy_generator = hold_a_job(make_worker, firestore_client, "busy", first)
    gate = busy_generator.gate
    make_worker("idle")
    second = JobKey("u1", "images", "second")
    write_job(firestore_client, second)
    assert wait_until(lambda: finished(firestore_client, second))["worker_id"] == "idle"
    gate.set()
    assert wait_until(lambda: finished(firestore_client, first))["worker_id"] == "busy"
    assert busy_generator.calls == ["first"] and busy.wait_idle(5)  # the slot frees once the job has ended


def test_shutdown_past_the_grace_period_releases_the_job(make_worker, firestore_client):
    key = JobKey("u1", "videos", "long")
    worker, _ = hold_a_job(make_worker, firestore_client, "leaving", key, numFrames=16)  # never let go
    worker.stop(grace=0.2)
    data = doc(firestore_client, key)
    assert data["status"] == "queued" and data["attempts"] == 0 and "worker_id" not in data


class FarRenewals(WorkerJobs):
    """The job store with Firestore far away for lease renewals (a stand-in: each answered after `delay`, as a
    stalled or distant Firestore would; the emulator answers in a millisecond)."""

    delay = 3.0

    def renew(self, job, progress=None):
        time.sleep(self.delay)
        return super().renew(job, progress=progress)


def test_a_completed_jobs_slot_frees_without_waiting_for_a_renewal_under_way(firestore_client, results):
    """A latency audit: the progress 1.0 posted as a job finishes starts a renewal beside its completion; the
    worker's slot waited for it once the completion had landed (0.8 s a job at a 350 ms round trip, up to 6 s at
    900 ms), the next claim behind it. The renewal, fenced off, changes nothing."""
    key = JobKey("u1", "images", "far")
    write_job(firestore_client, key)
    store = FarRenewals(firestore_client, worker_id="w", lease_seconds=30.0)
    job = store.claim(key)
    started = time.monotonic()
    assert JobRunner(store, StubGenerator(), results, renew_interval=100).run(job) == "completed"
    assert time.monotonic() - started < FarRenewals.delay - 1  # its completion's time, not the renewal's
    assert doc(firestore_client, key)["status"] == "completed"


class CountedFence(WorkerJobs):
    """The job store, counting the fence checks' reads and the transitions that met another's write first."""

    reads = conflicts = 0

    def holds(self, job):
        self.reads += 1
        return super().holds(job)

    def _compare_and_set(self, *args):
        try:
            return super()._compare_and_set(*args)
        except jobs_module._Conflict:
            self.conflicts += 1
            raise


def test_a_jobs_completion_meets_no_renewal_of_its_progress(firestore_client, results):
    """A latency audit: the completion met the renewal of the job's progress 1 (sent at its last step, or a second
    one its heartbeat sent on waking with nothing to write), and read and wrote again: 2 round trips a job. It waits
    for that renewal to land; the fence check is a read of its own, made once the generation is done."""
    store = CountedFence(firestore_client, worker_id="w", lease_seconds=30.0)
    for n in range(4):
        key = JobKey("u1", "images", f"fenced-{n}")
        write_job(firestore_client, key)
        assert JobRunner(store, StubGenerator(), results, renew_interval=100).run(store.claim(key)) == "completed"
    assert (store.reads, store.conflicts) == (4, 0)


class ReleaseAway(WorkerJobs):
    """The job store with Firestore away for releases (a stand-in: a stopped emulator takes the release's 15 s of
    retries to say so, and would take the test's other writes with it)."""

    def release(self, job):
        from google.api_core.exceptions import RetryError, ServiceUnavailable

        raise RetryError("Timeout of 15.0s exceeded", ServiceUnavailable("failed to connect to all addresses"))


def test_shutdown_past_the_grace_with_firestore_away_leaves_the_job_to_its_lease_and_says_so(
    firestore_client, results, runner_logs, reconciler_logs
):
    """A job released as its worker leaves while Firestore is away stays `processing` under its claim (another
    worker takes it over once its lease ends): said as `job_not_released`, a WARNING, not a `job_runner_crashed`
    ERROR with a traceback, and the worker's stop completes."""
    key = JobKey("u1", "videos", "away")
    generator = StubGenerator(threading.Event())  # never let go
    store = ReleaseAway(firestore_client, worker_id="leaving", lease_seconds=30.0)
    with started_reconcilers() as start:
        worker = start(Reconciler(store, JobRunner(store, generator, results), sweep_interval=0.3))
        write_job(firestore_client, key, numFrames=16)
        assert generator.started.wait(10)
        worker.stop(grace=0.2)
    data = doc(firestore_client, key)
    assert (data["status"], data["worker_id"], data["attempts"]) == ("processing", "leaving", 1)
    events = [*runner_logs, *reconciler_logs]  # the inner capture has them all
    [said] = [e for e in events if e["event"] == "job_not_released"]
    assert (said["log_level"], said["file_uid"]) == ("warning", "away") and "Timeout of 15.0s" in said["error"]
    assert not [e for e in events if e["event"] in ("job_runner_crashed", "job_released", "write_error")]


def test_shutdown_lets_a_job_finish_within_the_grace_period(make_worker, firestore_client):
    key = JobKey("u1", "images", "short")
    worker, generator = hold_a_job(make_worker, firestore_client, "leaving", key)
    threading.Timer(0.2, generator.gate.set).start()
    worker.stop(grace=10)
    assert doc(firestore_client, key)["status"] == "completed"


def blobs(bucket) -> dict[str, tuple]:
    """Every object of the bucket with what an overwrite would change: generation, checksum, metadata."""
    return {b.name: (b.generation, b.md5_hash, b.metadata) for b in bucket.list_blobs()}


def run_in_thread(runner: JobRunner, job) -> tuple[threading.Thread, dict]:
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("end", runner.run(job)), daemon=True)
    thread.start()
    return thread, outcome


@pytest.fixture
def token_results(storage_client, bucket, storage_emulator):
    """Token-style URLs: an overwrite would also replace the download token a client already holds."""
    return ResultStore(storage_client, bucket.name, url_style="token", emulator_host=storage_emulator.url)


@pytest.mark.parametrize("thief_finished", [False, True], ids=["thief-running", "thief-completed"])
def test_a_worker_that_lost_its_lease_writes_nothing(firestore_client, token_results, bucket, thief_finished):
    """A stale worker (its lease ran out, another worker took the job over) wakes up and finishes generating:
    nothing of it reaches Storage or Firestore, whether the new owner is still running or already done."""
    key = JobKey("u1", "images", "stolen")
    write_job(firestore_client, key)
    store = WorkerJobs(firestore_client, worker_id="slow", lease_seconds=0.3)
    job = store.claim(key)
    gate = threading.Event()
    runner = JobRunner(store, StubGenerator(gate), token_results, renew_interval=60)  # no renewal in time
    thread, outcome = run_in_thread(runner, job)
    thief = WorkerJobs(firestore_client, worker_id="thief", lease_seconds=30)
    taken = wait_until(lambda: thief.claim(key))
    if thief_finished:
        assert JobRunner(thief, StubGenerator(), token_results).run(taken) == "completed"
    before_doc, before_blobs = doc(firestore_client, key), blobs(bucket)
    assert len(before_blobs) == int(thief_finished)
    gate.set()
    thread.join(10)
    assert outcome["end"] == "lost"
    assert doc(firestore_client, key) == before_doc  # not one field changed (a write would change `modified`)
    assert blobs(bucket) == before_blobs  # no object written, none overwritten, the thief's token still valid
    assert before_doc["worker_id"] == "thief"
    if thief_finished:
        with urllib.request.urlopen(before_doc["image_url"], timeout=5) as response:
            assert response.read() == png_bytes()


def test_a_long_job_keeps_its_lease(make_worker, firestore_client):
    """Lease 1.5 s, a job held 4 s, another worker sweeping every 0.2 s for expired leases: the heartbeat keeps
    the lease, so the job runs once, on the worker that claimed it (a beat every 0.5 s: 1 s for each renewal's
    read and write, which a loaded machine can take more than 0.4 s for)."""
    key = JobKey("u1", "images", "long-held")
    generator = StubGenerator(threading.Event())
    make_worker("holder", generator, lease=1.5)
    write_job(firestore_client, key)
    assert generator.started.wait(10)
    sweeper = StubGenerator()
    make_worker("sweeper", sweeper, lease=1.5, sweep=0.2)
    threading.Timer(4.0, generator.gate.set).start()  # the job's length, not a synchronisation
    data = wait_until(lambda: finished(firestore_client, key), timeout=20)
    assert (data["status"], data["worker_id"], data["attempts"]) == ("completed", "holder", 1)
    assert generator.calls == ["long-held"] and sweeper.calls == []


def test_a_write_after_the_lease_ran_out_but_before_a_takeover_lands(firestore_client, results, bucket):
    """The README's rule: the fence is the claim (worker_id + attempt), not the clock. A worker whose lease ran
    out while nobody took the job over still owns it: its results are uploaded and the job completes, once; a
    claim after that finds nothing to take."""
    key = JobKey("u1", "images", "late")
    write_job(firestore_client, key)
    store = WorkerJobs(firestore_client, worker_id="late", lease_seconds=0.3)
    job = store.claim(key)
    gate = threading.Event()
    thread, outcome = run_in_thread(JobRunner(store, StubGenerator(gate), results, renew_interval=60), job)
    expires = job.claimed_at.timestamp() + 0.3
    wait_until(lambda: time.time() > expires + 0.2)  # the lease is over (server and test share one clock)
    assert doc(firestore_client, key)["status"] == "processing"
    gate.set()
    thread.join(10)
    data = doc(firestore_client, key)
    assert (outcome["end"], data["status"], data["worker_id"], data["attempts"]) == (
        "completed",
        "completed",
        "late",
        1,
    )
    assert list(blobs(bucket)) == ["generating/u1/image/late.png"]
    assert WorkerJobs(firestore_client, worker_id="other").claim(key) is None


class BlippingStore(WorkerJobs):
    """The job store with Firestore away for the first `blips` calls of `complete`.

    A stand-in for the outage itself, on purpose: the Firestore emulator keeps its data in memory, so stopping
    it (as the chaos tests do) would also lose the job's doc. The error is the one the client raises then.
    """

    def __init__(self, *args, blips: int, error: Exception | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.blips = blips
        from google.api_core.exceptions import ServiceUnavailable

        self.error = error or ServiceUnavailable("failed to connect to all addresses")

    def complete(self, job, fields):
        if self.blips:
            self.blips -= 1
            raise self.error
        return super().complete(job, fields)


def first_call_fails(method: str) -> type[WorkerJobs]:
    """The job store with Firestore away for the first call of `method` (a stand-in, as BlippingStore is)."""

    class Blip(WorkerJobs):
        blips = 1

    def failing(self, *args, **kwargs):
        if self.blips:
            self.blips -= 1
            from google.api_core.exceptions import ServiceUnavailable

            raise ServiceUnavailable("failed to connect to all addresses")
        return getattr(WorkerJobs, method)(self, *args, **kwargs)

    setattr(Blip, method, failing)
    return Blip


@pytest.mark.parametrize(
    "method,event",
    [("claim", "claim_error"), ("admit", "admission_error")],
)
def test_a_queue_call_that_failed_is_logged_and_the_job_still_runs(
    firestore_client, results, reconciler_logs, method, event
):
    """README: `claim_error` and `admission_error` (with `path`), each retried by the next event or sweep (the
    claim admits a job its admission missed)."""
    key = JobKey("u1", "images", f"{method}-blip")
    store = first_call_fails(method)(firestore_client, worker_id="w1", lease_seconds=30)
    with started_reconcilers() as start:
        start(Reconciler(store, JobRunner(store, StubGenerator(), results), sweep_interval=0.3))
        write_job(firestore_client, key)
        data = wait_until(lambda: finished(firestore_client, key))
    assert (data["status"], data["attempts"], store.blips) == ("completed", 1, 0)
    [said] = [e for e in reconciler_logs if e["event"] == event]
    assert (said["path"], said["log_level"]) == (key.path, "warning") and "failed to connect" in said["error"]


def test_a_cancel_whose_write_failed_is_logged_and_the_job_still_ends_cancelled(
    firestore_client, results, reconciler_logs
):
    """README: `cancel_error` (with `path`), retried by the next event or sweep: a queued job its owner cancelled,
    whose failing write met Firestore away once, still ends failed `Cancelled`, never run. The stand-in fails the
    store's first `transition`: with this job alone (cancelled before any worker saw it), no admission, claim or
    run makes that call, only the cancel's; the single error logged (by the cancel) shows it."""
    key = JobKey("u1", "images", "cancel-blip")
    store = first_call_fails("transition")(firestore_client, worker_id="w1", lease_seconds=30)
    generator = StubGenerator()
    with started_reconcilers() as start:
        start(Reconciler(store, JobRunner(store, generator, results), sweep_interval=0.3))
        write_job(firestore_client, key, cancel_requested=True)
        data = wait_until(lambda: finished(firestore_client, key))
    assert (data["status"], data["error_type"], store.blips) == ("failed", "Cancelled", 0)
    assert generator.calls == [] and not data.get("attempts") and "worker_id" not in data
    failed = [e for e in reconciler_logs if "failed to connect" in str(e.get("error"))]
    assert [(e["event"], e["path"], e["log_level"]) for e in failed] == [("cancel_error", key.path, "warning")]
    # Said once, by the drop that landed, even where the emulator answered that drop `CANCELLED` ("call already
    # cancelled") and the client's resend failed on its own write (`WorkerJobs.drop`).
    dropped = [e for e in reconciler_logs if e["event"] == "job_cancelled"]
    assert [(e["file_uid"], e["during"]) for e in dropped] == [(key.file_uid, "queue")]


class ChokingReconciler(CountingReconciler):
    """The reconciler with a listener handler that raises on the doc `choke` (a stand-in: the docs that made it
    raise, an admin's unreadable fields, are read as none since the audit above, so no real doc does it on
    demand)."""

    def _heard_queued(self, key, doc):
        if key.file_uid == "choke":
            raise ValueError("no sense to be made of this doc")
        super()._heard_queued(key, doc)


def test_a_doc_a_listener_could_not_take_in_is_logged_and_the_listener_goes_on(
    firestore_client, results, reconciler_logs
):
    """README: `listener_doc_error` (with `path`; the listener goes on). The next doc, written once the first was
    refused, with the periodic sweep two minutes away, can only reach the worker through the same listeners."""
    store = WorkerJobs(firestore_client, worker_id="w1", lease_seconds=30)
    with started_reconcilers() as start:
        worker = start(ChokingReconciler(store, JobRunner(store, StubGenerator(), results), sweep_interval=SLOW_SWEEP))
        assert wait_until(lambda: worker.sweeps == 1)  # the sweep at start is done; the next is far away
        choke = JobKey("u1", "images", "choke")
        write_job(firestore_client, choke)
        said = wait_until(lambda: [e for e in reconciler_logs if e["event"] == "listener_doc_error"])
        after = JobKey("u1", "images", "after-choke")
        write_job(firestore_client, after)
        assert wait_until(lambda: finished(firestore_client, after))["status"] == "completed"
        assert worker.sweeps == 1  # no sweep ran since: a listener delivered it
    assert {(e["path"], e["log_level"]) for e in said} == {(choke.path, "warning")}
    assert all(e["error"] == "no sense to be made of this doc" for e in said)
    assert doc(firestore_client, choke)["status"] == "queued" and not restarts(reconciler_logs)


def test_a_worker_doc_that_could_not_be_removed_is_logged_and_the_stop_completes(
    monkeypatch, unreachable_firestore, reconciler_logs
):
    """README: `worker_doc_not_removed`: Firestore unreachable as the worker stops (nothing listens on its port: a
    real client's delete of the heartbeat doc fails), said, and the stop still ends with `reconciler_stopped`,
    within the delete's bound (LEAVE_TIMEOUT: 5 s, which a dead port takes 2 to 5 s to run out; 1 s here)."""
    monkeypatch.setattr(workers, "LEAVE_TIMEOUT", 1.0)
    # No listeners, no heartbeat (start's, which would fail too): only the claim loop, which stops at once.
    reconciler = Reconciler(WorkerJobs(unreachable_firestore, worker_id="w-down"), runner=None)  # type: ignore[arg-type]
    reconciler.start(listen=False)
    started = time.monotonic()
    reconciler.stop(grace=0)
    took = time.monotonic() - started
    said = [(e["event"], e["log_level"]) for e in reconciler_logs if e["event"] != "reconciler_started"]
    assert said == [("worker_doc_not_removed", "warning"), ("reconciler_stopped", "info")]
    [not_removed] = [e for e in reconciler_logs if e["event"] == "worker_doc_not_removed"]
    assert not_removed["error"] and took < workers.LEAVE_TIMEOUT + 3, took


def listening(client) -> Listeners:
    """The worker's listeners, started, heard by no one."""
    noop = lambda *args: None  # noqa: E731
    listeners = Listeners(
        WorkerJobs(client, worker_id="w-away"),
        on_queued=noop,
        on_gone=noop,
        on_cancel=noop,
        on_stop=noop,
        not_ours=noop,
    )
    listeners.start()
    return listeners


def test_listeners_with_firestore_away_reopen_their_streams_at_a_bounded_pace(unreachable_firestore):
    """google-api-core reopens a failed stream at once, again and again, unless asked to pause (the Firestore client
    does not ask): with Firestore away the six listeners took 3.4 s of CPU in 3 s (a minute of it in a worker,
    until two failed sweeps paused them), the GIL a generating job needs. Throttled, they reopen 5 times in 10 s."""
    listeners = listening(unreachable_firestore)
    try:
        cpu = time.process_time()
        time.sleep(2)  # a window of what they cost: no event marks an absence
        assert time.process_time() - cpu < 0.5
    finally:
        listeners.close()


def test_listeners_closed_with_firestore_away_stop_reopening_their_streams(unreachable_firestore, monkeypatch):
    """google-api-core's resumable stream reopens from gRPC's done callback even once closed: with Firestore away
    (the worker stopping, or its listeners paused through an outage) each reopened call failed at once and reopened
    again, a thread each: 4,646 threads started in the 3 s after the close, 3.3 s of CPU, until Firestore answered.
    A closed listener stops there."""
    listeners = listening(unreachable_firestore)
    listeners.close()
    started: list[str] = []
    start = threading.Thread.start

    def counted(thread: threading.Thread) -> None:
        started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", counted)
    cpu = time.process_time()
    time.sleep(2)  # a window in which nothing may happen: no event marks an absence
    assert len(started) < 10, (len(started), started[:5])
    assert time.process_time() - cpu < 0.5


class BeatWatched(Reconciler):
    """`sweep_beat`: set as the sweep loop's first heartbeat (a whole CALL_TIMEOUT of retries) begins."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sweep_beat = threading.Event()

    def beat(self, timeout: float = workers.CALL_TIMEOUT) -> None:
        if timeout == workers.CALL_TIMEOUT:  # not start's, of START_BEAT_TIMEOUT
            self.sweep_beat.set()
        super().beat(timeout)


def test_an_idle_worker_with_firestore_away_stops_within_a_few_seconds(unreachable_firestore, reconciler_logs):
    """A RunPod worker is paid for until it exits: stopped idle with Firestore away (nothing on its port), its
    heartbeat held up in its 15 s of retries and its listeners reconnecting, it took 10 to 30 s (a bound of 5 s for
    each loop, a second for each listener's close, 5 s for its liveness doc). Now: the listeners close together
    (~1 s), the loops have 2 s in all, the liveness doc one short try (1 s): under 7 s with slack for a loaded
    machine (the timeouts, not the CPU, take the time; 3.4 to 3.8 s here)."""
    reconciler = BeatWatched(WorkerJobs(unreachable_firestore, worker_id="w-away"), runner=None, sweep_interval=0.1)  # type: ignore[arg-type]
    reconciler.start()
    assert reconciler.sweep_beat.wait(10)
    closes: list[float] = []
    close = reconciler.listeners.close

    def timed_close() -> None:
        began = time.monotonic()
        close()
        closes.append(time.monotonic() - began)

    reconciler.listeners.close = timed_close  # type: ignore[method-assign]
    started = time.monotonic()
    reconciler.stop(grace=0)
    took = time.monotonic() - started
    said = [e["event"] for e in reconciler_logs]
    assert said[-2:] == ["worker_doc_not_removed", "reconciler_stopped"], said
    assert took < 7, took
    assert closes[0] < 2.5, closes  # six listeners, a second each when closed one after another


class RenewBlip(WorkerJobs):
    """The job store with Firestore away for the first lease renewal (a stand-in); `renewed`: one went through."""

    blips = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.renewed = threading.Event()

    def renew(self, *args, **kwargs):
        if self.blips:
            self.blips -= 1
            from google.api_core.exceptions import ServiceUnavailable

            raise ServiceUnavailable("failed to connect to all addresses")
        renewed = super().renew(*args, **kwargs)
        self.renewed.set()
        return renewed


def test_a_lease_renewal_that_failed_is_logged_and_the_next_one_keeps_the_job(firestore_client, results, runner_logs):
    """README: `lease_renew_error`, retried by the next beat (the lease has slack): the job ends as it would."""
    key = JobKey("u1", "images", "renew-blip")
    write_job(firestore_client, key)
    store = RenewBlip(firestore_client, worker_id="w1", lease_seconds=1.5)  # a renewal every 0.5 s
    generator = StubGenerator(gate=store.renewed)  # runs until a renewal after the failed one went through
    assert JobRunner(store, generator, results).run(store.claim(key)) == "completed"
    assert (doc(firestore_client, key)["status"], store.blips) == ("completed", 0)
    [said] = [e for e in runner_logs if e["event"] == "lease_renew_error"]
    assert (said["file_uid"], said["log_level"]) == ("renew-blip", "warning") and "failed to connect" in said["error"]


def test_a_failed_renewal_is_tried_again_soon_not_a_beat_later(firestore_client, results, monkeypatch):
    """A resilience review: after an outage a peer takes expired leases over a lease after Firestore answers it
    again; an owner whose renewal failed waited a whole beat (a third of the lease) to try again, so a late
    channel could lose it the job. Here a beat is 5 s and the retry 0.2 s."""
    monkeypatch.setattr(lease_module, "RENEW_RETRY_SECONDS", 0.2)
    key = JobKey("u1", "images", "renew-soon")
    write_job(firestore_client, key)
    store = RenewBlip(firestore_client, worker_id="w1", lease_seconds=15.0)
    tries: list[float] = []
    renew = store.renew

    def timed(*args, **kwargs):
        tries.append(time.monotonic())
        return renew(*args, **kwargs)

    store.renew = timed  # type: ignore[method-assign]

    class Quiet(StubGenerator):
        """Held until a renewal went through, saying nothing meanwhile (a progress post would wake a renewal)."""

        def generate(self, request, progress=None):
            assert store.renewed.wait(30)
            return super().generate(request)

    assert JobRunner(store, Quiet(), results).run(store.claim(key)) == "completed"
    assert len(tries) >= 2 and tries[1] - tries[0] < 2.5, [round(t - tries[0], 2) for t in tries]


@pytest.mark.parametrize("cancelled", [False, True])
def test_a_firestore_blip_after_the_upload_neither_fails_nor_reruns_the_job(
    firestore_client, results, bucket, cancelled
):
    """Firestore away twice as the job completes; or the call `Cancelled` by the server (a CI run: a restarting
    emulator answered "call already cancelled", the RPC not done)."""
    from google.api_core.exceptions import Cancelled

    key = JobKey("u1", "images", "blip")
    write_job(firestore_client, key)
    error = Cancelled("call already cancelled") if cancelled else None
    store = BlippingStore(firestore_client, worker_id="w1", lease_seconds=30, blips=2, error=error)
    generator = StubGenerator()
    assert JobRunner(store, generator, results).run(store.claim(key)) == "completed"
    data = doc(firestore_client, key)
    assert (data["status"], data["attempts"], store.blips) == ("completed", 1, 0)
    assert generator.calls == ["blip"] and list(blobs(bucket)) == ["generating/u1/image/blip.png"]


class FirestoreAway(WorkerJobs):
    """The job store with Firestore away for `complete` until `back` (a stand-in, as BlippingStore is)."""

    def __init__(self, *args, back: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.back, self.tries = back, 0

    def complete(self, job, fields):
        if time.monotonic() < self.back:
            self.tries += 1
            from google.api_core.exceptions import ServiceUnavailable

            raise ServiceUnavailable("failed to connect to all addresses")
        return super().complete(job, fields)


def test_firestore_away_longer_than_the_lease_after_the_upload_still_completes_the_job(
    firestore_client, results, bucket
):
    """Audit: Firestore paused 36 s under a 10 s lease: the completion was tried for one lease period, then the job
    was failed `ConnectionError` once Firestore came back, its generation thrown away. The fence is the claim:
    with nobody else claiming meanwhile, the completion lands."""
    key = JobKey("u1", "images", "outage")
    write_job(firestore_client, key)
    store = FirestoreAway(firestore_client, worker_id="w1", lease_seconds=1.0, back=time.monotonic() + 3.5)
    assert JobRunner(store, StubGenerator(), results).run(store.claim(key)) == "completed"
    data = doc(firestore_client, key)
    assert (data["status"], data["attempts"]) == ("completed", 1) and store.tries > 1


def test_firestore_away_past_the_patience_leaves_the_job_to_run_again(firestore_client, results, bucket, monkeypatch):
    """Past FINISH_PATIENCE_SECONDS the job is not failed (that too would wait for Firestore): it stays
    `processing` and runs again once its lease ends (`job_not_recorded`)."""
    import listener.runner as runner_module

    monkeypatch.setattr(runner_module, "FINISH_PATIENCE_SECONDS", 1.5)
    key = JobKey("u1", "images", "long-outage")
    write_job(firestore_client, key)
    store = FirestoreAway(firestore_client, worker_id="w1", lease_seconds=1.0, back=time.monotonic() + 600)
    with structlog.testing.capture_logs() as logs:
        monkeypatch.setattr(runner_module, "log", structlog.get_logger("listener.runner"))
        assert JobRunner(store, StubGenerator(), results).run(store.claim(key)) == "lost"
    assert [e["log_level"] for e in logs if e["event"] == "job_not_recorded"] == ["error"]
    assert doc(firestore_client, key)["status"] == "processing"
    rerun = WorkerJobs(firestore_client, worker_id="w2", lease_seconds=30)
    job = wait_until(lambda: rerun.claim(key), timeout=10)
    assert JobRunner(rerun, StubGenerator(), results).run(job) == "completed"
    assert (doc(firestore_client, key)["status"], doc(firestore_client, key)["attempts"]) == ("completed", 2)


class BlippingRenewal(WorkerJobs):
    """The job store with Firestore away for the first call of `renew` (a stand-in, as BlippingStore is)."""

    renewals = 0

    def renew(self, job, progress=None):
        self.renewals += 1
        if self.renewals == 1:
            from google.api_core.exceptions import ServiceUnavailable

            raise ServiceUnavailable("failed to connect to all addresses")
        return super().renew(job, progress=progress)


def test_a_firestore_blip_during_a_renewal_keeps_the_job(firestore_client, results):
    """A lease has slack: one renewal that fails on a transient error is tried again at the next beat. The job
    goes on under its claim (renewed again, completed once, one attempt), not given up as lost."""
    key = JobKey("u1", "images", "renew-blip")
    write_job(firestore_client, key)
    store = BlippingRenewal(firestore_client, worker_id="w1", lease_seconds=30)
    generator = StubGenerator(threading.Event())
    runner = JobRunner(store, generator, results, renew_interval=0.1)
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run(store.claim(key))), daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: store.renewals >= 3, timeout=10)  # renewed again after the failed one
    finally:
        generator.gate.set()
        thread.join(15)
    data = doc(firestore_client, key)
    assert (outcome, data["status"], data["attempts"], generator.calls) == (
        ["completed"],
        "completed",
        1,
        ["renew-blip"],
    )


class ProgressRecorder(WorkerJobs):
    """The job store, noting each progress it writes (with the lease's renewal) and when."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.written: list[tuple[float, float]] = []

    def renew(self, job, progress=None):
        renewed = super().renew(job, progress=progress)
        if progress is not None:
            self.written.append((time.monotonic(), progress))
        return renewed


class SlowSteps:
    """A long denoising loop: `steps` steps of `step_seconds` each (its work), progress after each."""

    def __init__(self, steps: int, step_seconds: float):
        self.steps, self.step_seconds = steps, step_seconds

    def generate(self, request, progress=None):
        for step in range(1, self.steps + 1):
            time.sleep(self.step_seconds)
            progress(step / self.steps)
        return SimpleNamespace(seed=1, files=[(png_bytes(), "png", "image/png")], video_info=None)


def test_a_long_job_writes_its_progress_between_the_quarters(firestore_client, results, monkeypatch):
    """A quarter of a long video can be a minute: its progress is also written once PROGRESS_EVERY_S has passed
    since the last write (not at every step: the writes stay that far apart unless a quarter is crossed)."""
    monkeypatch.setattr(lease_module, "PROGRESS_EVERY_S", 0.3)
    key = JobKey("u1", "videos", "long-steps")
    write_job(firestore_client, key, num_frames=16)
    store = ProgressRecorder(firestore_client, worker_id="w1", lease_seconds=30)
    started = time.monotonic()
    assert JobRunner(store, SlowSteps(40, 0.05), results).run(store.claim(key)) == "completed"
    elapsed = time.monotonic() - started
    fractions = [fraction for _, fraction in store.written]
    assert fractions == sorted(set(fractions)) and fractions[-1] == 1.0
    assert [f for f in fractions if f % 0.25], f"only quarters written: {fractions}"
    assert len(fractions) <= elapsed / 0.3 + 5, f"{len(fractions)} writes in {elapsed:.1f} s: {fractions}"
    assert doc(firestore_client, key)["progress"] == 1.0


def test_a_storage_outage_fails_the_job_as_connection_error_and_the_next_waits_queued(
    make_worker, firestore_client, storage_emulator, monkeypatch
):
    """A Storage audit: while Storage was down every queued job was claimed, generated and failed in turn, the queue
    drained into failures. After the first, the worker claims nothing until a request to the bucket answers."""
    from listener import storage_outage

    monkeypatch.setattr(storage_outage, "FIRST_PROBE_SECONDS", 0.1)
    monkeypatch.setattr(storage_outage, "LONGEST_PROBE_SECONDS", 0.5)
    probes: list[float] = []
    probe = ResultStore.probe
    monkeypatch.setattr(ResultStore, "probe", lambda self: probes.append(time.monotonic()) or probe(self))
    key = JobKey("u1", "images", "no-storage")
    worker, generator = hold_a_job(make_worker, firestore_client, "w1", key)
    waiting = JobKey("u1", "images", "waits-for-storage")
    storage_emulator.stop()
    try:
        generator.gate.set()
        data = wait_until(lambda: finished(firestore_client, key))
        write_job(firestore_client, waiting)
        wait_until(lambda: worker.is_candidate(waiting), timeout=30)
        asked = len(probes)
        wait_until(lambda: len(probes) >= asked + 2, timeout=30)  # Storage asked again since, and still away
        assert doc(firestore_client, waiting)["status"] == "queued" and generator.calls == ["no-storage"]
        # Its liveness doc says why it claims nothing (README "When a job stays queued").
        liveness = firestore_client.document("workers/w1")
        wait_until(lambda: (liveness.get().to_dict() or {}).get("claims_paused") == "storage", timeout=30)
    finally:
        storage_emulator.start()
    assert (data["status"], data["error_type"]) == ("failed", "ConnectionError")
    assert data["error_message"].startswith("Upload or storage failure")
    assert wait_until(lambda: finished(firestore_client, waiting))["status"] == "completed"
    wait_until(lambda: "claims_paused" not in (liveness.get().to_dict() or {}), timeout=30)


def test_a_dead_workers_job_goes_before_the_backlog(make_worker, firestore_client):
    orphan = JobKey("u1", "images", "orphan")
    write_job(firestore_client, orphan)
    assert WorkerJobs(firestore_client, worker_id="dead", lease_seconds=0.5).claim(orphan) is not None
    # Its worker is dead: the lease runs out (the emulator's clock decides) before the survivor starts, so it
    # is the survivor's first sweep, not the pace of the backlog, that finds it.
    expires = doc(firestore_client, orphan)["lease_expires_at"]
    wait_until(lambda: firestore_client.document(orphan.path).get().read_time > expires)
    backlog = [JobKey("u1", "images", f"newer-{i:02d}") for i in range(60)]
    batch = firestore_client.batch()
    for key in backlog:
        batch.set(
            firestore_client.document(key.path), {"status": "queued", "prompt": "x", "generated": False, "error": False}
        )
    batch.commit()
    generator = StubGenerator()
    make_worker("survivor", generator, sweep=0.2, limits=Limits(max_pending=100))  # the backlog is one user's
    wait_until(lambda: len(generator.calls) == 61, timeout=90)
    # Found by the sweep once its lease ran out, it is run next, not after everything queued since.
    assert generator.calls.index("orphan") < 20, generator.calls  # about 8 here; at the back of the line: ~50
    assert doc(firestore_client, orphan)["attempts"] == 2


class SlowClaimStore(WorkerJobs):
    """The job store with each claim held at the door until `gate` opens (a claim on its way to Firestore)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.entered, self.gate = threading.Event(), threading.Event()

    def claim(self, key, **kwargs):
        self.entered.set()
        assert self.gate.wait(10)
        return super().claim(key, **kwargs)


@pytest.mark.parametrize(
    "grace, status, attempts", [(10, "completed", 1), (0, "queued", 0)], ids=["runs", "given-back"]
)
def test_a_claim_on_its_way_when_the_worker_stops_runs_within_the_grace_or_is_given_back(
    firestore_client, results, grace, status, attempts
):
    """stop() waits for a claim in flight; one that wins is a running job like any other (an observer may already
    see it `processing` when the SIGTERM comes): it finishes within the grace period, or goes back to the queue
    with its attempt restored. Never left `processing`."""
    store = SlowClaimStore(firestore_client, worker_id="leaving", lease_seconds=30)
    generator = StubGenerator()
    worker = Reconciler(store, JobRunner(store, generator, results), sweep_interval=SLOW_SWEEP).start()
    assert worker.wait_listening(LISTENING_SECONDS)
    key = JobKey("u1", "images", "in-flight")
    write_job(firestore_client, key)
    assert store.entered.wait(10)
    stopper = threading.Thread(target=worker.stop, kwargs={"grace": grace}, daemon=True)
    stopper.start()
    try:
        assert wait_until(lambda: not worker._claiming)
        if grace == 0:
            assert wait_until(worker.runner.abort.is_set)  # the grace is over before the claim comes back
        assert stopper.is_alive()  # waiting for the claim in flight
    finally:
        store.gate.set()
        stopper.join(15)
    assert not stopper.is_alive()
    data = doc(firestore_client, key)
    assert (data["status"], data["attempts"], "worker_id" in data) == (status, attempts, status == "completed")


class CountingGenerator(StubGenerator):
    """Holds every job until `gate` opens and records how many ran at once."""

    def __init__(self, gate):
        super().__init__(gate)
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def generate(self, request, progress=None):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return super().generate(request, progress)
        finally:
            with self._lock:
                self.running -= 1


def test_concurrency_two_runs_two_jobs_at_once_and_no_more(make_worker, firestore_client):
    generator = CountingGenerator(threading.Event())
    worker = make_worker("pair", generator, concurrency=2)
    keys = [JobKey("u1", "images", f"c-{i}") for i in range(3)]
    for key in keys:
        write_job(firestore_client, key)
    assert wait_until(lambda: generator.running == 2)
    # The third stays queued while both slots are busy (the sweep, every 0.3 s, offers it again and again).
    assert wait_until(lambda: worker.sweeps >= 3)
    assert generator.running == 2 and len(generator.calls) == 2
    assert sorted(doc(firestore_client, k)["status"] for k in keys) == ["processing", "processing", "queued"]
    generator.gate.set()
    assert all(wait_until(lambda k=k: finished(firestore_client, k))["status"] == "completed" for k in keys)
    assert generator.most == 2 and sorted(generator.calls) == ["c-0", "c-1", "c-2"]


class HeldCompletions(WorkerJobs):
    """The job store, each completion held until `gate` opens (a far or stalled Firestore; a stand-in)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate, self.completing = threading.Event(), []

    def complete(self, job, fields):
        self.completing.append(job.key.file_uid)
        assert self.gate.wait(60)
        return super().complete(job, fields)


def test_a_generated_job_completes_while_the_next_one_generates_and_no_more_deliver_than_the_slots(
    firestore_client, results
):
    """CONCURRENCY 1: a generated job hands its slot over while its files are stored and its completion written
    (round trips the device would otherwise sit out), so the next job generates meanwhile; while that one delivers
    too, the slot is held: no more batches deliver so than there are slots."""
    generator = StubGenerator()
    store = HeldCompletions(firestore_client, worker_id="w", lease_seconds=30)
    with started_reconcilers() as start:
        worker = start(CountingReconciler(store, JobRunner(store, generator, results), sweep_interval=0.3))
        keys = [JobKey(f"u{i}", "images", f"d-{i}") for i in range(3)]  # three users: no user's limit in the way
        for key in keys:
            write_job(firestore_client, key)
        try:
            assert wait_until(lambda: len(store.completing) == 2)
            sweeps = worker.sweeps
            assert wait_until(lambda: worker.sweeps >= sweeps + 3)  # the third offered again and again meanwhile
            assert len(generator.calls) == 2 and sorted(store.completing) == sorted(generator.calls)
            [waiting] = [key for key in keys if key.file_uid not in generator.calls]
            assert doc(firestore_client, waiting)["status"] == "queued"
        finally:
            store.gate.set()
        assert all(wait_until(lambda k=k: finished(firestore_client, k))["status"] == "completed" for k in keys)


class EncodingGenerator(StubGenerator):
    """Says its generation is over (`on_generated`), as generation.engine.Engine does before it encodes the files,
    then holds each job's encoding until `encoding` opens."""

    calls_on_generated = True

    def __init__(self):
        super().__init__()
        self.encoding, self.encoded, self.in_encoding = threading.Event(), [], threading.Event()

    def generate(self, request, progress=None, on_generated=None):
        result = super().generate(request, progress)
        if on_generated is not None:  # a runner that does not pass it: its slot waits for the encoding
            on_generated()
        self.in_encoding.set()
        assert self.encoding.wait(60)
        self.encoded.append(request.file_uid)
        return result


class ReleasesSeen(WorkerJobs):
    """The job store, saying when a job is given back to the queue."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.releasing = threading.Event()

    def release(self, job):
        self.releasing.set()
        return super().release(job)


@contextlib.contextmanager
def a_video_in_its_encode(client, results, generator, store, file_uid: str):
    """A worker running one video job, its generation done and its encode under way (`generator.in_encoding`)."""
    key = JobKey("u1", "videos", file_uid)
    with started_reconcilers() as start:
        worker = start(Reconciler(store, JobRunner(store, generator, results), sweep_interval=0.3))
        write_job(client, key, numFrames=16)
        assert generator.in_encoding.wait(30)
        yield worker, key


def test_a_worker_leaving_lets_a_job_past_the_device_encode_and_deliver(firestore_client, results):
    """A review of the hand-over: a video the device was done with, still in its MP4 encode (seconds on a card) as
    the shutdown grace ended, was given back to the queue, to run in full again on another worker. It delivers."""
    generator = EncodingGenerator()
    store = ReleasesSeen(firestore_client, worker_id="w", lease_seconds=30)
    with a_video_in_its_encode(firestore_client, results, generator, store, "encoding-as-it-leaves") as (worker, key):
        stopping = threading.Thread(target=worker.stop, kwargs={"grace": 0.2})
        stopping.start()
        try:
            assert wait_until(worker.runner.abort.is_set)
            assert not store.releasing.wait(2)  # its heartbeat gives it back at once, if at all
        finally:
            generator.encoding.set()
            stopping.join(60)
    data = doc(firestore_client, key)
    assert (data["status"], data["attempts"], generator.calls) == ("completed", 1, [key.file_uid])
    assert not store.releasing.is_set()


class EndlessEncode(StubGenerator):
    """Says its generation is over, then encodes "frames" for a minute, asking before each as the engine's MP4
    encode does (`progress(1.0)`)."""

    calls_on_generated = True

    def __init__(self):
        super().__init__()
        self.in_encoding = threading.Event()

    def generate(self, request, progress=None, on_generated=None):
        result = super().generate(request, progress)
        on_generated()
        self.in_encoding.set()
        for _ in range(1200):
            progress(1.0)
            time.sleep(0.05)
        return result


def test_a_job_still_encoding_past_the_leaving_delivery_time_is_released(firestore_client, results, monkeypatch):
    """A review: a job marked generated as the device was done with it delivers as its worker leaves, but an encode
    that outlasts LEAVING_DELIVERY_SECONDS (a long MP4, a stuck one) held it `processing` until its lease ran out,
    where before it was released at the grace's end. Past that time it stops at its next frame and is released."""
    monkeypatch.setattr(runner_module, "LEAVING_DELIVERY_SECONDS", 0.5)
    generator = EndlessEncode()
    store = WorkerJobs(firestore_client, worker_id="w", lease_seconds=30)
    with a_video_in_its_encode(firestore_client, results, generator, store, "encoding-for-ever") as (worker, key):
        worker.stop(grace=0.2)
        data = doc(firestore_client, key)
        assert (data["status"], data["attempts"], data.get("releases")) == ("queued", 0, 1)


def test_the_next_job_generates_while_one_encodes_its_files(firestore_client, results):
    """CONCURRENCY 1: a job's encoding (a 1024x1024 PNG: ~0.15 s of zlib; a video's MP4: seconds) is CPU work after
    the device is done, so its slot goes to the next claim as it starts, through the worker's device guard too."""
    from listener.worker import DeviceGuard

    generator = EncodingGenerator()
    store = WorkerJobs(firestore_client, worker_id="w", lease_seconds=30)
    runner = JobRunner(store, DeviceGuard(generator, lambda exc: None), results)
    with started_reconcilers() as start:
        start(Reconciler(store, runner, sweep_interval=0.3))
        keys = [JobKey(f"u{i}", "images", f"encoding-{i}") for i in range(2)]  # two users: no user's limit in the way
        for key in keys:
            write_job(firestore_client, key)
        try:
            assert wait_until(lambda: len(generator.calls) == 2)
            assert generator.encoded == []  # the first still encodes
        finally:
            generator.encoding.set()
        assert all(wait_until(lambda k=k: finished(firestore_client, k))["status"] == "completed" for k in keys)


class RefusalsCounted(WorkerJobs):
    """The job store, counting the claims that took nothing (another's, or refused: a user's limit)."""

    refused = 0

    def claim(self, key, **options):
        job = super().claim(key, **options)
        self.refused += job is None
        return job


class HeldCompletionsCountingRefusals(RefusalsCounted, HeldCompletions):
    pass


def test_a_worker_refused_a_users_job_for_their_jobs_running_elsewhere_holds_their_others_back(
    firestore_client, results
):
    """The fairness review, two workers: a user at USER_MAX_RUNNING on one worker had their queued jobs claimed by the
    other one by one, each refused (a transaction each), and the first to pass once their job ended was not their
    oldest (a 14th job started before the 2nd). One refusal holds all of that user's candidates back in their
    places until the next sweep offers them again, oldest first."""
    limits = Limits(max_running=1)
    holding = StubGenerator(threading.Event())
    busy = WorkerJobs(firestore_client, worker_id="busy", lease_seconds=30, limits=limits)
    other = RefusalsCounted(firestore_client, worker_id="other", lease_seconds=30, limits=limits)
    keys = [JobKey("u1", "images", f"at-the-limit-{i}") for i in range(5)]
    with started_reconcilers() as start:
        start(Reconciler(busy, JobRunner(busy, holding, results), sweep_interval=60))
        write_job(firestore_client, keys[0])
        assert holding.started.wait(30)
        for key in keys[1:]:
            write_job(firestore_client, key)
        try:
            # Its listener offers the four queued docs; its sweep, once a minute, does not come meanwhile.
            idle = start(Reconciler(other, JobRunner(other, StubGenerator(), results), sweep_interval=60))
            wait_until(lambda: other.refused >= 1)

            def all_passed_over() -> bool:  # held in their places, none claimable, until its next sweep (a minute)
                with idle._cv:
                    return len(idle._queue) > 0 and idle._queue.ready_at(idle._may_claim) is None

            wait_until(all_passed_over)
            assert other.refused == 1 and len(idle._queue) == 3
        finally:
            holding.gate.set()
        # The busy worker runs them, oldest first, as its own job ends.
        assert all(wait_until(lambda k=k: finished(firestore_client, k))["status"] == "completed" for k in keys)
    assert holding.calls == [key.file_uid for key in keys]


def test_a_users_next_job_waits_unclaimed_while_their_job_at_the_limit_completes_here(firestore_client, results):
    """A review: with its slot handed over, a job completing here still counts toward its user's USER_MAX_RUNNING,
    and the user's next job was claimed and refused again and again (a transaction each, for nothing). It waits
    unclaimed until that job ends here, then runs."""
    generator = StubGenerator()
    store = HeldCompletionsCountingRefusals(
        firestore_client, worker_id="w", lease_seconds=30, limits=Limits(max_running=1)
    )
    with started_reconcilers() as start:
        worker = start(CountingReconciler(store, JobRunner(store, generator, results), sweep_interval=0.3))
        keys = [JobKey("u1", "images", f"one-at-a-time-{i}") for i in range(2)]
        for key in keys:
            write_job(firestore_client, key)
        try:
            assert wait_until(lambda: len(store.completing) == 1)
            sweeps = worker.sweeps
            assert wait_until(lambda: worker.sweeps >= sweeps + 3)  # the next one offered again and again meanwhile
            assert (len(generator.calls), store.refused) == (1, 0)
        finally:
            store.gate.set()
        assert all(wait_until(lambda k=k: finished(firestore_client, k))["status"] == "completed" for k in keys)
    assert store.refused == 0


class HeldUploads(ResultStore):
    """The result store, each upload held at its door until `gate` opens (a far Storage; a stand-in)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate, self.uploading = threading.Event(), []

    def upload(self, user_id, file_uid, *args, **kwargs):
        self.uploading.append(file_uid)
        assert self.gate.wait(60)
        return super().upload(user_id, file_uid, *args, **kwargs)


def test_the_next_job_generates_while_one_uploads_and_a_storage_outage_then_costs_one_job(
    firestore_client, results, storage_emulator, monkeypatch
):
    """CONCURRENCY 1: the slot goes to the next claim as a generation ends, so the device does not sit out the
    upload's round trips (a far region's: most of a second a job). A review of that hand-over: while one job's
    upload retried a Storage that was away, the next was generated, and failed too. Now the first failure pauses
    claims, and the job generated meanwhile waits for Storage, then completes with what it generated: the outage
    costs one job, and nothing is generated twice."""
    from listener import storage_outage

    monkeypatch.setattr(storage_outage, "FIRST_PROBE_SECONDS", 0.1)
    monkeypatch.setattr(storage_outage, "LONGEST_PROBE_SECONDS", 0.5)
    generator = StubGenerator()
    store = WorkerJobs(firestore_client, worker_id="w", lease_seconds=30)
    held = HeldUploads(results.client, results.bucket_name, retry=results.retry, emulator_host=storage_emulator.url)
    with started_reconcilers() as start:
        worker = start(CountingReconciler(store, JobRunner(store, generator, held), sweep_interval=0.3))
        keys = [JobKey(f"u{i}", "images", f"away-{i}") for i in range(3)]  # three users: no user's limit in the way
        for key in keys:
            write_job(firestore_client, key)
        try:
            # The second generated while the first's upload waits; it holds its slot (one delivers so already).
            assert wait_until(lambda: len(held.uploading) == 2)
            sweeps = worker.sweeps
            assert wait_until(lambda: worker.sweeps >= sweeps + 3)  # the third offered again and again meanwhile
            assert sorted(generator.calls) == sorted(held.uploading)
            storage_emulator.stop()
            held.gate.set()
            assert wait_until(lambda: any(finished(firestore_client, k) for k in keys), timeout=30)
            sweeps = worker.sweeps
            assert wait_until(lambda: worker.sweeps >= sweeps + 3)
            assert len(generator.calls) == 2 and worker.storage_outage.ongoing
            statuses = {k.file_uid: doc(firestore_client, k)["status"] for k in keys}
            assert sorted(statuses.values()) == ["failed", "processing", "queued"], statuses
        finally:
            storage_emulator.start()
        ends = {k.file_uid: wait_until(lambda k=k: finished(firestore_client, k), timeout=30) for k in keys}
    [first] = [uid for uid, data in ends.items() if data["status"] == "failed"]
    assert (ends[first]["error_type"], statuses[first]) == ("ConnectionError", "failed")
    assert all(data["status"] == "completed" for uid, data in ends.items() if uid != first)
    assert sorted(generator.calls) == sorted(k.file_uid for k in keys)  # the one that waited was not run again


def test_a_later_try_removes_the_images_an_earlier_try_of_more_images_left(firestore_client, results, bucket):
    """A run of 4 images stopped after its upload (its request restated the job to 1 image): the try that
    completes the job removes the 3 extra names, so the bucket holds exactly what the doc lists."""
    from firegen_core.contract import parse_runsync_input
    from firegen_core.jobs import JobStore

    key = JobKey("u1", "images", "fewer")
    write_job(firestore_client, key, num_images_per_prompt=4)
    store = WorkerJobs(firestore_client, worker_id="w1", lease_seconds=30)
    first = store.claim(key)
    results.upload("u1", "fewer", "text2image", [(png_bytes(), "png", "image/png")] * 4)  # the first try's upload
    request = {"prompt": "x", "user_id": "u1", "file_uid": "fewer", "use_cloud_storage": True}
    JobStore(firestore_client).ensure_queued(parse_runsync_input({**request, "num_images_per_prompt": 1}))
    assert JobRunner(store, StubGenerator(), results).run(first) == "lost"
    assert JobRunner(store, StubGenerator(), results).run(store.claim(key)) == "completed"
    assert doc(firestore_client, key)["image_count"] == 1
    assert list(blobs(bucket)) == ["generating/u1/image/fewer.png"]


# ---------------------------------------------------------------------------------------------- awaiting a request
GRACE = 1.5


@pytest.mark.parametrize("metadata", [{}, {"task_type": "text2image"}], ids=["prompt", "task-type"])
def test_a_doc_awaiting_its_parameters_is_left_to_its_runsync_which_runs_it_at_once(
    make_worker, firestore_client, metadata
):
    """The contract's Firebase Function flow: the queued doc with the prompt (and "other metadata", which may name
    the task and the ids), then runsync with the parameters. Run at once, the doc's defaults would be generated (on
    a GPU, finished before the request arrives: then it is refused as "already finished with other parameters", or
    run twice); instead it waits for its request, which runs it."""
    from listener.handler import RunsyncHandler

    generator = StubGenerator()
    worker = make_worker(generator=generator, grace=60)  # a grace no test outlives: only the runsync can start it
    key = JobKey("grace-user", "images", "awaits-params")
    write_job(
        firestore_client, key, **metadata, **({"user_id": key.user_id, "file_uid": key.file_uid} if metadata else {})
    )
    # Heard of, and left queued (were it run at once, the stand-in would have finished it by now).
    wait_until(lambda: worker.is_candidate(key) or doc(firestore_client, key)["status"] != "queued")
    handler = RunsyncHandler(worker.store, worker.submit, preempt=worker.preempt)
    request = {"prompt": "A red sports car", "user_id": key.user_id, "file_uid": key.file_uid, "width": 384}
    answer = handler.handle({**request, "use_cloud_storage": True})
    assert answer["status"] == "accepted", answer
    final = wait_until(lambda: (d := doc(firestore_client, key))["status"] in ("completed", "failed") and d)
    assert (final["status"], final["width"], final["attempts"]) == ("completed", 384, 1)
    assert "restated" not in final and generator.calls == [key.file_uid]  # one run, with the request's width


def test_a_doc_awaiting_its_parameters_runs_with_the_defaults_once_the_grace_ends(make_worker, firestore_client):
    generator = StubGenerator()
    make_worker(generator=generator, grace=GRACE)
    stated, bare = JobKey("grace-user", "images", "states-width"), JobKey("grace-user", "images", "bare")
    written = time.time()
    write_job(firestore_client, bare)
    write_job(firestore_client, stated, width=256)  # states a parameter: the request itself, run at once
    final = wait_until(lambda: (d := doc(firestore_client, bare))["status"] == "completed" and d, timeout=15)
    assert doc(firestore_client, stated)["status"] == "completed"
    assert generator.calls == [stated.file_uid, bare.file_uid]  # the younger doc went first
    claimed = final["lease_expires_at"].timestamp() - 30.0  # the lease is 30 s from its claim
    assert claimed >= written + GRACE - 0.25, f"claimed {claimed - written:.2f} s after it was written"


def test_a_doc_written_before_the_worker_started_waits_the_grace_from_its_start(make_worker, firestore_client):
    """The grace counts from the doc's creation or the worker's start, whichever is later: a cold worker hears of a
    doc long after its creation, and the runsync that woke it comes next. Counted from `created_at` alone, a doc
    written 10 s before the start would run its defaults at once, before its request."""
    from datetime import UTC, datetime, timedelta

    key = JobKey("grace-user", "images", "before-start")
    write_job(firestore_client, key, created_at=datetime.now(UTC) - timedelta(seconds=10))
    started = time.time()
    make_worker(grace=GRACE)
    final = wait_until(lambda: (d := doc(firestore_client, key))["status"] == "completed" and d, timeout=15)
    claimed = final["lease_expires_at"].timestamp() - 30.0  # the lease is 30 s from its claim
    assert claimed >= started + GRACE - 0.25, f"claimed {claimed - started:.2f} s after the worker started"


class HeldUpload:
    """The real ResultStore whose `upload` writes the objects, then returns only once `release()` says so (a big
    video's upload, or its retries, running on): the test decides what happens meanwhile."""

    def __init__(self, results: ResultStore, release):
        self.results, self.release = results, release

    def upload(self, *args, **kwargs):
        urls = self.results.upload(*args, **kwargs)
        assert wait_until(self.release, 20)
        return urls

    def __getattr__(self, name):
        return getattr(self.results, name)


def test_a_job_timed_out_during_its_upload_leaves_no_objects(firestore_client, results, bucket):
    """The day's review: the heartbeat failed the job `Timeout` while its upload ran on; the upload then ended and
    its objects stayed in the bucket, with live download tokens, named by no doc."""
    key = JobKey("u1", "images", "slow-upload")
    write_job(firestore_client, key, num_images_per_prompt=2)
    store = WorkerJobs(firestore_client, worker_id="w1", lease_seconds=30)
    timed_out = lambda: (doc(firestore_client, key) or {}).get("error_type") == "Timeout"  # noqa: E731
    runner = JobRunner(
        store, StubGenerator(), HeldUpload(results, timed_out), renew_interval=0.2, deadline=Deadline(1.0, 0.001)
    )
    assert runner.run(store.claim(key)) == "failed"
    data = doc(firestore_client, key)
    assert (data["status"], data["error_type"], data.get("images")) == ("failed", "Timeout", None)
    assert list(blobs(bucket)) == []


class Failing(StubGenerator):
    def generate(self, request, progress=None):
        raise RuntimeError("boom")


def test_a_try_restated_during_its_upload_leaves_no_objects(firestore_client, results, bucket):
    """An accounting fuzz: a try restated during its upload left its objects for the next try to write over; that
    try failed in the generator, and the failed job's objects stayed in the bucket, named by no doc. A storage
    review: so did they where the next try asked for fewer images, or the job was cancelled before it ran again.
    No doc will name what a try restated wrote (a later try writes its own): it goes at once."""
    from firegen_core.contract import parse_runsync_input
    from firegen_core.jobs import JobStore

    key = JobKey("u1", "images", "orphan")
    fields = {"prompt": "a red car", "user_id": "u1", "file_uid": "orphan", "use_cloud_storage": True}
    JobStore(firestore_client).ensure_queued(parse_runsync_input({**fields, "num_images_per_prompt": 3}))
    store = WorkerJobs(firestore_client, worker_id="w1", lease_seconds=30)

    class RestatedDuringUpload(HeldUpload):  # to one image: the earlier try's 3 are more than this one asks
        def upload(self, *args, **kwargs):
            urls = self.results.upload(*args, **kwargs)
            JobStore(firestore_client).ensure_queued(parse_runsync_input({**fields, "num_images_per_prompt": 1}))
            return urls

    assert JobRunner(store, StubGenerator(), RestatedDuringUpload(results, None)).run(store.claim(key)) == "lost"
    assert list(blobs(bucket)) == []
    assert doc(firestore_client, key)["status"] == "queued"
    assert JobRunner(store, Failing(), results).run(store.claim(key)) == "failed"
    assert doc(firestore_client, key)["error_type"] == "RuntimeError"
    assert list(blobs(bucket)) == []


def test_a_stalled_try_superseded_during_its_upload_leaves_none_of_its_objects(firestore_client, results, bucket):
    """A storage review: a try that stalled before its upload of 3 images, while its request restated the job to
    one image and another worker completed it, met the later try's object at image 0 (`Superseded`) and wrote
    images 1 and 2 all the same (its files go up at once): left in the bucket, named by no doc."""
    from firegen_core.contract import parse_runsync_input
    from firegen_core.jobs import JobStore

    key = JobKey("u1", "images", "superseded")
    fields = {"prompt": "a red car", "user_id": "u1", "file_uid": key.file_uid, "use_cloud_storage": True}
    JobStore(firestore_client).ensure_queued(parse_runsync_input({**fields, "num_images_per_prompt": 3}))
    stalled = WorkerJobs(firestore_client, worker_id="w1", lease_seconds=30)
    other = WorkerJobs(firestore_client, worker_id="w2", lease_seconds=30)

    class OvertakenBeforeUpload(HeldUpload):
        def upload(self, *args, **kwargs):
            JobStore(firestore_client).ensure_queued(parse_runsync_input({**fields, "num_images_per_prompt": 1}))
            assert JobRunner(other, StubGenerator(), self.results).run(other.claim(key)) == "completed"
            return self.results.upload(*args, **kwargs)

    assert JobRunner(stalled, StubGenerator(), OvertakenBeforeUpload(results, None)).run(stalled.claim(key)) == "lost"
    completed = doc(firestore_client, key)
    assert (completed["status"], completed["image_count"]) == ("completed", 1)
    assert list(blobs(bucket)) == ["generating/u1/image/superseded.png"]


@pytest.mark.parametrize("end", ["cancelled", "timed out"])
def test_a_later_try_ending_removes_what_an_earlier_try_left(firestore_client, results, bucket, end):
    """A storage review: a worker that died during its upload of 3 images left them, and the job's next try (its
    request restated to one image), cancelled by its owner or past its deadline, deleted only its own one: two
    stayed, named by no doc."""
    from firegen_core.contract import parse_runsync_input
    from firegen_core.jobs import JobStore
    from listener.storage import claim_stamp

    key = JobKey("u1", "images", f"left-{end[0]}")
    fields = {"prompt": "a red car", "user_id": "u1", "file_uid": key.file_uid, "use_cloud_storage": True}
    JobStore(firestore_client).ensure_queued(parse_runsync_input({**fields, "num_images_per_prompt": 3}))
    store = WorkerJobs(firestore_client, worker_id="w1", lease_seconds=30)
    dead = store.claim(key)
    files = [(png_bytes(), "png", "image/png")] * 3
    results.upload("u1", key.file_uid, "text2image", files, claim=claim_stamp(dead.claimed_at))  # then it died
    JobStore(firestore_client).ensure_queued(parse_runsync_input({**fields, "num_images_per_prompt": 1}))
    assert doc(firestore_client, key)["status"] == "queued" and len(blobs(bucket)) == 3
    later = store.claim(key)
    assert later is not None and later.lease.attempt > 1
    cancel = threading.Event()
    if end == "cancelled":
        cancel.set()
        runner = JobRunner(store, StubGenerator(), results)
    else:
        gate = threading.Event()  # never set: its generation runs on until its deadline stops it
        runner = JobRunner(store, StubGenerator(gate), results, renew_interval=0.2, deadline=Deadline(1.0, 0.001))
    assert runner.run(later, cancel) == "failed"
    assert doc(firestore_client, key)["error_type"] == ("Cancelled" if end == "cancelled" else "Timeout")
    assert list(blobs(bucket)) == []


def test_a_job_whose_upload_failed_part_way_leaves_no_objects(firestore_client, results, bucket):
    """A job's files go up at once: one refused while the others were written failed the job with them in the
    bucket, named by no doc."""
    from listener.storage import StorageError

    key = JobKey("u1", "images", "half-uploaded")
    write_job(firestore_client, key, num_images_per_prompt=2)
    store = WorkerJobs(firestore_client, worker_id="w1", lease_seconds=30)

    class FirstOnly(HeldUpload):
        def upload(self, user_id, file_uid, task_type, files, **kwargs):
            self.results.upload(user_id, file_uid, task_type, files[:1], **kwargs)
            raise StorageError("Storage upload of the second image failed (400 Bad Request)")

    assert JobRunner(store, StubGenerator(), FirstOnly(results, None)).run(store.claim(key)) == "failed"
    assert doc(firestore_client, key)["error_type"] == "ConnectionError"  # the contract's type of a storage failure
    assert list(blobs(bucket)) == []


class Recording(WorkerJobs):
    """The job store, noting whether a renewal or a release came once `leaving` was set."""

    def __init__(self, *args, leaving: threading.Event, **kwargs):
        super().__init__(*args, **kwargs)
        self.leaving, self.renewed, self.released = leaving, threading.Event(), threading.Event()

    def renew(self, job, progress=None):
        if self.leaving.is_set():
            self.renewed.set()
        return super().renew(job, progress=progress)

    def release(self, job):
        self.released.set()
        return super().release(job)


def test_a_job_uploading_as_the_worker_leaves_delivers_rather_than_runs_again(firestore_client, results, bucket):
    """The GPU-waste review: the grace's end released a job whose generation was done and whose upload was under
    way, and it ran again in full on another worker (a video: 70 s of an H100). Generated, it delivers: its lease
    is renewed meanwhile, and it completes."""
    key = JobKey("u1", "images", "delivering")
    write_job(firestore_client, key)
    leaving = threading.Event()
    store = Recording(firestore_client, worker_id="w1", lease_seconds=30, leaving=leaving)
    upload = HeldUpload(results, lambda: store.renewed.is_set() or store.released.is_set())
    runner = JobRunner(store, StubGenerator(), upload, renew_interval=0.2)
    outcome: list = []
    running = threading.Thread(target=lambda: outcome.append(runner.run(store.claim(key))), daemon=True)
    running.start()
    wait_until(lambda: list(blobs(bucket)), timeout=15)  # generated; its upload held
    leaving.set()
    runner.release_running()  # the shutdown grace is over
    running.join(30)
    assert outcome == ["completed"] and not store.released.is_set()
    assert doc(firestore_client, key)["status"] == "completed"


class SlowCompletion(WorkerJobs):
    """`complete` held up by Firestore (a blip, as BlippingStore's) until `past` says the job's deadline is over."""

    def __init__(self, *args, past, **kwargs):
        super().__init__(*args, **kwargs)
        self.past, self.blips = past, 0

    def complete(self, job, fields):
        if not self.past():
            self.blips += 1
            from google.api_core.exceptions import ServiceUnavailable

            raise ServiceUnavailable("failed to connect to all addresses")
        return super().complete(job, fields)


def test_a_job_whose_final_write_is_under_way_at_its_deadline_completes(firestore_client, results, bucket):
    """Its results are stored; only a Firestore blip holds its completion up past the deadline: the heartbeat
    leaves it to `complete` (it failed the job `Timeout`, and the stored objects were named by no doc)."""
    key = JobKey("u1", "images", "late-write")
    write_job(firestore_client, key)
    ends = time.monotonic() + 3.0 + 0.2 + 0.5  # the deadline's floor, one beat, and some
    store = SlowCompletion(firestore_client, worker_id="w1", lease_seconds=30, past=lambda: time.monotonic() > ends)
    runner = JobRunner(store, StubGenerator(), results, renew_interval=0.2, deadline=Deadline(3.0, 0.001))
    assert runner.run(store.claim(key)) == "completed"
    data = doc(firestore_client, key)
    assert (data["status"], data["images"] and len(data["images"]), store.blips > 0) == ("completed", 1, True)
    assert list(blobs(bucket)) == ["generating/u1/image/late-write.png"]


class BatchStub(StubGenerator):
    """Two jobs at once; `during(requests)` runs as the batch's generation ends (after its last step)."""

    def __init__(self, during=lambda requests: None):
        super().__init__()
        self.during = during

    def generate_batch(self, requests, progress=None):
        for report in progress or []:
            report(0.5)
        outputs = [self.generate(request) for request in requests]
        self.during(requests)
        return outputs


def test_a_batch_takes_no_more_of_a_users_jobs_than_their_running_ones_here_leave(firestore_client, results):
    """A review: a batch counted USER_MAX_RUNNING from none, not from the user's jobs running here, and its last
    claim was refused (a transaction for nothing; that job then waited for the user's newer ones)."""
    gate = threading.Event()

    class FirstHeld(BatchStub):
        def generate(self, request, progress=None):
            if request.file_uid == "b-0":
                self.started.set()
                assert gate.wait(60)
            return super().generate(request, progress)

    generator = FirstHeld()
    store = RefusalsCounted(firestore_client, worker_id="w", lease_seconds=30, limits=Limits(max_running=2))
    reconciler = Reconciler(
        store, JobRunner(store, generator, results), concurrency=2, batch_max=4, batch_key=lambda r: r.width
    )
    for n in range(4):  # the oldest alone in its batch, the three others in one: all there at the first claim
        write_job(firestore_client, JobKey("u1", "images", f"b-{n}"), width=512 if n == 0 else 768)
    with started_reconcilers() as start:
        start(reconciler)
        assert generator.started.wait(15)
        try:
            assert wait_until(lambda: "b-1" in generator.calls)  # one more of the user's beside b-0: the limit's 2
        finally:
            gate.set()
        keys = [JobKey("u1", "images", f"b-{n}") for n in range(4)]
        assert all(wait_until(lambda k=k: finished(firestore_client, k))["status"] == "completed" for k in keys)
    assert store.refused == 0


class CountingFails(WorkerJobs):
    def __init__(self, *args, failing=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fails: list[tuple[str, bool]] = []
        self.failing = failing  # an error the first `fail` of this file_uid raises

    def fail(self, job, error, **kwargs):
        if self.failing and self.failing[0] == job.key.file_uid:
            _, exc = self.failing
            self.failing = None
            raise exc
        failed = super().fail(job, error, **kwargs)
        self.fails.append((job.key.file_uid, failed))
        return failed


def test_a_batched_job_cancelled_as_its_generation_ends_is_failed_once(firestore_client, results, bucket):
    """The day's review: its delivery's stop check also started the batch's early-end thread, so two threads
    wrote its end (one fenced off, logged a false `job_lost`, and the run was reported lost)."""
    keys = [JobKey("u1", "images", name) for name in ("kept", "cancelled")]
    for key in keys:
        write_job(firestore_client, key)
    store = CountingFails(firestore_client, worker_id="w1", lease_seconds=30)
    cancel = threading.Event()
    runner = JobRunner(store, BatchStub(during=lambda requests: cancel.set()), results)
    outcomes = runner.run_batch([(store.claim(keys[0]), None), (store.claim(keys[1]), cancel)])
    assert outcomes == ["completed", "failed"]
    assert store.fails == [("cancelled", True)]
    assert doc(firestore_client, keys[1])["error_type"] == "Cancelled"
    assert list(blobs(bucket)) == ["generating/u1/image/kept.png"]


@pytest.mark.parametrize("transient", [True, False])
def test_a_failure_that_cannot_be_written_at_once_leaves_the_batchs_other_jobs_delivered(
    firestore_client, results, bucket, transient
):
    """The review: a job's `fail` was not retried like the final writes, and its error left the delivery loop,
    so the batch's later jobs were neither uploaded nor completed (run again after their leases, GPU paid twice)."""
    from google.api_core.exceptions import PermissionDenied, ServiceUnavailable

    keys = [JobKey("u1", "images", name) for name in ("bad", "good")]
    for key in keys:
        write_job(firestore_client, key)
    error = ServiceUnavailable("failed to connect") if transient else PermissionDenied("no")
    store = CountingFails(firestore_client, worker_id="w1", lease_seconds=30, failing=("bad", error))
    cancel = threading.Event()
    runner = JobRunner(store, BatchStub(during=lambda requests: cancel.set()), results)
    outcomes = runner.run_batch([(store.claim(keys[0]), cancel), (store.claim(keys[1]), None)])
    # A transient error is retried (the job ends `Cancelled`); another leaves that job to its lease.
    assert outcomes == (["failed", "completed"] if transient else ["lost", "completed"])
    assert doc(firestore_client, keys[0])["status"] == ("failed" if transient else "processing")
    assert doc(firestore_client, keys[1])["status"] == "completed"
    assert "generating/u1/image/good.png" in blobs(bucket)


class SkewedClock:
    """This host's clock `skew` seconds off Firestore's, for the reconciler's modules only (`time` and `datetime`;
    the emulator and the test keep the real one): a stand-in for a RunPod host whose clock is minutes off, which
    no test can set (libfaketime breaks Python's sleeps)."""

    def __init__(self, skew: float):
        self.skew = skew

    def time(self) -> float:
        return time.time() + self.skew

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture
def skewed(monkeypatch):
    import listener.fairqueue as fairqueue
    import listener.reconciler as module

    def skew(seconds: float) -> None:
        from datetime import datetime, timedelta

        class Skewed(type):  # `datetime` itself but for `now`: isinstance and the rest as before
            def __instancecheck__(cls, value):
                return isinstance(value, datetime)

            def __getattr__(cls, name):
                return getattr(datetime, name)

        class SkewedDatetime(metaclass=Skewed):
            @staticmethod
            def now(tz=None):
                return datetime.now(tz) + timedelta(seconds=seconds)

        monkeypatch.setattr(module, "time", SkewedClock(seconds))
        monkeypatch.setattr(module, "datetime", SkewedDatetime)
        monkeypatch.setattr(fairqueue, "time", SkewedClock(seconds))

    return skew


def test_a_worker_whose_clock_is_slow_takes_a_dead_workers_job_over_when_its_lease_ends(
    make_worker, firestore_client, skewed
):
    """Audit: with its host 5 minutes slow, the only live worker took a dead worker's job over 301 s past its
    lease: the sweep asked for leases expired before its own clock's now."""
    key = JobKey("u1", "images", "orphan")
    write_job(firestore_client, key)
    dead = WorkerJobs(firestore_client, worker_id="dead", lease_seconds=1.0)
    assert dead.claim(key) is not None  # and never renewed: its worker is gone
    skewed(-300)
    make_worker("slow", sweep=0.3, grace=1.0)
    data = wait_until(lambda: finished(firestore_client, key), timeout=15)
    assert (data["status"], data["attempts"], data["worker_id"]) == ("completed", 2, "slow")
    # A prompt-only doc (awaiting its runsync) runs once its grace is over, not once this host's clock says so.
    placeholder = JobKey("u1", "images", "placeholder")
    firestore_client.document(placeholder.path).set(
        {"status": "queued", "created_at": SERVER_TIMESTAMP, "prompt": "A red sports car"}
    )
    assert wait_until(lambda: finished(firestore_client, placeholder), timeout=15)["status"] == "completed"


def test_a_placeholder_runs_after_its_grace_when_the_hosts_clock_was_stepped_back_after_start(
    make_worker, firestore_client, skewed
):
    """The clock review: the grace's start was this host's wall clock at start, read later through the clock's
    new measure: a clock stepped 10 minutes back after start (NTP, a resumed VM) held prompt-only docs 10 minutes
    past their grace."""
    worker = make_worker("stepped", sweep=0.3, grace=1.0)
    skewed(-600)
    worker.beat()  # the new measure: Firestore's clock 600 s ahead of this host's
    placeholder = JobKey("u1", "images", "stepped-placeholder")
    firestore_client.document(placeholder.path).set(
        {"status": "queued", "created_at": SERVER_TIMESTAMP, "prompt": "A red sports car"}
    )
    assert wait_until(lambda: finished(firestore_client, placeholder), timeout=15)["status"] == "completed"
    started = firestore_client.document(f"{workers.WORKERS}/stepped").get().to_dict()["started_at"]
    assert abs(time.time() - started.timestamp()) < 60  # its start as it was, not 10 minutes later


def test_a_processing_doc_whose_lease_no_query_can_compare_is_found_and_run(make_worker, firestore_client, monkeypatch):
    """An admin's `processing` doc with no lease, or a lease that is not a date, is claimable but was never found:
    the sweep's expiry query compares dates. A scan pages through the processing docs (here a page of one, each
    sweep), past one whose lease is live."""
    import listener.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "SWEEP_LIMIT", 1)
    monkeypatch.setattr(sweep_module, "UNLEASED_SCAN_SECONDS", 0.0)
    alive = JobKey("u1", "images", "a-held")  # first in document order, held by a live worker
    write_job(firestore_client, alive)
    assert WorkerJobs(firestore_client, worker_id="alive", lease_seconds=600).claim(alive) is not None
    missing, unreadable = JobKey("u1", "images", "b-missing"), JobKey("u2", "videos", "c-unreadable")
    write_job(firestore_client, missing, status="processing", worker_id="gone", attempts=1)
    write_job(firestore_client, unreadable, status="processing", worker_id="gone", attempts=1, numFrames=17)
    firestore_client.document(unreadable.path).update({"lease_expires_at": "tomorrow"})
    make_worker("sweeper", sweep=0.2)
    for key in (missing, unreadable):
        data = wait_until(lambda key=key: finished(firestore_client, key), timeout=20)
        assert (data["status"], data["worker_id"], data["attempts"]) == ("completed", "sweeper", 2)
    assert doc(firestore_client, alive)["worker_id"] == "alive"


def test_a_queued_doc_without_created_at_behind_a_page_of_dated_ones_is_found_and_run(
    make_worker, firestore_client, monkeypatch
):
    """A scale review: a sweep read the first page of queued docs in document order for those no ordered query
    finds (no `created_at`), every sweep, and never a second page: behind 50 dated docs (here: 3) one sorting
    after them waited for good, and each sweep paid for the page. The scan pages on, as the processing one does."""
    import listener.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "SWEEP_LIMIT", 3)
    monkeypatch.setattr(sweep_module, "UNLEASED_SCAN_SECONDS", 0.0)
    for n in range(4):  # prompt-only docs (the contract's function flow), held queued by the placeholder grace
        write_job(firestore_client, JobKey(f"a{n}", "images", "dated"))
    undated = JobKey("zz", "images", "undated")
    write_job(firestore_client, undated, width=256)
    firestore_client.document(undated.path).update({"created_at": DELETE_FIELD})
    make_worker("sweeper", sweep=0.2, grace=600.0)
    data = wait_until(lambda: finished(firestore_client, undated), timeout=30)
    assert (data["status"], data["worker_id"]) == ("completed", "sweeper")


def test_a_queued_doc_without_created_at_is_found_by_the_count_between_scheduled_scans(
    make_worker, firestore_client, monkeypatch
):
    """Between the scan's 5-minute rounds, a sweep counts the queued docs (one read) and reads a page where more are
    queued than the listeners hold: an undated doc written after the worker's first scan runs within sweeps."""
    import listener.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "UNLEASED_SCAN_SECONDS", 3600.0)
    worker = make_worker("counter", sweep=0.2)
    wait_until(lambda: worker.sweeps >= 3)  # its start's scan is behind it
    undated = JobKey("u1", "images", "undated-later")
    firestore_client.document(undated.path).set({"status": "queued", "prompt": "an admin's doc", "width": 256})
    assert wait_until(lambda: finished(firestore_client, undated), timeout=20)["status"] == "completed"


def test_a_scan_that_found_some_reads_its_next_page_at_the_next_sweep(make_worker, firestore_client, monkeypatch):
    """An admin's import of lease-less `processing` docs runs at the queue's pace: a scan that found some reads its
    next page at the next sweep, not UNLEASED_SCAN_SECONDS later (a mutation review: a fixed cadence went
    unseen; the other scan tests set it to 0)."""
    import listener.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "SWEEP_LIMIT", 1)
    monkeypatch.setattr(sweep_module, "UNLEASED_SCAN_SECONDS", 3600.0)
    imported = [JobKey("u1", "images", f"imported-{n}") for n in range(3)]
    for key in imported:
        write_job(firestore_client, key, status="processing", worker_id="gone", attempts=1)
    make_worker("sweeper", sweep=0.2)
    for key in imported:
        data = wait_until(lambda key=key: finished(firestore_client, key), timeout=20)
        assert (data["status"], data["worker_id"]) == ("completed", "sweeper")


def test_a_dead_workers_job_runs_before_its_users_jobs_queued_since(make_worker, firestore_client, monkeypatch):
    """The sweep offers a job whose lease ran out first in line: its user has waited for it since it was first
    claimed. A mutation review: offered as an ordinary candidate, by its `created_at` (here its user's newest), it
    ran after its user's queued docs, and no test saw it."""
    import listener.reconciler as reconciler_module

    monkeypatch.setattr(reconciler_module, "FIRST_SWEEP_WAIT", 60.0)  # a slow first sweep is still waited for
    queued = [JobKey("u1", "images", f"queued-{n}") for n in range(2)]
    dead = JobKey("u1", "images", "left-by-the-dead")
    for key in [*queued, dead]:
        write_job(firestore_client, key)
    assert WorkerJobs(firestore_client, worker_id="gone", lease_seconds=30).claim(dead) is not None
    firestore_client.document(dead.path).update({"lease_expires_at": SERVER_TIMESTAMP})  # its owner died
    generator = StubGenerator()
    make_worker("heir", generator, sweep=0.3)
    for key in [*queued, dead]:
        assert wait_until(lambda key=key: finished(firestore_client, key), timeout=20)["status"] == "completed"
    assert generator.calls[0] == dead.file_uid, generator.calls


def test_one_docs_surprise_does_not_stop_the_sweep_of_the_others(
    make_worker, firestore_client, reconciler_logs, monkeypatch
):
    """A doc the reconciler cannot take in (a bug, a doc of a shape nobody foresaw) is said and passed over: the
    sweep goes on to the next, here a dead worker's job that only the sweep finds (no listener hears of
    `processing` docs)."""
    original = Reconciler._found

    def found(self, key, snapshot, doc, expired=False):
        if key.file_uid == "surprising":
            raise RuntimeError("a doc nobody foresaw")
        return original(self, key, snapshot, doc, expired)

    monkeypatch.setattr(Reconciler, "_found", found)
    surprising, other = JobKey("u1", "images", "surprising"), JobKey("u2", "images", "other")
    for key in (surprising, other):  # in this order by their leases: the expiry query reads the surprise first
        write_job(firestore_client, key)
        assert WorkerJobs(firestore_client, worker_id="gone", lease_seconds=30).claim(key) is not None
        firestore_client.document(key.path).update({"lease_expires_at": SERVER_TIMESTAMP})
    make_worker("sweeper", sweep=0.2)
    data = wait_until(lambda: finished(firestore_client, other), timeout=20)
    assert (data["status"], data["worker_id"]) == ("completed", "sweeper")
    said = [e for e in reconciler_logs if e["event"] == "sweep_error" and e.get("path") == surprising.path]
    assert said and said[0]["log_level"] == "warning" and "nobody foresaw" in said[0]["error"]
    assert doc(firestore_client, surprising)["worker_id"] == "gone"


def test_a_worker_whose_clock_is_fast_still_leaves_a_placeholder_its_grace(make_worker, firestore_client, skewed):
    """Audit: with its host 5 minutes fast, a worker ran a prompt-only doc (the contract's function flow) at once,
    before its runsync brought the parameters: the defaults ran, then the job again (charged both)."""
    skewed(300)
    worker = make_worker("fast", sweep=0.3, grace=2.0)
    wait_until(lambda: worker.sweeps >= 8)  # up for a while (its grace is counted from its start too)
    key = JobKey("u1", "images", "placeholder")
    firestore_client.document(key.path).set(
        {"status": "queued", "created_at": SERVER_TIMESTAMP, "prompt": "A red sports car"}
    )
    data = wait_until(lambda: finished(firestore_client, key), timeout=15)
    waited = (data["started_at"] - data["created_at"]).total_seconds()
    # The worker knows the server's clock to within half a heartbeat's round trip (a few ms here, up to 0.5 s as
    # CLOCK_SAMPLE_MAX_SECONDS lets it under load; the bug ran it at once).
    assert data["status"] == "completed" and 1.5 <= waited < 6.0, waited


class SlowHeartbeatFail(WorkerJobs):
    """`fail` from the heartbeat thread lasts until `released` (Firestore slow: its own retries run up to 15 s),
    past the runner's join of the heartbeat however long that join waits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.released = threading.Event()

    def fail(self, job, error, **kwargs):
        if threading.current_thread().name.startswith("heartbeat-"):
            assert self.released.wait(60)
        return super().fail(job, error, **kwargs)


def upload_past_the_deadline(store: WorkerJobs, results) -> tuple[WorkerJobs, JobRunner]:
    """A runner whose job's upload ends past its hard deadline (1.0 s and one 0.2 s beat)."""
    t0 = time.monotonic()
    upload = HeldUpload(results, lambda: time.monotonic() > t0 + 2.5)
    return store, JobRunner(store, StubGenerator(), upload, renew_interval=0.2, deadline=Deadline(1.0, 0.001))


def test_a_timeout_whose_failure_outlasts_the_heartbeats_join_still_leaves_no_objects(
    firestore_client, results, bucket, runner_logs
):
    """The day's review: the clean-up after a `Timeout` during the upload read the heartbeat's verdict after a 5 s
    join, so a slow Firestore (when timeouts cluster) left the objects, with live download tokens."""
    key = JobKey("u1", "images", "slow-fail")
    write_job(firestore_client, key, num_images_per_prompt=2)
    store, runner = upload_past_the_deadline(
        SlowHeartbeatFail(firestore_client, worker_id="w1", lease_seconds=30), results
    )
    logs = runner_logs
    assert runner.run(store.claim(key)) == "failed"  # while the heartbeat's `fail` still waits
    store.released.set()
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("heartbeat-")], 20)
    data = doc(firestore_client, key)
    assert (data["status"], data["error_type"], data.get("images")) == ("failed", "Timeout", None)
    assert list(blobs(bucket)) == []
    # Its end logged once, by whichever wrote first; the heartbeat's write landing later says nothing (the
    # re-review: it logged `job_timeout_forced`, "could not write", with failed=True).
    ends = [(e["event"], e.get("by")) for e in logs if e["event"] in ("job_failed", "job_timeout_forced")]
    assert ends == [("job_failed", "runner")], ends


def test_a_timeout_settled_after_the_upload_is_logged(firestore_client, results, bucket, runner_logs):
    """The re-review: the heartbeat's `Timeout` write failed (a blip) while the upload ran on; the runner wrote it
    once the upload ended, and logged no `job_failed`."""
    key = JobKey("u1", "images", "upload-blip")
    write_job(firestore_client, key)
    store, runner = upload_past_the_deadline(
        HeartbeatFailErrors(firestore_client, worker_id="w1", lease_seconds=30), results
    )
    logs = runner_logs
    assert runner.run(store.claim(key)) == "failed"
    assert doc(firestore_client, key)["error_type"] == "Timeout" and list(blobs(bucket)) == []
    failed = [(e["error_type"], e["by"], e["task_type"], e["seconds"] > 0) for e in logs if e["event"] == "job_failed"]
    assert failed == [("Timeout", "runner", "text2image", True)], failed


def test_a_slow_heartbeat_does_not_measure_the_clock(make_worker, monkeypatch):
    """The day's review: a heartbeat whose write was retried lands near the end of the call, and the midpoint
    read the clock seconds off (placeholders then ran early). Only a quick write measures it."""
    from datetime import UTC, datetime, timedelta

    import listener.reconciler as module

    worker = make_worker("clock", sweep=30)
    wait_until(lambda: worker.sweeps >= 1)  # its own first heartbeat (on the sweep thread) is behind it
    lands = {"after": 0.0, "skew": 0.0}

    def beat(*args, **kwargs):
        time.sleep(lands["after"])
        return datetime.now(UTC) + timedelta(seconds=lands["skew"])

    monkeypatch.setattr(module.workers, "beat", beat)
    lands.update(after=0.0, skew=300.0)
    worker.beat()
    assert 299 < worker.server_time() - time.time() < 301  # a quick write: Firestore is 5 minutes ahead
    lands.update(after=1.5, skew=0.0)
    worker.beat()
    assert 299 < worker.server_time() - time.time() < 301  # a slow one says nothing


class HeartbeatFailErrors(WorkerJobs):
    """The heartbeat's `Timeout` write fails (a Firestore blip at the deadline); the runner's own calls go through."""

    def fail(self, job, error, **kwargs):
        if threading.current_thread().name.startswith("heartbeat-"):
            from google.api_core.exceptions import ServiceUnavailable

            raise ServiceUnavailable("blip at the deadline")
        return super().fail(job, error, **kwargs)


class SlowStep(StubGenerator):
    def generate(self, request, progress=None):
        time.sleep(2.0)  # one step past the hard deadline (1.0 s and one 0.2 s beat)
        return super().generate(request, progress)


def test_a_timeout_whose_heartbeat_write_failed_is_written_when_the_step_comes_back(
    firestore_client, results, runner_logs
):
    """A re-review: the step came back (Interrupted) after the heartbeat's `Timeout` write had failed, and nothing
    was written: the doc stayed `processing` until its lease ran out, then ran again (a whole deadline of GPU)."""
    key = JobKey("u1", "images", "blip-timeout")
    write_job(firestore_client, key)
    store = HeartbeatFailErrors(firestore_client, worker_id="w1", lease_seconds=30)
    runner = JobRunner(store, SlowStep(), results, renew_interval=0.2, deadline=Deadline(1.0, 0.001))
    logs = runner_logs  # every thread's (structlog's global config)
    assert runner.run(store.claim(key)) == "failed"
    data = doc(firestore_client, key)
    assert (data["status"], data["error_type"]) == ("failed", "Timeout")
    # Its end is a `job_failed` like any other, logged once (the day's review: only `job_timeout_forced`).
    failed = [e for e in logs if e["event"] == "job_failed"]
    assert [(e["error_type"], e["by"], e["log_level"]) for e in failed] == [("Timeout", "runner", "warning")]
    assert failed[0]["task_type"] == "text2image" and failed[0]["seconds"] >= 1.0  # its deadline
    # The heartbeat's failed write names the job too (the re-check: `write_error` named none).
    write_errors = [e for e in logs if e["event"] == "write_error"]
    assert write_errors and all(e["file_uid"] == "blip-timeout" for e in write_errors)


class CountingRenewals:
    """A store for the heartbeat alone: counts renewals."""

    def __init__(self):
        self.renewals = 0

    def renew(self, job, progress=None):
        self.renewals += 1
        return Renewal(held=True)  # what WorkerJobs.renew answers (a bare True raised in the heartbeat's thread)


def test_a_heartbeat_past_its_deadline_while_the_completion_is_written_renews_at_its_pace():
    """A re-review: past the hard deadline with the completion under way, the heartbeat renewed every 10 ms (129
    renewals in 2 s, each a read and a write that also collides with the completion's own)."""
    from listener.lease import Heartbeat

    store = CountingRenewals()
    job = SimpleNamespace(key=JobKey("u1", "images", "late"), lease=None, doc={})
    # Its completion under way from the start: set after, a loaded machine's heartbeat thread met the deadline first
    # (a CI run: it failed the job itself, on a store that has no `fail`).
    finishing = threading.Event()
    finishing.set()
    past = time.monotonic() - 1
    heartbeat = Heartbeat(store, job, interval=0.5, hard_deadline=past, overrun=object(), finishing=finishing)
    heartbeat.wake()
    started = time.monotonic()
    wait_until(lambda: time.monotonic() - started > 1.2, timeout=5)  # the interval's pace: nothing to wait for
    heartbeat.stop()
    assert 1 <= store.renewals <= 4, store.renewals


def test_docs_an_admin_wrote_with_unreadable_fields_neither_wedge_nor_stop_the_worker(make_worker, firestore_client):
    """Audit (an operator's view): a doc written by a server with `created_at: "yesterday"` raised in the
    listener's callback, which ended the listener's thread (no restart, no line naming the doc), then in every
    sweep; one with `attempts: "abc"` made every claim of it fail, once a sweep, for ever. Unreadable dates and
    counts read as none: both run, and the listeners go on hearing new docs (the sweep is 30 s away here)."""
    worker = make_worker(sweep=30)
    odd = {
        JobKey("u1", "images", "odd-created"): {"created_at": "yesterday"},
        JobKey("u1", "images", "odd-attempts"): {"attempts": "abc"},
    }
    for key, fields in odd.items():
        write_job(firestore_client, key, **fields)
    after = JobKey("u3", "images", "after")
    write_job(firestore_client, after)
    assert wait_until(lambda: finished(firestore_client, after))["status"] == "completed"
    for key in odd:
        data = wait_until(lambda key=key: finished(firestore_client, key))
        assert (data["status"], data["attempts"]) == ("completed", 1), key
    # A usage doc an admin edited: the backlog look-up reads its counts as none (the day's review: every sweep
    # raised, and the users after it were never looked up).
    firestore_client.document("usage/u-odd").set({"pending": 3, "running": "abc"})
    worker.sweep()


def test_a_refused_request_fails_its_placeholder_a_worker_already_runs(firestore_client):
    """The contract's function flow, its runsync late (a cold start) past the grace: a worker runs the placeholder's
    defaults, then the request is refused. The handler left the running doc alone; the contract's function then
    failed it with a write of its own, past the usage counts: `running` counted for ever (two such, and the user's
    jobs never start at USER_MAX_RUNNING). The refusal fails it, and the running run is fenced off."""
    from listener.handler import RunsyncHandler

    key = JobKey("u-late", "images", "late-refused")
    write_job(firestore_client, key)  # the prompt alone
    store = WorkerJobs(firestore_client, worker_id="w1", lease_seconds=30)
    job = store.claim(key)
    assert job is not None and doc(firestore_client, key)["status"] == "processing"
    stopped: list = []
    handler = RunsyncHandler(
        WorkerJobs(firestore_client, worker_id="w2"), lambda *args: None, preempt=lambda *args: stopped.append(args)
    )
    data = {"prompt": "A red sports car", "user_id": "u-late", "file_uid": "late-refused", "use_cloud_storage": True}
    assert handler.handle({**data, "width": 2048}) == {
        "status": "failed",
        "error": "width must be between 256 and 1024",
    }
    assert stopped == [(key, job.lease)]  # a run on this worker stops now (the last review), elsewhere at its renewal
    data = doc(firestore_client, key)
    assert (data["status"], data["error_type"]) == ("failed", "ValidationError")
    usage = firestore_client.document("usage/u-late").get().to_dict()
    assert (usage["pending"], usage["running"]) == (0, 0)
    assert not store.renew(job)  # the run that took it is fenced off


def test_a_runsyncs_request_id_is_kept_only_while_its_job_may_be_claimed_here(make_worker, firestore_client):
    """The RunPod job id a runsync brought is kept until the job's claim logs it: one kept for a job cancelled
    while queued, claimed elsewhere, or already running here stayed until the bound of 1,000 (a soak audit: 43 after
    3,134 jobs, 93 once 50 queued runsync jobs were cancelled)."""
    gate = threading.Event()
    worker = make_worker(generator=StubGenerator(gate))
    running = JobKey("u1", "images", "running")
    write_job(firestore_client, running)
    wait_until(lambda: (doc(firestore_client, running) or {}).get("status") == "processing")
    worker.submit(running, request_id="rp-running")  # its request, a moment after a listener claimed it
    cancelled = JobKey("u2", "images", "cancelled")
    write_job(firestore_client, cancelled)
    worker.submit(cancelled, request_id="rp-cancelled")
    elsewhere = JobKey("u3", "images", "elsewhere")
    write_job(firestore_client, elsewhere)
    other = WorkerJobs(firestore_client, worker_id="w2").claim(elsewhere)
    assert other is not None
    worker.submit(elsewhere, request_id="rp-elsewhere")
    firestore_client.document(cancelled.path).update({"cancel_requested": True})
    wait_until(lambda: (doc(firestore_client, cancelled) or {}).get("status") == "failed")
    gate.set()
    wait_until(lambda: (doc(firestore_client, running) or {}).get("status") == "completed")
    # The last candidate, elsewhere's, ends with its claim (w2 holds it): none is left.
    wait_until(lambda: not worker.candidates and not worker.busy)
    assert dict(worker._request_ids) == {}


class FirestoreAwayForFencedCalls(WorkerJobs):
    """Firestore away for every fenced call (the fence check, renewals, completion, failure) until `back`: a
    stand-in, as BlippingStore is."""

    def __init__(self, *args, back: float = float("inf"), **kwargs):
        super().__init__(*args, **kwargs)
        self.back = back

    def _away(self):
        if time.monotonic() < self.back:
            from google.api_core.exceptions import ServiceUnavailable

            raise ServiceUnavailable("failed to connect to all addresses")

    def holds(self, job):
        self._away()
        return super().holds(job)

    def renew(self, job, progress=None):
        self._away()
        return super().renew(job, progress=progress)

    def complete(self, job, fields):
        self._away()
        return super().complete(job, fields)

    def fail(self, job, error, **kwargs):
        self._away()
        return super().fail(job, error, **kwargs)


@pytest.mark.parametrize("batch", [1, 2])
def test_firestore_away_after_the_generation_does_not_count_against_the_jobs_time(
    firestore_client, results, bucket, batch
):
    """A review: Firestore away for 4 s as a generation ended, under a 2 s time limit: the fence check's wait (and,
    in a batch, the wait for the first job's delivery) counted against the jobs' deadline, and the heartbeat failed
    them `Timeout` (its write failing too, the doc stayed `processing`), their images thrown away. Waiting on
    Firestore or on batch-mates is not the job's time: both complete."""
    keys = [JobKey("u1", "images", f"held-{batch}-{n}") for n in range(batch)]
    for key in keys:
        write_job(firestore_client, key)
    store = FirestoreAwayForFencedCalls(firestore_client, worker_id="w1", lease_seconds=30)
    jobs = [store.claim(key) for key in keys]
    store.back = time.monotonic() + 4.0
    runner = JobRunner(store, BatchStub(), results, renew_interval=0.2, deadline=Deadline(2.0, 0.001))
    assert runner.run_batch([(job, None) for job in jobs]) == ["completed"] * batch
    assert [doc(firestore_client, key)["status"] for key in keys] == ["completed"] * batch


class SlowLastStep(StubGenerator):
    """Its generation comes back 1.5 s after its last step: past a 1 s limit, before the heartbeat's next beat."""

    def generate(self, request, progress=None):
        result = super().generate(request, progress)
        time.sleep(1.5)
        return result


def test_a_job_that_ran_past_its_time_during_its_generation_still_times_out(firestore_client, results, bucket):
    """The hold is for a job generated within its time: one whose generation itself ran past it fails `Timeout`."""
    key = JobKey("u1", "images", "slow-generation")
    write_job(firestore_client, key)
    store = WorkerJobs(firestore_client, worker_id="w1", lease_seconds=30)
    runner = JobRunner(store, SlowLastStep(), results, renew_interval=5.0, deadline=Deadline(1.0, 0.001))
    assert runner.run(store.claim(key)) == "failed"
    assert doc(firestore_client, key)["error_type"] == "Timeout"


class FenceCheckAway(WorkerJobs):
    """Firestore away for the fence check and the lease renewals until `back` (a stand-in, as BlippingStore is)."""

    def __init__(self, *args, back: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.back, self.tries = back, 0

    def _away(self):
        if time.monotonic() < self.back:
            from google.api_core.exceptions import ServiceUnavailable

            raise ServiceUnavailable("failed to connect to all addresses")

    def holds(self, job):
        self.tries += time.monotonic() < self.back
        self._away()
        return super().holds(job)

    def renew(self, job, progress=None):
        self._away()
        return super().renew(job, progress=progress)


def test_firestore_away_through_the_fence_check_longer_than_the_lease_still_completes(
    firestore_client, results, bucket
):
    """Mutation audit: the fence check waiting one lease period only (as before) went unseen."""
    key = JobKey("u1", "images", "fence-outage")
    write_job(firestore_client, key)
    store = FenceCheckAway(firestore_client, worker_id="w1", lease_seconds=1.0, back=time.monotonic() + 3.5)
    assert JobRunner(store, StubGenerator(), results).run(store.claim(key)) == "completed"
    assert doc(firestore_client, key)["status"] == "completed" and store.tries > 1


class SweepAway(WorkerJobs):
    """Firestore away for the sweep's queries from when `away` is called until `back` (a stand-in, as
    BlippingStore is)."""

    back = 0.0

    def _away(self):
        if time.monotonic() < self.back:
            from google.api_core.exceptions import ServiceUnavailable

            raise ServiceUnavailable("failed to connect to all addresses")

    def expired(self, *args, **kwargs):
        self._away()
        return super().expired(*args, **kwargs)

    def queued(self, *args, **kwargs):
        self._away()
        return super().queued(*args, **kwargs)


def test_after_an_outage_a_sweep_leaves_expired_leases_to_their_owners_for_a_lease(
    firestore_client, results, reconciler_logs
):
    """Chaos audit: Firestore away 2 minutes, past every lease, as an owner's generation ended: when it came back,
    another worker's sweep took the job over seconds before the owner's fence check came through, and the owner's
    generation was thrown away (one attempt used). The sweeper was cut off too: for one of its lease periods after
    Firestore answered it again it takes nothing over, so a live owner renews and keeps its job, and a dead owner's
    job is taken over after that (the re-check: counted from its last failed sweep, a short lease had run out
    before Firestore came back)."""
    store = SweepAway(firestore_client, worker_id="sweeper", lease_seconds=2.0)
    owners_keep_their_jobs_through_an_outage(firestore_client, results, store, "back", 3.0, "owner")
    logs = reconciler_logs
    # As the README says: each failed sweep in a row counted, then the first one that worked, with the time it
    # still leaves expired leases to their owners (a lease, 2 s, from Firestore's answer).
    failed = [(e["failed_sweeps"], e["log_level"]) for e in logs if e["event"] == "sweep_error"]
    assert failed and failed == [(n, "warning") for n in range(1, len(failed) + 1)]
    [recovered] = [e for e in logs if e["event"] == "sweep_recovered"]
    assert recovered["failed_sweeps"] == len(failed) and 1.0 <= recovered["takeovers_in_seconds"] <= 2.0


class HeldExpiry(WorkerJobs):
    """The expiry query held up until `held_until` (Firestore stopped, not refusing: the call hangs, then answers
    once it is back; a stand-in, as BlippingStore is)."""

    held_until = 0.0

    def expired(self, *args, **kwargs):
        query, store = super().expired(*args, **kwargs), self

        class Held:
            def stream(self, **kwargs):
                time.sleep(max(0.0, store.held_until - time.monotonic()))
                return query.stream(**kwargs)

        return Held()


def test_expired_leases_a_held_up_sweep_finds_wait_a_lease_too(firestore_client, results, monkeypatch):
    """The chaos re-check: Firestore stopped 25 s, the sweep's query hung through it and answered once Firestore was
    back, with the leases that had run out meanwhile, and nothing had failed: a takeover at once. A query held up
    past SLOW_CALL_SECONDS counts as an outage: its expired leases wait a lease period from its answer."""
    import listener.takeovers as takeovers_module

    monkeypatch.setattr(takeovers_module, "SLOW_CALL_SECONDS", 0.5)
    store = HeldExpiry(firestore_client, worker_id="sweeper", lease_seconds=2.0)
    owners_keep_their_jobs_through_an_outage(firestore_client, results, store, "held_until", 1.5, "held")


def test_a_key_offered_outside_the_sweep_waits_out_the_takeover_deferral_too(firestore_client, results):
    """The fencing review: after an outage only the sweep's query held expired leases back for a lease; a key
    offered otherwise (a runsync for the job, a key offered again after a failed claim) was taken over at once,
    the owner's generation, cut off as the claimer was, thrown away."""
    from google.api_core.exceptions import ServiceUnavailable

    key = JobKey("u1", "images", "offered")
    write_job(firestore_client, key)
    owner = WorkerJobs(firestore_client, worker_id="owner", lease_seconds=30)
    job = owner.claim(key)
    assert job is not None
    firestore_client.document(key.path).update({"lease_expires_at": SERVER_TIMESTAMP})  # ran out in the outage
    store = WorkerJobs(firestore_client, worker_id="claimer", lease_seconds=2.0)
    claimer = Reconciler(store, JobRunner(store, StubGenerator(), results))  # not started: its claim alone
    claimer.takeovers.failed(ServiceUnavailable("Firestore away"))
    claimer.takeovers.answered(0.1)  # back: takeovers wait a lease (2 s) from now
    assert claimer._claim(key) is None
    assert owner.renew(job)  # the owner's late renewal: its job still
    firestore_client.document(key.path).update({"lease_expires_at": SERVER_TIMESTAMP})  # and now its owner is gone
    wait_until(claimer.takeovers.allowed, timeout=5)
    taken = claimer._claim(key)
    assert taken is not None and (taken.lease.worker_id, taken.lease.attempt) == ("claimer", 2)
    assert store.release(taken)  # back to the queue: nothing runs it here


def test_firestore_back_never_reads_as_takeovers_allowed_before_their_deferral():
    """The thread-safety review: the all-clear was written before the deferral, and a claim on the dispatch
    thread reading between the two saw takeovers allowed (the old deferral long past) as Firestore came back."""
    from google.api_core.exceptions import ServiceUnavailable

    from listener.takeovers import Takeovers

    read: list[bool] = []

    class Watched(Takeovers):
        def __setattr__(self, name, value):
            super().__setattr__(name, value)
            if name in ("_troubled", "_from") and getattr(self, "watched", False):
                read.append(self.allowed())  # what the dispatch thread would read just then

    takeovers = Watched(lease_seconds=2.0)
    takeovers.failed(ServiceUnavailable("Firestore away"))
    takeovers.watched = True
    takeovers.answered(0.1)
    assert read == [False, False] and not takeovers.allowed()


def owners_keep_their_jobs_through_an_outage(client, results, store, ends: str, seconds: float, name: str) -> None:
    """A live owner's job and a dead owner's, both leases run out within an outage of `seconds` that `store` (the
    sweeper's, lease 2 s) stands in for, its attribute `ends` the outage's end: the live owner's late renewal finds
    its job still its own, and the dead owner's job is taken over a lease after Firestore answered again."""
    alive, dead = JobKey("u1", "images", f"{name}-alive"), JobKey("u2", "images", f"{name}-dead")
    for key in (alive, dead):
        write_job(client, key)
    owner = WorkerJobs(client, worker_id="owner", lease_seconds=30)
    job = owner.claim(alive)
    assert job is not None and WorkerJobs(client, worker_id="gone", lease_seconds=30).claim(dead)
    generator = StubGenerator()
    sweeper = Reconciler(store, JobRunner(store, generator, results), sweep_interval=0.2).start()
    try:
        assert sweeper.wait_listening(LISTENING_SECONDS)
        back = time.monotonic() + seconds
        setattr(store, ends, back)
        for key in (alive, dead):  # both leases run out within the outage (written here, as its minutes would)
            client.document(key.path).update({"lease_expires_at": SERVER_TIMESTAMP})
        wait_until(lambda: time.monotonic() >= back + 0.5, timeout=10)  # the owner's renewal comes late
        assert owner.renew(job)  # nobody took it over meanwhile
        wait_until(lambda: doc(client, dead)["worker_id"] == "sweeper", timeout=15)
        assert time.monotonic() >= back + 1.9  # a lease (2 s) after Firestore answered again
        data = doc(client, alive)
        assert (data["status"], data["worker_id"], data["attempts"]) == ("processing", "owner", 1)
        assert wait_until(lambda: finished(client, dead))["status"] == "completed"
        assert generator.calls == [f"{name}-dead"]
    finally:
        sweeper.runner.abort.set()
        sweeper.stop(grace=0)


def test_admissions_are_held_once_each_bounded_and_dropped_when_their_doc_leaves_the_queue(firestore_client):
    """A scale review: each doc heard was checked against every held admission (a 10,000-doc flood took 16 s of a
    listener's callback), the list had no bound, and a doc that left the queue (refused by the trigger,
    cancelled) was still admitted, a transaction per worker. Driven by hand: no listener, no admission thread."""
    reconciler = Reconciler(WorkerJobs(firestore_client, worker_id="w"), runner=None, capacity=5)  # type: ignore[arg-type]
    reconciler._claiming = True
    admissions = reconciler.admissions
    admissions.open()
    keys = [JobKey(f"u{n}", "images", "j") for n in range(8)]
    for n, key in enumerate(reversed(keys[:4])):  # heard newest first, as the newest window delivers
        admissions.hear(key, {}, float(10 - n))
    admissions.hear(keys[0], {}, 99.0)  # heard again: held once
    reconciler.listeners._on_queue_change("images", keys[1], "REMOVED", {"status": "failed"})
    for key in keys[4:]:  # past the bound (the candidates' capacity): left to the claim
        admissions.hear(key, {}, 20.0)
    assert len(admissions) == 5 and keys[1] not in admissions
    taken = [admissions.oldest() for _ in range(len(admissions))]
    assert taken == [keys[0], keys[2], keys[3], keys[4], keys[5]] and not len(admissions)


class SlowPages(WorkerJobs):
    """Each paged scan's query answers in 0.3 s: a healthy Firestore far away, not an outage (a stand-in)."""

    def in_document_order(self, *args, **kwargs):
        query = super().in_document_order(*args, **kwargs)

        class Slow:
            def stream(self, **kwargs):
                time.sleep(0.3)
                return query.stream(**kwargs)

        return Slow()


def test_a_sweep_of_many_answered_calls_still_takes_a_dead_workers_job_over(firestore_client, results, monkeypatch):
    """A resilience review: a sweep longer than SLOW_CALL_SECONDS in all (many queries behind a backlog, none of
    them slow) counted as one call held up by an outage, and stopped takeovers for a lease after it, every sweep:
    a dead worker's job stayed `processing`. One call's time tells an outage."""
    import listener.sweep as sweep_module
    import listener.takeovers as takeovers_module

    monkeypatch.setattr(takeovers_module, "SLOW_CALL_SECONDS", 0.5)
    monkeypatch.setattr(sweep_module, "UNLEASED_SCAN_SECONDS", 0.0)  # 4 pages a sweep: 1.2 s in all
    dead = JobKey("u1", "images", "left-by-the-dead")
    write_job(firestore_client, dead)
    assert WorkerJobs(firestore_client, worker_id="gone", lease_seconds=30).claim(dead) is not None
    store = SlowPages(firestore_client, worker_id="sweeper", lease_seconds=2.0)
    sweeper = CountingReconciler(store, JobRunner(store, StubGenerator(), results), sweep_interval=0.2).start()
    try:
        wait_until(lambda: sweeper.sweeps >= 2)  # past its first sweep (which takes over at once in any case)
        firestore_client.document(dead.path).update({"lease_expires_at": SERVER_TIMESTAMP})  # its owner died
        assert wait_until(lambda: finished(firestore_client, dead), timeout=20)["worker_id"] == "sweeper"
    finally:
        sweeper.stop(grace=0)


def paused_by_an_outage(reconciler: Reconciler, store, seconds: float, logs: list[dict]) -> dict:
    """Once `reconciler` listens, an outage of `seconds` begins (`store.back`, SweepAway's or VideosAway's): its
    listeners as they were, once it has said `listeners_paused` and closed them all."""
    assert reconciler.wait_listening(LISTENING_SECONDS)
    before = dict(reconciler.listeners._watches)
    store.back = time.monotonic() + seconds
    said = lambda: any(e["event"] == "listeners_paused" for e in logs)  # noqa: E731
    wait_until(lambda: said() and all(watch._closed for watch in before.values()), timeout=10)
    return before


def test_listeners_are_closed_while_firestore_is_away_and_listen_again_once_it_is_back(
    firestore_client, results, reconciler_logs
):
    """A resilience review: while Firestore was away the listeners' streams reopened at once, without end (six
    listeners, 32,000 tries in a 15 s outage, 40% of a core on the GIL beside the generation). After two failed
    sweeps in a row they are closed; the first sweep that answers listens again."""
    store = SweepAway(firestore_client, worker_id="w", lease_seconds=30.0)
    reconciler = CountingReconciler(store, JobRunner(store, StubGenerator(), results), sweep_interval=0.2).start()
    try:
        before = paused_by_an_outage(reconciler, store, 2.0, reconciler_logs)
        wait_until(lambda: all(reconciler.listeners._watches[name] is not before[name] for name in before), timeout=15)
        assert not any(watch._closed for watch in reconciler.listeners._watches.values())
        key = JobKey("u1", "images", "after-the-outage")
        write_job(firestore_client, key, width=256)
        assert wait_until(lambda: finished(firestore_client, key), timeout=15)["status"] == "completed"
        [paused] = [e for e in reconciler_logs if e["event"] == "listeners_paused"]
        assert paused["failed_sweeps"] == 2
        assert {e["listener"] for e in reconciler_logs if e["event"] == "listener_restarted"} == set(before)
    finally:
        reconciler.stop(grace=0)


class VideosAway(WorkerJobs):
    """Firestore away for the sweep's video queries alone until `back`: a sweep fails part-way, its images'
    queries answered (a stand-in, as SweepAway is)."""

    back = 0.0

    def _away(self, media: str):
        if media == "videos" and time.monotonic() < self.back:
            from google.api_core.exceptions import ServiceUnavailable

            raise ServiceUnavailable("failed to connect to all addresses")

    def expired(self, media, *args, **kwargs):
        self._away(media)
        return super().expired(media, *args, **kwargs)

    def queued(self, media, *args, **kwargs):
        self._away(media)
        return super().queued(media, *args, **kwargs)


def test_listeners_paused_stay_closed_until_a_whole_sweep_answers(firestore_client, results, reconciler_logs):
    """The diff's review: a sweep that failed part-way restarted the first media type's listeners (its own queries
    answered, and its watchdog saw them closed), which then reopened without pause for the rest of the outage. They
    wait for a whole sweep that answers."""
    store = VideosAway(firestore_client, worker_id="w", lease_seconds=30.0)
    reconciler = CountingReconciler(store, JobRunner(store, StubGenerator(), results), sweep_interval=0.2).start()
    try:
        before = paused_by_an_outage(reconciler, store, 3.0, reconciler_logs)
        wait_until(lambda: time.monotonic() >= store.back - 0.5, timeout=10)  # sweeps failing part-way meanwhile
        during = [e for e in reconciler_logs if e["event"] == "listener_restarted"]
        assert during == [] and all(reconciler.listeners._watches[name] is before[name] for name in before), during
        wait_until(lambda: not any(watch._closed for watch in reconciler.listeners._watches.values()), timeout=15)
    finally:
        reconciler.stop(grace=0)


def test_a_split_batchs_waiting_groups_keep_their_leases_and_a_crashed_group_is_its_own(
    firestore_client, results, reconciler_logs
):
    """A review: a batch split at its claims (its docs' batch keys changed since they were offered) ran its groups
    one after another, the later ones unrenewed meanwhile: past their lease, another worker took them over (run
    twice); and one group's crash left the groups after it to their leases. The waiting groups' leases are renewed
    while a group runs; a group's crash is its own."""
    keys = [JobKey("u1", "images", name) for name in ("slow", "crashing", "waiting")]
    for key, width in zip(keys, (512, 768, 1024), strict=True):
        write_job(firestore_client, key, width=width)
    from firegen_core.quota import Limits

    many = Limits(max_running=10)  # all three running here at once
    store = WorkerJobs(firestore_client, worker_id="w", lease_seconds=2, limits=many)
    claimed = [(store.claim(key), threading.Event()) for key in keys]

    class Slow(StubGenerator):
        def generate(self, request, progress=None):
            if request.file_uid == "slow":
                time.sleep(4)  # twice the others' 2 s lease
            return super().generate(request, progress)

    class Crashing(JobRunner):
        def run_batch(self, jobs, **options):
            if jobs[0][0].key.file_uid == "crashing":
                raise RuntimeError("a bug")
            return super().run_batch(jobs, **options)

    generator = Slow()
    reconciler = Reconciler(store, Crashing(store, generator, results), batch_max=3, batch_key=lambda r: r.width)
    other = WorkerJobs(firestore_client, worker_id="other", lease_seconds=30, limits=many)
    taken: list = []
    running = threading.Thread(target=reconciler._run, args=(claimed,), daemon=True)
    running.start()
    while running.is_alive():  # another worker's sweep, trying the waiting job's lease all along
        taken.append(other.claim(keys[2]))
        time.sleep(0.1)
    assert taken and not any(taken)
    assert (doc(firestore_client, keys[0])["status"], doc(firestore_client, keys[2])["status"]) == ("completed",) * 2
    waited = doc(firestore_client, keys[2])
    assert (waited["worker_id"], waited["attempts"]) == ("w", 1) and generator.calls == ["slow", "waiting"]
    [crash] = [e for e in reconciler_logs if e["event"] == "job_runner_crashed"]
    assert crash["paths"] == [keys[1].path]
    assert doc(firestore_client, keys[1])["status"] == "processing"  # the crashed group's job: left to its lease
