"""Admission of client docs: a queued doc its client wrote, which no function saw first, is admitted against its
user's limits (or refused) as soon as the reconciler hears of it, not when a slot claims it (a claim takes one at a
time, so a backlog would never count). One thread admits them, oldest first (`JobStore.admit`)."""

from __future__ import annotations

import heapq
import itertools
import threading

import structlog

from firegen_core import lifecycle, quota
from firegen_core.claims import WorkerJobs
from firegen_core.jobs import JobKey

log = structlog.get_logger("listener.admission")


class Admissions:
    def __init__(self, store: WorkerJobs, capacity: int):
        self.store = store
        # Bounded, as the candidates are: a doc left out is admitted by its claim, or heard of again.
        self.capacity = capacity
        self._open = False
        self._cv = threading.Condition()
        # A heap, oldest `created_at` first, and each held key's entry in it (a key withdrawn meanwhile leaves its
        # entry, passed over). Looked up by key: a scan of the heap per doc heard took 16 s of a listener's
        # callback for a 10,000-doc flood.
        self._heap: list[tuple[float, int, JobKey]] = []
        self._held: dict[JobKey, int] = {}
        self._seq = itertools.count()

    def open(self) -> None:
        with self._cv:
            self._open = True

    def close(self) -> None:
        """Admit nothing more; `run` returns."""
        with self._cv:
            self._open = False
            self._heap.clear()
            self._held.clear()
            self._cv.notify_all()

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, key: object) -> bool:
        return key in self._held

    def hear(self, key: JobKey, doc: dict, created: float) -> None:
        """A queued doc heard of (`created`: its `created_at` in seconds): held for admission unless admitted
        already or cancelled."""
        if doc.get(quota.ADMITTED) or doc.get(lifecycle.CANCEL_REQUESTED):
            return
        with self._cv:
            if self._open and key not in self._held and len(self._held) < self.capacity:
                seq = next(self._seq)
                heapq.heappush(self._heap, (created, seq, key))
                self._held[key] = seq
                self._cv.notify()

    def withdraw(self, key: JobKey) -> None:
        """Gone from the queue (refused, cancelled, another's): nothing to admit."""
        with self._cv:
            self._held.pop(key, None)
            if not self._held:
                self._heap.clear()

    def oldest(self) -> JobKey:
        """The oldest held key, no longer held; one must be."""
        while True:  # `_held` holds one at least: its entry is in the heap
            _, seq, key = heapq.heappop(self._heap)
            if self._held.get(key) == seq:
                del self._held[key]
                return key

    def next(self) -> JobKey | None:
        """The oldest held key once there is one (no longer held); None once closed."""
        with self._cv:
            self._cv.wait_for(lambda: self._held or not self._open)
            return self.oldest() if self._open else None

    def run(self) -> None:
        """Admit each held doc, oldest first, until `close`."""
        while (key := self.next()) is not None:
            try:
                written = self.store.admit(key).written
            except Exception as exc:  # the claim admits it in any case
                log.warning("admission_error", path=key.path, error=str(exc))
                continue
            if written and written.get("status") == lifecycle.FAILED:
                log.info("job_refused", user_id=key.user_id, file_uid=key.file_uid, error_type=written["error_type"])
