#!/usr/bin/env python3
"""Give finished job docs, idle users' usage docs and worker docs that lack `expire_at` one, so the TTL policy
deletes them (README "Upgrading").

Releases before per-user limits (2026-11-26 and earlier), and workers of such a release still running during a
rolling deploy, finished jobs without `expire_at`: a doc without it is never deleted, while the bucket's lifecycle
rule deletes its files, so its URLs break. This sets `expire_at` = the job's finish (`completed_at` or
`failed_at`; else its last write) + RETENTION_DAYS on every `completed` or `failed` job doc without one. A doc
whose time is already past is deleted by the TTL policy within about a day, as it would have been. Likewise each
user's usage doc (`usage/{uid}`) with nothing pending or running, which releases before 2026-12-05 never dated:
`expire_at` = the UTC midnight after its last write + RETENTION_DAYS, as the workers now write it. And each
worker's doc (`workers/{id}`) without one, which releases of 2026-11-30 and 12-01 wrote: its last beat + 7 days,
+ 1 once it left, as the workers now date theirs.

    .venv/bin/python scripts/backfill_expire_at.py --project my-app --dry-run   # count only
    .venv/bin/python scripts/backfill_expire_at.py --project my-app             # write

Credentials: Application Default Credentials (`gcloud auth application-default login`, or
GOOGLE_APPLICATION_CREDENTIALS), with write access to Firestore; FIRESTORE_EMULATOR_HOST points it at an
emulator. RETENTION_DAYS as the workers read it (default 30; 0 keeps job and usage docs for good: only the worker
docs, whose expiry does not depend on it, are dated). Each write
is made only if the doc has not changed since it was read: a doc that changed meanwhile is left to its writer.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # firegen_core, from a checkout

from google.api_core.exceptions import GoogleAPICallError, RetryError
from google.auth.exceptions import DefaultCredentialsError
from google.cloud import firestore
from google.cloud.firestore import DocumentSnapshot, FieldFilter
from google.cloud.firestore_v1.bulk_writer import BulkWriteFailure, BulkWriter
from grpc import StatusCode

from firegen_core import lifecycle, quota, workers
from firegen_core.jobs import BOUND, MEDIA_TYPES, JobKey

PAGE = 300


@dataclass
class Backfilled:
    finished: int = 0  # finished job docs read
    missing: int = 0  # of those, without `expire_at`
    written: int = 0  # given one
    changed: int = 0  # changed since read: left alone
    failed: int = 0  # not written after its tries (Firestore away): a later run takes them
    counting: int = 0  # usage docs without one that count jobs: left undated


def backfill(client: firestore.Client, *, days: float, dry_run: bool = False) -> Backfilled:
    """Set `expire_at` on every finished job doc of the project that lacks one (none when `dry_run`)."""

    def due(snapshot: DocumentSnapshot, doc: dict) -> datetime | None:
        return (
            None if lifecycle.EXPIRE_AT in doc else (_finished_at(doc) or snapshot.update_time) + timedelta(days=days)
        )

    counts = Backfilled()
    for media in MEDIA_TYPES:
        query = client.collection_group(media).where(
            filter=FieldFilter("status", "in", [lifecycle.COMPLETED, lifecycle.FAILED])
        )
        _date(client, query, due, counts, dry_run=dry_run, keep=_is_job)
    return counts


def backfill_usage(client: firestore.Client, *, days: float, dry_run: bool = False) -> Backfilled:
    """Set `expire_at` on every usage doc of a user with nothing pending or running that lacks one (`finished`
    counts the usage docs read)."""

    def due(snapshot: DocumentSnapshot, doc: dict) -> datetime | None:
        if lifecycle.EXPIRE_AT in doc:
            return None
        if quota.number(doc, "pending") or quota.number(doc, "running"):
            counts.counting += 1  # a doc gone would forget them; said (a review: skipped without a word)
            return None
        written = doc.get("updated_at")
        return quota.resets_at(written if isinstance(written, datetime) else snapshot.update_time) + timedelta(
            days=days
        )

    counts = Backfilled()
    _date(client, client.collection(quota.USAGE_COLLECTION), due, counts, dry_run=dry_run)
    return counts


def backfill_workers(client: firestore.Client, *, dry_run: bool = False) -> Backfilled:
    """Set `expire_at` on every worker's doc (`workers/{id}`) that lacks one, as the workers now date theirs: its
    last beat + 7 days, a day once it left. Releases of 2026-11-30 and 12-01 wrote none, and a worker that never
    stopped cleanly (each start a new id) left its doc for good (the operator-scripts review)."""

    def due(snapshot: DocumentSnapshot, doc: dict) -> datetime | None:
        if lifecycle.EXPIRE_AT in doc:
            return None
        seen = doc.get(workers.SEEN_AT)
        days = workers.LEFT_EXPIRE_DAYS if workers.LEFT_AT in doc else workers.EXPIRE_DAYS
        return (seen if isinstance(seen, datetime) else snapshot.update_time) + timedelta(days=days)

    counts = Backfilled()
    _date(client, client.collection(workers.WORKERS), due, counts, dry_run=dry_run)
    return counts


def _date(
    client: firestore.Client,
    query: firestore.Query | firestore.CollectionReference,
    due: Callable[[DocumentSnapshot, dict], datetime | None],
    counts: Backfilled,
    *,
    dry_run: bool,
    keep: Callable[[DocumentSnapshot], bool] = lambda snapshot: True,
) -> None:
    """Page through `query`'s docs (those `keep` takes), giving each the `expire_at` that `due` says it lacks, only
    where the doc has not changed since it was read."""
    writer = _writer(client, counts)
    try:
        _pages(client, query.order_by("__name__").limit(PAGE), due, counts, writer, dry_run=dry_run, keep=keep)
    finally:
        writer.close()  # every write sent, and answered


def _writer(client: firestore.Client, counts: Backfilled) -> BulkWriter:
    """Many writes at once (a review: one at a time, 100k docs took tens of minutes), each fenced on its doc as read:
    one changed (or deleted) meanwhile is counted and left to its writer; another failure is tried again, 5 times in
    all. Its callbacks run on the writer's threads."""
    lock = threading.Lock()
    writer = client.bulk_writer()

    def written(reference, result, bulk_writer) -> None:
        with lock:
            counts.written += 1

    def failed(failure: BulkWriteFailure, bulk_writer) -> bool:
        if failure.code not in (StatusCode.FAILED_PRECONDITION.value[0], StatusCode.NOT_FOUND.value[0]):
            if failure.attempts < WRITE_TRIES:
                return True
            with lock:
                counts.failed += 1
            return False
        with lock:
            counts.changed += 1
        return False

    writer.on_write_result(written)
    writer.on_write_error(failed)
    return writer


WRITE_TRIES = 5


def _pages(
    client: firestore.Client,
    query: firestore.Query,
    due: Callable[[DocumentSnapshot, dict], datetime | None],
    counts: Backfilled,
    writer: BulkWriter,
    *,
    dry_run: bool,
    keep: Callable[[DocumentSnapshot], bool],
) -> None:
    after: DocumentSnapshot | None = None
    while True:
        page = list((query.start_after(after) if after is not None else query).stream(**BOUND))
        if after is not None:  # a long run says how it goes (a review: 100k docs, tens of minutes, silent)
            print(f"  ... {counts.finished + len(page)} read", file=sys.stderr, flush=True)
        for snapshot in filter(keep, page):
            counts.finished += 1
            expire_at = due(snapshot, snapshot.to_dict() or {})
            if expire_at is None:
                continue
            counts.missing += 1
            if dry_run:
                continue
            option = client.write_option(last_update_time=snapshot.update_time)
            writer.update(snapshot.reference, {lifecycle.EXPIRE_AT: expire_at}, option=option)
        if len(page) < PAGE:
            return
        after = page[-1]


def _is_job(snapshot: DocumentSnapshot) -> bool:
    try:  # a collection named images or videos outside `generations/`: the app's own, not a job
        JobKey.from_path(snapshot.reference.path)
    except ValueError:
        return False
    return True


def _finished_at(doc: dict) -> datetime | None:
    for name in ("completed_at", "failed_at"):
        value = doc.get(name)
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", required=True, help="the Firebase project id")
    parser.add_argument("--dry-run", action="store_true", help="count the docs without expire_at; write nothing")
    args = parser.parse_args(argv)
    try:
        days = lifecycle.retention_days(os.environ)
    except ValueError as exc:
        print(f"backfill_expire_at: {exc}", file=sys.stderr)
        return 2
    emulator = os.environ.get("FIRESTORE_EMULATOR_HOST", "").strip()
    where = f"the emulator at {emulator}" if emulator else "production"
    print(f"backfill_expire_at: project {args.project}, in {where}{' (dry run)' if args.dry_run else ''}", flush=True)
    try:
        failed = run(firestore.Client(project=args.project), days=days, dry_run=args.dry_run)
    except DefaultCredentialsError as exc:
        print(f"backfill_expire_at: no credentials: {exc}", file=sys.stderr)
        return 2
    except (GoogleAPICallError, RetryError) as exc:
        print(
            f"backfill_expire_at: Firestore failed ({type(exc).__name__}: {exc}); what was written stays written: "
            "run it again",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("backfill_expire_at: interrupted; what was written stays written: run it again to go on", file=sys.stderr)
        return 130
    return 1 if failed else 0  # docs not written (Firestore failing), said in their line: a run for automation to redo


def run(client: firestore.Client, *, days: float, dry_run: bool) -> int:
    """Every pass, each said in a line; how many docs were not written."""
    verb = "would be given" if dry_run else "given"
    if days <= 0:
        # The workers' docs expire whatever RETENTION_DAYS says (a week after their last beat): still dated.
        print(
            "RETENTION_DAYS=0 keeps finished job docs and usage docs for good: only worker docs are dated", flush=True
        )
    passes: list[tuple[Callable[[], Backfilled], str, str]] = [
        (lambda: backfill(client, days=days, dry_run=dry_run), "finished job docs", f"finish + {days:g} days"),
        (
            lambda: backfill_usage(client, days=days, dry_run=dry_run),
            "usage docs",
            f"the midnight after its last write + {days:g} days",
        ),
    ]
    workers_pass = (
        lambda: backfill_workers(client, dry_run=dry_run),
        "worker docs",
        f"its last beat + {workers.EXPIRE_DAYS} days, + {workers.LEFT_EXPIRE_DAYS} once it left",
    )
    failed = 0
    for count, what, base in [*(passes if days > 0 else []), workers_pass]:
        counts = count()  # each pass said as it ends: an interrupted run has said what it did
        failed += counts.failed
        print(
            f"{counts.finished} {what} read, {counts.missing} without expire_at"
            + (" and counting no job" if what == "usage docs" else "")
            + f": {counts.missing if dry_run else counts.written} {verb} one ({base})"
            + (f", {counts.changed} changed meanwhile and left to their writer" if counts.changed else "")
            + (f", {counts.failed} not written (Firestore failing): run it again" if counts.failed else "")
            + (
                f"; {counts.counting} left undated: they count jobs still pending or running (dated once those end; "
                "a count no job backs is set right at the user's next request at a limit)"
                if counts.counting
                else ""
            ),
            flush=True,
        )
    return failed


if __name__ == "__main__":
    sys.exit(main())
