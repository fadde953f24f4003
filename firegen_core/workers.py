"""Worker liveness: each running worker keeps a doc `workers/{worker_id}` with the server time it was last seen.

Workers write it from their sweep loop (every SWEEP_INTERVAL_SECONDS) and delete it when they stop cleanly; the
scheduled sweep of the Cloud Functions reads it: a queued job is failed for want of a worker only when no worker
has been seen for the whole stale period, never because the backlog is long (issue #11). Clients can neither
read nor write these docs (firestore.rules).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.api_core.retry import Retry
from google.cloud import firestore
from google.cloud.firestore import SERVER_TIMESTAMP, FieldFilter

WORKERS = "workers"
SEEN_AT = "seen_at"
CALL_TIMEOUT = 15.0  # seconds, retries included: liveness is best effort and must never hold up a sweep
LEAVE_TIMEOUT = 5.0  # on shutdown: the doc ages out anyway (the sweep reads `seen_at`, not its presence)
# A worker that never stopped cleanly (killed, out of memory, its machine gone) never deletes its doc, and each start
# is a new id: every beat moves `expire_at` this far ahead, for firestore.indexes.json's TTL policy on `workers`
# (a soak audit: one doc left for good per crash).
EXPIRE_DAYS = 7


def _bounded(seconds: float) -> dict:
    return {"timeout": seconds, "retry": Retry(timeout=seconds)}


def beat(
    client: firestore.Client,
    worker_id: str,
    *,
    busy: int,
    concurrency: int,
    started_at: datetime,
    timeout: float = CALL_TIMEOUT,
) -> datetime:
    """Say this worker is alive now (server time), with how many of its slots are busy. Returns the write's
    server time."""
    result = (
        client.collection(WORKERS)
        .document(worker_id)
        .set(
            {
                SEEN_AT: SERVER_TIMESTAMP,
                "busy": busy,
                "concurrency": concurrency,
                "started_at": started_at,
                "expire_at": datetime.now(UTC) + timedelta(days=EXPIRE_DAYS),
            },
            **_bounded(timeout),
        )
    )
    return result.update_time


def leave(client: firestore.Client, worker_id: str) -> None:
    client.collection(WORKERS).document(worker_id).delete(**_bounded(LEAVE_TIMEOUT))


def alive_since(client: firestore.Client, since: datetime) -> bool:
    """Whether any worker has been seen at or after `since`."""
    query = client.collection(WORKERS).where(filter=FieldFilter(SEEN_AT, ">=", since)).limit(1)
    return any(True for _ in query.stream(**_bounded(CALL_TIMEOUT)))
