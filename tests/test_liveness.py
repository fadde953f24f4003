"""The scheduled sweep under a backlog (issue #11, point 5): a queued job fails for want of a worker only when
no worker has been alive for the whole stale period, never because live workers are busy. Real workers write
their liveness docs on the Firestore emulator; RunPod is test_functions' scripted stand-in (no RunPod here)."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

from fixtures_scheduling import StubGenerator, queue_jobs, read, results, sched_worker, wait_until  # noqa: F401
from test_functions import ACCEPTED, client_doc, dispatch, stub, sweep  # noqa: F401  (stub is a fixture)

from firegen_core import workers
from firegen_core.jobs import JobKey

POLICY = dispatch.Policy(redispatch_after=timedelta(minutes=10), max_dispatches=3)


def stale_backlog(client, count: int, dispatched: timedelta = timedelta(hours=1)) -> list[JobKey]:
    """Jobs queued an hour ago and dispatched the most times allowed, the last time `dispatched` ago: the old
    sweep failed every one."""
    old = datetime.now(UTC) - timedelta(hours=1)
    keys = [JobKey(f"user-{i % 3}", "images", f"old-{i:02d}") for i in range(count)]
    batch = client.batch()
    last = datetime.now(UTC) - dispatched
    for key in keys:
        fields = {**client_doc(), "created_at": old, "dispatch_count": 3, "dispatched_at": last}
        batch.set(client.document(key.path), fields)
    batch.commit()
    return keys


def test_a_busy_worker_keeps_its_backlog_from_failing(sched_worker, firestore_client, stub):
    generator = StubGenerator(threading.Event())
    worker = sched_worker("busy", generator, sweep=0.2)
    running = JobKey("runner", "images", "long")
    queue_jobs(firestore_client, [running])
    assert generator.started.wait(15)
    backlog = stale_backlog(firestore_client, 6)
    heartbeat = wait_until(lambda: (firestore_client.document("workers/busy").get().to_dict() or {}).get("busy"))
    assert heartbeat == 1
    # A worker killed now would leave its doc behind: it expires a week after its last beat (TTL policy).
    doc = firestore_client.document("workers/busy").get().to_dict()
    assert timedelta(days=6.99) < doc["expire_at"] - doc[workers.SEEN_AT] < timedelta(days=7.01)
    assert doc[workers.BEAT_SECONDS] == 0.2  # its sweep's interval: how often it beats

    runpod = stub(ACCEPTED)
    counts = sweep.redispatch_stale(firestore_client, runpod.client(), policy=POLICY)
    assert counts["failed"] == 0 and counts["waiting"] == 6, counts
    assert [read(firestore_client, key)["status"] for key in backlog] == ["queued"] * 6
    assert runpod.requests == []  # dispatched enough already: nothing more sent
    generator.gate.set()
    for key in backlog:  # the worker gets through all of it
        assert wait_until(lambda k=key: read(firestore_client, k)["status"] == "completed", timeout=30)
    assert worker.wait_idle(5)


def test_with_no_worker_seen_since_its_last_dispatch_the_stale_backlog_fails(sched_worker, firestore_client, stub):
    """Dispatched the most times allowed, the last 20 minutes ago, and no worker seen since: RunPod starts none."""
    worker = sched_worker("gone", StubGenerator(threading.Event()), sweep=0.2)
    wait_until(lambda: firestore_client.document("workers/gone").get().exists)
    worker.stop(grace=0)  # a clean stop marks its liveness doc left, seen as it left
    doc = firestore_client.document("workers/gone").get().to_dict()
    assert doc[workers.LEFT_AT] == doc[workers.SEEN_AT] and doc["busy"] == 0
    assert timedelta(hours=23.9) < doc["expire_at"] - doc[workers.SEEN_AT] < timedelta(hours=24.1)  # a day's TTL
    # As if it left half an hour ago; and one killed (never left) 40 minutes ago.
    left = datetime.now(UTC) - timedelta(minutes=30)
    firestore_client.document("workers/gone").update({workers.SEEN_AT: left, workers.LEFT_AT: left})
    firestore_client.document("workers/long-gone").set(
        {workers.SEEN_AT: datetime.now(UTC) - timedelta(minutes=40), "busy": 0}
    )
    backlog = stale_backlog(firestore_client, 3, dispatched=timedelta(minutes=20))
    runpod = stub(ACCEPTED)
    counts = sweep.redispatch_stale(firestore_client, runpod.client(), policy=POLICY)
    assert counts == Counter(failed=3)
    assert {read(firestore_client, key)["error_type"] for key in backlog} == {"Exception"}
    assert runpod.requests == []


def test_a_backlog_its_workers_left_is_dispatched_again_not_failed(sched_worker, firestore_client, stub):
    """The review: RunPod stops workers on its idle timeout while a Firestore backlog waits (each runsync answered
    at once), and a clean stop deleted the worker's doc: the next sweep found no worker and failed every job already
    dispatched the most times, "No GPU worker picked up the job", within seconds of one working. A worker seen after
    a job's last dispatch shows the endpoint starts workers: the job is dispatched again, and one wakes for it."""
    worker = sched_worker("scaled-down", StubGenerator(), sweep=0.2)
    done = JobKey("earlier", "images", "done")
    queue_jobs(firestore_client, [done])
    wait_until(lambda: (read(firestore_client, done) or {}).get("status") == "completed")
    worker.stop(grace=0)
    assert firestore_client.document("workers/scaled-down").get().get(workers.FINISHED) == 1  # it ran jobs
    backlog = stale_backlog(firestore_client, 3)  # dispatched 3 times, the last an hour ago
    runpod = stub(ACCEPTED)
    counts = sweep.redispatch_stale(firestore_client, runpod.client(), policy=POLICY)
    assert counts == Counter(redispatched=3)
    assert [(read(firestore_client, k)["status"], read(firestore_client, k)["dispatch_count"]) for k in backlog] == [
        ("queued", 4)
    ] * 3
    assert sorted(body["input"]["file_uid"] for _, body in runpod.requests) == [k.file_uid for k in backlog]
    # Dispatched again just now: the next sweep leaves them (not stale), whatever the workers.
    assert set(sweep.redispatch_stale(firestore_client, runpod.client(), policy=POLICY)) <= {"skipped"}
    assert len(runpod.requests) == 3


def test_workers_that_never_ran_a_job_wake_none_again_and_the_redispatches_are_bounded(firestore_client, stub):
    """The review of the rule above: a worker that fails its start-up check (a broken GPU, a bucket it cannot write)
    or crashes before its first job also leaves a doc seen after the dispatch that started it; counted, every
    queued job of a broken endpoint would wake a GPU every 10 minutes for ever. Only workers that ran jobs to their
    end count, and past twice MAX_DISPATCHES the job fails whatever the workers did."""
    now = datetime.now(UTC)
    firestore_client.document("workers/failed-check").set(
        {workers.SEEN_AT: now - timedelta(minutes=11), workers.LEFT_AT: now - timedelta(minutes=11), "busy": 0}
    )
    firestore_client.document("workers/crash-looping").set(
        {workers.SEEN_AT: now - timedelta(minutes=12), workers.FINISHED: 0}
    )
    backlog = stale_backlog(firestore_client, 2)
    runpod = stub(ACCEPTED)
    assert sweep.redispatch_stale(firestore_client, runpod.client(), policy=POLICY) == Counter(failed=2)
    assert runpod.requests == [] and {read(firestore_client, k)["status"] for k in backlog} == {"failed"}
    # A worker that ran jobs, seen after the last dispatch: woken again, up to 6 dispatches in all.
    firestore_client.document("workers/worked").set(
        {
            workers.SEEN_AT: now - timedelta(minutes=11),
            workers.LEFT_AT: now - timedelta(minutes=11),
            workers.FINISHED: 5,
        }
    )
    old = now - timedelta(hours=1)
    for count, name in ((5, "fifth"), (6, "sixth")):
        firestore_client.document(f"generations/u-cap/images/{name}").set(
            {**client_doc(), "created_at": old, "dispatch_count": count, "dispatched_at": old}
        )
    assert sweep.redispatch_stale(firestore_client, runpod.client(), policy=POLICY) == Counter(redispatched=1, failed=1)
    assert [body["input"]["file_uid"] for _, body in runpod.requests] == ["fifth"]
    sixth = firestore_client.document("generations/u-cap/images/sixth").get().to_dict()
    assert (sixth["status"], sixth["error_message"]) == (
        "failed",
        "No GPU worker picked up the job after 6 dispatches, 10 minutes apart; please try again",
    )


def test_a_worker_killed_minutes_ago_still_counts_as_running(firestore_client, stub):
    """A killed worker never marks its doc left: seen within the stale period, it counts as running (its jobs'
    leases end, and another worker, or this one's replacement, takes them), and the backlog waits its turn."""
    firestore_client.document("workers/killed").set({workers.SEEN_AT: datetime.now(UTC) - timedelta(minutes=2)})
    stale_backlog(firestore_client, 2)
    runpod = stub(ACCEPTED)
    assert sweep.redispatch_stale(firestore_client, runpod.client(), policy=POLICY) == Counter(waiting=2)
    assert runpod.requests == []


def test_below_the_dispatch_limit_a_live_workers_backlog_is_still_redispatched(firestore_client, stub):
    """A live worker does not stop the sweep from waking more workers (RunPod may scale out)."""
    firestore_client.document("workers/alive").set({workers.SEEN_AT: datetime.now(UTC), "busy": 1})
    old = datetime.now(UTC) - timedelta(hours=1)
    key = JobKey("u1", "images", "once")
    firestore_client.document(key.path).set(
        {**client_doc(), "created_at": old, "dispatch_count": 1, "dispatched_at": old}
    )
    runpod = stub(ACCEPTED)
    assert sweep.redispatch_stale(firestore_client, runpod.client(), policy=POLICY) == Counter(redispatched=1)
    assert read(firestore_client, key)["dispatch_count"] == 2 and len(runpod.requests) == 1


def test_a_long_lived_workers_doc_expires_a_week_after_its_last_beat(firestore_client):
    """Mutation audit: `expire_at` from the worker's start would delete a worker alive for a week."""
    workers.beat(
        firestore_client, "old-worker", busy=0, concurrency=1, started_at=datetime.now(UTC) - timedelta(days=30)
    )
    doc = firestore_client.document("workers/old-worker").get().to_dict()
    assert timedelta(days=6.99) < doc["expire_at"] - doc[workers.SEEN_AT] < timedelta(days=7.01)
