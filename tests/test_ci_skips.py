"""No silent skips in CI: a test that skips because something is missing here (an emulator, the Firebase CLI,
functions/venv) fails the run when `CI` is set; on a developer's machine the summary says what was skipped and
why, one line per reason. Runs pytest on a small test file with this suite's conftest as a plugin.
And a test process that dies ends `make test`'s run, failed, instead of leaving it waiting forever."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SAMPLE = """
import pytest

def test_needs_an_emulator():
    pytest.skip("no Firestore emulator here")

def test_needs_it_too():
    pytest.skip("no Firestore emulator here")

@pytest.mark.skipif(True, reason="functions/venv (python3.11) is not built")
def test_needs_the_venv():
    pass

def test_runs():
    pass
"""


def run_sample(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent)])
    if ci is not None:
        env["CI"] = ci
    cmd = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-p", "no:randomly"]
    cmd += ["-q", "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_a_missing_component_fails_the_run(tmp_path, ci):
    result = run_sample(tmp_path, ci)
    assert result.returncode == 1, result.stdout
    assert "2 failed, 1 passed, 1 error" in result.stdout
    assert result.stdout.count("a missing component fails the run instead of skipping") >= 3


@pytest.mark.parametrize("ci", [None, "false"])
def test_on_a_developers_machine_one_line_per_missing_component(tmp_path, ci):
    result = run_sample(tmp_path, ci)
    assert result.returncode == 0, result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED ") and "missing here" in line]
    assert lines == [
        "SKIPPED 2 test(s), missing here: no Firestore emulator here",
        "SKIPPED 1 test(s), missing here: functions/venv (python3.11) is not built",
    ]


CRASHING = """
import os

def test_before():
    pass

def test_crash():  # what a segfault in a C extension (gRPC's, once in CI) does to the process
    os.kill(os.getpid(), 11)

def test_after():
    pass
"""


def make_tests_pytest_args() -> list[str]:
    """The options `make test` gives pytest (its process count included), read from `make -n`."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    shown = subprocess.run(
        ["make", "-n", "test", "PYTEST_ARGS="], cwd=TESTS.parent, env=env, capture_output=True, text=True, check=True
    ).stdout
    (line,) = [line for line in shown.splitlines() if " -m pytest " in line]
    return shlex.split(line.split(" -m pytest ", 1)[1])


def test_a_test_process_that_dies_fails_its_test_and_ends_make_tests_run(tmp_path):
    """pytest-xdist 3.8 replaced a crashed process with one that, under --dist loadfile, waited forever for work:
    a CI run timed out after 90 minutes of nothing. `make test` now ends the run at the crash, failed."""
    args = make_tests_pytest_args()
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_0_crashing.py").write_text(CRASHING)
    for n in range(1, 5):
        (tmp_path / f"test_{n}_passing.py").write_text("def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *args,
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "-q",
        "-p",
        "no:faulthandler",
    ]
    try:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90, cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:
        said = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
        pytest.fail(f"the run did not end after its test process died: {said}")
    assert result.returncode == 1, result.stdout
    assert "crashed while running 'test_0_crashing.py::test_crash'" in result.stdout, result.stdout
