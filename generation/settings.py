"""The model settings, read from environment variables and validated once (pydantic-settings).

`ModelSettings` holds every variable the generation engine reads (`IMAGE_MODEL`, `VIDEO_MODEL`, `FIREGEN_*`,
`HF_HUB_OFFLINE`); the worker's `listener.settings.Settings` extends it with its own, and the generation CLI uses
it alone. `load(cls)` returns the settings or raises `SettingsError` with one line naming each wrong variable
("FIREGEN_FP8 must be one of on, off (or 1/0, true/false, yes/no)"). Every field is read from the variable named in its
`validation_alias` (case-insensitive); empty values count as unset. Values of secret fields (`SecretStr`) are
never echoed in an error.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from firegen_core.redaction import got

from .models import IMAGE_MODEL_DEFAULT, VIDEO_MODEL_DEFAULT

OnOff = Literal["on", "off"]
AutoOnOff = Literal["auto", "on", "off"]
_BOOL_WORDS = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}


class SettingsError(ValueError):
    """A configuration mistake, said in one line that names the environment variable."""


def env(name: str, *more: str) -> Any:
    """The `validation_alias` of a field read from the variable `name` (or, failing it, from `more`)."""
    return AliasChoices(name, *more) if more else name


class ModelSettings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, env_ignore_empty=True, extra="ignore", frozen=True)

    image_model: str = Field(IMAGE_MODEL_DEFAULT, validation_alias=env("IMAGE_MODEL"))
    video_model: str = Field(VIDEO_MODEL_DEFAULT, validation_alias=env("VIDEO_MODEL"))
    device: str | None = Field(None, validation_alias=env("FIREGEN_DEVICE"))  # None: CUDA when present
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(None, validation_alias=env("FIREGEN_DTYPE"))
    offload_text_encoder: AutoOnOff = Field("auto", validation_alias=env("FIREGEN_OFFLOAD_TEXT_ENCODER"))
    # Speed options (generation.compiling, generation.fp8, generation.video_speed); the engine checks at start-up
    # what depends on the card (FP8) or on diffusers (the attention backend's name, the video cache's threshold).
    compile: AutoOnOff = Field("auto", validation_alias=env("FIREGEN_COMPILE"))
    compile_cache: str | None = Field(None, validation_alias=env("FIREGEN_COMPILE_CACHE"))
    hf_home: str | None = Field(None, validation_alias=env("HF_HOME"))
    fp8: OnOff = Field("off", validation_alias=env("FIREGEN_FP8"))  # lossy: only ever asked for, never "auto"
    attention_backend: str = Field("auto", validation_alias=env("FIREGEN_ATTENTION_BACKEND"))
    video_cache: str = Field("off", validation_alias=env("FIREGEN_VIDEO_CACHE"))
    video_cache_threshold: str | None = Field(None, validation_alias=env("FIREGEN_VIDEO_CACHE_THRESHOLD"))
    preload: OnOff = Field("off", validation_alias=env("FIREGEN_PRELOAD"))
    cache_dir: str | None = Field(None, validation_alias=env("FIREGEN_CACHE"))
    hf_hub_offline: OnOff = Field("off", validation_alias=env("HF_HUB_OFFLINE"))

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, data: Any) -> Any:
        # Spaces alone count as unset, as an empty value does (env_ignore_empty): " " was refused as "a valid
        # integer" where "" took the default (an audit).
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if not (isinstance(value, str) and not value.strip())}
        return data

    @field_validator("image_model", "video_model", "device", "attention_backend", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        # A device torch would refuse only when the first model loads (or, named "cuda" on a machine without one,
        # with a traceback): refused here by its form; Runtime.detect then checks that the card is there.
        if value is not None and not re.fullmatch(r"(cpu|cuda|mps|xpu)(:[0-9]+)?", value.lower()):
            raise ValueError("cpu, cuda, cuda:N, mps or xpu")
        return value.lower() if value is not None else None

    @field_validator("dtype", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("offload_text_encoder", "compile", "fp8", "preload", "hf_hub_offline", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        value = value.strip().lower() if isinstance(value, str) else value
        return _BOOL_WORDS.get(value, value)


S = TypeVar("S", bound=BaseSettings)


def env_var(cls: type[BaseSettings], field: str) -> str:
    """The (first) environment variable a field is read from."""
    alias = cls.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return str(alias or field).upper()


def _field_of(cls: type[BaseSettings], loc: str) -> str | None:
    for name, info in cls.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias or name]
        if loc.lower() in (str(choice).lower() for choice in choices) or loc == name:
            return name
    return None


def _line(cls: type[BaseSettings], error: Mapping[str, Any]) -> str:
    loc = str(error["loc"][0]) if error.get("loc") else ""
    field = _field_of(cls, loc)
    var = env_var(cls, field) if field else loc.upper()
    kind = error.get("type", "")
    annotation = cls.model_fields[field].annotation if field else None
    if kind == "missing":
        return f"{var} is required"
    if kind == "literal_error":
        options = [arg for arg in get_args(annotation) if arg is not None and not isinstance(arg, type)]
        flat = [o for arg in options for o in (get_args(arg) or [arg])]
        # The words taken for on and off are said too (an audit: "must be one of on, off" where `true` was refused
        # for a typo, and `1` would have done).
        also = " (or 1/0, true/false, yes/no)" if {"on", "off"} <= set(flat) else ""
        return f"{var} must be one of {', '.join(map(str, flat))}{also}"
    msg = str(error.get("msg", "is invalid"))
    msg = msg.removeprefix("Value error, ").removeprefix("Input should be ")
    if annotation is not None and SecretStr in (annotation, *get_args(annotation)):
        return f"{var} {msg}"  # a secret's value is never echoed, not even a wrong one
    return f"{var} must be {msg} {got(error.get('input'))}"


@functools.cache
def _mapping_only(cls: type[S]) -> type[S]:
    class FromMapping(cls):  # type: ignore[valid-type, misc]
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, **other_sources):
            return (init_settings,)

    FromMapping.__name__ = cls.__name__
    return FromMapping


def load(cls: type[S], environ: Mapping[str, str] | None = None, **values: Any) -> S:
    """`cls` from the environment (or from `environ` alone); `values` by field name win over both.
    Raises SettingsError, one line naming each wrong variable."""
    init = {env_var(cls, name): value for name, value in values.items()}
    try:
        if environ is None:
            return cls(**init)
        # An explicit mapping, read as the environment would be (names in any case, empty values unset), and
        # nothing else: not the process's environment.
        data = {key.upper(): value for key, value in environ.items() if str(value).strip()}
        return _mapping_only(cls)(**{**data, **init})
    except ValidationError as e:
        raise SettingsError("; ".join(_line(cls, err) for err in e.errors())) from None


def model_settings(environ: Mapping[str, str] | None = None, **defaults: Any) -> ModelSettings:
    """ModelSettings where `defaults` (by field name) apply to variables that are unset (the CLI's `tiny`)."""
    source = os.environ if environ is None else environ
    unset = {k: v for k, v in defaults.items() if not str(source.get(env_var(ModelSettings, k), "")).strip()}
    return load(ModelSettings, environ, **unset)
