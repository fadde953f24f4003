"""The reconciler: finds work in Firestore and claims it when a local generation slot is free.

Three sources feed one bounded, fair queue of candidate jobs (listener/fairqueue.py: round-robin across users,
oldest `created_at` first within a user):
- `on_snapshot` listeners on queued docs (listener/listeners.py: collection-group queries over `images` and
  `videos`), each a bounded window ordered by `created_at`: the oldest LISTEN_LIMIT queued docs, and the newest
  NEWEST_LIMIT (so a new user's job is seen at once even behind another user's backlog longer than the first
  window). A doc that leaves both windows because it was claimed, failed or cancelled stops being a candidate;
- a periodic sweep that queries the oldest queued docs and expired leases: the safety net for anything a
  listener missed (and the only way to see a lease run out, which no document write announces; such a job, a
  dead worker's, goes first in line: it is older than anything queued since). Behind a backlog longer than the
  oldest window, it also looks up the oldest queued docs of each user with pending work whose oldest is not in
  that window (listener/sweep.py), so the round-robin covers every such user, not only those at the backlog's ends;
- `submit`, from the runsync handler, for the job it just accepted (in fair order like every other door).
A client's doc that no function admitted is admitted against its user's limits (or refused) as soon as a queued-doc
listener or the sweep hears of it, oldest first, by an admission thread (listener/admission.py).
A third listener per media type hears cancellations (`cancel_requested: true` on a queued or processing doc):
a queued job is failed `Cancelled` at once (no free slot needed), a job running here is told to stop.
The sweep is also the watchdog (a listener that closed, or that stayed silent about a queued doc the sweep
found, is restarted) and the worker's heartbeat (`workers/{worker_id}`, firegen_core.workers). A candidate is
only a hint; the claim (a compare-and-set) decides, so many workers can race.

A free slot (CONCURRENCY of them) claims the next candidate and, with BATCH_MAX > 1, more of its batch key
(`FairQueue.pop_batch`), each claim fenced on its own; the runner runs them in one generation call. Once it is
over, the slot goes to the next claim while their files are stored and they complete (`_hand_over`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import structlog

from firegen_core import lifecycle, workers
from firegen_core.claims import WorkerJobs
from firegen_core.contract import GenerationRequest, awaits_parameters, parse_document
from firegen_core.dispatches import RUNPOD_JOB_ID
from firegen_core.jobs import MEDIA_TYPES, ClaimedJob, JobKey
from firegen_core.lifecycle import Lease

from .admission import Admissions
from .fairqueue import DEFAULT_CAPACITY, FairQueue, timestamp
from .lease import RunOutcome, log_lost, quietly, release
from .listeners import Listeners
from .runner import LEAVING_DELIVERY_SECONDS, JobRunner, transient
from .storage_outage import StorageOutage
from .sweep import Sweep, updated
from .takeovers import Takeovers
from .version import code_version

log = structlog.get_logger("listener.reconciler")

PAUSE_LISTENERS_AFTER = 2  # sweeps failed in a row (Firestore away) before the listeners are closed until it is back
STOP_JOIN_SECONDS = 2.0  # at stop, for the reconciler's loops all together (they are daemon threads)
AWAY_LEAVE_TIMEOUT = 1.0  # at stop with Firestore away, for the liveness doc's last write
START_BEAT_TIMEOUT = 3.0  # the heartbeat at start (the clock's first measure) never holds a start up longer
FIRST_SWEEP_WAIT = 3.0  # the first claim after start waits this long at most for the first sweep
DISPATCH_RETRY_SECONDS = 1.0  # after an unexpected error in the dispatch loop (logged `claim_loop_error`)
CLOCK_SAMPLE_MAX_SECONDS = 1.0  # a heartbeat slower than this (retried) says too little of when its write landed
FOREIGN_REPORTED = 100  # docs outside generations/ said (logged) once each: a flood of them is not a flood of lines
SPREAD = 8


class Reconciler:
    def __init__(
        self,
        store: WorkerJobs,
        runner: JobRunner,
        *,
        concurrency: int = 1,
        sweep_interval: float = 10.0,
        capacity: int = DEFAULT_CAPACITY,
        batch_max: int = 1,
        batch_key: Callable[[GenerationRequest], Hashable | None] | None = None,
        placeholder_grace: float = 0.0,
        claimable: Callable[[JobKey], bool] | None = None,
    ):
        self.store = store
        self.runner = runner
        self.concurrency = concurrency  # generation slots: each runs one job, or one batch of jobs
        # BATCH_MAX: a free slot claims up to this many queued jobs of one `batch_key` and runs them together.
        self.batch_max = batch_max if batch_key is not None else 1
        self.batch_key = batch_key
        self._slots = 0  # slots claiming or generating, or delivering where not handed over (`_hand_over`)
        # Batches generated, delivering (upload, completion) on a slot they handed over (`_hand_over`).
        self._delivering = 0
        self.sweep_interval = sweep_interval
        # PLACEHOLDER_GRACE_SECONDS: how long the listeners and the sweep leave a doc that awaits its parameters
        # (`contract.awaits_parameters`) to its runsync, counted from its creation or this worker's start (a cold
        # worker hears of it long after its creation, and the runsync that woke it comes next). Its runsync (here:
        # `submit`) takes it at once.
        self.placeholder_grace = placeholder_grace
        # Whether a candidate may be claimed now (None: all): a job whose model still loads is left queued, for a
        # worker that has it or for this one once it has (`claimable_changed`), while others are claimed.
        self.claimable = claimable
        self._cv = threading.Condition()
        # Storage failed a job's upload past its retries: claims wait until it answers (a stand-in has no probe).
        probe = getattr(getattr(runner, "results", None), "probe", None)
        self.storage_outage = StorageOutage(probe, self.claimable_changed) if callable(probe) else None
        if self.storage_outage is not None:
            runner.storage_outage = self.storage_outage
        self._queue: FairQueue[JobKey] = FairQueue(capacity)
        self._cancels: set[JobKey] = set()  # queued jobs their owners cancelled: failed by the cancel thread
        self._stops: dict[JobKey, threading.Event] = {}  # claimed or running here → its cancel signal
        self._leases: dict[JobKey, Lease] = {}  # running here → the claim it runs under
        # Running here, and heard of as a candidate again meanwhile (restated, written over): the latest `created_at`
        # and batch group heard, by which it is offered again once its try here ends (`_offer_again`).
        self._heard_running: dict[JobKey, tuple[object, Hashable | None]] = {}
        # Users a claim here found not claimable while a job of theirs ran here (at USER_MAX_RUNNING, most likely):
        # their queued docs are looked up again when one of their jobs here ends (`_look_again`).
        self._held_back: set[str] = set()
        # Users a claim here found at USER_MAX_RUNNING with jobs on other workers: their candidates keep their places
        # and are passed over until the next sweep, or one of their jobs here ends (`_may_claim`). Claimed and refused
        # one by one (a transaction each), the first to pass once one of those jobs ended was not their oldest (the
        # fairness review, two workers: a user's 14th job started before their 2nd).
        self._limited: set[str] = set()
        # Claims on their way whose lease a restatement displaced before their answer came back (`preempt`).
        self._displaced: dict[JobKey, Lease] = {}
        # Jobs this worker runs, and (None) those it is claiming: shutdown waits for both, so a claim in flight
        # when SIGTERM arrives is run within the grace period or released, never left `processing`.
        self._active: dict[JobKey, threading.Thread | None] = {}
        # After a lost claim race, pick among the first few users in fair order: other idle workers heard of the
        # same jobs at the same moment, and would otherwise all race for the same one again.
        self._spread = 1
        self._claiming = False
        self._stopping = threading.Event()
        # Set once the first sweep ran: the listeners' first snapshots arrive in any order (the newest window's may
        # come first) and only the sweep finds users behind a backlog, so a claim before it may take a user's newer
        # doc before its oldest (audit: 13 of 465 claims out of order within a user, right after a start).
        self._swept = threading.Event()
        self.listeners = Listeners(
            store,
            on_queued=self._heard_queued,
            on_gone=self._withdraw,
            on_cancel=self._cancel_queued,
            on_stop=self._stop_running,
            not_ours=self._not_ours,
        )
        self._threads: list[threading.Thread] = []
        self._request_ids: OrderedDict[JobKey, str] = OrderedDict()  # runsync's RunPod job id, until claimed
        self.admissions = Admissions(store, capacity)  # client docs heard of, not yet admitted
        # Firestore's clock minus this host's, in seconds, from each heartbeat's write: leases, `created_at` and the
        # placeholder grace are server times, and a host's clock may be minutes off (audit: a worker 5 minutes slow
        # left a dead worker's job `processing` 5 minutes past its lease; one fast ran placeholders at once).
        self._clock_offset = 0.0
        # Monotonic marks, read as server times through the clock's latest measure (`_server_time_at`): a host
        # clock stepped after start (NTP, a resumed VM) moved wall-clock marks by the step (the clock review).
        self._started_mono = time.monotonic()
        self._claiming_since = time.monotonic()  # reset by `start`
        self.takeovers = Takeovers(store.lease_seconds)  # none within a lease of Firestore's return
        self._sweeper = Sweep(
            store,
            self.listeners,
            self.takeovers,
            self._queue,
            self._cv,
            server_time=self.server_time,
            found=self._found,
            not_ours=self._not_ours,
        )
        self._foreign: set[str] = set()  # docs outside generations/ its queries met, each said once (`_not_ours`)
        self._finished = 0  # jobs run here to their end (completed or failed): its liveness doc says it (`beat`)

    # --- lifecycle of the reconciler itself ------------------------------------------------------------------

    def start(self, listen: bool = True) -> Reconciler:
        """`listen=False`: only the jobs `submit` brings are claimed (the SDK's one-shot `--test_input`: a local
        test must not take, and shut down on, the project's queued jobs)."""
        self._claiming = True
        self.admissions.open()
        self._claiming_since = time.monotonic()
        loops = [(self._dispatch_loop, "dispatch")]
        if listen:
            try:  # the clock's measure, before the listeners' first docs are weighed against it
                self.beat(timeout=START_BEAT_TIMEOUT)
            except Exception as exc:
                log.warning("worker_beat_error", error=str(exc))
            self.listeners.start()
            loops += [(self._sweep_loop, "sweep"), (self._admission_loop, "admission"), (self._cancel_loop, "cancel")]
        else:
            self._swept.set()
        for target, name in loops:
            thread = threading.Thread(target=target, name=f"reconciler-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("reconciler_started", worker_id=self.store.worker_id, concurrency=self.concurrency, listening=listen)
        return self

    def stop_claiming(self) -> None:
        """Claim nothing more (at once, from a signal handler too); running jobs go on. A claim already in flight
        that wins is a running job like the others (Firestore may already show it `processing`): it runs within
        the grace period of `stop`, or is released."""
        self._swept.set()  # a dispatch loop waiting for the first sweep sees the stop at once
        with self._cv:
            self._claiming = False
            self._queue.clear()
            self._cancels.clear()
            self._cv.notify_all()
        self.admissions.close()

    def stop(self, grace: float = 20.0) -> None:
        """Stop claiming; let running jobs finish within `grace` seconds, then release them to the queue."""
        self.stop_claiming()
        self._stopping.set()
        self.listeners.close()
        if not self.wait_idle(grace):
            log.warning("shutdown_grace_exceeded", releasing=len(self._active))
            self.runner.release_running()
            self.wait_idle(LEAVING_DELIVERY_SECONDS + 5.0)  # a generated job's delivery, then its release's write
        # After its jobs: one waiting for Storage within the grace delivers where the probe hears it answer.
        if self.storage_outage is not None:
            self.storage_outage.close()
        # One bound for all: a loop held up in a Firestore call (a heartbeat's, with Firestore away) ends with the
        # process, and a bound each held an idle worker's exit up to 30 s.
        deadline = time.monotonic() + STOP_JOIN_SECONDS
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.listeners.close()  # one the sweep's watchdog restarted as `stop` began
        # Firestore away (its last call failed, or one still holds a loop up): one short try, the doc ages out anyway.
        away = self.takeovers.troubled or any(thread.is_alive() for thread in self._threads)
        try:
            workers.leave(
                self.store.client,
                self.store.worker_id,
                finished=self._finished,
                timeout=AWAY_LEAVE_TIMEOUT if away else workers.LEAVE_TIMEOUT,
            )
        except Exception as exc:
            log.warning("worker_doc_not_removed", error=str(exc))
        log.info("reconciler_stopped", worker_id=self.store.worker_id)

    def _may_claim(self, key: JobKey) -> bool:
        """(Under `_cv`.) Not while Storage is away, nor a job of a user found at USER_MAX_RUNNING elsewhere
        (`_limited`), nor of one with USER_MAX_RUNNING jobs here already
        (one completing on a slot it handed over among them: its claim would be refused, a transaction for
        nothing, a review counted one a job), nor one whose model is not `claimable`."""
        if self.storage_outage is not None and self.storage_outage.ongoing:
            return False
        if key.user_id in self._limited:
            return False
        if sum(other.user_id == key.user_id for other in self._active) >= self.store.limits.max_running:
            return False
        return self.claimable is None or self.claimable(key)

    def claimable_changed(self) -> None:
        """Candidates passed over may be claimable now (a model's load ended, Storage answers again)."""
        with self._cv:
            self._cv.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            # Slots too: a batch whose jobs all ended early (`_ended`) is still on its way out.
            while self._active or self._slots or self._delivering:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def wait_listening(self, timeout: float) -> bool:
        """True once every listener has delivered its first snapshot (writes before that may reach only the sweep)."""
        return self.listeners.wait_current(timeout)

    @property
    def claiming(self) -> bool:
        """Started, and not told to stop claiming."""
        return self._claiming

    @property
    def busy(self) -> int:
        with self._cv:
            return len(self._active)

    @property
    def candidates(self) -> int:
        """How many candidate jobs this worker holds in memory (bounded by `capacity`)."""
        with self._cv:
            return len(self._queue)

    def is_candidate(self, key: JobKey) -> bool:
        """Whether this worker holds `key` as a candidate (heard of, not yet taken)."""
        with self._cv:
            return key in self._queue

    # --- candidates ------------------------------------------------------------------------------------------

    def submit(
        self,
        key: JobKey,
        request: GenerationRequest | None = None,
        request_id: str | None = None,
        created_at: object = None,
    ) -> None:
        """A job this worker was asked to run (runsync): queued in fair order, by its doc's `created_at` where the
        doc had one (a doc its client wrote before the request, which may have waited for it: an audit saw such a
        job placed after another user's newer one), else as if just created. `request_id`: the RunPod job's id,
        which the job's log lines carry when this worker runs it (a doc the functions dispatched has its own,
        `runpod_job_id`)."""
        if not isinstance(created_at, datetime | int | float):  # a doc this request created: a server timestamp
            created_at = None
        if request_id:
            with self._cv:
                # Only while the job may still be claimed here: one running already (a listener heard of its doc a
                # moment before the request came) would keep its id until the bound (a soak audit), as would one
                # whose claim has just taken the ids (its lease noted, its thread not yet: a CI run's flake).
                if self._active.get(key) is None and key not in self._leases:
                    self._request_ids[key] = request_id
                    self._request_ids.move_to_end(key)
                while len(self._request_ids) > self._queue.capacity:
                    self._request_ids.popitem(last=False)
        self._offer(key, created_at, group=self._group(request) if request is not None else None)

    def _offer(
        self,
        key: JobKey,
        created_at=None,
        first: bool = False,
        *,
        group: Hashable | None = None,
        doc: dict | None = None,
    ) -> None:
        """Hold a candidate; `doc`: the queued doc it was heard of by (None: asked for, e.g. by runsync)."""
        created = timestamp(created_at, self.server_time())
        not_before = 0.0
        if doc is not None and self.placeholder_grace > 0 and not first and awaits_parameters(doc):
            not_before = max(created, self._server_time_at(self._claiming_since)) + self.placeholder_grace
        with self._cv:
            if not self._claiming or key in self._cancels:
                return
            if key in self._active:
                self._heard_running[key] = (created_at, group)
                return
            if self._queue.add(key, key.user_id, created, first=first, group=group, not_before=not_before):
                self._cv.notify_all()

    def _ready(self) -> tuple[bool, float | None]:
        """Whether a candidate may be handed out now, else how long until one may (None: none held)."""
        at = self._queue.ready_at(self._may_claim)
        if at is None:
            return False, None
        wait = at - self.server_time()
        return wait <= 0, max(wait, 0.01)

    def _admission_loop(self) -> None:
        # The listeners' first snapshots come in any order (the newest window's, newest first): admit only once
        # all are in, oldest first, so a backlog's oldest docs are the ones admitted.
        self.wait_listening(self.sweep_interval)
        self.admissions.run()

    def _group(self, request: GenerationRequest) -> Hashable | None:
        """The batch a job may join (None: it runs alone): only with BATCH_MAX > 1."""
        return self.batch_key(request) if self.batch_key is not None and self.batch_max > 1 else None

    def _doc_group(self, key: JobKey, doc: dict) -> Hashable | None:
        if self.batch_max <= 1:
            return None
        try:
            return self._group(parse_document(key.user_id, key.media_type, key.file_uid, doc))
        except Exception:
            return None  # a doc that breaks the contract runs alone (and is failed by its runner)

    def _withdraw(self, key: JobKey) -> None:
        with self._cv:
            self._queue.discard(key)
            self._heard_running.pop(key, None)
            if key not in self._active:  # no claim of it here to log its RunPod job id
                self._request_ids.pop(key, None)
        self.admissions.withdraw(key)

    def _cancel_queued(self, key: JobKey) -> None:
        with self._cv:
            self._queue.discard(key)
            if self._claiming:
                self._cancels.add(key)
                self._cv.notify_all()

    def _stop_running(self, key: JobKey) -> None:
        with self._cv:
            stop = self._stops.get(key)
        if stop is not None and not stop.is_set():
            log.info("job_cancel_requested", user_id=key.user_id, file_uid=key.file_uid)
            stop.set()

    def preempt(self, key: JobKey, lease: Lease) -> None:
        """Stop the run of a claim that is no longer the job's (its request restated it: `lifecycle.restate`).
        Only that exact claim: its lease is gone from the doc, so its fenced writes (the stop's included) land
        nowhere, and the job runs again from the queue with its new parameters."""
        with self._cv:
            if key in self._active and key not in self._leases:
                # Its claim landed, its answer is on the way: the claim stops its run once it has its lease (the
                # thread-safety review: heard in between, the restatement was dropped, and the run went on with
                # the old parameters until a lease renewal found the lease gone, up to 40 s).
                known = self._displaced.get(key)
                if known is None or lease.attempt > known.attempt:  # the latest (a listener may hear late)
                    self._displaced[key] = lease
                return
            stop = self._stops.get(key) if self._leases.get(key) == lease else None
        self._preempted(key, lease, stop)

    @staticmethod
    def _preempted(key: JobKey, lease: Lease, stop: threading.Event | None) -> None:
        if stop is not None and not stop.is_set():
            log.info("job_preempted", user_id=key.user_id, file_uid=key.file_uid, attempt=lease.attempt)
            stop.set()

    def _cancel_loop(self) -> None:
        # Apart from the claims: a user cancelling hundreds of queued jobs at once (each one write) held up every
        # claim of the worker until the last was failed (audit: 2,426 cancels, no job started for 11 minutes).
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._cancels or not self._claiming)
                if not self._claiming:
                    return
                cancelled = self._cancels.pop()
            self._drop(cancelled)

    def _dispatch_loop(self) -> None:
        self._swept.wait(FIRST_SWEEP_WAIT)
        while True:
            try:
                if not self._dispatch():
                    return
            except Exception as exc:  # a dead dispatch thread leaves a worker that listens and never claims again
                log.error("claim_loop_error", error=repr(exc), exc_info=exc)
                self._stopping.wait(DISPATCH_RETRY_SECONDS)

    def _dispatch(self) -> bool:
        """Wait for a free slot and a ready candidate, claim its batch and start it; False once claiming is over."""
        with self._cv:
            while self._claiming:
                if self._slots >= self.concurrency:
                    self._cv.wait()
                    continue
                ready, wait = self._ready()
                if ready:
                    break
                self._cv.wait(wait)
            if not self._claiming:
                return False
            keys = self._queue.pop_batch(
                self.batch_max,
                self._spread,
                self.store.limits.max_running,
                now=self.server_time(),
                where=self._may_claim,
                running=Counter(key.user_id for key in self._active),  # a batch's others within a user's limit too
            )
            stops = {}
            for key in keys:
                # Registered before the claim: a cancel heard while it is in flight still reaches the job.
                stops[key] = self._stops[key] = threading.Event()
                self._active[key] = None
            self._slots += bool(keys)
        if not keys:
            return True
        jobs: list[ClaimedJob] = []
        started = False
        try:
            # The rest of a batch is not claimed once the worker stops (they stay queued for other workers).
            for index, key in enumerate(keys):
                job = self._claim(key, start=index == 0 or self._claiming)
                if job is not None:
                    jobs.append(job)
            self._spread = 1 if jobs else SPREAD
            if jobs:
                name = f"job-{jobs[0].key.file_uid}" + (f"+{len(jobs) - 1}" if len(jobs) > 1 else "")
                thread = threading.Thread(
                    target=self._run, args=([(job, stops[job.key]) for job in jobs],), name=name, daemon=True
                )
                with self._cv:
                    for job in jobs:
                        self._active[job.key] = thread
                thread.start()  # "can't start new thread" where the process is out of threads
                started = True
        except BaseException:
            for job in jobs:  # claimed and never to run: back to the queue now rather than when its lease ends
                quietly(lambda job=job: release(self.store, job), job)
            raise
        finally:
            if not started:
                self._settle([(key, stops[key]) for key in keys])
        return True

    def _claim(self, key: JobKey, *, start: bool = True) -> ClaimedJob | None:
        """Claim a candidate; None when it is not ours (taken, finished, or its user at USER_MAX_RUNNING), or
        when not to `start` (only forget it)."""
        job = None
        limited: list[JobKey] = []
        try:
            if start:
                # Tried again there on errors, knowing its earlier tries. An expired lease is taken over only when
                # the sweep would take it (listener/takeovers.py), whatever offered the key: a runsync, a key re-offered
                # after a failed claim (the fencing review: the deferral after an outage held in the sweep alone).
                job = self.store.claim(key, takeover=self.takeovers.allowed(), at_limit=limited.append)
        except Exception as exc:
            log.warning("claim_error", path=key.path, error=str(exc))
        if job is None:
            with self._cv:
                self._stops.pop(key, None)
                self._active.pop(key, None)
                self._displaced.pop(key, None)
                self._heard_running.pop(key, None)
                self._request_ids.pop(key, None)  # not ours: the worker that has it logs it
                if start and any(other.user_id == key.user_id for other in self._active):
                    self._held_back.add(key.user_id)
                if limited:
                    self._limited.add(key.user_id)
                self._cv.notify_all()
            return None
        with self._cv:
            request_id = self._request_ids.pop(key, None)
            # At once, not when its batch's last claim returns: a restatement heard meanwhile (`preempt`) finds the
            # claim and stops its run, which otherwise ran its old parameters to its next lease renewal.
            self._leases[key] = job.lease
            displaced = self._displaced.pop(key, None) == job.lease
            stop = self._stops.get(key) if displaced else None
        if request_id and not job.doc.get(RUNPOD_JOB_ID):
            job.doc[RUNPOD_JOB_ID] = request_id  # the runner's log lines carry it as requestId
        request_id = job.doc.get(RUNPOD_JOB_ID)
        log.info(
            "job_claimed",
            user_id=key.user_id,
            file_uid=key.file_uid,
            attempt=job.lease.attempt,
            **({"requestId": request_id} if isinstance(request_id, str) and request_id else {}),
        )
        self._preempted(key, job.lease, stop)
        return job

    def _drop(self, key: JobKey) -> None:
        """Fail a queued job its owner cancelled: one short write, no slot needed."""
        with self._cv:
            self._request_ids.pop(key, None)
        try:
            if self.store.drop(key):
                log.info("job_cancelled", user_id=key.user_id, file_uid=key.file_uid, during="queue")
        except Exception as exc:
            log.warning("cancel_error", path=key.path, error=str(exc))

    def _hand_over(self, handed: threading.Event) -> None:
        """The device is done with a batch: its slot goes to the next claim while its jobs' files are encoded and
        stored and they complete (CPU work, and round trips to Firestore and Storage, the device would otherwise sit
        out: a second or more at a far region's latency), unless CONCURRENCY batches deliver so already. `handed` says it
        did. A Storage that fails the upload costs one job, not two: the next job's upload waits for Storage
        (`JobRunner._upload`)."""
        with self._cv:
            if not handed.is_set() and self._delivering < self.concurrency:
                handed.set()
                self._slots -= 1
                self._delivering += 1
                self._cv.notify_all()

    def _run(self, jobs: list[tuple[ClaimedJob, threading.Event]]) -> None:
        lost: list[ClaimedJob] = []
        handed = threading.Event()  # its slot handed over, its generation over (`_hand_over`)
        stops = {job.key: stop for job, stop in jobs}
        ended: set[JobKey] = set()  # ended while the batch went on, and settled then (`_ended`)

        def end(job: ClaimedJob, outcome: RunOutcome) -> None:
            ended.add(job.key)
            self._ended(job, stops[job.key], outcome)

        try:
            # Split by the batch key of each doc as claimed: a doc changed since it was offered runs on its own.
            batches: dict[Hashable, list[tuple[ClaimedJob, threading.Event]]] = {}
            for job, stop in jobs:
                group = self._doc_group(job.key, job.doc) if len(jobs) > 1 else None
                batches.setdefault(group if group is not None else job.key, []).append((job, stop))
            groups = list(batches.values())
            for index, batch in enumerate(groups):
                if index:  # it waited while the groups before it ran: still this claim's, and its cancel heard?
                    batch, gone = self._renewed(batch)
                    for job in gone:
                        end(job, RunOutcome.LOST)
                # The later groups' leases kept meanwhile (a review: unrenewed, they ran out while a group ran, and
                # another worker took them over: run twice).
                waiting = [job for later in groups[index + 1 :] for job, _ in later]
                try:
                    with self._renewing(waiting):
                        # The last group's slot is handed over (the groups before it keep it for the next group).
                        last = index == len(groups) - 1
                        generated = (lambda: self._hand_over(handed)) if last else None
                        outcomes = self.runner.run_batch(batch, on_generated=generated, on_ended=end) if batch else []
                except Exception as exc:  # a bug in one group: the others still run (a review: left to their leases)
                    log.error(
                        "job_runner_crashed", error=repr(exc), exc_info=exc, paths=[job.key.path for job, _ in batch]
                    )
                    continue
                with self._cv:
                    self._finished += sum(outcome in (RunOutcome.COMPLETED, RunOutcome.FAILED) for outcome in outcomes)
                lost += [
                    job
                    for (job, _), outcome in zip(batch, outcomes, strict=True)
                    if outcome == RunOutcome.LOST and job.key not in ended
                ]
        except BaseException as exc:  # never let a job thread die silently with a slot held
            log.error("job_runner_crashed", error=repr(exc), exc_info=exc, paths=[job.key.path for job, _ in jobs])
        finally:
            heard = self._settle([(job.key, stop) for job, stop in jobs], delivering=handed.is_set())
        for job in lost:
            self._offer_again(job, heard.get(job.key))
        self._look_again({job.key.user_id for job, _ in jobs})

    def _ended(self, job: ClaimedJob, stop: threading.Event, outcome: RunOutcome) -> None:
        """A job of a batch ended while the batch goes on (the runner's `on_ended`, or left out of its group): it
        no longer runs here, and one lost (restated, most likely) is a candidate again now, not once the batch
        has delivered, as the newest (the batching review: on a one-slot worker a newer batch ran before it)."""
        with self._cv:
            heard = self._forget(job.key, stop)
            self._cv.notify_all()  # its user's count here went down
        if outcome == RunOutcome.LOST:
            self._offer_again(job, heard)
        self._look_again({job.key.user_id})

    def _offer_again(self, job: ClaimedJob, heard: tuple[object, Hashable | None] | None) -> None:
        """A job lost here (queued again by a restatement, or taken over: a claim tells which), offered in its
        place: as a listener or runsync last heard of it while it ran here, else as its doc was claimed (a runsync
        that created the doc knew no `created_at` yet)."""
        created_at, group = heard if heard is not None else (None, None)
        if created_at is None:
            created_at = job.doc.get("created_at")
        if group is None:
            group = self._doc_group(job.key, job.doc)
        self._offer(job.key, created_at, group=group)

    @contextmanager
    def _renewing(self, jobs: list[ClaimedJob]) -> Iterator[None]:
        """`jobs`' leases renewed, as their heartbeats would, while the block runs."""
        if not jobs:
            yield
            return
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.runner.renew_interval):
                for job in jobs:
                    quietly(lambda job=job: self.store.renew(job), job)

        thread = threading.Thread(target=renew, name="renew-waiting", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=5)

    def _renewed(
        self, batch: list[tuple[ClaimedJob, threading.Event]]
    ) -> tuple[list[tuple[ClaimedJob, threading.Event]], list[ClaimedJob]]:
        """A group of a split batch, about to run after the others: each job's lease renewed (its cancel, which the
        renewal reads, heard), and those no longer this claim's left out, to be offered again. A renewal that
        failed (Firestore away) keeps its job: the run's own heartbeat tries again."""
        held, gone = [], []
        for job, stop in batch:
            renewal = quietly(lambda job=job: self.store.renew(job), job)
            if renewal is not None and not renewal:
                log_lost(
                    log, "lease_lost", job, getattr(renewal, "lost_to", None), when="while its batch's other group ran"
                )
                gone.append(job)
                continue
            if renewal is not None and renewal.cancel_requested:
                stop.set()
            held.append((job, stop))
        return held, gone

    def _look_again(self, users: set[str]) -> None:
        """The queued docs of `users` whose claim here was held back while one of their jobs ran here, offered
        again now that one ended: nothing else offers them (their docs did not change; the usage doc is not
        listened to), and the sweep found them up to SWEEP_INTERVAL_SECONDS later (a latency audit: a user's third
        job started 6-9 s after their first ended, with a 10 s sweep). A look-up each, of their oldest."""
        with self._cv:
            if self._limited & users:  # one of their jobs ended here: their count went down
                self._limited -= users
                self._cv.notify_all()
            users = users & self._held_back
            self._held_back -= users
            if not self._claiming:
                return
        for user in sorted(users):
            for media in MEDIA_TYPES:
                try:
                    found = self._sweeper.oldest_queued(user, media)
                except Exception as exc:  # the sweep finds them
                    log.warning("claim_error", user_id=user, error=str(exc))
                    continue
                for snapshot in found:
                    self._found(JobKey(user, media, snapshot.id), snapshot, snapshot.to_dict() or {})

    def _settle(
        self, claims: list[tuple[JobKey, threading.Event]], *, delivering: bool = False
    ) -> dict[JobKey, tuple[object, Hashable | None]]:
        """The slot of a batch of `claims` (each a key and its claim's stop signal) is free (`delivering`: its
        delivery's; it handed its slot over): none of them runs here any more. Returns what was heard of them
        meanwhile (`_heard_running`)."""
        heard = {}
        with self._cv:
            for key, stop in claims:
                if (latest := self._forget(key, stop)) is not None:
                    heard[key] = latest
            if delivering:
                self._delivering -= 1
            else:
                self._slots -= 1
            self._cv.notify_all()
        return heard

    def _forget(self, key: JobKey, stop: threading.Event) -> tuple[object, Hashable | None] | None:
        """(Under `_cv`.) The claim of `key` whose stop signal is `stop` no longer runs here: its bookkeeping goes,
        unless a later claim of the key holds it already (one ended early in a batch is claimed again while the
        batch goes on). Returns what was heard of it meanwhile."""
        if self._stops.get(key) is not stop:
            return None
        for kept in (self._active, self._stops, self._leases, self._displaced):
            kept.pop(key, None)
        return self._heard_running.pop(key, None)

    # --- what the listeners hear, and the sweep (also their watchdog) -------------------------------------------

    def _heard_queued(self, key: JobKey, doc: dict) -> None:
        self._stop_if_queued_again(key, doc)
        self.admissions.hear(key, doc, timestamp(doc.get("created_at"), self.server_time()))
        self._offer(key, doc.get("created_at"), group=self._doc_group(key, doc), doc=doc)

    def _stop_if_queued_again(self, key: JobKey, doc: dict) -> None:
        """A job running here shows up queued, still carrying this claim's attempt: its request restated it on
        another worker (`lifecycle.restate` keeps the attempt; the doc before this claim had one fewer, and a
        release one fewer again), so this run is stale. Stopped now rather than at its next lease renewal."""
        with self._cv:
            lease = self._leases.get(key)
            if lease is None and key in self._active and isinstance(doc.get("attempts"), int):
                lease = Lease(self.store.worker_id, doc["attempts"])  # a claim on its way: `preempt` keeps it
        if lease is not None and doc.get("attempts") == lease.attempt:
            self.preempt(key, lease)

    def _sweep_loop(self) -> None:
        # A doc written while a listener is still starting can be missed by it (seen on the emulator): sweep
        # once as soon as the listeners are current, instead of a whole interval later.
        self.wait_listening(self.sweep_interval)
        interval = 0.0
        failed = 0  # sweeps in a row that failed (Firestore away): the first one after says it is over
        while not self._stopping.wait(interval):
            interval = self.sweep_interval
            started = time.monotonic()
            try:
                self.beat()
            except Exception as exc:
                self.takeovers.failed(exc)
                log.warning("worker_beat_error", error=str(exc))
            else:
                self.takeovers.answered(time.monotonic() - started)
            try:
                self.sweep()
            except Exception as exc:
                failed += 1
                self.takeovers.failed(exc)
                log.warning("sweep_error", error=str(exc), failed_sweeps=failed)
                if failed == PAUSE_LISTENERS_AFTER and transient(exc):
                    self._pause_listeners(failed)
            else:
                self.takeovers.answered(self._sweeper.slowest_call)
                if self.listeners.paused:  # a whole sweep answered: the listeners again (`_watchdog` waited)
                    self.listeners.paused = False
                    for media in MEDIA_TYPES:
                        self._watchdog(media, False)
                if failed:
                    deferred = self.takeovers.seconds_left()
                    log.info("sweep_recovered", failed_sweeps=failed, takeovers_in_seconds=round(deferred, 1))
                failed = 0
            self._swept.set()

    def _pause_listeners(self, failed: int) -> None:
        """Firestore away for sweeps in a row: the listeners' streams reopen at once, without end, while it is (a
        resilience review: six listeners tried 32,000 times in a 15 s outage, 40% of a core on the GIL beside the
        generation). Closed until a whole sweep answers again (one that failed part-way, its first media type's
        queries answered, restarted none: they reopened without pause again), then listened to again
        (`listener_restarted`)."""
        log.info("listeners_paused", failed_sweeps=failed)
        self.listeners.pause()

    def beat(self, timeout: float = workers.CALL_TIMEOUT) -> None:
        """This worker's heartbeat (`workers/{worker_id}`): also the start-up check that it may write Firestore,
        and the measure of this host's clock against Firestore's."""
        sent, started = time.time(), time.monotonic()
        written = workers.beat(
            self.store.client,
            self.store.worker_id,
            busy=self.busy,
            concurrency=self.concurrency,
            started_at=datetime.fromtimestamp(self._server_time_at(self._started_mono), UTC),
            finished=self._finished,
            code_version=code_version(),
            claims_paused="storage" if self.storage_outage is not None and self.storage_outage.ongoing else None,
            beat_seconds=self.sweep_interval,
            timeout=timeout,
        )
        took = time.monotonic() - started
        if isinstance(written, datetime) and took <= CLOCK_SAMPLE_MAX_SECONDS:
            with self._cv:  # a candidate deferred by the old measure may be due by the new one
                self._clock_offset = written.timestamp() - (sent + took / 2)
                self._cv.notify_all()

    def server_time(self) -> float:
        """Now by Firestore's clock (seconds since the epoch), as the last heartbeat measured it."""
        return time.time() + self._clock_offset

    def _server_time_at(self, mark: float) -> float:
        """The server time of `mark`, a `time.monotonic()` reading."""
        return self.server_time() - (time.monotonic() - mark)

    def sweep(self) -> int:
        """One pass of the sweep (listener/sweep.py): its ordered queries offer the oldest queued and the
        lease-expired jobs, and restart listeners that died or missed a doc; then its scans and look-ups."""
        self._sweeper.slowest_call = 0.0
        found = 0
        for media in MEDIA_TYPES:
            ordered, missed = self._sweeper.ordered(media, self.sweep_interval)
            found += ordered
            self._watchdog(media, missed)
        with self._cv:  # offered again, their oldest among them: tried again, one claim each
            if self._limited:
                self._limited.clear()
                self._cv.notify_all()
        # The queue's oldest are candidates now: a first claim waits no longer (a latency audit: the scans below
        # are 5 calls more, one after another, on a cold start that a waiting request woke).
        self._swept.set()
        return found + self._sweeper.scans() + self._sweeper.discover()

    def _not_ours(self, path: str) -> None:
        """The queries are collection groups, so another app's `images` or `videos` docs with a `status` of the
        contract's match them too. They are skipped, yet they take places in the queries' bounded pages, which
        could hide this product's own jobs (a client who can write such docs elsewhere in the project): said to the
        operator once a doc, for the first FOREIGN_REPORTED of them."""
        if path in self._foreign or len(self._foreign) >= FOREIGN_REPORTED:
            return
        self._foreign.add(path)
        log.warning(
            "foreign_doc_skipped",
            path=path,
            why="an images/videos doc outside generations/ matches the worker's queries; "
            "see the README's 'Into an existing Firebase project'",
        )

    def _found(self, key: JobKey, snapshot, doc: dict, expired: bool = False) -> None:
        """A doc a query found queued (or processing under an expired lease): a candidate, admitted first where
        no function admitted it; failed at once where its owner cancelled it."""
        if doc.get(lifecycle.CANCEL_REQUESTED) and doc.get("status") == lifecycle.QUEUED:
            self._cancel_queued(key)
            return
        created = doc.get("created_at") or updated(snapshot)
        if not expired:
            # Restated while it ran here, in a backlog's middle that no listener's window holds (an audit: the stale
            # run went on to its next progress write, up to 5 s, its user's running count already given back).
            self._stop_if_queued_again(key, doc)
            self.admissions.hear(key, doc, timestamp(created, 0.0))
        self._offer(key, created, first=expired, group=self._doc_group(key, doc), doc=doc)

    def _watchdog(self, media: str, missed: bool) -> None:
        if self._claiming:
            self.listeners.watchdog(media, missed)
