"""The job lifecycle under any order of its doors: a Hypothesis state machine on an in-memory Firestore, no emulator.

test_ledger.py draws the same doors on the emulator: 30 sequences of one user, on the wall clock. Here the store's
own code runs (`JobStore.transition` and its `_compare_and_set`, `_limit`, `_recount`; `WorkerJobs`' claim and
fenced writes; `lifecycle` and `quota` under them) on a dict of docs whose clock the test moves: leases run out,
UTC days end, and hundreds of sequences of two users' jobs take seconds. Nothing here decides a transition itself:
each rule is a door as the worker, the handler or the functions call it, or a write the rules let a client make.
Two doors may race (one's commit lands between the other's read and its commit), and a commit may land with its
answer lost (sent again, it conflicts with itself): both are what the compare-and-set is for.

After every step: the usage docs say what the job docs say (`quota.running`, `quota.pending`, `quota._charged`:
what `JobStore._recount` counts), never below 0 and never past the limits; each doc is in one state of the
contract; at most one claim holds a job and a stale claim writes nothing; a finished job stays as it ended, but for
a refused one queued again by its request (`lifecycle.restate`); a try is given back only by a release; a job its
owner asked to cancel never completes. `LIFECYCLE_EXAMPLES` and `LIFECYCLE_STEPS` set how many sequences are drawn
and how long (200 of 60). Hunts of 5,000 and 4,000 of 80 found a release past MAX_RELEASES that did not know its own
landed write (the test at the end; fixed), and that a worker claiming again a job it released gets its earlier claim's
fence back (`lifecycle.release` gives the try back to `attempts`): unreached, as a worker that releases a job is
leaving (listener/worker.py) or never ran that claim, so the machine gives each release's worker slot a new id.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from google.api_core.exceptions import AlreadyExists, FailedPrecondition, NotFound
from google.cloud.firestore import DELETE_FIELD, SERVER_TIMESTAMP
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from firegen_core import jobs, lifecycle, quota
from firegen_core.claims import WorkerJobs
from firegen_core.contract import parse_runsync_input
from firegen_core.errors import CANCELLED, CANCELLED_MESSAGE, VALIDATION_ERROR, GenerationError
from firegen_core.jobs import ClaimedJob, JobKey, JobStore, Outcome

# ------------------------------------------------------------------------------------ an in-memory Firestore
# Just what the job store calls: documents by path, `get_all`, a batch of creates and conditional updates that
# lands whole or not at all, and the count queries of `JobStore._recount`. Its server time is the test's clock.


class _Ref:
    def __init__(self, db: Memory, path: str):
        self._db, self.path = db, path

    @property
    def id(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def get(self, **_bounds) -> _Snapshot:
        return self._db.snapshot(self)


class _Snapshot:
    def __init__(self, ref: _Ref, data: dict | None, update_time: int | None, read_time: datetime):
        self.reference, self._data, self.update_time, self.read_time = ref, data, update_time, read_time

    @property
    def exists(self) -> bool:
        return self._data is not None

    @property
    def id(self) -> str:
        return self.reference.id

    def to_dict(self) -> dict | None:
        return copy.deepcopy(self._data)


class _Query:
    def __init__(self, db: Memory, path: str, filters: tuple = ()):
        self._db, self._path, self._filters = db, path, filters

    def where(self, *, filter) -> _Query:
        return _Query(self._db, self._path, (*self._filters, filter))

    def document(self, doc_id: str) -> _Ref:
        return _Ref(self._db, f"{self._path}/{doc_id}")

    def count(self, alias: str):
        matches = [data for path, (data, _) in self._db.docs.items() if path.rsplit("/", 1)[0] == self._path]
        matches = [data for data in matches if all(_matches(data, f) for f in self._filters)]
        return SimpleNamespace(get=lambda **_bounds: [[SimpleNamespace(alias=alias, value=len(matches))]])


def _matches(data: dict, where) -> bool:
    value = data.get(where.field_path)
    if where.op_string == "==":
        return value == where.value
    assert where.op_string == "in", f"the in-memory store answers == and in, not {where.op_string}"
    return value in where.value


class _Batch:
    def __init__(self, db: Memory):
        self._db, self._writes = db, []

    def create(self, ref: _Ref, fields: dict) -> None:
        assert not any(value is DELETE_FIELD for value in fields.values()), (
            f"Firestore refuses a create that deletes {fields}"
        )
        self._writes.append(("create", ref.path, fields, None))

    def update(self, ref: _Ref, fields: dict, option=None) -> None:
        self._writes.append(("update", ref.path, fields, option))

    def commit(self, **_bounds) -> None:
        racer, self._db.racer = self._db.racer, None
        if racer is not None:  # another door's commit, between this one's read and now: its precondition fails
            racer()
        for kind, path, _, option in self._writes:  # every precondition first: a batch lands whole or not at all
            stored = self._db.docs.get(path)
            if kind == "create" and stored is not None:
                raise AlreadyExists(path)
            if kind == "update" and stored is None:
                raise NotFound(path)
            if kind == "update" and option is not None and stored[1] != option:
                raise FailedPrecondition(path)
        for kind, path, fields, _ in self._writes:
            self._db.write(path, fields, replace=kind == "create")
        if self._db.lose_answer:
            # Landed, its answer lost (a timeout): the client's own retry sends it again, which then conflicts
            # with itself, as here, and the store reads and decides again (`JobStore.transition`).
            self._db.lose_answer = False
            raise (
                AlreadyExists(self._writes[0][1])
                if self._writes[0][0] == "create"
                else FailedPrecondition("sent again")
            )


class Memory:
    """The Firestore client the job store is given: its docs, their update times, the server clock."""

    _projects = itertools.count()

    def __init__(self, now: datetime):
        self.project = f"memory-{next(self._projects)}"  # `_recount`'s cache of users counted right is per project
        self.now = now
        self.docs: dict[str, tuple[dict, int]] = {}
        self._writes = itertools.count(1)
        self.racer: Callable[[], object] | None = None  # runs inside the next commit, before its preconditions
        self.lose_answer = False  # the next commit lands, and answers as a conflict

    def document(self, path: str) -> _Ref:
        return _Ref(self, path)

    def collection(self, *parts: str) -> _Query:
        return _Query(self, "/".join(parts))

    def get_all(self, refs, **_bounds) -> list[_Snapshot]:
        return [self.snapshot(ref) for ref in refs]

    def snapshot(self, ref: _Ref) -> _Snapshot:
        data, update_time = self.docs.get(ref.path, (None, None))
        return _Snapshot(ref, copy.deepcopy(data), update_time, self.now)

    def batch(self) -> _Batch:
        return _Batch(self)

    def write_option(self, *, last_update_time: int) -> int:
        return last_update_time

    def write(self, path: str, fields: dict, *, replace: bool = False) -> None:
        """An update (or, with `replace`, a create or a client's `set`), its sentinels as Firestore reads them."""
        data = {} if replace else dict(self.docs[path][0])
        for name, value in fields.items():
            assert "." not in name, f"a dotted field path, which this store does not nest: {name}"
            if value is DELETE_FIELD:
                data.pop(name, None)
            else:
                data[name] = self.now if value is SERVER_TIMESTAMP else copy.deepcopy(value)
        self.docs[path] = (data, next(self._writes))

    def get(self, path: str) -> dict | None:
        stored = self.docs.get(path)
        return copy.deepcopy(stored[0]) if stored else None


class Recorded(WorkerJobs):
    """A worker whose last transition's outcome is kept: what its decide chose, not only what its method says."""

    last: Outcome | None = None

    def transition(self, key: JobKey, decide, *, admit: bool = False, read: tuple | None = None) -> Outcome:
        self.last = super().transition(key, decide, admit=admit, read=read)
        return self.last


class _Recounts(logging.Handler):
    """`usage_recounted` lines: a usage doc found counting more than its docs, which no door here may cause."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "usage_recounted":
            self.seen.append(record)


# ------------------------------------------------------------------------------------------------- the jobs
# Two users; the first has three images and a video (past USER_MAX_PENDING under the small limits), the second one
# image with the same file_uid as the first's (ids are per user).
JOBS = (
    JobKey("u1", "images", "a"),
    JobKey("u1", "images", "b"),
    JobKey("u1", "images", "c"),
    JobKey("u1", "videos", "v"),
    JobKey("u2", "images", "a"),
)
# What a request (runsync, the callable) may say of a job of each media type: its first parameters, others (which
# restate a live job), and a size past every daily budget drawn (refused for the budget whatever was spent).
REQUESTS = {
    "images": (
        {},
        {"num_inference_steps": 40},
        {"width": 1024, "height": 1024},
        {"num_images_per_prompt": 4, "width": 1024, "height": 1024, "num_inference_steps": 50},
    ),
    "videos": ({"num_frames": 16}, {"num_frames": 32}),
}
# What a client may write as its doc: the contract's sample, and one that awaits its parameters (the contract's
# function flow); or one that breaks the contract (firestore.rules let a client write it, so that it reads the
# contract's message).
CLIENT_DOCS = {"images": ({"num_inference_steps": 30}, {}), "videos": ({"numFrames": 16}, {"num_frames": 32})}
BROKEN_DOCS = {
    "images": ({"width": 2000}, {"prompt": ""}, {"num_frames": 20}, {"use_cloud_storage": False}),
    "videos": ({"num_frames": 16, "fps": 99},),
}
# Small enough that the limits are met within a sequence: USER_MAX_RUNNING of 1 and 2, a backlog of 2 or 3, a
# budget of a few jobs (a default image costs 1.41 GPU-seconds, a 32-frame video 8.91); one at the defaults.
LIMITS = (
    quota.Limits(max_running=1, max_pending=2, daily_budget=6),
    quota.Limits(max_running=2, max_pending=3, daily_budget=12),
    quota.Limits(),
)
WORKERS = ("w1", "w2", "w3")
LEASE_SECONDS = 60
MAX_ATTEMPTS, MAX_RELEASES = 2, 2
# 23:40 UTC: a sequence that lets a few hours pass crosses midnight, where each user's day's spend starts again.
START = datetime(2026, 3, 1, 23, 40, tzinfo=UTC)
# The doors that race, and whose answer may be lost: a run's writes go under the job's latest claim.
DOORS = ("claim", "request", "admit", "cancel", "drop", "renew", "complete", "fail", "release", "stop if cancelled")
STATUSES = {lifecycle.QUEUED, lifecycle.PROCESSING, lifecycle.COMPLETED, lifecycle.FAILED}


def _under(doc: dict | None, job: ClaimedJob) -> bool:
    """The doc carries the claim's fence (it may have ended under it)."""
    return (doc or {}).get("worker_id") == job.lease.worker_id and (doc or {}).get("attempts") == job.lease.attempt


def _history(doc: dict | None) -> tuple[int, int]:
    return int(quota.number(doc or {}, "attempts")), int(quota.number(doc or {}, lifecycle.RELEASES))


def _under_claim(move: str):
    """The rule of one `move` of a run under a claim drawn from those made so far (`Lifecycle.under_claim`)."""

    @precondition(lambda self: self.claims)
    @rule(data=st.data())
    def moved(self, data):
        self.under_claim(data, move)

    return moved


class Lifecycle(RuleBasedStateMachine):
    """Jobs of two users moved through every door, on one in-memory Firestore whose clock the rules advance."""

    def __init__(self):
        super().__init__()
        self.db = Memory(START)
        self.recounts = _Recounts()
        logging.getLogger("firegen_core.jobs").addHandler(self.recounts)
        self.claims: list[ClaimedJob] = []
        self.cancel_asked: set[str] = set()  # paths of jobs whose owner asked to cancel them (this request's)
        self.seen: dict[str, dict | None] = {}  # every job doc as the last step left it
        self.door = "start"
        self.released: set[str] = set()  # the path a holding claim's release moved in this step

    def teardown(self):
        logging.getLogger("firegen_core.jobs").removeHandler(self.recounts)

    @initialize(limits=st.sampled_from(LIMITS))
    def deploy(self, limits):
        self.limits = limits
        self.store = JobStore(self.db, limits=limits)
        # Every worker there ever was, by id (a stale claim's worker may still write), and the ones that claim:
        # a worker that releases a job is leaving (shutdown, a broken device, a bucket that refuses it: each stops
        # claiming first, listener/worker.py), so its slot goes to a replacement process with an id of its own.
        self.workers: dict[str, Recorded] = {}
        self.claiming = [self.start_worker(slot) for slot in WORKERS]

    def start_worker(self, slot: str) -> str:
        worker_id = f"{slot}-{sum(name.startswith(slot) for name in self.workers) + 1}"  # the pod's next process
        self.workers[worker_id] = Recorded(
            self.db,
            worker_id=worker_id,
            lease_seconds=LEASE_SECONDS,
            max_attempts=MAX_ATTEMPTS,
            max_releases=MAX_RELEASES,
            limits=self.limits,
        )
        return worker_id

    def doc(self, key: JobKey) -> dict | None:
        return self.db.get(key.path)

    def existing(self) -> list[JobKey]:
        return [job for job in JOBS if job.path in self.db.docs]

    def pick(self, data, among: tuple[JobKey, ...] | None = None) -> JobKey:
        """A job whose doc exists (`among` all jobs, for a door that may create one), as often a live one as any:
        a door on a missing or finished doc mostly decides nothing, and most docs end within a few steps."""
        live = [job for job in JOBS if (self.doc(job) or {}).get("status") in (lifecycle.QUEUED, lifecycle.PROCESSING)]
        if live and data.draw(st.booleans(), label="live"):
            return data.draw(st.sampled_from(live), label="job")
        return data.draw(st.sampled_from(among or self.existing()), label="job")

    def usage(self, user: str) -> dict:
        return self.db.get(f"{quota.USAGE_COLLECTION}/{user}") or {}

    def step(self, door: str) -> None:
        self.door = door
        self.released = set()

    # --- the doors that bring a job: its client's doc (what firestore.rules let it write), a request ---------
    @precondition(lambda self: len(self.existing()) < len(JOBS))
    @rule(data=st.data())
    def a_client_writes_its_doc(self, data):
        job = data.draw(st.sampled_from([job for job in JOBS if job not in self.existing()]), label="job")
        broken = data.draw(st.booleans(), label="broken")
        options = data.draw(st.sampled_from((BROKEN_DOCS if broken else CLIENT_DOCS)[job.media_type]), label="doc")
        self.step("client doc")
        fields = {
            "status": "queued",
            "created_at": SERVER_TIMESTAMP,
            "prompt": "A red sports car",
            "generated": False,
            "error": False,
        }
        self.db.write(job.path, {**fields, **options}, replace=True)  # the rules let a client create it, only

    @rule(data=st.data())
    def a_request_states_the_job(self, data):
        """runsync's `accept` (`ensure_queued`): creates the job, restates a live one, queues a refused one again."""
        job = self.pick(data, among=JOBS)
        self.step("request")
        self.act("request", job, data)

    @precondition(lambda self: self.existing())
    @rule(data=st.data())
    def a_listener_admits_a_client_doc(self, data):
        job = self.pick(data)
        self.step("admit")
        self.act("admit", job, data)

    # --- the doors that end a job without a run (one rule each, drawing which door: as often as any other) ------
    @precondition(lambda self: self.existing())
    @rule(data=st.data(), how=st.sampled_from(["client flag", "cancel", "drop"]))
    def the_owner_cancels(self, data, how):
        """The owner's cancel: its client's `cancel_requested: true` on a live doc (the rules allow that field
        alone), the cancelGeneration callable (`JobStore.cancel`), and a worker's listener dropping a queued job
        so flagged (`WorkerJobs.drop`)."""
        job = self.pick(data)
        self.step(f"cancel: {how}")
        if how != "client flag":
            self.act(how, job, data)
        elif (self.doc(job) or {}).get("status") in (lifecycle.QUEUED, lifecycle.PROCESSING):
            self.db.write(job.path, {lifecycle.CANCEL_REQUESTED: True})

    @precondition(lambda self: self.existing())
    @rule(data=st.data(), awaiting=st.booleans())
    def a_request_is_refused(self, data, awaiting):
        """The callable's refusal of a queued job's request (`fail_unclaimed`), or the handler's of the runsync
        a doc awaiting its parameters waited for (`fail_awaiting`)."""
        job = self.pick(data)
        self.step(f"refused: {'awaiting' if awaiting else 'queued'}")
        error = GenerationError(VALIDATION_ERROR, "width must be between 256 and 1024")
        if awaiting:
            self.store.fail_awaiting(job, error)
        else:
            self.store.fail_unclaimed(job, error)

    # --- workers: a claim, then what its run writes under it -----------------------------------------------------
    @precondition(lambda self: self.existing())
    @rule(data=st.data())
    def a_worker_claims(self, data):
        job = self.pick(data)
        self.step("claim")
        claimed = self.act("claim", job, data)
        assert claimed is None or lifecycle.holds(self.doc(job), claimed.lease), claimed

    # One rule per move, so that runs move as often as the other doors fire; the claim drawn may be its job's
    # current one or any earlier, stale one (a worker that stalled past its lease, or whose job was restated,
    # cancelled, ended): a stale claim's decide must refuse, whatever it asks. A leaving worker's release sends the
    # job back to the queue, past MAX_RELEASES fails it (`counted_release`).
    a_run_renews_its_lease = _under_claim("renew")
    a_run_completes = _under_claim("complete")
    a_run_fails = _under_claim("fail")
    a_leaving_worker_releases_its_run = _under_claim("release")
    a_run_stops_when_its_renewal_hears_a_cancel = _under_claim("stop if cancelled")

    def under_claim(self, data, move: str) -> None:
        # As often a claim that holds its job as a stale one: stale ones pile up, and most would be drawn.
        holding = [claim for claim in self.claims if lifecycle.holds(self.doc(claim.key), claim.lease)]
        stale = not holding or data.draw(st.booleans(), label="stale")
        job = data.draw(st.sampled_from(self.claims if stale else holding), label="claim")
        worker = self.workers[job.lease.worker_id]
        before, usage = self.doc(job.key), self.usage(job.key.user_id)
        held = lifecycle.holds(before, job.lease)
        self.step(f"{move} ({'held' if held else 'stale'})")
        answer = self.run_writes(move, job, data)
        after = self.doc(job.key)
        if held:
            assert answer, (move, before, after)  # its own claim's write lands
            return
        # Stale: its transition decided nothing, so neither the job nor its user's usage moved.
        assert worker.last is not None and worker.last.written is None, (move, job.lease, before, worker.last)
        assert after == before and self.usage(job.key.user_id) == usage, (move, job.lease, before, after)
        # And it says so, but where the job ended under its own fence (`claims._landed`: an earlier try of its
        # write that landed unanswered, or a claim that failed its job past MAX_ATTEMPTS or cancelled under it).
        assert not answer or (_under(after, job) and after.get("status") in lifecycle.FINAL_STATES), (
            move,
            answer,
            job.lease,
            after,
        )

    # --- two doors at once, and a write whose answer is lost ---------------------------------------------------
    @precondition(lambda self: self.existing())
    @rule(data=st.data(), first=st.sampled_from(DOORS), second=st.sampled_from(DOORS))
    def two_doors_race(self, data, first, second):
        """The second door's commit lands between the first's read and its commit, whose precondition then fails:
        the first decides again on what the second wrote (`JobStore.transition`). Two claims are two workers'
        (a worker claims a job once at a time: listener/reconciler.py's `_active`)."""
        job = self.pick(data)
        self.step(f"race: {first} then {second}")
        slots = data.draw(st.permutations(range(len(WORKERS))), label="slots")
        self.db.racer = lambda: self.act(second, job, data, slot=slots[1])
        self.act(first, job, data, slot=slots[0])
        racer, self.db.racer = self.db.racer, None
        if racer is not None:  # the first wrote nothing: the second comes after it
            racer()

    @precondition(lambda self: self.existing())
    @rule(data=st.data(), door=st.sampled_from(DOORS))
    def a_commit_lands_unanswered(self, data, door):
        """A door whose commit lands while its answer is lost: it must know its own write when it reads the doc
        again (a claim its lease, a completion or failure its fence, a drop its `expire_at`), or say nothing."""
        job = self.pick(data)
        latest = next((claim for claim in reversed(self.claims) if claim.key == job), None)
        held = latest is not None and lifecycle.holds(self.doc(job), latest.lease)
        before = self.doc(job)
        self.step(f"unanswered: {door}")
        self.db.lose_answer = True
        answer = self.act(door, job, data)
        landed, self.db.lose_answer = not self.db.lose_answer, False
        after = self.doc(job)
        if not landed:
            return
        if door == "claim" and after.get("status") == lifecycle.PROCESSING and after != before:
            assert answer is not None and answer.lease.attempt == after["attempts"], (answer, before, after)
        elif door in ("complete", "fail", "stop if cancelled") and held:
            assert answer, (door, answer, before, after)  # its run's end is written: it must not think it lost
        elif door == "drop":
            assert answer, (before, after)

    def act(self, door: str, job: JobKey, data, *, slot: int | None = None) -> Any:
        """One door on `job` as its caller calls it, its bookkeeping done (a claim kept); its answer."""
        if door == "claim":
            if slot is None:
                slot = data.draw(st.sampled_from(range(len(WORKERS))), label="slot")
            claimed = self.workers[self.claiming[slot]].claim(job)
            if claimed is not None:
                self.claims.append(claimed)
            return claimed
        if door == "request":
            parameters = data.draw(st.sampled_from(REQUESTS[job.media_type]), label="parameters")
            body = {"prompt": "A red sports car", "user_id": job.user_id, "file_uid": job.file_uid}
            fields = {**body, "use_cloud_storage": True, **parameters}
            request = parse_runsync_input(fields)
            assert JobKey.of(request) == job
            # As the handler takes it: its first try's reads in one round trip (`accept`).
            request, outcome = self.store.accept(request, fields)
            return outcome.applied
        if door == "admit":
            return self.store.admit(job).applied
        if door == "cancel":
            return self.store.cancel(job).applied
        if door == "drop":
            return self.workers[data.draw(st.sampled_from(self.claiming), label="worker")].drop(job)
        latest = next((claim for claim in reversed(self.claims) if claim.key == job), None)
        return None if latest is None else self.run_writes(door, latest, data)

    def run_writes(self, move: str, job: ClaimedJob, data) -> Any:
        """What a run writes under its claim, as listener/runner.py and listener/lease.py write it."""
        worker = self.workers[job.lease.worker_id]
        if move == "renew":
            return worker.renew(job, progress=data.draw(st.sampled_from([None, 0.5, 2.0]), label="progress"))
        if move == "complete":
            fields = lifecycle.success(
                task_type=job.doc.get("task_type", "text2image"),
                user_id=job.key.user_id,
                file_uid=job.key.file_uid,
                urls=["https://storage.example/r.png"],
                seed=7,
            )
            return worker.complete(job, fields)
        if move == "fail":
            return worker.fail(job, GenerationError("RuntimeError", "CUDA error: an illegal memory access"))
        if move == "release":
            # The worker is leaving (it stopped claiming first: listener/worker.py): a new process takes its slot.
            self.released.add(job.key.path)
            if job.lease.worker_id in self.claiming:
                slot = self.claiming.index(job.lease.worker_id)
                self.claiming[slot] = self.start_worker(WORKERS[slot])
            return worker.release(job)
        assert move == "stop if cancelled", move
        renewed = worker.renew(job)
        if not renewed.cancel_requested:
            return renewed
        return worker.fail(job, GenerationError(CANCELLED, CANCELLED_MESSAGE))  # listener/runner.py's order

    @rule(seconds=st.sampled_from([1, 30, LEASE_SECONDS + 1, 3600, 6 * 3600]))
    def time_passes(self, seconds):
        """A lease runs out (its worker died or stalled: another may take the job over), or a UTC day ends."""
        self.step("time passes")
        self.db.now += timedelta(seconds=seconds)

    # --- what must hold after every step ---------------------------------------------------------------------
    @invariant()
    def the_usage_docs_say_what_the_job_docs_say(self):
        today = quota.day_of(self.db.now)
        for user in {job.user_id for job in JOBS}:
            docs = [d for d in (self.doc(job) for job in JOBS if job.user_id == user) if d is not None]
            usage = self.usage(user)
            running, pending = sum(map(quota.running, docs)), sum(map(quota.pending, docs))
            assert usage.get("running", 0) == running, (user, usage, docs)
            assert usage.get("pending", 0) == pending, (user, usage, docs)
            if usage.get("day", today) == today:  # a usage doc of an earlier day holds that day's until its next write
                spent = sum(quota._charged(d, today) for d in docs)
                assert usage.get("spent_today", 0.0) == pytest.approx(spent, abs=1e-6), (user, usage, docs)
            assert all(usage.get(name, 0) >= 0 for name in ("running", "pending", "spent_today")), usage
            # The limits, where every door admits: no user runs or holds more, nor spends past the day's budget.
            assert running <= self.limits.max_running and pending <= self.limits.max_pending, (user, docs)
            assert usage.get("spent_today", 0.0) <= self.limits.daily_budget + 1e-6, (user, usage)
            # Every job a worker runs was admitted (counted): none runs past the user's counts.
            assert sum(d.get("status") == lifecycle.PROCESSING for d in docs) == running, docs
            # A user with nothing pending may be forgotten (the TTL policy on `usage`), one with a job never.
            if usage:
                assert (lifecycle.EXPIRE_AT in usage) == (running == pending == 0), (user, usage, docs)
        assert not self.recounts.seen, [r.__dict__ for r in self.recounts.seen]

    @invariant()
    def each_doc_is_in_one_state_of_the_contract(self):
        for job in JOBS:
            doc = self.doc(job)
            if doc is None:
                continue
            status = doc.get("status")
            assert status in STATUSES, doc
            if status == lifecycle.PROCESSING:  # under one worker's claim
                assert doc.get("worker_id") in self.workers and doc.get("attempts", 0) >= 1, doc
                assert isinstance(doc.get("lease_expires_at"), datetime) and "started_at" in doc, doc
            elif status == lifecycle.QUEUED:  # nobody's
                assert not {"worker_id", "lease_expires_at", "progress"} & doc.keys(), doc
            elif status == lifecycle.COMPLETED:  # by a run that was admitted (charged) and claimed
                assert doc.get("generated") is True and doc.get("error") is False and doc.get("image_url"), doc
                assert "completed_at" in doc and quota.admitted(doc) and quota.ran(doc), doc
            else:
                assert doc.get("error") is True and doc.get("generated") is False and "failed_at" in doc, doc
                assert doc.get("error_type") and doc.get("error_message"), doc
            if status in lifecycle.FINAL_STATES:
                assert isinstance(doc.get(lifecycle.EXPIRE_AT), datetime), doc  # RETENTION_DAYS: 30

    @invariant()
    def at_most_one_claim_holds_a_job(self):
        for job in JOBS:
            doc = self.doc(job)
            holding = [claim.lease for claim in self.claims if claim.key == job and lifecycle.holds(doc, claim.lease)]
            assert len(holding) <= 1, (job, holding, doc)
            # The one that holds it is its latest claim: an earlier claim is stale for good.
            latest = next((claim for claim in reversed(self.claims) if claim.key == job), None)
            assert not holding or holding[0] is latest.lease, (job, holding, latest, doc)

    @invariant()
    def each_move_is_one_the_lifecycle_allows(self):
        for job in JOBS:
            path, doc = job.path, self.doc(job)
            was = self.seen.get(path)
            if was is not None:
                assert doc is not None, (self.door, was)  # no door deletes a job
                status, before = doc.get("status"), was.get("status")
                # Final states are absorbing, but for the documented restatement of a refused job by its request.
                if before in lifecycle.FINAL_STATES and doc != was:
                    assert lifecycle.refused(was), (self.door, was, doc)
                    assert status == lifecycle.FAILED or (status == lifecycle.QUEUED and "request" in self.door), (
                        self.door,
                        was,
                        doc,
                    )
                    if status == lifecycle.QUEUED:
                        self.cancel_asked.discard(path)  # the refused job's cancel is not the new request's
                # A try is given back only by a holding claim's release, and counted there (`releases`).
                (tries, releases), (tried, released) = _history(doc), _history(was)
                if tries < tried:
                    assert path in self.released and (tries, releases) == (tried - 1, released + 1), (was, doc)
                assert tries + releases >= tried + released, (self.door, was, doc)
                restated = int(quota.number(doc, lifecycle.RESTATED))
                assert restated >= int(quota.number(was, lifecycle.RESTATED)), (self.door, was, doc)
                # A job that completes keeps what it was charged: only a job that never ran is refunded.
                if status == lifecycle.COMPLETED and before != status:
                    today = quota.day_of(self.db.now)
                    assert quota._charged(doc, today) == quota._charged(was, today), (self.door, was, doc)
            live = doc is not None and doc.get("status") in (lifecycle.QUEUED, lifecycle.PROCESSING)
            if live and doc.get(lifecycle.CANCEL_REQUESTED):
                self.cancel_asked.add(path)
            if path in self.cancel_asked:
                assert doc is not None and doc.get("status") != lifecycle.COMPLETED, (self.door, was, doc)
            self.seen[path] = doc


def test_the_lifecycle_keeps_its_invariants_under_any_order_of_doors(monkeypatch):
    # A conflict is decided again at once: its backoff (10 to 250 ms, for racers on one usage doc) would be a sleep.
    monkeypatch.setattr(jobs, "CONFLICT_BACKOFF", 0)
    monkeypatch.setattr(jobs, "CONFLICT_BACKOFF_MAX", 0)
    run_state_machine_as_test(
        Lifecycle,
        settings=settings(
            max_examples=int(os.environ.get("LIFECYCLE_EXAMPLES", 200)),
            stateful_step_count=int(os.environ.get("LIFECYCLE_STEPS", 60)),
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_a_release_that_fails_the_job_knows_its_write_when_its_answer_is_lost(monkeypatch):
    """What the machine found: past MAX_RELEASES a release whose commit landed unanswered (the resend conflicts,
    and the doc read again is no longer this claim's) answered None, so listener/lease.py logged `job_released
    released=False` and no `job_failed` said why the job ended. Its doc and the usage were right."""
    monkeypatch.setattr(jobs, "CONFLICT_BACKOFF", 0)
    monkeypatch.setattr(jobs, "CONFLICT_BACKOFF_MAX", 0)
    db = Memory(START)
    store, key = JobStore(db), JOBS[0]
    body = {"prompt": "A red sports car", "user_id": key.user_id, "file_uid": key.file_uid, "use_cloud_storage": True}
    store.ensure_queued(parse_runsync_input(body))
    for release in range(MAX_RELEASES + 1):  # a new worker each time: one that releases a job is leaving
        worker = WorkerJobs(db, worker_id=f"w{release}", max_releases=MAX_RELEASES)
        job = worker.claim(key)
        assert job is not None
        db.lose_answer = release == MAX_RELEASES
        written = worker.release(job)
    assert db.get(key.path)["status"] == lifecycle.FAILED  # past MAX_RELEASES: failed, as counted_release says
    assert written is not None and written["status"] == lifecycle.FAILED
