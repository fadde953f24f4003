"""The calls an owner makes on their own jobs, as plain functions that take their clients (tests call these directly).

- `cancel`: the `cancelGeneration` callable: a queued job is failed `Cancelled` at once, a running one gets
  `cancel_requested` and its worker stops it at its next step.
- `delete`: the `deleteGeneration` callable: a finished job, its results and its doc; `delete_all`, the
  `deleteAllGenerations` callable: all the caller has here (an app's account deletion).

Each names the caller's own job from the auth uid, so another user's job is simply not found, and answers a Firestore
away as `unavailable`, the client's to retry (`dispatch.unavailable_when_firestore_is_away`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import requests
from dispatch import (
    FIRESTORE_AWAY,
    CallError,
    job_store,
    refuse_no_object,
    remove_left_behind,
    unavailable_when_firestore_is_away,
)
from google.api_core.exceptions import Forbidden, GoogleAPICallError, PermissionDenied
from google.auth.exceptions import GoogleAuthError
from google.cloud import firestore

from firegen_core import deletion, lifecycle, quota
from firegen_core.contract import (
    ContractError,
    check_id,
    invalid,
    left_out,
    normalise_document_fields,
    refuse_unknown,
    spellings,
)
from firegen_core.errors import CANCELLED
from firegen_core.jobs import MEDIA_TYPES, JobKey
from firegen_core.quota import Limits

log = logging.getLogger("functions.owner_calls")
CANCEL_NOT_RECORDED = "Could not record the cancel in Firestore; please try again"
# The fields of the calls that name one of the caller's jobs (cancelGeneration, deleteGeneration)
JOB_NAMES = {"file_uid": "fileUid", "media_type": "mediaType", "user_id": "userId"}  # their refusals' words
JOB_FIELDS = frozenset(JOB_NAMES)  # in either spelling
CANCELLED_REPLY = "Generation cancelled"
CANCELLING_REPLY = "Cancelling: the worker stops the generation at its next step"
DELETED_REPLY = "Generation deleted"
DELETE_NOT_RECORDED = "Could not delete the generation; please try again"


def _named_job(uid: str | None, data: Any, verb: str) -> JobKey:
    """The caller's own job a call names ({fileUid, mediaType}), or the CallError that refuses the call. Worded as
    generateWithRunPod words its refusals: "X is required" for a missing field, the contract's "Validation
    failed: ..." for a wrong one, "user_id must be the signed-in user's uid" for another user's."""
    if not uid:
        raise CallError("unauthenticated", f"Sign in to {verb} a generation")
    refuse_no_object(data)
    for name, value in spellings(data, "user_id", JOB_FIELDS):  # `userId` too, as generateWithRunPod reads it
        if not left_out(value) and value != uid:
            raise CallError("permission-denied", f"{name} must be the signed-in user's uid")
    try:
        # Strict as generateWithRunPod is: a misspelt field (`fileID`) was taken for no field at all.
        fields = normalise_document_fields(data, JOB_FIELDS, called=JOB_NAMES)
        refuse_unknown(fields, JOB_FIELDS)
    except ContractError as exc:
        raise CallError("invalid-argument", exc.message) from None
    media = fields.get("media_type")
    if media in (None, ""):
        raise CallError("invalid-argument", "mediaType is required")
    if media not in MEDIA_TYPES:
        raise CallError("invalid-argument", invalid(f"mediaType must be one of {', '.join(MEDIA_TYPES)}").message)
    file_uid = fields.get("file_uid")
    if file_uid in (None, ""):
        raise CallError("invalid-argument", "fileUid is required")
    try:
        file_uid = check_id("fileUid", file_uid)
    except ContractError as exc:
        raise CallError("invalid-argument", exc.message) from None
    return JobKey(uid, media, file_uid)


@unavailable_when_firestore_is_away(CANCEL_NOT_RECORDED)
def cancel(
    db: firestore.Client,
    *,
    uid: str | None,
    data: Any,
    limits: Limits = Limits(),
    bucket: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """The `cancelGeneration` callable: {fileUid, mediaType} of one of the caller's jobs.

    A queued job is failed `Cancelled` now; a processing one gets `cancel_requested: true` and its worker
    fails it `Cancelled` at its next denoising step. Reply: {success: True, fileUid, mediaType, status:
    "cancelled" | "cancelling", message}. Only the caller's own jobs can be named (the path is built from the
    auth uid): another user's job is simply not found.
    Unknown fields are refused. A finished job is left as it is (failed-precondition;
    a job already cancelled answers "cancelled" again, so a retried call is harmless). A queued job an earlier try
    ran (its worker died mid-upload, then it was released) has what that try uploaded removed from `bucket()`.
    """
    key = _named_job(uid, data, "cancel")
    outcome = job_store(db, limits).cancel(key)  # its refund rewrites the usage doc, limits included
    doc = outcome.before
    if doc is None:
        raise CallError("not-found", "No such generation")
    reply = {"success": True, "fileUid": key.file_uid, "mediaType": key.media_type}
    written = outcome.written or {}
    if written.get("status") == lifecycle.FAILED:
        if quota.ran(doc) and bucket is not None:
            remove_left_behind(bucket, key)
        return {**reply, "status": "cancelled", "message": CANCELLED_REPLY}
    if written.get(lifecycle.CANCEL_REQUESTED) or (
        doc.get("status") == lifecycle.PROCESSING and doc.get(lifecycle.CANCEL_REQUESTED)
    ):
        return {**reply, "status": "cancelling", "message": CANCELLING_REPLY}
    if doc.get("status") == lifecycle.FAILED and doc.get("error_type") == CANCELLED:
        return {**reply, "status": "cancelled", "message": CANCELLED_REPLY}
    raise CallError("failed-precondition", f"Generation already {doc.get('status')}: nothing to cancel")


@contextmanager
def _deleting_in(bucket: Any) -> Iterator[None]:
    """A deletion's failures answered `unavailable` (the client's to retry), logged as ours (ERROR): Storage or
    Firestore away or past the deletion's time; the functions' service account may not delete in the bucket (an
    operator's to grant); the job's results in another bucket than the functions' (an operator's to set)."""
    name = getattr(bucket, "name", None)
    try:
        yield
    except Forbidden as exc:  # Storage's 403, or Firestore's PERMISSION_DENIED (a subclass): each its own grant
        grant = (
            "roles/datastore.user" if isinstance(exc, PermissionDenied) else "roles/storage.objectUser on the bucket"
        )
        log.error("delete_forbidden", extra={"bucket": name, "grant": grant})
        raise CallError("unavailable", DELETE_NOT_RECORDED) from None
    except deletion.ElsewhereBucket:
        log.error("delete_elsewhere", extra={"bucket": name, "set": "STORAGE_BUCKET to the workers' bucket"})
        raise CallError("unavailable", DELETE_NOT_RECORDED) from None
    except (*FIRESTORE_AWAY, GoogleAPICallError, GoogleAuthError, requests.RequestException, TimeoutError) as exc:
        log.error("deletion_unavailable", extra={"bucket": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        raise CallError("unavailable", DELETE_NOT_RECORDED) from None


@unavailable_when_firestore_is_away(DELETE_NOT_RECORDED)
def delete(
    db: firestore.Client, bucket: Any, *, uid: str | None, data: Any, limits: Limits = Limits()
) -> dict[str, Any]:
    """The `deleteGeneration` callable: {fileUid, mediaType} of one of the caller's finished jobs, whose results
    are deleted from `bucket` and then its doc (firegen_core.deletion). Reply: {success: True, fileUid, mediaType,
    status: "deleted", message}. A queued or processing job is refused (failed-precondition): cancel it first. A
    job not found (another user's, or deleted already: a retried call) is `not-found`."""
    key = _named_job(uid, data, "delete")
    if bucket is None:  # the functions' configuration names none (logged)
        raise CallError("unavailable", DELETE_NOT_RECORDED)
    try:
        with _deleting_in(bucket):
            deleted = deletion.delete_finished(job_store(db, limits), bucket, key)
    except deletion.NotFinished as exc:
        raise CallError("failed-precondition", f"Generation is {exc.status}: cancel it first, then delete it") from None
    if deleted is None:
        raise CallError("not-found", "No such generation")
    log.info("job_deleted", extra={"user_id": key.user_id, "file_uid": key.file_uid, "objects": deleted.removed})
    return {
        "success": True,
        "fileUid": key.file_uid,
        "mediaType": key.media_type,
        "status": "deleted",
        "message": DELETED_REPLY,
    }


ERASE_NAMES = {"user_id": "userId"}  # deleteAllGenerations takes no field but the caller's own uid
ERASE_FIELDS = frozenset(ERASE_NAMES)


@unavailable_when_firestore_is_away(DELETE_NOT_RECORDED)
def delete_all(
    db: firestore.Client, bucket: Any, *, uid: str | None, data: Any, limits: Limits = Limits()
) -> dict[str, Any]:
    """The `deleteAllGenerations` callable: one pass of deleting all the caller has here (firegen_core.deletion
    `erase_user`: their jobs, their files; their usage doc stays, idle, to its TTL, so that the day's spend
    stands), for an app's account deletion. Reply: {success: True,
    status: "deleted" | "deleting", deleted, stopping, message}; "deleting": call again (running jobs are
    stopping, or there were more jobs than one pass takes on)."""
    if not uid:
        raise CallError("unauthenticated", "Sign in to delete your generations")
    if data is not None:  # a call with no argument at all asks for the caller's own data
        refuse_no_object(data)
    for name, value in spellings(data or {}, "user_id", ERASE_FIELDS):
        if not left_out(value) and value != uid:
            raise CallError("permission-denied", f"{name} must be the signed-in user's uid")
    try:
        refuse_unknown(normalise_document_fields(data or {}, ERASE_FIELDS, called=ERASE_NAMES), ERASE_FIELDS)
    except ContractError as exc:
        raise CallError("invalid-argument", exc.message) from None
    if bucket is None:  # the functions' configuration names none (logged)
        raise CallError("unavailable", DELETE_NOT_RECORDED)
    with _deleting_in(bucket):
        erased = deletion.erase_user(job_store(db, limits), bucket, uid)
    log.info("user_erased" if erased.done else "user_erasing", extra={"user_id": uid, **asdict(erased)})
    if erased.elsewhere:  # never deleted by calling again: an operator's to set (the pass did the rest)
        with _deleting_in(bucket):
            raise deletion.ElsewhereBucket(getattr(bucket, "name", None))
    reply = {"success": True, "deleted": erased.deleted, "stopping": erased.stopping}
    if erased.done:
        return {**reply, "status": "deleted", "message": "All your generations are deleted"}
    if erased.stopping:
        one = erased.stopping == 1
        what = "1 running generation is" if one else f"{erased.stopping} running generations are"
        message = f"Deleting: {what} stopping; call again in a moment to delete {'it' if one else 'them'}"
    else:
        message = "Deleting: call again to delete the rest"
    return {**reply, "status": "deleting", "message": message}
