"""The Firebase Functions of firegen: declarations only; the logic is in dispatch.py (queue and dispatch a job),
owner_calls.py (cancel, delete) and sweep.py (the scheduled sweep).

    generateWithRunPod   callable (Firebase Auth required): validate, create the queued doc, dispatch to RunPod
    dispatchQueuedJob    Firestore trigger on generations/{uid}/{media}/{fileUid} creation: dispatch once
    redispatchStaleJobs  every 5 minutes: wake a worker again for stale jobs, fail them after a few tries
                         (only when no worker has been alive for the whole stale period)
    cancelGeneration     callable (Firebase Auth required): cancel one of the caller's queued or running jobs
    deleteGeneration     callable (Firebase Auth required): delete one of the caller's finished jobs, files and doc
    deleteAllGenerations callable (Firebase Auth required): delete all the caller's jobs and files, a pass a call

Configuration (the params are declared in config.py; see the README's "Cloud Functions" section):
    RUNPOD_API_KEY       secret (`firebase functions:secrets:set RUNPOD_API_KEY`)
    RUNPOD_ENDPOINT_ID   string param, asked at the first deploy (or set in functions/.env)
    RUNPOD_RUNSYNC_URL   optional environment variable: the whole runsync URL, e.g. a local worker's
                         http://127.0.0.1:8000/runsync for the emulators
    RUNPOD_ATTEMPTS, RUNPOD_TIMEOUT_SECONDS, REDISPATCH_AFTER_MINUTES, MAX_DISPATCHES: integer params with
                         defaults (functions/.env or the deploy prompt)
    USER_MAX_RUNNING, USER_MAX_PENDING, USER_DAILY_BUDGET: int params, the per-user limits (same as the worker's)
    PLACEHOLDER_GRACE_SECONDS: int param (0 to 60, as the workers'): how long the trigger leaves a doc with only its
                         prompt to the request that brings its parameters
    RETENTION_DAYS       optional environment variable (as the workers'): `expire_at` on the jobs they end
    ENFORCE_APP_CHECK    optional environment variable: on by default when deployed, off under the emulators
    STORAGE_BUCKET       optional environment variable: the results' bucket (deleteGeneration, deleteAllGenerations, and
                         cancelGeneration's and redispatchStaleJobs' clean-up of a gone worker's upload), as the workers'
                         (default: the project's default bucket, FIREBASE_CONFIG's storageBucket)

Logs: the records of dispatch, sweep and runpod_client (standard `logging`, so they import anywhere), and those the
firebase_functions SDK itself writes through the root logger, are written by `firebase_functions.logger`: one
JSON entry each, with `severity` and `message`, as Cloud Logging reads them. The SDK's messages that may quote a
caller's token are cut before the quote.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dispatch, runpod_client and the vendored packages

import callable_body
import dispatch
import firebase_admin
import owner_calls
import sweep
from config import (
    MAX_DISPATCHES,
    PLACEHOLDER_GRACE_SECONDS,
    REDISPATCH_AFTER_MINUTES,
    RUNPOD_API_KEY,
    RUNPOD_ATTEMPTS,
    RUNPOD_ENDPOINT_ID,
    RUNPOD_TIMEOUT_SECONDS,
    USER_DAILY_BUDGET,
    USER_MAX_PENDING,
    USER_MAX_RUNNING,
)
from firebase_functions import firestore_fn, https_fn, logger, options, scheduler_fn
from runpod_client import RunPodClient, runsync_url

from firegen_core.quota import Limits
from firegen_core.redaction import got, redact, redacted

# cpu=1: set_global_options' own default is "gcf_gen1" (a sixth of a CPU, one request at a time per instance),
# while the callables and the trigger mostly wait on RunPod (up to RUNPOD_TIMEOUT_SECONDS a call). concurrency=4:
# the Python runtime's server (functions-framework's gunicorn) runs 4 threads per CPU unless THREADS says
# otherwise, and calls routed past them would queue inside the instance instead of starting another.
options.set_global_options(max_instances=10, cpu=1, concurrency=4)

_OFF, _ON = ("0", "false", "off", "no"), ("1", "true", "on", "yes")


def enforce_app_check() -> bool:
    """ENFORCE_APP_CHECK for the callables (`@https_fn.on_call(enforce_app_check=enforce_app_check())`): on by
    default when deployed, off under the emulators (FUNCTIONS_EMULATOR=true), where no app can get a token.
    Read when the function is declared (deploy and cold start), so set it in functions/.env."""
    value = os.environ.get("ENFORCE_APP_CHECK", "").strip().lower()
    if value in _ON or value in _OFF:
        return value in _ON
    if value:
        raise ValueError(f"ENFORCE_APP_CHECK must be on or off {got(value)}")
    return os.environ.get("FUNCTIONS_EMULATOR") != "true"


# The SDK's own messages that can quote what a caller sent: google-auth's error for a malformed ID or App Check
# token quotes the token ("Wrong number of segments in token: b'...'"), and "extra fields" quotes the request body.
# Only the SDK's fixed text before the quote is written.
# (callable_body refuses a body with extra fields before the SDK reads it: kept for the SDK's own path.)
_QUOTES_THE_CALLER = ("Error validating token: ", "Request body has extra fields: ")
# The SDK's ERRORs for a caller's mistake it answers with a 4xx (a call that is no callable request, a token that
# does not validate): WARNING, as the worker logs a client's doing, so that an alert on ERROR means ours to act on
# (protocol audit: 37 ERROR entries from probes and bad calls, the emulator's own GET to each runtime included).
_CALLERS_MISTAKE = ("Invalid request, unable to process.", "Error validating token: ")


class _FirebaseLogHandler(logging.Handler):
    """Standard-logging records (the functions' modules, and the SDK's through the root logger), written through
    firebase_functions.logger: one JSON entry each, with its severity."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            callers = record.name == "root" and str(record.msg).startswith(_CALLERS_MISTAKE)
            if record.levelno >= logging.ERROR and not callers:
                write = logger.error
            elif record.levelno >= logging.WARNING:
                write = logger.warn
            elif record.levelno >= logging.INFO:
                write = logger.info
            else:
                write = logger.debug
            # `extra={...}` (firegen_core's records) as fields of their own, as the worker's JSON lines have them.
            fields = {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES and not k.startswith("_")}
            # A library's record may quote a URL or a token endpoint's answer: the worker's last guard, here too.
            write(redact(_message(record)), logger=record.name, **redacted(fields))
        except Exception:
            self.handleError(record)


_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _message(record: logging.LogRecord) -> str:
    try:
        message = record.getMessage()
    except (TypeError, ValueError):  # the SDK passes an argument its text has no placeholder for
        message = str(record.msg)
    for prefix in _QUOTES_THE_CALLER:
        if message.startswith(prefix):
            return f"{prefix}(the rest is withheld: it may quote the caller's token or request)"
    if record.exc_info:  # logging.exception() in the SDK's scheduler wrapper: the traceback is the point
        message = f"{message}\n{logging.Formatter().formatException(record.exc_info)}"
    return message


# One handler for both loggers below: a handler's lock orders its writes, and the SDK's `print` writes an entry
# and its newline apart, so two handlers let two requests' entries (concurrency=4) share a line, which Cloud
# Logging keeps as text with no severity (a review: 292 lines of 6,000 unbuffered, an ERROR among them).
_log_handler = _FirebaseLogHandler()
_functions_log = logging.getLogger("functions")
_functions_log.handlers[:] = [_log_handler]
_functions_log.setLevel(logging.INFO)
_functions_log.propagate = False
# The SDK logs with `logging.warning(...)` and the like: on a root logger without a handler, the first such call
# runs logging.basicConfig(), and its records come out as plain text ("WARNING:root:..."), which Cloud Logging
# reads as one unstructured line each. A handler of ours on the root logger first means they are JSON entries too
# (at the root's WARNING level, as before); the functions' own records stop at their logger, so none is doubled.
logging.getLogger().handlers[:] = [_log_handler]
# google-api-core turns off the `google` logger's propagation unless it was configured: its records (retries,
# a watch's close) would then reach no handler and come out in plain text from Python's last resort.
logging.getLogger("google").setLevel(logging.WARNING)
logging.getLogger("google").propagate = True


def _warning_record(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning (a library's UserWarning or DeprecationWarning) as a JSON entry: Python writes it in plain
    text, over several lines, on stderr."""
    fields = {"category": category.__name__, "said": str(message), "where": f"{filename}:{lineno}"}
    logging.getLogger("py.warnings").warning("python_warning", extra=fields)


warnings.showwarning = _warning_record


class _EmulatorCredential(firebase_admin.credentials.Base):
    """Anonymous Google credentials: under the emulators, nothing needs (or has) real ones."""

    def get_credential(self):
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()


def _init_admin() -> None:
    try:
        firebase_admin.get_app()
        return  # already initialised (a warm instance)
    except ValueError:
        pass
    if os.environ.get("FUNCTIONS_EMULATOR") == "true":
        project = os.environ.get("GCLOUD_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT")
        firebase_admin.initialize_app(_EmulatorCredential(), {"projectId": project})
    else:
        firebase_admin.initialize_app()


_init_admin()  # the callable verifies ID tokens with the default app before it calls us
_db = None
_db_lock = threading.Lock()


def _google_client(make: Callable[..., Any], emulator_host: str) -> Any:
    """`make(project=..., credentials=...)` for this project: anonymous where `emulator_host` (the variable the
    library reads itself) names an emulator, the runtime's own credentials otherwise."""
    project = os.environ.get("GCLOUD_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT")
    if os.environ.get(emulator_host):
        from google.auth.credentials import AnonymousCredentials

        return make(project=project, credentials=AnonymousCredentials())
    return make(project=project)


def _firestore():
    global _db
    with _db_lock:  # a cold instance's concurrent first requests: one client (and gRPC channel), not one each
        if _db is None:
            from google.cloud import firestore

            _db = _google_client(firestore.Client, "FIRESTORE_EMULATOR_HOST")
        return _db


_bucket_client = None


def _bucket() -> Any:
    """The results' bucket: STORAGE_BUCKET (the workers' setting), else the project's default bucket."""
    global _bucket_client
    with _db_lock:
        if _bucket_client is None:
            from google.cloud import storage  # type: ignore[attr-defined]  # no type information in google-cloud-storage

            _bucket_client = _google_client(storage.Client, "STORAGE_EMULATOR_HOST")
    config = json.loads(os.environ.get("FIREBASE_CONFIG") or "{}") if not os.environ.get("STORAGE_BUCKET") else {}
    name = (os.environ.get("STORAGE_BUCKET") or config.get("storageBucket") or "").strip()
    if not name:
        _functions_log.error("storage_bucket_unset", extra={"set": "STORAGE_BUCKET in functions/.env"})
        return None  # owner_calls.delete answers `unavailable`, once it has checked the call
    return _bucket_client.bucket(name)


def _runpod() -> RunPodClient:
    return RunPodClient(
        runsync_url(RUNPOD_ENDPOINT_ID.value, os.environ.get("RUNPOD_RUNSYNC_URL")),
        RUNPOD_API_KEY.value,
        attempts=RUNPOD_ATTEMPTS.value,
        timeout=float(RUNPOD_TIMEOUT_SECONDS.value),
    )


def _limits() -> Limits:
    return Limits(USER_MAX_RUNNING.value, USER_MAX_PENDING.value, float(USER_DAILY_BUDGET.value))


def _policy() -> dispatch.Policy:
    return dispatch.Policy(
        redispatch_after=timedelta(minutes=REDISPATCH_AFTER_MINUTES.value),
        max_dispatches=MAX_DISPATCHES.value,
    )


def _grace() -> float:
    return float(PLACEHOLDER_GRACE_SECONDS.value)  # within the workers' bounds (config.py checks it)


def _callable(**kwargs: Any) -> Callable[[Callable[[https_fn.CallableRequest], dict]], Callable]:
    """`@https_fn.on_call(**kwargs)`, a POST that is no callable request answered INVALID_ARGUMENT (callable_body),
    its refusal readable from the origins the callable's own answers are (the SDK's default: any)."""
    cors = kwargs.get("cors")
    origins = cors.cors_origins if cors is not None and cors.cors_origins is not None else "*"
    return lambda func: callable_body.guarded(https_fn.on_call(**kwargs)(func), origins)


@_callable(
    secrets=[RUNPOD_API_KEY],
    timeout_sec=70,
    memory=options.MemoryOption.MB_512,
    enforce_app_check=enforce_app_check(),
)
def generateWithRunPod(req: https_fn.CallableRequest) -> dict:
    uid = req.auth.uid if req.auth else None

    def generate() -> dict:
        with _runpod() as runpod:
            return dispatch.generate(
                _firestore(), runpod, uid=uid, data=req.data, policy=_policy(), limits=_limits(), bucket=_bucket
            )

    return _answer("generateWithRunPod", uid, generate)


@_callable(timeout_sec=30, enforce_app_check=enforce_app_check())
def cancelGeneration(req: https_fn.CallableRequest) -> dict:
    uid = req.auth.uid if req.auth else None
    return _answer(
        "cancelGeneration",
        uid,
        lambda: owner_calls.cancel(_firestore(), uid=uid, data=req.data, limits=_limits(), bucket=_bucket),
    )


@_callable(timeout_sec=60, enforce_app_check=enforce_app_check())
def deleteGeneration(req: https_fn.CallableRequest) -> dict:
    uid = req.auth.uid if req.auth else None
    return _answer(
        "deleteGeneration",
        uid,
        lambda: owner_calls.delete(_firestore(), _bucket(), uid=uid, data=req.data, limits=_limits()),
    )


@_callable(timeout_sec=120, enforce_app_check=enforce_app_check())
def deleteAllGenerations(req: https_fn.CallableRequest) -> dict:
    uid = req.auth.uid if req.auth else None
    return _answer(
        "deleteAllGenerations",
        uid,
        lambda: owner_calls.delete_all(_firestore(), _bucket(), uid=uid, data=req.data, limits=_limits()),
    )


def _answer(function: str, uid: str | None, call: Callable[[], dict]) -> dict:
    """A callable's reply, its outcome logged; a refusal (`dispatch.CallError`) is the client's HttpsError, logged
    too (audit: the functions' logs showed nothing of a refusal but the emulator's lines): the code and the
    message the client got, never its token or its request."""
    try:
        reply = call()
    except dispatch.CallError as exc:
        _functions_log.info(function, extra={"user_id": uid, "refused": exc.code, "error": exc.message})
        raise https_fn.HttpsError(https_fn.FunctionsErrorCode(exc.code), exc.message) from None
    except Exception:
        # A bug, or a failure nothing above answers: the SDK's own entry was "Unhandled error: <the text>" alone,
        # with no traceback (Error Reporting takes none without one), no function and no user. The same answer.
        _functions_log.exception(function, extra={"user_id": uid, "refused": "internal"})
        raise https_fn.HttpsError(https_fn.FunctionsErrorCode.INTERNAL, "INTERNAL") from None
    # Named as the worker's entries and the other functions' name a job (snake case), not as the reply does.
    fields = {
        "user_id": uid,
        "media_type": reply.get("mediaType"),
        "file_uid": reply.get("fileUid"),
        "status": reply.get("status"),
    }
    _functions_log.info(function, extra=fields)
    return reply


# 180 s: the placeholder wait (PLACEHOLDER_GRACE_SECONDS, up to 60 s), RunPod's runsync (its 50 s deadline and a
# retry's connect) and the store's writes (15 s each at worst); at 120 s a slow run was killed past its marking, and
# its job waited for the sweep (a review).
@firestore_fn.on_document_created(
    document="generations/{uid}/{media}/{fileUid}", secrets=[RUNPOD_API_KEY], timeout_sec=180
)
def dispatchQueuedJob(event: firestore_fn.Event) -> None:
    with _runpod() as runpod:
        outcome = dispatch.dispatch_created(
            _firestore(),
            runpod,
            user_id=event.params["uid"],
            media_type=event.params["media"],
            file_uid=event.params["fileUid"],
            limits=_limits(),
            grace=_grace(),
        )
    _functions_log.info("dispatchQueuedJob", extra={"path": event.document, "outcome": outcome})


@scheduler_fn.on_schedule(schedule="every 5 minutes", secrets=[RUNPOD_API_KEY], timeout_sec=300)
def redispatchStaleJobs(event: scheduler_fn.ScheduledEvent) -> None:
    with _runpod() as runpod:
        counts = sweep.redispatch_stale(_firestore(), runpod, policy=_policy(), limits=_limits(), bucket=_bucket)
    _functions_log.info("redispatchStaleJobs", extra={"counts": dict(counts)})
