"""scripts/backfill_expire_at.py on the real Firestore emulator: the upgrade audit found every doc an earlier
release finished without `expire_at`, so the TTL policy never deleted it while the bucket's rule deleted its files."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from firegen_core import quota

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "backfill_expire_at.py"
spec = importlib.util.spec_from_file_location("backfill_expire_at", SCRIPT)
backfill = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = backfill  # its dataclass looks its module up
spec.loader.exec_module(backfill)

FINISHED = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def old_doc(client, path: str, **fields) -> None:
    client.document(path).set({"prompt": "a cat", "generated": False, "error": False, **fields})


def test_finished_docs_without_expire_at_get_their_finish_plus_the_retention(firestore_client):
    done, failed = "generations/u1/images/done", "generations/u1/videos/failed"
    undated, queued, kept = (
        "generations/u2/images/undated",
        "generations/u2/images/queued",
        "generations/u2/images/kept",
    )
    old_doc(firestore_client, done, status="completed", completed_at=FINISHED)
    old_doc(firestore_client, failed, status="failed", failed_at=FINISHED + timedelta(hours=1))
    old_doc(firestore_client, undated, status="completed")  # no finish time: its last write stands in
    old_doc(firestore_client, queued, status="queued")
    old_doc(firestore_client, kept, status="completed", expire_at=FINISHED)
    # The app's own docs in collections of the same names are no jobs (a review: the TTL policy would delete them).
    firestore_client.document("products/p1/images/hero").set({"status": "completed"})

    dry = backfill.backfill(firestore_client, days=30, dry_run=True)
    assert (dry.finished, dry.missing, dry.written) == (4, 3, 0)
    assert "expire_at" not in firestore_client.document(done).get().to_dict()

    counts = backfill.backfill(firestore_client, days=30)
    assert (counts.finished, counts.missing, counts.written, counts.changed) == (4, 3, 3, 0)
    expiry = {path: firestore_client.document(path).get().to_dict().get("expire_at") for path in (done, failed, kept)}
    assert expiry == {
        done: FINISHED + timedelta(days=30),
        failed: FINISHED + timedelta(days=30, hours=1),
        kept: FINISHED,  # its own, untouched
    }
    written = firestore_client.document(undated).get()
    assert written.to_dict()["expire_at"] - timedelta(days=30) <= written.update_time
    assert "expire_at" not in firestore_client.document(queued).get().to_dict()
    assert backfill.backfill(firestore_client, days=30).missing == 0  # run again: nothing left to do
    assert "expire_at" not in firestore_client.document("products/p1/images/hero").get().to_dict()


def test_pages_through_more_docs_than_a_page(firestore_client, monkeypatch):
    monkeypatch.setattr(backfill, "PAGE", 2)
    for index in range(5):
        old_doc(firestore_client, f"generations/u{index}/images/j{index}", status="completed", completed_at=FINISHED)
    assert backfill.backfill(firestore_client, days=1).written == 5


def test_the_command_refuses_a_retention_that_is_not_a_number():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--project", "demo-none"],
        env={"RETENTION_DAYS": "abc", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "RETENTION_DAYS must be a number" in done.stderr
    assert "Traceback" not in done.stderr


def test_with_retention_off_the_command_still_dates_the_worker_docs(firestore_client, monkeypatch, capsys):
    """A review: RETENTION_DAYS=0 made it refuse before the worker docs, whose expiry does not depend on it."""
    from firegen_core import workers

    seen = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    firestore_client.collection(workers.WORKERS).document("crashed").set({workers.SEEN_AT: seen, "busy": 1})
    old_doc(firestore_client, "generations/u1/images/done", status="completed", completed_at=FINISHED)
    monkeypatch.setenv("RETENTION_DAYS", "0")
    assert backfill.main(["--project", firestore_client.project]) == 0
    assert capsys.readouterr().out.strip().splitlines()[1:] == [
        "RETENTION_DAYS=0 keeps finished job docs and usage docs for good: only worker docs are dated",
        "1 worker docs read, 1 without expire_at: 1 given one (its last beat + 7 days, + 1 once it left)",
    ]
    assert firestore_client.document(f"{workers.WORKERS}/crashed").get().get("expire_at") == seen + timedelta(days=7)
    assert "expire_at" not in firestore_client.document("generations/u1/images/done").get().to_dict()


def test_the_command_says_what_it_did(firestore_client, capsys):
    old_doc(firestore_client, "generations/u1/images/done", status="completed", completed_at=FINISHED)
    firestore_client.document("usage/u1").set({"running": 0, "pending": 0, "updated_at": FINISHED})
    firestore_client.document("usage/u2").set({"running": 0, "pending": 1, "updated_at": FINISHED})
    assert backfill.main(["--project", firestore_client.project, "--dry-run"]) == 0
    emulator = os.environ["FIRESTORE_EMULATOR_HOST"]
    first, *lines = capsys.readouterr().out.strip().splitlines()
    assert first == f"backfill_expire_at: project {firestore_client.project}, in the emulator at {emulator} (dry run)"
    assert lines == [
        "1 finished job docs read, 1 without expire_at: 1 would be given one (finish + 30 days)",
        "2 usage docs read, 1 without expire_at and counting no job: 1 would be given one (the midnight after its "
        "last write + 30 days); 1 left undated: they count jobs still pending or running (dated once those end; a "
        "count no job backs is set right at the user's next request at a limit)",
        "0 worker docs read, 0 without expire_at: 0 would be given one (its last beat + 7 days, + 1 once it left)",
    ]
    assert backfill.main(["--project", firestore_client.project]) == 0
    assert capsys.readouterr().out.strip().splitlines()[1:] == [
        "1 finished job docs read, 1 without expire_at: 1 given one (finish + 30 days)",
        "2 usage docs read, 1 without expire_at and counting no job: 1 given one (the midnight after its last write "
        "+ 30 days); 1 left undated: they count jobs still pending or running (dated once those end; a count no job "
        "backs is set right at the user's next request at a limit)",
        "0 worker docs read, 0 without expire_at: 0 given one (its last beat + 7 days, + 1 once it left)",
    ]


def test_usage_docs_of_users_with_nothing_pending_get_the_midnight_after_their_last_write_plus_the_retention(
    firestore_client,
):
    """Releases before 2026-12-05 never dated a usage doc: a user who never comes back (an anonymous uid of one
    browser) left it for good. A doc still counting jobs is left undated (gone, it would forget them)."""
    usage = firestore_client.collection("usage")
    usage.document("idle").set({"running": 0, "pending": 0, "spent_today": 4.2, "updated_at": FINISHED})
    usage.document("bare").set({"spent_today": 1.0})  # no counts, no time: its last write stands in
    usage.document("waiting").set({"running": 0, "pending": 2, "updated_at": FINISHED})
    usage.document("dated").set({"running": 0, "pending": 0, "expire_at": FINISHED})
    bare_written = usage.document("bare").get().update_time
    dry = backfill.backfill_usage(firestore_client, days=30, dry_run=True)
    assert (dry.finished, dry.missing, dry.written) == (4, 2, 0)
    counts = backfill.backfill_usage(firestore_client, days=30)
    assert (counts.finished, counts.missing, counts.written, counts.changed) == (4, 2, 2, 0)
    expiry = {name: usage.document(name).get().to_dict().get("expire_at") for name in ("idle", "waiting", "dated")}
    assert expiry == {"idle": datetime(2026, 12, 21, tzinfo=UTC), "waiting": None, "dated": FINISHED}
    bare = usage.document("bare").get().to_dict()
    assert bare["expire_at"] == quota.resets_at(bare_written) + timedelta(days=30)
    assert backfill.backfill_usage(firestore_client, days=30).missing == 0


def test_a_doc_changed_since_it_was_read_is_left_to_its_writer(firestore_client, monkeypatch):
    path = "generations/u1/images/moved"
    old_doc(firestore_client, path, status="completed", completed_at=FINISHED)
    real = backfill._finished_at

    def meanwhile(doc):
        firestore_client.document(path).update({"status": "queued"})  # a request restated it meanwhile
        return real(doc)

    monkeypatch.setattr(backfill, "_finished_at", meanwhile)
    counts = backfill.backfill(firestore_client, days=30)
    assert (counts.written, counts.changed) == (0, 1)
    assert "expire_at" not in firestore_client.document(path).get().to_dict()


def test_worker_docs_without_expire_at_get_their_last_beat_plus_a_week_or_a_day_once_left(firestore_client):
    """The operator-scripts review: releases of 2026-11-30 and 12-01 dated no worker's doc, and a worker that never
    stopped cleanly (each start a new id) left its doc for good."""
    from firegen_core import workers

    seen = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    docs = firestore_client.collection(workers.WORKERS)
    docs.document("crashed").set({workers.SEEN_AT: seen, "busy": 1})
    docs.document("left").set({workers.SEEN_AT: seen, workers.LEFT_AT: seen, "busy": 0})
    dated = seen + timedelta(days=3)
    docs.document("current").set({workers.SEEN_AT: seen, "expire_at": dated})
    assert backfill.backfill_workers(firestore_client, dry_run=True).written == 0
    assert "expire_at" not in docs.document("crashed").get().to_dict()
    counts = backfill.backfill_workers(firestore_client)
    assert (counts.finished, counts.missing, counts.written) == (3, 2, 2)
    assert docs.document("crashed").get().get("expire_at") == seen + timedelta(days=7)
    assert docs.document("left").get().get("expire_at") == seen + timedelta(days=1)
    assert docs.document("current").get().get("expire_at") == dated


def test_the_command_says_in_a_line_why_it_could_not_run(tmp_path):
    """An operator's review: no credentials, or Firestore away, ended in a traceback; now one line each, exit 2
    (nothing to run on) or 1 (run it again). Firestore away: an emulator address nothing listens on."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "none")}
    for more, code, said in [
        ({}, 2, "backfill_expire_at: no credentials: "),
        ({"FIRESTORE_EMULATOR_HOST": "127.0.0.1:1"}, 1, "backfill_expire_at: Firestore failed ("),
    ]:
        done = subprocess.run(
            [sys.executable, str(SCRIPT), "--project", "demo-none"],
            env={**env, **more},
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert done.returncode == code and said in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_command_exits_1_where_docs_were_not_written(firestore_client, monkeypatch, capsys):
    """A run whose writes failed said so in its line, and exited 0: automation never ran it again."""
    old_doc(firestore_client, "generations/u1/images/done", status="completed", completed_at=FINISHED)
    real = backfill.backfill

    def failing(client, **kwargs):
        counts = real(client, **kwargs)
        counts.failed, counts.written = counts.written, 0  # as a write Firestore refused counts it
        return counts

    monkeypatch.setattr(backfill, "backfill", failing)
    assert backfill.main(["--project", firestore_client.project]) == 1
    assert "1 not written (Firestore failing): run it again" in capsys.readouterr().out
