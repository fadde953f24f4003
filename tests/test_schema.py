"""The contract's JSON Schema (firegen_core/schema.py) and the web app's types generated from it.

- the committed web/src/contract.gen.ts is what a fresh generation writes (it fails when the two drift:
  run `make web-types`), and the web app type-checks against it;
- the schema's ranges are the ones the worker's validation applies (checked against `parse_runsync_input`);
- the web app's own check (web/src/validate.ts, run in Node) gives the contract's messages, word for word;
- every field the worker and the functions write on a job doc has a type in the job doc's schema, and the usage
  doc's schema is what they write there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import UTC, datetime

import pytest
from fixtures_requests import request_value
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools import web_types
from firegen_core import contract, errors, lifecycle, quota, schema
from firegen_core.contract import ContractError, parse_document, parse_runsync_input
from firegen_core.jobs import queued_document

BASE = {"prompt": "a lighthouse", "user_id": "u1", "file_uid": "f1", "use_cloud_storage": True}
TSC = web_types.REPO / "web" / "node_modules" / ".bin" / "tsc"
ESBUILD = TSC.parent / "esbuild"


def test_the_committed_web_types_are_a_fresh_generation():
    assert web_types.OUTPUT.read_text() == web_types.render(), "stale web/src/contract.gen.ts: run `make web-types`"
    assert web_types.main(["--check"]) == 0


def _require_web_modules() -> None:
    if not (TSC.exists() and ESBUILD.exists() and shutil.which("node")):
        message = "web/node_modules is not installed (python3 scripts/setup_web.py)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_the_web_app_type_checks_against_the_generated_types():
    _require_web_modules()
    result = subprocess.run(
        [str(TSC), "--noEmit", "-p", str(TSC.parents[2])], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_generated_types_name_every_request_field_and_error_type():
    ts = web_types.render()
    for name in contract.KNOWN_FIELDS:
        assert f"  {name}" in ts
    for error_type in errors.ERROR_TYPES:
        assert f'"{error_type}"' in ts


@pytest.mark.parametrize("name", sorted(contract.PARAMS))
def test_each_range_in_the_schema_is_the_one_validation_applies(name):
    spec = schema.request_schema()["properties"][name]
    step = spec.get("multipleOf", 1 if spec["type"] == "integer" else 0.5)
    video = {"num_frames": 16} if contract.PARAMS[name].video and name != "num_frames" else {}
    for value in (spec["minimum"], spec["maximum"], spec["default"]):
        parse_runsync_input({**BASE, **video, name: value})
    for value in (spec["minimum"] - step, spec["maximum"] + step):
        with pytest.raises(ContractError, match=f"^{name} must be between "):
            parse_runsync_input({**BASE, **video, name: value})
    if "multipleOf" in spec:
        with pytest.raises(ContractError, match="must be a multiple of"):
            parse_runsync_input({**BASE, **video, name: spec["minimum"] + spec["multipleOf"] // 2})
    assert spec["type"] == ("integer" if contract.PARAMS[name].kind is int else "number")


def test_the_request_schema_is_closed_and_requires_the_contracts_fields():
    request = schema.request_schema()
    assert request["additionalProperties"] is False
    assert set(request["properties"]) == contract.KNOWN_FIELDS
    assert set(request["required"]) == {"prompt", "user_id", "file_uid", "use_cloud_storage"}
    assert request["properties"]["prompt"]["maxLength"] == contract.MAX_PROMPT_CHARS


def test_the_schemas_id_rule_refuses_what_the_contract_refuses():
    """The unicode review: the id pattern was unanchored, and a JSON Schema pattern matches anywhere in the string:
    a client validating with the schema sent "../../x", "a/b", "josé" and "__x__", which the contract refuses."""
    import re

    from test_contract import ID_RULE, REFUSALS

    spec = schema.request_schema()["properties"]["user_id"]

    def accepts(value: str) -> bool:  # JSON Schema's `pattern` and `not` on a string (ECMA-262 search)
        return bool(re.search(spec["pattern"], value)) and not re.search(spec["not"]["pattern"], value)

    refused = [
        data[name]
        for data, message in REFUSALS
        if message.endswith(ID_RULE)
        for name in contract.ID_FIELDS
        if message.startswith(f"Validation failed: {name} ")
    ]
    assert len(refused) >= 9
    for value in [*refused, "../../x", "josé", "__x__", "a b", "u1\n"]:
        assert not accepts(value), value
    for value in ["u1", "a:b@c+d=e~f", "a..b", "x.", "_", "-", "A" * 128]:
        assert accepts(value), value


def test_every_field_written_on_a_job_doc_has_a_type():
    job = schema.job_doc_schema()["properties"]
    now = datetime.now(UTC)
    request = parse_runsync_input({**BASE, "num_frames": 16, "negative_prompt": "blur", "seed": 3})
    written = [
        queued_document(request),
        lifecycle.claim({"status": "queued"}, now, worker_id="w", lease_seconds=10, max_attempts=3),
        lifecycle.success(
            task_type=contract.TEXT2VIDEO,
            user_id="u1",
            file_uid="f1",
            urls=["u"],
            seed=1,
            video_info={"frames": 16, "fps": 8, "duration_seconds": 2.0, "width": 256, "height": 256},
            timings={"queue_seconds": 0.1, "generation_seconds": 1.0, "upload_seconds": 0.1},
        ),
        lifecycle.success(task_type=contract.TEXT2IMAGE, user_id="u1", file_uid="f1", urls=["a", "b"], seed=1),
        lifecycle.failure(errors.GenerationError(errors.EXCEPTION, "boom"), user_id="u1", file_uid="f1"),
        lifecycle.counted_release({"status": "processing", "attempts": 1, "releases": 1}, max_releases=3),
        lifecycle.cancel({"status": "processing", "user_id": "u1", "file_uid": "f1"}) or {},
        {quota.ADMITTED: True, quota.COST: quota.estimate(request), quota.CHARGED_ON: "2026-12-01"},
    ]
    for fields in written:
        assert set(fields) <= set(job), set(fields) - set(job)
    assert job["status"]["enum"] == ["queued", "processing", "completed", "failed"]
    assert job["error_type"]["enum"] == list(errors.ERROR_TYPES)
    assert set(schema.VIDEO_INFO["required"]) == set(written[2]["video_info"])


def test_the_usage_doc_schema_is_what_the_worker_writes():
    usage = schema.usage_doc_schema()
    now = datetime.now(UTC)
    written = quota.Usage.read(None, now).document(quota.Limits(), now, "server time")
    written[lifecycle.EXPIRE_AT] = now
    assert set(written) == set(usage["properties"]) and set(usage["required"]) <= set(written)
    assert set(written["limits"]) == set(usage["properties"]["limits"]["properties"])


def _page_cases() -> list[dict]:
    """Requests as the page builds them: every form field out of range, off its step, of the wrong type, and valid."""
    cases: list[dict] = [
        {"prompt": "  "},
        {"prompt": "x" * 2001},
        {"prompt": "\N{GRINNING FACE}" * 2000},  # 2,000 code points (4,000 UTF-16 units): accepted
        {"negative_prompt": "x" * 2001},
        {"negative_prompt": "blur"},
        {"seed": 1.5},
        {"seed": -7},
        {},
        # Python's whitespace, not JavaScript's (audit: "\x85" was written and then refused by the worker).
        *({"prompt": blank} for blank in ("\x1c", "\x85", "\u3000 \t", "\ufeff", "\u200b")),
        # Nothing visible: control and format characters too, astral ones included (the unicode review).
        *({"prompt": blank} for blank in ("\x00", "\x1b\u202e", "\U000e0041\U0001d173", "\u2066a\u2069")),
        {"prompt": "car \ud800 red"},  # a lone surrogate (JSON carries it to Node as one)
        {"negative_prompt": "\udc00"},
    ]
    for name, spec in schema.request_schema()["properties"].items():
        if name not in contract.PARAMS:
            continue
        step = spec.get("multipleOf", 1)
        wrong_type = spec["minimum"] + 0.5 if spec["type"] == "integer" else "high"
        cases += [{name: value} for value in (spec["minimum"] - step, spec["maximum"] + step, spec["default"])]
        cases += [{name: value} for value in (10**19, -(2**64))]  # past 2^53, still integers in JSON
        cases.append({name: wrong_type})
        if "multipleOf" in spec:
            cases.append({name: spec["minimum"] + spec["multipleOf"] // 2})
    return [{**BASE, **case} for case in cases]


def _document_message(request: dict) -> str | None:
    """What the worker says of this request as a queued doc (the page's other flow), under the media it names."""
    media = "videos" if contract.VIDEO_FIELDS & request.keys() else "images"
    try:
        parse_document(request["user_id"], media, request["file_uid"], request)
    except ContractError as exc:
        return exc.message
    return None


@pytest.fixture(scope="module")
def page_check(tmp_path_factory):
    """web/src/validate.ts's contractMessage, in one Node process for the module: the page's message for each
    request of a list (a line of JSON each way)."""
    _require_web_modules()
    folder = tmp_path_factory.mktemp("validate")
    source = web_types.REPO / "web" / "src" / "validate.ts"
    bundle = folder / "validate.mjs"
    build = [str(ESBUILD), str(source), "--bundle", "--format=esm", f"--outfile={bundle}", "--log-level=warning"]
    subprocess.run(build, check=True, timeout=120)
    runner = folder / "run.mjs"
    runner.write_text(
        'import { createInterface } from "node:readline";\n'
        'import { contractMessage } from "./validate.mjs";\n'
        "for await (const line of createInterface({ input: process.stdin })) {\n"
        "  process.stdout.write(JSON.stringify(JSON.parse(line).map((r) => contractMessage(r))) + '\\n');\n"
        "}\n"
    )
    node = subprocess.Popen(["node", str(runner)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def messages(requests: list[dict]) -> list[str | None]:
        assert node.stdin and node.stdout
        node.stdin.write(json.dumps(requests) + "\n")
        node.stdin.flush()
        return json.loads(node.stdout.readline())

    yield messages
    node.communicate(timeout=30)


def test_the_web_apps_check_gives_the_contracts_messages(page_check):
    """web/src/validate.ts (the page's check before it writes a queued doc) run in Node on the page's requests:
    the contract's message for each, word for word, and nothing where the contract accepts it."""
    cases = _page_cases()
    expected = [_document_message(c) for c in cases]
    # Past 2^53 the Firestore SDK writes a number as a double, which the contract reads as no integer: the page
    # says why first (and refuses it for the callable too, which would get it rounded)...
    cases.append({**cases[-1], "seed": 2**60})
    assert _document_message({**cases[-1], "seed": 2.0**60}) == (
        "Validation failed: seed must be an integer or null (one past 2^53 sent as floating point may have been "
        "rounded)"
    )
    in_this_page = (
        "Validation failed: seed must be between -9007199254740991 and 9007199254740991 in this page "
        "(a larger one would be rounded)"
    )
    expected.append(in_this_page)
    # ...but a seed past 64 bits (typed 1e20) is refused for its size, as the callable refuses it.
    for seed in (10**20, -(10**20), 2**63 + 2**11, -(2**63) - 2**11):
        cases.append({**cases[-1], "seed": seed})
        expected.append(_document_message(cases[-1]))
    assert expected[-4] == "Validation failed: seed must fit in a signed 64-bit integer"
    # 2^63 - 1 fits, and reads as 2^63 in JavaScript, as -2^63 - 1 reads as -2^63: the page cannot tell them from
    # a seed that does not fit (audit: it said 2^63 - 1 did not fit), and says what it can send.
    for seed in (2**63 - 1, 2**63, -(2**63) - 1):
        cases.append({**cases[-1], "seed": seed})
        expected.append(in_this_page)
    # From 1e21 JSON.stringify writes an exponent, which the contract reads as a float: a whole width is read as
    # the integer, out of range, and a seed that large may have been rounded, as the callable would answer.
    for field in ("width", "seed"):
        cases.append({**cases[-1], "seed": None, field: 10**21})
        expected.append(_document_message({**cases[-1], field: float(10**21)}))
    assert expected[-2:] == [
        "width must be between 256 and 1024",
        "Validation failed: seed must be an integer or null (one past 2^53 sent as floating point may have been "
        "rounded)",
    ]
    drift = {i: (got, want) for i, (got, want) in enumerate(zip(page_check(cases), expected)) if got != want}
    assert drift == {}, "the page's check and the contract differ (case index: (page, contract))"
    assert expected.count(None) < len(expected) and "width must be between 256 and 1024" in expected


@st.composite
def _page_requests(draw) -> dict:
    """A request as the page may send it for an image or a video job (any request field of its media type, of
    any value; the page fills the ids and cloud storage)."""
    media = draw(st.sampled_from(["images", "videos"]))
    names = [
        "prompt",
        "negative_prompt",
        "seed",
        *(n for n in contract.PARAMS if media == "videos" or n not in contract.VIDEO_FIELDS),
    ]
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    fields = {name: draw(request_value(name)) for name in chosen}
    if media == "videos":
        fields.setdefault("num_frames", 16)  # as the page's statesItsJob: a video request names a video field
    return {**BASE, **fields, "_media": media}


@settings(max_examples=1500, deadline=None, database=None)
@given(requests=st.lists(_page_requests(), min_size=1, max_size=3))
def test_the_web_apps_check_agrees_with_the_contract_on_any_request(page_check, requests):
    """Property: on requests drawn at random (several fields wrong at once, of any type), the page's check gives
    the message the contract gives the same request as a queued doc of its media type (the first field refused,
    in the contract's order), or none where the contract accepts it."""
    # As JSON carries them (the page's values are JavaScript's): a lone surrogate drawn beside another reads as
    # the pair, one character, in both languages.
    bodies = json.loads(json.dumps([{k: v for k, v in r.items() if k != "_media" and v is not None} for r in requests]))
    expected = []
    for request, body in zip(requests, bodies, strict=True):
        try:
            parse_document(body["user_id"], request["_media"], body["file_uid"], body)
            expected.append(None)
        except ContractError as exc:
            expected.append(exc.message)
    got = page_check(bodies)
    drift = [(body, page, want) for body, page, want in zip(bodies, got, expected, strict=True) if page != want]
    assert drift == [], "the page's check and the contract differ: (request, page, contract)"
