"""Every rule of the request contract, with the exact message a client sees."""

import re

import pytest
from fixtures_requests import valid_value
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools.stack import IMAGE_EXAMPLE, VIDEO_EXAMPLE
from firegen_core.contract import (
    CLOUD_ONLY,
    PARAMETER_FIELDS,
    TEXT2IMAGE,
    TEXT2VIDEO,
    VIDEO_FIELDS,
    ContractError,
    GenerationRequest,
    awaits_parameters,
    parse_document,
    parse_runsync_input,
    restatement,
)
from firegen_core.jobs import queued_document

BASE = {"prompt": "A red sports car on a mountain road", "user_id": "u1", "file_uid": "f1", "use_cloud_storage": True}


def refused(data) -> str:
    with pytest.raises(ContractError) as info:
        parse_runsync_input(data)
    return info.value.message


def with_(**fields):
    data = dict(BASE)
    for name, value in fields.items():
        if value is ...:
            data.pop(name)
        else:
            data[name] = value
    return data


ID_RULE = (
    "may contain only ASCII letters, digits and - _ . : @ + = ~, must start with a letter, a digit, - or _ "
    "and must not look like __name__"
)

REFUSALS = [
    # required fields
    (with_(prompt=...), "prompt is required"),
    (with_(prompt=None), "prompt is required"),
    (with_(prompt=""), "prompt is required"),
    (with_(prompt="   "), "prompt is required"),
    # nothing visible: control and format characters, which CLIP's cleaning drops (the unicode review)
    (with_(prompt="\x00"), "prompt is required"),
    (with_(prompt=" \u200b\ufeff\u2028\U000e0041 "), "prompt is required"),
    (with_(use_cloud_storage=...), "use_cloud_storage is required"),
    (with_(user_id=...), "user_id and file_uid are required for cloud storage"),
    (with_(file_uid=...), "user_id and file_uid are required for cloud storage"),
    (with_(user_id=None, file_uid=None), "user_id and file_uid are required for cloud storage"),
    (with_(file_uid=""), "user_id and file_uid are required for cloud storage"),
    (with_(user_id=" "), "user_id and file_uid are required for cloud storage"),
    (with_(file_uid="\t\n"), "user_id and file_uid are required for cloud storage"),
    # ranges, with the contract's bounds
    (with_(width=255), "width must be between 256 and 1024"),
    (with_(width=1032), "width must be between 256 and 1024"),
    (with_(height=128), "height must be between 256 and 1024"),
    (with_(num_images_per_prompt=0), "num_images_per_prompt must be between 1 and 4"),
    (with_(num_images_per_prompt=5), "num_images_per_prompt must be between 1 and 4"),
    (with_(num_inference_steps=9), "num_inference_steps must be between 10 and 50"),
    (with_(num_inference_steps=51), "num_inference_steps must be between 10 and 50"),
    (with_(guidance_scale=0.5), "guidance_scale must be between 1.0 and 20.0"),
    (with_(guidance_scale=20.5), "guidance_scale must be between 1.0 and 20.0"),
    (with_(guidance_scale=float("nan")), "guidance_scale must be between 1.0 and 20.0"),
    (with_(guidance_scale=float("inf")), "guidance_scale must be between 1.0 and 20.0"),
    (with_(num_frames=15), "num_frames must be between 16 and 81"),
    (with_(num_frames=82), "num_frames must be between 16 and 81"),
    (with_(fps=5), "fps must be between 6 and 15"),
    (with_(fps=16), "fps must be between 6 and 15"),
    (with_(video_width=240), "video_width must be between 256 and 1024"),
    (with_(video_height=1040), "video_height must be between 256 and 1024"),
    (with_(video_guidance_scale=0.9), "video_guidance_scale must be between 1.0 and 20.0"),
    (with_(video_guidance_scale=21), "video_guidance_scale must be between 1.0 and 20.0"),
    (with_(width=10**400), "width must be between 256 and 1024"),
    (with_(guidance_scale=-(10**400)), "guidance_scale must be between 1.0 and 20.0"),
    # strict types
    (with_(width=True), "Validation failed: width must be an integer"),
    (with_(width="512"), "Validation failed: width must be an integer"),
    (with_(width=512.5), "Validation failed: width must be an integer"),
    (with_(width=float("nan")), "Validation failed: width must be an integer"),
    (with_(seed=4.5), "Validation failed: seed must be an integer or null"),
    (
        with_(seed=float(2**60)),
        "Validation failed: seed must be an integer or null (one past 2^53 sent as floating point may have been "
        "rounded)",
    ),
    (with_(num_frames=16.5), "Validation failed: num_frames must be an integer"),
    (with_(guidance_scale="7.5"), "Validation failed: guidance_scale must be a number"),
    (with_(guidance_scale=False), "Validation failed: guidance_scale must be a number"),
    (with_(prompt=42), "Validation failed: prompt must be a string"),
    (with_(prompt=["a"]), "Validation failed: prompt must be a string"),
    (with_(prompt="x" * 2001), "Validation failed: prompt must be at most 2000 characters"),
    (with_(negative_prompt=3), "Validation failed: negative_prompt must be a string"),
    (
        with_(prompt="a\udfff"),
        "Validation failed: prompt must be valid Unicode text (it holds a lone UTF-16 surrogate)",
    ),
    (
        with_(negative_prompt="\ud83d"),
        "Validation failed: negative_prompt must be valid Unicode text (it holds a lone UTF-16 surrogate)",
    ),
    (with_(**{"\ud800x": 1}), "Validation failed: unknown field '\\ud800x'"),
    (with_(**{"\u200b" * 40: 1}), "Validation failed: unknown field '" + "\\u200b" * 9 + "…'"),
    (with_(seed="42"), "Validation failed: seed must be an integer or null"),
    (with_(seed=1.5), "Validation failed: seed must be an integer or null"),
    (with_(seed=True), "Validation failed: seed must be an integer or null"),
    (with_(seed=2**63), "Validation failed: seed must fit in a signed 64-bit integer"),
    (with_(seed=-(2**63) - 1), "Validation failed: seed must fit in a signed 64-bit integer"),
    (with_(use_cloud_storage="true"), "Validation failed: use_cloud_storage must be a boolean"),
    (with_(use_cloud_storage=1), "Validation failed: use_cloud_storage must be a boolean"),
    (with_(user_id=123), "Validation failed: user_id must be a string"),
    # unknown fields, with hints for camelCase
    (with_(numFrames=16), "Validation failed: unknown field 'numFrames' (did you mean 'num_frames'?)"),
    (with_(guidanceScale=7), "Validation failed: unknown field 'guidanceScale' (did you mean 'guidance_scale'?)"),
    (with_(fileUid="x"), "Validation failed: unknown field 'fileUid' (did you mean 'file_uid'?)"),
    (with_(style="anime"), "Validation failed: unknown field 'style'"),
    # what would not show is written as its escape (the unicode review)
    (with_(**{"prompt\u200b": "x"}), "Validation failed: unknown field 'prompt\\u200b'"),
    (with_(**{"a\x00\n\u202e\U000e0041b": 1}), "Validation failed: unknown field 'a\\x00\\n\\u202e\\U000e0041b'"),
    # ids are safe Firestore document ids and Storage path segments
    (with_(user_id="a/b"), f"Validation failed: user_id {ID_RULE}"),
    (with_(file_uid="../etc"), f"Validation failed: file_uid {ID_RULE}"),
    (with_(file_uid="."), f"Validation failed: file_uid {ID_RULE}"),
    (with_(file_uid=".."), f"Validation failed: file_uid {ID_RULE}"),
    (with_(user_id="a\nb"), f"Validation failed: user_id {ID_RULE}"),
    (with_(user_id="a\x00b"), f"Validation failed: user_id {ID_RULE}"),
    (with_(file_uid="a b"), f"Validation failed: file_uid {ID_RULE}"),
    (with_(file_uid="a\\b"), f"Validation failed: file_uid {ID_RULE}"),
    (with_(file_uid="__name__"), f"Validation failed: file_uid {ID_RULE}"),
    (with_(file_uid="~a"), f"Validation failed: file_uid {ID_RULE}"),
    (with_(user_id="@a"), f"Validation failed: user_id {ID_RULE}"),
    (with_(user_id="u" * 129), "Validation failed: user_id must be at most 128 characters"),
    # an odd side, which H.264's 4:2:0 video cannot have
    (with_(video_width=257), "Validation failed: video_width must be a multiple of 2 for H.264 video (got 257)"),
    (with_(video_height=1023), "Validation failed: video_height must be a multiple of 2 for H.264 video (got 1023)"),
    # not an object at all
    (None, "Validation failed: input must be a JSON object"),
    ([BASE], "Validation failed: input must be a JSON object"),
    ("prompt", "Validation failed: input must be a JSON object"),
]


@pytest.mark.parametrize("data,message", REFUSALS, ids=[m for _, m in REFUSALS])
def test_refusals_carry_the_contracts_message(data, message):
    assert refused(data) == message


def test_contract_image_example_is_text2image_with_defaults():
    """The contract's "Testing Examples" as written (make dev runs them)."""
    request = parse_runsync_input(IMAGE_EXAMPLE)
    assert request.task_type == TEXT2IMAGE and request.media_type == "images" and not request.is_video
    assert (request.width, request.height, request.num_images_per_prompt) == (512, 512, 1)
    assert (request.num_inference_steps, request.guidance_scale, request.seed) == (20, 7.5, None)


def test_contract_video_example_is_text2video():
    request = parse_runsync_input(VIDEO_EXAMPLE)
    assert request.task_type == TEXT2VIDEO and request.media_type == "videos"
    assert (request.num_frames, request.fps, request.video_width, request.video_height) == (16, 8, 512, 512)
    assert request.video_guidance_scale == 5.0


@pytest.mark.parametrize("field", ["num_frames", "fps", "video_width", "video_height", "video_guidance_scale"])
def test_any_video_field_makes_a_video(field):
    value = {"num_frames": 33, "fps": 12, "video_width": 480, "video_height": 832, "video_guidance_scale": 6.0}[field]
    request = parse_runsync_input(with_(**{field: value}))
    assert request.task_type == TEXT2VIDEO and getattr(request, field) == value


def test_full_request_from_the_contract_with_null_seed():
    request = parse_runsync_input(
        with_(
            width=512,
            height=768,
            num_images_per_prompt=2,
            num_inference_steps=30,
            guidance_scale=7,
            negative_prompt="blurry, low quality",
            seed=None,
        )
    )
    assert request.guidance_scale == 7.0 and isinstance(request.guidance_scale, float)
    assert (request.height, request.num_images_per_prompt, request.seed) == (768, 2, None)
    assert request.negative_prompt == "blurry, low quality"


@pytest.mark.parametrize("value", [256, 1024, 8 * 100])
def test_bounds_are_inclusive(value):
    assert parse_runsync_input(with_(width=value, height=value)).width == value


@pytest.mark.parametrize("value", [257, 500, 1023])
def test_any_image_side_in_the_contracts_range_is_taken(value):
    """SDXL takes multiples of 8: the engine generates the next one and crops (test_generation.py)."""
    request = parse_runsync_input(with_(width=value, height=1280 - value))
    assert (request.width, request.height) == (value, 1280 - value)


@pytest.mark.parametrize("value", [258, 500, 1022])
def test_any_even_video_side_in_range_is_taken(value):
    request = parse_runsync_input(with_(video_width=value, video_height=1280 - value))
    assert (request.video_width, request.video_height) == (value, 1280 - value)


@pytest.mark.parametrize("seed", [0, 1234567890, 2**63 - 1, -(2**63)])
def test_seed_accepts_any_int64(seed):
    assert parse_runsync_input(with_(seed=seed)).seed == seed


def test_whole_numbers_sent_as_floating_point_are_read_as_integers():
    """A review: Flutter and Unity apps on phones, an Android or iOS Slider, Python's float arithmetic and Jackson
    send a whole number as 1024.0 (the JSON Schema's `integer` allows it): refused "must be an integer", one Dart
    app's docs ran on the web (JS numbers) and failed on phones. Read as the integer, in docs and requests."""
    image = {"width": 1024.0, "height": 768.0, "num_inference_steps": 30.0, "num_images_per_prompt": 2.0}
    read = parse_runsync_input(with_(**image, seed=42.0))
    assert (read.width, read.height, read.num_inference_steps, read.num_images_per_prompt, read.seed) == (
        1024,
        768,
        30,
        2,
        42,
    )
    assert all(type(v) is int for v in (read.width, read.num_inference_steps, read.seed))
    video = parse_document("u", "videos", "f", {"prompt": "waves", "fps": 8.0, "numFrames": 16.0, "videoWidth": 512.0})
    assert (video.fps, video.num_frames, video.video_width) == (8, 16, 512) and type(video.fps) is int
    assert parse_runsync_input(with_(seed=-float(2**53 - 1))).seed == -(2**53 - 1)  # still exact
    with pytest.raises(ContractError):  # 2^53 + 1 arrives as 2^53: rounded, maybe
        parse_runsync_input(with_(seed=float(2**53)))


def test_one_number_spelled_twice_as_int_and_float_is_one_value():
    """A camelCase map (a Kotlin data class, json_serializable) merged with snake_case options gave
    `guidanceScale: 7` and `guidance_scale: 7.0`: refused as "given twice with different values"."""
    read = parse_document(
        "u",
        "images",
        "f",
        dict(CLIENT_DOC, guidanceScale=7, guidance_scale=7.0, numInferenceSteps=20.0, num_inference_steps=20),
    )
    assert (read.guidance_scale, read.num_inference_steps) == (7.0, 20)
    with pytest.raises(ContractError):  # `1` is still not `true`
        parse_document("u", "images", "f", dict(CLIENT_DOC, useCloudStorage=1, use_cloud_storage=True))


def test_inline_request_needs_no_ids():
    request = parse_runsync_input({"prompt": "a cat", "use_cloud_storage": False})
    assert request.user_id is None and request.file_uid is None and not request.use_cloud_storage


def test_parameters_echo_only_what_was_given():
    request = parse_runsync_input(with_(width=768, seed=7))
    assert request.parameters() == {
        "file_uid": "f1",
        "prompt": BASE["prompt"],
        "seed": 7,
        "use_cloud_storage": True,
        "user_id": "u1",
        "width": 768,
    }
    assert parse_runsync_input(request.parameters()) == request


# --- client-written documents -------------------------------------------------------------------------------

CLIENT_DOC = {"status": "queued", "created_at": object(), "prompt": "Waves", "generated": False, "error": False}


def test_client_sample_doc_with_camelcase_options_is_read_as_snake_case():
    doc = dict(CLIENT_DOC, numFrames=24, fps=10, videoWidth=480, videoGuidanceScale=6.5, numInferenceSteps=12)
    request = parse_document("user123", "videos", "file789", doc)
    assert request.task_type == TEXT2VIDEO
    assert (request.user_id, request.file_uid, request.use_cloud_storage) == ("user123", "file789", True)
    assert (request.num_frames, request.fps, request.video_width, request.video_guidance_scale) == (24, 10, 480, 6.5)
    assert request.num_inference_steps == 12


def test_doc_path_decides_ids_and_type():
    doc = dict(CLIENT_DOC, user_id="someone-else", file_uid="other", width=768)
    request = parse_document("user123", "images", "file456", doc)
    assert (request.user_id, request.file_uid, request.task_type, request.width) == (
        "user123",
        "file456",
        TEXT2IMAGE,
        768,
    )
    assert parse_document("u", "videos", "f", CLIENT_DOC).task_type == TEXT2VIDEO


def test_doc_worker_fields_and_unknown_metadata_are_skipped():
    doc = dict(CLIENT_DOC, worker_id="w1", attempts=2, progress=0.5, title="my picture", status="processing")
    assert parse_document("u", "images", "f", doc).prompt == "Waves"


@pytest.mark.parametrize(
    "media,doc,message",
    [
        ("images", dict(CLIENT_DOC, prompt=""), "prompt is required"),
        ("images", {k: v for k, v in CLIENT_DOC.items() if k != "prompt"}, "prompt is required"),
        ("images", dict(CLIENT_DOC, width=2048), "width must be between 256 and 1024"),
        # A doc's results go to Storage (the callable refuses false alike); 1 or "true" is no boolean, as runsync
        # and the callable say it (audit: the doc's message said it must be true).
        ("images", dict(CLIENT_DOC, use_cloud_storage=False), f"Validation failed: {CLOUD_ONLY}"),
        ("images", dict(CLIENT_DOC, useCloudStorage=1), "Validation failed: use_cloud_storage must be a boolean"),
        (
            "images",
            dict(CLIENT_DOC, use_cloud_storage="true"),
            "Validation failed: use_cloud_storage must be a boolean",
        ),
        ("images", dict(CLIENT_DOC, prompt=" ", use_cloud_storage=False), "prompt is required"),  # runsync's order
        ("images", dict(CLIENT_DOC, width=2048, use_cloud_storage=False), "width must be between 256 and 1024"),
        ("videos", dict(CLIENT_DOC, numFrames=100), "num_frames must be between 16 and 81"),
        ("videos", dict(CLIENT_DOC, numFrames="16"), "Validation failed: num_frames must be an integer"),
        (
            "videos",
            dict(CLIENT_DOC, numFrames=16, num_frames=24),
            "Validation failed: num_frames is given twice with different values",
        ),
        (
            "images",
            dict(CLIENT_DOC, numFrames=16),
            "Validation failed: num_frames is a video field: video jobs belong under generations/{user_id}/videos",
        ),
        ("audio", CLIENT_DOC, "Validation failed: media type must be 'images' or 'videos', not 'audio'"),
    ],
)
def test_bad_documents_are_refused_with_the_contracts_message(media, doc, message):
    with pytest.raises(ContractError) as info:
        parse_document("u", media, "f", doc)
    assert info.value.message == message


def test_document_path_ids_are_checked():
    with pytest.raises(ContractError, match="user_id"):
        parse_document("__x__", "images", "f", CLIENT_DOC)


def test_request_is_plain_frozen_data():
    request = GenerationRequest(prompt="p")
    with pytest.raises(AttributeError):
        request.prompt = "q"  # type: ignore[misc]


def test_a_huge_unknown_field_name_gets_a_short_message():
    """A 900 KB field name is quoted cut short: every message is at most 300 characters, at every door."""
    from listener.handler import RunsyncHandler

    name = "x" * 900_000
    message = refused({**BASE, name: 1})
    assert message.startswith("Validation failed: unknown field 'xxx") and message.endswith("…'")
    assert len(message) <= 300
    # The runsync handler answers the same short message (the refusal comes before any Firestore call).
    assert RunsyncHandler(store=None, submit=None).handle({**BASE, name: 1}) == {"error": message, "status": "failed"}
    assert len(ContractError("y" * 10_000).message) == 300


# ---------------------------------------------------------------------------------------------- restatement
@pytest.mark.parametrize(
    "doc, given, changes",
    [
        ({"prompt": BASE["prompt"]}, {}, {}),  # the placeholder of the contract's function flow, same prompt
        ({"prompt": BASE["prompt"]}, {"width": 512, "seed": None}, {}),  # a default, a null seed: no opinion
        ({"prompt": "a cat"}, {"width": 768, "seed": 7}, {"prompt": BASE["prompt"], "seed": 7, "width": 768}),
        ({"prompt": BASE["prompt"], "numInferenceSteps": 30}, {"num_inference_steps": 30}, {}),  # camelCase
        ({"prompt": BASE["prompt"], "guidanceScale": 7}, {"guidance_scale": 7.0}, {}),  # 7 is 7.0
        ({"prompt": BASE["prompt"], "width": "wide"}, {"width": 768}, {"width": 768}),  # a broken doc
        ({"prompt": BASE["prompt"], "seed": 99, "status": "completed"}, {}, {}),  # a drawn seed vs none asked
        # A blank negative prompt is none: the same image (a review: it restated a running job).
        ({"prompt": BASE["prompt"]}, {"negative_prompt": ""}, {}),
        ({"prompt": BASE["prompt"], "negativePrompt": ""}, {"negative_prompt": "   "}, {}),
        (
            {"prompt": BASE["prompt"], "negative_prompt": ""},
            {"negative_prompt": "blurry"},
            {"negative_prompt": "blurry"},
        ),
    ],
)
def test_restatement_names_what_the_request_says_otherwise(doc, given, changes):
    assert restatement(doc, parse_runsync_input({**BASE, **given})) == changes


def test_a_videos_restatement_names_no_image_field():
    """The image fields change nothing in a video (a review: another width ran a video again, charged, and a
    finished one refused it); a video field, the steps or the seed still restate it."""
    video = {**BASE, "num_frames": 33, "width": 512, "guidance_scale": 7.5}
    doc = {**video, "status": "completed"}
    image_fields = {"width": 768, "height": 1024, "num_images_per_prompt": 4, "guidance_scale": 3.0}
    assert restatement(doc, parse_runsync_input({**video, **image_fields})) == {}
    changes = {"num_frames": 49, "num_inference_steps": 30, "seed": 7, "video_guidance_scale": 6.0}
    assert restatement(doc, parse_runsync_input({**video, **image_fields, **changes})) == changes
    # An image's own fields restate an image.
    assert restatement({**BASE, "width": 512}, parse_runsync_input({**BASE, "width": 768})) == {"width": 768}


@pytest.mark.parametrize(
    "doc, awaits",
    [
        ({"status": "queued", "prompt": "a cat", "created_at": 1, "generated": False, "error": False}, True),
        ({"status": "queued", "prompt": "a cat", "seed": None, "app_tag": "x"}, True),  # a null seed, metadata
        ({"status": "queued", "prompt": "a cat", "width": 512}, False),  # a default, stated all the same
        ({"status": "queued", "prompt": "a cat", "numFrames": 16}, False),  # camelCase
        ({"status": "queued", "prompt": "a cat", "negative_prompt": "blur"}, False),
        ({"status": "queued", "prompt": "a cat", "negative_prompt": ""}, True),  # none
        # A function's "other metadata" may name the task and the ids: still no parameter stated.
        ({"status": "queued", "prompt": "a cat", "task_type": "text2image", "user_id": "u", "file_uid": "f"}, True),
        ({"status": "queued", "prompt": "a cat", "task_type": "text2image", "requested_at": 1}, False),  # a request's
        ({"status": "queued", "prompt": "a cat", "guidance_scale": 7, "guidanceScale": 8}, False),  # its parser decides
        # No usable prompt: refused at once, as no request can fix it (the rules let such docs in).
        ({"status": "queued"}, False),
        ({"status": "queued", "prompt": 5}, False),
        ({"status": "queued", "prompt": "   "}, False),
    ],
)
def test_a_doc_awaits_its_parameters_when_it_states_none_but_the_prompt(doc, awaits):
    assert awaits_parameters(doc) is awaits


# ---------------------------------------------------------------------------------------------- mutation audit
@pytest.mark.parametrize(
    "doc,field",
    [
        (dict(CLIENT_DOC, num_images_per_prompt=0, numImagesPerPrompt=2), "num_images_per_prompt"),
        (dict(CLIENT_DOC, use_cloud_storage=False, useCloudStorage=True), "use_cloud_storage"),
    ],
)
def test_a_false_or_zero_spelling_is_a_value_not_a_left_out_one(doc, field):
    """Only null and "" are left out: `0` or `false` beside another spelling's value is a field given twice, not
    a gap the other spelling fills (a review: seed 0 beside another spelling's 7 ran with seed 7)."""
    with pytest.raises(ContractError) as info:
        parse_document("u", "images", "f", doc)
    assert info.value.message == f"Validation failed: {field} is given twice with different values"


def test_a_refusals_record_reads_a_field_given_twice_as_its_first_spelling_says():
    from firegen_core.contract import normalise_document_fields

    data = {"negative_prompt": "blur", "negativePrompt": "rain", "video_width": 256, "videoWidth": 512}
    data = {**data, "num_frames": None, "numFrames": 24}
    assert normalise_document_fields(data, first=True) == {
        "negative_prompt": "blur",
        "video_width": 256,
        "num_frames": 24,
    }


@pytest.mark.parametrize(
    "name,field",
    [
        ("num_frames", "num_frames"),
        ("numFrames", "num_frames"),
        ("fileUid", "file_uid"),
        ("useCloudStorage", "use_cloud_storage"),
        ("seed", "seed"),
        # Audit: any case and underscores were read as the field (`fileUID` cancelled a job), where firestore.rules
        # and the web app know two spellings alone.
        ("fileUID", "fileUID"),
        ("FILE_UID", "FILE_UID"),
        ("File_Uid", "File_Uid"),
        ("Seed", "Seed"),
        ("PROMPT", "PROMPT"),
        ("NumInferenceSteps", "NumInferenceSteps"),
        ("num_Inference_Steps", "num_Inference_Steps"),
    ],
)
def test_a_field_has_two_spellings_its_own_and_the_client_samples_camel_case(name, field):
    from firegen_core.contract import field_name

    assert field_name(name) == field


# --- a request's job doc read back (Hypothesis) -------------------------------------------------------------
def _camel(name: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)


@st.composite
def _accepted_requests(draw) -> dict:
    """A runsync input the contract accepts: any of its parameters, each with a value in range."""
    video = draw(st.booleans())
    names = sorted(PARAMETER_FIELDS - {"prompt"} - (set() if video else set(VIDEO_FIELDS)))
    chosen = draw(st.lists(st.sampled_from(names), unique=True))
    if video and not VIDEO_FIELDS & set(chosen):
        chosen.append(draw(st.sampled_from(sorted(VIDEO_FIELDS))))
    data = {**BASE, "prompt": draw(valid_value("prompt"))}
    data.update({name: draw(valid_value(name)) for name in chosen})
    return data


@settings(max_examples=300, deadline=None, database=None)
@given(data=_accepted_requests(), camel_case=st.booleans())
def test_a_requests_job_doc_reads_back_as_the_same_request(data, camel_case):
    """What runsync and the callable write (`queued_document`) is what any worker that later claims the doc (after
    a restart, a lost lease, a release) generates from: the same parameters, defaults and task type; so is the
    client sample's camelCase spelling of it."""
    request = parse_runsync_input(data)
    doc = queued_document(request)
    if camel_case:
        doc = {_camel(name): value for name, value in doc.items()}
    again = parse_document(request.user_id, request.media_type, request.file_uid, doc)
    assert again == request
    assert again.parameters() == request.parameters()
    assert restatement(doc, request) == {}  # the request sent again (a retry) changes nothing


def test_the_blank_class_is_pythons_whitespace_with_control_and_format_characters():
    """`contract.BLANK_CLASS`, written out as ranges (the schema and the page take it as a regex class), is what
    its comment says, for this Python's Unicode."""
    import unicodedata

    from firegen_core import contract

    blank = re.compile(f"[{contract.BLANK_CLASS}]")
    for code in range(0x110000):
        char = chr(code)
        if 0xD800 <= code <= 0xDFFF:  # no character alone
            continue
        expected = char.isspace() or unicodedata.category(char) in ("Cc", "Cf")
        assert bool(blank.fullmatch(char)) == expected, hex(code)
