"""The request contract of `shared/spec/worker-api.md`: validation with the contract's exact messages.

Pure: no I/O, no torch, no Firebase. Two doors lead in:
- `parse_runsync_input`: the strict runsync `input` (unknown fields refused, camelCase hinted);
- `parse_document`: a queued Firestore doc that a client or the callable wrote; ids come from its path and the
  client sample's camelCase option names are read as their snake_case fields.
Both return a `GenerationRequest` or raise `ContractError` whose `message` is what the client sees.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

TEXT2IMAGE = "text2image"
TEXT2VIDEO = "text2video"
MEDIA_TYPE = {TEXT2IMAGE: "images", TEXT2VIDEO: "videos"}
TASK_TYPE = {media: task for task, media in MEDIA_TYPE.items()}

MAX_PROMPT_CHARS = 2000
MAX_ID_CHARS = 128  # Firebase Auth uids are at most 128 characters.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


MAX_MESSAGE_CHARS = 300  # every message stored on a doc or returned to a client
MAX_QUOTED_CHARS = 60  # a client's own text quoted in a message (an unknown field's name)


NOT_BOOLEAN = "use_cloud_storage must be a boolean"  # runsync's; a doc's and the callable's alike

# A lone UTF-16 surrogate: JSON and JavaScript strings can carry one, UTF-8 (Firestore, HTTP bodies) cannot.
_SURROGATE = re.compile("[\ud800-\udfff]")
# What a prompt of no visible text holds: Python's whitespace (str.strip's), and control (Cc) and format (Cf)
# characters, which CLIP's text cleaning drops (the unicode review: a prompt of NUL, U+200B or U+FEFF ran as an
# empty one, charged). As a regex class (BMP as escapes, the rest as characters: Python's re and JavaScript's
# u-flag RegExp read it alike), which the JSON Schema's prompt pattern and the web page share (Unicode 14, as
# tests/test_contract.py derives it).
_BLANK_RANGES = (
    (0x0, 0x20), (0x7F, 0xA0), (0xAD, 0xAD), (0x600, 0x605), (0x61C, 0x61C), (0x6DD, 0x6DD), (0x70F, 0x70F),
    (0x890, 0x891), (0x8E2, 0x8E2), (0x1680, 0x1680), (0x180E, 0x180E), (0x2000, 0x200F), (0x2028, 0x202F),
    (0x205F, 0x2064), (0x2066, 0x206F), (0x3000, 0x3000), (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFB), (0x110BD, 0x110BD),
    (0x110CD, 0x110CD), (0x13430, 0x13438), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
)  # fmt: skip


def _class_char(code: int) -> str:
    return f"\\u{code:04x}" if code <= 0xFFFF else chr(code)


BLANK_CLASS = "".join(_class_char(low) + (f"-{_class_char(high)}" if high > low else "") for low, high in _BLANK_RANGES)
_BLANK = re.compile(f"[{BLANK_CLASS}]*")


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """At most `limit` characters, an ellipsis marking a cut; a lone surrogate (a client's text quoted) becomes
    U+FFFD, so that the message can always be written and sent."""
    text = _SURROGATE.sub("\ufffd", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ContractError(ValueError):
    """A request the contract refuses; `message` is the exact text for the client (at most 300 characters)."""

    def __init__(self, message: str):
        message = clip(message)
        super().__init__(message)
        self.message = message


def quoted(text: str) -> str:
    """A client's own text as a message quotes it: at most MAX_QUOTED_CHARS characters, each that would not show
    (control, format and separator characters: NUL, a newline, U+200B, U+202E) as its escape, so that the message
    says what was sent (the unicode review: "unknown field 'prompt\\u200b'" read as if `prompt` were unknown) and
    carries nothing a page or a log line would act on."""
    pieces = [char if char.isprintable() else ascii(char)[1:-1] for char in text]  # a lone surrogate: escaped too
    if sum(map(len, pieces)) <= MAX_QUOTED_CHARS:
        return "".join(pieces)
    kept, size = [], 0
    for piece in pieces:  # cut between escapes, never in one
        if size + len(piece) > MAX_QUOTED_CHARS - 1:
            break
        kept.append(piece)
        size += len(piece)
    return "".join(kept) + "…"


def invalid(what: str) -> ContractError:
    return ContractError(f"Validation failed: {what}")


@dataclass(frozen=True)
class Param:
    """One optional numeric parameter: its type, the contract's range, its default and a multiple it must be."""

    kind: type
    low: float
    high: float
    default: Any
    multiple_of: int | None = None
    video: bool = False


# Any side in range: one the model cannot take (SDXL: multiples of 8, Wan: of 16) is generated to the next one it
# can and cropped to the size asked (generation/capability.py `side_to_generate`). A video's must be even: H.264's
# 4:2:0 chroma, which every player takes, has no odd sides.
IMAGE_SIDE = Param(int, 256, 1024, 512)
VIDEO_SIDE = Param(int, 256, 1024, 512, multiple_of=2, video=True)

PARAMS: dict[str, Param] = {
    "width": IMAGE_SIDE,
    "height": IMAGE_SIDE,
    "num_images_per_prompt": Param(int, 1, 4, 1),
    "num_inference_steps": Param(int, 10, 50, 20),
    "guidance_scale": Param(float, 1.0, 20.0, 7.5),
    "num_frames": Param(int, 16, 81, 16, video=True),
    "fps": Param(int, 6, 15, 8, video=True),
    "video_width": VIDEO_SIDE,
    "video_height": VIDEO_SIDE,
    "video_guidance_scale": Param(float, 1.0, 20.0, 5.0, video=True),
}
VIDEO_FIELDS = frozenset(name for name, p in PARAMS.items() if p.video)
TEXT_FIELDS = ("prompt", "negative_prompt")
ID_FIELDS = ("user_id", "file_uid")
KNOWN_FIELDS = frozenset({*TEXT_FIELDS, *ID_FIELDS, "use_cloud_storage", "seed", *PARAMS})
PARAMETER_FIELDS = frozenset({*TEXT_FIELDS, "seed", *PARAMS})  # what a job generates from (not who or where)
# A video is made from these: the image fields are validated on it (the contract lists them for every request) but
# change nothing in it.
VIDEO_PARAMETER_FIELDS = PARAMETER_FIELDS - {"width", "height", "num_images_per_prompt", "guidance_scale"}

_ID_PATTERN = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_\-.:@+=~]*")
_RESERVED_ID = re.compile(r"__.*__")


def snake_case(name: str) -> str:
    """A name's snake_case guess (`FileUID`: `file_uid`): the hint of a refusal, never a field's reading."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def camel_case(name: str) -> str:
    """A field's spelling in the contract's client sample (`num_frames`: `numFrames`), as firestore.rules and
    the web app know it."""
    return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), name)


def _format_bound(value: float, kind: type) -> str:
    return f"{float(value):.1f}" if kind is float else str(int(value))


@dataclass(frozen=True)
class GenerationRequest:
    """A validated job. Defaults are the contract's; `task_type` follows from the video fields given."""

    prompt: str
    user_id: str | None = None
    file_uid: str | None = None
    use_cloud_storage: bool = True
    task_type: str = TEXT2IMAGE
    negative_prompt: str | None = None
    seed: int | None = None
    width: int = PARAMS["width"].default
    height: int = PARAMS["height"].default
    num_images_per_prompt: int = PARAMS["num_images_per_prompt"].default
    num_inference_steps: int = PARAMS["num_inference_steps"].default
    guidance_scale: float = PARAMS["guidance_scale"].default
    num_frames: int = PARAMS["num_frames"].default
    fps: int = PARAMS["fps"].default
    video_width: int = PARAMS["video_width"].default
    video_height: int = PARAMS["video_height"].default
    video_guidance_scale: float = PARAMS["video_guidance_scale"].default
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @property
    def media_type(self) -> str:
        return MEDIA_TYPE[self.task_type]

    @property
    def is_video(self) -> bool:
        return self.task_type == TEXT2VIDEO

    def parameters(self) -> dict[str, Any]:
        """The request's fields as the client gave them (for a job document or the runsync input)."""
        data = asdict(self)
        return {name: data[name] for name in sorted(self.given | {"prompt"}) if name in KNOWN_FIELDS}

    def runsync_parameters(self) -> dict[str, Any]:
        """`parameters()` as a runsync input states them: a video naming no video field (all defaults, its doc in
        `videos`) names num_frames, since runsync tells a video by its video fields."""
        data = self.parameters()
        if self.is_video and not VIDEO_FIELDS & data.keys():
            data["num_frames"] = self.num_frames
        return data


def _check_text(data: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = data.get(name)
    if value is None or (required and isinstance(value, str) and _BLANK.fullmatch(value)):
        if required:
            raise ContractError(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string")
    if len(value) > MAX_PROMPT_CHARS:
        raise invalid(f"{name} must be at most {MAX_PROMPT_CHARS} characters")
    if _SURROGATE.search(value):
        raise invalid(f"{name} must be valid Unicode text (it holds a lone UTF-16 surrogate)")
    return value


def check_id(name: str, value: Any) -> str:
    """A safe Firestore document id and Storage path segment, or ContractError naming the field."""
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string")
    if len(value) > MAX_ID_CHARS:
        raise invalid(f"{name} must be at most {MAX_ID_CHARS} characters")
    if not _ID_PATTERN.fullmatch(value) or _RESERVED_ID.fullmatch(value):
        raise invalid(
            f"{name} may contain only ASCII letters, digits and - _ . : @ + = ~, must start with a letter, a digit, "
            "- or _ and must not look like __name__"
        )
    return value


# Past JavaScript's Number.MAX_SAFE_INTEGER a double no longer tells neighbouring integers apart (2^53 + 1 arrives
# as 2^53): a seed sent as floating point past it may have been rounded.
MAX_SAFE_INTEGER = 2**53 - 1


def _whole(value: Any) -> Any:
    """A whole number sent as floating point (1024.0) as an int: what Flutter and Unity apps on phones, an Android
    or iOS Slider, Python's float arithmetic and Jackson send for a whole number, and what the JSON Schema's
    `integer` allows (a review: one Dart app's docs ran on the web and failed on phones)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _check_number(name: str, value: Any) -> int | float:
    spec = PARAMS[name]
    if spec.kind is int:
        value = _whole(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(f"{name} must be an integer")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{name} must be a number")
    # An int compares exactly at any size; math.isfinite would overflow on one past float's range (10**400).
    if not ((isinstance(value, int) or math.isfinite(value)) and spec.low <= value <= spec.high):
        low, high = _format_bound(spec.low, spec.kind), _format_bound(spec.high, spec.kind)
        raise ContractError(f"{name} must be between {low} and {high}")
    if spec.multiple_of and value % spec.multiple_of:
        model = "H.264 video" if spec.video else "SDXL"
        raise invalid(f"{name} must be a multiple of {spec.multiple_of} for {model} (got {value})")
    return spec.kind(value)


def _check_seed(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) > MAX_SAFE_INTEGER:
        raise invalid("seed must be an integer or null (one past 2^53 sent as floating point may have been rounded)")
    value = _whole(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid("seed must be an integer or null")
    if not INT64_MIN <= value <= INT64_MAX:
        raise invalid("seed must fit in a signed 64-bit integer")
    return value


def _build(data: Mapping[str, Any], *, use_cloud_storage: bool, task_type: str) -> GenerationRequest:
    """Type- and range-check the parameters common to both doors; ids are checked by the callers."""
    values: dict[str, Any] = {
        "prompt": _check_text(data, "prompt", required=True),
        "negative_prompt": _check_text(data, "negative_prompt", required=False),
        "seed": _check_seed(data.get("seed")),
    }
    for name in PARAMS:
        if data.get(name) is not None:
            values[name] = _check_number(name, data[name])
    given = frozenset(name for name in KNOWN_FIELDS if data.get(name) is not None)
    return GenerationRequest(
        **values,
        user_id=data.get("user_id"),
        file_uid=data.get("file_uid"),
        use_cloud_storage=use_cloud_storage,
        task_type=task_type,
        given=given,
    )


def _video_given(data: Mapping[str, Any]) -> bool:
    return any(data.get(name) is not None for name in VIDEO_FIELDS)


def media_type_of(data: Mapping[str, Any]) -> str:
    """The collection a request's job doc is in ("videos" when it gives any video field), valid or not."""
    return MEDIA_TYPE[TEXT2VIDEO if _video_given(data) else TEXT2IMAGE]


def parse_runsync_input(data: Any) -> GenerationRequest:
    """Validate the `input` of a runsync request, strictly."""
    if not isinstance(data, Mapping):
        raise invalid("input must be a JSON object")
    refuse_unknown(data, KNOWN_FIELDS)
    _check_text(data, "prompt", required=True)
    cloud = data.get("use_cloud_storage")
    if cloud is None:
        raise ContractError("use_cloud_storage is required")
    if not isinstance(cloud, bool):
        raise invalid(NOT_BOOLEAN)
    for name in ID_FIELDS:
        value = data.get(name)
        if cloud and (value is None or (isinstance(value, str) and not value.strip())):
            # Blank is missing, as for the prompt (an audit: " " was told of the id's characters instead).
            raise ContractError("user_id and file_uid are required for cloud storage")
        if value is None or value == "":
            continue
        check_id(name, value)
    task_type = TEXT2VIDEO if _video_given(data) else TEXT2IMAGE
    return _build(data, use_cloud_storage=cloud, task_type=task_type)


def refuse_unknown(data: Mapping[str, Any], known: Collection[str]) -> None:
    """Refuse the first name of `data` not in `known`, hinting at its snake_case spelling where that is known."""
    for name in data:
        if name not in known:
            hint = snake_case(str(name))
            suffix = f" (did you mean '{hint}'?)" if hint in known else ""
            raise invalid(f"unknown field '{quoted(str(name))}'{suffix}")


def field_name(name: str, known: Collection[str] = KNOWN_FIELDS) -> str:
    """The field a name of a request or doc stands for: itself, or the field whose client-sample camelCase
    spelling it is. No other spelling (`Seed`, `FILE_UID`, `fileUID`): the rules let no client doc hold one,
    the web app reads none, and a callable refuses it as the unknown field it is (audit: `fileUID` cancelled)."""
    snake = snake_case(name)
    return snake if snake in known and name in (snake, camel_case(snake)) else name


def spellings(data: Mapping[str, Any], key: str, known: Collection[str] = KNOWN_FIELDS) -> list[tuple[str, Any]]:
    """Each (name, value) of `data` that stands for the field `key`, in any spelling."""
    return [(name, value) for name, value in data.items() if field_name(name, known) == key]


def left_out(value: Any) -> bool:
    """A null or empty value: a field given so says nothing (the contract reads null as left out)."""
    return value is None or value == ""


def normalise_document_fields(
    data: Mapping[str, Any],
    known: Collection[str] = KNOWN_FIELDS,
    *,
    first: bool = False,
    called: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Read the client sample's camelCase spellings (numFrames, ...) as their snake_case fields.

    Unknown names are kept as they are, so the caller decides whether they matter. A spelling that is null or
    empty gives way to one that says something, whatever their order. A field given twice with different values
    (of different types too: `1` is not `true`) is refused, or with `first`, read as its first spelling says (a
    refusal's record); the refusal names the field as `called` does (a callable whose words are camelCase).
    """
    out: dict[str, Any] = {}
    for name, value in data.items():
        key = field_name(name, known)
        if key not in out or left_out(out[key]):
            out[key] = value
        elif left_out(value) or same(value, out[key]):
            continue
        elif not first:
            raise invalid(f"{(called or {}).get(key, key)} is given twice with different values")
    return out


def same(a: Any, b: Any) -> bool:
    """One value twice: equal numbers whatever their type (7 and 7.0: a camelCase map merged with snake_case
    options), else equal values of one type (`1` is not `true`). Lists nested past Python's recursion limit are
    not compared (the fuzz audit: RecursionError): no field takes a list."""
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b))
    try:
        equal = bool(a == b)
    except RecursionError:
        equal = False
    return equal and (numbers or type(a) is type(b))


def restatement(doc: Mapping[str, Any], request: GenerationRequest) -> dict[str, Any]:
    """The parameters `request` gives that its job's existing doc says otherwise, as {field: the request's value}.

    The contract's own Firebase Function flow writes the queued doc with the prompt and "other metadata", then
    sends the parameters to runsync: the request is the job, and answering "accepted" while generating the doc's
    defaults would be a silent change. A field the request leaves out (or a null seed) has no opinion; values
    compare as parsed, so a doc's camelCase spelling or a default it leaves out equals what the request says. On a
    video the image fields are none (a video review: another `width` ran a video again, charged, for the same
    video, and a finished one was refused).
    """
    try:
        fields = normalise_document_fields(doc)
    except ContractError:
        fields = dict(doc)
    try:
        current = asdict(_build(fields, use_cloud_storage=True, task_type=request.task_type))
    except ContractError:  # a doc that breaks the contract: compare what it holds
        current = fields
    return {
        name: getattr(request, name)
        for name in sorted(request.given & (VIDEO_PARAMETER_FIELDS if request.is_video else PARAMETER_FIELDS))
        if _meant(name, current.get(name)) != _meant(name, getattr(request, name))
    }


def _meant(name: str, value: Any) -> Any:
    """What a parameter's value makes: a blank negative prompt is none (a review: `""` against a doc without one
    restated a running job, which ran again for the same image)."""
    if name == "negative_prompt" and isinstance(value, str) and not value.strip():
        return None
    return value


# Written on a job doc by the request that created it (runsync, the callable: `jobs.queued_document`), and only
# there: such a doc states its request, however few parameters it names. Clients cannot write it (the rules).
REQUESTED_AT = "requested_at"
# How long a doc that awaits its parameters may be left to its request, at most (PLACEHOLDER_GRACE_SECONDS: the
# workers, the trigger and make dev): the trigger that waits it out has 120 s in all.
MAX_PLACEHOLDER_GRACE_SECONDS = 60


def awaits_parameters(doc: Mapping[str, Any]) -> bool:
    """A queued doc that names its job's prompt and none of its parameters: what the contract's own Firebase
    Function flow writes (prompt and "other metadata", which may well be `task_type`, `user_id`...) before it
    sends the parameters to runsync. A worker that ran it at once would generate the defaults, and a fast job
    would be finished, with the wrong parameters, before its request arrives. A doc a request wrote (the
    callable, a runsync handler: `REQUESTED_AT`) is the request already."""
    if doc.get(REQUESTED_AT) is not None:
        return False
    try:
        fields = normalise_document_fields(doc)
        _check_text(fields, "prompt", required=True)  # one with no usable prompt is refused now: no request fixes it
    except ContractError:
        return False
    # An empty negative prompt is none (a function's "other metadata" may well carry one).
    stated = {name for name in PARAMETER_FIELDS - {"prompt"} if fields.get(name) is not None}
    return stated <= {"negative_prompt"} and not fields.get("negative_prompt")


def finished_otherwise(request: GenerationRequest, changes: Mapping[str, Any]) -> ContractError:
    """The answer to a request whose file_uid names a finished job that ran with other parameters."""
    file_uid = clip(str(request.file_uid), MAX_QUOTED_CHARS)
    return invalid(
        f"file_uid '{file_uid}' already finished with other parameters ({', '.join(changes)}); "
        "use a new file_uid for a new job"
    )


# A job doc's results go to Cloud Storage: inline results (`use_cloud_storage: false`) are runsync's alone.
CLOUD_ONLY = "use_cloud_storage must be true: results go to Cloud Storage"


def parse_document(user_id: str, media_type: str, file_uid: str, data: Mapping[str, Any]) -> GenerationRequest:
    """Turn a job document at generations/{user_id}/{media_type}/{file_uid} into a request.

    The path decides the ids and the task type; fields the worker and clients keep for state are skipped, and
    so are unknown ones (the security rules keep clients to known fields; an admin may add its own metadata).
    """
    check_id("user_id", user_id)
    check_id("file_uid", file_uid)
    if media_type not in TASK_TYPE:
        raise invalid(f"media type must be 'images' or 'videos', not '{quoted(str(media_type))}'")
    fields = {k: v for k, v in normalise_document_fields(data).items() if k in KNOWN_FIELDS}
    _check_text(fields, "prompt", required=True)  # first, as runsync and the callable check it
    cloud = fields.get("use_cloud_storage")
    if cloud is not None and not isinstance(cloud, bool):  # as runsync says it (1 == True, and is no boolean)
        raise invalid(NOT_BOOLEAN)
    task_type = TASK_TYPE[media_type]
    if task_type == TEXT2IMAGE and _video_given(fields):
        video_field = sorted(name for name in VIDEO_FIELDS if fields.get(name) is not None)[0]
        raise invalid(f"{video_field} is a video field: video jobs belong under generations/{{user_id}}/videos")
    fields.update(user_id=user_id, file_uid=file_uid)
    request = _build(fields, use_cloud_storage=True, task_type=task_type)
    if cloud is False:  # after the parameters, as the callable refuses it
        raise invalid(CLOUD_ONLY)
    return request
