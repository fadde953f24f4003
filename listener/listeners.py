"""The queue's listeners: `on_snapshot` watches of the queued docs and the cancel requests, per media type.

Per media type, three collection-group listeners:
- the oldest LISTEN_LIMIT queued docs by `created_at` (named for the media type: "images");
- the newest NEWEST_LIMIT ("images:newest"), so a new user's job is heard at once behind another user's backlog
  longer than the first window;
- the cancel requests of unfinished jobs ("images:cancel").
What each one hears goes to the reconciler's handlers (`on_queued`, `on_gone`, `on_cancel`, `on_stop`). A doc
that leaves both queued windows because it was claimed, failed or cancelled is gone; one pushed out past a full
window's far end (`pushed_out`) is still queued and keeps its place. The reconciler's sweep is their watchdog
(`watchdog`: a listener that closed, or that stayed silent about a queued doc the sweep found, is restarted) and
reads their windows (`window`), and the listeners are closed while Firestore is away (`pause`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog
from google.cloud.firestore import Query

from firegen_core import lifecycle
from firegen_core.claims import WorkerJobs
from firegen_core.jobs import MEDIA_TYPES, JobKey

from . import watching
from .fairqueue import timestamp

log = structlog.get_logger("listener.listeners")

LISTEN_LIMIT = 100  # the oldest queued docs each listener holds (per media type)
NEWEST_LIMIT = 20  # the newest queued docs a second listener holds: new arrivals behind a long backlog
CANCEL_LIMIT = 100  # cancel requests of unfinished jobs a listener holds
WINDOWS = {"oldest": (Query.ASCENDING, LISTEN_LIMIT), "newest": (Query.DESCENDING, NEWEST_LIMIT)}
CANCEL = "cancel"
# How much earlier than a doc's write its listener must have spoken last to count as silent about it: more than
# the error of this worker's measure of Firestore's clock (a heartbeat's round trip over 1 s is not sampled).
HEARD_MARGIN_SECONDS = 1.0
REOPENS_PER_10_S = 5  # a listener's stream reopened after failures (`_ReopenPace`): as api-core's `throttle_reopen`

Handler = Callable[[JobKey], None]


def queued_window(store: WorkerJobs, media: str, window: str = "oldest", limit: int | None = None) -> Query:
    """Queued docs of one media type, oldest (or newest) `created_at` first, bounded."""
    direction, default = WINDOWS[window]
    return store.queued(media).order_by("created_at", direction=direction).limit(limit or default)


class Listeners:
    def __init__(
        self,
        store: WorkerJobs,
        *,
        on_queued: Callable[[JobKey, dict], None],
        on_gone: Handler,
        on_cancel: Handler,
        on_stop: Handler,
        not_ours: Callable[[str], None],
    ):
        self.store = store
        self.on_queued = on_queued  # a queued doc heard (new or changed)
        self.on_gone = on_gone  # a doc that left the queue
        self.on_cancel = on_cancel  # a queued doc its owner cancelled
        self.on_stop = on_stop  # a processing doc its owner cancelled
        self.not_ours = not_ours  # a doc outside generations/ that matched a query
        self.paused = False  # closed while Firestore is away (`pause`)
        self._lock = threading.Lock()
        self._watches: dict[str, Any] = {}  # listener name ("images", "images:newest", "videos:cancel") → watch
        self._windows: dict[str, set[str]] = {}  # listener name → doc paths in its current result
        self._edges: dict[str, float | None] = {}  # listener name → its full window's far end (`_far_end`)
        self._heard: dict[str, float] = {}  # listener name → when it last delivered a snapshot
        self._current: dict[str, threading.Event] = {}  # listener name → it delivered its first snapshot

    def start(self) -> None:
        for media in MEDIA_TYPES:
            for window in (*WINDOWS, CANCEL):
                self._listen(media, window)

    def close(self) -> None:
        # A watch's close waits up to a second for its stream's thread (google.api_core.bidi), which a Firestore
        # away holds in its reconnect backoff: closed all at once, not one second each after another.
        closing = [threading.Thread(target=_close, args=(watch,), daemon=True) for watch in self._watches.values()]
        for thread in closing:
            thread.start()
        for thread in closing:
            thread.join()

    def pause(self) -> None:
        """Closed while Firestore is away, until `paused` is cleared and `watchdog` restarts them."""
        self.paused = True
        self.close()

    def wait_current(self, timeout: float) -> bool:
        """True once every listener has delivered its first snapshot (writes before that may reach only the sweep)."""
        deadline = time.monotonic() + timeout
        return all(event.wait(max(deadline - time.monotonic(), 0)) for event in list(self._current.values()))

    def window(self, media: str) -> tuple[set[str] | None, float | None]:
        """The oldest window of `media`: the paths in its latest snapshot (None: none yet), and its far end
        (None: not full)."""
        name = _name(media, "oldest")
        with self._lock:
            return self._windows.get(name), self._edges.get(name)

    def far_end(self, media: str) -> float | None:
        """The `created_at` at the far end of the oldest window of `media`, which holds every queued doc older than
        it; None while that window is not full."""
        return self.window(media)[1]

    def watchdog(self, media: str, missed: bool) -> None:
        """Restart the listeners of `media` that closed, and both queued windows where `missed` (a queued doc the
        sweep found reached neither); none while paused."""
        if self.paused:
            return
        for window in (*WINDOWS, CANCEL):
            name = _name(media, window)
            watch = self._watches.get(name)
            silent = missed and window in WINDOWS
            if silent or watch is None or getattr(watch, "_closed", False):
                log.warning("listener_restarted", listener=name, reason="silent" if silent else "closed")
                _close(watch)
                self._listen(media, window)

    def missed(self, media: str, age: float, sweep_interval: float) -> bool:
        """Whether the oldest window of `media` has said nothing since a queued doc older than two sweeps, `age`
        seconds old, was written: a listener silent about it. By a margin: `age` is by Firestore's clock as this
        worker measures it, to within half a heartbeat's round trip, and a listener speaks a few milliseconds
        after a write (a leak audit: a video waiting its turn, its window quiet, restarted both of its listeners
        as "silent" in half the cases, each restart reading the window again)."""
        silence = time.monotonic() - self._heard.get(_name(media, "oldest"), 0)
        return age > 2 * sweep_interval and silence > age + HEARD_MARGIN_SECONDS

    def _listen(self, media: str, window: str) -> None:
        name = _name(media, window)
        current = self._current[name] = threading.Event()
        if window == CANCEL:
            query, handle = self._cancel_requests(media), self._on_cancel_change
        else:
            query, handle = queued_window(self.store, media, window), self._on_queue_change

        def on_snapshot(docs, changes, read_time):
            with self._lock:
                self._windows[name] = {doc.reference.path for doc in docs}
                self._edges[name] = _far_end(docs, window)
            self._heard[name] = time.monotonic()
            current.set()
            for change in changes:
                try:
                    key = JobKey.from_path(change.document.reference.path)
                except ValueError:
                    self.not_ours(change.document.reference.path)
                    continue
                try:
                    handle(name, key, change.type.name, change.document.to_dict() or {})
                except Exception as exc:  # one doc's surprise must not end the listener (its thread would die)
                    log.warning("listener_doc_error", path=key.path, error=str(exc))

        self._heard[name] = time.monotonic()
        self._watches[name] = _paced(watching.on_snapshot(query, on_snapshot))

    def _cancel_requests(self, media: str) -> Query:
        return self.store.cancelling(media).limit(CANCEL_LIMIT)

    def _on_queue_change(self, name: str, key: JobKey, change: str, doc: dict) -> None:
        if change == "REMOVED":
            with self._lock:
                elsewhere = any(key.path in self._windows.get(_name(key.media_type, w), ()) for w in WINDOWS)
                pushed_out = self.pushed_out(name, doc)
            if not elsewhere and not pushed_out:
                self.on_gone(key)
        elif doc.get(lifecycle.CANCEL_REQUESTED):
            self.on_cancel(key)
        else:
            self.on_queued(key, doc)

    def pushed_out(self, name: str, doc: dict) -> bool:
        """Whether a doc left a full window past its far end: still queued, in the middle of a backlog that neither
        window holds (the newest window's oldest doc is newer; the oldest window's newest is older, after a
        released job came back in). It stays a candidate: dropped, a user's one job would wait behind everything
        older than it, whatever the fair order (audit: 54 jobs of other users before it). A doc that left because
        it was claimed, failed or cancelled leaves the window to an older (newer) doc, so it is not this; what it
        gets wrong (both at once) costs one claim that finds the job taken."""
        edge = self._edges.get(name)
        created = timestamp(doc.get("created_at"), float("nan"))
        if edge is None or created != created:  # a window not full, or a doc without created_at
            return False
        return created <= edge if name.endswith(":newest") else created >= edge

    def _on_cancel_change(self, name: str, key: JobKey, change: str, doc: dict) -> None:
        if change == "REMOVED":
            return
        if doc.get("status") == lifecycle.QUEUED:
            self.on_cancel(key)
        elif doc.get("status") == lifecycle.PROCESSING:
            self.on_stop(key)


def _name(media: str, window: str) -> str:
    """A listener's name: the media type for the main (oldest) window, as the watchdog's logs always said."""
    return media if window == "oldest" else f"{media}:{window}"


def _far_end(docs, window: str) -> float | None:
    """The `created_at` at a full window's far end (its newest for the oldest window, its oldest for the newest),
    past which a doc can only have been pushed out; None while the window is not full."""
    if window not in WINDOWS or len(docs) < WINDOWS[window][1]:
        return None
    times = [timestamp((doc.to_dict() or {}).get("created_at"), float("nan")) for doc in docs]
    times = [t for t in times if t == t]
    if not times:
        return None
    return min(times) if window == "newest" else max(times)


class _ReopenPace:
    """At most REOPENS_PER_10_S reopens of a listener's stream in 10 s: a wait its close cuts short.

    google-api-core reopens a failed stream at once, again and again, unless asked to pause (`throttle_reopen`,
    which the Firestore client does not ask): with Firestore away, the six listeners took over a core of CPU
    (measured) until two failed sweeps paused them a minute later, the GIL a generating job needs. Its own throttle
    sleeps, holding the stream's lock, through a close (a client's close then waited up to 10 s)."""

    def __init__(self) -> None:
        self._reopened: deque[float] = deque(maxlen=REOPENS_PER_10_S)
        self._closed = threading.Event()

    def __enter__(self) -> None:  # api-core enters it under the stream's lock: one reopen at a time
        if len(self._reopened) == REOPENS_PER_10_S:
            self._closed.wait(self._reopened[0] + 10.0 - time.monotonic())
        self._reopened.append(time.monotonic())

    def __exit__(self, *exc: object) -> None:
        return None

    def close(self) -> None:
        self._closed.set()


def _paced(watch):
    rpc = getattr(watch, "_rpc", None)
    if rpc is not None and getattr(rpc, "_reopen_throttle", False) is None:
        rpc._reopen_throttle = _ReopenPace()
    return watch


def _close(watch) -> None:
    if watch is None:
        return
    rpc = getattr(watch, "_rpc", None)  # the watch's own reference goes with its close
    pace = getattr(rpc, "_reopen_throttle", None)
    if isinstance(pace, _ReopenPace):
        pace.close()
    try:
        watch.unsubscribe()
    except Exception:
        pass
    if rpc is not None and hasattr(rpc, "_should_terminate"):
        # google-api-core's ResumableBidiRpc reopens a stream from gRPC's done callback without asking whether it
        # was closed: with Firestore away, each reopened call failed at once and reopened again, on a new thread
        # each time (4,646 started in 3 s, 3.3 s of CPU, seen), until Firestore answered and left a stream nobody
        # read. Closed, any end is the end: the callback and the consumer's last read stop there, quietly.
        rpc._should_terminate = lambda exc: True
