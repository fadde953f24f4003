"""The per-user ledger under any order of transitions: a Hypothesis state machine on the real Firestore emulator.

Every door that moves a job (a request's `ensure_queued`, a client doc's admission, claims by a worker that
holds its lease and by one whose lease has always run out, renewals, completions, failures, releases, the
owner's cancel, a listener's drop, the callable's refusal) is drawn in any order on a few jobs of one user,
under small limits. After each step the user's usage doc must say what the job docs say (`pending`, `running`,
`spent_today`), no more jobs run than USER_MAX_RUNNING, each doc is in one state of the contract, and a stale
claim never writes. `LEDGER_EXAMPLES` sets how many sequences are drawn (30; a hunt of 300 on 2026-12-04 found
nothing).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from test_functions import client_doc

from devtools import emulators as emu
from firegen_core import lifecycle, quota
from firegen_core.claims import WorkerJobs
from firegen_core.contract import parse_runsync_input
from firegen_core.errors import VALIDATION_ERROR, GenerationError
from firegen_core.jobs import ClaimedJob, JobKey, JobStore
from firegen_core.quota import Limits

FILE_UIDS = ("a", "b", "c", "d")
# What a request for a job may say: its first parameters, or others (which restate a live job).
PARAMETERS = ({}, {"num_inference_steps": 30}, {"width": 768, "height": 768})
LIMITS = Limits(max_running=2, max_pending=3, daily_budget=30)


class Ledger(RuleBasedStateMachine):
    """One user's jobs, moved through every door; `client` is the emulator's (fixtures cannot reach a machine)."""

    client = None

    def __init__(self):
        super().__init__()
        self.user = emu.unique_id("u-ledger")
        self.store = JobStore(self.client, limits=LIMITS)
        # A worker whose lease runs out at once stands for one that died or stalled: any other may take its job.
        self.workers = {
            "live": WorkerJobs(self.client, worker_id="live", lease_seconds=600, limits=LIMITS),
            "stalled": WorkerJobs(self.client, worker_id="stalled", lease_seconds=0, limits=LIMITS),
        }
        self.claims: list[tuple[str, ClaimedJob]] = []

    def key(self, file_uid: str) -> JobKey:
        return JobKey(self.user, "images", file_uid)

    def docs(self) -> dict[str, dict]:
        collection = self.client.collection("generations", self.user, "images")
        return {snapshot.id: snapshot.to_dict() for snapshot in collection.stream()}

    # --- the doors ---------------------------------------------------------------------------------------------
    @rule(file_uid=st.sampled_from(FILE_UIDS), parameters=st.sampled_from(PARAMETERS))
    def request(self, file_uid, parameters):
        body = {"prompt": "a red car", "user_id": self.user, "file_uid": file_uid, "use_cloud_storage": True}
        self.store.ensure_queued(parse_runsync_input({**body, **parameters}))

    @rule(file_uid=st.sampled_from(FILE_UIDS))
    def client_writes_its_doc_and_a_worker_admits_it(self, file_uid):
        ref = self.client.document(self.key(file_uid).path)
        if not ref.get().exists:
            ref.set(client_doc(num_inference_steps=10))
        self.store.admit(self.key(file_uid))

    @rule(worker=st.sampled_from(["live", "stalled"]), file_uid=st.sampled_from(FILE_UIDS))
    def claim(self, worker, file_uid):
        job = self.workers[worker].claim(self.key(file_uid))
        if job is not None:
            self.claims.append((worker, job))

    @precondition(lambda self: self.claims)
    @rule(data=st.data(), end=st.sampled_from(["renew", "complete", "fail", "cancelled", "release"]))
    def a_claim_moves_its_job(self, data, end):
        worker, job = data.draw(st.sampled_from(self.claims))
        before = self.client.document(job.key.path).get().to_dict()
        held = lifecycle.holds(before, job.lease)
        event(f"{end} by a claim that {'holds' if held else 'lost'} its lease")
        store = self.workers[worker]
        if end == "renew":
            wrote = store.renew(job, progress=0.5)
        elif end == "complete":
            wrote = store.complete(job, {"status": "completed", "generated": True, "error": False}) is not None
        elif end == "fail":
            wrote = store.fail(job, GenerationError("RuntimeError", "boom"))
        elif end == "cancelled":  # its run stopped at its owner's cancel: charged the time it ran
            wrote = store.fail(job, GenerationError("Cancelled", "Cancelled by the user"))
        else:
            wrote = store.release(job) is not None
        after = self.client.document(job.key.path).get().to_dict()
        # A write lands under the claim's lease; a stale claim's leaves the doc's state as it was.
        if held:
            assert wrote, (end, before, after)
            if end == "cancelled":  # never more than it was charged
                assert quota.number(after, quota.COST) <= quota.number(before, quota.COST), (before, after)
        else:
            assert _same_state(before, after), (end, before, after)

    @rule(file_uid=st.sampled_from(FILE_UIDS))
    def owner_cancels(self, file_uid):
        self.store.cancel(self.key(file_uid))

    @rule(file_uid=st.sampled_from(FILE_UIDS))
    def a_listener_drops_a_cancelled_job(self, file_uid):
        self.workers["live"].drop(self.key(file_uid))

    @rule(file_uid=st.sampled_from(FILE_UIDS))
    def the_callable_refuses_its_request(self, file_uid):
        self.store.fail_unclaimed(self.key(file_uid), GenerationError(VALIDATION_ERROR, "width must be between"))

    # --- what must hold after every step -----------------------------------------------------------------------
    @invariant()
    def the_usage_doc_says_what_the_job_docs_say(self):
        docs = self.docs().values()
        snapshot = self.client.document(f"{quota.USAGE_COLLECTION}/{self.user}").get()
        usage = snapshot.to_dict() if snapshot.exists else {}
        today = quota.day_of(datetime.now(UTC))
        running = sum(quota.running(d) for d in docs)
        assert usage.get("running", 0) == running
        assert usage.get("pending", 0) == sum(quota.pending(d) for d in docs)
        if usage.get("day", today) == today:  # past UTC midnight the doc holds the day before's until its next write
            spent = sum(quota._charged(d, today) for d in docs)
            assert usage.get("spent_today", 0.0) == pytest.approx(spent, abs=0.01)
        assert running <= LIMITS.max_running
        assert sum(d.get("status") == lifecycle.PROCESSING for d in docs) == running  # every running job counted

    @invariant()
    def each_doc_is_in_one_state_of_the_contract(self):
        for doc in self.docs().values():
            # What a job ending before it runs again is charged is never more than its charge.
            assert quota.number(doc, quota.STOPPED_COST) <= quota.number(doc, quota.COST), doc
            status = doc.get("status")
            if status == lifecycle.PROCESSING:  # under one worker's claim
                assert doc.get("worker_id") in self.workers and doc.get("attempts", 0) >= 1, doc
            elif status == lifecycle.QUEUED:  # nobody's
                assert "worker_id" not in doc and "lease_expires_at" not in doc, doc
            elif status == lifecycle.COMPLETED:
                assert doc.get("generated") is True and doc.get("error") is False, doc
            else:
                assert status == lifecycle.FAILED and doc.get("error") is True and doc.get("error_type"), doc


def _same_state(before: dict | None, after: dict | None) -> bool:
    """The doc's state as a stale claim may not change it (status, owner, attempt, result)."""
    fields = ("status", "worker_id", "attempts", "error_type", "generated", "progress")
    return {f: (before or {}).get(f) for f in fields} == {f: (after or {}).get(f) for f in fields}


def test_the_ledger_matches_the_docs_under_any_order_of_transitions(firestore_client):
    Ledger.client = firestore_client
    try:
        run_state_machine_as_test(
            Ledger,
            settings=settings(
                max_examples=int(os.environ.get("LEDGER_EXAMPLES", 30)),
                stateful_step_count=25,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
            ),
        )
    finally:
        Ledger.client = None
