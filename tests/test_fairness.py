"""Fair, bounded order of queued jobs (issue #11, point 2), with a real worker on the emulators."""

from __future__ import annotations

import threading

from fixtures_scheduling import (  # noqa: F401  (fixtures)
    StepGenerator,
    queue_jobs,
    results,
    sched_worker,
    wait_until,
)

from firegen_core.jobs import JobKey
from firegen_core.quota import Limits
from listener.reconciler import LISTEN_LIMIT

BACKLOG_LIMITS = Limits(max_pending=1000, daily_budget=1e6)  # one user's backlog here is past USER_MAX_PENDING


def backlog(user: str, count: int) -> list[JobKey]:
    return [JobKey(user, "images", f"{user}-{i:03d}") for i in range(count)]


def run_a_then_b(sched_worker, firestore_client, a_jobs: int) -> StepGenerator:
    """User A queues `a_jobs`; while A's first runs, user B queues one; then everything runs."""
    generator = StepGenerator(threading.Event())
    worker = sched_worker("one", generator, limits=BACKLOG_LIMITS)
    queue_jobs(firestore_client, backlog("userA", a_jobs))
    assert generator.started.wait(15)  # A's first is running (held)
    b = JobKey("userB", "images", "b-only")
    queue_jobs(firestore_client, [b])
    wait_until(lambda: worker.is_candidate(b))  # the worker heard of it (a listener, not the test, is timed here)
    generator.gate.set()
    wait_until(lambda: "b-only" in generator.calls, timeout=60)
    return generator


def test_a_second_users_job_is_next_after_the_first_users_running_job(sched_worker, firestore_client):
    generator = run_a_then_b(sched_worker, firestore_client, 50)
    assert generator.calls[0].startswith("userA-") and generator.calls[1] == "b-only", generator.calls[:5]
    # and the rest of A's backlog still runs, oldest first, after B's
    wait_until(lambda: len(generator.calls) == 51, timeout=90)


def test_behind_a_backlog_longer_than_the_listeners_window(sched_worker, firestore_client):
    """The oldest-first window holds LISTEN_LIMIT docs; B's job, newer than all of A's, comes through the
    newest-first window, not after A's backlog."""
    generator = run_a_then_b(sched_worker, firestore_client, LISTEN_LIMIT + 30)
    assert generator.calls.index("b-only") == 1, generator.calls[:5]


def test_the_candidate_set_is_bounded_whatever_the_backlog(sched_worker, firestore_client):
    generator = StepGenerator(threading.Event())
    worker = sched_worker("small", generator, capacity=10, sweep=0.2, limits=BACKLOG_LIMITS)
    keys = backlog("userA", 40)
    queue_jobs(firestore_client, keys)
    assert generator.started.wait(15)
    wait_until(lambda: worker.candidates == 10)
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(worker.candidates)
            stop.wait(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    generator.gate.set()
    try:
        wait_until(lambda: len(generator.calls) == 40, timeout=90)  # nothing dropped is lost: all of them run
    finally:
        stop.set()
        watcher.join()
    assert max(seen) <= 10


def test_a_doc_that_leaves_the_queue_stops_being_a_candidate(sched_worker, firestore_client):
    generator = StepGenerator(threading.Event())
    worker = sched_worker("w", generator, sweep=30)  # the listener alone
    running, *waiting = backlog("userA", 4)
    queue_jobs(firestore_client, [running])
    assert generator.started.wait(15)
    queue_jobs(firestore_client, waiting)
    wait_until(lambda: worker.candidates == 3)
    # Another worker (or the Cloud Function) ends one of them: REMOVED from the query, gone from the candidates.
    firestore_client.document(waiting[0].path).update({"status": "failed", "error": True})
    wait_until(lambda: worker.candidates == 2)
    generator.gate.set()
    wait_until(lambda: len(generator.calls) == 3)
    assert waiting[0].file_uid not in generator.calls


def test_the_indexes_cover_the_scheduling_queries():
    import json
    from pathlib import Path

    config = json.loads((Path(__file__).resolve().parent.parent / "firestore.indexes.json").read_text())
    composite = {
        (i["collectionGroup"], i["queryScope"], tuple((f["fieldPath"], f["order"]) for f in i["fields"]))
        for i in config["indexes"]
    }
    for media in ("images", "videos"):
        for fields in [
            (("status", "ASCENDING"), ("created_at", "ASCENDING")),  # oldest-first window and sweep
            (("status", "ASCENDING"), ("created_at", "DESCENDING")),  # newest-first window
            (("cancel_requested", "ASCENDING"), ("status", "ASCENDING")),  # cancel listener
        ]:
            assert (media, "COLLECTION_GROUP", fields) in composite
