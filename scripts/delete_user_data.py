#!/usr/bin/env python3
"""Delete everything firegen holds of one or more users (an account deleted, an erasure request): every job doc
under `generations/{uid}/`, every object under `generating/{uid}/` in the results' bucket, and `usage/{uid}`
(README "Deletion").

A queued job is cancelled and deleted; a running one is asked to stop (it ends at its worker's next step) and is
deleted once it has: the script waits for that, `--wait` seconds at most, then says what is left and exits 1 (run
it again later). A deleted job's tombstone (`generations/{uid}/deleted_jobs/`, no personal data but the uid in
its path) stays until its TTL deletes it, two days later: it keeps a late dispatch from running the job again.

    .venv/bin/python scripts/delete_user_data.py --project my-app --bucket my-app.firebasestorage.app UID [UID ...]

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # firegen_core, from a checkout

from google.cloud import firestore, storage  # type: ignore[attr-defined]  # no type information in google-cloud-storage

from firegen_core import lifecycle, quota
from firegen_core.deletion import Erasure, erase_user
from firegen_core.jobs import JobStore

POLL_SECONDS = 2.0  # between passes while running jobs stop


def erase(store: JobStore, bucket, user_id: str, *, wait: float) -> Erasure:
    """Passes of `erase_user` until nothing of the user's is left or `wait` seconds have gone; the totals."""
    total, deadline = Erasure(), time.monotonic() + wait
    while True:
        step = erase_user(store, bucket, user_id, usage=True)
        total.deleted += step.deleted
        total.objects += step.objects
        total.stopping, total.elsewhere, total.done = step.stopping, step.elsewhere, step.done
        if step.done or step.elsewhere or time.monotonic() >= deadline:
            return total
        if step.stopping and not step.deleted:  # only running jobs left: give their workers a step's time
            time.sleep(POLL_SECONDS)


def store_for(db: firestore.Client, user_id: str) -> JobStore:
    """A store that writes the user's usage doc with the limits it states (the deployment's, as its workers and
    functions last wrote them) and RETENTION_DAYS from the environment: a pass that stops part-way (a running job
    still stopping) leaves the doc as the deployment would, not with this script's defaults."""
    stated = (db.collection(quota.USAGE_COLLECTION).document(user_id).get().to_dict() or {}).get("limits")
    try:
        limits = quota.Limits(**stated) if isinstance(stated, dict) else quota.Limits()
    except (TypeError, ValueError):  # an admin's edit: the defaults, as anywhere else
        limits = quota.Limits()
    return JobStore(db, limits=limits, retention_days=lifecycle.retention_days(os.environ))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", required=True, help="the Firebase project id")
    parser.add_argument("--bucket", required=True, help="the results' bucket (the workers' STORAGE_BUCKET)")
    parser.add_argument("--wait", type=float, default=600.0, help="seconds to wait for running jobs to stop")
    parser.add_argument("uids", nargs="+", metavar="UID", help="the users' Firebase Auth uids")
    args = parser.parse_args(argv)
    db = firestore.Client(project=args.project)
    bucket = storage.Client(project=args.project).bucket(args.bucket)
    left = 0
    for uid in args.uids:
        try:
            erased = erase(store_for(db, uid), bucket, uid, wait=args.wait)
        except Exception as exc:  # no uid at all (`a/b`: nothing touched), Firestore or Storage away: the next uid
            left += 1
            print(f"{uid}: not deleted: {type(exc).__name__}: {exc}")
            continue
        said = f"{uid}: {erased.deleted} jobs deleted, {erased.objects} other objects"
        if erased.done:
            print(f"{said}; nothing left")
        elif erased.elsewhere:
            left += 1
            print(f"{said}; {erased.elsewhere} jobs' results are in another bucket than --bucket: left")
        else:
            left += 1
            print(f"{said}; {erased.stopping} running jobs still stopping after {args.wait:g} s: run it again later")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
