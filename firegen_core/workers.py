"""Worker liveness: each running worker keeps a doc `workers/{worker_id}` with the server time it was last seen.

Workers write it from their sweep loop (every SWEEP_INTERVAL_SECONDS), with how many jobs they ran to an end, and,
when they stop cleanly, mark it left (seen then, `left_at`); the scheduled sweep of the Cloud Functions reads them
(`sightings`): a job is failed for want of a worker only when no worker runs now (none seen within the stale period
that has not left) and none that ran jobs to their end was seen since the job's last dispatch, never because the
backlog is long (issue #11), nor because the workers that were working through it stopped (RunPod scales workers
down while a Firestore backlog waits: a review). A worker that never finishes a job (it fails its start-up check,
or crashes before its first) shows nothing of the kind: its sightings wake no worker again. Clients can neither
read nor write these docs (firestore.rules).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.api_core.retry import Retry
from google.cloud import firestore
from google.cloud.firestore import DELETE_FIELD, SERVER_TIMESTAMP

WORKERS = "workers"
SEEN_AT = "seen_at"
LEFT_AT = "left_at"
FINISHED = "jobs_finished"  # jobs the worker ran to their end (completed or failed), as of its last write
BEAT_SECONDS = "beat_seconds"  # how often it beats (its SWEEP_INTERVAL_SECONDS): silent for a few, it is gone
CALL_TIMEOUT = 15.0  # seconds, retries included: liveness is best effort and must never hold up a sweep
LEAVE_TIMEOUT = 5.0  # on shutdown: the doc ages out anyway (the sweep reads `seen_at`, not its presence)
# A worker that never stopped cleanly (killed, out of memory, its machine gone) never deletes its doc, and each start
# is a new id: every beat moves `expire_at` this far ahead, for firestore.indexes.json's TTL policy on `workers`
# (a soak audit: one doc left for good per crash).
EXPIRE_DAYS = 7
# A worker that left is of use to the sweep for as long as a job waits for its next dispatch (minutes): a day.
LEFT_EXPIRE_DAYS = 1
# The newest docs read by the sweep (a few per running worker): past so many seen lately, some surely run.
SIGHTINGS_READ = 50


def _bounded(seconds: float) -> dict:
    return {"timeout": seconds, "retry": Retry(timeout=seconds)}


def beat(
    client: firestore.Client,
    worker_id: str,
    *,
    busy: int,
    concurrency: int,
    started_at: datetime,
    finished: int = 0,
    code_version: str | None = None,
    claims_paused: str | None = None,
    beat_seconds: float | None = None,
    timeout: float = CALL_TIMEOUT,
) -> datetime:
    """Say this worker is alive now (server time), with how many of its slots are busy, how many jobs it ran to
    their end, which code it runs (`code_version`: listener.version), why it claims nothing, where it does not
    (`claims_paused`: "storage"), and how often it beats (`beat_seconds`). Returns the write's server time. Merged: a beat that lands after the worker left
    (its write slow) keeps `left_at`."""
    result = (
        client.collection(WORKERS)
        .document(worker_id)
        .set(
            {
                SEEN_AT: SERVER_TIMESTAMP,
                "busy": busy,
                "concurrency": concurrency,
                "started_at": started_at,
                FINISHED: finished,
                "expire_at": datetime.now(UTC) + timedelta(days=EXPIRE_DAYS),
                **({"code_version": code_version} if code_version else {}),
                **({BEAT_SECONDS: beat_seconds} if beat_seconds else {}),
                "claims_paused": claims_paused or DELETE_FIELD,
            },
            merge=True,
            **_bounded(timeout),
        )
    )
    return result.update_time


def leave(client: firestore.Client, worker_id: str, *, finished: int = 0, timeout: float = LEAVE_TIMEOUT) -> None:
    """A clean stop: seen now, and gone. The doc stays a day (its TTL): that a worker which ran jobs to their end
    ran until now tells the sweep that the endpoint runs jobs, so a job left queued behind it is woken again."""
    client.collection(WORKERS).document(worker_id).set(
        {
            SEEN_AT: SERVER_TIMESTAMP,
            LEFT_AT: SERVER_TIMESTAMP,
            "busy": 0,
            FINISHED: finished,
            "expire_at": datetime.now(UTC) + timedelta(days=LEFT_EXPIRE_DAYS),
        },
        merge=True,
        **_bounded(timeout),
    )


@dataclass(frozen=True)
class Sightings:
    running: bool  # a worker seen within the period asked about that has not left
    last_worked: datetime | None  # the latest a worker that ran jobs to their end was seen (None: none lately)


def sightings(client: firestore.Client, since: datetime) -> Sightings:
    """What the newest workers' docs say, as of `since` and after."""
    newest = client.collection(WORKERS).order_by(SEEN_AT, direction=firestore.Query.DESCENDING).limit(SIGHTINGS_READ)
    docs = [snapshot.to_dict() or {} for snapshot in newest.stream(**_bounded(CALL_TIMEOUT))]
    seen = [(doc[SEEN_AT], doc) for doc in docs if isinstance(doc.get(SEEN_AT), datetime)]
    recent = [doc for at, doc in seen if at >= since]
    running = len(recent) == SIGHTINGS_READ or any(not doc.get(LEFT_AT) for doc in recent)
    worked = [at for at, doc in seen if isinstance(doc.get(FINISHED), int) and doc[FINISHED] > 0]
    return Sightings(running, max(worked, default=None))
