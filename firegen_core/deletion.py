"""A finished job deleted by its owner (`deleteGeneration`, README "Deletion"): its results in the bucket, then its
doc, in that order, so that a deletion that fails half-way leaves a doc to delete again, never files no doc names.

Only a finished job (completed or failed, cancelled included): a live one's worker would go on writing its
results. The doc's delete is fenced on the doc as read (its `update_time`), so a job started again meanwhile (a
failed job's request restated) is not deleted under its new run. A dispatch the functions sent for the job that
has not arrived yet (`jobs.DISPATCHED_INPUTS`), or RunPod's redelivery of one that did, would find no doc and
create the job again, a second GPU run nobody asked for: the doc's record of them stays behind as a tombstone
(`jobs.tombstone`) that the worker reads before it creates a doc, deleted by TTL after TOMBSTONE_DAYS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.api_core.exceptions import Aborted, FailedPrecondition

from . import lifecycle, results
from .contract import TASK_TYPE
from .jobs import BOUND, JobKey, JobStore, tombstone, tombstone_ref

TRIES = 5  # reads and fenced deletes of one doc that another write got to first
STORAGE_TIMEOUT = 10.0  # seconds per Storage request


class NotFinished(Exception):
    """The job is queued or processing: cancel it first."""

    def __init__(self, status: str):
        super().__init__(status)
        self.status = status


@dataclass(frozen=True)
class Deleted:
    doc: dict[str, Any]  # the doc as it was deleted
    removed: int  # result objects deleted from the bucket


def delete_finished(store: JobStore, bucket: Any, key: JobKey) -> Deleted | None:
    """Delete a finished job's results from `bucket` (a google-cloud-storage Bucket) and then its doc; None where
    there is no doc. NotFinished for a live job."""
    task_type = TASK_TYPE[key.media_type]
    for _ in range(TRIES):
        snapshot = store.ref(key).get(**BOUND)
        if not snapshot.exists:
            return None
        doc = snapshot.to_dict() or {}
        status = doc.get("status")
        if status not in lifecycle.FINAL_STATES:
            raise NotFinished(str(status))
        removed = results.remove(
            bucket, key.user_id, key.file_uid, task_type, range(results.most(task_type)), STORAGE_TIMEOUT
        )
        batch = store.client.batch()
        batch.delete(snapshot.reference, option=store.client.write_option(last_update_time=snapshot.update_time))
        mark = tombstone(doc, snapshot.read_time)
        if mark is not None:
            batch.set(tombstone_ref(store.client, key), mark)
        try:
            batch.commit(**BOUND)
        except FailedPrecondition:  # written since the read: decide again on what it holds now
            continue
        return Deleted(doc, removed)
    raise Aborted(f"{key.path}: still being written after {TRIES} tries to delete it")
