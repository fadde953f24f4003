#!/usr/bin/env python3
"""What the queue holds now, and why one job waits: `rq info` for the Firestore queue (README "When a job stays
queued" is what `--job` reads for you).

    .venv/bin/python scripts/queue_info.py --project my-app
    .venv/bin/python scripts/queue_info.py --project my-app --job generations/UID/images/FILE_UID

The first prints, per media type, the jobs queued (the oldest, how long it has waited), processing, and processing
past their lease (their worker gone: a worker takes them over); the users with jobs pending, most first; the
workers, from their heartbeat docs. The second, one job: where it stands and, queued, what it waits for (its
dispatches, its user's limits, its user's own older jobs, a free worker). Jobs are the docs under `generations/`
alone: an app's own `images` or `videos` collections elsewhere are not counted. Reads only: counts are Firestore
count queries (a read per 1,000 docs counted); the oldest queued job and those past their lease are read, up to
1,000 docs each; the rest is a few dozen docs. Exit 0; 1 for a --job that does not exist; 2 when it could not read.

Credentials: Application Default Credentials (`gcloud auth application-default login`, or
GOOGLE_APPLICATION_CREDENTIALS) that may read Firestore; FIRESTORE_EMULATOR_HOST points it at an emulator.
A worker silent for 3 of its beats (`beat_seconds` in its doc, its SWEEP_INTERVAL_SECONDS; at least 30 s) is not
counted as up; for workers of releases whose docs do not say, SWEEP_INTERVAL_SECONDS here (default 10).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # firegen_core, from a checkout

from google.api_core.exceptions import GoogleAPICallError, RetryError
from google.auth.exceptions import DefaultCredentialsError
from google.cloud import firestore
from google.cloud.firestore import FieldFilter
from google.cloud.firestore_v1.field_path import FieldPath

from firegen_core import lifecycle, quota, workers
from firegen_core.jobs import BOUND, COLLECTION, MEDIA_TYPES, JobKey, JobStore  # BOUND: each read ends, retries too

TOP_USERS = 5
PAGE = 100
MOST_READ = 1000  # docs read to find the oldest job, or to count those past their lease (more: "1000 or more")
# Firestore's reserved document ids: a path holding one is a wrong argument, not a Firestore failure.
_RESERVED_ID = re.compile(r"__.*__|\.|\.\.")


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


def jobs_only(client: firestore.Client, query: firestore.Query) -> firestore.Query:
    """A collection group's query cut to the docs under `generations/`, by their paths (an equality and a range on
    the document id: the single-field index serves it)."""
    name = FieldPath.document_id()
    return query.where(filter=FieldFilter(name, ">=", client.document(COLLECTION, " "))).where(
        filter=FieldFilter(name, "<", client.document(COLLECTION, "\U0010ffff"))
    )


def _is_job(snapshot: firestore.DocumentSnapshot) -> bool:
    return snapshot.reference.path.startswith(f"{COLLECTION}/")


def _at(doc: Mapping[str, Any], name: str) -> datetime | None:
    value = doc.get(name)
    return value if isinstance(value, datetime) else None


def _whole(doc: Mapping[str, Any], name: str) -> int | None:
    """A count or a limit, where it is one (a hand-written doc may hold anything)."""
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value)


def _paged(query_at: Any) -> Any:
    """The docs of `query_at(after)` page after page, at most MOST_READ."""
    after, read = None, 0
    while read < MOST_READ:
        page = list(query_at(after).get(**BOUND))
        yield from page
        read += len(page)
        if len(page) < PAGE:
            return
        after = page[-1]


# ------------------------------------------------------------------------------------------------ workers
@dataclass
class Workers:
    up: list[tuple[str, dict]] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    @property
    def free_slots(self) -> int:
        return sum(max((_whole(doc, "concurrency") or 0) - (_whole(doc, "busy") or 0), 0) for _, doc in self.up)


def silent_after(beat: Any) -> timedelta:
    """How long a worker that beats every `beat` seconds may go unheard and still be up: 3 beats, at least 30 s."""
    try:
        seconds = float(beat)
    except (TypeError, ValueError):
        seconds = 10.0
    return (
        timedelta(seconds=max(3 * seconds, 30.0)) if math.isfinite(seconds) and seconds > 0 else timedelta(seconds=30)
    )


def up_within(env: Mapping[str, str]) -> timedelta:
    """For workers of releases that do not say how often they beat: SWEEP_INTERVAL_SECONDS from `env`."""
    return silent_after(env.get("SWEEP_INTERVAL_SECONDS") or 10)


def read_workers(client: firestore.Client, now: datetime, within: timedelta) -> Workers:
    newest = (
        client.collection(workers.WORKERS)
        .order_by(workers.SEEN_AT, direction=firestore.Query.DESCENDING)
        .limit(workers.SIGHTINGS_READ)
    )
    found = Workers()
    for snapshot in newest.get(**BOUND):
        doc = snapshot.to_dict() or {}
        seen, gone = _at(doc, workers.SEEN_AT), _at(doc, workers.LEFT_AT)
        if seen is None:
            continue
        if gone is not None:
            found.left.append(f"{snapshot.id} (left {ago(now - gone)} ago, {_finished(doc)})")
        elif now - seen <= (silent_after(doc[workers.BEAT_SECONDS]) if workers.BEAT_SECONDS in doc else within):
            found.up.append((snapshot.id, doc))
        else:
            found.silent.append(
                f"{snapshot.id} (last beat {ago(now - seen)} ago: killed, or its machine gone; its jobs' leases run "
                "out, then another worker takes them over)"
            )
    return found


def workers_lines(found: Workers, now: datetime) -> list[str]:
    up = [_worker(worker_id, doc, now) for worker_id, doc in found.up]
    lines = ["workers up: " + ("; ".join(up) if up else "none")]
    lines += [f"workers gone silent: {'; '.join(found.silent)}"] if found.silent else []
    lines += [f"workers that left: {'; '.join(found.left)}"] if found.left else []
    return lines


def _finished(doc: Mapping[str, Any]) -> str:
    return f"{plural(_whole(doc, workers.FINISHED) or 0, 'job')} finished"


def _worker(worker_id: str, doc: Mapping[str, Any], now: datetime) -> str:
    # `busy` counts the jobs it holds, one uploading beside the next one generating: it may exceed the slots.
    facts = [f"last beat {ago(now - doc[workers.SEEN_AT])} ago"]
    facts += [
        plural(_whole(doc, "concurrency") or 0, "generation slot"),
        f"{plural(_whole(doc, 'busy') or 0, 'job')} in hand",
    ]
    facts.append(_finished(doc))
    started = _at(doc, "started_at")
    if started is not None:
        facts.append(f"up {ago(now - started)}")
    if doc.get("code_version"):
        facts.append(f"code {doc['code_version']}")
    if doc.get("claims_paused"):
        paused = doc["claims_paused"]
        facts.append(f"claims paused: {paused} failing" if isinstance(paused, str) else "claims paused")
    return f"{worker_id} ({', '.join(facts)})"


# ------------------------------------------------------------------------------------------------ the whole queue
def media_line(store: JobStore, media: str, now: datetime) -> str:
    client = store.client
    queued = count(jobs_only(client, store.queued(media)))
    processing = count(
        jobs_only(
            client, client.collection_group(media).where(filter=FieldFilter("status", "==", lifecycle.PROCESSING))
        )
    )
    if queued:
        oldest = next(
            (
                s
                for s in _paged(lambda after: store.oldest_queued(media, limit=PAGE, dated=True, after=after))
                if _is_job(s)
            ),
            None,
        )
        since = _at(oldest.to_dict() or {}, "created_at") if oldest else None
        waits = f" (the oldest for {ago(now - since)}: {oldest.reference.path})" if oldest and since else ""
        said = f"{queued} queued{waits}"
    else:
        said = "nothing queued"
    said += f", {processing} processing"
    if processing:
        read = expired = 0
        for snapshot in _paged(lambda after: store.expired(media, now, limit=PAGE, after=after)):
            read, expired = read + 1, expired + _is_job(snapshot)
        if expired:
            many = f"{expired} or more" if read >= MOST_READ else str(expired)
            said += f", {many} of them past their lease (their worker gone: a worker takes them over)"
    return f"{media}: {said}"


def users_line(store: JobStore) -> str:
    pending = store.client.collection(quota.USAGE_COLLECTION).where(filter=FieldFilter("pending", ">", 0))
    users = count(pending)
    if not users:
        return "users with jobs pending: none"
    most = pending.order_by("pending", direction=firestore.Query.DESCENDING).limit(TOP_USERS)
    named = [_user(snapshot.id, snapshot.to_dict() or {}) for snapshot in most.get(**BOUND)]
    return f"users with jobs pending: {users} (the most first: {'; '.join(named)})"


def _limit(usage: Mapping[str, Any], name: str) -> int | None:
    limits = usage.get("limits")
    return _whole(limits, name) if isinstance(limits, Mapping) else None


def _user(user_id: str, doc: Mapping[str, Any]) -> str:
    most = _limit(doc, "max_running")
    of = f" of {most}" if most is not None else ""
    return f"{user_id} {_whole(doc, 'pending') or 0} pending, {_whole(doc, 'running') or 0}{of} running"


def summary(client: firestore.Client, now: datetime, within: timedelta) -> list[str]:
    store = JobStore(client)
    lines = [*(media_line(store, media, now) for media in MEDIA_TYPES), users_line(store)]
    return lines + workers_lines(read_workers(client, now, within), now)


# ------------------------------------------------------------------------------------------------ one job
def job_lines(client: firestore.Client, key: JobKey, now: datetime, within: timedelta) -> list[str] | None:
    """What is known of one job; None where it does not exist."""
    store = JobStore(client)
    doc = store.ref(key).get(**BOUND).to_dict()
    if doc is None:
        return None
    status = doc.get("status")
    lines = [f"{key.path}: {_state(doc, now)}"]
    if status not in (lifecycle.QUEUED, lifecycle.PROCESSING):
        return lines
    if doc.get(lifecycle.CANCEL_REQUESTED):
        lines.append("  its owner asked to cancel it: it ends at its next step (or at once, queued)")
    usage = store.usage_ref(key.user_id).get(**BOUND).to_dict() or {}
    lines.append(f"  its user: {_user(key.user_id, usage)}")
    found = read_workers(client, now, within)
    if status == lifecycle.QUEUED:
        lines.append(f"  {_dispatches(doc)}")
        lines += [f"  {line}" for line in _why_queued(store, key, doc, usage, found)]
    return lines + [f"  {line}" for line in workers_lines(found, now)]


def _state(doc: Mapping[str, Any], now: datetime) -> str:
    status = doc.get("status")
    if status == lifecycle.QUEUED:
        since = _at(doc, "created_at")
        return "queued" + (f" for {ago(now - since)}" if since else " (no created_at: a worker's scan finds it)")
    if status == lifecycle.PROCESSING:
        progress = doc.get("progress")
        readable = isinstance(progress, int | float) and math.isfinite(progress)
        done = f"{round(100 * min(max(progress, 0.0), 1.0))}%, " if readable else ""
        said = f"processing, {done}by worker {doc.get('worker_id') or '(none named)'}"
        said += f" (try {doc['attempts']})" if _whole(doc, "attempts") is not None else ""
        lease = _at(doc, "lease_expires_at")
        if lease is None:
            return said + "; no readable lease: a worker's scan for such jobs takes it over (within 5 min)"
        if lease <= now:
            return said + f"; its lease ran out {ago(now - lease)} ago: its worker is gone, a worker takes it over"
        return said + f"; its lease runs {ago(lease - now)} more, renewed each beat"
    if status == lifecycle.COMPLETED:
        ended = _at(doc, "completed_at")
        return "completed" + (f" {ago(now - ended)} ago" if ended else "")
    if status == lifecycle.FAILED:
        ended = _at(doc, "failed_at")
        why = [str(doc[name]) for name in ("error_type", "error_message") if doc.get(name)]
        return "failed" + (f" {ago(now - ended)} ago" if ended else "") + (f": {': '.join(why)}" if why else "")
    return f"status {status!r}, which no worker reads (the contract's: queued, processing, completed, failed)"


def _dispatches(doc: Mapping[str, Any]) -> str:
    sent = _whole(doc, lifecycle.DISPATCH_COUNT) or 0
    if not sent:
        return (
            "not dispatched yet: a worker up takes it from the queue itself; else dispatchQueuedJob (or the "
            "callable) should have (its log, where it did not), and the scheduled sweep dispatches it within "
            "REDISPATCH_AFTER_MINUTES"
        )
    said = f"dispatched {plural(sent, 'time')}"
    if doc.get("dispatched_by"):
        said += f", last by the {doc['dispatched_by']}"
    if doc.get("runpod_job_id"):
        said += f" (RunPod job {doc['runpod_job_id']})"
    if doc.get(lifecycle.DISPATCH_ERROR):
        said += f"; why its last dispatch woke no worker: {doc[lifecycle.DISPATCH_ERROR]}"
    return said


def _why_queued(
    store: JobStore, key: JobKey, doc: Mapping[str, Any], usage: Mapping[str, Any], found: Workers
) -> list[str]:
    said = []
    if not doc.get(quota.ADMITTED):
        said.append("not yet admitted against its user's limits: the worker that claims it admits it")
    most, running = _limit(usage, "max_running"), _whole(usage, "running") or 0
    if most is not None and running >= most:
        said.append(f"it waits for one of its user's {plural(running, 'running job')} to end (USER_MAX_RUNNING)")
    since = _at(doc, "created_at")
    if since is not None:
        older = store.queued(key.media_type, user_id=key.user_id).where(filter=FieldFilter("created_at", "<", since))
        ahead = count(older)
        if ahead > 0:
            said.append(f"{ahead} of its user's own queued {key.media_type} ahead of it (each user's oldest first)")
    if said:
        return said
    if not found.up:
        return ["no worker is up: it runs once one starts (on RunPod, a dispatch starts one)"]
    if not found.free_slots:
        others = max(count(jobs_only(store.client, store.queued(key.media_type))) - 1, 0)
        return [
            f"every worker up has its slots full: it waits for a free one, with {others} other queued "
            f"{key.media_type} (each user's oldest first)"
        ]
    return ["a worker up has a free slot: it takes the job at its next sweep (SWEEP_INTERVAL_SECONDS)"]


# ------------------------------------------------------------------------------------------------ command
def job_key(path: str) -> JobKey:
    key = JobKey.from_path(path.strip("/"))
    if not all(
        key.user_id and key.file_uid and not _RESERVED_ID.fullmatch(part) for part in (key.user_id, key.file_uid)
    ):
        raise ValueError(path)
    return key


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends it quietly, as it does any command-line tool
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", required=True, help="the Firebase project id")
    parser.add_argument("--job", metavar="PATH", help="one job's doc path: generations/UID/images|videos/FILE_UID")
    args = parser.parse_args(argv)
    key = None
    if args.job is not None:
        try:
            key = job_key(args.job)
        except ValueError:
            parser.error(f"--job: not a job's path (generations/UID/images|videos/FILE_UID): {args.job!r}")
    emulator = os.environ.get("FIRESTORE_EMULATOR_HOST")
    where = f"the emulator at {emulator.strip() or repr(emulator)}" if emulator else "production"
    print(f"queue_info: project {args.project}, in {where}", flush=True)
    within = up_within(os.environ)
    try:
        client = firestore.Client(project=args.project)
        now = datetime.now(UTC)
        lines = job_lines(client, key, now, within) if key else summary(client, now, within)
    except DefaultCredentialsError as exc:
        print(f"queue_info: no credentials: {exc}", file=sys.stderr)
        return 2
    except (GoogleAPICallError, RetryError) as exc:
        print(f"queue_info: Firestore failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("queue_info: interrupted", file=sys.stderr)
        return 130
    if lines is None:
        assert key is not None
        print(f"{key.path}: no such job (never written, deleted by its owner, or its retention ended)")
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
