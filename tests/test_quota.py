"""Per-user limits and accounting (firegen_core/quota.py, applied by the job store) on the real Firestore emulator.

The pure cost model and decisions first; then every door (runsync's ensure_queued, the callable, the creation
trigger, a worker's claim) and the races the issue names: 8 admissions for the last slot, a trigger delivered
twice, a callable retried, a worker killed mid-job, a job released on shutdown, two workers and one user.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from test_functions import (
    ACCEPTED,
    RunPodClient,
    StubRunPod,
    client_doc,
    dispatch,
    nobody_listening,
    owner_calls,
    runpod_client,
)
from test_reconciler import LISTENING_SECONDS, StubGenerator, results  # noqa: F401  (results: the Storage fixture)

from devtools import emulators as emu
from firegen_core import lifecycle, quota
from firegen_core.claims import WorkerJobs
from firegen_core.contract import parse_runsync_input
from firegen_core.errors import GenerationError
from firegen_core.jobs import RAN_BEFORE, ClaimedJob, JobKey, JobStore
from firegen_core.quota import Limits, Usage
from listener.handler import RunsyncHandler
from listener.reconciler import Reconciler
from listener.runner import JobRunner

Verdict, REJECTED = runpod_client.Verdict, runpod_client.REJECTED

USER = "u-quota"


def request(file_uid: str, user: str = USER, **params):
    return parse_runsync_input(
        {"prompt": "a red car", "user_id": user, "file_uid": file_uid, "use_cloud_storage": True, **params}
    )


def usage(client, user: str = USER) -> dict:
    snapshot = client.document(f"usage/{user}").get()
    return snapshot.to_dict() if snapshot.exists else {}


def counts(client, user: str = USER) -> tuple[int, int]:
    doc = usage(client, user)
    return doc.get("running", 0), doc.get("pending", 0)


def doc(client, key: JobKey) -> dict:
    return client.document(key.path).get().to_dict()


def write_client_doc(client, file_uid: str, user: str = USER, **fields) -> JobKey:
    key = JobKey(user, "images", file_uid)
    client.document(key.path).set(client_doc(**fields))
    return key


# ---------------------------------------------------------------------------------------------- pure
def test_the_cost_model_is_calibrated_on_the_measured_h100_figures():
    full_sdxl = request("a", width=1024, height=1024, num_inference_steps=30)
    assert quota.estimate(full_sdxl) == pytest.approx(quota.JOB_OVERHEAD_SECONDS + 2.46, abs=1e-3)
    wan = request("v", video_width=832, video_height=480, num_frames=81, num_inference_steps=50)
    assert quota.estimate(wan) == pytest.approx(quota.JOB_OVERHEAD_SECONDS + 50 * 1.32 + 4.1, abs=1e-3)
    # Linear in images, steps and pixels (beyond the fixed overhead).
    four = request("b", width=1024, height=1024, num_inference_steps=30, num_images_per_prompt=4)
    assert quota.estimate(four) - quota.JOB_OVERHEAD_SECONDS == pytest.approx(4 * 2.46, abs=1e-2)
    default_image, default_video = quota.estimate(request("c")), quota.estimate(request("d", num_frames=16))
    assert default_image < default_video
    # The default budget lets a normal user make hundreds of default images (and of full-size ones) a day.
    assert Limits().daily_budget / default_image >= 400
    assert Limits().daily_budget / quota.estimate(full_sdxl) >= 150


def test_a_video_larger_than_the_calibration_costs_its_attentions_square():
    """An audit: the largest video (1024x1024x81, 2.6 times the calibration's pixels) was charged linearly, 174
    GPU-seconds for ~370 of work by its FLOPs (self-attention grows with the square of the tokens)."""
    largest = request("v", video_width=1024, video_height=1024, num_frames=81, num_inference_steps=50)
    scale = 1024 * 1024 / (480 * 832)
    steps = 50 * 1.32 * (0.3 * scale + 0.7 * scale**2)
    assert quota.estimate(largest) == pytest.approx(quota.JOB_OVERHEAD_SECONDS + steps + 4.1 * scale, abs=1e-3)
    assert 370 < quota.estimate(largest) < Limits().daily_budget  # still one job within a default day
    # At and below the calibration, linear in pixels x frames x steps (a small video: no cheaper than before).
    half = request("h", video_width=832, video_height=480, num_frames=41, num_inference_steps=50)
    assert quota.estimate(half) - quota.JOB_OVERHEAD_SECONDS == pytest.approx(41 / 81 * (50 * 1.32 + 4.1), abs=1e-3)


def test_the_worker_reads_the_limits_from_its_environment(monkeypatch):
    from listener.settings import SettingsError, load_settings

    monkeypatch.setenv("STORAGE_BUCKET", "bkt")
    settings = load_settings()
    assert (settings.user_max_running, settings.user_max_pending, settings.user_daily_budget) == (2, 20, 600.0)
    monkeypatch.setenv("USER_MAX_RUNNING", "4")
    monkeypatch.setenv("USER_DAILY_BUDGET", "1500")
    settings = load_settings()
    assert (settings.user_max_running, settings.user_daily_budget) == (4, 1500.0)
    monkeypatch.setenv("USER_MAX_PENDING", "0")
    with pytest.raises(SettingsError, match="USER_MAX_PENDING"):
        load_settings()
    # "No limit" as an operator may write it: refused at start-up, where it started and then every admission failed
    # (Firestore holds no integer past 64 bits in the usage doc).
    monkeypatch.setenv("USER_MAX_PENDING", "99999999999999999999")
    said = r"^USER_MAX_PENDING must be less than or equal to 1000000 \(got '99999999999999999999'\)$"
    with pytest.raises(SettingsError, match=said):
        load_settings()
    monkeypatch.setenv("USER_MAX_PENDING", "1000000")
    monkeypatch.setenv("USER_DAILY_BUDGET", "inf")
    with pytest.raises(SettingsError, match=r"^USER_DAILY_BUDGET must be a finite number \(got 'inf'\)$"):
        load_settings()


def test_limits_must_be_positive_and_within_bounds_a_usage_doc_can_hold(firestore_client):
    assert (Limits().max_running, Limits().max_pending, Limits().daily_budget) == (2, 20, 600.0)
    for bad in (
        dict(max_running=0),
        dict(max_pending=0),
        dict(daily_budget=0),
        dict(max_running=quota.MAX_COUNT_LIMIT + 1),
        dict(max_pending=quota.MAX_COUNT_LIMIT + 1),
        dict(daily_budget=quota.MAX_DAILY_BUDGET * 1.01),
        dict(daily_budget=math.inf),
        dict(daily_budget=math.nan),
    ):
        with pytest.raises(ValueError):
            Limits(**bad)
    # The highest limits are admitted, and written in the user's usage doc.
    highest = Limits(quota.MAX_COUNT_LIMIT, quota.MAX_COUNT_LIMIT, quota.MAX_DAILY_BUDGET)
    store = JobStore(firestore_client, limits=highest)
    assert store.ensure_queued(request("unbounded")).after["status"] == "queued"
    assert usage(firestore_client)["limits"] == highest.document()


def test_usage_resets_its_spend_at_utc_midnight_and_counts_follow_the_doc():
    now = datetime(2026, 11, 27, 23, 59, tzinfo=UTC)
    doc = {"running": 1, "pending": 3, "spent_today": 42.5, "day": "2026-11-27"}
    assert Usage.read(doc, now) == Usage(1, 3, 42.5, "2026-11-27")
    assert Usage.read(doc, datetime(2026, 11, 28, 0, 1, tzinfo=UTC)) == Usage(1, 3, 0.0, "2026-11-28")
    assert quota.resets_at(now) == datetime(2026, 11, 28, tzinfo=UTC)
    queued = {"status": "queued", "quota_admitted": True, "cost": 2.0}
    assert quota.change(None, queued) == quota.Change(0, 1, 2.0)
    assert quota.change(queued, {"status": "processing"}) == quota.Change(1, 0, 0.0)
    assert quota.change({**queued, "status": "processing"}, {"status": "queued"}) == quota.Change(-1, 0, 0.0)
    assert quota.change({**queued, "status": "processing"}, {"status": "completed"}) == quota.Change(-1, -1, 0.0)
    assert quota.change({**queued, "status": "processing"}, {"progress": 0.5}) == quota.Change()
    assert not quota.change({"status": "queued"}, {"status": "failed"})  # never admitted: never counted


def test_a_job_that_fails_before_any_worker_took_it_is_refunded_on_its_day():
    now = datetime(2026, 11, 27, 10, tzinfo=UTC)
    queued = {
        "status": "queued",
        "quota_admitted": True,
        "cost": 2.0,
        "created_at": datetime(2026, 11, 27, 9, tzinfo=UTC),
    }
    assert quota.change(queued, {"status": "failed"}, now) == quota.Change(0, -1, -2.0)  # cancelled while queued
    assert quota.change({**queued, "attempts": 1}, {"status": "failed"}, now) == quota.Change(0, -1, 0.0)  # it ran
    # Released by a leaving worker (its try given back to `attempts`), then cancelled while queued: it ran too
    # (the chaos audit: refunded in full after its GPU time).
    released = {**queued, "attempts": 0, "releases": 1}
    assert quota.change(released, {"status": "failed"}, now) == quota.Change(0, -1, 0.0)
    yesterday = {**queued, "created_at": datetime(2026, 11, 26, 23, tzinfo=UTC)}
    assert quota.change(yesterday, {"status": "failed"}, now) == quota.Change(0, -1, 0.0)  # that day's spend is gone
    refunded = {**queued, "status": "failed"}
    assert not quota.change(refunded, {"error_message": "x"}, now)  # refunded once
    # The day it was charged decides, where the doc says it: a refused job sent again a day later is charged then.
    again = {**yesterday, "charged_on": "2026-11-27"}
    assert quota.change(again, {"status": "failed"}, now) == quota.Change(0, -1, -2.0)
    assert quota.change({**queued, "charged_on": "2026-11-26"}, {"status": "failed"}, now).charge == 0.0


def test_refusals_name_the_limit_and_when_the_budget_resets():
    now = datetime(2026, 11, 27, 10, tzinfo=UTC)
    limits = Limits(max_pending=2, daily_budget=10)
    assert quota.refusal(Usage(0, 1, 5.0, "2026-11-27"), 4.0, limits, now) is None
    pending = quota.refusal(Usage(0, 2, 0.0, "2026-11-27"), 1.0, limits, now)
    assert "USER_MAX_PENDING" in pending and "at most 2" in pending
    budget = quota.refusal(Usage(0, 0, 8.0, "2026-11-27"), 4.0, limits, now)
    assert "USER_DAILY_BUDGET" in budget and "2.0 of 10 are left" in budget and "2026-11-28 00:00 UTC" in budget
    assert max(len(pending), len(budget)) <= 300
    # A job that alone needs more than the whole budget would never fit, whenever it is sent.
    never = quota.refusal(Usage(0, 0, 0.0, "2026-11-27"), 12.0, limits, now)
    assert never == (
        "Daily GPU budget exceeded (USER_DAILY_BUDGET): this job needs 12.0 GPU-seconds, more than the whole daily "
        "budget of 10; ask for fewer steps, images, frames or pixels"
    )


def test_a_job_may_spend_exactly_up_to_the_daily_budget():
    """USER_DAILY_BUDGET is what a user may spend in a day: a job that brings the spend exactly to it is admitted,
    one a thousandth of a GPU-second past it is refused; a restated job whose total (with what it was charged
    already) is exactly the whole budget fits after the reset, so its refusal names the reset, not "more than the
    whole daily budget"."""
    now = datetime(2026, 11, 27, 10, tzinfo=UTC)
    limits = Limits(daily_budget=10)
    assert quota.budget_refusal(Usage(0, 0, 6.0, "2026-11-27"), 4.0, limits, now) is None
    assert quota.refusal(Usage(0, 0, 0.0, "2026-11-27"), 10.0, limits, now) is None
    # With as many decimals as tell the two apart (the fairness review read "needs 1.1 GPU-seconds, 1.1 of 30 are left").
    told = "needs 4.001 GPU-seconds, 4.000 of 10 are left"
    assert told in quota.budget_refusal(Usage(0, 0, 6.0, "2026-11-27"), 4.001, limits, now)
    told = "needs 1.1 GPU-seconds, 0.9 of 10 are left"
    assert told in quota.budget_refusal(Usage(0, 0, 9.1, "2026-11-27"), 1.051, limits, now)
    assert "resets at" in quota.budget_refusal(Usage(0, 0, 9.0, "2026-11-27"), 2.0, limits, now, charged=8.0)


# ---------------------------------------------------------------------------------------------- races
def test_eight_admissions_racing_for_the_last_slot_admit_exactly_one(firestore_client):
    store = JobStore(firestore_client, limits=Limits(max_pending=3))
    for name in ("first", "second"):
        assert store.ensure_queued(request(name)).after["status"] == "queued"
    assert counts(firestore_client) == (0, 2)
    start = threading.Barrier(8)

    def race(i: int) -> dict:
        start.wait(10)
        return JobStore(firestore_client, limits=Limits(max_pending=3)).ensure_queued(request(f"racer-{i}")).after

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(race, range(8)))
    assert sorted(o["status"] for o in outcomes) == ["failed"] * 7 + ["queued"]
    docs = [doc(firestore_client, JobKey(USER, "images", f"racer-{i}")) for i in range(8)]
    admitted = [d for d in docs if d.get("quota_admitted")]
    assert len(admitted) == 1 and admitted[0]["status"] == "queued" and admitted[0]["cost"] > 0
    refused = [d for d in docs if d["status"] == "failed"]
    assert {d["error_type"] for d in refused} == {"QuotaExceeded"}
    assert all("USER_MAX_PENDING" in d["error_message"] and "quota_admitted" not in d for d in refused)
    use = usage(firestore_client)
    assert (use["running"], use["pending"]) == (0, 3)
    assert use["spent_today"] == pytest.approx(3 * quota.estimate(request("x")))
    assert use["limits"] == {"max_running": 2, "max_pending": 3, "daily_budget": 600.0}
    assert use["day"] == datetime.now(UTC).date().isoformat() and use["resets_at"] > datetime.now(UTC)


def test_a_trigger_delivered_twice_and_a_retried_callable_count_once(firestore_client):
    runpod = StubRunPod([ACCEPTED])
    try:
        key = write_client_doc(firestore_client, "trig")
        with ThreadPoolExecutor(3) as pool:
            outcomes = list(
                pool.map(
                    lambda _: dispatch.dispatch_created(
                        firestore_client, runpod.client(), user_id=USER, media_type="images", file_uid="trig"
                    ),
                    range(3),
                )
            )
        assert sorted(outcomes) == ["accepted", "skipped", "skipped"]
        assert doc(firestore_client, key)["quota_admitted"] is True
        cost = doc(firestore_client, key)["cost"]
        assert counts(firestore_client) == (0, 1) and usage(firestore_client)["spent_today"] == cost

        # A callable whose dispatch did not arrive, retried by the client: one job, one charge.
        data = {"prompt": "a red car", "file_uid": "call"}
        for _ in range(3):
            reply = dispatch.generate(firestore_client, nobody_listening(), uid=USER, data=data)
            assert reply["status"] == "queued"
        assert counts(firestore_client) == (0, 2) and usage(firestore_client)["spent_today"] == pytest.approx(2 * cost)
        # The trigger of the callable's own doc changes nothing either.
        assert (
            dispatch.dispatch_created(
                firestore_client, runpod.client(), user_id=USER, media_type="images", file_uid="call"
            )
            == "skipped"
        )
        assert counts(firestore_client) == (0, 2)
    finally:
        runpod.close()


def test_a_killed_workers_job_counts_once_and_stops_counting_when_it_ends(firestore_client):
    limits = Limits(max_running=1)
    orphan, waiting = write_client_doc(firestore_client, "orphan"), write_client_doc(firestore_client, "waiting")
    killed = WorkerJobs(firestore_client, worker_id="killed", lease_seconds=0.5, limits=limits)
    assert killed.claim(orphan) is not None  # then the worker dies: no renewal, no completion
    assert counts(firestore_client) == (1, 1)
    survivor = WorkerJobs(firestore_client, worker_id="survivor", limits=limits)
    # The user's one running slot is the dead worker's: the other job is admitted but waits, queued.
    assert survivor.claim(waiting) is None
    assert doc(firestore_client, waiting)["status"] == "queued" and counts(firestore_client) == (1, 2)
    # The lease runs out; the takeover is the same running job, counted once.
    taken: list = []
    assert emu.wait_until(lambda: taken.append(survivor.claim(orphan)) or taken[-1], 10, 0.05)
    now = doc(firestore_client, orphan)
    assert (now["worker_id"], now["attempts"]) == ("survivor", 2) and counts(firestore_client) == (1, 2)
    assert survivor.complete(taken[-1], {"status": "completed", "generated": True})
    assert counts(firestore_client) == (0, 1)
    assert survivor.claim(waiting) is not None and counts(firestore_client) == (1, 1)


def test_a_users_usage_doc_expires_once_nothing_of_theirs_is_pending_and_not_before(firestore_client):
    """A new uid per browser (anonymous sign-in) left a usage doc for good per user ever: it now carries
    `expire_at` (for the TTL policy on `usage`) while nothing of the user's is pending, RETENTION_DAYS past the
    day's reset (so a TTL deletion forgets no spend of the day), and none while a job is pending or running (a doc
    deleted then would forget its counts). RETENTION_DAYS=0: none."""
    store, worker = (
        JobStore(firestore_client, retention_days=3),
        WorkerJobs(firestore_client, worker_id="w", retention_days=3),
    )
    first, second = write_client_doc(firestore_client, "first"), write_client_doc(firestore_client, "second")
    assert store.admit(first).written and "expire_at" not in usage(firestore_client)
    claimed = worker.claim(first)
    assert claimed and counts(firestore_client) == (1, 1) and "expire_at" not in usage(firestore_client)
    assert worker.complete(claimed, {"status": "completed", "generated": True})
    written = usage(firestore_client)
    assert counts(firestore_client) == (0, 0)
    assert written["expire_at"] == written["resets_at"] + timedelta(days=3)
    assert store.admit(second).written and counts(firestore_client) == (0, 1)
    assert "expire_at" not in usage(firestore_client)  # pending again: taken off
    assert store.cancel(second).after["status"] == "failed" and "expire_at" in usage(firestore_client)

    kept = JobStore(firestore_client, retention_days=0)
    other = write_client_doc(firestore_client, "other", user="keeper")
    assert kept.admit(other).written and kept.cancel(other).after["status"] == "failed"
    assert counts(firestore_client, "keeper") == (0, 0) and "expire_at" not in usage(firestore_client, "keeper")


def test_a_job_cancelled_before_any_worker_took_it_gives_its_cost_back(firestore_client):
    store = JobStore(firestore_client)
    ran, cancelled = write_client_doc(firestore_client, "ran"), write_client_doc(firestore_client, "cancelled-early")
    worker = WorkerJobs(firestore_client, worker_id="w")
    assert worker.complete(worker.claim(ran), {"status": "completed", "generated": True})
    admitted = store.admit(cancelled).written
    assert admitted and admitted["charged_on"] == quota.day_of(datetime.now(UTC))
    assert usage(firestore_client)["spent_today"] == doc(firestore_client, ran)["cost"] * 2
    assert store.cancel(cancelled).after["status"] == "failed"
    assert counts(firestore_client) == (0, 0)
    assert usage(firestore_client)["spent_today"] == doc(firestore_client, ran)["cost"]  # the cancelled one's back


def test_a_running_job_its_owner_cancels_is_charged_the_time_it_ran(firestore_client):
    """The web app review: a video cancelled 7 s into its run was charged its whole estimate (382 of the day's 600
    GPU-seconds). A running job its owner cancels is charged the GPU time its try ran, at most its estimate; one
    that fails otherwise once taken keeps its whole charge, as before."""
    store, worker = JobStore(firestore_client), WorkerJobs(firestore_client, worker_id="w")
    big = dict(width=1024, height=1024, num_inference_steps=50, num_images_per_prompt=4)
    cancelled, failed = (write_client_doc(firestore_client, name, **big) for name in ("cancelled-running", "oom"))
    for key in (cancelled, failed):
        assert store.admit(key).written
    estimate = doc(firestore_client, cancelled)["cost"]
    assert estimate > 15 and usage(firestore_client)["spent_today"] == pytest.approx(2 * estimate)
    job = worker.claim(cancelled)
    # Its try started 10 s ago (as its worker's clock and the emulator's are this machine's).
    firestore_client.document(cancelled.path).update({"started_at": datetime.now(UTC) - timedelta(seconds=10)})
    assert store.cancel(cancelled).after["cancel_requested"] is True
    assert worker.fail(job, GenerationError("Cancelled", "Cancelled by the user"))
    ended = doc(firestore_client, cancelled)
    assert (ended["status"], ended["error_type"]) == ("failed", "Cancelled")
    assert ended["cost"] == ended["stopped_cost"] == pytest.approx(10, abs=2)
    assert usage(firestore_client)["spent_today"] == pytest.approx(estimate + ended["cost"], abs=1e-3)
    other = worker.claim(failed)
    assert worker.fail(other, GenerationError("OutOfMemoryError", "CUDA out of memory"))
    assert doc(firestore_client, failed)["cost"] == estimate
    assert usage(firestore_client)["spent_today"] == pytest.approx(estimate + ended["cost"], abs=1e-3)
    assert counts(firestore_client) == (0, 0)


def test_a_job_cancelled_after_its_worker_died_is_charged_until_its_last_renewal(firestore_client):
    """The chaos review: a worker killed 6 s into a job, the job then cancelled, was failed `Cancelled` by the worker
    that took it over at its lease's end and charged from its start to that takeover, GPU time nobody ran (up to
    the whole lease, 120 s). A try whose lease ran out ran until its last renewal."""
    store = JobStore(firestore_client)
    dead, taker = (WorkerJobs(firestore_client, worker_id=name) for name in ("w-dead", "w-taker"))
    key = write_client_doc(firestore_client, "dead-then-cancelled", width=1024, height=1024, num_inference_steps=50)
    assert store.admit(key).written
    estimate = doc(firestore_client, key)["cost"]
    assert dead.claim(key) is not None
    now = datetime.now(UTC)  # the emulator's clock is this machine's
    firestore_client.document(key.path).update(
        {
            "started_at": now - timedelta(seconds=4),
            "modified": now - timedelta(seconds=1),  # its last renewal, 3 s in
            "lease_expires_at": now - timedelta(seconds=0.5),
        }
    )
    assert store.cancel(key).after["cancel_requested"] is True
    assert taker.claim(key) is None  # the takeover ends it: cancelled
    ended = doc(firestore_client, key)
    assert (ended["status"], ended["error_type"]) == ("failed", "Cancelled")
    assert ended["cost"] == pytest.approx(3, abs=0.5) and estimate > 4
    assert usage(firestore_client)["spent_today"] == pytest.approx(ended["cost"], abs=1e-3)
    assert counts(firestore_client) == (0, 0)


def test_a_cancel_never_costs_more_than_the_job_was_charged():
    """A review: charged at admission under one cost model (174 GPU-seconds), estimated under another at its cancel
    (382), a job that ran 300 s would have cost 300, more than running it to its end."""
    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    running = {"status": "processing", "quota_admitted": True, "cost": 174.0, "charged_on": "2026-12-07"}
    ran = {**running, "started_at": now - timedelta(seconds=300)}
    assert quota.cancelled_cost(ran, 382.0, now) == {"cost": 174.0, "stopped_cost": 174.0, "charged_on": "2026-12-07"}
    early = {**running, "started_at": now - timedelta(seconds=7)}
    assert quota.cancelled_cost(early, 174.0, now)["cost"] == 7.0
    assert quota.cancelled_cost({**early, "charged_on": "2026-12-06"}, 174.0, now) == {}  # that day's spend is gone


def test_a_try_stopped_once_its_denoising_ended_is_charged_its_whole_estimate():
    """The security review: a try's results are readable by their owner as they upload, before the doc says
    `completed`; stopped then (cancelled, restated), it was charged the time it ran, less than its estimate (the
    fixed second of every job's estimate, and any margin of the calibration). From progress 1 on it ran it all."""
    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    running = {"status": "processing", "quota_admitted": True, "cost": 17.4, "charged_on": "2026-12-07"}
    denoised = {**running, "started_at": now - timedelta(seconds=3), "progress": 1.0}
    assert quota.cancelled_cost(denoised, 17.4, now)["cost"] == 17.4
    assert quota.restated_cost(denoised, 17.4, 1.05, now)["cost"] == 18.45
    assert quota.cancelled_cost({**denoised, "progress": 0.75}, 17.4, now)["cost"] == 3.0


def test_the_cancel_callable_keeps_the_deployed_limits_on_the_usage_doc(firestore_client):
    """The day's review: cancelGeneration's refund rewrote `usage/{uid}` with the default limits (600 GPU-s where
    the deploy set 30), which an app showing what is left then read."""
    limits = Limits(max_running=1, max_pending=5, daily_budget=30)
    data = {"prompt": "a red car", "file_uid": "cancel-limits"}
    dispatch.generate(firestore_client, nobody_listening(), uid=USER, data=data, limits=limits)
    reply = owner_calls.cancel(
        firestore_client, uid=USER, data={"fileUid": "cancel-limits", "mediaType": "images"}, limits=limits
    )
    assert reply["status"] == "cancelled"
    assert usage(firestore_client)["limits"] == {"max_running": 1, "max_pending": 5, "daily_budget": 30.0}
    assert usage(firestore_client)["spent_today"] == 0


def test_a_job_released_on_shutdown_stops_running_but_stays_pending(firestore_client):
    key = write_client_doc(firestore_client, "released")
    leaving = WorkerJobs(firestore_client, worker_id="leaving")
    job = leaving.claim(key)
    assert counts(firestore_client) == (1, 1)
    assert leaving.release(job)
    assert counts(firestore_client) == (0, 1)
    other = WorkerJobs(firestore_client, worker_id="other")
    again = other.claim(key)
    assert counts(firestore_client) == (1, 1)
    assert other.fail(again, GenerationError("RuntimeError", "boom"))
    assert counts(firestore_client) == (0, 0)
    assert usage(firestore_client)["spent_today"] == doc(firestore_client, key)["cost"]  # charged once


def test_a_job_held_back_by_user_max_running_starts_as_soon_as_one_of_theirs_ends(firestore_client, results):
    """A latency audit: a worker with more slots than USER_MAX_RUNNING found the user's third job held back and
    forgot it: nothing offered it again (its doc did not change) until the next sweep, SWEEP_INTERVAL_SECONDS after
    one of the user's jobs ended (here 300 s: it must start long before)."""
    limits = Limits(max_running=2)
    release = {f"job-{i}": threading.Event() for i in range(3)}
    started: list[str] = []

    class PerJob(StubGenerator):
        def generate(self, request, progress=None):
            started.append(request.file_uid)
            release[request.file_uid].wait(60)
            return super().generate(request, progress)

    keys = [write_client_doc(firestore_client, f"job-{i}", width=256) for i in range(3)]
    admitting = JobStore(firestore_client, limits=limits)
    for key in keys:  # as the functions admit them: no later write of the docs offers them again
        assert admitting.admit(key).written
    store = WorkerJobs(firestore_client, worker_id="w1", lease_seconds=30, limits=limits)
    worker = Reconciler(store, JobRunner(store, PerJob(), results), concurrency=3, sweep_interval=300).start()
    try:
        assert worker.wait_listening(LISTENING_SECONDS)
        # Two run; the third waits a candidate, unclaimed on the free slot (its user's two run here).
        assert emu.wait_until(lambda: len(started) == 2 and worker.candidates == 1 and worker.busy == 2, 30, 0.02)
        assert sorted(started) == ["job-0", "job-1"] and doc(firestore_client, keys[2])["status"] == "queued"
        release["job-0"].set()
        assert emu.wait_until(lambda: "job-2" in started, 30, 0.02)
    finally:
        for event in release.values():
            event.set()
        worker.stop(grace=0)


def test_two_workers_never_run_two_jobs_of_a_user_past_user_max_running(firestore_client, results):
    """The test review: the peak was bound by the two workers alone (it could never pass 2), and the workers met
    only by chance (a sleep). Now each of the user's jobs runs until the other user's job is running beside it:
    the two workers overlap for sure, and the user's own peak is 1."""
    limits = Limits(max_running=1)
    active, peaks, lock = Counter(), Counter(), threading.Lock()
    other_running = threading.Event()

    class Counting(StubGenerator):
        def generate(self, request, progress=None):
            with lock:
                active[request.user_id] += 1
                active["all"] += 1
                for name in (request.user_id, "all"):
                    peaks[name] = max(peaks[name], active[name])
            try:
                if request.user_id == "u-other":
                    other_running.set()
                else:  # held until the other user's job runs beside it (the other worker's, by then)
                    other_running.wait(30)
                return super().generate(request, progress)
            finally:
                with lock:
                    active[request.user_id] -= 1
                    active["all"] -= 1

    workers = []
    for name in ("w1", "w2"):
        store = WorkerJobs(firestore_client, worker_id=name, lease_seconds=30, limits=limits)
        workers.append(Reconciler(store, JobRunner(store, Counting(), results), sweep_interval=0.3).start())
    try:
        assert all(w.wait_listening(LISTENING_SECONDS) for w in workers)
        keys = [write_client_doc(firestore_client, f"job-{i}", width=256) for i in range(4)]
        other = write_client_doc(firestore_client, "other-user", user="u-other")
        assert emu.wait_until(
            lambda: all(doc(firestore_client, k)["status"] == "completed" for k in [*keys, other]), 60, 0.1
        )
    finally:
        for w in workers:
            w.stop(grace=0)
    assert (peaks[USER], peaks["u-other"], peaks["all"]) == (1, 1, 2)  # the workers overlapped; the user's never
    starts = sorted((doc(firestore_client, k)["started_at"], doc(firestore_client, k)["completed_at"]) for k in keys)
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(starts))
    assert counts(firestore_client) == (0, 0) and counts(firestore_client, "u-other") == (0, 0)


# ---------------------------------------------------------------------------------------------- the doors
def test_past_the_limits_the_callable_answers_resource_exhausted(firestore_client):
    limits = Limits(max_pending=1, daily_budget=2.5)
    data = {"prompt": "a red car", "file_uid": "one"}
    assert dispatch.generate(firestore_client, nobody_listening(), uid=USER, data=data, limits=limits)["success"]
    with pytest.raises(dispatch.CallError) as raised:
        dispatch.generate(
            firestore_client, nobody_listening(), uid=USER, data={**data, "file_uid": "two"}, limits=limits
        )
    assert raised.value.code == "resource-exhausted" and "USER_MAX_PENDING" in raised.value.message
    failed = doc(firestore_client, JobKey(USER, "images", "two"))
    assert (failed["status"], failed["error_type"], failed["error"]) == ("failed", "QuotaExceeded", True)
    assert failed["error_message"] == raised.value.message and "quota_admitted" not in failed
    assert failed["created_at"] and failed["prompt"] == "a red car" and "dispatch_count" not in failed
    # A retry of the refused call answers the same, and counts nothing.
    with pytest.raises(dispatch.CallError) as again:
        dispatch.generate(
            firestore_client, nobody_listening(), uid=USER, data={**data, "file_uid": "two"}, limits=limits
        )
    assert (again.value.code, again.value.message) == ("resource-exhausted", raised.value.message)
    assert counts(firestore_client) == (0, 1)
    # The budget: a second default image (1.41 GPU-seconds) would pass 2.5 today.
    store = WorkerJobs(firestore_client, worker_id="w", limits=limits)
    job = store.claim(JobKey(USER, "images", "one"))
    assert store.complete(job, {"status": "completed"}) and counts(firestore_client) == (0, 0)
    with pytest.raises(dispatch.CallError) as budget:
        dispatch.generate(
            firestore_client, nobody_listening(), uid=USER, data={**data, "file_uid": "three"}, limits=limits
        )
    assert budget.value.code == "resource-exhausted" and "USER_DAILY_BUDGET" in budget.value.message
    assert "resets at" in budget.value.message and "UTC" in budget.value.message


def test_past_the_limits_a_client_doc_ends_failed_at_the_trigger_and_at_a_worker(firestore_client, results):
    limits = Limits(daily_budget=1.0)  # less than any job costs
    runpod = StubRunPod([ACCEPTED])
    try:
        key = write_client_doc(firestore_client, "via-trigger")
        assert (
            dispatch.dispatch_created(
                firestore_client,
                runpod.client(),
                user_id=USER,
                media_type="images",
                file_uid="via-trigger",
                limits=limits,
            )
            == "refused"
        )
        assert runpod.requests == []
        assert (doc(firestore_client, key)["status"], doc(firestore_client, key)["error_type"]) == (
            "failed",
            "QuotaExceeded",
        )
    finally:
        runpod.close()
    store = WorkerJobs(firestore_client, worker_id="w", limits=limits)
    generator = StubGenerator()
    worker = Reconciler(store, JobRunner(store, generator, results), sweep_interval=30).start()
    try:
        assert worker.wait_listening(LISTENING_SECONDS)
        key = write_client_doc(firestore_client, "via-worker")
        assert emu.wait_until(lambda: doc(firestore_client, key)["status"] == "failed", 15, 0.05)
    finally:
        worker.stop(grace=0)
    failed = doc(firestore_client, key)
    assert failed["error_type"] == "QuotaExceeded" and "USER_DAILY_BUDGET" in failed["error_message"]
    assert generator.calls == [] and counts(firestore_client) == (0, 0)


def test_a_backlog_of_client_docs_no_function_saw_is_bounded_by_user_max_pending(firestore_client, results):
    """Docs a client writes where no function sees them (not deployed, or the trigger late): the worker's listener
    is their first door, and admits them as it hears of them, oldest first. A claim alone, one job at a time,
    would never see more than one pending and let any backlog through."""
    limits = Limits(max_pending=2)
    store = WorkerJobs(firestore_client, worker_id="w", limits=limits)
    generator = StubGenerator(threading.Event())  # the first job holds the slot
    worker = Reconciler(store, JobRunner(store, generator, results), sweep_interval=30).start()
    keys = [JobKey(USER, "images", f"flood-{i}") for i in range(5)]
    try:
        assert worker.wait_listening(LISTENING_SECONDS)
        for key in keys:  # one at a time: each its own created_at, in this order
            write_client_doc(firestore_client, key.file_uid)
        assert emu.wait_until(lambda: all(doc(firestore_client, k)["status"] == "failed" for k in keys[2:]), 15, 0.05)
        assert counts(firestore_client)[1] == 2
        generator.gate.set()
        assert emu.wait_until(lambda: all(doc(firestore_client, k)["status"] == "completed" for k in keys[:2]), 15)
    finally:
        worker.stop(grace=0)
    for key in keys[2:]:
        refused = doc(firestore_client, key)
        assert refused["error_type"] == "QuotaExceeded" and "USER_MAX_PENDING" in refused["error_message"]
    assert sorted(generator.calls) == ["flood-0", "flood-1"] and counts(firestore_client) == (0, 0)


def test_past_the_limits_runsync_answers_the_contracts_error(firestore_emulator, storage_emulator, emulator_logs):
    """A real worker process (no models: the refusal comes before any generation) with USER_MAX_PENDING=1."""
    from test_worker_api import post

    from devtools.worker import WorkerProcess

    project = emu.unique_id("demo-quota")
    bucket = storage_emulator.client(project).create_bucket(emu.unique_id("quota-bucket"))
    env = emu.emulator_env(firestore_emulator, storage_emulator, project, bucket.name)
    worker = WorkerProcess(emulator_logs, env, IMAGE_MODEL="none", VIDEO_MODEL="none", USER_MAX_PENDING="1")
    db = firestore_emulator.client(project)
    # The user's one pending slot is taken by a job that a worker holds (lease for an hour).
    held = JobKey(USER, "images", "held")
    db.document(held.path).set(client_doc())
    assert WorkerJobs(db, worker_id="elsewhere", lease_seconds=3600).claim(held) is not None
    worker.start()
    try:
        body = {"input": {"prompt": "a red car", "user_id": USER, "file_uid": "refused", "use_cloud_storage": True}}
        # The handler answers the contract's error response {"error": msg, "status": "failed"}, which the
        # RunPod SDK's envelope carries as {"status": "FAILED", "error": msg}.
        answer = post(worker.runsync_url, body)
        assert answer["status"] == "FAILED" and "USER_MAX_PENDING" in answer["error"]
        refused = db.document(f"generations/{USER}/images/refused").get().to_dict()
        assert (refused["status"], refused["error_type"]) == ("failed", "QuotaExceeded")
        assert refused["error_message"] == answer["error"]
        again = post(worker.runsync_url, body)  # a retry: the same answer
        assert (again["status"], again["error"]) == ("FAILED", answer["error"])
        assert counts(db) == (1, 1)
        # Each refusal is in the worker's log, with the job's ids and RunPod's request id.
        refusals = [json.loads(line) for line in worker.events("request_refused")]
        assert len(refusals) == 2 and all(r["error_type"] == "QuotaExceeded" for r in refusals)
        assert all((r["user_id"], r["file_uid"]) == (USER, "refused") and r["requestId"] for r in refusals)
    finally:
        worker.stop()
        emu.close_firestore(db)


def test_a_refused_job_sent_again_once_the_limits_allow_is_admitted(firestore_client):
    """The refusal says to try again when one has finished: the same request (runsync's or the callable's, the same
    file_uid) is that try. Still past the limits, it is refused again with the limits as they now stand."""
    limits = Limits(max_pending=1, daily_budget=50)
    store = WorkerJobs(firestore_client, worker_id="w", limits=limits)
    first, second = JobKey(USER, "images", "first"), JobKey(USER, "images", "second")
    assert store.ensure_queued(request("first")).after["status"] == "queued"
    refused = store.ensure_queued(request("second", width=768)).after
    assert (refused["status"], refused["error_type"]) == ("failed", "QuotaExceeded")
    assert "USER_MAX_PENDING" in refused["error_message"]
    assert store.ensure_queued(request("second", width=768)).after["status"] == "failed"  # still full
    assert counts(firestore_client) == (0, 1)

    job = store.claim(first)
    assert job is not None and store.complete(job, {"status": "completed"}) == "completed"
    again = store.ensure_queued(request("second", width=768)).after
    assert (again["status"], again["error"], again["quota_admitted"], again["width"]) == ("queued", False, True, 768)
    assert not {"error_type", "error_message", "failed_at", "expire_at"} & again.keys()
    assert again["cost"] == quota.estimate(request("second", width=768))
    assert counts(firestore_client) == (0, 1)
    running = store.claim(second)
    assert running is not None  # a queued job like any other

    # The callable: a refused call made again is admitted and dispatched; past the budget it names the budget.
    data = {"prompt": "a red car", "file_uid": "third"}
    with pytest.raises(dispatch.CallError) as raised:
        dispatch.generate(firestore_client, nobody_listening(), uid=USER, data=data, limits=limits)
    assert "USER_MAX_PENDING" in raised.value.message
    assert store.complete(running, {"status": "completed"}) == "completed"
    reply = dispatch.generate(firestore_client, nobody_listening(), uid=USER, data=data, limits=limits)
    assert reply["success"] and reply["status"] == "queued"  # admitted; the RunPod it called did not answer
    third = doc(firestore_client, JobKey(USER, "images", "third"))
    assert (third["status"], third["dispatch_count"], third["quota_admitted"]) == ("queued", 1, True)
    tight = Limits(max_pending=5, daily_budget=third["cost"] + 0.5)
    data = {"prompt": "a red car", "file_uid": "fourth", "width": 1024, "height": 1024}
    with pytest.raises(dispatch.CallError) as budget:
        dispatch.generate(firestore_client, nobody_listening(), uid=USER, data=data, limits=tight)
    assert "USER_DAILY_BUDGET" in budget.value.message
    with pytest.raises(dispatch.CallError) as still:  # the same call again: refused again, nothing counted
        dispatch.generate(firestore_client, nobody_listening(), uid=USER, data=data, limits=tight)
    assert still.value.code == "resource-exhausted" and "USER_DAILY_BUDGET" in still.value.message
    assert counts(firestore_client) == (0, 1)


@pytest.mark.parametrize("written_before_the_fix", [False, True])
def test_a_refused_call_sent_again_stays_its_requests_job(firestore_client, written_before_the_fix):
    """A review: the refused doc lost `requested_at` (what marks a request's job), and its call sent again never
    wrote it back. The job, admitted and running, was then a client's doc to a later bad call of its file_uid,
    which failed it (charged; the README: such a call "changes nothing of that job"); and a video call of that
    file_uid was taken for the refused image's. A refused doc of an older version, without the mark, gets it when
    sent again."""
    from google.cloud.firestore import DELETE_FIELD

    user, limits = emu.unique_id("u-resent"), Limits(max_pending=1)
    store = WorkerJobs(firestore_client, worker_id="w", limits=limits)
    data = {"prompt": "a red car", "file_uid": "x", "width": 512, "height": 512}
    dispatch.generate(firestore_client, nobody_listening(), uid=user, data={**data, "file_uid": "other"}, limits=limits)
    with pytest.raises(dispatch.CallError) as refused:
        dispatch.generate(firestore_client, nobody_listening(), uid=user, data=data, limits=limits)
    assert refused.value.code == "resource-exhausted"
    image = JobKey(user, "images", "x")
    assert "requested_at" in doc(firestore_client, image)
    if written_before_the_fix:
        firestore_client.document(image.path).update({"requested_at": DELETE_FIELD})
    else:  # a video call of the refused image's file_uid is a job of its own
        with pytest.raises(dispatch.CallError) as video:
            video_data = {"prompt": "waves", "file_uid": "x", "num_frames": 17, "fps": 8}
            dispatch.generate(firestore_client, nobody_listening(), uid=user, data=video_data, limits=limits)
        assert "USER_MAX_PENDING" in video.value.message  # refused for the limits, not "fps is a video field"
        assert doc(firestore_client, JobKey(user, "videos", "x"))["error_type"] == "QuotaExceeded"
    owner_calls.cancel(firestore_client, uid=user, data={"fileUid": "other", "mediaType": "images"}, limits=limits)
    reply = dispatch.generate(firestore_client, nobody_listening(), uid=user, data=data, limits=limits)
    assert reply["success"] and "requested_at" in doc(firestore_client, image)
    assert store.claim(image) is not None
    with pytest.raises(dispatch.CallError) as bad:
        dispatch.generate(firestore_client, nobody_listening(), uid=user, data={**data, "width": 9999}, limits=limits)
    assert bad.value.code == "invalid-argument"
    running = doc(firestore_client, image)
    assert (running["status"], running["width"], running.get("error_type")) == ("processing", 512, None)


def test_a_placeholder_a_worker_took_before_its_refused_request_is_charged_the_time_it_ran(firestore_client):
    """The security review: the contract's function flow, where a worker took the placeholder doc (prompt only)
    after its grace and its runsync was then refused: the try nobody asked for was charged its whole estimate
    (17.4 for 0.1 s), where a cancel at the same moment is charged the time it ran. It is charged as a cancel is."""
    key = write_client_doc(firestore_client, "placeholder-refused")
    worker = WorkerJobs(firestore_client, worker_id="w")
    assert worker.claim(key) is not None
    estimate = doc(firestore_client, key)["cost"]
    firestore_client.document(key.path).update({"started_at": datetime.now(UTC) - timedelta(seconds=0.4)})
    refusal = GenerationError("ValidationError", "Validation failed: width must be between 256 and 1024")
    outcome = JobStore(firestore_client).fail_awaiting(key, refusal)
    assert outcome.applied
    ended = doc(firestore_client, key)
    assert (ended["status"], ended["error_type"]) == ("failed", "ValidationError")
    assert ended["cost"] == ended["stopped_cost"] == pytest.approx(0.4, abs=0.4)
    assert ended["cost"] < estimate
    assert usage(firestore_client)["spent_today"] == pytest.approx(ended["cost"], abs=1e-3)
    assert counts(firestore_client) == (0, 0)


def test_a_running_client_doc_its_refused_callable_call_fails_is_charged_the_time_it_ran(firestore_client):
    """The security review, its end to end: a client doc (4 images at 1024x1024, 50 steps) a worker took, then a
    `generateWithRunPod` call for it refused (`width: 5`): the job failed with the refusal, charged 17.4 for a try of
    a few seconds. Charged the time it ran, as a cancel is."""
    big = dict(width=1024, height=1024, num_inference_steps=50, num_images_per_prompt=4)
    key = write_client_doc(firestore_client, "refused-while-running", **big)
    assert WorkerJobs(firestore_client, worker_id="w").claim(key) is not None
    estimate = doc(firestore_client, key)["cost"]
    firestore_client.document(key.path).update({"started_at": datetime.now(UTC) - timedelta(seconds=3)})
    data = {"prompt": "a cat", "file_uid": key.file_uid, "width": 5}
    with pytest.raises(dispatch.CallError) as refused:
        dispatch.generate(firestore_client, nobody_listening(), uid=USER, data=data)
    assert refused.value.code == "invalid-argument"
    ended = doc(firestore_client, key)
    assert (ended["status"], ended["error_type"]) == ("failed", "ValidationError")
    assert ended["cost"] == ended["stopped_cost"] == pytest.approx(3, abs=1)
    assert estimate > 15
    assert usage(firestore_client)["spent_today"] == pytest.approx(ended["cost"], abs=1e-3)
    assert counts(firestore_client) == (0, 0)


# ---------------------------------------------------------------------------------------------- restated jobs
def test_a_running_job_restated_by_its_request_is_queued_again_and_charged_what_will_run(firestore_client):
    """The contract's function flow when a worker took the placeholder doc first: the request's parameters win,
    the running claim is ended (fenced off), and the user is charged for what will now run, plus the moment
    the stopped try ran."""
    key = write_client_doc(firestore_client, "restated")
    worker = WorkerJobs(firestore_client, worker_id="w-old")
    job = worker.claim(key)
    assert job is not None and counts(firestore_client) == (1, 1)
    placeholder_cost = doc(firestore_client, key)["cost"]

    bigger = request("restated", width=1024, height=1024, num_images_per_prompt=2, seed=7)
    outcome = JobStore(firestore_client).ensure_queued(bigger)
    assert outcome.displaced == job.lease
    after = doc(firestore_client, key)
    assert (after["status"], after["width"], after["num_images_per_prompt"], after["seed"]) == ("queued", 1024, 2, 7)
    assert not {"worker_id", "lease_expires_at", "progress"} & after.keys()
    ran = (after["modified"] - after["started_at"]).total_seconds()  # at least what the restatement measured
    assert quota.estimate(bigger) < after["cost"] <= quota.estimate(bigger) + min(ran, placeholder_cost) + 1e-3
    assert counts(firestore_client) == (0, 1)
    assert usage(firestore_client)["spent_today"] == pytest.approx(after["cost"], abs=1e-3)
    # The old run can write nothing more; the next claim is a new attempt (a fence the old run never matches).
    assert not worker.renew(job) and not worker.complete(job, {"status": "completed"})
    again = worker.claim(key)
    assert again is not None and again.lease.attempt == job.lease.attempt + 1
    # Asked again as it now stands: nothing changes.
    assert not JobStore(firestore_client).ensure_queued(bigger).applied
    # Restated tries are not failures: past MAX_ATTEMPTS (3) of them the job is still claimed, never given up.
    for width in (512, 768, 1024):
        JobStore(firestore_client).ensure_queued(request("restated", width=width, num_images_per_prompt=2, seed=7))
        again = worker.claim(key)
        assert again is not None and again.doc["status"] == "queued"
    assert (doc(firestore_client, key)["attempts"], doc(firestore_client, key)["restated"]) == (5, 4)


def started_seconds_ago(client, key: JobKey, seconds: float) -> None:
    """The running try as if it began `seconds` ago (a try that ran that long, without waiting for it)."""
    started = client.document(key.path).get().to_dict()["started_at"]
    client.document(key.path).update({"started_at": started - timedelta(seconds=seconds)})


def test_restating_a_running_job_again_and_again_is_charged_each_stopped_try(firestore_client):
    """A security audit ran one video nine times for one cheap charge: each time its try was nearly done, the
    user's request restated it (steps 49, 50, 49...), which stopped the try and queued it again, charged only
    the estimates' difference, and never counted against MAX_ATTEMPTS. Each stopped try's GPU time (at most its
    estimate) now stays charged, so the budget ends it."""
    key = JobKey(USER, "videos", "again-and-again")
    big = {"num_frames": 81, "video_width": 1024, "video_height": 1024}
    steps = itertools.cycle([49, 50])
    estimate = quota.estimate(request(key.file_uid, num_inference_steps=50, **big))
    limits = Limits(daily_budget=estimate * 3.5)
    store, worker = JobStore(firestore_client, limits=limits), WorkerJobs(firestore_client, worker_id="w-1")
    store.ensure_queued(request(key.file_uid, num_inference_steps=next(steps), **big))
    tries = 0
    while True:
        assert worker.claim(key) is not None
        tries += 1
        started_seconds_ago(firestore_client, key, estimate * 0.9)  # nearly done
        after = store.ensure_queued(request(key.file_uid, num_inference_steps=next(steps), **big)).after
        if after["status"] == "failed":
            break
        assert usage(firestore_client)["spent_today"] == pytest.approx(after["cost"], abs=0.01)
        assert tries < 10, "restated ten times within a budget of 3.5 tries"
    assert after["error_type"] == "QuotaExceeded" and "USER_DAILY_BUDGET" in after["error_message"]
    assert tries == 3  # the first charge, two stopped tries of 0.9 each, then a third does not fit in 3.5
    assert usage(firestore_client)["spent_today"] <= limits.daily_budget


def test_restating_a_job_charged_yesterday_charges_today(firestore_client):
    """The audit's day shift: a job charged before midnight and restated after it refunded yesterday's charge
    from today's spend (590 -> 417), letting a job past the budget in. That day's spend is gone: today is
    charged the new estimate."""
    key = write_client_doc(firestore_client, "over-midnight")
    store = JobStore(firestore_client)
    store.ensure_queued(request("over-midnight", width=1024, height=1024, num_inference_steps=50))
    yesterday = quota.day_of(datetime.now(UTC) - timedelta(days=1))
    firestore_client.document(key.path).update({"charged_on": yesterday})
    firestore_client.document(f"usage/{USER}").update({"spent_today": 500.0})
    cheap = request("over-midnight", width=256, height=256, num_inference_steps=10)
    after = store.ensure_queued(cheap).after
    assert (after["status"], after["cost"]) == ("queued", quota.estimate(cheap))
    assert after["charged_on"] == quota.day_of(datetime.now(UTC))
    assert usage(firestore_client)["spent_today"] == pytest.approx(500.0 + quota.estimate(cheap), abs=1e-3)


def test_a_running_job_charged_yesterday_and_restated_today_is_charged_its_new_estimate_alone(firestore_client):
    """The clock review: a job admitted before midnight, running past it and restated after, was charged its
    stopped try again today (yesterday paid the try's whole estimate): up to 174 GPU-seconds of today's budget
    for nothing. Today is charged the new estimate, as the README says."""
    key = write_client_doc(firestore_client, "running-over-midnight")
    store, worker = JobStore(firestore_client), WorkerJobs(firestore_client, worker_id="w-1")
    store.ensure_queued(request(key.file_uid, width=1024, height=1024, num_inference_steps=50))
    assert worker.claim(key) is not None
    started_seconds_ago(firestore_client, key, 90)
    yesterday = quota.day_of(datetime.now(UTC) - timedelta(days=1))
    firestore_client.document(key.path).update({"charged_on": yesterday})
    firestore_client.document(f"usage/{USER}").update({"spent_today": 100.0})
    cheap = request(key.file_uid, width=256, height=256, num_inference_steps=10)
    after = store.ensure_queued(cheap).after
    assert (after["status"], after["cost"], after["stopped_cost"]) == ("queued", quota.estimate(cheap), 0)
    assert usage(firestore_client)["spent_today"] == pytest.approx(100.0 + quota.estimate(cheap), abs=1e-3)


def test_a_bad_call_repeated_for_a_callables_job_changes_nothing(firestore_client):
    """The audit: the callable's job running, the same file_uid called again with width 2048 failed the running
    job, charged, and the original valid call was then refused too. The doc is the first call's job."""
    data = {"prompt": "a red car", "file_uid": "bad-repeat", "width": 1024, "height": 1024}
    reply = dispatch.generate(firestore_client, nobody_listening(), uid=USER, data=data)
    assert reply["success"]
    key = JobKey(USER, "images", "bad-repeat")
    job = WorkerJobs(firestore_client, worker_id="w-1").claim(key)
    assert job is not None
    with pytest.raises(dispatch.CallError) as raised:
        dispatch.generate(firestore_client, nobody_listening(), uid=USER, data={**data, "width": 2048})
    assert (raised.value.code, raised.value.message) == ("invalid-argument", "width must be between 256 and 1024")
    after = doc(firestore_client, key)
    assert (after["status"], after["width"]) == ("processing", 1024) and "error_type" not in after
    assert WorkerJobs(firestore_client, worker_id="w-1").renew(job)  # its run goes on
    again = dispatch.generate(firestore_client, nobody_listening(), uid=USER, data=data)
    assert again["success"] and again["fileUid"] == "bad-repeat"


def test_the_callables_refusal_fails_the_clients_doc_even_once_a_worker_took_it(firestore_client):
    """The client sample's placeholder, claimed by a worker's listener before the call arrives; the call breaks
    the contract: the job is the call's, so it fails (before, it ran on with the doc's defaults)."""
    key = write_client_doc(firestore_client, "refused-running")
    job = WorkerJobs(firestore_client, worker_id="w-1").claim(key)
    assert job is not None and counts(firestore_client) == (1, 1)
    data = {"prompt": "a red car", "file_uid": "refused-running", "width": 2000}
    with pytest.raises(dispatch.CallError) as raised:
        dispatch.generate(firestore_client, nobody_listening(), uid=USER, data=data)
    assert (raised.value.code, raised.value.message) == ("invalid-argument", "width must be between 256 and 1024")
    after = doc(firestore_client, key)
    assert (after["status"], after["error_type"], after["error_message"]) == (
        "failed",
        "ValidationError",
        "width must be between 256 and 1024",
    )
    assert counts(firestore_client) == (0, 0)
    assert not WorkerJobs(firestore_client, worker_id="w-1").renew(job)  # the run is fenced off
    # It ran (charged): the fixed request under its file_uid is told to come as a new job, through either door,
    # not the old refusal as if it were its own (review: "width must be ..." answered a width of 512).
    fixed = {**data, "width": 512}
    told = f"width must be between 256 and 1024; {lifecycle.RAN_BEFORE_REFUSAL}"
    with pytest.raises(dispatch.CallError) as again:
        dispatch.generate(firestore_client, nobody_listening(), uid=USER, data=fixed)
    assert (again.value.code, again.value.message) == ("failed-precondition", told)
    answer = RunsyncHandler(WorkerJobs(firestore_client, worker_id="w-api"), submit=None).handle(
        {**fixed, "user_id": USER, "use_cloud_storage": True}
    )
    assert answer == {"error": told, "status": "failed"}
    assert doc(firestore_client, key)["status"] == "failed" and counts(firestore_client) == (0, 0)


@pytest.mark.parametrize("end", ["cancelled while queued", "run again"])
def test_a_running_job_restated_then_ended_before_running_again_is_charged_its_stopped_try_alone(firestore_client, end):
    """The review: restated with other parameters, a running job is charged its new estimate plus its stopped
    try; cancelled before a worker took it again, it kept the whole new estimate, for a run that never came. It
    keeps what its stopped try used (`stopped_cost`); run again, it is charged its whole cost."""
    key = write_client_doc(firestore_client, f"restated-then-{end.split()[0]}")
    worker = WorkerJobs(firestore_client, worker_id="w-old")
    assert worker.claim(key) is not None
    bigger = request(key.file_uid, width=1024, height=1024, num_images_per_prompt=2, seed=7)
    JobStore(firestore_client).ensure_queued(bigger)
    restated = doc(firestore_client, key)
    stopped = restated["stopped_cost"]
    assert restated["cost"] == pytest.approx(quota.estimate(bigger) + stopped, abs=1e-3) and stopped > 0
    assert usage(firestore_client)["spent_today"] == pytest.approx(restated["cost"], abs=1e-3)
    if end == "run again":
        job = worker.claim(key)
        assert job is not None and "stopped_cost" not in doc(firestore_client, key)
        assert worker.fail(job, GenerationError("RuntimeError", "boom"))  # it ran: its whole cost stands
        charged = restated["cost"]
    else:
        assert JobStore(firestore_client).cancel(key).after["error_type"] == "Cancelled"
        charged = stopped
    assert usage(firestore_client)["spent_today"] == pytest.approx(charged, abs=1e-3)
    assert counts(firestore_client) == (0, 0)


# What happens to a job after a leaving worker released it 6 s into its run, and what it is then charged: the
# released try's 6 s where it ends before running to its end, its estimate once where it does.
RELEASED_THEN = {
    "cancelled while queued": 6,
    "restated, then cancelled": 6,
    "run again": "estimate",
    "restated, then run again": "new estimate",
    "run 3 s again, then cancelled": 9,
    "run 3 s again, released again, then cancelled": 9,
    "released past MAX_RELEASES": 6,
}


@pytest.mark.parametrize("then", RELEASED_THEN)
def test_a_released_job_is_charged_its_released_tries_only_where_it_ends_before_running_to_its_end(
    firestore_client, then
):
    """A review: a leaving worker's release gives the try back (`attempts` 0), but the job ran until it. Cancelled
    while queued after, it was charged its whole estimate, where a cancel a moment before the release charged the
    time it ran; then a cancel during the next try forgot the released one, and a restatement while queued charged
    it on top of a run to the end. Released tries' time is kept apart (`released_cost`): charged, with the time of
    the try a cancel stops, where the job ends otherwise than by running to its end (`stopped_cost` while queued);
    a job that runs to its end is charged its estimate once."""
    big = dict(width=1024, height=1024, num_inference_steps=50, num_images_per_prompt=4)
    key = write_client_doc(firestore_client, "released", **big)
    past = then == "released past MAX_RELEASES"
    store, worker = (
        JobStore(firestore_client),
        WorkerJobs(firestore_client, worker_id="w", max_releases=1 if past else 3),
    )
    assert store.admit(key).written
    estimate = doc(firestore_client, key)["cost"]

    def run(seconds: float):
        job = worker.claim(key)
        assert job is not None and "stopped_cost" not in doc(firestore_client, key)
        # The try started `seconds` ago (as its worker's clock and the emulator's are this machine's).
        firestore_client.document(key.path).update({"started_at": datetime.now(UTC) - timedelta(seconds=seconds)})
        return job

    assert estimate > 15
    assert worker.release(run(6))["status"] == "queued"
    released = doc(firestore_client, key)
    assert released["cost"] == estimate and released["stopped_cost"] == released["released_cost"]
    assert released["released_cost"] == pytest.approx(6, abs=1)
    assert usage(firestore_client)["spent_today"] == pytest.approx(estimate, abs=1e-3)
    charged = RELEASED_THEN[then]
    if then.startswith("restated"):
        cheap = request("released", **{**big, "width": 768, "height": 768})
        store.ensure_queued(cheap)
        restated = doc(firestore_client, key)
        assert restated["cost"] == pytest.approx(quota.estimate(cheap), abs=1e-3)
        assert restated["stopped_cost"] == pytest.approx(released["released_cost"], abs=1e-3)
        estimate = restated["cost"]
    if "cancelled" in then:
        if then.startswith("run 3 s again"):
            job = run(3)
            if "released again" in then:
                assert worker.release(job)["status"] == "queued"
                assert store.cancel(key).after["error_type"] == "Cancelled"
            else:
                store.cancel(key)
                assert worker.fail(job, GenerationError("Cancelled", "Cancelled by the user"))
        else:
            assert store.cancel(key).after["error_type"] == "Cancelled"
    elif past:
        assert worker.release(run(0))["status"] == "failed"
    else:
        assert worker.complete(run(1), {"status": "completed", "generated": True, "error": False}) is not None
    ended = doc(firestore_client, key)
    expected = estimate if isinstance(charged, str) else charged
    assert usage(firestore_client)["spent_today"] == pytest.approx(
        expected, abs=1e-3 if isinstance(charged, str) else 1
    )
    assert counts(firestore_client) == (0, 0)
    assert ended["status"] in ("completed", "failed")


def test_the_callable_answers_a_refusal_that_cannot_come_back_as_no_refusal_of_its_own(firestore_client):
    """The review's race: the callable dispatches the client's doc; before the dispatch arrives a worker takes
    the doc and a bad call for its file_uid fails it. The worker answers the dispatch with the refusal and its
    "send it as a new job" tail: the call says so, failed-precondition (it read as invalid-argument)."""
    key = write_client_doc(firestore_client, "raced-refusal")
    data = {"prompt": "a red car", "file_uid": "raced-refusal", "width": 512}

    class RacedOnTheWay(RunPodClient):
        def runsync(self, job_input):
            assert WorkerJobs(firestore_client, worker_id="w-1").claim(key) is not None
            with pytest.raises(dispatch.CallError):
                dispatch.generate(firestore_client, nobody_listening(), uid=USER, data={**data, "width": 2000})
            handler = RunsyncHandler(WorkerJobs(firestore_client, worker_id="w-api"), submit=None)
            answer = handler.handle(dict(job_input), "rp-raced")
            return Verdict(REJECTED, answer["error"], "rp-raced")

    with pytest.raises(dispatch.CallError) as raised:
        dispatch.generate(firestore_client, RacedOnTheWay("http://127.0.0.1:9/runsync", "k"), uid=USER, data=data)
    told = f"width must be between 256 and 1024; {lifecycle.RAN_BEFORE_REFUSAL}"
    assert (raised.value.code, raised.value.message) == ("failed-precondition", told)


def test_a_restatement_past_the_daily_budget_fails_the_job(firestore_client):
    key = write_client_doc(firestore_client, "restated-over")
    limits = Limits(daily_budget=quota.estimate(request("x")) * 1.5)
    JobStore(firestore_client, limits=limits).ensure_queued(request("restated-over"))
    huge = request("restated-over", width=1024, height=1024, num_images_per_prompt=4, num_inference_steps=50)
    after = JobStore(firestore_client, limits=limits).ensure_queued(huge, "rp-huge").after
    assert (after["status"], after["error_type"]) == ("failed", "QuotaExceeded")
    assert "USER_DAILY_BUDGET" in after["error_message"] and counts(firestore_client) == (0, 0)
    assert after["arrived_dispatches"] == ["rp-huge"]  # its redelivery is this refusal again, not a request
    # The message names the job's whole new cost and what it was charged already, not just the difference.
    charged, whole = quota.estimate(request("x")), quota.estimate(huge)
    assert f"this job needs {whole:.1f} GPU-seconds ({charged:.1f} already charged)" in after["error_message"]
    assert doc(firestore_client, key)["status"] == "failed"


def test_a_running_job_restated_past_the_daily_budget_is_told_to_come_back_as_a_new_job(firestore_client):
    """The ledger audit: the refusal said when the budget resets, as if the same request could then be sent
    again; but a job that ran keeps its answer (its stopped try stays charged), so its file_uid answers this
    refusal for good. The message says to send it under a new file_uid."""
    key = write_client_doc(firestore_client, "ran-then-over")
    limits = Limits(daily_budget=quota.estimate(request("x")) * 3.5)  # room for 3.5 default images
    JobStore(firestore_client, limits=limits).ensure_queued(request("ran-then-over"))
    JobStore(firestore_client, limits=limits).ensure_queued(request("another"))
    assert WorkerJobs(firestore_client, worker_id="w-1", limits=limits).claim(key) is not None
    # Within the whole budget (3.9 of 4.9), past what is left of it (2.1).
    bigger = request("ran-then-over", width=1024, height=1024, num_inference_steps=35)
    after = JobStore(firestore_client, limits=limits).ensure_queued(bigger).after
    assert (after["status"], after["error_type"]) == ("failed", "QuotaExceeded")
    assert after["error_message"].endswith(
        "UTC; it ran before this request restated it, so send it as a new job (a new file_uid)"
    ), after["error_message"]
    again = JobStore(firestore_client, limits=Limits()).ensure_queued(request("ran-then-over")).after
    assert (again["status"], again["error_message"]) == ("failed", after["error_message"])  # even within limits
    # A job that never ran comes back under its own file_uid: its refusal says no such thing.
    write_client_doc(firestore_client, "queued-then-over")
    JobStore(firestore_client, limits=limits).ensure_queued(request("queued-then-over"))
    over = request("queued-then-over", width=1024, height=1024, num_inference_steps=35)
    refused = JobStore(firestore_client, limits=limits).ensure_queued(over).after
    assert refused["error_type"] == "QuotaExceeded" and refused["error_message"].endswith("UTC"), refused


def running_with_a_cancel_asked(client, file_uid: str) -> tuple[ClaimedJob, float]:
    """A client's job a worker took, then its owner's cancel (the doc's flag); the worker has not yet reached its
    next step. Returns the worker's claim and what the job was charged."""
    key = write_client_doc(client, file_uid)
    job = WorkerJobs(client, worker_id="w-busy").claim(key)
    assert job is not None
    client.document(key.path).update({"cancel_requested": True})
    return job, doc(client, key)["cost"]


def restating_requests(client, key: JobKey) -> list[dict]:
    """Requests for the job: with other parameters, and as its doc states it."""
    prompt = doc(client, key)["prompt"]
    return [
        {"prompt": "a red car", "file_uid": key.file_uid, "width": 1024, "height": 1024, "seed": 7},
        {"prompt": prompt, "file_uid": key.file_uid},
    ]


def runsync_answer(client, data: dict) -> dict:
    handler = RunsyncHandler(WorkerJobs(client, worker_id="w-api"), submit=None)
    return handler.handle({**data, "user_id": USER, "use_cloud_storage": True})


def assert_refused_as_cancelled(client, data: dict) -> None:
    with pytest.raises(dispatch.CallError) as refused:
        dispatch.generate(client, nobody_listening(), uid=USER, data=data)
    assert (refused.value.code, refused.value.message) == ("failed-precondition", "Cancelled by the user"), data


@pytest.mark.parametrize("door", ["runsync", "callable"])
def test_a_cancel_asked_of_a_running_job_wins_over_a_request_that_restates_it(firestore_client, door):
    """The ledger audit: a request restating a running job whose owner had asked to cancel it queued it again
    with the new parameters and charged their estimate (plus the stopped try), answered "accepted", and the job
    then ended cancelled all the same, charged for a run that never came. The cancel wins, as it wins over the
    job's completion: the job keeps running to its next step, unchanged and charged as before. Runsync answers
    accepted (its worker updates the doc: the contract's function then writes nothing, and the run's `Cancelled`
    lands); the callable, as the job will end."""
    job, charged = running_with_a_cancel_asked(firestore_client, f"cancel-then-{door}")
    key = job.key
    for data in restating_requests(firestore_client, key):
        if door == "runsync":
            answer = runsync_answer(firestore_client, data)
            assert (answer["status"], answer["file_uid"]) == ("accepted", key.file_uid), data
        else:
            assert_refused_as_cancelled(firestore_client, data)
    after = doc(firestore_client, key)
    assert (after["status"], after["worker_id"], after.get("width"), after["cost"]) == (
        "processing",
        "w-busy",
        None,
        charged,
    )
    assert "restated" not in after and "dispatch_count" not in after
    assert usage(firestore_client)["spent_today"] == pytest.approx(charged) and counts(firestore_client) == (1, 1)
    # The run reaches its next step: its Cancelled lands, under the claim the requests left alone.
    assert WorkerJobs(firestore_client, worker_id="w-busy").fail(
        job, GenerationError("Cancelled", "Cancelled by the user")
    )
    ended = doc(firestore_client, key)
    assert (ended["status"], ended["error_type"], ended["error_message"]) == (
        "failed",
        "Cancelled",
        "Cancelled by the user",
    )
    assert "failed_at" in ended and "expire_at" in ended
    # Charged the time its try ran (a moment here), not its whole estimate.
    assert counts(firestore_client) == (0, 0) and ended["cost"] < charged
    assert usage(firestore_client)["spent_today"] == pytest.approx(ended["cost"], abs=1e-3)


@pytest.mark.parametrize("door", ["runsync", "callable"])
def test_a_queued_job_with_a_cancel_asked_ends_cancelled_at_its_restatement(firestore_client, door):
    """Before any worker's listener failed it: the request ends it cancelled there and then, refunded (it never
    ran), rather than queueing it with its new parameters; both doors answer so, and again after."""
    key = write_client_doc(firestore_client, f"queued-cancel-{door}")
    JobStore(firestore_client).ensure_queued(request(key.file_uid))
    assert usage(firestore_client)["spent_today"] > 0
    firestore_client.document(key.path).update({"cancel_requested": True})
    for data in restating_requests(firestore_client, key):
        if door == "runsync":
            assert runsync_answer(firestore_client, data) == {"error": "Cancelled by the user", "status": "failed"}
        else:
            assert_refused_as_cancelled(firestore_client, data)
        after = doc(firestore_client, key)
        assert (after["status"], after["error_type"], after.get("width")) == ("failed", "Cancelled", None), data
        assert usage(firestore_client)["spent_today"] == 0 and counts(firestore_client) == (0, 0)


def test_the_functions_dispatch_arriving_after_a_cancel_is_a_wake_up_and_the_job_ends_cancelled(firestore_client):
    """The callable's dispatch reaches runsync after the owner asked to cancel the queued job: answered accepted
    (the functions take a failed answer for a dispatch that failed), the job as its doc says; a claim then ends it
    cancelled, refunded."""
    runpod = StubRunPod([ACCEPTED])
    try:
        data = {"prompt": "a red car", "file_uid": "dispatch-after-cancel"}
        assert dispatch.generate(firestore_client, runpod.client(), uid=USER, data=data)["status"] == "accepted"
        sent = runpod.requests[0][1]["input"]
    finally:
        runpod.close()
    key = JobKey(USER, "images", "dispatch-after-cancel")
    firestore_client.document(key.path).update({"cancel_requested": True})
    woken: list[JobKey] = []
    handler = RunsyncHandler(WorkerJobs(firestore_client, worker_id="w-api"), submit=lambda key, *_: woken.append(key))
    assert handler.handle(sent)["status"] == "accepted"
    assert doc(firestore_client, key)["status"] == "queued" and woken == [key]
    assert WorkerJobs(firestore_client, worker_id="w-1").claim(key) is None
    after = doc(firestore_client, key)
    assert (after["status"], after["error_type"]) == ("failed", "Cancelled")
    assert usage(firestore_client)["spent_today"] == 0 and counts(firestore_client) == (0, 0)


def released_near_the_budget(client, file_uid: str) -> tuple[JobKey, Limits]:
    """A client's job that ran until its worker released it, its user's day spent but for a bit more than it: a
    bigger restatement of it is past the daily budget."""
    key = write_client_doc(client, file_uid)
    limits = Limits(daily_budget=quota.estimate(request("x")) * 3.5)
    JobStore(client, limits=limits).ensure_queued(request(file_uid))
    JobStore(client, limits=limits).ensure_queued(request(f"another-than-{file_uid}"))
    worker = WorkerJobs(client, worker_id="w-1", limits=limits)
    job = worker.claim(key)
    assert job is not None and worker.release(job)["status"] == "queued"
    return key, limits


def test_a_released_job_restated_past_the_daily_budget_is_told_to_come_back_as_a_new_job(firestore_client):
    """A release gives the try back to `attempts` but the job ran on a GPU until it (`releases`): it keeps its
    answer, so its refusal says to come back under a new file_uid, and its file_uid answers so for good."""
    key, limits = released_near_the_budget(firestore_client, "released-then-over")
    assert doc(firestore_client, key)["attempts"] == 0  # the try given back: only `releases` says it ran
    bigger = request("released-then-over", width=1024, height=1024, num_inference_steps=35)
    after = JobStore(firestore_client, limits=limits).ensure_queued(bigger).after
    assert (after["error_type"], after["error_message"].endswith(RAN_BEFORE)) == ("QuotaExceeded", True), after
    again = JobStore(firestore_client, limits=Limits()).ensure_queued(request("released-then-over")).after
    assert (again["status"], again["error_message"]) == ("failed", after["error_message"])


def test_the_callable_restates_the_clients_placeholder_doc(firestore_client):
    """The client wrote its doc with the prompt only (camelCase steps), then called with the parameters."""
    key = write_client_doc(firestore_client, "callable-restated", numInferenceSteps=30)
    runpod = StubRunPod([ACCEPTED])
    try:
        data = {"prompt": "a red car", "file_uid": "callable-restated", "width": 384, "num_inference_steps": 10}
        reply = dispatch.generate(firestore_client, runpod.client(), uid=USER, data=data)
        assert reply["status"] == "accepted"
        sent = runpod.requests[0][1]["input"]
        assert (sent["width"], sent["num_inference_steps"]) == (384, 10)
    finally:
        runpod.close()
    after = doc(firestore_client, key)
    assert (after["width"], after["num_inference_steps"], after["dispatch_count"]) == (384, 10, 1)
    assert "numInferenceSteps" not in after and after["cost"] == pytest.approx(
        quota.estimate(request("callable-restated", width=384, num_inference_steps=10))
    )

    firestore_client.document(key.path).update({"status": "completed"})
    with pytest.raises(dispatch.CallError) as raised:
        dispatch.generate(firestore_client, nobody_listening(), uid=USER, data={**data, "width": 512})
    assert raised.value.code == "already-exists"
    assert raised.value.message == (
        "Validation failed: file_uid 'callable-restated' already finished with other parameters (width); "
        "use a new file_uid for a new job"
    )


def test_a_failed_job_called_again_with_other_parameters_is_told_to_come_as_a_new_job(firestore_client):
    """An audit: after an out-of-memory failure, the call "fixed" (smaller) under the same file_uid read the old
    error back, as if the smaller job had run out of memory too. The same call again reads it as it is."""
    key = write_client_doc(firestore_client, "oom-then-smaller", width=1024)
    firestore_client.document(key.path).update(
        {"status": "failed", "error": True, "error_type": "OutOfMemoryError", "error_message": OOM, "attempts": 1}
    )
    data = {"prompt": doc(firestore_client, key)["prompt"], "file_uid": "oom-then-smaller", "width": 1024}
    with pytest.raises(dispatch.CallError) as same:
        dispatch.generate(firestore_client, nobody_listening(), uid=USER, data=data)
    assert (same.value.code, same.value.message) == ("failed-precondition", OOM)
    with pytest.raises(dispatch.CallError) as smaller:
        dispatch.generate(firestore_client, nobody_listening(), uid=USER, data={**data, "width": 512})
    assert (smaller.value.code, smaller.value.message) == (
        "failed-precondition",
        f"{OOM}; it failed with other parameters (width), so send them as a new job (a new file_uid)",
    )
    assert doc(firestore_client, key)["width"] == 1024


OOM = "CUDA Out of Memory during image generation"


def test_a_job_refused_for_its_request_comes_back_fixed_even_past_a_full_slot(firestore_client):
    """The day's review: a client's admitted doc, failed by its refused request (refunded), then sent again fixed
    while its user was full: refused `QuotaExceeded` but left `quota_admitted`, so it could never come back,
    whatever its refusal said. It stays unadmitted, and comes back once the limits allow."""
    user = "u-fix-full"
    store = JobStore(firestore_client, limits=Limits(max_pending=1))
    key = write_client_doc(firestore_client, "fix-full", user=user, width=512)
    assert store.admit(key).after.get("quota_admitted") is True
    assert store.fail_unclaimed(key, GenerationError("ValidationError", "width must be between 256 and 1024")).applied
    assert counts(firestore_client, user) == (0, 0) and not usage(firestore_client, user).get("spent_today")
    other = store.ensure_queued(request("other", user=user))
    assert other.after["status"] == "queued"  # the user's one slot
    refused = store.ensure_queued(request("fix-full", user=user, width=256)).after
    assert (refused["status"], refused["error_type"], refused.get("quota_admitted"), refused["width"]) == (
        "failed",
        "QuotaExceeded",
        None,
        256,  # what was refused, as asked (the re-check: it showed the first request's width)
    )
    store.transition(JobKey.of(request("other", user=user)), lambda doc, now: {"status": "failed"})  # slot free
    again = store.ensure_queued(request("fix-full", user=user, width=256)).after
    assert (again["status"], again["quota_admitted"], again["width"]) == ("queued", True, 256)
    assert counts(firestore_client, user) == (0, 1)
    assert usage(firestore_client, user)["spent_today"] == pytest.approx(again["cost"])


def test_a_restatement_reads_an_unreadable_charge_as_none():
    """The day's review: a job whose `cost` an admin edited (`"abc"`) answered every restating request "Could not
    record the job", a transient error, for ever. Its charge reads as none: the restatement charges the new cost."""
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    before = {"status": "queued", "quota_admitted": True, "cost": "abc", "charged_on": "2026-12-01"}
    assert quota.restated_cost(before, 1.41, 3.46, now)[quota.COST] == 3.46


def test_counts_a_write_of_ones_own_left_behind_are_recounted_at_the_limit(firestore_client, caplog):
    """The client sample audit: a live job doc failed by a write of one's own (the contract's function fails a
    refused request's doc with `updateDoc`; an admin in the console) stayed counted: 20 and every job of the user
    was refused at USER_MAX_PENDING, 2 running and none of theirs started at USER_MAX_RUNNING. At a limit, the
    counts are taken from the user's docs."""
    limits = Limits(max_running=1, max_pending=2)
    running, queued = write_client_doc(firestore_client, "running"), write_client_doc(firestore_client, "queued")
    worker = WorkerJobs(firestore_client, worker_id="w", limits=limits)
    assert worker.claim(running) is not None and worker.admit(queued).written
    assert counts(firestore_client) == (1, 2)
    # Ended by a write of its own, past the counts:
    firestore_client.document(running.path).update({"status": "failed", "error": True})
    assert counts(firestore_client) == (1, 2)
    # A new request is admitted (pending recounted: 1), and the queued job starts (running recounted: 0).
    third = WorkerJobs(firestore_client, worker_id="w2", limits=limits)  # a store of its own: no recent recount
    with caplog.at_level("WARNING", logger="firegen_core.jobs"):
        assert third.ensure_queued(request("third")).after["status"] == "queued"
    assert counts(firestore_client) == (0, 2)
    [recounted] = [record for record in caplog.records if record.getMessage() == "usage_recounted"]
    assert (recounted.pending, recounted.running) == ([2, 1], [1, 0])
    assert third.claim(queued) is not None and counts(firestore_client) == (1, 2)


def test_a_job_written_over_while_it_runs_leaves_no_counts_once_the_user_has_none(
    firestore_client, monkeypatch, caplog
):
    """A review: the contract's Firebase Function retried over a running job (its `setDoc` writes the doc over,
    admin rights, then its runsync comes again) makes the doc a new job, admitted and run; its one job completed
    left running 1 and pending 1 on the usage doc (a line reading a job that no longer ran, and no `expire_at`).
    A counted job that ends while the usage doc counts others takes the counts from the user's docs."""
    from firegen_core import jobs

    monkeypatch.setattr(jobs, "_COUNTED_RIGHT", {})
    worker = WorkerJobs(firestore_client, worker_id="w", retention_days=3)
    key = write_client_doc(firestore_client, "written-over")
    first = worker.claim(key)
    assert first is not None and counts(firestore_client) == (1, 1)
    firestore_client.document(key.path).set(client_doc())  # the function's setDoc, again
    assert not worker.complete(first, {"status": "completed", "generated": True})  # fenced off
    again = worker.claim(key)
    assert again is not None and counts(firestore_client) == (2, 2)  # the first claim's counts are left behind
    with caplog.at_level("WARNING", logger=jobs.log.name):
        assert worker.complete(again, {"status": "completed", "generated": True})
    assert counts(firestore_client) == (0, 0) and "expire_at" in usage(firestore_client)
    [recounted] = [record for record in caplog.records if record.getMessage() == "usage_recounted"]
    assert (recounted.pending, recounted.running) == ([2, 1], [2, 1])


def test_a_backlogs_ends_count_once_a_while(firestore_client, monkeypatch):
    """The end's recount costs count queries only where the usage doc counts other jobs, and once found right,
    none for RECOUNT_EVERY in the process: a user's backlog is not counted at each of its ends (counting at every
    end took a third of a no-op worker's throughput on the emulator, `make bench`)."""
    from firegen_core import jobs

    monkeypatch.setattr(jobs, "_COUNTED_RIGHT", {})
    queries: list = []
    real = jobs._count
    monkeypatch.setattr(jobs, "_count", lambda query, ends: queries.append(query) or real(query, ends))
    store, worker = (
        JobStore(firestore_client),
        WorkerJobs(firestore_client, worker_id="w", limits=Limits(max_running=2)),
    )
    keys = [write_client_doc(firestore_client, f"backlog-{i}") for i in range(6)]
    assert all(store.admit(key).written for key in keys) and counts(firestore_client) == (0, 6)
    ended = []
    for key in keys:
        job = worker.claim(key)
        assert job is not None and worker.complete(job, {"status": "completed", "generated": True})
        ended.append(len(queries))
    assert counts(firestore_client) == (0, 0)
    assert ended == [4] * 6  # the first end's, two per media type, found them right; the last end is alone


def test_a_jobs_end_is_written_where_its_recount_fails(firestore_client, monkeypatch):
    """The end's recount is a courtesy: count queries that fail (Firestore answering the write but not them) leave
    the end written, the counts as the usage doc had them less the job."""
    from google.api_core.exceptions import ServiceUnavailable

    from firegen_core import jobs

    monkeypatch.setattr(jobs, "_COUNTED_RIGHT", {})
    worker = WorkerJobs(firestore_client, worker_id="w", limits=Limits(max_running=2))
    first, second = (worker.claim(write_client_doc(firestore_client, f"unanswered-{i}")) for i in range(2))
    assert first and second and counts(firestore_client) == (2, 2)

    def unavailable(query, ends):
        raise ServiceUnavailable("count queries away")

    monkeypatch.setattr(jobs, "_count", unavailable)
    assert worker.complete(first, {"status": "completed", "generated": True}) == "completed"
    assert counts(firestore_client) == (1, 1)


def test_a_drift_after_an_end_found_the_counts_right_is_found_at_the_users_last_end(firestore_client, monkeypatch):
    """A diff review: an end that found the counts right kept the user's later ends from counting for 30 s, and a
    job written over meanwhile left its counts behind for good. The claim that finds its doc written over forgets
    that its user's counts were found right."""
    from firegen_core import jobs

    monkeypatch.setattr(jobs, "_COUNTED_RIGHT", {})
    worker = WorkerJobs(firestore_client, worker_id="w", retention_days=3, limits=Limits(max_running=2))
    a, b = write_client_doc(firestore_client, "a"), write_client_doc(firestore_client, "b")
    ja, jb = worker.claim(a), worker.claim(b)
    assert ja and jb and counts(firestore_client) == (2, 2)
    assert worker.complete(ja, {"status": "completed", "generated": True})  # counted: right
    firestore_client.document(b.path).set(client_doc())  # the function's setDoc over the running job
    assert not worker.complete(jb, {"status": "completed", "generated": True})  # fenced off
    again = worker.claim(b)
    assert again is not None and counts(firestore_client) == (2, 2)
    assert worker.complete(again, {"status": "completed", "generated": True})
    assert counts(firestore_client) == (0, 0) and "expire_at" in usage(firestore_client)


def test_a_job_admitted_between_an_ends_count_and_its_write_is_counted(firestore_client, monkeypatch):
    """An admission and a claim landing between the end's count queries and its commit: the end's batch fails the
    usage doc's precondition and decides again, and the counts stay exact (a diff review's race)."""
    from firegen_core import jobs

    monkeypatch.setattr(jobs, "_COUNTED_RIGHT", {})
    worker = WorkerJobs(firestore_client, worker_id="w", limits=Limits(max_running=3))
    other = WorkerJobs(firestore_client, worker_id="o", limits=Limits(max_running=3))
    a, b = write_client_doc(firestore_client, "ra"), write_client_doc(firestore_client, "rb")
    ja, jb = worker.claim(a), worker.claim(b)
    assert ja and jb and counts(firestore_client) == (2, 2)
    firestore_client.document(b.path).set(client_doc())  # b's counts left behind
    c = write_client_doc(firestore_client, "rc")
    real, landed = jobs.JobStore._counted, threading.Event()

    def counted(self, user_id, ends):
        result = real(self, user_id, ends)
        if not landed.is_set():
            landed.set()
            assert other.claim(c) is not None  # admitted and claimed after the count
        return result

    monkeypatch.setattr(jobs.JobStore, "_counted", counted)
    assert worker.complete(ja, {"status": "completed", "generated": True})
    assert landed.is_set() and counts(firestore_client) == (1, 1)  # c alone; b's doc is a new job, not admitted


def test_an_ends_count_that_hangs_takes_its_own_bound_and_leaves_the_commit_its_time(
    firestore_client, monkeypatch, caplog
):
    """A diff review: count queries that hung (Firestore answering gets and commits, not aggregations) took the
    end's whole CALL_TIMEOUT, leaving its commit a second. They take END_RECOUNT_SECONDS at most, and are said."""
    from google.api_core.exceptions import DeadlineExceeded

    from firegen_core import jobs

    monkeypatch.setattr(jobs, "_COUNTED_RIGHT", {})
    monkeypatch.setattr(jobs, "CALL_TIMEOUT", 4.0)
    monkeypatch.setattr(jobs, "END_RECOUNT_SECONDS", 0.5)
    worker = WorkerJobs(firestore_client, worker_id="w", limits=Limits(max_running=3))
    first, second = (worker.claim(write_client_doc(firestore_client, f"hung-{i}")) for i in range(2))
    assert first and second

    def hangs(query, ends):
        threading.Event().wait(max(ends - time.monotonic(), 0))
        raise DeadlineExceeded("count query hung")

    commits: list[float] = []
    real_bound = jobs.bound
    monkeypatch.setattr(jobs, "bound", lambda ends: commits.append(real_bound(ends)["timeout"]) or real_bound(ends))
    monkeypatch.setattr(jobs, "_count", hangs)
    started = time.monotonic()
    with caplog.at_level("INFO", logger=jobs.log.name):
        assert worker.complete(first, {"status": "completed", "generated": True}) == "completed"
    assert time.monotonic() - started < 2.5 and commits[-1] > 2.5, commits
    assert counts(firestore_client) == (1, 1) and "usage_recount_skipped" in caplog.text


def test_a_burst_at_a_wrong_limit_is_admitted_as_the_docs_allow(firestore_client):
    """The last review: the first request's recount marked the user for 30 s before it counted, so the requests
    beside it (one worker's runsync threads share its store) were refused on the stored count. Counts are only
    marked once found right; each racer counts, and the usage doc's precondition keeps the limit."""
    limits = Limits(max_pending=2)
    firestore_client.document(f"usage/{USER}").set({"pending": 2, "running": 0})  # left behind: no doc is live
    store = JobStore(firestore_client, limits=limits)
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda i: store.ensure_queued(request(f"burst-{i}")), range(4)))
    assert sorted(o.after["status"] for o in outcomes) == ["failed", "failed", "queued", "queued"]
    assert counts(firestore_client) == (0, 2)


def test_counts_found_right_are_not_counted_again_for_a_while(firestore_client, monkeypatch):
    """The last review: the functions make a store per call, so a user truly at USER_MAX_PENDING was recounted
    (four count queries) on every call: counts found right are remembered for the process."""
    from firegen_core import jobs

    limits = Limits(max_pending=1)
    assert JobStore(firestore_client, limits=limits).ensure_queued(request("only")).after["status"] == "queued"
    queries: list = []
    real = jobs._count
    monkeypatch.setattr(jobs, "_count", lambda query, ends: queries.append(query) or real(query, ends))
    for i in range(3):  # a store per call, as the callable makes them
        refused = JobStore(firestore_client, limits=limits).ensure_queued(request(f"more-{i}"))
        assert refused.after["error_type"] == "QuotaExceeded"
    assert len(queries) == 4  # the first call's two per media type, then none


def test_a_recount_never_raises_a_count(firestore_client, monkeypatch):
    """Mutation audit: a recount taking the docs' count where it is higher than the usage doc's went unseen."""
    from firegen_core import jobs

    monkeypatch.setattr(jobs, "_COUNTED_RIGHT", {})
    limits = Limits(max_running=1, max_pending=2)
    firestore_client.document(f"usage/{USER}").set({"pending": 2, "running": 0})
    ran = write_client_doc(firestore_client, "admin-run")
    firestore_client.document(ran.path).update({"status": "processing", "quota_admitted": True})
    assert JobStore(firestore_client, limits=limits).ensure_queued(request("new")).after["status"] == "queued"
    assert counts(firestore_client) == (0, 2)


def test_a_recount_overtaken_by_another_transition_says_nothing(firestore_client, monkeypatch, caplog):
    """Chaos audit: `usage_recounted` (a WARNING, README: counts left behind by a write of one's own) was logged
    for counts read just before another's transition landed: the usage doc had moved between its read and the
    count, nothing was left behind, and the recount was never written (its precondition failed)."""
    from firegen_core import jobs

    monkeypatch.setattr(jobs, "_COUNTED_RIGHT", {})
    store = JobStore(firestore_client, limits=Limits(max_pending=1))
    first = store.ensure_queued(request("overtaken-1")).after  # pending 1: at the limit
    real, ended = jobs._count, threading.Event()

    def ended_meanwhile(query, ends):
        if not ended.is_set():  # the first job ends, as a transition writes it: its doc and the counts together
            ended.set()
            batch = firestore_client.batch()
            batch.update(
                firestore_client.document(f"generations/{USER}/images/{first['file_uid']}"), {"status": "failed"}
            )
            batch.update(firestore_client.document(f"usage/{USER}"), {"pending": 0})
            batch.commit()
        return real(query, ends)

    monkeypatch.setattr(jobs, "_count", ended_meanwhile)
    with caplog.at_level("WARNING", logger=jobs.log.name):
        assert store.ensure_queued(request("overtaken-2")).after["status"] == "queued"
    assert ended.is_set() and counts(firestore_client) == (0, 1)
    assert "usage_recounted" not in caplog.text


def test_lowered_counts_are_written_where_the_job_is_still_refused(firestore_client, monkeypatch, caplog):
    """The review: a recount that still left the user at USER_MAX_PENDING refused the job, which counts for
    nothing, so the lowered counts were never written (counted again on every call) nor logged."""
    from firegen_core import jobs

    monkeypatch.setattr(jobs, "_COUNTED_RIGHT", {})
    store = JobStore(firestore_client, limits=Limits(max_pending=1))
    assert store.ensure_queued(request("live")).after["status"] == "queued"
    firestore_client.document(f"usage/{USER}").update({"pending": 3})  # left behind by writes of one's own
    with caplog.at_level("WARNING", logger=jobs.log.name):
        assert store.ensure_queued(request("past")).after["error_type"] == "QuotaExceeded"
    assert counts(firestore_client) == (0, 1)
    [recounted] = [record for record in caplog.records if record.getMessage() == "usage_recounted"]
    assert recounted.pending == [3, 1]


def test_a_restatement_refused_for_the_budget_after_a_run_is_not_told_it_failed_with_other_parameters(
    firestore_client,
):
    """The request whose own parameters were refused (its restatement past the daily budget, the job having run)
    is answered the refusal, as `resource-exhausted`: not "it failed with other parameters (...)", which reads as
    if an earlier run had failed, and the same request sent again answers the same."""
    key, limits = released_near_the_budget(firestore_client, "refused-restated")
    bigger = {"prompt": "a red car", "file_uid": "refused-restated", "width": 1024, "height": 1024}
    bigger["num_inference_steps"] = 35
    with pytest.raises(dispatch.CallError) as refused:
        dispatch.generate(firestore_client, nobody_listening(), uid=USER, data=bigger, limits=limits)
    after = doc(firestore_client, key)
    assert after["error_type"] == "QuotaExceeded" and after["error_message"].endswith(RAN_BEFORE), after
    assert (refused.value.code, refused.value.message) == ("resource-exhausted", after["error_message"])
    handler = RunsyncHandler(WorkerJobs(firestore_client, worker_id="w-api", limits=limits), submit=None)
    answer = handler.handle({**bigger, "user_id": USER, "use_cloud_storage": True})
    assert answer == {"error": after["error_message"], "status": "failed"}
