"""Fixtures and helpers for the scheduling tests (fairness, cancellation, deadlines, liveness): real workers
(Reconciler + JobRunner + ResultStore) on the Firestore and Storage emulators.

Import them by name (`from fixtures_scheduling import sched_worker, results, ...`). The generator is
test_reconciler's StubGenerator, on purpose: these tests are about the queue and the lifecycle, which a
stand-in that blocks on demand (and still reports progress at each "step") lets us drive deterministically;
the engine's own progress callback is tested with real tiny pipelines in test_generation.py.
"""

from __future__ import annotations

import threading

import pytest
from google.cloud.firestore import SERVER_TIMESTAMP
from test_reconciler import StubGenerator, results, started_reconcilers, wait_until

from firegen_core.claims import WorkerJobs
from firegen_core.deadline import Deadline
from firegen_core.jobs import JobKey
from listener.reconciler import Reconciler
from listener.runner import JobRunner

__all__ = ["StepGenerator", "StubGenerator", "finished", "queue_jobs", "read", "results", "sched_worker", "wait_until"]


class StepGenerator(StubGenerator):
    """StubGenerator that records when each job started (for waits measured in seconds)."""

    def __init__(self, gate: threading.Event | None = None):
        super().__init__(gate)
        self.started_at: dict[str, float] = {}

    def generate(self, request, progress=None):
        import time

        self.started_at[request.file_uid] = time.monotonic()
        return super().generate(request, progress)


@pytest.fixture
def sched_worker(firestore_client, results):
    with started_reconcilers() as start:

        def make(
            name="w1", generator=None, *, sweep=0.3, lease=30.0, capacity=1000, deadline=None, renew=None, **store
        ):
            job_store = WorkerJobs(firestore_client, worker_id=name, lease_seconds=lease, **store)
            runner = JobRunner(
                job_store, generator or StubGenerator(), results, deadline=deadline or Deadline(), renew_interval=renew
            )
            return start(Reconciler(job_store, runner, sweep_interval=sweep, capacity=capacity))

        yield make


def queue_jobs(client, keys: list[JobKey], **fields) -> None:
    """Queued docs as the contract's client sample writes them, in one batch (one server time for all)."""
    batch = client.batch()
    for key in keys:
        batch.set(
            client.document(key.path),
            {
                "status": "queued",
                "created_at": SERVER_TIMESTAMP,
                "prompt": "A red sports car",
                "generated": False,
                "error": False,
                **fields,
            },
        )
    batch.commit()


def read(client, key: JobKey) -> dict:
    return client.document(key.path).get().to_dict() or {}


def finished(client, key: JobKey) -> dict | None:
    data = read(client, key)
    return data if data.get("status") in ("completed", "failed") else None
