"""The sweep: the reconciler's periodic reads of Firestore, the safety net for anything its listeners missed.

Each pass reads, per media type, the expired leases and the oldest queued docs (`ordered`: what a claim waits for
after a start); then, at a slower cadence, the docs no ordered query returns (`scans`); then, behind a backlog
longer than the oldest window, the oldest queued docs of the users with pending work whose oldest is not in that
window (`discover`). It only reads: every doc it finds goes to the reconciler's `found`, which decides what it is
(a candidate, a cancelled job, one to admit), and the claim decides whether it is still there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from google.cloud.firestore import DocumentSnapshot, Query

from firegen_core import lifecycle, quota
from firegen_core.claims import WorkerJobs
from firegen_core.jobs import BOUND, MEDIA_TYPES, JobKey

from .fairqueue import FairQueue
from .listeners import Listeners, queued_window
from .takeovers import Takeovers

log = structlog.get_logger("listener.sweep")

SWEEP_LIMIT = 50
# How often a sweep also reads a page of the processing docs for leases no query finds (missing or not a date),
# and one of the queued docs for those without `created_at`, which no ordered query finds.
UNLEASED_SCAN_SECONDS = 300.0
DISCOVER_USERS = 100  # users with pending work one sweep looks up beyond a full window (the next sweep: the next ones)
DISCOVER_PER_USER = 3  # each one's oldest queued docs offered
DISCOVER_MEMORY = 10_000  # (user, media type) pairs remembered as having nothing queued

# What the sweep found: its key, its snapshot, its data, and whether it is a processing doc whose lease ran out.
Found = Callable[[JobKey, DocumentSnapshot, dict, bool], None]


class Sweep:
    def __init__(
        self,
        store: WorkerJobs,
        listeners: Listeners,
        takeovers: Takeovers,
        candidates: FairQueue[JobKey],
        lock: threading.Condition,
        *,
        server_time: Callable[[], float],
        found: Found,
        not_ours: Callable[[str], None],
    ):
        self.store = store
        self.listeners = listeners
        self.takeovers = takeovers
        self.candidates = candidates  # the reconciler's, read under its `lock`
        self.lock = lock
        self.server_time = server_time
        self.found = found
        self.not_ours = not_ours
        # The longest one query of the current (or last) pass took, in seconds: reset by the pass (`reconciler.sweep`).
        self.slowest_call = 0.0
        # Per (media type, status), the last doc the last page of `_unqueried` read (None: start over).
        self._scan_after: dict[tuple[str, str], DocumentSnapshot | None] = {}
        self._unleased_due = 0.0  # by the monotonic clock
        # The last usage doc the last `discover` looked at, when there were more; per (user, media type), the
        # oldest doc it found, so that the user is not looked up again while that doc waits its turn here.
        self._discover_after: DocumentSnapshot | None = None
        self._discovered: dict[tuple[str, str], JobKey] = {}
        # Per (user, media type) whose look-up found nothing: the usage doc's update time then (a new job changes it).
        self._found_none: dict[tuple[str, str], object] = {}

    def ordered(self, media: str, interval: float) -> tuple[int, bool]:
        """The oldest queued and the lease-expired jobs of `media` (not within a lease of Firestore's return:
        listener/takeovers.py): how many, and whether its listener missed a queued doc older than a pass
        (`interval` seconds)."""
        now = datetime.fromtimestamp(self.server_time(), UTC)
        found, missed = 0, False
        sources = (
            (True, self._expired(media, now)),
            (False, self.read(queued_window(self.store, media, limit=SWEEP_LIMIT))),
        )
        for expired, snapshots in sources:
            for snapshot in snapshots:
                if self._take(snapshot, snapshot.to_dict() or {}, expired):
                    found += 1
                    missed |= not expired and self._missed_by_listener(media, snapshot, interval)
        return found, missed

    def scans(self) -> int:
        """The docs no ordered query returns: every UNLEASED_SCAN_SECONDS both statuses, else the queued ones
        without `created_at` where they may wait (`_undated`)."""
        if time.monotonic() < self._unleased_due:
            return self._unqueried([(media, lifecycle.QUEUED) for media in MEDIA_TYPES if self._undated(media)])
        unqueried = self._unqueried([(m, s) for m in MEDIA_TYPES for s in (lifecycle.PROCESSING, lifecycle.QUEUED)])
        # Where it found some, the next page at the next pass: a batch of them (an admin's import) runs at the
        # queue's pace, not a page every 5 minutes.
        self._unleased_due = time.monotonic() + (0.0 if unqueried else UNLEASED_SCAN_SECONDS)
        return unqueried

    def read(self, query: Query) -> list[DocumentSnapshot]:
        """A query's docs, its time counted in the pass's slowest call: what tells a call held up by an outage
        (takeovers.SLOW_CALL_SECONDS) is one call's time, not the pass's, many calls long behind a backlog (a
        resilience review: a healthy 5 s sweep stopped every takeover, a dead worker's job left `processing`)."""
        started = time.monotonic()
        try:
            return list(query.stream(**BOUND))
        finally:
            self.slowest_call = max(self.slowest_call, time.monotonic() - started)

    def _take(self, snapshot: DocumentSnapshot, doc: dict, expired: bool) -> bool:
        """A doc found, to the reconciler's `found`; False for one outside generations/ (said once, skipped)."""
        try:
            key = JobKey.from_path(snapshot.reference.path)
        except ValueError:
            self.not_ours(snapshot.reference.path)
            return False
        try:
            self.found(key, snapshot, doc, expired)
        except Exception as exc:  # one doc's surprise must not stop the pass over the others
            log.warning("sweep_error", path=key.path, error=str(exc))
        return True

    def _undated(self, media: str) -> bool:
        """Whether queued docs of `media` without `created_at` may wait: more are queued than the oldest window
        holds while it is not full (a count: one read). Behind a full window the scan's cadence finds them."""
        window, edge = self.listeners.window(media)
        if window is None or edge is not None:
            return False
        started = time.monotonic()
        try:
            # A list of each answer's results (its declared type says a flat list).
            answers: Any = self.store.queued(media).count().get(**BOUND)
            counted = answers[0][0].value
        finally:
            self.slowest_call = max(self.slowest_call, time.monotonic() - started)
        return int(counted) > len(window)

    def _expired(self, media: str, now: datetime) -> list[DocumentSnapshot]:
        """The processing docs of `media` whose lease ran out before `now`; none while takeovers wait, nor where
        the query itself was held up (Firestore away until just now)."""
        if not self.takeovers.allowed():
            return []
        found = self.read(self.store.expired(media, now, limit=SWEEP_LIMIT))
        return [] if self.takeovers.held_up(self.slowest_call) else found

    def _unqueried(self, scans: list[tuple[str, str]]) -> int:
        """Docs no ordered query returns, both an admin's writes (the contract's flows write neither): a
        `processing` doc whose lease is missing or not a date is claimable, but the expiry query compares dates; a
        `queued` one without `created_at` is outside every query ordered by it. Each scan reads one page of each
        status per media type in document order (`scans`), the next scan going on from there, so every one is read
        within a few scans at a bounded cost (before, each sweep read the first 50 queued docs, ~600 reads a minute
        a worker behind a backlog, and never the 51st: a scale review)."""
        found = 0
        for media, status in scans:
            after = self._scan_after.get((media, status))
            page = self.read(self.store.in_document_order(media, status, limit=SWEEP_LIMIT, after=after))
            self._scan_after[(media, status)] = page[-1] if len(page) == SWEEP_LIMIT else None
            for snapshot in page:
                doc = snapshot.to_dict() or {}
                if status == lifecycle.PROCESSING and isinstance(doc.get("lease_expires_at"), datetime):
                    continue  # the expiry query's
                if status == lifecycle.QUEUED and doc.get("created_at") is not None:
                    continue  # the ordered queries'
                found += self._take(snapshot, doc, status == lifecycle.PROCESSING)
        return found

    def discover(self) -> int:
        """Behind a backlog longer than the oldest window, a user whose queued docs were all written in its middle
        waited for everything older (audit: one job behind 374 of 61 other users), and one seen only through the
        newest window ran its newer docs first. So each pass looks up the oldest queued docs of users with
        pending work (their usage docs) whose oldest is not in the window, which holds every doc older than its
        far end. Nothing when the windows hold the whole queue."""
        ends = {media: self.listeners.far_end(media) for media in MEDIA_TYPES}
        with self.lock:
            # A look-up per user the candidates can still hold (each keeps one: FairQueue never pushes out a
            # user's only candidate): past that, what one pass found pushed out what the last had (2,000 users
            # behind a backlog, a scale review), and every pass looked up every user again, ~400 reads a worker
            # each sweep. The next users are looked up once claims have served some.
            room = self.candidates.capacity - self.candidates.users()
        edges = {media: edge for media, edge in ends.items() if edge is not None}  # the full windows
        if not edges or room <= 0:
            return 0
        start = self._discover_after
        users = self.read(self.store.users_with_pending(limit=DISCOVER_USERS, after=start))
        self._discover_after = users[-1] if len(users) == DISCOVER_USERS else None
        found = 0
        for at, usage in enumerate(users):
            counts = usage.to_dict() or {}
            running = int(quota.number(counts, "running"))
            if int(quota.number(counts, "pending")) <= running or running >= self.store.limits.max_running:
                continue  # nothing of theirs queued (pending counts running jobs too), or no claim of theirs may win
            if room <= 0:  # the next pass goes on from this user
                self._discover_after = users[at - 1] if at else start
                break
            for media, edge in edges.items():

                def of_media(key: JobKey, media: str = media) -> bool:
                    return key.media_type == media

                with self.lock:
                    oldest = self.candidates.oldest(usage.id, of_media)
                    known = self._discovered.get((usage.id, media))
                    waiting = known is not None and known in self.candidates
                none_since = self._found_none.get((usage.id, media))
                if waiting or (oldest is not None and oldest <= edge) or none_since == usage.update_time:
                    continue
                self._discovered.pop((usage.id, media), None)
                self._found_none[(usage.id, media)] = usage.update_time
                room -= 1
                for snapshot in self.read(self.store.oldest_queued(media, user_id=usage.id, limit=DISCOVER_PER_USER)):
                    found += 1
                    key = JobKey(usage.id, media, snapshot.id)
                    self._discovered.setdefault((usage.id, media), key)
                    self._found_none.pop((usage.id, media), None)
                    self._take(snapshot, snapshot.to_dict() or {}, False)
        with self.lock:  # what was found and has since been taken (or left the queue) is forgotten
            self._discovered = {user: key for user, key in self._discovered.items() if key in self.candidates}
        if len(self._found_none) > DISCOVER_MEMORY:
            self._found_none.clear()
        return found

    def oldest_queued(self, user_id: str, media: str) -> list[DocumentSnapshot]:
        """One user's oldest queued docs of `media`, as a look-up behind a backlog reads them."""
        return self.read(self.store.oldest_queued(media, user_id=user_id, limit=DISCOVER_PER_USER))

    def _missed_by_listener(self, media: str, snapshot: DocumentSnapshot, interval: float) -> bool:
        """A queued doc older than a pass that the listener has not spoken of since it was written."""
        seconds = updated(snapshot)
        return seconds is not None and self.listeners.missed(media, self.server_time() - seconds, interval)


def updated(snapshot: DocumentSnapshot) -> float | None:
    """When the doc was last written, in seconds since the epoch (None: not said)."""
    stamp: Any = snapshot.update_time  # a protobuf Timestamp or a datetime, depending on the call path
    if stamp is None:
        return None
    return stamp.timestamp() if isinstance(stamp, datetime) else stamp.seconds + stamp.nanos / 1e9
