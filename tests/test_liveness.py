"""The scheduled sweep under a backlog (issue #11, point 5): a queued job fails for want of a worker only when
no worker has been alive for the whole stale period, never because live workers are busy. Real workers write
their liveness docs on the Firestore emulator; RunPod is test_functions' scripted stand-in (no RunPod here)."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

from fixtures_scheduling import StubGenerator, queue_jobs, read, results, sched_worker, wait_until  # noqa: F401
from test_functions import ACCEPTED, client_doc, dispatch, stub  # noqa: F401  (stub is a fixture)

from firegen_core import workers
from firegen_core.jobs import JobKey

POLICY = dispatch.Policy(redispatch_after=timedelta(minutes=10), max_dispatches=3)


def stale_backlog(client, count: int) -> list[JobKey]:
    """Jobs queued an hour ago and dispatched the most times allowed: the old sweep failed every one."""
    old = datetime.now(UTC) - timedelta(hours=1)
    keys = [JobKey(f"user-{i % 3}", "images", f"old-{i:02d}") for i in range(count)]
    batch = client.batch()
    for key in keys:
        fields = {**client_doc(), "created_at": old, "dispatch_count": 3, "dispatched_at": old}
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

    runpod = stub(ACCEPTED)
    counts = dispatch.redispatch_stale(firestore_client, runpod.client(), policy=POLICY)
    assert counts["failed"] == 0 and counts["waiting"] == 6, counts
    assert [read(firestore_client, key)["status"] for key in backlog] == ["queued"] * 6
    assert runpod.requests == []  # dispatched enough already: nothing more sent
    generator.gate.set()
    for key in backlog:  # the worker gets through all of it
        assert wait_until(lambda k=key: read(firestore_client, k)["status"] == "completed", timeout=30)
    assert worker.wait_idle(5)


def test_with_no_live_worker_the_stale_backlog_fails(sched_worker, firestore_client, stub):
    worker = sched_worker("gone", StubGenerator(threading.Event()), sweep=0.2)
    wait_until(lambda: firestore_client.document("workers/gone").get().exists)
    worker.stop(grace=0)  # a clean stop removes its liveness doc
    assert not firestore_client.document("workers/gone").get().exists
    # A worker seen long ago does not count either.
    old = datetime.now(UTC) - timedelta(minutes=11)
    firestore_client.document("workers/long-gone").set({workers.SEEN_AT: old, "busy": 0})
    backlog = stale_backlog(firestore_client, 3)
    counts = dispatch.redispatch_stale(firestore_client, stub(ACCEPTED).client(), policy=POLICY)
    assert counts == Counter(failed=3)
    assert {read(firestore_client, key)["error_type"] for key in backlog} == {"Exception"}


def test_below_the_dispatch_limit_a_live_workers_backlog_is_still_redispatched(firestore_client, stub):
    """A live worker does not stop the sweep from waking more workers (RunPod may scale out)."""
    firestore_client.document("workers/alive").set({workers.SEEN_AT: datetime.now(UTC), "busy": 1})
    old = datetime.now(UTC) - timedelta(hours=1)
    key = JobKey("u1", "images", "once")
    firestore_client.document(key.path).set(
        {**client_doc(), "created_at": old, "dispatch_count": 1, "dispatched_at": old}
    )
    runpod = stub(ACCEPTED)
    assert dispatch.redispatch_stale(firestore_client, runpod.client(), policy=POLICY) == Counter(redispatched=1)
    assert read(firestore_client, key)["dispatch_count"] == 2 and len(runpod.requests) == 1


def test_a_long_lived_workers_doc_expires_a_week_after_its_last_beat(firestore_client):
    """Mutation audit: `expire_at` from the worker's start would delete a worker alive for a week."""
    workers.beat(
        firestore_client, "old-worker", busy=0, concurrency=1, started_at=datetime.now(UTC) - timedelta(days=30)
    )
    doc = firestore_client.document("workers/old-worker").get().to_dict()
    assert timedelta(days=6.99) < doc["expire_at"] - doc[workers.SEEN_AT] < timedelta(days=7.01)
