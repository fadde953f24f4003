"""The job store's compare-and-set transitions on the real Firestore emulator: claims race, stale workers are fenced off."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from google.api_core.exceptions import FailedPrecondition, RetryError, ServiceUnavailable

from firegen_core import lifecycle
from firegen_core.claims import WorkerJobs
from firegen_core.contract import parse_runsync_input
from firegen_core.errors import GenerationError
from firegen_core.jobs import JobKey

KEY = JobKey("user123", "images", "file456")


def queue(client, key=KEY, **fields):
    client.document(key.path).set(
        {"status": "queued", "prompt": "a red car", "generated": False, "error": False, **fields}
    )


def store(client, worker="w1", lease=60.0, max_attempts=3):
    return WorkerJobs(client, worker_id=worker, lease_seconds=lease, max_attempts=max_attempts)


def read(client, key=KEY):
    return client.document(key.path).get().to_dict()


def wait_until(predicate, timeout=10.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def test_one_winner_among_racing_workers(firestore_client):
    queue(firestore_client)
    stores = [store(firestore_client, f"w{i}") for i in range(8)]
    start = threading.Barrier(len(stores))

    def race(s):
        start.wait()
        return s.claim(KEY)

    with ThreadPoolExecutor(len(stores)) as pool:
        claims = [job for job in pool.map(race, stores) if job is not None]
    assert len(claims) == 1
    doc = read(firestore_client)
    assert doc["status"] == "processing" and doc["attempts"] == 1
    assert doc["worker_id"] == claims[0].lease.worker_id
    assert doc["lease_expires_at"] > doc["started_at"]


def test_stale_worker_is_fenced_off_after_its_lease_is_taken(firestore_client):
    queue(firestore_client)
    stale = store(firestore_client, "stale", lease=0.3).claim(KEY)
    assert stale is not None
    fresh_store = store(firestore_client, "fresh")
    assert wait_until(lambda: fresh_store.claim(KEY) is not None)
    doc = read(firestore_client)
    assert (doc["worker_id"], doc["attempts"]) == ("fresh", 2)

    stale_store = store(firestore_client, "stale")
    assert not stale_store.renew(stale, progress=0.5)
    assert not stale_store.complete(stale, {"status": "completed", "generated": True})
    assert not stale_store.fail(stale, GenerationError("RuntimeError", "boom"))
    assert not stale_store.release(stale)
    assert read(firestore_client)["status"] == "processing"


def test_the_same_worker_with_an_old_attempt_is_fenced_too(firestore_client):
    queue(firestore_client)
    s = store(firestore_client, "w1", lease=0.3)
    first = s.claim(KEY)
    assert wait_until(lambda: s.claim(KEY) is not None)
    assert not s.complete(first, {"status": "completed"})


def test_renew_extends_the_lease_and_records_progress(firestore_client):
    queue(firestore_client)
    s = store(firestore_client)
    job = s.claim(KEY)
    before = read(firestore_client)["lease_expires_at"]
    assert s.renew(job, progress=0.5)
    doc = read(firestore_client)
    assert doc["progress"] == 0.5 and doc["lease_expires_at"] > before


def test_attempts_are_capped(firestore_client):
    queue(firestore_client)
    s = store(firestore_client, lease=0.2, max_attempts=3)
    for attempt in (1, 2, 3):
        assert wait_until(lambda: (job := s.claim(KEY)) is not None and job.lease.attempt == attempt)
    # The fourth claim finds the lease expired and no attempt left: it fails the job instead of running it.
    assert wait_until(lambda: s.claim(KEY) is None and read(firestore_client)["status"] == "failed")
    doc = read(firestore_client)
    assert doc["error_message"] == "Generation failed after 3 attempts: its worker stopped responding"
    assert (doc["error"], doc["generated"], doc["error_type"]) == (True, False, "Exception")
    assert (doc["user_id"], doc["file_uid"], doc["attempts"]) == ("user123", "file456", 3)
    assert s.claim(KEY) is None


def test_complete_and_fail_are_final(firestore_client):
    queue(firestore_client)
    s = store(firestore_client)
    job = s.claim(KEY)
    assert s.fail(job, GenerationError("OutOfMemoryError", "Out of memory during generation"))
    doc = read(firestore_client)
    assert (doc["status"], doc["error_type"], doc["error_message"]) == (
        "failed",
        "OutOfMemoryError",
        "Out of memory during generation",
    )
    assert "failed_at" in doc and doc["modified"] == doc["failed_at"]
    # The TTL field (default retention, 30 days) is stored as a timestamp, as a Firestore TTL policy needs.
    assert timedelta(days=29) < doc["expire_at"] - doc["failed_at"] <= timedelta(days=30)
    assert s.claim(KEY) is None and not s.complete(job, {"status": "completed"})


def test_release_puts_the_job_back_for_another_worker(firestore_client):
    queue(firestore_client)
    job = store(firestore_client, "leaving").claim(KEY)
    assert store(firestore_client, "leaving").release(job)
    doc = read(firestore_client)
    assert doc["status"] == "queued" and doc["attempts"] == 0
    assert not {"worker_id", "lease_expires_at", "progress"} & doc.keys()
    again = store(firestore_client, "other").claim(KEY)
    assert (again.lease.worker_id, again.lease.attempt) == ("other", 1)


def test_ensure_queued_creates_once_and_leaves_an_existing_doc_that_says_the_same(firestore_client):
    request = parse_runsync_input(
        {
            "prompt": "A sunset over mountains",
            "user_id": "test-user",
            "file_uid": "test-img-001",
            "use_cloud_storage": True,
            "width": 512,
        }
    )
    s = store(firestore_client)
    s.ensure_queued(request)
    key = JobKey.of(request)
    doc = read(firestore_client, key)
    assert doc["status"] == "queued" and doc["width"] == 512 and doc["task_type"] == "text2image"
    assert (doc["generated"], doc["error"], doc["user_id"], doc["file_uid"]) == (
        False,
        False,
        "test-user",
        "test-img-001",
    )
    assert "created_at" in doc
    job = s.claim(key)
    assert s.ensure_queued(request).after["status"] == "processing"
    assert read(firestore_client, key)["worker_id"] == job.lease.worker_id


def test_fail_unclaimed_only_fails_a_queued_doc(firestore_client):
    queue(firestore_client)
    s = store(firestore_client)
    assert s.fail_unclaimed(KEY, GenerationError("Exception", "rejected")).applied
    assert read(firestore_client)["status"] == "failed"
    assert not s.fail_unclaimed(KEY, GenerationError("Exception", "again")).applied


@pytest.mark.parametrize("path", ["generations/u/audio/f", "other/u/images/f", "generations/u/images"])
def test_job_keys_come_only_from_job_paths(path):
    with pytest.raises(ValueError):
        JobKey.from_path(path)


def test_the_queries_live_on_the_store(firestore_client):
    """Queued jobs by user and age (oldest first, bounded), everyone's queued jobs, and expired leases."""
    from datetime import UTC, datetime, timedelta

    from firegen_core.jobs import JobStore

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for user, name, minutes in [("ann", "c", 3), ("ann", "a", 1), ("ann", "b", 2), ("bob", "z", 0)]:
        queue(firestore_client, JobKey(user, "images", name), created_at=t0 + timedelta(minutes=minutes))
    queue(firestore_client, JobKey("ann", "images", "done"), created_at=t0, status="completed")
    jobs = JobStore(firestore_client)
    oldest = [s.id for s in jobs.oldest_queued("images", user_id="ann", limit=2).stream()]
    assert oldest == ["a", "b"]
    assert [
        s.id for s in jobs.oldest_queued("images", limit=10, created_before=t0 + timedelta(minutes=1)).stream()
    ] == [
        "z",
        "a",
    ]
    assert sorted(s.id for s in jobs.queued("images").stream()) == ["a", "b", "c", "z"]
    dead = store(firestore_client, "dead", lease=0.2).claim(JobKey("bob", "images", "z"))
    assert dead is not None
    assert wait_until(
        lambda: [s.id for s in jobs.expired("images", datetime.now(UTC), limit=5).stream()] == ["z"], timeout=5
    )


class LostAnswer:
    """A commit that lands but whose answer never comes back, as the client's retry then sees it: the re-sent
    commit fails its own precondition. A stand-in for a lost response (the emulator's "call already cancelled"
    does it, but not on demand); the commits themselves are the emulator's."""

    def __init__(self, monkeypatch, times: int = 1, error: Exception | None = None):
        from google.cloud.firestore_v1.batch import WriteBatch

        self.left = times
        real = WriteBatch.commit
        error = error or FailedPrecondition("the stored version does not match the required base version")

        def commit(batch, *args, **kwargs):
            result = real(batch, *args, **kwargs)
            if self.left:
                self.left -= 1
                raise error
            return result

        monkeypatch.setattr(WriteBatch, "commit", commit)


def test_a_claim_whose_answer_was_lost_is_still_this_claim(firestore_client, monkeypatch):
    queue(firestore_client)
    LostAnswer(monkeypatch)
    job = store(firestore_client).claim(KEY)
    assert job is not None and job.lease.attempt == 1  # not taken for a lost race, nor claimed twice
    doc = read(firestore_client)
    assert (doc["status"], doc["worker_id"], doc["attempts"]) == ("processing", "w1", 1)


def test_a_commit_production_firestore_aborts_for_contention_is_decided_again(firestore_client, monkeypatch):
    """The production review: Firestore answers a write to a hot doc (a user's usage doc, written by each of their
    jobs' moves) ABORTED "Too much contention"; the transition ended there ("Could not record the job"). It wrote
    nothing, so it is decided again. A stand-in: the emulator never aborts a batch; the commits are its own."""
    from google.api_core.exceptions import Aborted
    from google.cloud.firestore_v1.batch import WriteBatch

    from firegen_core.jobs import JobStore

    real, aborted = WriteBatch.commit, []

    def commit(batch, *args, **kwargs):
        if len(aborted) < 2:
            aborted.append(True)
            raise Aborted("Too much contention on these documents. Please try again.")
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(WriteBatch, "commit", commit)
    request = parse_runsync_input({"prompt": "p", "user_id": "bob", "file_uid": "hot", "use_cloud_storage": True})
    outcome = JobStore(firestore_client).ensure_queued(request)
    assert len(aborted) == 2 and outcome.applied
    assert read(firestore_client, JobKey("bob", "images", "hot"))["quota_admitted"] is True
    assert firestore_client.document("usage/bob").get().to_dict()["pending"] == 1


def test_a_transitions_calls_end_within_its_bound_together(firestore_client, monkeypatch):
    """A review: CALL_TIMEOUT was checked between a transition's tries alone, each call having 15 s of its own: a
    slow Firestore held one transition (a runsync's answer, a callable) 45 s. Each call now gets what is left.
    A stand-in slowness: the emulator's reads are real, then the clock moves on past most of the bound."""
    from google.cloud.firestore_v1.batch import WriteBatch

    from firegen_core import jobs

    monkeypatch.setattr(jobs, "CALL_TIMEOUT", 3.0)
    clock = {"skew": 0.0}
    monotonic = time.monotonic
    monkeypatch.setattr(jobs.time, "monotonic", lambda: monotonic() + clock["skew"])
    get_all, commit, timeouts = firestore_client.get_all, WriteBatch.commit, {}

    def slow_read(*args, **kwargs):
        timeouts["read"] = kwargs["timeout"]
        found = list(get_all(*args, **kwargs))
        clock["skew"] += 2.5  # the read took most of the transition's 3 s
        return found

    def timed_commit(batch, *args, **kwargs):
        timeouts["commit"], timeouts["commit retry"] = kwargs["timeout"], kwargs["retry"].timeout
        return commit(batch, *args, **kwargs)

    monkeypatch.setattr(firestore_client, "get_all", slow_read)
    monkeypatch.setattr(WriteBatch, "commit", timed_commit)
    request = parse_runsync_input({"prompt": "p", "user_id": "bob", "file_uid": "slow", "use_cloud_storage": True})
    assert jobs.JobStore(firestore_client).ensure_queued(request).applied
    assert 2.9 < timeouts["read"] <= 3.0 and timeouts["commit"] == timeouts["commit retry"] == 1.0  # its floor


def test_the_transitions_bound_never_outlasts_a_calls_own(monkeypatch):
    """A diff review: `bound` gave each call what was left of 15 s, past a shortened BOUND (a test's 0.5 s to a
    Firestore away took 7.7 s)."""
    from google.api_core import retry as retries

    from firegen_core import jobs

    monkeypatch.setitem(jobs.BOUND, "timeout", 0.5)
    monkeypatch.setitem(jobs.BOUND, "retry", retries.Retry(timeout=0.5))
    cut = jobs.bound(time.monotonic() + 15)
    assert cut["timeout"] == 0.5 and cut["retry"].timeout == 0.5


# The client's own retry of an unavailable Firestore ran out after the commit had landed: the call raises.
OUT_OF_RETRIES = RetryError("Timeout of 15.0s exceeded", ServiceUnavailable("connection reset"))


def test_a_claim_whose_call_failed_after_it_landed_is_still_this_claim(firestore_client, monkeypatch):
    """The day's review: the reconciler's retry of a claim whose call raised (its commit landed) was a new claim,
    which found the job `processing` under this worker and gave up: the job sat unrun for a whole lease."""
    queue(firestore_client)
    LostAnswer(monkeypatch, error=OUT_OF_RETRIES)
    job = store(firestore_client).claim(KEY)
    assert job is not None and job.lease.attempt == 1
    assert (read(firestore_client)["status"], read(firestore_client)["attempts"]) == ("processing", 1)


def test_a_failure_or_cancelled_completion_whose_call_failed_after_it_landed_says_so_when_retried(
    firestore_client, monkeypatch
):
    """The runner retries a final write whose call raised; finding its own write, the retry said the lease was
    lost (a false `job_lost`, and a cancelled job's uploaded results were left in the bucket)."""
    queue(firestore_client)
    jobs = store(firestore_client)
    job = jobs.claim(KEY)
    LostAnswer(monkeypatch, error=OUT_OF_RETRIES)
    with pytest.raises(RetryError):
        jobs.fail(job, GenerationError("Cancelled", "Generation cancelled by its owner"))
    assert jobs.fail(job, GenerationError("Cancelled", "Generation cancelled by its owner"))
    assert not jobs.fail(job, GenerationError("Timeout", "too long"))  # not the failure this claim wrote

    other = JobKey(KEY.user_id, KEY.media_type, "cancelled-while-uploading")
    queue(firestore_client, other)
    running = jobs.claim(other)
    firestore_client.document(other.path).update({"cancel_requested": True})
    LostAnswer(monkeypatch, error=OUT_OF_RETRIES)
    with pytest.raises(RetryError):
        jobs.complete(running, {"status": "completed", "generated": True})
    assert jobs.complete(running, {"status": "completed", "generated": True}) == "failed"
    assert read(firestore_client, other)["error_type"] == "Cancelled"


def test_a_completion_whose_answer_was_lost_says_completed(firestore_client, monkeypatch):
    queue(firestore_client)
    jobs = store(firestore_client)
    job = jobs.claim(KEY)
    LostAnswer(monkeypatch)
    assert jobs.complete(job, {"status": "completed", "generated": True}) == "completed"
    assert store(firestore_client, worker="w2").claim(KEY) is None


def test_a_cancelled_queued_jobs_drop_whose_answer_was_lost_is_still_this_drop(firestore_client, monkeypatch):
    """Its `job_cancelled` line went missing (3 of 40 runs under load): the emulator answered a drop that had
    landed `Cancelled`, the client sent it again, that failed its precondition on the drop's own write, and the
    drop, reading the job failed already, reported nothing done. Another worker's later drop did nothing."""
    queue(firestore_client, cancel_requested=True)
    LostAnswer(monkeypatch)
    assert store(firestore_client).drop(KEY)
    assert (read(firestore_client)["status"], read(firestore_client)["error_type"]) == ("failed", "Cancelled")
    assert not store(firestore_client, worker="w2").drop(KEY)
    # With no retention a drop's write carries nothing of its own (no `expire_at`): not claimed as this one's.
    other = JobKey(KEY.user_id, KEY.media_type, "kept-for-ever")
    queue(firestore_client, other, cancel_requested=True)
    LostAnswer(monkeypatch)
    assert not WorkerJobs(firestore_client, worker_id="w1", retention_days=0).drop(other)
    assert read(firestore_client, other)["error_type"] == "Cancelled"


def test_a_jobs_end_whose_answer_was_lost_still_removes_what_an_earlier_try_left(firestore_client, monkeypatch):
    """A review: a claim that failed a job (cancelled, past its attempts) and a drop of a cancelled one, their commit
    landed and its answer lost, read the job failed already: the claim said nothing and neither told of the earlier
    try's uploads (`on_ended_after_run`), which stayed in the bucket, no doc's."""
    ended: list[JobKey] = []
    cancelled = JobKey(KEY.user_id, KEY.media_type, "cancelled-after-a-try")
    given_up = JobKey(KEY.user_id, KEY.media_type, "past-its-attempts")
    dropped = JobKey(KEY.user_id, KEY.media_type, "dropped-after-a-try")
    queue(firestore_client, cancelled, cancel_requested=True, attempts=1)
    queue(firestore_client, given_up, attempts=3)
    queue(firestore_client, dropped, cancel_requested=True, releases=1)
    jobs = store(firestore_client)
    jobs.on_ended_after_run = ended.append
    for key in (cancelled, given_up):
        LostAnswer(monkeypatch)
        assert jobs.claim(key) is None
    LostAnswer(monkeypatch)
    assert jobs.drop(dropped)
    assert ended == [cancelled, given_up, dropped]
    assert [read(firestore_client, key)["error_type"] for key in ended] == ["Cancelled", "Exception", "Cancelled"]
    # Another worker's claim of a job failed already is not its end: nothing told.
    assert store(firestore_client, worker="w2").claim(cancelled) is None
    assert ended == [cancelled, given_up, dropped]


def test_a_drop_that_another_cancel_beat_is_not_this_drop(firestore_client, monkeypatch):
    """The owner's cancel (the function's) lands between this drop's read and its commit: the drop's own try
    failed, so the job failed as the function wrote it is not this drop's, and it says nothing."""
    from google.cloud.firestore_v1.batch import WriteBatch

    from firegen_core.jobs import JobStore

    queue(firestore_client, cancel_requested=True)
    real = WriteBatch.commit
    beaten = []

    def commit(batch, *args, **kwargs):
        if not beaten:  # the drop's first commit: the function's cancel lands just before it
            beaten.append(True)
            monkeypatch.setattr(WriteBatch, "commit", real)
            JobStore(firestore_client).cancel(KEY)
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(WriteBatch, "commit", commit)
    assert not store(firestore_client).drop(KEY)
    assert beaten and read(firestore_client)["error_type"] == "Cancelled"


def test_a_finished_jobs_expire_at_is_its_finish_by_firestores_clock_plus_the_stores_retention(firestore_client):
    """A clock audit: `expire_at` was this host's clock plus RETENTION_DAYS (5 minutes late on a host 5 minutes
    fast); it is the finish's server time plus the days the store was given (the worker's settings, the
    functions' variable), on every write that ends a job; none with a retention of 0."""
    from firegen_core.jobs import JobStore
    from firegen_core.quota import Limits

    queue(firestore_client)
    jobs = WorkerJobs(firestore_client, worker_id="w1", lease_seconds=60, retention_days=1.5)
    job = jobs.claim(KEY)
    fields = lifecycle.success(task_type="text2image", user_id="u", file_uid="f", urls=["a.png"], seed=1)
    assert jobs.complete(job, fields) == "completed"
    doc = read(firestore_client)
    assert abs(doc["expire_at"] - doc["completed_at"] - timedelta(hours=36)) < timedelta(seconds=5)
    # A refusal for the user's limits, which the write itself decides (the day's review: it kept the host's).
    full = JobStore(firestore_client, limits=Limits(max_pending=1), retention_days=2)
    waiting, refused, kept = (JobKey(KEY.user_id, KEY.media_type, name) for name in ("waiting", "refused", "kept"))
    for key in (waiting, refused):
        queue(firestore_client, key)
        full.admit(key)
    doc = read(firestore_client, refused)
    assert doc["error_type"] == "QuotaExceeded"
    assert abs(doc["expire_at"] - doc["failed_at"] - timedelta(days=2)) < timedelta(seconds=5)
    queue(firestore_client, kept)
    forever = WorkerJobs(firestore_client, worker_id="w2", lease_seconds=60, retention_days=0)
    assert forever.fail(forever.claim(kept), GenerationError("OutOfMemoryError", "Out of memory"))
    doc = read(firestore_client, kept)
    assert doc["status"] == "failed" and "expire_at" not in doc


def rpcs(client, monkeypatch) -> list[str]:
    """The Firestore RPCs `client` makes from here on, by name (its own API client's calls, counted: the
    emulator answers them as ever)."""
    api, made = client._firestore_api, []
    for name in ("batch_get_documents", "get_document", "run_query", "commit"):

        def counted(*args, _call=getattr(api, name), _name=name, **kwargs):
            made.append(_name)
            return _call(*args, **kwargs)

        monkeypatch.setattr(api, name, counted)
    return made


def test_a_new_jobs_runsync_is_accepted_in_one_read_and_one_write(firestore_client, monkeypatch):
    """A latency review: a runsync of a new job took four round trips before its answer (the other media type's doc,
    the doc and its usage doc, its tombstone, the write). The docs are read together: one read, one write. A job
    its client filed under the other media type, or one its owner deleted, is read where it is."""
    from firegen_core.dispatches import DISPATCHED_INPUTS, dispatches_with
    from firegen_core.jobs import JobStore, tombstone_ref

    store = JobStore(firestore_client)
    body = {"prompt": "a red car", "user_id": "ann", "file_uid": "new", "use_cloud_storage": True}
    made = rpcs(firestore_client, monkeypatch)
    request, outcome = store.accept(parse_runsync_input(body), body, "rp-new")
    assert made == ["batch_get_documents", "commit"]
    assert (request.media_type, outcome.after["status"]) == ("images", "queued")
    assert firestore_client.document("generations/ann/images/new").get().get("status") == "queued"

    # Filed by its client under videos (`numFrames` alone, the contract's client sample): that doc's job.
    firestore_client.document("generations/ann/videos/filed").set({"status": "queued", "prompt": "a red car"})
    body = {**body, "file_uid": "filed"}
    request, outcome = store.accept(parse_runsync_input(body), body)
    assert (request.media_type, outcome.after["status"]) == ("videos", "queued")
    assert not firestore_client.document("generations/ann/images/filed").get().exists

    # Deleted by its owner while its dispatch was on its way: the late dispatch creates nothing.
    key = JobKey("ann", "images", "deleted")
    body = {**body, "file_uid": "deleted"}
    tombstone_ref(firestore_client, key).set({DISPATCHED_INPUTS: dispatches_with(None, parse_runsync_input(body))})
    request, outcome = store.accept(parse_runsync_input(body), body, "rp-late")
    assert outcome.after == {} and not firestore_client.document(key.path).get().exists
