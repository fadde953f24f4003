"""The pure parts of issue #11's scheduling: the fair candidate queue, the job deadline, and the lifecycle's
cancel / release-limit decisions. No Firestore here (the emulator tests are test_fairness.py, test_cancel.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from firegen_core import lifecycle
from firegen_core.contract import parse_runsync_input
from firegen_core.deadline import Deadline, estimated_seconds
from firegen_core.quota import JOB_OVERHEAD_SECONDS
from listener.fairqueue import FairQueue, timestamp


def drain(queue: FairQueue) -> list:
    out = []
    while (key := queue.pop()) is not None:
        out.append(key)
    return out


# ---------------------------------------------------------------------------------------------- fair queue
def test_round_robin_across_users_oldest_first_within_one():
    queue = FairQueue()
    for i in range(4):
        queue.add(f"a{i}", "alice", 100 + i)
    for i in range(2):
        queue.add(f"b{i}", "bob", 200 + i)
    queue.add("c0", "carol", 300)
    assert drain(queue) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]


def test_a_deferred_candidate_keeps_its_place_and_is_handed_out_from_its_time():
    queue = FairQueue()
    soon = time.time() + 60
    queue.add("a0", "alice", 100, not_before=soon)
    queue.add("a1", "alice", 101)
    queue.add("b0", "bob", 200, not_before=soon)
    assert queue.ready_at() <= time.time()
    assert drain(queue) == ["a1"]  # alice's older job waits; her newer one needs no wait
    assert queue.ready_at() == soon and queue.pop() is None and len(queue) == 2
    queue.add("b0", "bob", 200)  # offered again without a wait (its runsync arrived): ready at once
    assert queue.pop() == "b0"
    queue.add("a0", "alice", 100, not_before=soon + 60)  # a later deferral never postpones it
    assert queue.ready_at() == soon


def test_a_new_user_goes_next_after_a_backlog_starts():
    """The issue's case: A queued 50, A's first runs, then B queues 1: B's is the next to start."""
    queue = FairQueue()
    for i in range(50):
        queue.add(f"a{i:02d}", "A", 1000 + i)
    assert queue.pop() == "a00"  # running
    queue.add("b", "B", 2000)  # newer than all of A's
    assert queue.pop() == "b"
    assert queue.pop() == "a01"


def test_users_are_not_served_in_uid_order():
    queue = FairQueue()
    queue.add("z-old", "zed", 1)
    queue.add("a-new", "aaron", 2)
    assert queue.pop() == "z-old"  # oldest first between users never served, whatever the uid


def test_first_entries_go_before_everything_and_a_key_is_held_once():
    queue = FairQueue()
    queue.add("a0", "A", 1)
    queue.add("b0", "B", 5)
    assert queue.add("a0", "A", 0) and len(queue) == 2  # already held: keeps its place
    queue.add("b0", "B", 5, first=True)  # a dead worker's job: first in line
    assert drain(queue) == ["b0", "a0"]


def test_removed_entries_are_never_handed_out():
    queue = FairQueue()
    for key in ("a0", "a1", "a2"):
        queue.add(key, "A", int(key[1]))
    queue.discard("a0")
    queue.discard("missing")
    assert drain(queue) == ["a1", "a2"] and queue.users() == 0


def test_bounded_whatever_the_backlog_and_the_biggest_user_makes_room():
    queue = FairQueue(capacity=10)
    for i in range(1000):
        queue.add(f"a{i:04d}", "A", i)
    assert len(queue) == 10
    assert queue.add("b", "B", 5000)  # another user's job still gets in: A's newest gives way
    assert len(queue) == 10 and "b" in queue and "a0009" not in queue
    assert drain(queue)[:3] == ["a0000", "b", "a0001"]


def test_a_full_queue_never_gives_up_an_older_job_for_a_newer_one_of_the_same_user():
    """Found by tests/test_fairqueue.py: the new entry was compared with the user's newest entry, a first (which
    never gives way) among them, so an older queued job was evicted to hold a newer one."""
    queue = FairQueue(capacity=3)
    queue.add("a-old", "A", 0)
    queue.add("a-first", "A", 9, first=True)  # a dead worker's job: never evicted
    queue.add("b", "B", 0)
    assert not queue.add("a-new", "A", 5)
    assert {"a-old", "a-first", "b"} == {key for key in ("a-old", "a-first", "b", "a-new") if key in queue}


def test_spread_picks_among_the_first_users_only():
    queue = FairQueue()
    for user in "ABCDE":
        queue.add(f"{user}0", user, ord(user))
    picks = {queue.pop(spread=2)}
    assert picks <= {"A0", "B0"}


def test_timestamps():
    when = datetime(2026, 1, 1, tzinfo=UTC)
    assert timestamp(when, 0) == when.timestamp() and timestamp(None, 7.0) == 7.0 and timestamp(3, 0) == 3.0


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        FairQueue(capacity=0)


# ---------------------------------------------------------------------------------------------- deadline
def test_deadline_is_a_multiple_of_the_estimate_with_a_floor():
    small = parse_runsync_input(
        {"use_cloud_storage": False, "prompt": "x", "width": 512, "height": 512, "num_inference_steps": 20}
    )
    big_video = parse_runsync_input(
        {"use_cloud_storage": False, "prompt": "x", "num_frames": 81, "num_inference_steps": 50}
    )
    policy = Deadline(floor_seconds=120, multiple=5)
    assert policy.seconds(small) == 120  # the estimate (~0.4 s) is far under the floor
    assert estimated_seconds(big_video) > 40
    assert policy.seconds(big_video) == pytest.approx(5 * estimated_seconds(big_video))
    assert policy.seconds(None) == 120
    with pytest.raises(ValueError):
        Deadline(floor_seconds=0)


def test_estimate_grows_with_the_work():
    base = {"use_cloud_storage": False, "prompt": "x", "width": 512, "height": 512, "num_inference_steps": 20}
    overhead = JOB_OVERHEAD_SECONDS
    one = estimated_seconds(parse_runsync_input(base)) - overhead
    four = estimated_seconds(parse_runsync_input({**base, "num_images_per_prompt": 4})) - overhead
    assert four == pytest.approx(4 * one, abs=0.005)
    bigger = estimated_seconds(parse_runsync_input({**base, "width": 1024, "height": 1024})) - overhead
    assert bigger == pytest.approx(4 * one, abs=0.005)


# ---------------------------------------------------------------------------------------------- lifecycle
NOW = datetime(2026, 1, 1, tzinfo=UTC)
QUEUED = {"status": "queued", "user_id": "u", "file_uid": "f", "attempts": 0}


def test_a_cancelled_queued_job_is_failed_instead_of_claimed():
    fields = lifecycle.claim({**QUEUED, "cancel_requested": True}, NOW, worker_id="w", lease_seconds=10, max_attempts=3)
    assert (fields["status"], fields["error_type"], fields["error_message"]) == (
        "failed",
        "Cancelled",
        "Cancelled by the user",
    )
    assert lifecycle.drop_cancelled({**QUEUED, "cancel_requested": True})["error_type"] == "Cancelled"
    assert lifecycle.drop_cancelled(QUEUED) is None


def test_cancel_decisions():
    assert lifecycle.cancel(QUEUED)["error_type"] == "Cancelled"
    running = {**QUEUED, "status": "processing", "worker_id": "w", "attempts": 1}
    assert lifecycle.cancel(running) == {"cancel_requested": True}
    assert lifecycle.cancel({**running, "cancel_requested": True}) is None
    assert lifecycle.cancel({**QUEUED, "status": "completed"}) is None
    assert lifecycle.cancel(None) is None


def test_a_completion_that_meets_a_cancel_fails_the_job():
    fields = {"status": "completed", "generated": True}
    assert lifecycle.completion({"status": "processing"}, fields) == fields
    assert lifecycle.completion({"status": "processing", "cancel_requested": True}, fields)["status"] == "failed"


def test_releases_are_counted_and_bounded():
    running = {"status": "processing", "worker_id": "w", "attempts": 1, "user_id": "u", "file_uid": "f"}
    first = lifecycle.counted_release(running, max_releases=2)
    assert (first["status"], first["releases"], first["attempts"]) == ("queued", 1, 0)
    second = lifecycle.counted_release({**running, "releases": 1}, max_releases=2)
    assert (second["status"], second["releases"]) == ("queued", 2)  # the last one allowed: queued, not failed
    third = lifecycle.counted_release({**running, "releases": 2}, max_releases=2)
    assert (third["status"], third["error_type"], third["releases"]) == ("failed", "Exception", 3)
    assert third["error_message"] == (
        "Generation stopped: its workers shut down before it ended 3 times; please try again"
    )
