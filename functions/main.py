"""The Firebase Functions of firegen: declarations only; the logic is in dispatch.py.

    generateWithRunPod   callable (Firebase Auth required): validate, create the queued doc, dispatch to RunPod
    dispatchQueuedJob    Firestore trigger on generations/{uid}/{media}/{fileUid} creation: dispatch once
    redispatchStaleJobs  every 5 minutes: wake a worker again for stale jobs, fail them after a few tries
                         (only when no worker has been alive for the whole stale period)
    cancelGeneration     callable (Firebase Auth required): cancel one of the caller's queued or running jobs

Configuration (see the README's "Cloud Functions" section):
    RUNPOD_API_KEY       secret (`firebase functions:secrets:set RUNPOD_API_KEY`)
    RUNPOD_ENDPOINT_ID   string param, asked at the first deploy (or set in functions/.env)
    RUNPOD_RUNSYNC_URL   optional environment variable: the whole runsync URL, e.g. a local worker's
                         http://127.0.0.1:8000/runsync for the emulators
    RUNPOD_ATTEMPTS, RUNPOD_TIMEOUT_SECONDS, REDISPATCH_AFTER_MINUTES, MAX_DISPATCHES: optional tuning
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dispatch, runpod_client and the vendored packages

import dispatch
import firebase_admin
from firebase_functions import firestore_fn, https_fn, options, params, scheduler_fn
from runpod_client import RunPodClient, runsync_url

RUNPOD_API_KEY = params.SecretParam("RUNPOD_API_KEY", description="RunPod API key (Bearer token for runsync)")
RUNPOD_ENDPOINT_ID = params.StringParam(
    "RUNPOD_ENDPOINT_ID", description="RunPod Serverless endpoint id of the firegen worker"
)

options.set_global_options(max_instances=10)


class _EmulatorCredential(firebase_admin.credentials.Base):
    """Anonymous Google credentials: under the emulators, nothing needs (or has) real ones."""

    def get_credential(self):
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()


def _init_admin() -> None:
    if firebase_admin._apps:
        return
    if os.environ.get("FUNCTIONS_EMULATOR") == "true":
        project = os.environ.get("GCLOUD_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT")
        firebase_admin.initialize_app(_EmulatorCredential(), {"projectId": project})
    else:
        firebase_admin.initialize_app()


_init_admin()  # the callable verifies ID tokens with the default app before it calls us
_db = None


def _firestore():
    global _db
    if _db is None:
        from google.cloud import firestore

        project = os.environ.get("GCLOUD_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT")
        if os.environ.get("FIRESTORE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            _db = firestore.Client(project=project, credentials=AnonymousCredentials())
        else:
            _db = firestore.Client(project=project)
    return _db


def _runpod() -> RunPodClient:
    return RunPodClient(
        runsync_url(RUNPOD_ENDPOINT_ID.value, os.environ.get("RUNPOD_RUNSYNC_URL")),
        RUNPOD_API_KEY.value,
        attempts=int(os.environ.get("RUNPOD_ATTEMPTS", "3")),
        timeout=float(os.environ.get("RUNPOD_TIMEOUT_SECONDS", "20")),
    )


def _policy() -> dispatch.Policy:
    return dispatch.Policy(
        redispatch_after=timedelta(minutes=float(os.environ.get("REDISPATCH_AFTER_MINUTES", "10"))),
        max_dispatches=int(os.environ.get("MAX_DISPATCHES", "3")),
    )


@https_fn.on_call(secrets=[RUNPOD_API_KEY], timeout_sec=70, memory=options.MemoryOption.MB_512)
def generateWithRunPod(req: https_fn.CallableRequest) -> dict:
    try:
        return dispatch.generate(
            _firestore(), _runpod(), uid=req.auth.uid if req.auth else None, data=req.data, policy=_policy()
        )
    except dispatch.CallError as exc:
        raise https_fn.HttpsError(https_fn.FunctionsErrorCode(exc.code), exc.message) from None


@https_fn.on_call(timeout_sec=30)
def cancelGeneration(req: https_fn.CallableRequest) -> dict:
    try:
        return dispatch.cancel(_firestore(), uid=req.auth.uid if req.auth else None, data=req.data)
    except dispatch.CallError as exc:
        raise https_fn.HttpsError(https_fn.FunctionsErrorCode(exc.code), exc.message) from None


@firestore_fn.on_document_created(
    document="generations/{uid}/{media}/{fileUid}", secrets=[RUNPOD_API_KEY], timeout_sec=120
)
def dispatchQueuedJob(event: firestore_fn.Event) -> None:
    outcome = dispatch.dispatch_created(
        _firestore(),
        _runpod(),
        user_id=event.params["uid"],
        media_type=event.params["media"],
        file_uid=event.params["fileUid"],
    )
    print(f"dispatchQueuedJob {event.document}: {outcome}")


@scheduler_fn.on_schedule(schedule="every 5 minutes", secrets=[RUNPOD_API_KEY], timeout_sec=300)
def redispatchStaleJobs(event: scheduler_fn.ScheduledEvent) -> None:
    counts = dispatch.redispatch_stale(_firestore(), _runpod(), policy=_policy())
    print(f"redispatchStaleJobs: {dict(counts)}")
