"""Claims wait while Storage fails this worker's uploads.

A job claimed during a Storage outage is generated, then fails `ConnectionError` once its upload's retries run out
(UPLOAD_RETRY_MAX_SECONDS): a Storage audit saw every queued job go so, one after another, the queue drained into
failures that each cost a generation. The first such failure pauses claiming (`claims_paused`); one small request
to the bucket, tried again with backoff, resumes it once Storage answers (`claims_resumed`). Meanwhile the jobs wait
queued, for this worker or another whose Storage answers; running jobs, cancels and inline runsync requests go on.
A job generated beside the first (a slot goes to the next claim as its generation ends) whose upload fails too
waits for that answer (`wait_over`) and tries again, rather than throw its generation away.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog
from google.api_core import exceptions as api_exceptions

from .storage import is_transient

log = structlog.get_logger("listener.storage_outage")

FIRST_PROBE_SECONDS = 2.0  # then doubling, up to
# Claims, and the jobs waiting to upload, resume at the first answer after Storage is back: one small request every
# 10 s costs nothing beside a queue held up to 30 s longer (and a waiting job's lease with it).
LONGEST_PROBE_SECONDS = 10.0


class StorageOutage:
    """`begin` (a job's upload ran out of retries on transient errors) pauses claims until `probe()` returns or
    fails on an answer of Storage's own (a refusal: the next job meets it, `storage_refused`); then `on_over()`.
    Anything else (a credentials refresh that failed, say) keeps them paused."""

    def __init__(self, probe: Callable[[], object], on_over: Callable[[], None]):
        self.probe, self.on_over = probe, on_over
        self._lock = threading.Lock()
        self._since: float | None = None  # time.monotonic() of the pause
        self._closed = threading.Event()
        self._over = threading.Event()  # no pause: none yet, or Storage answered
        self._over.set()

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def begin(self, exc: BaseException) -> bool:
        """Pause claims for `exc`, an upload's failure. Whether its job is the outage's first (it began the pause,
        or none can begin: the worker is stopping), to fail as such; else another job's failure began it, and this
        one may wait for its end (`wait_over`)."""
        with self._lock:
            if self._closed.is_set():
                return True
            if self._since is not None:
                return False
            self._since = time.monotonic()
            self._over.clear()
        try:
            threading.Thread(target=self._probe_loop, name="storage-probe", daemon=True).start()
        except Exception:  # out of threads: no probe to end the pause, so none
            with self._lock:
                self._since = None
                self._over.set()
            raise
        log.warning("claims_paused", reason="storage", error=str(exc))
        return True

    def wait_over(self, timeout: float) -> bool:
        """True once the pause is over: Storage answered."""
        return self._over.wait(timeout)

    def close(self) -> None:
        """No more probes (the worker stops, its jobs ended): a job still waiting is released as the worker leaves."""
        with self._lock:
            self._closed.set()

    def _probe_loop(self) -> None:
        wait = FIRST_PROBE_SECONDS
        while not self._closed.wait(wait):
            try:
                self.probe()
            except Exception as exc:
                if is_transient(exc) or not isinstance(exc, api_exceptions.GoogleAPICallError):
                    wait = min(wait * 2, LONGEST_PROBE_SECONDS)
                    continue
            with self._lock:
                since, self._since = self._since, None
                self._over.set()
            log.info("claims_resumed", reason="storage", paused_seconds=round(time.monotonic() - (since or 0.0), 1))
            self.on_over()
            return
