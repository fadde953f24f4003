#!/usr/bin/env python3
"""What the queue holds now, and why one job waits: `rq info` for the Firestore queue (README "When a job stays
queued" is what `--job` reads for you).

    .venv/bin/python scripts/queue_info.py --project my-app
    .venv/bin/python scripts/queue_info.py --project my-app --job generations/UID/images/FILE_UID

The first prints, per media type, the jobs queued (the oldest, how long it has waited), processing, and processing
past their lease (their worker gone: a sweep takes them over); the users with jobs pending, most first; the
workers, from their heartbeat docs. The second, one job: where it stands, its dispatches, its user's counts against
their limits, how many of its user's own jobs are ahead of it, and the workers. Reads only: counts are Firestore
count queries (a read per 1,000 docs counted), the rest a few dozen docs.

Credentials: Application Default Credentials (`gcloud auth application-default login`, or
GOOGLE_APPLICATION_CREDENTIALS) that may read Firestore; FIRESTORE_EMULATOR_HOST points it at an emulator.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # firegen_core, from a checkout

from google.api_core.exceptions import GoogleAPICallError, RetryError
from google.auth.exceptions import DefaultCredentialsError
from google.cloud import firestore
from google.cloud.firestore import FieldFilter

from firegen_core import lifecycle, quota, workers
from firegen_core.jobs import BOUND, MEDIA_TYPES, JobKey, JobStore  # BOUND: each read ends, retries included

# A worker beats every SWEEP_INTERVAL_SECONDS (10 s by default): one not seen for this long is not up.
UP_WITHIN = timedelta(minutes=2)
TOP_USERS = 5


def ago(delta: timedelta) -> str:
    """A duration as a person says it: 4 s, 3 min 20 s, 2 h 5 min, 1 d 3 h."""
    seconds = max(int(delta.total_seconds()), 0)
    for unit, size, smaller, small_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60), ("min", 60, "s", 1)):
        if seconds >= size:
            rest = (seconds % size) // small_size
            return f"{seconds // size} {unit}" + (f" {rest} {smaller}" if rest else "")
    return f"{seconds} s"


def plural(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def count(query: firestore.Query) -> int:
    [[result]] = query.count().get(**BOUND)
    return int(result.value)


def _first(query: firestore.Query) -> firestore.DocumentSnapshot | None:
    return next(iter(query.get(**BOUND)), None)


def _at(doc: Mapping[str, Any], field: str) -> datetime | None:
    value = doc.get(field)
    return value if isinstance(value, datetime) else None


# ------------------------------------------------------------------------------------------------ the whole queue
def media_line(store: JobStore, media: str, now: datetime) -> str:
    queued = count(store.queued(media))
    processing = count(store.client.collection_group(media).where(filter=FieldFilter("status", "==", "processing")))
    expired = count(store.expired(media, now, limit=100_000))
    if queued:
        oldest = _first(store.oldest_queued(media, limit=1, dated=True))
        since = _at(oldest.to_dict() or {}, "created_at") if oldest else None
        waits = f" (the oldest for {ago(now - since)}: {oldest.reference.path})" if oldest and since else ""
        said = f"{queued} queued{waits}"
    else:
        said = "nothing queued"
    said += f", {processing} processing"
    if expired:
        said += f", {expired} of them past their lease (their worker gone: a sweep takes them over)"
    return f"{media}: {said}"


def users_line(store: JobStore) -> str:
    pending = store.client.collection(quota.USAGE_COLLECTION).where(filter=FieldFilter("pending", ">", 0))
    users = count(pending)
    if not users:
        return "users with jobs pending: none"
    most = pending.order_by("pending", direction=firestore.Query.DESCENDING).limit(TOP_USERS)
    named = [_user(snapshot.id, snapshot.to_dict() or {}) for snapshot in most.get(**BOUND)]
    return f"users with jobs pending: {users} (the most first: {'; '.join(named)})"


def _user(user_id: str, doc: Mapping[str, Any]) -> str:
    limits = doc.get("limits") if isinstance(doc.get("limits"), Mapping) else {}
    running = int(quota.number(doc, "running"))
    of = f" of {limits['max_running']}" if "max_running" in limits else ""
    return f"{user_id} {int(quota.number(doc, 'pending'))} pending, {running}{of} running"


def workers_lines(client: firestore.Client, now: datetime) -> list[str]:
    newest = (
        client.collection(workers.WORKERS)
        .order_by(workers.SEEN_AT, direction=firestore.Query.DESCENDING)
        .limit(workers.SIGHTINGS_READ)
    )
    up, left, silent = [], [], []
    for snapshot in newest.get(**BOUND):
        doc = snapshot.to_dict() or {}
        seen, gone = _at(doc, workers.SEEN_AT), _at(doc, workers.LEFT_AT)
        if seen is None:
            continue
        if gone is not None:
            left.append(f"{snapshot.id} (left {ago(now - gone)} ago, {_finished(doc)})")
        elif now - seen <= UP_WITHIN:
            up.append(_worker(snapshot.id, doc, now))
        else:
            silent.append(f"{snapshot.id} (last seen {ago(now - seen)} ago: killed, or its machine gone)")
    lines = [f"workers up (seen within {ago(UP_WITHIN)}): " + ("; ".join(up) if up else "none")]
    lines += [f"workers gone silent: {'; '.join(silent)}"] if silent else []
    lines += [f"workers that left: {'; '.join(left)}"] if left else []
    return lines


def _finished(doc: Mapping[str, Any]) -> str:
    return f"{plural(int(quota.number(doc, workers.FINISHED)), 'job')} finished"


def _worker(worker_id: str, doc: Mapping[str, Any], now: datetime) -> str:
    # `busy` counts the jobs it holds, one uploading beside the next one generating: it may exceed the slots.
    slots = int(quota.number(doc, "concurrency"))
    facts = [
        plural(slots, "generation slot"),
        f"{plural(int(quota.number(doc, 'busy')), 'job')} in hand",
        _finished(doc),
    ]
    started = _at(doc, "started_at")
    if started is not None:
        facts.append(f"up {ago(now - started)}")
    if doc.get("code_version"):
        facts.append(f"code {doc['code_version']}")
    if doc.get("claims_paused"):
        facts.append(f"claims paused: {doc['claims_paused']} failing")
    return f"{worker_id} ({', '.join(facts)})"


def summary(client: firestore.Client, now: datetime) -> list[str]:
    store = JobStore(client)
    return [*(media_line(store, media, now) for media in MEDIA_TYPES), users_line(store), *workers_lines(client, now)]


# ------------------------------------------------------------------------------------------------ one job
def job_lines(client: firestore.Client, key: JobKey, now: datetime) -> list[str]:
    store = JobStore(client)
    doc = store.ref(key).get(**BOUND).to_dict()
    if doc is None:
        return [f"{key.path}: no such job (never written, deleted by its owner, or its retention ended)"]
    lines = [f"{key.path}: {_state(doc, now)}"]
    if doc.get(lifecycle.CANCEL_REQUESTED) and doc.get("status") in (lifecycle.QUEUED, lifecycle.PROCESSING):
        lines.append("  its owner asked to cancel it: it ends at its next step (or at once, queued)")
    if doc.get("status") in lifecycle.FINAL_STATES:
        return lines
    lines.append(f"  {_dispatches(doc)}")
    usage = store.usage_ref(key.user_id).get(**BOUND).to_dict() or {}
    lines.append(f"  its user: {_user(key.user_id, usage)}")
    if doc.get("status") == lifecycle.QUEUED:
        lines += [f"  {line}" for line in _why_queued(store, key, doc, usage)]
    return lines + [f"  {line}" for line in workers_lines(client, now)]


def _state(doc: Mapping[str, Any], now: datetime) -> str:
    status = doc.get("status")
    if status == lifecycle.QUEUED:
        since = _at(doc, "created_at")
        return "queued" + (f" for {ago(now - since)}" if since else " (no created_at: it waits for a scan)")
    if status == lifecycle.PROCESSING:
        lease = _at(doc, "lease_expires_at")
        said = f"processing, {round(100 * quota.number(doc, 'progress'))}%, by worker {doc.get('worker_id')}"
        said += f" (try {doc.get('attempts')})"
        if lease is not None and lease < now:
            return said + f"; its lease ran out {ago(now - lease)} ago: its worker is gone, a sweep takes it over"
        return said + (f"; its lease runs {ago(lease - now)} more, renewed each beat" if lease else "")
    if status == lifecycle.COMPLETED:
        ended = _at(doc, "completed_at")
        return "completed" + (f" {ago(now - ended)} ago" if ended else "")
    if status == lifecycle.FAILED:
        ended = _at(doc, "failed_at")
        when = f" {ago(now - ended)} ago" if ended else ""
        return f"failed{when}: {doc.get('error_type')}: {doc.get('error_message')}"
    return f"status {status!r}, which no worker reads (the contract's are queued, processing, completed, failed)"


def _dispatches(doc: Mapping[str, Any]) -> str:
    sent = int(quota.number(doc, lifecycle.DISPATCH_COUNT))
    if not sent:
        return (
            "never dispatched: no function saw it (dispatchQueuedJob not deployed, or failing: its log), or a warm "
            "worker's listener is meant to take it; the scheduled sweep dispatches it within REDISPATCH_AFTER_MINUTES"
        )
    said = f"dispatched {plural(sent, 'time')}"
    if doc.get("dispatched_by"):
        said += f", last by the {doc['dispatched_by']}"
    if doc.get("runpod_job_id"):
        said += f" (RunPod job {doc['runpod_job_id']})"
    if doc.get(lifecycle.DISPATCH_ERROR):
        said += f"; why its last dispatch woke no worker: {doc[lifecycle.DISPATCH_ERROR]}"
    return said


def _why_queued(store: JobStore, key: JobKey, doc: Mapping[str, Any], usage: Mapping[str, Any]) -> list[str]:
    said = []
    if not doc.get(quota.ADMITTED):
        said.append("not yet admitted against its user's limits: the worker that claims it admits it")
    limits = usage.get("limits") if isinstance(usage.get("limits"), Mapping) else {}
    running = int(quota.number(usage, "running"))
    if "max_running" in limits and running >= quota.number(limits, "max_running"):
        said.append(f"it waits for one of its user's {plural(running, 'running job')} to end (USER_MAX_RUNNING)")
    since = _at(doc, "created_at")
    if since is not None:
        older = store.oldest_queued(key.media_type, limit=100_000, user_id=key.user_id, created_before=since)
        ahead = count(older) - 1  # itself included
        if ahead > 0:
            said.append(f"{ahead} of its user's own queued {key.media_type} ahead of it (each user's oldest first)")
    return said


# ------------------------------------------------------------------------------------------------ command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", required=True, help="the Firebase project id")
    parser.add_argument("--job", metavar="PATH", help="one job's doc path: generations/UID/images|videos/FILE_UID")
    args = parser.parse_args(argv)
    key = None
    if args.job:
        try:
            key = JobKey.from_path(args.job.strip("/"))
            if not (key.user_id and key.file_uid):
                raise ValueError(args.job)
        except ValueError:
            parser.error(f"--job: not a job's path (generations/UID/images|videos/FILE_UID): {args.job}")
    emulator = os.environ.get("FIRESTORE_EMULATOR_HOST", "").strip()
    print(f"queue_info: project {args.project}, in {f'the emulator at {emulator}' if emulator else 'production'}")
    try:
        client = firestore.Client(project=args.project)
        now = datetime.now(UTC)
        lines = job_lines(client, key, now) if key else summary(client, now)
    except DefaultCredentialsError as exc:
        print(f"queue_info: no credentials: {exc}", file=sys.stderr)
        return 2
    except (GoogleAPICallError, RetryError) as exc:
        print(f"queue_info: Firestore failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("queue_info: interrupted", file=sys.stderr)
        return 130
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
