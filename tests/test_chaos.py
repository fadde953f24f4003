"""Chaos on the real emulators with real workers (`python -m listener`, reconciler only, tiny models).

- Three workers share two dozen client-written jobs; one of them is SIGKILLed (its whole process group) while it
  holds a job. Every job must complete exactly once: one completed doc each, exactly the deterministic Storage
  objects, one `job_completed` event per job across all the workers' logs, and the orphan taken over by another
  worker once its lease ran out.
- Then the Firestore emulator restarts under the two left (its data is gone: the jobs written after the restart
  are the ones to watch); the workers must reconnect by themselves and run them.

Short leases and sweeps (LEASE_SECONDS=3, SWEEP_INTERVAL_SECONDS=1) keep the file quick; every wait is a poll
with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import signal
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import tenacity
from google.api_core.exceptions import Cancelled, DeadlineExceeded, FailedPrecondition, ServiceUnavailable

from devtools import emulators as emu
from devtools.worker import WorkerProcess
from firegen_core.jobs import JobKey
from firegen_core.quota import MAX_DAILY_BUDGET

LEASE_SECONDS = 3.0
SWEEP_SECONDS = 1.0
# One user's many jobs, as a queue under load: the per-user limits (tested in test_quota.py) are lifted here.
SETTINGS = {
    "LEASE_SECONDS": str(LEASE_SECONDS),
    "SWEEP_INTERVAL_SECONDS": str(SWEEP_SECONDS),
    "USER_MAX_RUNNING": "1000",
    "USER_MAX_PENDING": "100000",
    "USER_DAILY_BUDGET": str(MAX_DAILY_BUDGET),
}
# Beyond lease + one sweep, a taken-over job may wait for one running job to end (the survivors are busy) and a
# few round trips on two shared cores; no more: it goes first in line, before anything queued since.
ROUND_TRIPS_SECONDS = 1.0
SMALL = {"prompt": "A red sports car on a mountain road", "num_inference_steps": 10}


@dataclass(frozen=True)
class Job:
    key: JobKey
    fields: dict

    @property
    def objects(self) -> list[str]:
        """The Storage objects the job must leave behind, by the deterministic naming of the design."""
        base = f"generating/{self.key.user_id}"
        if self.key.media_type == "videos":
            return [f"{base}/video/{self.key.file_uid}.mp4"]
        count = self.fields["num_images_per_prompt"]
        return [f"{base}/image/{self.key.file_uid}{f'_{i}' if i else ''}.png" for i in range(count)]


def make_jobs(user: str, prefix: str, images: int, videos: int) -> list[Job]:
    """Small jobs as a client writes them: images of 1-2 per prompt, videos with the sample's camelCase names."""
    jobs = [
        Job(
            JobKey(user, "images", f"{prefix}-img-{i:02d}"),
            {**SMALL, "width": 256, "height": 256, "num_images_per_prompt": 1 + i % 2},
        )
        for i in range(images)
    ]
    jobs += [
        Job(
            JobKey(user, "videos", f"{prefix}-vid-{i:02d}"),
            {**SMALL, "numFrames": 16, "videoWidth": 256, "videoHeight": 256},
        )
        for i in range(videos)
    ]
    return jobs


# The test's own reads and writes, tried again while a restarted emulator comes back (a CI run's call right after
# the restart was answered `Cancelled`, "call already cancelled"), as the workers' own are.
answered = tenacity.retry(
    retry=tenacity.retry_if_exception_type((Cancelled, DeadlineExceeded, ServiceUnavailable)),
    stop=tenacity.stop_after_delay(30),
    wait=tenacity.wait_fixed(0.2),
    reraise=True,
)


@answered
def write(client, jobs: list[Job]) -> None:
    """The queued docs, in one batch: every job lands at once, as from many clients at the same moment."""
    batch = client.batch()
    for job in jobs:
        batch.set(client.document(job.key.path), {**job.fields, "status": "queued", "generated": False, "error": False})
    batch.commit()


@answered
def docs(client, jobs: list[Job]) -> dict[JobKey, dict]:
    refs = [client.document(job.key.path) for job in jobs]
    return {JobKey.from_path(s.reference.path): s.to_dict() for s in client.get_all(refs) if s.exists}


def statuses(client, jobs: list[Job]) -> list[str]:
    found = docs(client, jobs)
    return [found.get(job.key, {}).get("status", "missing") for job in jobs]


@pytest.fixture
def built_tiny(tiny_cache) -> Path:
    """The session's FIREGEN_CACHE, both tiny pipelines built up front (not by three workers racing on two cores;
    most often another test here built them already)."""
    from generation import tiny

    for kind in tiny.KINDS:
        tiny.ensure(kind, tiny_cache)
    return tiny_cache


@contextlib.contextmanager
def workers(count: int, env: dict, log_dir: Path):
    """`count` reconciler-only workers, started in parallel; every one of them is stopped on the way out."""
    started = [WorkerProcess(log_dir / f"w{i}", env, serve_api=False, **SETTINGS) for i in range(count)]
    try:
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(WorkerProcess.start, started))
        yield started
    finally:
        for worker in started:
            worker.stop()


def events(worker: WorkerProcess, name: str) -> list[dict]:
    return [json.loads(line) for line in worker.events(name)]


def worker_id(worker: WorkerProcess) -> str:
    return events(worker, "worker_ready")[-1]["worker_id"]


def completions(workers_: list[WorkerProcess], jobs: list[Job]) -> dict[str, int]:
    """How many times each job's `job_completed` event appears, over all the given workers' logs."""
    counts = {job.key.file_uid: 0 for job in jobs}
    for worker in workers_:
        for event in events(worker, "job_completed"):
            if event["file_uid"] in counts:
                counts[event["file_uid"]] += 1
    return counts


def frozen(worker: WorkerProcess) -> bool:
    """Every thread of the worker is in the stopped state (SIGSTOP has taken effect, not only been sent)."""
    tasks = Path(f"/proc/{worker.pid}/task")
    return all((task / "stat").read_text().rsplit(") ", 1)[1][0] in "Tt" for task in tasks.iterdir())


def kill_while_holding(client, jobs: list[Job], by_id: dict[str, WorkerProcess]) -> tuple[WorkerProcess, JobKey]:
    """SIGKILL the process group of the first worker seen holding a job (early: the queue is still long).

    The holder is frozen first (SIGSTOP, until all its threads are stopped), then the doc is read again and
    touched with a compare-and-set write of a field of the test's own (`chaos_note`). Once that write lands, the
    frozen worker cannot complete the job: a completion it had in flight carries an older precondition and is
    refused. A worker that finished (or lost) the job before it was frozen is thawed and left alone.
    """
    chosen: list[tuple[WorkerProcess, JobKey]] = []

    def attempt() -> bool:
        held = [(key, data) for key, data in docs(client, jobs).items() if data.get("status") == "processing"]
        for key, data in held:
            worker = by_id[data["worker_id"]]
            worker.signal(signal.SIGSTOP)
            assert emu.wait_until(lambda: frozen(worker), 5, 0.005)
            snapshot = client.document(key.path).get()
            now = snapshot.to_dict() or {}
            if (now.get("status"), now.get("worker_id"), now.get("attempts")) == ("processing", data["worker_id"], 1):
                with contextlib.suppress(FailedPrecondition):
                    snapshot.reference.update(
                        {"chaos_note": "holder killed"},
                        option=client.write_option(last_update_time=snapshot.update_time),
                    )
                    worker.signal(signal.SIGKILL)
                    chosen.append((worker, key))
                    return True
            worker.signal(signal.SIGCONT)
        return False

    assert emu.wait_until(attempt, 60, 0.02), f"no worker was seen holding a job: {statuses(client, jobs)}"
    return chosen[0]


@pytest.fixture
def own_firestore(emulator_logs):
    """A Firestore emulator of this test's own, free to restart without disturbing the session's."""
    try:
        emulator = emu.FirestoreEmulator(emulator_logs)
    except emu.EmulatorUnavailable as e:
        pytest.skip(str(e))
    emulator.start()
    yield emulator
    emulator.stop()


def test_a_killed_worker_and_a_restarted_firestore_lose_nothing_and_double_nothing(
    own_firestore, storage_emulator, project_id, bucket, built_tiny, tmp_path
):
    """Both scenarios on one set of workers (their starts are most of this file's time): one killed mid-job
    first, then the Firestore emulator restarted under the two left."""
    env = {
        **emu.emulator_env(own_firestore, storage_emulator, project_id, bucket.name),
        "FIREGEN_CACHE": str(built_tiny),
    }
    with workers(3, env, tmp_path) as started:
        with emu.closing_firestore(own_firestore.client(project_id)) as client:
            survivors = kill_one_mid_job(client, bucket, started)
        restart_firestore_under(own_firestore, project_id, bucket, survivors)


def kill_one_mid_job(client, bucket, started: list[WorkerProcess]) -> list[WorkerProcess]:
    """Two dozen jobs; the first worker seen holding one is killed. Returns the workers left."""
    jobs = make_jobs("chaos-user", "kill", images=20, videos=4)
    by_id = {worker_id(worker): worker for worker in started}
    write(client, jobs)
    victim, orphan = kill_while_holding(client, jobs, by_id)
    assert victim.wait_exit(10) == -signal.SIGKILL
    survivors = [worker for worker in started if worker is not victim]

    overdue: list[float] = []  # how long past its lease's end each doc was seen still in processing

    def all_finished() -> bool:
        now = datetime.now(UTC)
        found = docs(client, jobs)
        overdue.extend(
            (now - data["lease_expires_at"]).total_seconds()
            for data in found.values()
            if data.get("status") == "processing"
        )
        return len(found) == len(jobs) and all(d["status"] in ("completed", "failed") for d in found.values())

    assert emu.wait_until(all_finished, 90, 0.1), statuses(client, jobs)
    assert all(worker.running for worker in survivors)
    # A job's `job_completed` line follows its doc's completion by moments.
    assert emu.wait_until(lambda: all(completions(started, jobs).values()), 10, 0.1), completions(started, jobs)

    # Nothing stayed in processing past its lease plus one sweep, and the time a survivor needs to free a slot.
    longest = max(event["seconds"] for worker in started for event in events(worker, "job_completed"))
    assert max(overdue, default=0.0) <= SWEEP_SECONDS + longest + ROUND_TRIPS_SECONDS, (max(overdue), longest)
    final = docs(client, jobs)
    assert sorted(data["status"] for data in final.values()) == ["completed"] * len(jobs)
    # The orphan: claimed a second time, by a survivor, once the victim's lease ran out.
    assert final[orphan]["attempts"] == 2 and final[orphan]["worker_id"] in set(by_id) - {worker_id(victim)}
    winner = by_id[final[orphan]["worker_id"]]
    assert [e["attempt"] for e in events(winner, "job_claimed") if e["file_uid"] == orphan.file_uid] == [2]
    # Each job completed once: one event over all the logs (the victim's too), and exactly its Storage objects.
    assert completions(started, jobs) == {job.key.file_uid: 1 for job in jobs}
    assert not any(events(worker, "job_lost") for worker in survivors)
    expected = sorted(name for job in jobs for name in job.objects)
    assert sorted(blob.name for blob in bucket.list_blobs()) == expected
    for job in jobs:
        urls = final[job.key].get("images") or final[job.key]["videos"]
        assert [urllib.parse.unquote(urllib.parse.urlsplit(url).path.split("/o/", 1)[1]) for url in urls] == job.objects
    return survivors


def restart_firestore_under(firestore, project_id: str, bucket, running: list[WorkerProcess]) -> None:
    """The emulator restarts mid-stream (its data gone: the jobs written after it are the ones to watch): the
    workers reconnect by themselves and run them, each once."""
    before = make_jobs("restart-user", "before", images=6, videos=1)
    after = make_jobs("restart-user", "after", images=6, videos=1)
    pids = [worker.pid for worker in running]
    with emu.closing_firestore(firestore.client(project_id)) as client:
        write(client, before)
        assert emu.wait_until(lambda: "processing" in statuses(client, before), 30, 0.02)
    firestore.restart()  # mid-stream: jobs running, queued and done are all gone with the data
    with emu.closing_firestore(firestore.client(project_id)) as client:
        write(client, after)
        assert emu.wait_until(lambda: statuses(client, after) == ["completed"] * len(after), 45, 0.2), statuses(
            client, after
        )
    assert [worker.pid for worker in running] == pids and all(worker.running for worker in running)
    # A job's `job_completed` line follows its doc's completion by moments: a CI run read the logs in between.
    assert emu.wait_until(lambda: all(completions(running, after).values()), 10, 0.1), completions(running, after)
    assert completions(running, after) == {job.key.file_uid: 1 for job in after}
    assert not any(events(worker, "job_runner_crashed") for worker in running)
    names = {blob.name for blob in bucket.list_blobs()}
    assert all(name in names for job in after for name in job.objects)
