"""The reconciler: finds work in Firestore and claims it when a local generation slot is free.

Three sources feed one queue of candidate jobs:
- `on_snapshot` listeners on queued docs (collection-group queries over `images` and `videos`): the fast path;
- a periodic sweep that queries queued docs and expired leases: the safety net for anything a listener missed
  (and the only way to see a lease run out, which no document write announces; such a job, a dead worker's,
  goes first in line: it is older than anything queued since);
- `submit`, from the runsync handler, for the job it just accepted.
The sweep is also the watchdog: a listener that closed, or that stayed silent about a queued doc the sweep
found, is restarted. A candidate is only a hint; the claim transaction decides, so many workers can race.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime

import structlog
from google.cloud.firestore import FieldFilter

from firegen_core import lifecycle
from firegen_core.jobs import MEDIA_TYPES, JobKey, JobStore

from .runner import JobRunner

log = structlog.get_logger("listener.reconciler")

SWEEP_LIMIT = 50
SPREAD = 8


class Reconciler:
    def __init__(
        self,
        store: JobStore,
        runner: JobRunner,
        *,
        concurrency: int = 1,
        sweep_interval: float = 10.0,
    ):
        self.store = store
        self.runner = runner
        self.concurrency = concurrency
        self.sweep_interval = sweep_interval
        self._cv = threading.Condition()
        self._pending: OrderedDict[JobKey, None] = OrderedDict()
        # First in line: submitted through runsync (this worker said it would run them), or found by the sweep
        # with an expired lease (a dead worker's job, older than anything queued since).
        self._first: set[JobKey] = set()
        self._active: dict[JobKey, threading.Thread | None] = {}  # None: being claimed
        self._claiming = False
        self._stopping = threading.Event()
        self._watches: dict[str, object] = {}
        self._heard: dict[str, float] = {}  # media type → when its listener last delivered a snapshot
        self._current: dict[str, threading.Event] = {}  # media type → its listener delivered its first snapshot
        self._threads: list[threading.Thread] = []

    # --- lifecycle of the reconciler itself ------------------------------------------------------------------

    def start(self) -> Reconciler:
        self._claiming = True
        for media in MEDIA_TYPES:
            self._listen(media)
        for target, name in ((self._dispatch_loop, "dispatch"), (self._sweep_loop, "sweep")):
            thread = threading.Thread(target=target, name=f"reconciler-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("reconciler_started", worker_id=self.store.worker_id, concurrency=self.concurrency)
        return self

    def stop_claiming(self) -> None:
        """Claim nothing more (at once, from a signal handler too); running jobs go on. A claim already in flight
        that wins is given straight back to the queue."""
        with self._cv:
            self._claiming = False
            self._pending.clear()
            self._first.clear()
            self._cv.notify_all()

    def stop(self, grace: float = 20.0) -> None:
        """Stop claiming; let running jobs finish within `grace` seconds, then release them to the queue."""
        self.stop_claiming()
        self._stopping.set()
        for watch in self._watches.values():
            _close(watch)
        if not self.wait_idle(grace):
            log.warning("shutdown_grace_exceeded", releasing=len(self._active))
            self.runner.abort.set()
            self.wait_idle(30.0)
        for thread in self._threads:
            thread.join(timeout=5)
        log.info("reconciler_stopped", worker_id=self.store.worker_id)

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def wait_listening(self, timeout: float) -> bool:
        """True once every listener has delivered its first snapshot (writes before that may reach only the sweep)."""
        deadline = time.monotonic() + timeout
        return all(event.wait(max(deadline - time.monotonic(), 0)) for event in list(self._current.values()))

    @property
    def busy(self) -> int:
        with self._cv:
            return len(self._active)

    # --- candidates ------------------------------------------------------------------------------------------

    def submit(self, key: JobKey) -> None:
        """A job this worker was asked to run (runsync): first in line for the next free slot."""
        self._offer(key, first=True)

    def _offer(self, key: JobKey, first: bool = False) -> None:
        with self._cv:
            if not self._claiming or key in self._active:
                return
            self._pending[key] = None
            if first:
                self._first.add(key)
            self._cv.notify_all()

    def _next_candidate(self) -> JobKey:
        """A job first in line (asked for through runsync, or taken over from a dead worker), else one of the
        oldest few at random.

        Every idle worker hears of the same queued docs at the same moment; if all of them went for the oldest,
        they would all race for one doc and all but one would lose a round trip. A random pick among the
        oldest few spreads them over the queue while keeping it roughly first-in, first-out.
        """
        first = next((key for key in self._pending if key in self._first), None)
        key = first or random.choice(list(itertools.islice(self._pending, SPREAD)))
        del self._pending[key]
        self._first.discard(key)
        return key

    def _dispatch_loop(self) -> None:
        while True:
            with self._cv:
                while self._claiming and not (self._pending and len(self._active) < self.concurrency):
                    self._cv.wait()
                if not self._claiming:
                    return
                key = self._next_candidate()
                self._active[key] = None  # a claim in flight holds the slot, and stop() waits for it
            job = None
            try:
                job = self.store.claim(key)
                if job is not None and not self._claiming:  # stopped while the claim was on its way
                    log.info("job_claimed_after_stop", released=self.store.release(job), path=key.path)
                    job = None
            except Exception as exc:
                log.warning("claim_error", path=key.path, error=str(exc))
            if job is None:
                with self._cv:
                    self._active.pop(key, None)
                    self._cv.notify_all()
                continue
            log.info("job_claimed", user_id=key.user_id, file_uid=key.file_uid, attempt=job.lease.attempt)
            thread = threading.Thread(target=self._run, args=(job,), name=f"job-{key.file_uid}", daemon=True)
            with self._cv:
                self._active[key] = thread
            thread.start()

    def _run(self, job) -> None:
        try:
            self.runner.run(job)
        except BaseException as exc:  # never let a job thread die silently with a slot held
            log.error("job_runner_crashed", error=repr(exc), path=job.key.path)
        finally:
            with self._cv:
                self._active.pop(job.key, None)
                self._cv.notify_all()

    # --- listeners and the sweep (also the watchdog) ---------------------------------------------------------

    def _queued(self, media: str):
        return self.store.client.collection_group(media).where(filter=FieldFilter("status", "==", lifecycle.QUEUED))

    def _listen(self, media: str) -> None:
        current = self._current[media] = threading.Event()

        def on_snapshot(docs, changes, read_time):
            self._heard[media] = time.monotonic()
            current.set()
            for change in changes:
                if change.type.name in ("ADDED", "MODIFIED"):
                    self._offer_path(change.document.reference.path)

        self._heard[media] = time.monotonic()
        self._watches[media] = self._queued(media).on_snapshot(on_snapshot)

    def _offer_path(self, path: str, first: bool = False) -> None:
        try:
            self._offer(JobKey.from_path(path), first)
        except ValueError:
            pass  # an `images`/`videos` collection outside generations/: not ours

    def _sweep_loop(self) -> None:
        # A doc written while a listener is still starting can be missed by it (seen on the emulator): sweep
        # once as soon as the listeners are current, instead of a whole interval later.
        self.wait_listening(self.sweep_interval)
        interval = 0.0
        while not self._stopping.wait(interval):
            interval = self.sweep_interval
            try:
                self.sweep()
            except Exception as exc:
                log.warning("sweep_error", error=str(exc))

    def sweep(self) -> int:
        """Offer every queued or lease-expired job; restart listeners that died or missed a queued doc."""
        now = datetime.now(UTC)
        found = 0
        for media in MEDIA_TYPES:
            expired = (
                self.store.client.collection_group(media)
                .where(filter=FieldFilter("status", "==", lifecycle.PROCESSING))
                .where(filter=FieldFilter("lease_expires_at", "<", now))
            )
            missed = False
            for query in (self._queued(media), expired):
                for snapshot in query.limit(SWEEP_LIMIT).stream():
                    found += 1
                    self._offer_path(snapshot.reference.path, first=query is expired)
                    missed |= query is not expired and self._missed_by_listener(media, snapshot)
            watch = self._watches.get(media)
            if self._claiming and (missed or watch is None or getattr(watch, "_closed", False)):
                log.warning("listener_restarted", media_type=media, reason="silent" if missed else "closed")
                _close(watch)
                self._listen(media)
        return found

    def _missed_by_listener(self, media: str, snapshot) -> bool:
        """A queued doc older than a sweep that the listener has not spoken of since it was written."""
        updated = snapshot.update_time  # a protobuf Timestamp or a datetime, depending on the call path
        if updated is None:
            return False
        seconds = updated.timestamp() if isinstance(updated, datetime) else updated.seconds + updated.nanos / 1e9
        age = datetime.now(UTC).timestamp() - seconds
        return age > 2 * self.sweep_interval and time.monotonic() - self._heard.get(media, 0) > age


def _close(watch) -> None:
    if watch is not None:
        try:
            watch.unsubscribe()
        except Exception:
            pass
