"""Fair, bounded order of queued jobs (issue #11, point 2), with a real worker on the emulators."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from fixtures_scheduling import (  # noqa: F401  (fixtures)
    StepGenerator,
    queue_jobs,
    results,
    sched_worker,
    wait_until,
)

from firegen_core.claims import WorkerJobs
from firegen_core.contract import parse_runsync_input
from firegen_core.jobs import JobKey, JobStore
from firegen_core.quota import Limits
from listener.listeners import LISTEN_LIMIT, NEWEST_LIMIT, Listeners, _far_end
from listener.reconciler import Reconciler
from listener.runner import JobRunner

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


def test_a_job_pushed_out_of_the_newest_window_keeps_its_place(sched_worker, firestore_client):
    """Audit: B's one job, heard by the newest-first window, was dropped when NEWEST_LIMIT newer docs pushed it
    out of it, and waited until it reached the oldest-first window: 54 jobs of other users ran before it. It stays
    a candidate, and runs next."""
    generator = StepGenerator(threading.Event())
    worker = sched_worker("one", generator, sweep=30, limits=BACKLOG_LIMITS)  # the listeners alone
    queue_jobs(firestore_client, backlog("userA", LISTEN_LIMIT + 10))
    assert generator.started.wait(15)
    b = JobKey("userB", "images", "b-only")
    queue_jobs(firestore_client, [b])
    wait_until(lambda: worker.is_candidate(b))
    later = [JobKey("userA", "images", f"userA-late-{i:02d}") for i in range(NEWEST_LIMIT + 5)]
    queue_jobs(firestore_client, later)
    wait_until(lambda: worker.is_candidate(later[-1]))
    assert worker.is_candidate(b)
    generator.gate.set()
    wait_until(lambda: "b-only" in generator.calls, timeout=60)
    assert generator.calls.index("b-only") == 1, generator.calls[:5]


def test_users_whose_jobs_sit_in_the_middle_of_a_backlog_get_their_turn_oldest_first(sched_worker, firestore_client):
    """Audit (3,000 queued docs of 60 users): a user whose docs were all written in the middle of the backlog
    (past the oldest window, before the newest) waited for everything older, one job behind 374 of other users;
    and one seen only through the newest window ran its newer docs first. The sweep looks such users up through
    their usage docs (`pending`: docs the functions or a worker admitted) and offers each one's oldest."""
    store = JobStore(firestore_client, limits=BACKLOG_LIMITS)

    def through_the_callable(user: str, file_uid: str) -> JobKey:  # created admitted, as the functions create it
        request = parse_runsync_input(
            {"prompt": "A red sports car", "user_id": user, "file_uid": file_uid, "use_cloud_storage": True}
        )
        store.ensure_queued(request)
        return JobKey.of(request)

    queue_jobs(firestore_client, backlog("userA", LISTEN_LIMIT + 10))
    c_only, d_old = through_the_callable("userC", "c-only"), through_the_callable("userD", "d-old")
    queue_jobs(firestore_client, [JobKey("userA", "images", f"userA-late-{i:02d}") for i in range(NEWEST_LIMIT + 5)])
    d_new = JobKey("userD", "images", "d-new")
    queue_jobs(firestore_client, [d_new])
    generator = StepGenerator(threading.Event())
    worker = sched_worker("one", generator, limits=BACKLOG_LIMITS)
    assert generator.started.wait(15)
    wait_until(lambda: worker.is_candidate(c_only) and worker.is_candidate(d_old))
    generator.gate.set()
    wait_until(lambda: {"c-only", "d-old", "d-new"} <= set(generator.calls), timeout=60)
    calls = generator.calls
    assert calls[0].startswith("userA-") and set(calls[1:3]) == {"c-only", "d-old"}, calls[:6]
    assert calls.index("d-old") < calls.index("d-new"), calls[:8]


def test_a_user_found_behind_a_backlog_is_not_looked_up_again_while_its_jobs_wait(sched_worker, firestore_client):
    """The day's review: each sweep looked up again every user it had found (their docs are past the oldest
    window by definition): 31 queries a sweep for 30 users, on every worker, for as long as the backlog lasted."""
    store = JobStore(firestore_client, limits=BACKLOG_LIMITS)
    queue_jobs(firestore_client, backlog("userA", LISTEN_LIMIT + 10))
    middle = [f"user{n:02d}" for n in range(5)]
    for user in middle:
        for i in range(2):
            fields = {"prompt": "p", "user_id": user, "file_uid": f"{user}-{i}", "use_cloud_storage": True}
            store.ensure_queued(parse_runsync_input(fields))
    queue_jobs(firestore_client, [JobKey("userA", "images", f"userA-late-{i:02d}") for i in range(NEWEST_LIMIT + 5)])
    generator = StepGenerator(threading.Event())  # the first job holds the one slot: the backlog stays
    worker = sched_worker("one", generator, sweep=0.3, limits=BACKLOG_LIMITS)
    assert generator.started.wait(15)
    wait_until(lambda: all(worker.is_candidate(JobKey(user, "images", f"{user}-0")) for user in middle))
    looked_up: list[str] = []
    sweeps: list[int] = []
    oldest_queued, sweep = worker.store.oldest_queued, worker.sweep

    def counted(media, **kwargs):
        if kwargs.get("user_id"):
            looked_up.append(kwargs["user_id"])
        return oldest_queued(media, **kwargs)

    def counted_sweep():
        found = sweep()
        sweeps.append(found)
        return found

    worker.store.oldest_queued, worker.sweep = counted, counted_sweep
    # A user whose usage says it has a job queued, which no query finds (a re-review: looked up every sweep), and
    # one at USER_MAX_RUNNING (its claims could not win): the first is looked up once, the second never.
    firestore_client.document("usage/userZ").set({"pending": 2, "running": 0})
    firestore_client.document("usage/userR").set({"pending": 3, "running": 2})
    wait_until(lambda: len(sweeps) >= 4)
    assert looked_up == ["userZ"] and len(generator.calls) == 1  # the held job: nothing else ran meanwhile
    generator.gate.set()


def test_a_job_a_request_brings_takes_its_place_by_its_docs_age(sched_worker, firestore_client):
    """Audit (one place): a job that reached the worker through runsync was placed by its arrival, after another
    user's newer doc. Docs without `created_at` here, so that no listener hears them first."""
    generator = StepGenerator(threading.Event())
    worker = sched_worker("one", generator, sweep=30, limits=BACKLOG_LIMITS)
    queue_jobs(firestore_client, backlog("userA", 1))
    assert generator.started.wait(15)
    newer, older = JobKey("userY", "images", "y-new"), JobKey("userX", "images", "x-old")
    for key in (newer, older):
        firestore_client.document(key.path).set({"status": "queued", "prompt": "p", "generated": False})
    worker.submit(newer)
    worker.submit(older, created_at=datetime.now(UTC) - timedelta(minutes=1))
    generator.gate.set()
    wait_until(lambda: len(generator.calls) == 3, timeout=60)
    assert generator.calls[1:] == ["x-old", "y-new"]


class OnStart(StepGenerator):
    """A StepGenerator that calls `on_start()` as each job starts."""

    def __init__(self, on_start):
        super().__init__()
        self.on_start = on_start

    def generate(self, request, progress=None):
        self.on_start()
        return super().generate(request, progress)


def test_the_first_claim_after_start_waits_for_the_first_sweep(firestore_client, results, monkeypatch):
    """Audit: right after a start, 13 of 465 claims took a user's newer doc before its oldest (the newest window's
    first snapshot came first, and users behind a backlog are only found by the sweep). The first claim waits
    for the first sweep's ordered queries; here a stand-in holds the sweep (as a slow Firestore would) until the
    listener has heard of the job."""
    from listener import reconciler as module

    # Waited out (3 s: a listener under the parallel suite's load can take longer to attach), the claim would
    # come without the sweep, and the test would fail for the load alone.
    monkeypatch.setattr(module, "FIRST_SWEEP_WAIT", 120.0)
    gate = threading.Event()
    swept_when_claimed: list[bool] = []

    class HeldSweep(Reconciler):
        def sweep(self) -> int:
            gate.wait(120)
            return super().sweep()

    generator = OnStart(lambda: swept_when_claimed.append(reconciler._swept.is_set()))
    key = JobKey("userA", "images", "first")
    queue_jobs(firestore_client, [key])
    store = WorkerJobs(firestore_client, worker_id="held", lease_seconds=30.0)
    reconciler = HeldSweep(store, JobRunner(store, generator, results), sweep_interval=30).start()
    try:
        wait_until(lambda: reconciler.is_candidate(key) or generator.calls, timeout=60)
        assert not generator.calls  # heard of, and held: the sweep has not run
        gate.set()
        wait_until(lambda: generator.calls)
        assert swept_when_claimed == [True]
    finally:
        gate.set()
        reconciler.stop(grace=0)


def test_the_first_claim_waits_for_the_sweeps_ordered_queries_alone(firestore_client, results, monkeypatch):
    """A latency audit: the first claim waited for the whole first sweep, its scans of undated docs and its look-up
    of users behind a backlog too (5 calls more, one after another, on a cold start that a request woke). Here that
    look-up is held until the job runs: the claim must not wait for it."""
    from listener import reconciler as module
    from listener.sweep import Sweep

    monkeypatch.setattr(module, "FIRST_SWEEP_WAIT", 60.0)  # waited out, the claim would come anyway
    started = threading.Event()
    discover = Sweep.discover

    def held_discovery(self) -> int:
        started.wait(30)
        return discover(self)

    monkeypatch.setattr(Sweep, "discover", held_discovery)
    queue_jobs(firestore_client, [JobKey("userA", "images", "first")])
    store = WorkerJobs(firestore_client, worker_id="quick", lease_seconds=30.0)
    reconciler = Reconciler(store, JobRunner(store, OnStart(started.set), results), sweep_interval=30).start()
    try:
        assert started.wait(20)
    finally:
        started.set()
        reconciler.stop(grace=0)


class Doc:
    def __init__(self, created_at):
        self.created_at = created_at

    def to_dict(self):
        return {"created_at": self.created_at}


def test_a_window_tells_a_doc_pushed_out_from_one_that_left_the_queue():
    """A full window's far end: past it a doc can only have been pushed out (still queued); a doc claimed, failed
    or cancelled leaves its place to one from beyond the far end, so it lies inside."""
    full_newest = [Doc(float(t)) for t in range(100, 100 - NEWEST_LIMIT, -1)]  # newest first: 100 .. 81
    assert _far_end(full_newest, "newest") == 81.0
    assert _far_end(full_newest[:-1], "newest") is None  # not full: nothing is pushed out of it
    full_oldest = [Doc(float(t)) for t in range(LISTEN_LIMIT)]  # 0 .. 99
    assert _far_end(full_oldest, "oldest") == LISTEN_LIMIT - 1
    listeners = Listeners.__new__(Listeners)
    listeners._edges = {"images:newest": 81.0, "images": 99.0}
    assert listeners.pushed_out("images:newest", {"created_at": 80.0})  # older than all 20 newest
    assert not listeners.pushed_out("images:newest", {"created_at": 90.0})  # claimed: an older one came in
    assert listeners.pushed_out("images", {"created_at": 99.5})  # a released older job came back in
    assert not listeners.pushed_out("images", {"created_at": 50.0})
    assert not listeners.pushed_out("images:newest", {})  # no created_at: no place to keep
    # Docs sharing one server timestamp (one batch of writes) with the far end: pushed out as well (mutation audit).
    assert listeners.pushed_out("images:newest", {"created_at": 81.0})
    assert listeners.pushed_out("images", {"created_at": 99.0})


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

    watcher = threading.Thread(target=watch, daemon=True)
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
            # oldest-first window and sweep; a cold worker's load order (`load_order`: its range on created_at too)
            (("status", "ASCENDING"), ("created_at", "ASCENDING")),
            (("status", "ASCENDING"), ("created_at", "DESCENDING")),  # newest-first window
            (("cancel_requested", "ASCENDING"), ("status", "ASCENDING")),  # cancel listener
        ]:
            assert (media, "COLLECTION_GROUP", fields) in composite
        # One user's oldest queued docs (the sweep's look-up of users behind a backlog: `Sweep.discover`).
        assert (media, "COLLECTION", (("status", "ASCENDING"), ("created_at", "ASCENDING"))) in composite


def test_users_past_the_first_page_of_usage_docs_are_discovered(sched_worker, firestore_client, monkeypatch):
    """Mutation audit: a look-up that never went past its first page of users went unseen (every test's users fit
    one page)."""
    import listener.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "DISCOVER_USERS", 2)
    store = JobStore(firestore_client, limits=BACKLOG_LIMITS)
    queue_jobs(firestore_client, backlog("userA", LISTEN_LIMIT + 10))
    middle = [f"user{n:02d}" for n in range(5)]
    for user in middle:
        store.ensure_queued(
            parse_runsync_input({"prompt": "p", "user_id": user, "file_uid": f"{user}-0", "use_cloud_storage": True})
        )
    queue_jobs(firestore_client, [JobKey("userA", "images", f"userA-late-{i:02d}") for i in range(NEWEST_LIMIT + 5)])
    generator = StepGenerator(threading.Event())
    worker = sched_worker("one", generator, sweep=0.3, limits=BACKLOG_LIMITS)
    assert generator.started.wait(15)
    wait_until(lambda: all(worker.is_candidate(JobKey(u, "images", f"{u}-0")) for u in middle), timeout=20)
    generator.gate.set()


def test_users_behind_a_backlog_are_looked_up_once_while_their_candidates_wait(firestore_client):
    """A scale review: with more users behind a full window than the candidates hold, what one sweep's look-ups
    found pushed out what the last's had (each user's only candidate), so every sweep looked them all up again
    (~400 reads a worker each sweep at 2,000 users). Now each user keeps a candidate, and look-ups stop at what the
    candidates can hold. The reconciler is driven by its sweep alone (no listeners, no slots)."""
    users, per_user, capacity = 150, 3, 60
    t0 = datetime.now(UTC) - timedelta(hours=1)
    batch = firestore_client.batch()
    for u in range(users):
        batch.set(firestore_client.document(f"usage/behind-{u:03d}"), {"pending": per_user, "running": 0})
        for j in range(per_user):
            doc = {"status": "queued", "prompt": "p", "quota_admitted": True, "created_at": t0 + timedelta(seconds=u)}
            batch.set(firestore_client.document(f"generations/behind-{u:03d}/images/j{j}"), doc)
        if u % 100 == 99:
            batch.commit()
            batch = firestore_client.batch()
    batch.commit()
    store = WorkerJobs(firestore_client, worker_id="w", limits=BACKLOG_LIMITS)
    looked_up: list[str] = []
    oldest_queued = store.oldest_queued

    def counted(*args, **kwargs):
        looked_up.append(kwargs["user_id"])
        return oldest_queued(*args, **kwargs)

    store.oldest_queued = counted  # type: ignore[method-assign]
    reconciler = Reconciler(store, runner=None, capacity=capacity)  # type: ignore[arg-type]
    reconciler._claiming = True
    reconciler._watchdog = lambda media, missed: None  # no listeners to restart here
    reconciler.listeners._edges = {
        "images": t0.timestamp() - 1
    }  # a full oldest window whose far end is before them all
    per_sweep = []
    for _ in range(5):
        before = len(looked_up)
        reconciler.sweep()
        per_sweep.append(len(looked_up) - before)
    assert len(looked_up) == len(set(looked_up)) <= capacity, per_sweep  # no user looked up twice
    assert per_sweep[-2:] == [0, 0], per_sweep
    holding = {key.user_id for key in reconciler._queue._entries}
    assert len(holding) == capacity, len(holding)  # one candidate each for as many users as it holds
