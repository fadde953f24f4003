"""The worker's start-up fitness check, before it claims anything: on RunPod's job loop through the RunPod SDK's own
fitness runner (after the SDK's GPU and system checks: a failure is reported to RunPod as unhealthy and ends the
process), elsewhere by itself; within FITNESS_CHECK_TIMEOUT_SECONDS (`startup.Deadline`). What it checks is
`listener.worker.Worker.fitness_check`: the device, Firestore and the results' bucket."""

from __future__ import annotations

import asyncio
from typing import Any

from .startup import Deadline, runpod_report


def check(worker, production: bool, timeout: float, start: Any) -> bool:
    """The start-up fitness checks (`_run`), which must end within `timeout` seconds; `start`: the start's own
    deadline, which this one's runs inside (its backstop no later than the start's)."""
    deadline = Deadline(
        timeout,
        event="fitness_check_failed",
        fields={
            "error_type": "FitnessCheckTimeout",
            "error": f"the start-up checks ran past {timeout:g} s (FITNESS_CHECK_TIMEOUT_SECONDS)",
        },
        exit_reason="fitness check failed: FitnessCheckTimeout",
        report=runpod_report("firegen_fitness_deadline") if production else None,
        outer=start,
    )
    try:
        return _run(worker, production, deadline)
    finally:
        deadline.done()


def _run(worker, production: bool, deadline: Any) -> bool:
    """The start-up fitness check, before the worker claims anything (run by the SDK, on RunPod's job loop, it
    came after the listeners had started, and a worker that could not write its results failed the queued docs it
    claimed meanwhile, at each restart: an audit saw 3 jobs failed). On RunPod's job loop it runs through the SDK's
    own runner, after the SDK's GPU and system checks (ours writes the worker's heartbeat doc, which a failure of
    theirs, ending the process with os._exit, would leave behind): a failure is reported to RunPod as unhealthy
    and ends the process there and then (the SDK's os._exit(1)). The SDK's `start` then has none left to run.
    False: unfit (elsewhere, or with an SDK that has no such runner)."""
    import structlog

    fitness: Any = None
    if production:
        from runpod.serverless.modules import rp_fitness

        fitness = rp_fitness
    names = ("register_fitness_check", "run_fitness_checks", "clear_fitness_checks")
    if fitness is not None and all(callable(getattr(fitness, name, None)) for name in names):

        def firegen_fitness_check() -> None:  # the name the SDK logs and reports
            try:
                worker.fitness_check()
            except Exception:
                deadline.done()  # the SDK's failure path ends the process: the deadline must not say it too
                # os._exit follows: no `finally` to say it
                structlog.get_logger("listener").error("worker_exit", code=1, reason=worker.failure)
                raise

        asyncio.run(fitness.run_fitness_checks())  # the SDK's own, registered by this first run
        fitness.clear_fitness_checks()
        fitness.register_fitness_check(firegen_fitness_check)
        asyncio.run(fitness.run_fitness_checks())
        fitness.clear_fitness_checks()
        # Its `start` runs them again (none are left; the SDK registers its own only once): where it does so by
        # this name, not even that, whatever a later SDK does with its registrations.
        from runpod.serverless import worker as sdk_worker

        if callable(getattr(sdk_worker, "run_fitness_checks", None)):
            sdk_worker.run_fitness_checks = _checked
        return True
    try:
        worker.fitness_check()
    except Exception:
        return False
    return True


async def _checked() -> None:
    """The fitness checks, run already (`check`)."""
