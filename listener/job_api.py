"""RunPod's job API as the SDK's job loop asks it: paced while it fails.

The SDK's loop (runpod 1.12, `rp_scale.JobScaler.get_jobs`) asks again at once after a failed fetch: with the job
API out of reach, a worker spun a core and wrote ~2,600 `Failed to get job` lines a second (a review: 91,324 in
35 s). Here a failed fetch is said once (`runpod_job_api_unreachable`), waited out (1 s, doubling with each
failure in a row up to 30 s; cut short when the worker leaves, so a SIGTERM is not held up by it) and answered
"no job", which the SDK's loop takes as a reason to ask again. HTTP 429, which the SDK waits out itself, goes on
to it as it came.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

log = structlog.get_logger("listener")

FIRST_WAIT_SECONDS, MOST_WAIT_SECONDS = 1.0, 30.0
_TICK_SECONDS = 0.25  # how often a wait looks at `stopping`


def _unreachable(exc: BaseException) -> bool:
    """A connection that failed or an HTTP error answer; not the 429 the SDK waits out itself."""
    import aiohttp
    from runpod.http_client import TooManyRequests

    return isinstance(exc, aiohttp.ClientError | OSError) and not isinstance(exc, TooManyRequests)


class PacedFetch:
    """The SDK's `get_job`, paced: see the module's docstring. `failures`: in a row, across the SDK's calls."""

    def __init__(self, fetch: Callable[..., Awaitable[Any]], stopping: Callable[[], bool]):
        self.fetch, self.stopping = fetch, stopping
        self.failures = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            jobs = await self.fetch(*args, **kwargs)
        except Exception as exc:
            if not _unreachable(exc):
                raise
            self.failures += 1
            wait = min(MOST_WAIT_SECONDS, FIRST_WAIT_SECONDS * 2 ** (self.failures - 1))
            log.warning(
                "runpod_job_api_unreachable",
                error_type=type(exc).__name__,
                error=str(exc)[:300],
                failures=self.failures,
                retry_in_seconds=wait,
            )
            await self._wait(wait)
            return None
        self.failures = 0
        return jobs

    async def _wait(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while not self.stopping() and (left := until - loop.time()) > 0:
            await asyncio.sleep(min(_TICK_SECONDS, left))


def back_off_job_fetches(stopping: Callable[[], bool]) -> bool:
    """Puts a PacedFetch in the SDK's loop, where the SDK has the `rp_scale.get_job` this was written for (False
    where not: its own loop then runs as it is)."""
    from runpod.serverless.modules import rp_scale

    fetch = getattr(rp_scale, "get_job", None)
    if not callable(fetch) or isinstance(fetch, PacedFetch):
        return False
    rp_scale.get_job = PacedFetch(fetch, stopping)  # read by each JobScaler as it is built
    return True
