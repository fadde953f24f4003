"""A finished job deleted by its owner (`deleteGeneration`, README "Deletion"): its results in the bucket, then its
doc, in that order, so that a deletion that fails half-way leaves a doc to delete again, never files no doc names.

Only a finished job (completed or failed, cancelled included): a live one's worker would go on writing its
results. A completed job's results are the ones its doc records (its URLs, which name their bucket: a bucket
other than the one given is refused, `ElsewhereBucket`, not taken for one holding nothing); a failed job's, any
partial upload a worker left, only where the object names this job as its owner. The doc's delete is fenced on the doc as read (its `update_time`), so a job started again meanwhile (a
failed job's request restated) is not deleted under its new run. A dispatch the functions sent for the job that
has not arrived yet (`dispatches.DISPATCHED_INPUTS`), or RunPod's redelivery of one that did, would find no doc and
create the job again, a second GPU run nobody asked for: the doc's record of them stays behind as a tombstone
(`dispatches.tombstone`) that the worker reads before it creates a doc, deleted by TTL after TOMBSTONE_DAYS.

`erase_user` deletes all a user has here (an account deleted, an erasure request): the callable
`deleteAllGenerations` and scripts/delete_user_data.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.api_core.exceptions import Aborted, RetryError

from . import lifecycle, quota, results
from .contract import TASK_TYPE
from .dispatches import tombstone
from .jobs import BOUND, COLLECTION, COMMIT_CONFLICTS, MEDIA_TYPES, JobKey, JobStore, tombstone_ref

TRIES = 5  # reads and fenced deletes of one doc that another write got to first
STORAGE_TIMEOUT = 10.0  # seconds per Storage request
STORAGE_BUDGET = 40.0  # seconds of Storage requests for one job's deletion (the callables' own limit is 60 s)


class NotFinished(Exception):
    """The job is queued or processing: cancel it first."""

    def __init__(self, status: str):
        super().__init__(status)
        self.status = status


class ElsewhereBucket(Exception):
    """The job's results are in another bucket than the one given (its recorded URLs name another)."""


def recorded_urls(doc: dict[str, Any]) -> list[str]:
    """The result URLs a completed job's doc records (`images`, else `videos`, else `image_url` / `video_url`)."""
    for name in ("images", "videos"):
        value = doc.get(name)
        if isinstance(value, list) and value:
            return [url for url in value if isinstance(url, str)]
    return [doc[name] for name in ("image_url", "video_url") if isinstance(doc.get(name), str)]


def in_another_bucket(doc: dict[str, Any], bucket: str) -> bool:
    """Whether a completed job's recorded results are all in another bucket than `bucket` (none: not said)."""
    urls = recorded_urls(doc) if doc.get("status") == lifecycle.COMPLETED else []
    return bool(urls) and not any(f"/{bucket}/" in url for url in urls)


@dataclass(frozen=True)
class Deleted:
    doc: dict[str, Any]  # the doc as it was deleted
    removed: int  # result objects deleted from the bucket


def delete_finished(store: JobStore, bucket: Any, key: JobKey, budget: results.Budget | None = None) -> Deleted | None:
    """Delete a finished job's results from `bucket` (a google-cloud-storage Bucket) and then its doc; None where
    there is no doc. NotFinished for a live job; ElsewhereBucket where its results are in another bucket;
    results.OutOfTime where Storage's requests took longer than `budget` (STORAGE_BUDGET)."""
    task_type = TASK_TYPE[key.media_type]
    budget = budget or results.Budget(STORAGE_TIMEOUT, STORAGE_BUDGET)
    for _ in range(TRIES):
        snapshot = store.ref(key).get(**BOUND)
        if not snapshot.exists:
            return None
        doc = snapshot.to_dict() or {}
        status = doc.get("status")
        if status not in lifecycle.FINAL_STATES:
            raise NotFinished(str(status))
        urls = recorded_urls(doc) if status == lifecycle.COMPLETED else []
        if in_another_bucket(doc, bucket.name):
            raise ElsewhereBucket(bucket.name)
        # A completed job: the objects it records. One a worker claimed: whatever part of an upload it left, strictly
        # its own. One never claimed has none (only a claim's try uploads), and may be queued again meanwhile (one
        # refused, `lifecycle.refused`), a new try writing under its names: not this doc's to delete (the fencing
        # review: they went, and the new try completed with URLs to nothing).
        indices = range(len(urls)) if urls else range(results.most(task_type) if quota.ran(doc) else 0)
        removed = results.remove(bucket, key.user_id, key.file_uid, task_type, indices, budget, strict=not urls)
        batch = store.client.batch()
        batch.delete(snapshot.reference, option=store.client.write_option(last_update_time=snapshot.update_time))
        # An earlier job of the same file_uid, deleted too, may have left one: both are kept.
        grave = tombstone_ref(store.client, key).get(**BOUND)
        mark = tombstone(doc, snapshot.read_time, grave.to_dict() if grave.exists else None)
        if mark is not None and grave.exists:
            batch.update(grave.reference, mark, option=store.client.write_option(last_update_time=grave.update_time))
        elif mark is not None:
            batch.create(grave.reference, mark)
        try:
            batch.commit(**BOUND)
        except COMMIT_CONFLICTS:  # written since the read: decide again on what is now
            continue
        return Deleted(doc, removed)
    raise Aborted(f"{key.path}: still being written after {TRIES} tries to delete it")


ERASE_PAGE = 100  # a user's jobs one erasure pass takes on (the callable's pass must end well within its timeout)
ERASE_SECONDS = 60.0  # of Storage's requests one pass may take (deleteAllGenerations' own limit is 120 s)
SWEEP_PAGE = 500  # objects of the user's folder listed a request


@dataclass
class Erasure:
    deleted: int = 0  # finished jobs deleted (results and doc)
    stopping: int = 0  # running jobs asked to stop: deleted by a later pass, once they have
    elsewhere: int = 0  # jobs whose results are in another bucket than the one given: left (ElsewhereBucket)
    objects: int = 0  # objects left under the user's folder, deleted once no job of theirs was left
    done: bool = False  # no job doc of the user's left, no file (and, with `usage`, no usage doc)


def erase_user(
    store: JobStore,
    bucket: Any,
    user_id: str,
    *,
    page: int = ERASE_PAGE,
    seconds: float = ERASE_SECONDS,
    usage: bool = False,
) -> Erasure:
    """One pass of deleting everything a user has here (an account deleted, an erasure request): each finished job
    deleted as `delete_finished` deletes one; a queued one cancelled and deleted; a running one asked to stop
    (`cancel_requested`), left to a later pass. Once no job doc of the user's is left, whatever is still under
    their folder in the bucket (results whose docs TTL deleted first; an upload no doc recorded), but what was
    written since the pass began (a job of theirs created meanwhile), and with `usage` their usage doc, where it
    counts no job. At most `page` jobs and about `seconds` a pass: call it again until `.done`. A deleted job's
    tombstone stays until its TTL (two days): a late dispatch would otherwise run it again, and bring its files
    back. Without `usage` the usage doc stays, idle, until its own TTL: deleted, it would give the user back the
    day's spent budget (the callable's caller may go on using the app)."""
    folder = user_folder(user_id)
    budget = results.Budget(STORAGE_TIMEOUT, seconds)
    erasure = Erasure()
    try:
        began = store.usage_ref(user_id).get(**BOUND).read_time  # the server's clock, as the objects' times are
        seen = 0
        for media in MEDIA_TYPES:
            docs = store.client.collection(COLLECTION, user_id, media).limit(page - seen).get(**BOUND)
            for snapshot in docs:
                budget.call()  # OutOfTime once this pass's time is spent
                seen += 1
                key = JobKey(user_id, media, snapshot.id)
                if (snapshot.to_dict() or {}).get("status") not in lifecycle.FINAL_STATES:
                    store.cancel(key)  # a queued job ends here and now; a running one at its worker's next step
                try:
                    erasure.deleted += delete_finished(store, bucket, key, budget) is not None
                except NotFinished:
                    erasure.stopping += 1
                except ElsewhereBucket:
                    erasure.elsewhere += 1
            if seen >= page:
                return erasure
        if erasure.stopping or erasure.elsewhere or _has_jobs(store, user_id):  # a job created meanwhile
            return erasure
        erasure.objects += _sweep(bucket, folder, began, budget)
        erasure.done = not usage or _drop_usage(store, user_id)
    except results.OutOfTime:  # this pass's time is spent: the next one goes on from what is left
        pass
    except RetryError:  # a request's retries cut short by the pass's time, as above; else Firestore or Storage away
        if not budget.spent():
            raise
    return erasure


def user_folder(user_id: str) -> str:
    """The user's results in the bucket: `generating/{uid}/` (no `/` in the uid: no other user's folder)."""
    return f"generating/{results.check_part('user_id', user_id)}/"


def _has_jobs(store: JobStore, user_id: str) -> bool:
    return any(store.client.collection(COLLECTION, user_id, media).limit(1).get(**BOUND) for media in MEDIA_TYPES)


def _sweep(bucket: Any, folder: str, began: Any, budget: results.Budget) -> int:
    """Delete what is under `folder` but what was written since `began` (a job's that ran meanwhile: its doc names
    it); a page of the listing at a time, each within what is left of `budget`. How many it deleted."""
    deleted, token = 0, None
    while True:
        listing = bucket.list_blobs(prefix=folder, page_token=token, max_results=SWEEP_PAGE, **budget.call())
        for blob in next(listing.pages, []):
            if blob.time_created is None or blob.time_created < began:
                deleted += results.delete_object(bucket, blob.name, budget)
        token = listing.next_page_token
        if not token:
            return deleted


def _drop_usage(store: JobStore, user_id: str) -> bool:
    """Delete the user's usage doc once none of their jobs is left (fenced on the doc as read); whether none is
    left. Counts it still holds then are stale (a job an older release ended uncounted): kept, they held the script
    in pass after pass until its --wait ran out, and it said jobs were "still stopping" (the operator-scripts
    review). A job created after the read changed the doc (its admission), so the fenced delete lands nowhere."""
    snapshot = store.usage_ref(user_id).get(**BOUND)
    if not snapshot.exists:
        return True
    if _has_jobs(store, user_id):
        return False
    try:
        snapshot.reference.delete(option=store.client.write_option(last_update_time=snapshot.update_time), **BOUND)
    except COMMIT_CONFLICTS:  # written meanwhile: the next pass decides again
        return False
    return True
