"""The worker's configuration, read from environment variables.

`load_settings()` is the entry point: it returns `Settings` or raises `SettingsError` with one line that names
each wrong variable ("STORAGE_BUCKET is required", "URL_STYLE must be one of public, signed, token").
Every field is read from the variable named in its `validation_alias` (case-insensitive); empty values count
as unset.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

UrlStyle = Literal["public", "signed", "token"]
MAX_SIGNED_URL_SECONDS = 7 * 24 * 3600  # V4 signed URLs live at most 7 days


class SettingsError(ValueError):
    """A configuration mistake, said in one line that names the environment variable."""


def _env(name: str, *more: str) -> Any:
    return AliasChoices(name, *more) if more else name


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, env_ignore_empty=True, extra="ignore", frozen=True)

    # Google Cloud / Firebase
    google_cloud_project: str | None = Field(None, validation_alias=_env("GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT"))
    firestore_emulator_host: str | None = Field(None, validation_alias=_env("FIRESTORE_EMULATOR_HOST"))

    # Storage
    storage_bucket: str = Field(validation_alias=_env("STORAGE_BUCKET"))
    storage_emulator_host: str | None = Field(None, validation_alias=_env("STORAGE_EMULATOR_HOST"))
    url_style: UrlStyle = Field("public", validation_alias=_env("URL_STYLE"))
    signed_url_expiry_seconds: int = Field(
        MAX_SIGNED_URL_SECONDS, ge=1, le=MAX_SIGNED_URL_SECONDS, validation_alias=_env("SIGNED_URL_EXPIRY_SECONDS")
    )
    upload_retry_attempts: int = Field(5, ge=1, validation_alias=_env("UPLOAD_RETRY_ATTEMPTS"))
    upload_retry_max_seconds: float = Field(60.0, gt=0, validation_alias=_env("UPLOAD_RETRY_MAX_SECONDS"))

    # Models
    image_model: str = Field("stabilityai/stable-diffusion-xl-base-1.0", validation_alias=_env("IMAGE_MODEL"))
    video_model: str = Field("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", validation_alias=_env("VIDEO_MODEL"))
    # generation.engine reads these too (the CLI has no Settings): validated here so start-up names a bad value.
    offload_text_encoder: Literal["auto", "on", "off"] = Field(
        "auto", validation_alias=_env("FIREGEN_OFFLOAD_TEXT_ENCODER")
    )
    compile: Literal["on", "off"] = Field("off", validation_alias=_env("FIREGEN_COMPILE"))

    # Job queue
    lease_seconds: int = Field(120, gt=0, validation_alias=_env("LEASE_SECONDS"))
    max_attempts: int = Field(3, ge=1, validation_alias=_env("MAX_ATTEMPTS"))
    sweep_interval_seconds: float = Field(10.0, gt=0, validation_alias=_env("SWEEP_INTERVAL_SECONDS"))
    concurrency: int = Field(1, ge=1, validation_alias=_env("CONCURRENCY"))
    shutdown_grace_seconds: float = Field(20.0, ge=0, validation_alias=_env("SHUTDOWN_GRACE_SECONDS"))

    # Logs
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", validation_alias=_env("LOG_LEVEL"))

    @field_validator("url_style", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("offload_text_encoder", "compile", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        value = value.strip().lower() if isinstance(value, str) else value
        return {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}.get(value, value)


def env_var(field: str) -> str:
    """The (first) environment variable a field is read from."""
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return str(alias or field).upper()


_FIELD_BY_ALIAS = {
    str(choice).lower(): name
    for name, info in Settings.model_fields.items()
    for choice in (
        info.validation_alias.choices
        if isinstance(info.validation_alias, AliasChoices)
        else [info.validation_alias or name]
    )
}


def _line(error: dict[str, Any]) -> str:
    loc = str(error["loc"][0]) if error.get("loc") else ""
    field = _FIELD_BY_ALIAS.get(loc.lower(), loc)
    var = env_var(field) if field in Settings.model_fields else loc.upper()
    kind = error.get("type", "")
    if kind == "missing":
        return f"{var} is required"
    if kind == "literal_error":
        return f"{var} must be one of {', '.join(get_args(Settings.model_fields[field].annotation))}"
    msg = str(error.get("msg", "is invalid"))
    msg = msg[len("Input should be ") :] if msg.startswith("Input should be ") else msg
    return f"{var} must be {msg} (got {error.get('input')!r})"


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (keyword overrides by field name win). Raises SettingsError."""
    try:
        return Settings(**{env_var(k): v for k, v in overrides.items()})
    except ValidationError as e:
        raise SettingsError("; ".join(_line(err) for err in e.errors())) from None
