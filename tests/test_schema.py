"""The contract's JSON Schema (firegen_core/schema.py) and the web app's types generated from it.

- the committed web/src/contract.gen.ts is what a fresh generation writes (it fails when the two drift:
  run `make web-types`), and the web app type-checks against it;
- the schema's ranges are the ones the worker's validation applies (checked against `parse_runsync_input`);
- every field the worker and the functions write on a job doc has a type in the job doc's schema.
"""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime

import pytest

from devtools import web_types
from firegen_core import contract, errors, lifecycle, quota, schema
from firegen_core.contract import ContractError, parse_runsync_input
from firegen_core.jobs import queued_document

BASE = {"prompt": "a lighthouse", "user_id": "u1", "file_uid": "f1", "use_cloud_storage": True}
TSC = web_types.REPO / "web" / "node_modules" / ".bin" / "tsc"


def test_the_committed_web_types_are_a_fresh_generation():
    assert web_types.OUTPUT.read_text() == web_types.render(), "stale web/src/contract.gen.ts: run `make web-types`"
    assert web_types.main(["--check"]) == 0


def test_the_web_app_type_checks_against_the_generated_types():
    if not TSC.exists():
        message = "web/node_modules is not installed (python3 scripts/setup_web.py)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
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
        {quota.ADMITTED: True, quota.COST: quota.estimate(request)},
    ]
    for fields in written:
        assert set(fields) <= set(job), set(fields) - set(job)
    assert job["status"]["enum"] == ["queued", "processing", "completed", "failed"]
    assert job["error_type"]["enum"] == list(errors.ERROR_TYPES)
    assert set(schema.VIDEO_INFO["required"]) == set(written[2]["video_info"])
