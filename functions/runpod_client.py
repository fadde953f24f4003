"""One runsync call to the RunPod worker, with bounded retries, read as a verdict on the job.

RunPod wraps the worker's answer in an envelope:
    {"id", "status": "COMPLETED", "output": {"status": "accepted", ...}}   the worker took the job
    {"id", "status": "FAILED", "error": "<the contract's message>"}       the worker refused the request
    {"id", "status": "IN_QUEUE" | "IN_PROGRESS"}                          no worker answered within runsync's
                                                                          wait (cold start): the job is queued
The worker's own answers, unwrapped, as the contract prints them (a gateway or a stand-in for RunPod in front of the
worker): {"status": "accepted", ...} (HTTP 200) takes the job, {"error", "status": "failed"} (HTTP 200 or 400)
refuses it.
Failures to connect, connect timeouts, HTTP 5xx and 429 are retried (a few attempts, short exponential waits, one
overall deadline): the worker is idempotent by file_uid, so sending the same job twice is safe. A request sent
but not answered in time (a read timeout: RunPod holds runsync open during a cold start), whose connection
dropped once it was sent, or whose answer broke off or stalled after its status line, is QUEUED, not sent again:
each send would be one more RunPod job, and RunPod starts workers for its queue. Whatever still fails is
UNDELIVERED: the caller leaves the Firestore doc queued, where a warm worker's listener or the scheduled
re-dispatch will still find it.

The API key goes only into the Authorization header. No message built here contains it (they are scrubbed
once more before they leave, in case a library ever echoes a header).
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import requests
import urllib3
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
)

from firegen_core.errors import NOT_RECORDED_PREFIX

log = logging.getLogger("functions.runpod")

RUNPOD_RUNSYNC_URL = "https://api.runpod.ai/v2/{endpoint_id}/runsync"

ACCEPTED = "accepted"  # the worker took the job and answered with the contract's accepted JSON
QUEUED = "queued"  # RunPod queued the job (IN_QUEUE / IN_PROGRESS): a worker is starting
REJECTED = "rejected"  # the worker refused the request: `message` is the contract's error message
UNDELIVERED = "undelivered"  # nobody answered usefully (down, timeouts, 5xx, bad key, ...)

# A worker answers with this when it could not write the job's doc (Firestore unreachable): a transient
# failure of the worker, not a verdict on the request (listener/handler.py).
WORKER_TRANSIENT_PREFIXES = (NOT_RECORDED_PREFIX,)
# The functions send only fields their own contract knows (dispatch.runsync_input): a worker that calls one unknown
# runs another deploy's contract (functions deployed before the workers' rollout ended: README, Upgrading). No
# verdict on the user's request: the job waits queued for a worker of this deploy (the sweep dispatches it again).
OLDER_WORKER_PREFIX = "Validation failed: unknown field '"


@dataclass(frozen=True)
class Verdict:
    outcome: str
    message: str
    job_id: str | None = None
    attempts: int = 1
    http_status: int | None = None  # RunPod's refusal of the call itself (401/403: the key; 404: the endpoint)

    @property
    def delivered(self) -> bool:
        return self.outcome in (ACCEPTED, QUEUED)


class _Transient(Exception):
    """An attempt that may succeed if repeated."""


def runsync_url(endpoint_id: str, override: str | None = None) -> str:
    if override:
        return override
    if not endpoint_id:
        raise ValueError("RUNPOD_ENDPOINT_ID is not set (and no RUNPOD_RUNSYNC_URL override)")
    return RUNPOD_RUNSYNC_URL.format(endpoint_id=endpoint_id)


class RunPodClient:
    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        attempts: int = 3,
        timeout: float = 20.0,
        connect_timeout: float = 5.0,
        deadline: float = 50.0,
        wait_initial: float = 0.5,
        wait_max: float = 4.0,
        session: requests.Session | None = None,
    ):
        self.url = url
        # A secret set with `echo $KEY | firebase functions:secrets:set` ends in a newline, which no HTTP header
        # may hold: every dispatch would fail "InvalidHeader".
        self._api_key = api_key.strip()
        self.attempts = max(1, attempts)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.deadline = deadline
        self.wait_initial = wait_initial
        self.wait_max = wait_max
        self.session = session or requests.Session()

    def __enter__(self) -> RunPodClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.session.close()  # its pooled connections, not left to the garbage collector of a warm instance

    def __repr__(self) -> str:  # never the key
        return f"<RunPodClient {self.url} attempts={self.attempts}>"

    def scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    # ------------------------------------------------------------------------------------------------ call
    def runsync(self, job_input: Mapping[str, Any]) -> Verdict:
        """POST {"input": job_input} to runsync and read the answer. Never raises for transport problems."""
        started = time.monotonic()
        retrying = Retrying(
            # Before, not after: the wait before the next attempt counts, so none starts past the deadline.
            stop=stop_after_attempt(self.attempts) | stop_before_delay(self.deadline),
            wait=wait_exponential(multiplier=self.wait_initial, max=self.wait_max),
            retry=retry_if_exception_type(_Transient),
            reraise=False,
        )
        tries = 0
        try:
            for attempt in retrying:
                with attempt:
                    tries = attempt.retry_state.attempt_number
                    remaining = max(self.deadline - (time.monotonic() - started), 1.0)
                    verdict = self._once(job_input, min(self.timeout, remaining))
        except RetryError as exc:
            last = exc.last_attempt.exception()
            message = self.scrub(f"RunPod did not answer after {tries} attempt(s): {last}")
            log.warning("runsync_undelivered", extra={"attempts": tries, "error": message})
            return Verdict(UNDELIVERED, message, attempts=tries)
        return replace(verdict, message=self.scrub(verdict.message), attempts=tries)

    def _once(self, job_input: Mapping[str, Any], timeout: float) -> Verdict:
        headers = {"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json"}
        try:
            # The status line and headers alone (`stream`): a body that breaks off or stalls after them is read
            # apart (`_unread`), as an answer RunPod gave, not a request that never arrived.
            response = self.session.post(
                self.url,
                json={"input": dict(job_input)},
                headers=headers,
                timeout=(self.connect_timeout, timeout),
                stream=True,
            )
        except requests.ConnectTimeout as exc:  # never reached RunPod: safe to send again
            raise _Transient(f"timed out ({type(exc).__name__})") from None
        except requests.Timeout:
            # Sent, and RunPod holds runsync open while no worker is ready (a cold start): the job is in its
            # queue. Sending it again would queue a second RunPod job for it, and RunPod scales on its queue.
            return Verdict(
                QUEUED, f"RunPod took the job but did not answer within {timeout:g} s (a worker is starting)"
            )
        except requests.ConnectionError as exc:
            if _sent(exc):
                # The connection dropped once the request was on its way: RunPod may hold the job, and sending it
                # again would queue one more RunPod job for it (audit: 3 POSTs of one job, each read in full).
                return Verdict(QUEUED, "the connection to RunPod dropped after the job was sent; it may be queued")
            raise _Transient(f"connection failed ({type(exc).__name__})") from None
        except requests.RequestException as exc:  # a malformed URL, say: repeating will not help
            return Verdict(UNDELIVERED, f"the request to RunPod failed ({type(exc).__name__})")
        with response:  # its connection back to the pool, or closed where its body broke off
            return self._read(response)

    def _read(self, response: requests.Response) -> Verdict:
        status = response.status_code
        if status >= 500 or status == 429:
            raise _Transient(f"HTTP {status}")
        # Its body, but for a 4xx other than 400, which its status says all of.
        if status <= 400 and (broken := _unread(response)) is not None:
            if status == 400:  # a refusal (RunPod's or the worker's) that could not be read: nothing was queued
                return Verdict(UNDELIVERED, f"RunPod answered HTTP 400 and its answer broke off ({broken})")
            return Verdict(QUEUED, f"RunPod's answer broke off after the job was sent ({broken}); it may be queued")
        if status == 400 and (refusal := _contract_refusal(response)) is not None:
            return refusal
        if status >= 400:
            # 401/403: a wrong API key; 404: a wrong endpoint id. Repeating will not help.
            hint = {401: "RUNPOD_API_KEY", 403: "RUNPOD_API_KEY", 404: "RUNPOD_ENDPOINT_ID"}.get(status)
            said = f"RunPod refused the call: HTTP {status}" + (f" (check {hint})" if hint else "")
            return Verdict(UNDELIVERED, said, http_status=status)
        try:
            envelope = response.json()
        except ValueError:
            return Verdict(UNDELIVERED, f"RunPod answered HTTP {status} with a body that is not JSON")
        return read_envelope(envelope)


def _unread(response: requests.Response) -> str | None:
    """Read the answer's body: None once read, else what broke it off (the connection closed mid-body, or it
    stalled past the read timeout). Such an answer came after RunPod had the request: a 2xx one is QUEUED, never
    sent again (a review: counted undelivered, the job was POSTed again, up to 3 times a call, and a client's retry
    with other parameters was put back by the first request's late arrival at a worker)."""
    try:
        response.content  # noqa: B018 (read here, where a failure has a meaning of its own)
    except requests.RequestException as exc:
        return type(exc).__name__
    return None


def _sent(exc: BaseException) -> bool:
    """Whether a connection error came once the request was on its way (reset or closed while it was sent or its
    answer awaited), rather than while connecting (refused, DNS, the TLS handshake). urllib3 wraps any OSError of
    the call in ProtocolError ("Connection aborted"), a reset in the TLS handshake too (the review's case): the
    error's own traceback says whether it came from inside urllib3's connection's `connect`."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    aborted = connecting = False
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        aborted = aborted or isinstance(error, urllib3.exceptions.ProtocolError)
        frames = traceback.extract_tb(error.__traceback__)
        connecting = connecting or any(frame.name == "connect" and "urllib3" in frame.filename for frame in frames)
        if isinstance(error, urllib3.exceptions.MaxRetryError) and isinstance(error.reason, BaseException):
            pending.append(error.reason)
        pending += [arg for arg in error.args if isinstance(arg, BaseException)]
        pending += [cause for cause in (error.__cause__, error.__context__) if cause is not None]
    return aborted and not connecting


def read_envelope(envelope: Any) -> Verdict:
    """RunPod's runsync envelope → a verdict (see the module docstring)."""
    if not isinstance(envelope, Mapping):
        return Verdict(UNDELIVERED, "RunPod answered with something other than a JSON object")
    job_id = envelope.get("id")
    status = str(envelope.get("status", "")).upper()
    if status == "COMPLETED":
        output = envelope.get("output")
        if isinstance(output, Mapping) and output.get("status") == "accepted":
            return Verdict(ACCEPTED, str(output.get("message") or "accepted"), job_id)
        if isinstance(output, Mapping) and output.get("error"):
            return _refusal(output["error"], job_id)
        return Verdict(UNDELIVERED, "the worker answered without accepting or refusing the job", job_id)
    if status == "FAILED":  # RunPod's, or the contract's own {"error", "status": "failed"}
        return _refusal(envelope.get("error"), job_id)
    if envelope.get("status") == "accepted":  # the contract's own answer, unwrapped
        return Verdict(ACCEPTED, str(envelope.get("message") or "accepted"), job_id)
    if status in ("IN_QUEUE", "IN_PROGRESS"):
        return Verdict(QUEUED, f"RunPod queued the job ({status})", job_id)
    return Verdict(UNDELIVERED, f"RunPod answered with status {status or 'none'}", job_id)


def _contract_refusal(response: requests.Response) -> Verdict | None:
    """An HTTP 400 whose body is the contract's own refusal ({"error": "<message>", "status": "failed"}): the
    request's verdict, not a call RunPod refused."""
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, Mapping) and body.get("status") == "failed" and isinstance(body.get("error"), str):
        return _refusal(body["error"], None)
    return None


def _refusal(error: Any, job_id: str | None) -> Verdict:
    """A FAILED job: the worker's own refusal (a contract message), or a crash the SDK reported for it."""
    if isinstance(error, str):
        try:
            crash = json.loads(error)
        except ValueError:
            crash = None
        if isinstance(crash, Mapping) and "error_type" in crash:
            # The RunPod SDK's report of an exception raised in the handler: a worker bug or outage, not a
            # verdict on the request; its traceback stays in the worker's log.
            return Verdict(UNDELIVERED, "the worker failed while taking the job", job_id)
        if error.startswith(WORKER_TRANSIENT_PREFIXES):
            return Verdict(UNDELIVERED, error, job_id)
        if error.startswith(OLDER_WORKER_PREFIX):
            log.warning("worker_behind", extra={"refused": error, "runpod_job_id": job_id})
            behind = (
                f"a worker of another deploy refused the job ({error}): deploy the workers first, then the functions"
            )
            return Verdict(UNDELIVERED, behind, job_id)
        return Verdict(REJECTED, error, job_id)
    return Verdict(UNDELIVERED, "RunPod reported the job failed without a message", job_id)
