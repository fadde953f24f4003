"""The job's two doors on any body: property tests (Hypothesis) on the real Firestore emulator.

A client may call the `generateWithRunPod` callable, or runsync, with anything: any request field in either
spelling (or both), any value, ids of its own, of another user or none, fields the contract does not know, or no
object at all. Whatever it sends, the door answers with the contract's reply or its error (the callable: a
Functions error code and a message; runsync: `{"error", "status": "failed"}` with the contract's message), never
an unhandled exception (which the SDKs turn into INTERNAL or a stack trace), and what it leaves in Firestore
matches its answer: an accepted job queued and counted, a refusal of a job the callable's body names recorded on
that job's doc with the same message, a refused runsync creating nothing. RunPod is a stand-in
(test_functions.StubRunPod) that accepts every dispatch: RunPod's hosted API cannot run here. `CALLABLE_EXAMPLES`
and `RUNSYNC_EXAMPLES` set how many bodies are drawn (120 each; 5,000 each on 2026-12-04 found nothing).
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Any

from fixtures_requests import request_value, valid_value
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_functions import ACCEPTED, dispatch, stub  # noqa: F401  (stub: the RunPod stand-in fixture)

from firegen_core import contract, lifecycle, quota
from firegen_core.claims import WorkerJobs
from firegen_core.errors import VALIDATION_ERROR
from firegen_core.jobs import JobKey
from listener.handler import RunsyncHandler

# The Functions error codes the callable answers with (functions/dispatch.py); anything else is a fault.
CODES = {"invalid-argument", "permission-denied", "resource-exhausted", "failed-precondition", "already-exists"}
UID = "u-any-body"


def _camel(name: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)


@st.composite
def _bodies(draw, snake_odds: int = 1) -> Any:
    """A callable's `data`: mostly an object of request fields (any spelling, any value, a fresh file_uid or
    another id, the caller's uid or another's), sometimes with an unknown field, sometimes no object at all.
    `snake_odds`: how many times likelier a field is in snake_case alone than in camelCase or both (runsync refuses
    camelCase: at even odds it would accept almost nothing)."""
    if draw(st.integers(0, 19)) == 19:
        return draw(st.one_of(st.none(), st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2)))
    data: dict[str, Any] = {}
    names = sorted(contract.PARAMETER_FIELDS | {"use_cloud_storage"})
    for name in draw(st.lists(st.sampled_from(names), unique=True, max_size=6)):
        for spelling in draw(st.sampled_from([[name]] * snake_odds + [[_camel(name)], [name, _camel(name)]])):
            data[spelling] = draw(st.one_of(valid_value(name), request_value(name)))
    if draw(st.integers(0, 3)) < 3:
        data.setdefault("prompt", "a red car")
    fresh = f"f-{uuid.uuid4().hex[:12]}"
    id_spellings = [["file_uid"]] * snake_odds + [[], ["fileUid"], ["file_uid", "fileUid"]]
    for spelling in draw(st.sampled_from(id_spellings)):
        data[spelling] = draw(st.sampled_from([fresh, fresh, None, "../up", 7, "other-" + fresh]))
    for spelling in draw(st.sampled_from([[]] * snake_odds + [["user_id"], ["userId"]])):
        data[spelling] = draw(st.sampled_from([UID, None, "someone-else"]))
    if draw(st.integers(0, 9)) == 9:
        data["colour"] = "red"
    return data


def _named_file_uid(data: Any) -> str | None:
    """The one file_uid the body names (in either spelling), where it names exactly one."""
    if not isinstance(data, dict):
        return None
    given = {repr(v): v for k, v in data.items() if k in ("file_uid", "fileUid") and v is not None}
    return next(iter(given.values())) if len(given) == 1 and isinstance(next(iter(given.values())), str) else None


def test_the_callable_answers_any_body_with_a_code_and_leaves_firestore_as_it_says(firestore_client, stub):
    runpod = stub(ACCEPTED).client()
    seen: set[str] = set()

    @settings(
        max_examples=int(os.environ.get("CALLABLE_EXAMPLES", 120)),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=_bodies())
    def call(data):
        uid = f"{UID}-{uuid.uuid4().hex[:8]}"  # a user of its own: no example's jobs count against another's limits
        data = {k: (uid if v == UID else v) for k, v in data.items()} if isinstance(data, dict) else data
        try:
            reply = dispatch.generate(firestore_client, runpod, uid=uid, data=data)
        except dispatch.CallError as exc:
            assert exc.code in CODES, (exc.code, exc.message, data)
            assert exc.message and "Traceback" not in exc.message
            seen.add(exc.code)
            file_uid = _named_file_uid(data)
            if exc.code == "invalid-argument" and file_uid and contract._ID_PATTERN.fullmatch(file_uid):
                # The refusal is recorded on the job it names (images or videos), with the call's message.
                docs = [
                    firestore_client.document(f"generations/{uid}/{media}/{file_uid}").get()
                    for media in ("images", "videos")
                ]
                recorded = [d.to_dict() for d in docs if d.exists]
                assert [(d["status"], d["error_type"], d["error_message"]) for d in recorded] == [
                    (lifecycle.FAILED, VALIDATION_ERROR, exc.message)
                ], (data, recorded)
            return
        seen.add(reply["status"])
        assert reply["success"] is True and reply["status"] in ("accepted", "queued"), reply
        doc = firestore_client.document(f"generations/{uid}/{reply['mediaType']}/{reply['fileUid']}").get()
        assert doc.exists and doc.get("status") == lifecycle.QUEUED and quota.admitted(doc.to_dict()), data
        usage = firestore_client.document(f"{quota.USAGE_COLLECTION}/{uid}").get().to_dict()
        assert usage["pending"] == 1

    call()
    # The draws reached both ends: jobs accepted and requests refused for their input.
    assert {"accepted", "invalid-argument"} <= seen, seen


def test_runsync_answers_any_input_as_the_contract_does_and_creates_nothing_it_refuses(firestore_client):
    submitted: list[JobKey] = []
    handler = RunsyncHandler(
        WorkerJobs(firestore_client, worker_id="w-any"), submit=lambda key, *_: submitted.append(key)
    )

    @settings(max_examples=int(os.environ.get("RUNSYNC_EXAMPLES", 120)), deadline=None, database=None)
    @given(data=_bodies(snake_odds=8))
    def call(data):
        uid = f"{UID}-{uuid.uuid4().hex[:8]}"
        users = {UID: uid, "someone-else": f"{uid}-x"}  # runsync trusts the ids it is given (RunPod's key is the auth)
        if isinstance(data, dict):  # runsync's input names its user and asks for cloud storage itself
            named = {k: users.get(v, v) if isinstance(v, str) else v for k, v in data.items()}
            data = {"user_id": uid, "use_cloud_storage": True, **named}
        answer = handler.handle(data)
        try:
            request = contract.parse_runsync_input(data)
        except contract.ContractError as exc:
            assert answer == {"error": exc.message, "status": "failed"}, (data, answer)
            for user in users.values():
                for media in ("images", "videos"):
                    assert not firestore_client.collection("generations", user, media).get(), data
            return
        if not request.use_cloud_storage:  # inline generation, which a handler without a generator refuses
            assert answer == {"error": "Inline generation is not available on this worker", "status": "failed"}
            return
        seen.add(answer["status"])
        assert answer == {
            "status": "accepted",
            "message": "Generation task accepted and processing",
            "user_id": request.user_id,
            "file_uid": request.file_uid,
            "task_type": request.task_type,
        }, (data, answer)
        doc = firestore_client.document(JobKey.of(request).path).get()
        assert doc.get("status") == lifecycle.QUEUED and quota.admitted(doc.to_dict())
        assert submitted[-1] == JobKey.of(request)

    seen: set[str] = set()
    call()
    assert "accepted" in seen
