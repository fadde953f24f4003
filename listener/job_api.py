"""RunPod's job API as the SDK's job loop asks it: backed off while it fails.

The SDK's loop (runpod 1.12, `rp_scale.JobScaler.get_jobs`) asks again at once after a failed fetch: with the job
API out of reach, a worker spun a core and wrote ~2,600 `Failed to get job` lines a second (a review: 91,324 in
35 s). A fetch here retries its own failures, waiting from 1 s doubling to 30 s, one WARNING per wait. The SDK's
loop still bounds each fetch (90 s) and debounces HTTP 429 itself, which is let through.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential

log = structlog.get_logger("listener")

Fetch = Callable[..., Awaitable[Any]]
WAIT = wait_exponential(multiplier=1, min=1, max=30)


def _unreachable(exc: BaseException) -> bool:
    """A connection that failed or an HTTP error answer; not the 429 the SDK waits out itself."""
    import aiohttp
    from runpod.http_client import TooManyRequests

    return isinstance(exc, aiohttp.ClientError | OSError) and not isinstance(exc, TooManyRequests)


def _said(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else None
    log.warning(
        "runpod_job_api_unreachable",
        error_type=type(error).__name__,
        error=str(error)[:300],
        failures=state.attempt_number,
        retry_in_seconds=wait,
    )


def backed_off(fetch: Fetch, wait: Any = WAIT) -> Fetch:
    async def fetch_jobs(*args: Any, **kwargs: Any) -> Any:
        retrying = AsyncRetrying(retry=retry_if_exception(_unreachable), wait=wait, before_sleep=_said, reraise=True)
        return await retrying(fetch, *args, **kwargs)

    fetch_jobs.backed_off = True  # type: ignore[attr-defined]
    return fetch_jobs


def back_off_job_fetches() -> bool:
    """Puts `backed_off` in the SDK's loop where its internals are the ones this was written for (False where not:
    the SDK's own loop runs as it is)."""
    from runpod.serverless.modules import rp_scale

    fetch = getattr(rp_scale, "get_job", None)
    if not callable(fetch) or getattr(fetch, "backed_off", False):
        return False
    rp_scale.get_job = backed_off(fetch)  # read by each JobScaler as it is built
    return True
