"""The marks a job's doc keeps of the runsync dispatches sent for it, so that RunPod's redelivery never runs it twice.

The functions send a job's request to RunPod (a runsync) and mark it on the doc (`dispatched_inputs`); when it
reaches a worker, perhaps late (a cold start), it is known as that dispatch arriving (`dispatched`), not a
request of its own, and its RunPod job is kept (`arrived_dispatches`): RunPod may deliver it again. A deleted
job's marks outlive its doc in a tombstone (`tombstone`), so a dispatch still on its way cannot create the job
again. Pure: each function says what to write; `jobs.JobStore` writes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from google.cloud.firestore import DELETE_FIELD

from . import lifecycle
from .contract import PARAMETER_FIELDS, GenerationRequest

RUNPOD_JOB_ID = "runpod_job_id"  # the RunPod job that dispatched the job (the functions write it; logged as requestId)
# The requests the functions sent to RunPod for the job whose runsync has not reached a worker yet (`fingerprint`s,
# the last DISPATCHES_KEPT): a runsync that states one of them is that dispatch arriving, perhaps late (a cold
# start), and not a request of its own.
DISPATCHED_INPUTS = "dispatched_inputs"
# The RunPod jobs of the dispatches that did reach a worker (`arrived`): RunPod's redelivery of one is that
# dispatch again, where another runsync stating the same request is a request of its own.
ARRIVED_DISPATCHES = "arrived_dispatches"
DISPATCHES_KEPT = 10
# A deleted job's dispatches still to come (`tombstone`), at generations/{uid}/deleted_jobs/{media}-{file_uid}: kept
# TOMBSTONE_DAYS (TTL on `expire_at`), past the day RunPod keeps a request it has not delivered.
DELETED_JOBS = "deleted_jobs"
TOMBSTONE_DAYS = 2.0
TOMBSTONE_KEPT = 100  # of each list a tombstone holds: deletions of one file_uid add theirs, never without end


def fingerprint(request: GenerationRequest) -> str:
    """A digest of the job a request states: its task type and the fields it gives, as the contract's parser reads
    them (float parameters as floats, so a JSON hop that wrote 7.0 as 7 changes nothing, and seeds keep every
    digit). Defaults are left out: a deploy that adds an optional field or changes a default digests the requests
    of the last one alike, where the functions of one and the workers of the other run side by side (a rollout)."""
    stated = {name: value for name, value in request.runsync_parameters().items() if name in PARAMETER_FIELDS}
    return _digest({**{name: value for name, value in stated.items() if value is not None}, "task": request.task_type})


def _legacy_fingerprint(request: GenerationRequest) -> str:
    """The digest of releases up to 2026-12-05 (every field, defaults included), which functions still running
    from one wrote while this release's workers take over: recognised, never written. Drop it a release later."""
    return _digest({name: value for name, value in asdict(request).items() if name != "given"})


def _digest(stated: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(stated, sort_keys=True).encode()).hexdigest()[:32]


def _sent_mark(sent: Any, request: GenerationRequest) -> str | None:
    """The mark in `dispatched_inputs` that is a dispatch of `request`, if any."""
    if not isinstance(sent, list):
        return None
    return next((mark for mark in (fingerprint(request), _legacy_fingerprint(request)) if mark in sent), None)


def dispatches_with(doc: Mapping[str, Any] | None, request: GenerationRequest) -> list[str]:
    """The doc's `dispatched_inputs` with `request`'s added last (once per dispatch: two of the same request on
    their way are two runsyncs to come)."""
    sent = (doc or {}).get(DISPATCHED_INPUTS)
    return [*(sent if isinstance(sent, list) else []), fingerprint(request)][-DISPATCHES_KEPT:]


def dispatched(doc: Mapping[str, Any] | None, request: GenerationRequest, request_id: str | None = None) -> bool:
    """Whether `request` is a dispatch the functions sent to RunPod for this doc: one not arrived yet, or RunPod's
    redelivery (`request_id`, its RunPod job) of one that did. Its runsync wakes a worker for the job, and the doc,
    which may have moved on since (restated by a later call or by the contract's function's own runsync,
    refused), stands. Taken for a request of its own, a late one put back parameters a later call replaced, and
    queued again a job that had been refused (audit: a cold start's runsync, minutes late, behind the app's own).
    Each dispatch arrives once (`arrived`): the same parameters sent again afterwards (the contract's "fix
    parameters and retry") are a request."""
    doc = doc or {}
    seen = doc.get(ARRIVED_DISPATCHES)
    if request_id and (request_id == doc.get(RUNPOD_JOB_ID) or (isinstance(seen, list) and request_id in seen)):
        return True
    return _sent_mark(doc.get(DISPATCHED_INPUTS), request) is not None


def arrived(doc: Mapping[str, Any], request: GenerationRequest, request_id: str | None) -> dict[str, Any] | None:
    """The write that marks a dispatch of `request` arrived (`dispatched` was true); None for a redelivery."""
    seen = doc.get(ARRIVED_DISPATCHES)
    seen = seen if isinstance(seen, list) else []
    if request_id in seen or _sent_mark(doc.get(DISPATCHED_INPUTS), request) is None:
        return None
    update = undelivered(doc, request) or {}
    if request_id:
        update[ARRIVED_DISPATCHES] = [*seen, request_id][-DISPATCHES_KEPT:]
    return update


def heard(doc: Mapping[str, Any], request_id: str) -> dict[str, Any]:
    """The write that records a RunPod job whose request stated the doc (`ensure_queued`) as arrived; {} where it
    is recorded already."""
    seen = doc.get(ARRIVED_DISPATCHES)
    seen = seen if isinstance(seen, list) else []
    if request_id in seen:
        return {}
    return {ARRIVED_DISPATCHES: [*seen, request_id][-DISPATCHES_KEPT:]}


def brought(request_id: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    """The write that names the RunPod job that brought the job (its logs' requestId), listed as arrived too: the
    functions' later dispatch replaces `runpod_job_id`, and its redelivery must still be known."""
    return {RUNPOD_JOB_ID: request_id, **heard(doc, request_id)}


def undelivered(doc: Mapping[str, Any], request: GenerationRequest) -> dict[str, Any] | None:
    """The write that drops one dispatch of `request` from the doc's `dispatched_inputs` (arrived, or answered
    without reaching a worker's record of the job: its runsync is not on its way any more), None where none is."""
    sent = doc.get(DISPATCHED_INPUTS)
    mark = _sent_mark(sent, request)
    if mark is None or not isinstance(sent, list):
        return None
    left = list(sent)
    left.remove(mark)
    return {DISPATCHED_INPUTS: left or DELETE_FIELD}


def tombstone(doc: Mapping[str, Any], now: datetime, earlier: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """What a deleted job's doc leaves behind: the dispatches that may still arrive for it (as `dispatched` reads
    them: the functions' not yet arrived, and the RunPod jobs that brought it, which RunPod may deliver again),
    with those of an `earlier` tombstone of the same file_uid; None where there is none."""

    def listed(source: Mapping[str, Any], name: str) -> list:
        value = source.get(name)
        return value if isinstance(value, list) else []

    before = earlier or {}
    sent = [*listed(before, DISPATCHED_INPUTS), *listed(doc, DISPATCHED_INPUTS)][-TOMBSTONE_KEPT:]
    brought = doc.get(RUNPOD_JOB_ID)
    seen = [*listed(before, ARRIVED_DISPATCHES), *listed(doc, ARRIVED_DISPATCHES)]
    seen = list(dict.fromkeys([*seen, *([brought] if isinstance(brought, str) and brought else [])]))[-TOMBSTONE_KEPT:]
    if not sent and not seen:
        return None
    return {
        DISPATCHED_INPUTS: sent,
        ARRIVED_DISPATCHES: seen,
        lifecycle.EXPIRE_AT: now + timedelta(days=TOMBSTONE_DAYS),
    }
