"""The job state machine as pure decisions (no Firestore): guards and the exact fields each transition writes."""

from datetime import UTC, datetime, timedelta

import pytest
from google.cloud.firestore import DELETE_FIELD, SERVER_TIMESTAMP

from firegen_core import lifecycle
from firegen_core.errors import GenerationError
from firegen_core.lifecycle import Lease

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
CLAIM = dict(worker_id="w1", lease_seconds=60, max_attempts=3)


def processing(worker="w0", attempts=1, expires_in=30.0):
    return {
        "status": "processing",
        "worker_id": worker,
        "attempts": attempts,
        "lease_expires_at": NOW + timedelta(seconds=expires_in),
        "user_id": "u",
        "file_uid": "f",
    }


def test_claim_of_a_queued_doc():
    update = lifecycle.claim({"status": "queued"}, NOW, **CLAIM)
    assert update == {
        "status": "processing",
        "worker_id": "w1",
        "lease_expires_at": NOW + timedelta(seconds=60),
        "attempts": 1,
        "started_at": SERVER_TIMESTAMP,
        "modified": SERVER_TIMESTAMP,
        "progress": 0.0,
    }


@pytest.mark.parametrize("doc", [None, {"status": "completed"}, {"status": "failed"}, processing(expires_in=1)])
def test_nothing_else_is_claimable(doc):
    assert lifecycle.claim(doc, NOW, **CLAIM) is None


def test_an_expired_lease_is_claimable_and_counts_an_attempt():
    update = lifecycle.claim(processing(attempts=1, expires_in=-1), NOW, **CLAIM)
    assert (update["worker_id"], update["attempts"]) == ("w1", 2)


def test_a_processing_doc_without_a_lease_is_claimable():
    """A processing doc that carries no `lease_expires_at` (a claim whose lease field was lost or removed) has no
    owner whose lease runs: it must be taken over, not stuck processing for ever."""
    doc = {k: v for k, v in processing(attempts=1).items() if k != "lease_expires_at"}
    assert lifecycle.claimable(doc, NOW)
    update = lifecycle.claim(doc, NOW, **CLAIM)
    assert update is not None and (update["status"], update["worker_id"], update["attempts"]) == ("processing", "w1", 2)


def test_restated_tries_do_not_count_against_max_attempts():
    """README "restated": a try its request stopped (lifecycle.restate) is counted in `restated`, not against
    MAX_ATTEMPTS: a job restated as often as it was tried is claimed again, not failed."""
    restated = lifecycle.restate(processing(attempts=3), {"width": 256})
    assert restated is not None and (restated["status"], restated["restated"]) == ("queued", 1)
    doc = {"status": "queued", "attempts": 3, "restated": 1, "user_id": "u", "file_uid": "f"}
    update = lifecycle.claim(doc, NOW, **CLAIM)
    assert update is not None and update["status"] == "processing" and update["attempts"] == 4
    # Only the tries that were not restated count: 4 tries, 1 restated, are 3 attempts (max_attempts=3).
    update = lifecycle.claim(dict(doc, attempts=4), NOW, **CLAIM)
    assert update is not None and update["status"] == "failed"


def test_past_max_attempts_the_job_fails_instead():
    update = lifecycle.claim(processing(attempts=3, expires_in=-1), NOW, **CLAIM)
    assert update["status"] == "failed" and update["error"] is True and update["generated"] is False
    assert update["error_message"] == "Generation failed after 3 attempts: its worker stopped responding"
    assert update["error_type"] == "Exception" and (update["user_id"], update["file_uid"]) == ("u", "f")


def test_fencing_needs_status_worker_and_attempt():
    doc = processing(worker="w1", attempts=2)
    assert lifecycle.holds(doc, Lease("w1", 2))
    assert not lifecycle.holds(doc, Lease("w1", 1))
    assert not lifecycle.holds(doc, Lease("w2", 2))
    assert not lifecycle.holds(dict(doc, status="completed"), Lease("w1", 2))
    assert not lifecycle.holds(None, Lease("w1", 2))


@pytest.mark.parametrize(
    "doc, said",
    [
        (None, ("deleted", True)),
        ({"status": "queued", "attempts": 2, "restated": 1}, ("restated by its request", True)),
        ({"status": "failed", "attempts": 2, "error_type": "QuotaExceeded"}, ("refused with its request", True)),
        ({"status": "failed", "attempts": 2, "error_type": "ValidationError"}, ("refused with its request", True)),
        ({"status": "failed", "attempts": 2, "error_type": "Cancelled"}, ("cancelled", True)),
        ({"status": "queued", "created_at": 1}, ("written over", True)),  # deleted and written again
        ({"status": "processing", "worker_id": "w2", "attempts": 2}, ("written over", True)),  # an admin's write
        ({"status": "processing", "worker_id": "w2", "attempts": 3}, ("taken over by another worker", False)),
        ({"status": "completed", "worker_id": "w2", "attempts": 3}, ("completed by another", False)),
        ({"status": "failed", "worker_id": "w2", "attempts": 3, "error_type": "Timeout"}, ("failed by another", False)),
    ],
)
def test_why_a_claim_lost_its_job_and_whether_its_owner_did_it(doc, said):
    assert lifecycle.lost_to(doc, Lease("w1", 2)) == said


def test_release_gives_the_attempt_back():
    assert lifecycle.release(processing(attempts=2)) == {
        "status": "queued",
        "worker_id": DELETE_FIELD,
        "lease_expires_at": DELETE_FIELD,
        "progress": DELETE_FIELD,
        "attempts": 1,
        "modified": SERVER_TIMESTAMP,
    }


def test_renewal_clamps_progress():
    assert lifecycle.renewal(NOW, lease_seconds=10, progress=1.7)["progress"] == 1.0
    assert "progress" not in lifecycle.renewal(NOW, lease_seconds=10)


def test_success_fields_for_images_are_the_contracts():
    fields = lifecycle.success(
        task_type="text2image",
        user_id="user123",
        file_uid="file456",
        urls=["a.png", "b.png"],
        seed=1234567890,
        timings={"generation_seconds": 1.23456},
    )
    assert fields == {
        "generated": True,
        "error": False,
        "status": "completed",
        "completed_at": SERVER_TIMESTAMP,
        "modified": SERVER_TIMESTAMP,
        "images": ["a.png", "b.png"],
        "image_url": "a.png",
        "image_count": 2,
        "seed": 1234567890,
        "task_type": "text2image",
        "file_uid": "file456",
        "user_id": "user123",
        "progress": 1.0,
        "generation_seconds": 1.235,
    }


def test_success_fields_for_a_video_are_the_contracts():
    info = {"frames": 16, "fps": 8, "duration_seconds": 2.0, "width": 512, "height": 512}
    fields = lifecycle.success(
        task_type="text2video", user_id="u", file_uid="f", urls=["v.mp4"], seed=1, video_info=info
    )
    assert (fields["videos"], fields["video_url"], fields["video_info"]) == (["v.mp4"], "v.mp4", info)
    assert "images" not in fields and "image_url" not in fields


def test_no_partial_success():
    with pytest.raises(ValueError):
        lifecycle.success(task_type="text2image", user_id="u", file_uid="f", urls=[], seed=1)


def test_failure_fields_are_the_contracts():
    fields = lifecycle.failure(
        GenerationError("OutOfMemoryError", "Out of memory during generation"), user_id="user123", file_uid="file456"
    )
    assert fields == {
        "generated": False,
        "error": True,
        "status": "failed",
        "error_message": "Out of memory during generation",
        "error_type": "OutOfMemoryError",
        "failed_at": SERVER_TIMESTAMP,
        "modified": SERVER_TIMESTAMP,
        "user_id": "user123",
        "file_uid": "file456",
    }


def test_a_failure_message_is_at_most_300_characters():
    error = GenerationError("RuntimeError", "boom " * 1000)
    assert len(error.message) == 300 and error.message.endswith("…")
    error.message = "late " * 1000  # whoever changes it afterwards, the doc still gets a short one
    assert len(lifecycle.failure(error, user_id="u", file_uid="f")["error_message"]) == 300


def test_job_status_values_are_the_contracts_strings():
    assert [str(s) for s in lifecycle.JobStatus] == ["queued", "processing", "completed", "failed"]
    assert lifecycle.QUEUED == "queued" and {"status": lifecycle.FAILED} == {"status": "failed"}


# -- retention


def test_finished_docs_expire_after_the_retention_days():
    assert lifecycle.expiry(30, NOW) == {"expire_at": NOW + timedelta(days=30)}
    assert lifecycle.expiry(1.5, NOW) == {"expire_at": NOW + timedelta(hours=36)}
    assert lifecycle.expiry(0, NOW) == {}  # RETENTION_DAYS=0: kept for good
    # The job store stamps each write that ends a job by that write's server time (tests/test_jobs.py): no fields
    # built here carry a time of this host's clock, a job failed on claim (its worker kept dying) included.
    done = lifecycle.success(task_type="text2image", user_id="u", file_uid="f", urls=["a.png"], seed=1)
    failed = lifecycle.failure(GenerationError("Exception", "x"), user_id="u", file_uid="f")
    gave_up = lifecycle.claim(processing(attempts=3, expires_in=-1), NOW, **CLAIM)
    assert gave_up["status"] == "failed" and not any("expire_at" in fields for fields in (done, failed, gave_up))


@pytest.mark.parametrize("value", ["-1", "soon", "nan", "inf", "36501", "1e300"])
def test_a_wrong_retention_is_named(value):
    with pytest.raises(ValueError, match="^RETENTION_DAYS must be a number of days from 0 to 36500"):
        lifecycle.retention_days({"RETENTION_DAYS": value})


def test_retention_reads_its_variable_with_its_default():
    assert lifecycle.retention_days({}) == lifecycle.retention_days({"RETENTION_DAYS": " "}) == 30
    assert lifecycle.retention_days({"RETENTION_DAYS": "0"}) == 0
    assert lifecycle.retention_days({"RETENTION_DAYS": " 1.5 "}) == 1.5


def test_the_worker_validates_retention_at_start_up(monkeypatch):
    from listener.settings import Settings, SettingsError, load_settings

    assert Settings.model_fields["retention_days"].default == lifecycle.RETENTION_DAYS_DEFAULT
    monkeypatch.setenv("STORAGE_BUCKET", "bkt")
    monkeypatch.setenv("RETENTION_DAYS", "-1")
    with pytest.raises(SettingsError, match="^RETENTION_DAYS must be greater than or equal to 0"):
        load_settings()


@pytest.mark.parametrize(
    "doc,again",
    [
        # Refused at admission (never admitted nor run): its request's next try.
        ({"status": "failed", "error_type": "QuotaExceeded"}, True),
        # The contract refused it: a refused request's doc, or a client's doc its worker failed on reading it.
        ({"status": "failed", "error_type": "ValidationError"}, True),
        ({"status": "failed", "error_type": "ValidationError", "attempts": 1, "worker_id": "w1"}, True),
        # Ran, or may have: its answer stands.
        ({"status": "failed", "error_type": "QuotaExceeded", "attempts": 1}, False),
        # Admitted (its doc was valid), then failed by its request's refusal before it ran: refunded, so queued
        # and admitted again; after a worker ran it from the doc alone, charged, and its answer stands.
        ({"status": "failed", "error_type": "ValidationError", "quota_admitted": True}, True),
        ({"status": "failed", "error_type": "ValidationError", "quota_admitted": True, "attempts": 1}, False),
        ({"status": "failed", "error_type": "ValidationError", "quota_admitted": True, "releases": 1}, False),
        ({"status": "failed", "error_type": "OutOfMemoryError", "attempts": 1}, False),
        ({"status": "failed", "error_type": "Cancelled"}, False),
        ({"status": "completed"}, False),
        ({"status": "queued"}, False),
    ],
)
def test_a_refused_job_is_queued_again_by_its_next_request(doc, again):
    update = lifecycle.restate(doc, {"width": 256})
    assert lifecycle.refused(doc) is again
    if again:
        assert update is not None and (update["status"], update["error"], update["width"]) == ("queued", False, 256)
        gone = {"error_type", "error_message", "failed_at", "expire_at", "worker_id", "lease_expires_at", "progress"}
        gone |= {"quota_admitted", "dispatch_count", "dispatch_error"}  # a new try, not the refused one's dispatches
        assert {k for k, v in update.items() if v is DELETE_FIELD} >= gone
    else:
        assert update is None or update.get("status") != "queued" or doc["status"] == "queued"


def test_a_completion_removes_a_stale_dispatch_error():
    """The chaos audit: completed docs kept "RunPod did not answer after 3 attempt(s)..." from a dispatch that
    failed while the worker restarted, though a worker had completed them since."""
    fields = {"status": "completed", "generated": True}
    assert lifecycle.completion({"status": "processing", "dispatch_error": "x"}, fields) == {
        **fields,
        "dispatch_error": DELETE_FIELD,
    }
    assert lifecycle.completion({"status": "processing"}, fields) == fields
    assert lifecycle.completion({"status": "processing", "cancel_requested": True}, fields)["status"] == "failed"


def test_the_request_that_queues_a_refused_job_again_replaces_its_request_fields():
    """The day's review: a fixed request that leaves out the field the refused doc broke the contract with (or
    its `use_cloud_storage: false`) queued the doc again still broken: never admitted, failed again, while the
    callable answered "accepted" and dispatched it each time. The request now replaces the doc's request."""
    doc = {
        "status": "failed",
        "error_type": "ValidationError",
        "prompt": "a cat",
        "width": 2000,
        "numFrames": 16,
        "use_cloud_storage": False,
        "app_tag": "kept",
        "cancel_requested": True,
    }
    stated = {"prompt": "a cat", "height": 256}
    update = lifecycle.restate(doc, {"height": 256}, stated)
    assert update is not None and (update["status"], update["prompt"], update["height"]) == ("queued", "a cat", 256)
    deleted = {k for k, v in update.items() if v is DELETE_FIELD}
    assert {"width", "numFrames", "use_cloud_storage", "cancel_requested", "quota_admitted"} <= deleted
    assert "app_tag" not in update  # an app's own metadata is no request field


@pytest.mark.parametrize(
    ("doc", "over"),
    [
        (None, True),  # deleted
        ({"status": "queued", "prompt": "a cat"}, True),  # written over: no attempts
        ({"status": "processing", "attempts": 2, "worker_id": "other"}, True),  # written over, claimed anew
        ({"status": "processing", "attempts": 1, "worker_id": "other"}, True),
        ({"status": "processing", "attempts": 2, "worker_id": "w"}, False),  # held
        ({"status": "queued", "attempts": 2}, False),  # restated or released: the attempt kept, no worker
        ({"status": "completed", "attempts": 2, "worker_id": "w"}, False),  # ended by this claim
        ({"status": "processing", "attempts": 3, "worker_id": "other"}, False),  # taken over
    ],
)
def test_a_claim_tells_its_doc_written_over_from_its_transitions(doc, over):
    assert lifecycle.written_over(doc, Lease("w", 2)) is over
