"""What the Cloud Functions do, as plain functions that take their clients (tests call these directly).

- `generate`: the `generateWithRunPod` callable. Validates the caller's request with the worker's own
  contract, creates the queued job doc unless the client already wrote it (a client's doc takes the call's
  parameters where it says otherwise: `lifecycle.restate`), and dispatches it to RunPod.
- `dispatch_created`: the Firestore trigger for job docs that clients write themselves: dispatch once.
The owner's own calls on their jobs (cancel, delete) are in owner_calls.py; the scheduled sweep in sweep.py.

Each job is dispatched through one compare-and-set that marks it first (`dispatch_count`, `dispatched_at`,
`dispatched_by`), so of a client's setDoc, its trigger (delivered at least once) and its callable call, only
one sends the job to RunPod. The callable and the trigger admit the job against its user's limits in that
same write (`firegen_core.quota`: refused past USER_MAX_PENDING or USER_DAILY_BUDGET, failed `QuotaExceeded`). Marker fields are neither request fields nor the worker's state fields, so the
worker's contract ignores them. Docs are written only through the worker's own job store and document shapes
(firegen_core.jobs, firegen_core.lifecycle; vendored into functions/ at deploy by scripts/vendor_shared.py).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

import runpod_client
from google.api_core.exceptions import (
    Aborted,
    Cancelled,
    DeadlineExceeded,
    GoogleAPICallError,
    InternalServerError,
    RetryError,
    ServiceUnavailable,
)
from google.cloud import firestore
from google.cloud.firestore import DELETE_FIELD, SERVER_TIMESTAMP
from runpod_client import RunPodClient, Verdict

from firegen_core import lifecycle, quota, results
from firegen_core.contract import (
    CLOUD_ONLY,
    MAX_PROMPT_CHARS,
    REQUESTED_AT,
    TASK_TYPE,
    ContractError,
    GenerationRequest,
    awaits_parameters,
    check_id,
    clip,
    finished_otherwise,
    invalid,
    left_out,
    media_type_of,
    normalise_document_fields,
    parse_document,
    parse_runsync_input,
    restatement,
    same,
    spellings,
)
from firegen_core.dispatches import DISPATCHED_INPUTS, RUNPOD_JOB_ID, dispatches_with, undelivered
from firegen_core.errors import (
    CANCELLED,
    CANCELLED_MESSAGE,
    QUOTA_EXCEEDED,
    VALIDATION_ERROR,
    GenerationError,
)
from firegen_core.jobs import (
    BOUND,
    MEDIA_TYPES,
    Decide,
    JobKey,
    JobStore,
    Misfiled,
    Outcome,
    contract_failure,
    queued_document,
    refused_try,
    stated_request,
)
from firegen_core.quota import Limits

log = logging.getLogger("functions.dispatch")
# Seconds of Storage requests to remove what a gone worker's try uploaded for a job the functions end
# (`remove_left_behind`).
REMOVAL_BUDGET = 10.0
P, R = ParamSpec("P"), TypeVar("R")

# Fields this codebase adds to a job doc (the worker ignores them).
DISPATCH_COUNT = lifecycle.DISPATCH_COUNT  # how many times a worker was woken for this job
DISPATCHED_AT = "dispatched_at"  # server time of the last dispatch
DISPATCHED_BY = "dispatched_by"  # "callable" | "trigger" | "scheduler"
DISPATCH_TOKEN = "dispatch_token"  # the last marking's own id (`Marking`)
DISPATCH_ERROR = lifecycle.DISPATCH_ERROR  # why the last dispatch did not reach a worker; removed by the next one

BY_CALLABLE, BY_TRIGGER, BY_SCHEDULER = "callable", "trigger", "scheduler"

STARTED_MESSAGE = "Generation started"
QUEUED_MESSAGE = "Generation queued: a GPU worker is starting and will pick it up"
PENDING_MESSAGE = "Generation queued: the GPU service did not answer yet; a worker will pick it up"


class CallError(Exception):
    """An error for the callable's client: `code` is a Firebase Functions error code."""

    def __init__(self, code: str, message: str):
        message = clip(message)
        super().__init__(message)
        self.code = code
        self.message = message


# Firestore away (the client's retries ran out), or a doc contended past the call's bound.
FIRESTORE_AWAY = (RetryError, ServiceUnavailable, DeadlineExceeded, InternalServerError, Aborted, Cancelled)
# Said to an app's user (the worker's runsync says more: NOT_RECORDED, the same file_uid is safe to send again).
JOB_NOT_RECORDED = "Could not record the job in Firestore; please try again"


def unavailable_when_firestore_is_away(message: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A callable whose Firestore calls failed answers `unavailable` with `message` (the client's to retry), not
    the framework's bare INTERNAL for an exception (audit: the web app showed "INTERNAL"); logged as an error."""

    def wrap(call: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(call)
        def answered(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return call(*args, **kwargs)
            except FIRESTORE_AWAY as exc:
                log.error("firestore_unavailable", extra={"call": call.__name__, "error": str(exc)})
                raise CallError("unavailable", message) from exc

        return answered

    return wrap


@dataclass(frozen=True)
class Policy:
    """How hard to try: re-dispatch a job left queued `redispatch_after` after its last dispatch, at most
    `max_dispatches` dispatches in all, then fail it. `scan_limit` bounds one sweep per media type."""

    redispatch_after: timedelta = timedelta(minutes=10)
    max_dispatches: int = 3
    scan_limit: int = 100
    # A sweep starts no dispatch past this: one can take RunPod's whole deadline (50 s), and the scheduled
    # function ends at 300 s, cut off mid-sweep with its counts unsaid. The rest wait for the next sweep.
    sweep_budget: timedelta = timedelta(seconds=200)


# How a failed job's error_type answers the callable; any other failure is failed-precondition.
CALL_ERROR_CODES = {VALIDATION_ERROR: "invalid-argument", QUOTA_EXCEEDED: "resource-exhausted"}


def job_store(db: firestore.Client, limits: Limits = Limits()) -> JobStore:
    # RETENTION_DAYS is a plain variable, as the workers read it (config.py checks it at each cold start).
    return JobStore(db, limits=limits, retention_days=lifecycle.retention_days(os.environ))


class Marking:
    """One dispatcher's marks on a job, each try's with a token of its own (`dispatch_token`). A try whose commit
    landed but whose answer was lost is sent again by the client library, which the doc's new update time refuses;
    read again, the doc showed the job dispatched, as if by another: nothing was sent, the callable said
    "Generation started", and the job waited for the sweep (a review). A doc bearing one of this dispatcher's
    tokens is its own marking, and its dispatch goes out."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.landed: dict[str, Any] | None = None

    def markers(
        self, doc: Mapping[str, Any] | None, by: str, request: GenerationRequest, *, afresh: bool = False
    ) -> dict[str, Any]:
        """The fields of one more dispatch of `request`; `afresh`: the first of a refused job's new try."""
        self.tokens.append(uuid.uuid4().hex)
        markers: dict[str, Any] = {
            DISPATCH_COUNT: (0 if afresh else int(quota.number(doc or {}, DISPATCH_COUNT))) + 1,
            DISPATCHED_AT: SERVER_TIMESTAMP,
            DISPATCHED_BY: by,
            DISPATCH_TOKEN: self.tokens[-1],
            # Every one kept, a new try's too: an earlier try's runsync may still arrive.
            DISPATCHED_INPUTS: dispatches_with(doc, request),
        }
        if doc and DISPATCH_ERROR in doc and not afresh:
            markers[DISPATCH_ERROR] = DELETE_FIELD
        return markers

    def landed_here(self, doc: Mapping[str, Any] | None) -> bool:
        """Whether `doc` bears this dispatcher's marking (a decide then writes nothing more)."""
        if doc is not None and doc.get(DISPATCH_TOKEN) in self.tokens:
            self.landed = dict(doc)
            return True
        return False

    def transition(self, store: JobStore, key: JobKey, decide: Decide, *, admit: bool = False) -> Outcome:
        """`store.transition`, with a marking that landed unanswered as written by it. Also one whose last try's
        answer was lost as the transition gave up (Firestore slow past its bound): the transition raised, and the
        dispatch never went out while the doc said it had, so a retried call answered "Generation started" and sent
        nothing either, and the job waited for the sweep (the fencing review). One read then tells."""
        try:
            outcome = store.transition(key, decide, admit=admit)
        except FIRESTORE_AWAY as exc:
            if not self.tokens:
                raise
            try:
                snapshot = store.ref(key).get(**BOUND)
            except FIRESTORE_AWAY:
                raise exc from None
            if not self.landed_here(snapshot.to_dict() if snapshot.exists else None):
                raise
            outcome = Outcome(None, None, snapshot.read_time)
        if outcome.applied or self.landed is None:
            return outcome
        marks = {name: self.landed[name] for name in (DISPATCH_COUNT, DISPATCHED_BY, DISPATCH_TOKEN)}
        return replace(outcome, before=self.landed, written=marks)


def runsync_input(request: GenerationRequest) -> dict[str, Any]:
    """The runsync `input` for a validated request: the fields as given, snake_case, cloud storage on."""
    ids = {"user_id": request.user_id, "file_uid": request.file_uid, "use_cloud_storage": True}
    return {**request.runsync_parameters(), **ids}


def _record_refusal(
    store: JobStore,
    uid: str,
    fields: Mapping[str, Any],
    message: str,
    key: JobKey | None = None,
    bucket: Callable[[], Any] | None = None,
) -> None:
    """The contract's flow for a rejected job: its doc ends `failed` with the error fields, so a client that
    listens to it sees why. The client's queued doc is failed; where it wrote none, a failed one is created,
    with the request's prompt where it is a string. `key`: the doc, where the refusal named it (`Misfiled`).
    Only for ids that are safe document ids: anything else gets the error reply alone."""
    if key is None:
        try:
            key = JobKey(uid, media_type_of(fields), check_id("file_uid", fields.get("file_uid")))
        except ContractError:
            return
    error = GenerationError(VALIDATION_ERROR, message)
    failed = lifecycle.failure(error, user_id=key.user_id, file_uid=key.file_uid)

    # A created doc keeps the request's prompt, so the client's job list shows what was refused; cut to the
    # contract's limit, the most a queued doc ever holds. A client's own doc keeps the fields it wrote.
    prompt = fields.get("prompt")
    created = {**failed, "created_at": SERVER_TIMESTAMP}
    if isinstance(prompt, str):
        created["prompt"] = clip(prompt, MAX_PROMPT_CHARS)

    def decide(doc: dict | None, now: datetime) -> dict | None:
        if doc is None:
            return created
        # The client's doc is this request's job: queued, or already taken by a worker from the doc alone (the
        # worker's fenced writes then land nowhere), it fails with the refusal. A doc a valid request created
        # (`requested_at`) is that request's job, not this one's: a bad call repeated with its file_uid changes
        # nothing (it failed a running job, charged, whose own request was then refused too).
        if REQUESTED_AT in doc:
            return None
        if doc.get("status") not in (lifecycle.QUEUED, lifecycle.PROCESSING):
            return None
        return {**failed, **refused_try(key, doc, now)}

    try:
        outcome = store.transition(key, decide)
    except Exception as exc:
        log.warning("refusal_not_recorded", extra={"path": key.path, "error": type(exc).__name__})
        return
    # A queued job an earlier try ran (its worker gone mid-upload, then released), failed here: what that try
    # uploaded is no doc's, as where a cancel, the sweep or a worker's drop ends such a job.
    if outcome.ended_after_a_run and bucket is not None:
        remove_left_behind(bucket, key)


def _filed(store: JobStore, uid: str, fields: Mapping[str, Any], error: ContractError) -> tuple[JobKey | None, str]:
    """A refused call whose client filed its doc under the other media type (the client sample files by
    `numFrames` alone): that doc, and the message of that doc's contract where the call breaks it, which the
    worker writes on the doc too (the audit: `{fps: 99}` answered "fps must be between 6 and 15" while the doc
    said "fps is a video field", and a failed doc nobody listened to was created under videos)."""
    try:
        other = store.filed_elsewhere(
            JobKey(uid, media_type_of(fields), check_id("file_uid", fields.get("file_uid"))), fields
        )
    except ContractError:
        return None, error.message
    except Exception as exc:  # Firestore away: the refusal stands, as the contract says it
        log.warning("refusal_not_recorded", extra={"file_uid": fields.get("file_uid"), "error": type(exc).__name__})
        return None, error.message
    if other is None:
        return None, error.message
    try:
        parse_document(other.user_id, other.media_type, other.file_uid, fields)
    except ContractError as exc:
        return other, exc.message
    return other, error.message


def _record_verdict(
    store: JobStore, key: JobKey, verdict: Verdict, count: int, request: GenerationRequest
) -> dict[str, Any] | None:
    """Note on the doc the RunPod job id of this dispatch (`runpod_job_id`: the worker logs it as the job's
    requestId, so both platforms' logs meet) and, when the job was not delivered, why: only while the job still
    waits on this dispatch (`count`, its `dispatch_count`). A warm worker may have taken the job, even finished it,
    while the call failed (audit: a completed doc said its dispatch never arrived). A dispatch refused or not
    delivered will not arrive: its digest goes (left, it took the next request stating the same job for it: a
    re-check). The doc as it then stands (None where it could not be read)."""

    def decide(doc: dict | None, now: datetime) -> dict | None:
        if doc is None:
            return None
        fields: dict[str, Any] = {}
        if verdict.outcome in (runpod_client.REJECTED, runpod_client.UNDELIVERED):
            fields.update(undelivered(doc, request) or {})
        if verdict.job_id and doc.get(RUNPOD_JOB_ID) != verdict.job_id:
            fields[RUNPOD_JOB_ID] = verdict.job_id
        waiting = doc.get("status") == lifecycle.QUEUED and quota.number(doc, DISPATCH_COUNT) == count
        if verdict.outcome == runpod_client.UNDELIVERED and waiting:
            fields[DISPATCH_ERROR] = clip(verdict.message)
        return fields or None

    try:
        return store.transition(key, decide).after
    except Exception as exc:
        log.warning("dispatch_not_recorded", extra={"path": key.path, "error": type(exc).__name__})
        return None


def deliver(
    store: JobStore,
    runpod: RunPodClient,
    key: JobKey,
    request: GenerationRequest,
    count: int,
    bucket: Callable[[], Any] | None = None,
) -> tuple[Verdict, dict[str, Any] | None]:
    """POST the job (`count`: the dispatch_count this dispatch wrote); a refusal fails its doc (when still
    queued: a worker that already claimed it decides its fate), a failure to deliver is noted on it. The verdict,
    and the doc as it then stands (None: unread)."""
    verdict = runpod.runsync(runsync_input(request))
    fields = {"path": key.path, "outcome": verdict.outcome, "attempts": verdict.attempts}
    if verdict.outcome == runpod_client.UNDELIVERED:
        # No worker woken: WARNING; ERROR where RunPod refused the call itself (the key, the endpoint id), which
        # fails every dispatch (the review: it was INFO, while a warm worker's listener hid it by running the jobs).
        refused = verdict.http_status in (401, 403, 404)
        level, fields = (logging.ERROR if refused else logging.WARNING), {**fields, "error": verdict.message}
    else:
        level = logging.INFO
    log.log(level, "dispatched", extra={**fields, "runpod_job_id": verdict.job_id})
    if verdict.outcome == runpod_client.REJECTED:
        ended = store.fail_unclaimed(key, GenerationError(VALIDATION_ERROR, verdict.message))
        if ended.ended_after_a_run and bucket is not None:  # what a gone try uploaded (see `_record_refusal`)
            remove_left_behind(bucket, key)
    return verdict, _record_verdict(store, key, verdict, count, request)


# ------------------------------------------------------------------------------------------------ callable
def _reply(key: JobKey, message: str, status: str) -> dict[str, Any]:
    return {"success": True, "fileUid": key.file_uid, "mediaType": key.media_type, "status": status, "message": message}


# Firebase's client SDKs send a 64-bit integer (Android's Long, iOS's Int64, a Flutter int past 32 bits) as
# protobuf JSON, {"@type": ".../Int64Value", "value": "42"}: the Node Functions SDK reads it as a number, the
# Python one hands it on as that object (audit: an Android app's Long seed was refused "must be an integer").
_WRAPPED_INTEGERS = frozenset(f"type.googleapis.com/google.protobuf.{name}" for name in ("Int64Value", "UInt64Value"))
_INTEGER_TEXT = re.compile(r"-?[0-9]{1,40}")  # bounded: int() refuses 4,300 digits (ValueError: INTERNAL)


def _unwrapped(data: Any) -> Any:
    """A callable's data with its fields' wrapped 64-bit integers as ints (anything else as it came)."""
    if not isinstance(data, Mapping):
        return data
    return {name: _unwrapped_integer(value) for name, value in data.items()}


def _unwrapped_integer(value: Any) -> Any:
    if (
        isinstance(value, Mapping)
        and value.keys() == {"@type", "value"}
        and isinstance(value["@type"], str)  # a list there is unhashable (the fuzz audit: INTERNAL)
        and value["@type"] in _WRAPPED_INTEGERS
        and isinstance(value["value"], str)
        and _INTEGER_TEXT.fullmatch(value["value"])
    ):
        return int(value["value"])
    return value


@unavailable_when_firestore_is_away(JOB_NOT_RECORDED)
def generate(
    db: firestore.Client,
    runpod: RunPodClient,
    *,
    uid: str | None,
    data: Any,
    policy: Policy = Policy(),
    limits: Limits = Limits(),
    bucket: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """The `generateWithRunPod` callable. Returns its reply or raises CallError.

    Reply: {success: True, fileUid, mediaType, status: "accepted" | "queued", message}. A request the
    contract refuses raises invalid-argument with the contract's message (and fails the client's queued doc,
    if it wrote one); a job past the user's limits raises resource-exhausted and its doc ends failed
    `QuotaExceeded` (a retried call is never counted twice). A RunPod that cannot be reached is not an error
    for the client: the doc stays queued and the reply says so (status "queued"); workers find queued docs by
    themselves and the scheduled sweep wakes one again, then fails the job after `policy.max_dispatches`
    dispatches.
    """
    if not uid:
        raise CallError("unauthenticated", "Sign in to generate")
    store = job_store(db, limits)
    refuse_no_object(data)
    raw = _unwrapped(data)
    try:
        fields, twice = normalise_document_fields(raw), None
    except ContractError as exc:
        # Refused below as any field the contract refuses, its job's doc failed with it (fuzz audit: the client's
        # queued doc was left to run, at its defaults, charged, after the call was refused).
        fields, twice = normalise_document_fields(raw, first=True), exc
    if any(not left_out(value) and value != uid for _, value in spellings(raw, "user_id")):
        raise CallError("permission-denied", "user_id must be the signed-in user's uid")
    fields["user_id"] = uid
    # A file_uid given twice, differently, names no one job. The same value twice (0 and 0.0) names one, and is
    # refused as the contract refuses it (the fuzz audit: it ran under a made-up id).
    # Blank (whitespace alone) is left out too, as the contract reads a blank id as missing: the callable makes one.
    file_uids = [
        value
        for _, value in spellings(raw, "file_uid")
        if not left_out(value) and not (isinstance(value, str) and not value.strip())
    ]
    named = bool(file_uids) and all(same(file_uids[0], value) for value in file_uids[1:])
    if not named:
        fields["file_uid"] = uuid.uuid4().hex  # the reply's fileUid names it
    if fields.get("use_cloud_storage") is None:  # left out or null, as any other field: the callable's default
        fields["use_cloud_storage"] = True
    try:
        if twice is not None:
            raise twice
        request = parse_runsync_input(fields)
        if not request.use_cloud_storage:
            raise invalid(CLOUD_ONLY)
        if named:  # a made-up file_uid names no doc the client filed
            request = store.as_filed(request, fields)
    except ContractError as exc:
        # A call that named no job leaves no failed doc behind, nor looks for one: the refusal carries no id, so
        # nothing could find it (protocol audit: each such call left a doc under a random id for its retention).
        if not named:
            raise CallError("invalid-argument", exc.message) from None
        key, message = (exc.key, exc.message) if isinstance(exc, Misfiled) else _filed(store, uid, fields, exc)
        _record_refusal(store, uid, fields, message, key, bucket)
        raise CallError("invalid-argument", message) from None

    key = JobKey.of(request)
    marking = Marking()

    def decide(doc: dict | None, now: datetime) -> dict | None:
        if marking.landed_here(doc):
            return None
        if doc is None:
            return {**queued_document(request), **marking.markers(None, BY_CALLABLE, request)}
        # The client's own doc takes the parameters this call gives (a running job is queued again with them).
        update = lifecycle.restate(doc, restatement(doc, request), request.parameters()) or {}
        count = int(quota.number(doc, DISPATCH_COUNT))
        retry = DISPATCH_ERROR in doc and count < policy.max_dispatches  # the last dispatch never arrived
        again = lifecycle.refused(doc)  # refused for its limits or its parameters: this call is its new try
        if update.get("status", doc.get("status")) == lifecycle.QUEUED and (count == 0 or retry or again):
            return {**update, **marking.markers(doc, BY_CALLABLE, request, afresh=again)}
        return update or None

    outcome = marking.transition(store, key, decide, admit=True)
    doc = outcome.after
    if outcome.ended_after_a_run and bucket is not None:
        remove_left_behind(bucket, key)  # a queued job an earlier try ran, cancelled by this call's restatement
    if doc.get("status") == lifecycle.FAILED:
        # Refused just now for the user's limits, or failed before (a retried call): report it.
        raise _failed_call(doc, restatement(doc, request))
    if lifecycle.being_cancelled(doc):  # its worker ends it at its next step: answered as it will end
        raise CallError("failed-precondition", CANCELLED_MESSAGE)
    changes = restatement(doc, request)
    if changes:  # a completed job that ran with other parameters (a live one took this call's)
        raise CallError("already-exists", finished_otherwise(request, changes).message)
    if DISPATCH_COUNT not in (outcome.written or {}):
        # Someone already dispatched this job (its trigger, an earlier call) or it has moved on: report its state.
        if doc.get("status") == lifecycle.QUEUED and DISPATCH_ERROR in doc:
            return _reply(key, PENDING_MESSAGE, "queued")
        return _reply(key, STARTED_MESSAGE, "accepted")

    verdict, now = deliver(store, runpod, key, request, outcome.written[DISPATCH_COUNT], bucket)
    if verdict.outcome == runpod_client.ACCEPTED:
        return _reply(key, STARTED_MESSAGE, "accepted")
    if verdict.outcome == runpod_client.REJECTED:
        if (
            now
            and now.get("status") == lifecycle.FAILED
            and (now.get("error_type") != VALIDATION_ERROR or not lifecycle.refused(now))
        ):
            # The job ended before its dispatch arrived (its owner's cancel, a timeout): the worker's "failed"
            # answer says so, and the call answers as the job ended, not "fix parameters and retry".
            raise _failed_call(now)
        raise CallError("invalid-argument", verdict.message)
    if now and now.get("status") in (lifecycle.PROCESSING, lifecycle.COMPLETED):  # a warm worker took it meanwhile
        return _reply(key, STARTED_MESSAGE, "accepted")
    if verdict.outcome == runpod_client.QUEUED:
        return _reply(key, QUEUED_MESSAGE, "queued")
    return _reply(key, PENDING_MESSAGE, "queued")


def _failed_call(doc: Mapping[str, Any], changes: Iterable[str] = ()) -> CallError:
    """The callable's answer for a job that ended failed: its recorded error, coded by its kind (a refusal of
    parameters that cannot come back under its file_uid, or one of other parameters than this call's, is no
    refusal of this call's: failed-precondition)."""
    message = lifecycle.recorded_error(doc, changes)
    code = CALL_ERROR_CODES.get(doc.get("error_type"), "failed-precondition")
    return CallError(code if message == doc.get("error_message") else "failed-precondition", message)


# ------------------------------------------------------------------------------------------------ trigger
def dispatch_created(
    db: firestore.Client,
    runpod: RunPodClient,
    *,
    user_id: str,
    media_type: str,
    file_uid: str,
    limits: Limits = Limits(),
    grace: float = 0.0,
) -> str:
    """The Firestore trigger on generations/{uid}/{media}/{fileUid} creation: dispatch the job once.

    A doc that states its prompt and no parameter (`contract.awaits_parameters`) is what the contract's Firebase
    Function flow writes before it sends the parameters to runsync, and what a client writes before it calls the
    callable with them: the trigger leaves it to that request for up to `grace` seconds from its creation
    (PLACEHOLDER_GRACE_SECONDS, as the workers' listeners do). Dispatched at once, its defaults would run first.

    Returns what happened: "skipped" (not a queued job, or already dispatched: the callable did, a worker's
    runsync handler wrote it, or this is a repeated delivery of the same event), "invalid" (the doc breaks the
    contract: failed here, no worker woken), "refused" (past the user's limits: failed `QuotaExceeded`, no
    worker woken), "cancelled" (its owner's flag came first: failed `Cancelled`, no worker woken), or the
    verdict's outcome.
    """
    if media_type not in MEDIA_TYPES:
        return "skipped"
    key = JobKey(user_id, media_type, file_uid)
    if grace > 0:
        _await_request(db, key, grace)
    marking = Marking()

    def decide(doc: dict | None, now: datetime) -> dict | None:
        if marking.landed_here(doc):
            return None
        if doc is None or doc.get("status") != lifecycle.QUEUED or doc.get(DISPATCH_COUNT):
            return None
        if doc.get(REQUESTED_AT) or doc.get(RUNPOD_JOB_ID):
            # Created by a request (firegen_core.jobs.queued_document; clients cannot write the marker): by the
            # callable, which dispatches it, or by a worker's runsync handler, which is running it. Or its request
            # reached a worker while the trigger waited (the contract's function flow: the runsync restated it
            # there, naming its RunPod job): that worker has it, and no second one is woken.
            return None
        # Its owner's cancel (the doc's flag, within the grace, where no worker may be up to hear it): ended here
        # rather than dispatched, which would wake a GPU worker for it.
        return lifecycle.drop_cancelled(doc) or refused_or_marked(key, doc, BY_TRIGGER, marking)

    store = job_store(db, limits)
    outcome = marking.transition(store, key, decide, admit=True)
    if not outcome.applied:
        return "skipped"
    if outcome.written.get("status") == lifecycle.FAILED:
        return failed_outcome(outcome.written, otherwise="refused")
    request = parse_document(user_id, media_type, file_uid, outcome.before)
    return deliver(store, runpod, key, request, outcome.written[DISPATCH_COUNT])[0].outcome


def refused_or_marked(key: JobKey, doc: Mapping[str, Any], by: str, marking: Marking) -> dict[str, Any]:
    """A doc that breaks the contract is failed in the same write that would mark it dispatched: nothing goes out
    for it, and a request that restated it meanwhile (the callable's) makes the write decide again."""
    request = stated_request(key, doc)
    if request is None:
        return contract_failure(key, doc) or {}  # the same parse: never empty
    return marking.markers(doc, by, request)


def failed_outcome(written: Mapping[str, Any], *, otherwise: str) -> str:
    """What a transition that failed the job says it did."""
    return {CANCELLED: "cancelled", VALIDATION_ERROR: "invalid"}.get(written.get("error_type"), otherwise)


def _await_request(db: firestore.Client, key: JobKey, grace: float, poll: float = 0.25) -> None:
    """Wait, at most until `grace` seconds past the doc's creation, while it awaits its parameters: until its
    request restates it (the function's runsync, at a worker), the callable dispatches it, or a worker takes it."""
    while True:
        try:
            snapshot = db.document(key.path).get(**BOUND)  # a slow read must not hold the wait past its grace
        except (GoogleAPICallError, RetryError):  # Firestore slow or away: dispatch now, as after the grace
            return
        doc = snapshot.to_dict() if snapshot.exists else None
        if doc is None or doc.get("status") != lifecycle.QUEUED or doc.get(DISPATCH_COUNT):
            return
        if not awaits_parameters(doc):
            return
        created = doc.get("created_at") if isinstance(doc.get("created_at"), datetime) else snapshot.create_time
        left = (created + timedelta(seconds=grace) - datetime.now(UTC)).total_seconds()
        if left <= 0:
            return
        time.sleep(min(poll, left))


def refuse_no_object(data: Any) -> None:
    """A call's data that is no object (`[1]`, `"x"`, null) refused in the contract's words, naming what a caller
    sends: its data (audit: "input must be a JSON object" named runsync's field, which no call has)."""
    if not isinstance(data, Mapping):
        raise CallError("invalid-argument", invalid("the call's data must be a JSON object").message)


def remove_left_behind(bucket: Callable[[], Any], key: JobKey) -> None:
    """What a try of a job the functions just ended (cancelled, given up) had uploaded before its worker went: no
    doc names it, and no runner of that try is left to remove it (as a worker's takeover does it:
    listener.runner.remove_left_behind). Every name a job of its type may have, those its metadata names its own."""
    task_type = TASK_TYPE[key.media_type]
    try:
        found = bucket()
        if found is None:  # STORAGE_BUCKET unset: said by `storage_bucket_unset`
            return
        budget = results.Budget(REMOVAL_BUDGET / 2, REMOVAL_BUDGET)
        removed = results.remove(
            found, key.user_id, key.file_uid, task_type, range(results.most(task_type)), budget, strict=True
        )
    except Exception as exc:  # left to the owner's Delete, or the bucket's lifecycle rule
        log.warning("results_not_removed", extra={"path": key.path, "error": f"{type(exc).__name__}: {exc}"[:300]})
        return
    if removed:
        log.info("job_results_removed", extra={"path": key.path, "objects": removed})
