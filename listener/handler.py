"""The runsync handler: validate, make sure the job's doc is queued, hand it to the local slot, answer at once.

Generation never runs on the request path for `use_cloud_storage: true`; the handler only does one Firestore
compare-and-set (the doc's creation, with its admission against the user's limits). Idempotent by file_uid: the
doc is created only when absent. An existing live doc takes the parameters the request gives (the contract's own
function flow writes the doc with the prompt, then sends the parameters here); a finished one decides the answer
(a failed job answers with its recorded error, a completed one that ran with other parameters says so; a new
file_uid is a new try), but for a job its user's limits refused, which its request's next try queues again
(`lifecycle.restate`) to be admitted, or refused again. A cold worker answers a request for the model it still loads
once that model is loaded (`_held_for_its_model`).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from firegen_core import lifecycle
from firegen_core.claims import WorkerJobs
from firegen_core.contract import (
    PARAMETER_FIELDS,
    ContractError,
    GenerationRequest,
    check_id,
    clip,
    finished_otherwise,
    media_type_of,
    normalise_document_fields,
    parse_runsync_input,
    restatement,
)
from firegen_core.dispatches import dispatched
from firegen_core.errors import (
    DELETED_MESSAGE,
    EXCEPTION,
    NOT_RECORDED,
    RUNTIME_ERROR,
    VALIDATION_ERROR,
    GenerationError,
    Interrupted,
    classify,
    failure_level,
)
from firegen_core.jobs import ANSWER_TIMEOUT, JobKey, Misfiled, stated_request
from firegen_core.lifecycle import Lease

log = structlog.get_logger("listener.handler")

ACCEPTED_MESSAGE = "Generation task accepted and processing"
# How often an answer held for its model's load (`_held_for_its_model`) looks whether it may go.
LOAD_WAIT_SLICE_SECONDS = 0.5
INLINE_LIMIT_BYTES = 20 * 1024 * 1024  # RunPod's response size limit


def accepted(request: GenerationRequest) -> dict[str, Any]:
    return {
        "status": "accepted",
        "message": ACCEPTED_MESSAGE,
        "user_id": request.user_id,
        "file_uid": request.file_uid,
        "task_type": request.task_type,
    }


# The id the RunPod SDK gives every `--test_input` run (runpod/serverless/modules/rp_local.py): many requests'.
LOCAL_TEST_ID = "local_test"


def rejected(message: str) -> dict[str, Any]:
    return {"error": message, "status": "failed"}


def _named(data: Any) -> dict[str, str]:
    """The ids a refused input names, where they are strings (cut short: they are unchecked)."""
    if not isinstance(data, dict):
        return {}
    return {name: clip(data[name], 128) for name in ("user_id", "file_uid") if isinstance(data.get(name), str)}


class RunsyncHandler:
    def __init__(
        self,
        store: WorkerJobs,
        submit: Callable[[JobKey, GenerationRequest, str | None, object], None],
        generator=None,
        preempt: Callable[[JobKey, Lease], None] | None = None,
        leaving: Callable[[], bool] | None = None,
    ):
        self.store = store
        self.submit = submit
        self.generator = generator
        self.preempt = preempt  # stops a local run of a claim this request's restatement ended
        self.leaving = leaving  # the worker is shutting down: an answer held for a model's load goes now

    async def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        # The SDK awaits handlers on its event loop: the Firestore round trip goes to a thread so that
        # concurrent requests overlap instead of queueing behind each other. Every log line of the request
        # carries RunPod's job id as `requestId` (the context goes along to the thread).
        request_id = job.get("id")
        with structlog.contextvars.bound_contextvars(**({"requestId": request_id} if request_id else {})):
            # The id of one RunPod job only (a request of that id again is its redelivery): not the SDK's.
            job_id = None if request_id == LOCAL_TEST_ID else request_id
            stop = threading.Event()
            try:
                answer = await asyncio.to_thread(self.handle, job.get("input"), job_id, stop)
                await self._held_for_its_model(answer)
                return answer
            except asyncio.CancelledError:
                # RunPod stopped the request (its execution timeout, a cancel): the SDK cancels this task, which
                # leaves the thread running; an inline generation stops at its next step (a review: a timed-out
                # video ran to its end for nobody, holding the model from the queue's jobs).
                stop.set()
                raise

    def handle(self, data: Any, request_id: str | None = None, stop: threading.Event | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        answer_by = time.monotonic() + ANSWER_TIMEOUT  # Firestore's part of the answer, whatever it is
        try:
            request = parse_runsync_input(data)
        except ContractError as exc:
            log.info("request_rejected", error=exc.message, **_named(data))
            self._fail_awaiting(data, exc.message, answer_by)
            return rejected(exc.message)
        if not request.use_cloud_storage:
            return self.inline(request, stop)
        key = JobKey.of(request)
        try:
            request, outcome = self.store.accept(request, data, request_id, answer_by)
            key = JobKey.of(request)
        except Misfiled as exc:
            log.info("request_rejected", error=exc.message, **_named(data))
            self._fail_awaiting(data, exc.message, answer_by, exc.key)
            return rejected(exc.message)
        except Exception as exc:
            log.error("request_not_recorded", user_id=key.user_id, file_uid=key.file_uid, error=str(exc))
            return rejected(NOT_RECORDED)
        if outcome.displaced is not None and self.preempt is not None:
            self.preempt(key, outcome.displaced)
        if outcome.ended_after_a_run and self.store.on_ended_after_run is not None:
            self.store.on_ended_after_run(key)  # a queued job an earlier try ran, cancelled by this restatement
        doc = outcome.after
        if not doc:  # nothing created: a late dispatch of a job its owner deleted (dispatches.tombstone)
            log.info("request_refused", user_id=key.user_id, file_uid=key.file_uid, deleted=True)
            return rejected(DELETED_MESSAGE)
        status = doc.get("status")
        if status == lifecycle.FAILED:
            log.info("request_refused", user_id=key.user_id, file_uid=key.file_uid, error_type=doc.get("error_type"))
            return rejected(lifecycle.recorded_error(doc, restatement(doc, request)))
        if dispatched(outcome.before, request, request_id):
            # The functions' dispatch of this doc, perhaps from before a later call restated it: a wake-up. The job
            # runs as its doc now states it (the runner reads the doc it claims), whatever this input says.
            if status == lifecycle.QUEUED:
                self.submit(key, stated_request(key, doc) or request, request_id, doc.get("created_at"))
            log.info("request_accepted", user_id=key.user_id, file_uid=key.file_uid, status=status, dispatch=True)
            return accepted(request)
        if lifecycle.being_cancelled(doc):
            # Running, its owner's cancel pending (a queued one ended cancelled at `restate`, above): it ends at its
            # worker's next step, whatever this request says. Accepted, since the worker updates its doc: answered
            # failed, the contract's function would fail the doc itself, under the run that writes `Cancelled`.
            log.info("request_accepted", user_id=key.user_id, file_uid=key.file_uid, status=status, cancelling=True)
            return accepted(request)
        changes = restatement(doc, request)
        if changes:  # a finished job (a live one took the request's parameters)
            log.info("request_refused", user_id=key.user_id, file_uid=key.file_uid, finished_otherwise=sorted(changes))
            return rejected(finished_otherwise(request, changes).message)
        if status == lifecycle.QUEUED:
            # The request: which batch it may join; its id: the job's logs; its doc's age: its place in line.
            self.submit(key, request, request_id, doc.get("created_at"))
        restated = sorted(PARAMETER_FIELDS & (outcome.written or {}).keys()) if outcome.before is not None else []
        log.info(
            "request_accepted",
            user_id=key.user_id,
            file_uid=key.file_uid,
            status=status,
            **({"restated": restated} if restated else {}),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return accepted(request)

    async def _held_for_its_model(self, answer: dict[str, Any]) -> None:
        """A cold worker loads its second model once it is ready (`Engine.preload_later`; the first is the image
        model, or the video model where only video jobs wait), and leaves that model's jobs queued until then: an
        accepted request for one is answered once the load has ended. RunPod counts a worker whose requests are all
        answered as idle, and stops it once its idle timeout has passed (its default: 5 s): answered at once, the
        request that woke a worker for a video left it idle through the model's load (Wan: tens of seconds), to be
        stopped before it ran the job. Held on the event loop, not on a thread of the requests' pool (a burst of
        video requests would leave none to record an image's); until RunPod stops the request, or the worker
        leaves."""
        loading = getattr(self.generator, "loading", None)
        if answer.get("status") != "accepted" or not callable(loading):
            return
        while loading(answer["task_type"]) and not self._leaving():
            await asyncio.sleep(LOAD_WAIT_SLICE_SECONDS)

    def _model_there(self, task_type: str, stop: threading.Event | None) -> bool:
        """An inline request's wait for its model's load (`_held_for_its_model`): False where RunPod stopped the
        request or the worker is leaving meanwhile (waiting in the load's lock, it held the worker's end up: the
        local API waits for its open requests as it shuts down)."""
        loading = getattr(self.generator, "loading", None)
        pause = stop if stop is not None else threading.Event()
        while callable(loading) and loading(task_type):
            if pause.wait(LOAD_WAIT_SLICE_SECONDS) or self._leaving():
                return False
        return True

    def _leaving(self) -> bool:
        return self.leaving is not None and self.leaving()

    def _fail_awaiting(self, data: Any, message: str, answer_by: float, key: JobKey | None = None) -> None:
        """A refused request whose file_uid names a doc that awaits its parameters (the contract's function flow:
        the doc first, then this request) fails that doc with the refusal, as the contract's function then does
        itself: left queued, the doc's defaults would run after the grace, a job nobody asked for. Any other doc,
        or none, is left as it is (a refused runsync creates nothing). `answer_by`: when the refusal is due
        (time.monotonic()), its record given up then. `key`: the doc, where the refusal named it (`Misfiled`: under
        the other media type)."""
        if not isinstance(data, dict) or data.get("use_cloud_storage") is not True:
            return
        if key is None:
            try:
                fields = normalise_document_fields(data)  # a video named in camelCase (numFrames) is under videos
            except ContractError:
                fields = data
            try:
                key = JobKey(
                    check_id("user_id", data.get("user_id")),
                    media_type_of(fields),
                    check_id("file_uid", data.get("file_uid")),
                )
            except ContractError:
                return
        try:
            # The function may have filed its doc under the other media type (by `num_frames` alone, as the
            # client sample does): the audit's `{fps: 99}` left its images doc queued, admitted, charged.
            key = self.store.filed_elsewhere(key, data, answer_by) or key
            outcome = self.store.fail_awaiting(key, GenerationError(VALIDATION_ERROR, message), answer_by)
            if outcome.displaced is not None and self.preempt is not None:
                self.preempt(key, outcome.displaced)  # a worker ran its defaults (here: stopped now)
            if outcome.applied:
                log.info(
                    "job_failed",
                    user_id=key.user_id,
                    file_uid=key.file_uid,
                    error_type=VALIDATION_ERROR,
                    reason="its request was refused",
                )
        except Exception as exc:
            log.warning("refusal_not_recorded", user_id=key.user_id, file_uid=key.file_uid, error=type(exc).__name__)

    # Inline generations run on threads of their own, as many as there are models: torch keeps an OpenMP team in
    # each thread that ran its CPU work, for good, and every thread of the requests' pool would keep one (a soak:
    # one more team per inline request, up to the pool's size, 32 threads on a large host).
    _generating = ThreadPoolExecutor(max_workers=2, thread_name_prefix="inline-generation")

    def inline(self, request: GenerationRequest, stop: threading.Event | None = None) -> dict[str, Any]:
        """`use_cloud_storage: false`: generate in the request and return the media as base64; `stop`, once set,
        ends the generation at its next step."""
        ids = {name: value for name in ("user_id", "file_uid") if (value := getattr(request, name))}

        def refused(message: str, level: str = "info", **why: Any) -> dict[str, Any]:
            getattr(log, level)("request_refused", inline=True, **why, **ids)
            return rejected(message)

        if self.generator is None:
            return refused("Inline generation is not available on this worker", reason="no generator")
        if not self._model_there(request.task_type, stop):
            why = "stopped by RunPod" if stop is not None and stop.is_set() else "worker leaving"
            return refused("The worker stopped before the generation finished; please retry", reason=why)
        started = time.perf_counter()

        def progress(fraction: float) -> None:
            if stop is not None and stop.is_set():
                raise Interrupted()

        try:
            context = contextvars.copy_context()  # the request's log fields go along
            result = self._generating.submit(context.run, self.generator.generate, request, progress).result()
        except Interrupted:  # stopped by RunPod, or the worker is leaving (its GPU failed, or it is shutting down)
            why = "stopped by RunPod" if stop is not None and stop.is_set() else "worker leaving"
            return refused("The worker stopped before the generation finished; please retry", reason=why)
        except Exception as exc:
            error = classify(exc)
            # At the level a queued job's failure of this type is said (`job_failed`): an out-of-memory or a bug is
            # the operator's, whichever door the request came by.
            level = failure_level(error.error_type)
            trace: dict[str, Any] = {"exc_info": exc} if error.error_type in (RUNTIME_ERROR, EXCEPTION) else {}
            return refused(error.message, level, error_type=error.error_type, error_message=error.message, **trace)
        encoded = [base64.b64encode(data).decode("ascii") for data, *_ in result.files]
        output: dict[str, Any] = {
            "generated": True,
            "error": False,
            "status": lifecycle.COMPLETED,
            "seed": result.seed,
            "task_type": request.task_type,
            # Optional here (no doc, no object names need them), echoed where given as on a success doc.
            **ids,
            **({lifecycle.PROMPT_TRUNCATED: True} if getattr(result, "prompt_truncated", False) else {}),
        }
        if request.is_video:
            output.update(videos=encoded, video_info=result.video_info)
        else:
            output.update(images=encoded, image_count=len(encoded))
        # What RunPod carries is the output as JSON: each file's base64 padding and the fields around them count
        # (4/3 of the raw bytes let a result a few hundred bytes over the limit through).
        answer_size = len(json.dumps(output))
        if answer_size > INLINE_LIMIT_BYTES:
            # The size that meets the limit, rounded up (a contract audit read "19.5 MB, over ... 20 MB" as absurd).
            megabytes = math.ceil(answer_size / 1e5) / 10
            return refused(
                f"Result is {megabytes:.1f} MB once encoded (base64), over RunPod's 20 MB response limit: "
                "use use_cloud_storage: true, or ask for fewer or smaller outputs",
                reason="over 20 MB",
            )
        log.info(
            "inline_completed",
            task_type=request.task_type,
            bytes=sum(len(data) for data, *_ in result.files),
            generation_seconds=round(time.perf_counter() - started, 3),
            **ids,
        )
        return output
