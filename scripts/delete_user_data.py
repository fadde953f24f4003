#!/usr/bin/env python3
"""Delete everything firegen holds of one or more users (an account deleted, an erasure request): every job doc
under `generations/{uid}/`, every object under `generating/{uid}/` in the results' bucket, and `usage/{uid}`
(README "Deletion").

A queued job is cancelled and deleted; a running one is asked to stop (it ends at its worker's next step) and is
deleted once it has: the script waits for that, `--wait` seconds at most, then says what is left and exits 1 (run
it again later). A deleted job's tombstone (`generations/{uid}/deleted_jobs/`, no personal data but the uid in
its path) stays until its TTL deletes it, two days later: it keeps a late dispatch from running the job again.

    .venv/bin/python scripts/delete_user_data.py --project my-app --bucket my-app.firebasestorage.app UID [UID ...]

`--dry-run` counts what it would delete (jobs by status, objects, the usage doc) and writes nothing.

A user of whom the project holds nothing (no job doc, no tombstone, no usage doc) but who has files in the bucket
keeps them, said in their line (exit 1): a --project that is not the bucket's would otherwise delete another
project's results, their docs left pointing at nothing. `--files-without-jobs` deletes them (docs gone by their
TTL before their files).

Credentials: Application Default Credentials (`gcloud auth application-default login`, or
GOOGLE_APPLICATION_CREDENTIALS) that may write Firestore and delete objects in the bucket;
FIRESTORE_EMULATOR_HOST and STORAGE_EMULATOR_HOST point it at emulators; RETENTION_DAYS as the workers have it. The same as the callable
`deleteAllGenerations`, which a signed-in user calls for their own data.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # firegen_core, from a checkout

import requests
from google.api_core.exceptions import GoogleAPICallError, NotFound, RetryError
from google.auth.exceptions import DefaultCredentialsError, TransportError
from google.cloud import firestore, storage  # type: ignore[attr-defined]  # no type information in google-cloud-storage
from google.cloud.storage.retry import DEFAULT_RETRY

from firegen_core import lifecycle, quota
from firegen_core.deletion import Erasure, erase_user, in_another_bucket, user_folder
from firegen_core.dispatches import DELETED_JOBS
from firegen_core.jobs import BOUND, COLLECTION, MEDIA_TYPES, JobStore
from listener.storage import emulator_base_url

POLL_SECONDS = 2.0  # between passes while running jobs stop
CHECK_SECONDS = 15.0  # the first calls to Storage and Firestore, their retries included: one unreachable said at once
# Firestore or Storage failing (or unreachable) for a user: said in their line, and the script goes on.
UNREACHABLE = (GoogleAPICallError, RetryError, requests.RequestException, TransportError)


def erase(store: JobStore, bucket, user_id: str, *, wait: float) -> Erasure:
    """Passes of `erase_user` until nothing of the user's is left, or, once running jobs are all that is left,
    `wait` seconds have gone (a user with thousands of jobs takes passes of its own: a review saw the time run out
    on them, said as jobs "still stopping"); the totals."""
    total, deadline = Erasure(), None
    while True:
        step = erase_user(store, bucket, user_id, usage=True)
        total.deleted += step.deleted
        total.objects += step.objects
        total.stopping, total.elsewhere, total.done = step.stopping, step.elsewhere, step.done
        if step.done or step.elsewhere:
            return total
        if not step.deleted and not step.objects:
            # Only running jobs left (give their workers a step's time), or a pass that got nowhere (Storage slow
            # or away): waited on, `wait` seconds at most from the first such pass.
            deadline = deadline or time.monotonic() + wait
            if time.monotonic() >= deadline:
                return total
            time.sleep(POLL_SECONDS)


def files_of_a_stranger(db: firestore.Client, bucket, user_id: str) -> int:
    """How many files the user has in the bucket while the project holds nothing of theirs (no job doc, no
    tombstone, no usage doc); 0 where it holds something, or there are none."""
    for collection in (*MEDIA_TYPES, DELETED_JOBS):
        if db.collection(COLLECTION, user_id, collection).limit(1).get(**BOUND):
            return 0
    if db.collection(quota.USAGE_COLLECTION).document(user_id).get(**BOUND).exists:
        return 0
    return sum(1 for _ in bucket.list_blobs(prefix=user_folder(user_id), max_results=STRANGER_COUNTED))


STRANGER_COUNTED = 1000  # of a stranger's files, counted for their line


def stranger_said(user_id: str, files: int, project: str) -> str:
    many = f"{files}+" if files >= STRANGER_COUNTED else str(files)
    return (
        f"{user_id}: {many} files under {user_folder(user_id)} in the bucket, and nothing of theirs in project "
        f"{project} (is --project the bucket's?): left; --files-without-jobs deletes them"
    )


def survey(db: firestore.Client, bucket, user_id: str) -> tuple[str, bool]:
    """What a run would delete of the user's (`--dry-run`), counted, and whether it would leave something (a job
    whose results are in another bucket than `bucket`); nothing written."""
    statuses: Counter[str] = Counter()
    elsewhere = 0
    for media in MEDIA_TYPES:
        for snapshot in db.collection(COLLECTION, user_id, media).stream(**BOUND):
            doc = snapshot.to_dict() or {}
            statuses[str(doc.get("status"))] += 1
            elsewhere += in_another_bucket(doc, bucket.name)
    objects = sum(1 for _ in bucket.list_blobs(prefix=user_folder(user_id)))
    usage = db.collection(quota.USAGE_COLLECTION).document(user_id).get(**BOUND).exists
    if not statuses and not objects:
        return f"{user_id}: no jobs or files found" + ("; would delete its usage doc" if usage else ""), False
    jobs = ", ".join(f"{status} {count}" for status, count in sorted(statuses.items()))
    said = f"{user_id}: would delete {statuses.total()} jobs" + (f" ({jobs})" if jobs else "")
    said += f", {objects} objects in all" + (" and its usage doc" if usage else "")
    if elsewhere:
        said += f"; {elsewhere} jobs' results are in another bucket than --bucket: they would be left"
    return said, bool(elsewhere)


def store_for(db: firestore.Client, user_id: str) -> JobStore:
    """A store that writes the user's usage doc with the limits it states (the deployment's, as its workers and
    functions last wrote them) and RETENTION_DAYS from the environment: a pass that stops part-way (a running job
    still stopping) leaves the doc as the deployment would, not with this script's defaults."""
    stated = (db.collection(quota.USAGE_COLLECTION).document(user_id).get(**BOUND).to_dict() or {}).get("limits")
    try:
        limits = quota.Limits(**stated) if isinstance(stated, dict) else quota.Limits()
    except (TypeError, ValueError):  # an admin's edit: the defaults, as anywhere else
        limits = quota.Limits()
    return JobStore(db, limits=limits, retention_days=lifecycle.retention_days(os.environ))


def target(project: str, bucket: str) -> str:
    """What the script works on, said first; an error where Firestore and Storage would not be the same place
    (one emulator set: a review saw the jobs looked for in the emulator and the files deleted in production)."""
    firestore_host, storage_host = (os.environ.get(name, "").strip() for name in EMULATORS)
    if bool(firestore_host) != bool(storage_host):
        set_one, unset = EMULATORS if firestore_host else EMULATORS[::-1]
        raise SystemExit(f"delete_user_data: {set_one} is set and {unset} is not: set both (emulators) or neither")
    where = f"the emulators ({firestore_host}, {storage_host})" if firestore_host else "production"
    return f"project {project}, bucket {bucket}, in {where}"


EMULATORS = ("FIRESTORE_EMULATOR_HOST", "STORAGE_EMULATOR_HOST")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", required=True, help="the Firebase project id")
    parser.add_argument("--bucket", required=True, help="the results' bucket (the workers' STORAGE_BUCKET)")
    parser.add_argument("--wait", type=float, default=600.0, help="seconds to wait for running jobs to stop")
    parser.add_argument("--dry-run", action="store_true", help="count what would be deleted; write nothing")
    parser.add_argument(
        "--files-without-jobs",
        action="store_true",
        help="delete a user's files also where the project holds nothing of theirs (their docs gone by their TTL)",
    )
    parser.add_argument("uids", nargs="+", metavar="UID", help="the users' Firebase Auth uids")
    args = parser.parse_args(argv)
    dry = " (dry run: nothing is written)" if args.dry_run else ""
    print(f"delete_user_data: {target(args.project, args.bucket)}{dry}", flush=True)
    if os.environ.get("STORAGE_EMULATOR_HOST", "").strip():  # as the worker reads it: `http://` may be left out
        os.environ["STORAGE_EMULATOR_HOST"] = emulator_base_url(os.environ["STORAGE_EMULATOR_HOST"])
    checked = {"timeout": CHECK_SECONDS, "retry": DEFAULT_RETRY.with_deadline(CHECK_SECONDS)}
    try:
        db = firestore.Client(project=args.project)
        # Checked first: a misspelt bucket deleted the jobs' docs, then stopped at their files, left in the real one.
        # By a listing, which the deletion needs anyway (a bucket's own metadata needs storage.buckets.get, which
        # Storage Object Admin lacks).
        bucket = storage.Client(project=args.project).bucket(args.bucket)
        next(iter(bucket.list_blobs(max_results=1, **checked)), None)
    except NotFound:
        print(f"delete_user_data: no bucket {args.bucket} in project {args.project}", file=sys.stderr)
        return 2
    except DefaultCredentialsError as exc:
        print(f"delete_user_data: no credentials: {exc}", file=sys.stderr)
        return 2
    except UNREACHABLE as exc:
        print(f"delete_user_data: Storage failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    try:
        db.collection(quota.USAGE_COLLECTION).limit(1).get(**BOUND)
    except UNREACHABLE as exc:
        print(f"delete_user_data: Firestore failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    try:
        if args.dry_run:
            return survey_all(db, bucket, args.uids, project=args.project, strangers=not args.files_without_jobs)
        return erase_all(
            db, bucket, args.uids, wait=args.wait, project=args.project, strangers=not args.files_without_jobs
        )
    except KeyboardInterrupt:  # what is done stays done, consistent: a later run goes on from there
        print("delete_user_data: interrupted; run it again to go on", file=sys.stderr)
        return 130


def survey_all(db: firestore.Client, bucket, uids: list[str], *, project: str, strangers: bool) -> int:
    left = 0
    for uid in uids:
        try:
            files = files_of_a_stranger(db, bucket, uid) if strangers else 0
            said, leaves = (stranger_said(uid, files, project), True) if files else survey(db, bucket, uid)
            print(said, flush=True)
            left += leaves
        except Exception as exc:  # no uid at all (`a/b`), Firestore or Storage away: the next uid
            left += 1
            print(f"{uid}: not counted: {type(exc).__name__}: {exc}", flush=True)
    return 1 if left else 0


def erase_all(
    db: firestore.Client, bucket, uids: list[str], *, wait: float, project: str, strangers: bool = True
) -> int:
    left = 0
    for uid in uids:
        try:
            files = files_of_a_stranger(db, bucket, uid) if strangers else 0
            if files:
                left += 1
                print(stranger_said(uid, files, project), flush=True)
                continue
            erased = erase(store_for(db, uid), bucket, uid, wait=wait)
        except Exception as exc:  # no uid at all (`a/b`: nothing touched), Firestore or Storage away: the next uid
            left += 1
            print(f"{uid}: not deleted: {type(exc).__name__}: {exc}", flush=True)
            continue
        said = f"{uid}: {erased.deleted} jobs deleted, {erased.objects} other objects"
        if erased.done and not erased.deleted and not erased.objects:
            print(f"{uid}: no jobs or files found (a misspelt uid, or deleted already); nothing left", flush=True)
        elif erased.done:
            print(f"{said}; nothing left", flush=True)
        elif erased.elsewhere:
            left += 1
            print(f"{said}; {erased.elsewhere} jobs' results are in another bucket than --bucket: left", flush=True)
        elif erased.stopping:
            left += 1
            print(
                f"{said}; {erased.stopping} running jobs still stopping after {wait:g} s: run it again later",
                flush=True,
            )
        else:
            left += 1
            print(
                f"{said}; passes got nowhere for {wait:g} s (Firestore or Storage slow or away): run it again later",
                flush=True,
            )
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
