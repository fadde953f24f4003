"""The functions' params (typed, validated and prompted for by the Functions framework), declared here, once per
process: the framework's discovery server runs main.py afresh for each request for its manifest, and a param
declared twice is an error (seen under load: the emulator's discovery sent its request again, the second run of
main.py raised "Duplicate Parameter Error" and the codebase failed to load). An imported module runs once."""

from __future__ import annotations

import os

from firebase_functions import params

from firegen_core import function_params, lifecycle
from firegen_core.quota import Limits
from firegen_core.redaction import got
from firegen_core.results import bucket_name_problem

RUNPOD_API_KEY = params.SecretParam("RUNPOD_API_KEY", description="RunPod API key (Bearer token for runsync)")
RUNPOD_ENDPOINT_ID = params.StringParam(
    "RUNPOD_ENDPOINT_ID", description="RunPod Serverless endpoint id of the firegen worker"
)


def _whole_number(name: str, default: int, description: str) -> params.IntParam:
    """An int param (the framework's FloatParam is not public in 0.6) held to its range (function_params) where the
    deploy prompts for it."""
    low, high = function_params.INT_PARAMS[name]
    within = f"a whole number from {low} to {high}"
    prompt = params.TextInput(
        example=str(default),
        validation_regex=function_params.range_pattern(low, high),
        validation_error_message=f"{name} must be {within}",
    )
    return params.IntParam(name, default=default, description=f"{description} ({within})", input=prompt)


# Tuning
RUNPOD_ATTEMPTS = _whole_number("RUNPOD_ATTEMPTS", 3, "runsync attempts (transient errors)")
RUNPOD_TIMEOUT_SECONDS = _whole_number("RUNPOD_TIMEOUT_SECONDS", 20, "seconds each runsync attempt may take")
REDISPATCH_AFTER_MINUTES = _whole_number(
    "REDISPATCH_AFTER_MINUTES", 10, "minutes after which a queued job is dispatched again"
)
MAX_DISPATCHES = _whole_number("MAX_DISPATCHES", 3, "dispatches of one job before it is failed as never picked up")

# Per-user limits (firegen_core.quota); the worker reads the same variables. Defaults as in Limits.
USER_MAX_RUNNING = _whole_number(
    "USER_MAX_RUNNING", Limits.max_running, "at most this many of one user's jobs processing"
)
USER_MAX_PENDING = _whole_number(
    "USER_MAX_PENDING", Limits.max_pending, "at most this many of one user's jobs queued or running"
)
USER_DAILY_BUDGET = _whole_number(
    "USER_DAILY_BUDGET",
    int(Limits.daily_budget),
    "one user's estimated GPU-seconds per UTC day (see the README's cost model)",
)

# The workers read the same variable (a float there; whole seconds here).
PLACEHOLDER_GRACE_SECONDS = _whole_number(
    "PLACEHOLDER_GRACE_SECONDS",
    5,
    "seconds the trigger leaves a doc with only its prompt to the request that brings its parameters",
)

# Checked once here, at the deploy's discovery and at each cold start, not first at the call that reads them (a
# ValueError there, answered INTERNAL). A blank int param counts as unset, as on the workers (the SDK would hand
# "" to int() at every use): taken out of this process's environment, the param's default holds. So does a blank
# STORAGE_BUCKET (the project's default bucket).
for _name in (*function_params.INT_PARAMS, "STORAGE_BUCKET"):
    if not os.environ.get(_name, "x").strip():
        del os.environ[_name]
function_params.whole_numbers(os.environ)
# RETENTION_DAYS and STORAGE_BUCKET are plain variables (the workers read the same).
lifecycle.retention_days(os.environ)
_bucket = (os.environ.get("STORAGE_BUCKET") or "").strip()
if _bucket and (_problem := bucket_name_problem(_bucket)):
    raise ValueError(f"STORAGE_BUCKET must be {_problem} {got(_bucket)}")
