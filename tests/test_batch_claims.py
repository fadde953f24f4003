"""BATCH_MAX: a free slot claims up to BATCH_MAX queued text2image jobs that can share one UNet batch, and runs
them in one pipeline call; each job keeps its own claim, progress, cancel, upload and final write.

On the real Firestore and Storage emulators with the real tiny SDXL (`fixtures_generation.engine`). `Spy` wraps
the engine only to record how it was called and to hold a job until the test is ready; the images come from the
engine itself. The batch order asserted is the fair order (listener/fairqueue.py): alternating users, each one's
oldest first, at most USER_MAX_RUNNING jobs of one user in a batch.
"""

from __future__ import annotations

import threading
import urllib.request

import numpy as np
import pytest
import structlog
from google.cloud.firestore import DELETE_FIELD, SERVER_TIMESTAMP
from test_batching import TOLERANCE
from test_generation import pixels
from test_reconciler import LISTENING_SECONDS, doc, finished, results, wait_until  # noqa: F401

from firegen_core import errors, quota
from firegen_core.claims import WorkerJobs
from firegen_core.contract import GenerationRequest, parse_document
from firegen_core.deadline import Deadline
from firegen_core.jobs import JobKey
from firegen_core.lifecycle import Lease
from listener.fairqueue import FairQueue
from listener.runner import CPU_TIMEOUT_MULTIPLE, JobRunner
from listener.settings import SettingsError, load_settings
from listener.worker import DeviceGuard, build_worker

SIZE = {"width": 256, "height": 256, "num_inference_steps": 10}  # the contract's smallest job


class Spy:
    """The real engine, recording each call's jobs (file_uids). `hold`: a job whose generation waits for `gate`.
    With `hold_batches`, a batch waits for `batch_gate`, asking every job's progress meanwhile (so a cancel is
    heard, as it would be at a denoising step) and noting in `stopped` the jobs told to stop."""

    def __init__(self, engine, hold: str | None = None, hold_batches: bool = False):
        self.engine = engine
        self.hold = hold
        self.hold_batches = hold_batches
        self.gate, self.batch_gate = threading.Event(), threading.Event()
        self.holding, self.batching = threading.Event(), threading.Event()
        self.calls: list[list[str]] = []
        self.stopped: set[str] = set()

    def generate(self, request, progress=None):
        self.calls.append([request.file_uid])
        if request.file_uid == self.hold:
            self.holding.set()
            self.gate.wait(30)
        return self.engine.generate(request, progress)

    def generate_batch(self, requests, progress=None):
        self.calls.append([request.file_uid for request in requests])
        self.batching.set()
        while self.hold_batches and not self.batch_gate.wait(0.02):
            for request, report in zip(requests, progress):
                try:
                    report(0.0)
                except errors.Interrupted:
                    self.stopped.add(request.file_uid)  # the engine hears it again at its first step
        return self.engine.generate_batch(requests, progress)


@pytest.fixture
def make_worker(firestore_client, storage_client, bucket, emulator_env):
    workers = []

    def make(generator, **settings):
        settings = load_settings(storage_bucket=bucket.name, sweep_interval_seconds=30, **settings)
        worker = build_worker(settings, generator, firestore_client, storage_client, worker_id=f"w{len(workers)}")
        workers.append(worker.start())
        assert worker.reconciler.wait_listening(LISTENING_SECONDS)
        return worker

    yield make
    for worker in workers:
        worker.shutdown(grace=0)


def write_job(client, user: str, file_uid: str, **fields) -> JobKey:
    key = JobKey(user, "images", file_uid)
    client.document(key.path).set(
        {"status": "queued", "created_at": SERVER_TIMESTAMP, "prompt": f"A photo of {file_uid}", **SIZE, **fields}
    )
    return key


def download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_a_free_slot_runs_compatible_queued_jobs_as_one_batch_each_as_it_would_alone(
    make_worker, firestore_client, engine
):
    spy = Spy(engine, hold="first")
    worker = make_worker(spy, batch_max=3)
    write_job(firestore_client, "u0", "first", seed=9)
    assert spy.holding.wait(30)  # the only slot is busy: what comes next waits, all of it at once
    keys = [
        write_job(firestore_client, "userA", "a1", seed=1),
        write_job(firestore_client, "userA", "a2", seed=2, num_images_per_prompt=2),
        write_job(firestore_client, "userB", "b1", seed=3, negative_prompt="blurry"),
        write_job(firestore_client, "userA", "a3", seed=4),  # past USER_MAX_RUNNING (2) for one batch
        write_job(firestore_client, "userC", "c1", seed=5, width=320),  # another size: another batch
    ]
    wait_until(lambda: worker.reconciler.candidates == len(keys))
    spy.gate.set()
    done = [wait_until(lambda key=key: finished(firestore_client, key), timeout=120) for key in keys]

    # Fair order, then the batch filled in fair order among jobs of its size: b1 before A's second job.
    assert spy.calls == [["first"], ["a1", "b1", "a2"], ["c1"], ["a3"]]
    assert [data["status"] for data in done] == ["completed"] * len(keys)
    batched = dict(zip(("a1", "a2", "b1"), done))
    urls = [url for data in batched.values() for url in data["images"]]
    assert len(urls) == len(set(urls)) == 4 and batched["a2"]["image_count"] == 2
    for file_uid, data in batched.items():
        assert data["progress"] == 1.0
        alone = engine.generate(parse_document(data["user_id"], "images", file_uid, data))
        assert data["seed"] == alone.seed
        for url, file in zip(data["images"], alone.files, strict=True):
            assert np.abs(pixels(download(url)) - pixels(file.data)).max() <= TOLERANCE, file_uid


def test_a_batchs_jobs_are_delivered_at_once(make_worker, firestore_client, engine, monkeypatch):
    """A latency audit: a batch's jobs were uploaded and completed one after another, the last ~0.5 s a job after
    the first in production. Three uploads that never meet at once time the barrier out (the jobs then fail)."""
    spy = Spy(engine, hold="first")
    worker = make_worker(spy, batch_max=3)
    together, upload = threading.Barrier(3, timeout=10), worker.runner.results.upload

    def at_once(*args, **kwargs):
        if kwargs.get("claim") is not None and args[1] != "first":
            together.wait()
        return upload(*args, **kwargs)

    monkeypatch.setattr(worker.runner.results, "upload", at_once)
    write_job(firestore_client, "u0", "first")
    assert spy.holding.wait(30)
    keys = [write_job(firestore_client, f"user{i}", f"job{i}", seed=i) for i in range(3)]
    wait_until(lambda: worker.reconciler.candidates == len(keys))
    spy.gate.set()
    done = [wait_until(lambda key=key: finished(firestore_client, key), timeout=120) for key in keys]
    assert spy.calls == [["first"], ["job0", "job1", "job2"]]
    assert [data["status"] for data in done] == ["completed"] * 3


def test_cancelling_one_job_of_a_batch_stops_that_job_alone(make_worker, firestore_client, engine):
    spy = Spy(engine, hold="first", hold_batches=True)
    worker = make_worker(spy, batch_max=4)
    write_job(firestore_client, "u0", "first")
    assert spy.holding.wait(30)
    keys = [write_job(firestore_client, user, name, seed=i) for i, (user, name) in enumerate(USERS)]
    wait_until(lambda: worker.reconciler.candidates == len(keys))
    spy.gate.set()
    assert spy.batching.wait(60)
    assert spy.calls == [["first"], ["a1", "b1", "c1"]]
    firestore_client.document(keys[1].path).update({"cancel_requested": True})
    wait_until(lambda: "b1" in spy.stopped)
    # Its doc ends now, while the batch still runs for the others (not when they finish).
    b1 = wait_until(lambda: finished(firestore_client, keys[1]), timeout=30)
    assert (b1["status"], b1["error_type"], b1["error_message"]) == ("failed", "Cancelled", "Cancelled by the user")
    assert [finished(firestore_client, key) for key in (keys[0], keys[2])] == [None, None]
    spy.batch_gate.set()
    a1, b1, c1 = (wait_until(lambda key=key: finished(firestore_client, key), timeout=120) for key in keys)
    assert b1["status"] == "failed" and b1["modified"] == b1["failed_at"]  # written once
    assert a1["status"] == c1["status"] == "completed"
    assert spy.stopped == {"b1"}


USERS = (("userA", "a1"), ("userB", "b1"), ("userC", "c1"))


def test_a_broken_doc_is_failed_by_its_claim_and_the_batch_runs_without_it(firestore_client, results, engine):
    """A doc that breaks the contract fails on its own, at its claim (no slot, no attempt); the others of the
    batch complete."""
    store = WorkerJobs(firestore_client, worker_id="w")
    keys = [write_job(firestore_client, user, name) for user, name in USERS]
    firestore_client.document(keys[1].path).update({"width": 2000})
    jobs = [store.claim(key) for key in keys]
    assert jobs[1] is None
    broken = doc(firestore_client, keys[1])
    assert (broken["error_type"], broken.get("attempts")) == ("ValidationError", None)
    spy = Spy(engine)
    outcomes = JobRunner(store, spy, results).run_batch([(job, None) for job in jobs if job is not None])
    assert outcomes == ["completed", "completed"]
    assert spy.calls == [["a1", "c1"]]


def test_batch_max_is_a_validated_setting():
    assert load_settings(storage_bucket="bkt").batch_max == 1  # one job at a time unless asked
    assert load_settings(storage_bucket="bkt", batch_max="4").batch_max == 4
    for bad in ("0", "17", "two"):
        with pytest.raises(SettingsError, match="BATCH_MAX"):
            load_settings(storage_bucket="bkt", batch_max=bad)


def test_a_worker_whose_generator_cannot_batch_runs_jobs_alone(firestore_client, storage_client, bucket, engine):
    class Plain:
        def generate(self, request, progress=None): ...

    settings = load_settings(storage_bucket=bucket.name, batch_max=8)
    assert build_worker(settings, Plain(), firestore_client, storage_client, worker_id="p").reconciler.batch_max == 1
    assert build_worker(settings, engine, firestore_client, storage_client, worker_id="e").reconciler.batch_max == 8


def test_a_worker_on_a_cpu_gives_jobs_the_cpu_multiple_unless_one_is_set(
    firestore_client, storage_client, bucket, engine, monkeypatch
):
    """The deadline's estimates are H100 figures: on the CPU (make dev's tiny models) the contract's largest image
    ran into its 120 s limit. A worker on a CPU gives jobs CPU_TIMEOUT_MULTIPLE times the estimate, unless
    JOB_TIMEOUT_MULTIPLE says otherwise; a generator of unknown device keeps the setting."""
    largest = GenerationRequest(
        prompt="x", user_id="u", file_uid="f", width=1024, height=1024, num_images_per_prompt=4, num_inference_steps=50
    )
    monkeypatch.delenv("JOB_TIMEOUT_MULTIPLE", raising=False)

    def deadline(generator, **env) -> float:
        settings = load_settings(storage_bucket=bucket.name, **env)
        worker = build_worker(settings, generator, firestore_client, storage_client, worker_id="d")
        return worker.runner.deadline.seconds(largest)

    estimate = quota.estimate(largest)
    assert engine.runtime.device == "cpu"
    assert deadline(engine) == pytest.approx(CPU_TIMEOUT_MULTIPLE * estimate) and deadline(engine) > 600
    assert deadline(engine, job_timeout_multiple=5) == pytest.approx(max(120, 5 * estimate))
    monkeypatch.setenv("JOB_TIMEOUT_MULTIPLE", "7")
    assert deadline(engine) == pytest.approx(max(120, 7 * estimate))
    monkeypatch.delenv("JOB_TIMEOUT_MULTIPLE")

    class Elsewhere:  # a stand-in generator: no device known
        def generate(self, request, progress=None): ...

    assert deadline(Elsewhere()) == pytest.approx(max(120, 5 * estimate))


def test_a_device_failure_inside_a_batch_stops_the_worker_and_releases_the_jobs():
    """Stand-in generator: no CUDA device fails here. The engine hands a batch's classified error to each job;
    the guard looks through the classification to the CUDA error it came from."""
    try:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    except RuntimeError as cuda:
        try:
            raise errors.classify(cuda) from cuda
        except errors.GenerationError as classified:
            failure = classified

    class Failing:
        def __init__(self, error):
            self.error = error

        def generate_batch(self, requests, progress=None):
            return [self.error] * len(requests)

    told = []
    with pytest.raises(errors.Interrupted):  # Interrupted: the runner releases each job
        DeviceGuard(Failing(failure), told.append).generate_batch(["job", "job"])
    assert told == [failure]
    out_of_memory = errors.GenerationError(errors.OUT_OF_MEMORY, "Out of memory during generation")
    assert DeviceGuard(Failing(out_of_memory), told.append).generate_batch(["job"]) == [out_of_memory]  # the job's
    assert told == [failure]


# --- the fair batch, pure -------------------------------------------------------------------------------------


def test_pop_batch_fills_a_batch_in_fair_order_within_one_group():
    queue: FairQueue[str] = FairQueue()
    for created, (key, user, group) in enumerate(
        [("a1", "A", "g"), ("c1", "C", "h"), ("a2", "A", "g"), ("a3", "A", "g"), ("b1", "B", "g"), ("v1", "D", None)]
    ):
        queue.add(key, user, float(created), group=group)
    assert queue.pop_batch(4, per_user=2) == ["a1", "b1", "a2"]  # A capped at 2; c1 (another group) waits
    assert queue.pop_batch(4, per_user=2) == ["c1"]  # C was never served: its turn, alone in its group
    assert queue.pop_batch(4) == ["v1"]  # no group (a video): always alone
    assert queue.pop_batch(4) == ["a3"]
    assert queue.pop_batch(4) == []


def test_pop_batch_of_one_is_pop_and_a_first_entry_leads():
    queue: FairQueue[str] = FairQueue()
    queue.add("a1", "A", 1.0, group="g")
    queue.add("b1", "B", 2.0, group="g")
    queue.add("late", "C", 3.0, group="g", first=True)  # a dead worker's job: it goes first
    assert queue.pop_batch(1) == ["late"]
    assert queue.pop() == "a1"
    assert queue.pop_batch(3) == ["b1"]


def test_a_batch_may_run_as_long_as_its_jobs_together():
    big = GenerationRequest(prompt="p", width=1024, height=1024, num_inference_steps=50, num_images_per_prompt=4)
    deadline = Deadline(floor_seconds=10, multiple=5)
    assert deadline.seconds_for([big, big]) == pytest.approx(2 * deadline.seconds(big))
    assert deadline.seconds_for([]) == deadline.seconds(None) == 10


# --- the dispatch loop's windows ------------------------------------------------------------------------------


def hold_claim(worker, file_uid: str, *, answer: bool = False):
    """The worker's claim of `file_uid` waits for the returned gate (set by the test); `waiting` once it does.
    With `answer`, the claim lands first and its answer is what waits. A wrapper of the real claim on the real
    emulator: only its timing is the test's."""
    store = worker.reconciler.store
    claim, gate, waiting = store.claim, threading.Event(), threading.Event()

    def held(key, **kwargs):
        landed = claim(key, **kwargs) if answer else None
        if key.file_uid == file_uid:
            waiting.set()
            assert gate.wait(30)
        return landed if answer else claim(key, **kwargs)

    store.claim = held
    return gate, waiting


def test_a_restatement_heard_while_the_batch_is_still_claiming_stops_the_claimed_run(
    make_worker, firestore_client, engine
):
    """The run of a1, claimed while b1's claim (same batch) is still in flight, is the one a restatement heard
    now must stop. Before, its lease was recorded only once the whole batch was claimed: the restatement found
    nothing to stop and the run went on with its old parameters until its next lease renewal (a review's
    finding)."""
    spy = Spy(engine, hold="first", hold_batches=True)
    worker = make_worker(spy, batch_max=2)
    write_job(firestore_client, "u0", "first")
    assert spy.holding.wait(30)
    a1 = write_job(firestore_client, "userA", "a1", seed=1)
    write_job(firestore_client, "userB", "b1", seed=2)
    wait_until(lambda: worker.reconciler.candidates == 2)
    gate, waiting = hold_claim(worker, "b1")
    spy.gate.set()
    assert waiting.wait(30)
    claimed = firestore_client.document(a1.path).get().to_dict()
    assert claimed["status"] == "processing"  # a1's claim has landed
    worker.reconciler.preempt(a1, Lease(claimed["worker_id"], claimed["attempts"]))
    gate.set()
    assert spy.batching.wait(60)
    wait_until(lambda: "a1" in spy.stopped)  # at the batch's first step, not at a renewal 40 s on
    spy.batch_gate.set()


def restate_elsewhere(client, key: JobKey, **changes) -> None:
    """As another worker's runsync restates a running job (`lifecycle.restate`): queued again with the new
    parameters, its attempt kept, its lease gone."""
    gone = dict.fromkeys(("worker_id", "lease_expires_at", "progress"), DELETE_FIELD)
    client.document(key.path).update({"status": "queued", "restated": 1, **changes, **gone})


def test_a_job_restated_mid_batch_is_a_candidate_again_at_once_and_in_its_place(make_worker, firestore_client, engine):
    """The batching review: a job restated while its batch generated was offered again only once the whole batch
    had delivered, and as the newest candidate: on a one-slot worker a newer batch ran before it. Now it is a
    candidate as soon as its try ends (the batch's other job still generating), in its place by `created_at`."""
    spy = Spy(engine, hold="first", hold_batches=True)
    worker = make_worker(spy, batch_max=2)
    write_job(firestore_client, "u0", "first")
    assert spy.holding.wait(30)
    a1 = write_job(firestore_client, "userA", "a1", seed=1)
    b1 = write_job(firestore_client, "userB", "b1", seed=2)
    wait_until(lambda: worker.reconciler.candidates == 2)
    spy.gate.set()
    assert spy.batching.wait(60)
    b2 = write_job(firestore_client, "userB", "b2", seed=3)  # newer than a1
    wait_until(lambda: worker.reconciler.is_candidate(b2))
    restate_elsewhere(firestore_client, a1, seed=5)
    wait_until(lambda: worker.reconciler.is_candidate(a1))
    assert "a1" in spy.stopped and not spy.batch_gate.is_set()  # b1 still generating
    spy.batch_gate.set()
    done = [wait_until(lambda key=key: finished(firestore_client, key), timeout=120) for key in (a1, b1, b2)]
    assert spy.calls[1:] == [["a1", "b1"], ["a1", "b2"]]  # before: [b2] ran, then a1
    assert [data["status"] for data in done] == ["completed"] * 3 and done[0]["seed"] == 5


def test_a_job_restated_while_it_runs_alone_runs_again_before_its_users_newer_job(
    make_worker, firestore_client, engine
):
    """Offered again once its try ended, as the newest candidate (before), a restated job ran after its user's
    job queued behind it; it keeps its place by `created_at`."""
    spy = Spy(engine, hold="a1")
    worker = make_worker(spy)
    a1 = write_job(firestore_client, "userA", "a1", seed=1)
    assert spy.holding.wait(30)
    a2 = write_job(firestore_client, "userA", "a2", seed=2)
    wait_until(lambda: worker.reconciler.is_candidate(a2))
    restate_elsewhere(firestore_client, a1, seed=5)
    wait_until(lambda: worker.reconciler._stops[a1].is_set())  # heard queued again while it runs here
    spy.hold = None
    spy.gate.set()
    done = [wait_until(lambda key=key: finished(firestore_client, key), timeout=120) for key in (a1, a2)]
    assert spy.calls == [["a1"], ["a1"], ["a2"]]  # before: a2, then a1
    assert [data["status"] for data in done] == ["completed"] * 2 and done[0]["seed"] == 5


@pytest.mark.parametrize("heard", ["runsync", "listener"])
def test_a_restatement_heard_while_the_claims_answer_is_on_its_way_stops_the_run(
    make_worker, firestore_client, engine, heard
):
    """The thread-safety review: a restatement heard once the claim had landed in Firestore but before its
    answer came back found no lease here to stop (the runsync's `preempt`, the listener hearing the job queued
    again with this claim's attempt): dropped, the run went on with its old parameters until a lease renewal
    found its lease gone (up to 40 s)."""
    first_steps: list[str] = []

    class FirstStep:
        def generate(self, request, progress=None):
            try:
                progress(0.0)
            except errors.Interrupted:
                first_steps.append("stopped")
                raise
            first_steps.append("ran")
            return engine.generate(request, progress)

    worker = make_worker(FirstStep())
    gate, waiting = hold_claim(worker, "a1", answer=True)
    a1 = write_job(firestore_client, "userA", "a1", seed=1)
    assert waiting.wait(30)
    claimed = firestore_client.document(a1.path).get().to_dict()
    assert claimed["status"] == "processing"  # landed; its answer waits
    if heard == "runsync":
        worker.reconciler.preempt(a1, Lease(claimed["worker_id"], claimed["attempts"]))
    else:  # another worker's runsync restated it (`lifecycle.restate`): queued again, its attempt kept
        gone = dict.fromkeys(("worker_id", "lease_expires_at"), DELETE_FIELD)
        firestore_client.document(a1.path).update({"status": "queued", "restated": 1, "seed": 2, **gone})
        wait_until(lambda: a1 in worker.reconciler._displaced)  # heard while the answer is still on its way
    gate.set()
    wait_until(lambda: first_steps)
    assert first_steps[0] == "stopped"


def test_a_dispatch_that_fails_unexpectedly_releases_its_claims_and_the_worker_claims_on(
    make_worker, firestore_client, engine, monkeypatch
):
    """Stand-in fault: the job thread's start fails once as CPython's does where a process is out of threads
    (no real way to exhaust them here). Before, the dispatch thread died: the worker listened and never claimed
    again, and the claimed job stayed `processing` until its lease ended (a review's finding)."""
    from listener import reconciler as module

    spy = Spy(engine)
    worker = make_worker(spy)
    start, failed = threading.Thread.start, []

    def start_once_failing(thread):
        if thread.name.startswith("job-") and not failed:
            failed.append(thread.name)
            raise RuntimeError("can't start new thread")
        return start(thread)

    monkeypatch.setattr(module.threading.Thread, "start", start_once_failing)
    with structlog.testing.capture_logs() as logs:
        monkeypatch.setattr(module, "log", structlog.get_logger("listener.reconciler"))  # see runner_logs
        a1 = write_job(firestore_client, "userA", "a1", seed=1)
        # Released at once by the failed dispatch (not left to its 120 s lease), claimed again by the same
        # worker, which goes on.
        done = wait_until(lambda: finished(firestore_client, a1), timeout=60)
    assert failed == ["job-a1"] and done["status"] == "completed"
    assert (done["attempts"], done["releases"]) == (1, 1)  # a release gives its attempt back
    b1 = write_job(firestore_client, "userB", "b1", seed=2)
    assert wait_until(lambda: finished(firestore_client, b1), timeout=60)["status"] == "completed"
    wait_until(lambda: worker.reconciler.busy == 0, timeout=10)  # its slot is freed just after its doc ends
    [event] = [log for log in logs if log["event"] == "claim_loop_error"]
    assert event["log_level"] == "error" and "can't start new thread" in event["error"]
