"""The worker's configuration, read from environment variables and validated once.

`Settings` extends the model settings of `generation.settings.ModelSettings` (IMAGE_MODEL, VIDEO_MODEL,
FIREGEN_*, HF_HUB_OFFLINE) with the worker's own. `load_settings()` returns it or raises `SettingsError` with
one line that names each wrong variable ("STORAGE_BUCKET is required", "URL_STYLE must be one of public,
signed, token"). Every field is read from the variable named in its `validation_alias` (case-insensitive);
empty values count as unset.

Credentials: the service account's JSON *text* (or its base64, or for the first a key file's path) may come in
`FIREBASE_SERVICE_ACCOUNT_JSON`, or in `GOOGLE_APPLICATION_CREDENTIALS` when that variable holds the key instead
of a path (a RunPod secret is an environment string, while Google's lookup reads that variable as a file path). It is checked here, kept as a
`SecretStr` (never printed, never logged) and turned into credentials by `listener.credentials`.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator

from firegen_core.contract import MAX_PLACEHOLDER_GRACE_SECONDS
from firegen_core.lifecycle import RETENTION_DAYS_MAX
from firegen_core.quota import MAX_COUNT_LIMIT, MAX_DAILY_BUDGET
from firegen_core.results import bucket_name_problem
from generation.settings import ModelSettings, SettingsError, env, load

UrlStyle = Literal["public", "signed", "token"]
MAX_BATCH = 16  # a sane bound: a batch holds every image of its jobs in GPU memory at once
# Sane bounds on counts: past them an operator's "no limit" (99999999999999999999) meant a thread per slot or a
# retry loop without end.
MAX_SLOTS = 64  # CONCURRENCY: generation slots on one worker's card(s)
MAX_TRIES = 100  # MAX_ATTEMPTS, MAX_RELEASES, UPLOAD_RETRY_ATTEMPTS
MAX_RUNSYNC_CONCURRENCY = 1000
MAX_SIGNED_URL_SECONDS = 7 * 24 * 3600  # V4 signed URLs live at most 7 days
HOUR, DAY, WEEK = 3600, 24 * 3600, 7 * 24 * 3600
SERVICE_ACCOUNT_KEYS = ("client_email", "private_key")

__all__ = ["Settings", "SettingsError", "load_settings", "service_account_info"]


class Settings(ModelSettings):
    # Google Cloud / Firebase
    google_cloud_project: str | None = Field(None, validation_alias=env("GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT"))
    firestore_emulator_host: str | None = Field(None, validation_alias=env("FIRESTORE_EMULATOR_HOST"))
    firebase_service_account_json: SecretStr | None = Field(None, validation_alias=env("FIREBASE_SERVICE_ACCOUNT_JSON"))
    google_application_credentials: SecretStr | None = Field(
        None, validation_alias=env("GOOGLE_APPLICATION_CREDENTIALS")
    )

    # Storage
    storage_bucket: str = Field(validation_alias=env("STORAGE_BUCKET"))
    storage_emulator_host: str | None = Field(None, validation_alias=env("STORAGE_EMULATOR_HOST"))
    # The Firebase CLI's Storage emulator (its host:port, the Firebase SDKs' variable): under it, token URLs take
    # Firebase's form on the emulator (`/v0/b/...`), which the JS SDK's ref(storage, url) resolves (make dev).
    firebase_storage_emulator_host: str | None = Field(None, validation_alias=env("FIREBASE_STORAGE_EMULATOR_HOST"))
    # Private by default: token URLs work with Firebase's default (private) bucket and its storage.rules; under
    # STORAGE_EMULATOR_HOST they are the emulator's download URLs. `public` needs a world-readable bucket.
    url_style: UrlStyle = Field("token", validation_alias=env("URL_STYLE"))
    signed_url_expiry_seconds: int = Field(
        MAX_SIGNED_URL_SECONDS, ge=1, le=MAX_SIGNED_URL_SECONDS, validation_alias=env("SIGNED_URL_EXPIRY_SECONDS")
    )
    upload_retry_attempts: int = Field(12, ge=1, le=MAX_TRIES, validation_alias=env("UPLOAD_RETRY_ATTEMPTS"))
    upload_retry_max_seconds: float = Field(
        60.0, gt=0, le=HOUR, allow_inf_nan=False, validation_alias=env("UPLOAD_RETRY_MAX_SECONDS")
    )

    # Job queue
    # Upper bounds on times: past them a date or a wait overflows (audit: LEASE_SECONDS=999999999999 started, then
    # every claim failed "date value out of range" and the job stayed queued).
    lease_seconds: int = Field(120, gt=0, le=DAY, validation_alias=env("LEASE_SECONDS"))
    max_attempts: int = Field(3, ge=1, le=MAX_TRIES, validation_alias=env("MAX_ATTEMPTS"))
    sweep_interval_seconds: float = Field(
        10.0, gt=0, le=HOUR, allow_inf_nan=False, validation_alias=env("SWEEP_INTERVAL_SECONDS")
    )
    concurrency: int = Field(1, ge=1, le=MAX_SLOTS, validation_alias=env("CONCURRENCY"))
    shutdown_grace_seconds: float = Field(
        20.0, ge=0, le=HOUR, allow_inf_nan=False, validation_alias=env("SHUTDOWN_GRACE_SECONDS")
    )
    max_releases: int = Field(3, ge=1, le=MAX_TRIES, validation_alias=env("MAX_RELEASES"))
    # Deadlines on the start (listener.startup): a hung driver's nvidia-smi (the SDK asks it with no time limit) or
    # CUDA initialisation, a stalled network volume, kept a worker "initializing" for good, never ready, never gone.
    startup_timeout_seconds: float = Field(
        1800.0, gt=0, le=DAY, allow_inf_nan=False, validation_alias=env("STARTUP_TIMEOUT_SECONDS")
    )
    fitness_check_timeout_seconds: float = Field(
        180.0, gt=0, le=HOUR, allow_inf_nan=False, validation_alias=env("FITNESS_CHECK_TIMEOUT_SECONDS")
    )
    # A free slot claims up to BATCH_MAX queued text2image jobs that can share one UNet batch (same size, steps
    # and guidance) and runs them in one pipeline call. 1: one job at a time.
    batch_max: int = Field(1, ge=1, le=MAX_BATCH, validation_alias=env("BATCH_MAX"))
    # How long a queued doc that awaits its parameters (the contract's Firebase Function flow: prompt first, the
    # parameters in the runsync that follows) is left to that runsync before a listener runs it with the defaults.
    placeholder_grace_seconds: float = Field(
        5.0,
        ge=0,
        le=MAX_PLACEHOLDER_GRACE_SECONDS,
        allow_inf_nan=False,
        validation_alias=env("PLACEHOLDER_GRACE_SECONDS"),
    )
    # A job's deadline: max(floor, multiple x its estimated GPU time) (firegen_core.deadline).
    job_timeout_floor_seconds: float = Field(
        120.0, gt=0, le=WEEK, allow_inf_nan=False, validation_alias=env("JOB_TIMEOUT_FLOOR_SECONDS")
    )
    job_timeout_multiple: float = Field(
        5.0, gt=0, le=1000, allow_inf_nan=False, validation_alias=env("JOB_TIMEOUT_MULTIPLE")
    )

    # RunPod: runsync jobs one worker takes at once from RunPod's queue (each is answered in milliseconds;
    # generation runs in the reconciler's CONCURRENCY slots, not in the request).
    runsync_concurrency: int = Field(8, ge=1, le=MAX_RUNSYNC_CONCURRENCY, validation_alias=env("RUNSYNC_CONCURRENCY"))

    # Per-user limits (firegen_core.quota; the Cloud Functions read the same variables)
    user_max_running: int = Field(2, ge=1, le=MAX_COUNT_LIMIT, validation_alias=env("USER_MAX_RUNNING"))
    user_max_pending: int = Field(20, ge=1, le=MAX_COUNT_LIMIT, validation_alias=env("USER_MAX_PENDING"))
    user_daily_budget: float = Field(
        600.0, gt=0, le=MAX_DAILY_BUDGET, allow_inf_nan=False, validation_alias=env("USER_DAILY_BUDGET")
    )
    # The job store's (the functions read the same variable). The default is lifecycle.RETENTION_DAYS_DEFAULT
    # (tests/test_lifecycle.py checks they agree).
    retention_days: float = Field(
        30.0, ge=0, le=RETENTION_DAYS_MAX, allow_inf_nan=False, validation_alias=env("RETENTION_DAYS")
    )

    # Logs
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", validation_alias=env("LOG_LEVEL"))
    # The RunPod SDK's own, which it checks at import: a word it does not know (`WARNING`, LOG_LEVEL's) raised there,
    # a traceback that named no variable, and on RunPod a worker that crashed at every start (an audit).
    runpod_log_level: Literal["NOTSET", "TRACE", "DEBUG", "INFO", "WARN", "ERROR"] = Field(
        "INFO", validation_alias=env("RUNPOD_LOG_LEVEL")
    )

    @field_validator("storage_bucket", "google_cloud_project", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        # A pasted name's newline: the project's reached Firestore as `projects/my-app\n/...`, refused by a raw
        # error that named no variable, at every start (a review).
        return value.strip() if isinstance(value, str) else value

    @field_validator("storage_bucket", mode="after")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        problem = bucket_name_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("url_style", mode="before")
    @classmethod
    def _url_style(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("runpod_log_level", mode="before")
    @classmethod
    def _sdk_level(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().upper()
            return "WARN" if value == "WARNING" else value  # the SDK's word for it
        return value

    @field_validator("firebase_service_account_json", mode="after")
    @classmethod
    def _service_account(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _parse_service_account(_key_text(value.get_secret_value(), path_ok=True) or "")
        return value

    @field_validator("google_application_credentials", mode="after")
    @classmethod
    def _credentials_json(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            text = _key_text(value.get_secret_value(), path_ok=False)
            if text is not None:
                _parse_service_account(text)
        return value

    @property
    def service_account(self) -> tuple[str, dict[str, Any]] | None:
        """(the variable it came from, the service account's key info), or None: Application Default
        Credentials (a key file's path in GOOGLE_APPLICATION_CREDENTIALS, or the platform's identity)."""
        return service_account_info(self)


_URLSAFE = str.maketrans("-_", "+/")


def _is_file(text: str) -> bool:
    try:
        return Path(text.strip()).is_file()
    except (OSError, ValueError):  # a pasted key is no path: too long, or a NUL in it
        return False


def _key_text(text: str, *, path_ok: bool) -> str | None:
    """A key's JSON text from what a secret may hold: the JSON itself, its base64 (what many guides put in
    environment variables, to keep the key's newlines and quotes out of the way), or, with `path_ok`, the path of
    a key file (one on a network volume). None: none of those."""
    stripped = text.strip()
    if stripped.startswith("{"):
        return stripped
    packed = "".join(stripped.split())  # base64 tools wrap their output at 76 characters
    if re.fullmatch(r"[A-Za-z0-9+/_-]+=*", packed):
        try:
            decoded = base64.b64decode(packed.rstrip("=").translate(_URLSAFE) + "=" * (-len(packed.rstrip("=")) % 4))
            if decoded.lstrip().startswith(b"{"):
                return decoded.decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            pass
    if path_ok and _is_file(stripped):
        try:
            return Path(stripped).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise ValueError("names a key file that cannot be read") from None
    if path_ok:
        raise ValueError("is neither a service account key's JSON text, its base64, nor a key file's path")
    return None


def _parse_service_account(text: str) -> dict[str, Any]:
    # The messages never quote the value: it is a private key.
    try:
        # strict=False: a key pasted through a form can come with the private key's "\n"s turned into newlines.
        info = json.loads(text, strict=False)
    except ValueError:
        raise ValueError("is not valid JSON (expected a service account key's JSON text)") from None
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str) and info[k] for k in SERVICE_ACCOUNT_KEYS):
        raise ValueError("is not a service account key (JSON with client_email and private_key)")
    return info


def service_account_info(settings: Settings) -> tuple[str, dict[str, Any]] | None:
    if settings.firebase_service_account_json is not None:
        text = _key_text(settings.firebase_service_account_json.get_secret_value(), path_ok=True)
        return "FIREBASE_SERVICE_ACCOUNT_JSON", _parse_service_account(text or "")
    path_or_json = settings.google_application_credentials
    text = None if path_or_json is None else _key_text(path_or_json.get_secret_value(), path_ok=False)
    if text is not None:
        return "GOOGLE_APPLICATION_CREDENTIALS", _parse_service_account(text)
    return None


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (keyword overrides by field name win). Raises SettingsError."""
    return load(Settings, **overrides)
