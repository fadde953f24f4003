"""The contract as JSON Schema (draft 2020-12): the generation request and the job document.

Pure functions of `contract.py`, `errors.py` and `lifecycle.py`, so clients in other languages get their types
and the form's ranges from the same source as the worker's validation (devtools/web_types.py, `make web-types`,
turns this into web/src/contract.gen.ts; tests/test_schema.py fails when the two drift). The schema describes the valid
shapes; the exact messages for invalid ones stay the worker's (`contract.py`).
"""

from __future__ import annotations

from typing import Any

from . import contract, errors, lifecycle, quota

SCHEMA_VERSION = "https://json-schema.org/draft/2020-12/schema"
TIMESTAMP_REF = {"$ref": "#/$defs/Timestamp"}

# A Firestore timestamp as a client SDK reads it (firebase/firestore's Timestamp has both fields).
TIMESTAMP = {
    "type": "object",
    "description": "A Firestore timestamp",
    "properties": {"seconds": {"type": "integer"}, "nanoseconds": {"type": "integer"}},
    "required": ["seconds", "nanoseconds"],
}

_DESCRIPTIONS = {
    "prompt": "Text description for generation",
    "negative_prompt": "What to avoid in generation",
    "user_id": "Firebase user UID",
    "file_uid": "Unique identifier for this generation (the job document's id)",
    "use_cloud_storage": "Must be true for Firebase integration",
    "seed": "For reproducible results (null = random); image i of n uses seed + i",
    "width": "Image width",
    "height": "Image height",
    "num_images_per_prompt": "Number of images to generate",
    "num_inference_steps": "Quality vs speed tradeoff",
    "guidance_scale": "How closely to follow the prompt",
    "num_frames": "Video length in frames",
    "fps": "Frames per second",
    "video_width": "Video width",
    "video_height": "Video height",
    "video_guidance_scale": "Video-specific guidance",
}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _param(name: str) -> dict[str, Any]:
    spec = contract.PARAMS[name]
    out: dict[str, Any] = {
        "type": "integer" if spec.kind is int else "number",
        "minimum": spec.kind(spec.low),
        "maximum": spec.kind(spec.high),
        "default": spec.default,
    }
    if spec.multiple_of:
        out["multipleOf"] = spec.multiple_of
    if spec.video:
        out["x-video"] = True  # a video field: giving one makes a text2video job
    return out


def _id() -> dict[str, Any]:
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": contract.MAX_ID_CHARS,
        # Anchored: a JSON Schema pattern matches anywhere in the string (the unicode review: "../../x" passed).
        "pattern": f"^{contract._ID_PATTERN.pattern}$",
        # And a final newline, which `$` lets through in Python's re (a validator written in Python uses it).
        "not": {"pattern": f"^{contract._RESERVED_ID.pattern}$|\n"},
    }


def request_properties() -> dict[str, dict[str, Any]]:
    text = {"type": "string", "maxLength": contract.MAX_PROMPT_CHARS}
    props: dict[str, dict[str, Any]] = {
        # Something visible: a prompt of spaces, control or format characters alone is "prompt is required". An
        # ECMA-262 pattern read with the u flag, as JSON Schema 2020-12 validators read one (Ajv 8's default): its
        # characters past U+FFFF are characters, not UTF-16 pairs.
        "prompt": {**text, "minLength": 1, "pattern": f"[^{contract.BLANK_CLASS}]"},
        "negative_prompt": _nullable(text),
        "user_id": _id(),
        "file_uid": _id(),
        "use_cloud_storage": {"type": "boolean"},
        "seed": _nullable({"type": "integer", "minimum": contract.INT64_MIN, "maximum": contract.INT64_MAX}),
        **{name: _param(name) for name in contract.PARAMS},
    }
    if props.keys() != contract.KNOWN_FIELDS:  # drift guard: a new request field must get a type here
        raise RuntimeError(
            f"schema.py: request fields differ from the contract's: {props.keys() ^ contract.KNOWN_FIELDS}"
        )
    for name, schema in props.items():
        schema["description"] = _DESCRIPTIONS[name]
    return props


def request_schema() -> dict[str, Any]:
    """The runsync `input` (and the `generateWithRunPod` callable's data, where the ids may be left out)."""
    return {
        "$schema": SCHEMA_VERSION,
        "title": "GenerationRequest",
        "type": "object",
        "properties": request_properties(),
        "required": ["prompt", "user_id", "file_uid", "use_cloud_storage"],
        "additionalProperties": False,
    }


def _state_properties() -> dict[str, dict[str, Any]]:
    number = {"type": "number", "minimum": 0}
    urls = {"type": "array", "items": {"type": "string"}}
    props: dict[str, dict[str, Any]] = {
        "status": {"enum": [lifecycle.QUEUED, lifecycle.PROCESSING, lifecycle.COMPLETED, lifecycle.FAILED]},
        "created_at": TIMESTAMP_REF,
        "modified": TIMESTAMP_REF,
        "generated": {"type": "boolean"},
        "error": {"type": "boolean"},
        "task_type": {"enum": [contract.TEXT2IMAGE, contract.TEXT2VIDEO]},
        "media_type": {"enum": sorted(contract.TASK_TYPE)},
        "worker_id": {"type": "string"},
        "lease_expires_at": TIMESTAMP_REF,
        "attempts": {"type": "integer", "minimum": 0},
        "started_at": TIMESTAMP_REF,
        "progress": {"type": "number", "minimum": 0, "maximum": 1},
        "completed_at": TIMESTAMP_REF,
        "failed_at": TIMESTAMP_REF,
        "error_message": {"type": "string"},
        "error_type": {"enum": list(errors.ERROR_TYPES)},
        "images": urls,
        "image_url": {"type": "string"},
        "image_count": {"type": "integer", "minimum": 1},
        "videos": urls,
        "video_url": {"type": "string"},
        "video_info": {"$ref": "#/$defs/VideoInfo"},
        "queue_seconds": number,
        "generation_seconds": number,
        "upload_seconds": number,
        lifecycle.PROMPT_TRUNCATED: {
            "type": "boolean",
            "description": "On a completed job: the model took only the start of the prompt (77 CLIP tokens for images)",
        },
        "dispatch_count": {"type": "integer", "minimum": 0},
        "dispatched_at": TIMESTAMP_REF,
        "dispatched_by": {"enum": ["callable", "trigger", "scheduler"]},
        # The last dispatch's own id: its dispatcher knows its marking landed where the write's answer was lost.
        "dispatch_token": {"type": "string"},
        "dispatch_error": {"type": "string"},
        # The requests the functions sent to RunPod for the job, not arrived yet, as digests (dispatches.fingerprint).
        "dispatched_inputs": {"type": "array", "items": {"type": "string"}},
        # The RunPod jobs of those that reached a worker (a redelivery of one is recognised by it).
        "arrived_dispatches": {"type": "array", "items": {"type": "string"}},
        # Issue #11: the owner asks to stop a queued or processing job; it then ends failed, error_type Cancelled.
        "cancel_requested": {"type": "boolean"},
        "releases": {"type": "integer", "minimum": 0},
        # Running tries its requests stopped, to run it again with the parameters they stated (lifecycle.restate).
        lifecycle.RESTATED: {"type": "integer", "minimum": 0},
        # Per-user limits (firegen_core.quota): admitted into the user's usage, at this estimated cost.
        "quota_admitted": {"type": "boolean"},
        "cost": number,
        "charged_on": {"type": "string", "format": "date"},
        # What the job is charged if it ends before a worker takes it again: what tries a restatement stopped used,
        # and its released tries.
        quota.STOPPED_COST: number,
        # GPU-seconds its tries ran until their leaving workers gave it back (not in `cost`).
        quota.RELEASED_COST: number,
        "runpod_job_id": {"type": "string"},
        # Created by a request (runsync, the callable) with its parameters: never left to await them.
        contract.REQUESTED_AT: TIMESTAMP_REF,
        "expire_at": TIMESTAMP_REF,
    }
    return props


VIDEO_INFO = {
    "type": "object",
    "properties": {
        "frames": {"type": "integer"},
        "fps": {"type": "number"},
        "duration_seconds": {"type": "number"},
        "width": {"type": "integer"},
        "height": {"type": "integer"},
    },
    "required": ["frames", "fps", "duration_seconds", "width", "height"],
}


def job_doc_schema() -> dict[str, Any]:
    """A job document at generations/{user_id}/{images|videos}/{file_uid}, as a client reads it.

    The request's fields as given (snake_case; a doc a client wrote may also carry the client sample's camelCase
    spellings, which `contract.parse_document` reads too) and the state fields the worker and the functions write.
    """
    request = request_properties()
    # A refused request's doc keeps the prompt it was refused for, a blank one included.
    request["prompt"] = {
        name: value for name, value in request["prompt"].items() if name not in ("minLength", "pattern")
    }
    return {
        "$schema": SCHEMA_VERSION,
        "title": "JobDoc",
        "type": "object",
        "properties": {**request, **_state_properties()},
        "required": ["status"],  # a refused request's failed doc has no prompt where its prompt was no text
        "$defs": {"Timestamp": TIMESTAMP, "VideoInfo": VIDEO_INFO},
    }


def usage_doc_schema() -> dict[str, Any]:
    """A user's usage of the per-user limits at usage/{user_id} (quota.Usage.document), which its owner may read:
    what an app shows of what is left."""
    count = {"type": "integer", "minimum": 0}
    limits = {
        "type": "object",
        "description": "USER_MAX_RUNNING, USER_MAX_PENDING, USER_DAILY_BUDGET as the last writer had them",
        "properties": {"max_running": count, "max_pending": count, "daily_budget": {"type": "number"}},
        "required": ["max_running", "max_pending", "daily_budget"],
    }
    return {
        "$schema": SCHEMA_VERSION,
        "title": "UsageDoc",
        "type": "object",
        "properties": {
            "running": {**count, "description": "The user's admitted jobs processing now"},
            "pending": {**count, "description": "The user's admitted jobs queued or processing"},
            "spent_today": {"type": "number", "minimum": 0, "description": "GPU-seconds charged on `day`"},
            "day": {"type": "string", "format": "date", "description": "A UTC date: another day's spend is 0 today"},
            "limits": limits,
            "resets_at": {**TIMESTAMP_REF, "description": "The next UTC midnight, when the day's spend restarts"},
            "updated_at": TIMESTAMP_REF,
            "expire_at": TIMESTAMP_REF,
        },
        "required": ["running", "pending", "spent_today", "day", "limits", "resets_at", "updated_at"],
        "$defs": {"Timestamp": TIMESTAMP},
    }


def contract_schemas() -> dict[str, Any]:
    """The schemas and the enumerations a client needs, in one document."""
    return {
        "request": request_schema(),
        "job": job_doc_schema(),
        "usage": usage_doc_schema(),
        "media_types": dict(contract.MEDIA_TYPE),
        "error_types": list(errors.ERROR_TYPES),
        "final_states": list(lifecycle.FINAL_STATES),
    }
