"""What ships: the wheel, the license, the Firebase deploy (its targets and its file modes), the pre-commit hooks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PRODUCT = {"firegen_core", "generation", "listener"}
NOT_SOURCE = (".git", ".venv", "venv", ".emulators", "out", "node_modules", "__pycache__", "build", "*.egg-info")


def test_the_wheel_holds_only_the_product_packages(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE), symlinks=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", "dist", "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [wheel] = (source / "dist").glob("firegen_worker-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    dist_info = next(top for top in tops if top.endswith(".dist-info"))
    assert tops - {dist_info} == PRODUCT
    assert f"{dist_info}/licenses/LICENSE" in names
    for package in PRODUCT:  # each package whole, as in the repository
        shipped = {n for n in names if n.startswith(f"{package}/") and n.endswith(".py")}
        assert shipped == {p.relative_to(ROOT).as_posix() for p in (ROOT / package).rglob("*.py")}
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata


def test_the_license_file_matches_pyproject():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "END OF TERMS AND CONDITIONS" in text


def test_pre_commit_runs_ruff_at_the_pinned_version_and_mypy():
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = {hook["id"]: repo for repo in config["repos"] for hook in repo["hooks"]}
    assert {"ruff-check", "ruff-format", "mypy", "hadolint"} <= set(hooks)
    ruff_pin = next(d for d in PYPROJECT["project"]["optional-dependencies"]["dev"] if d.startswith("ruff=="))
    assert hooks["ruff-check"]["rev"] == "v" + ruff_pin.split("==")[1]
    done = subprocess.run(
        [sys.executable, "-m", "pre_commit", "validate-config", ".pre-commit-config.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_firebase_deploy_covers_functions_rules_indexes_and_storage():
    """`firebase deploy` (no --only) deploys every target firebase.json names; each file must exist."""
    config = json.loads((ROOT / "firebase.json").read_text())
    [functions] = config["functions"]
    assert functions["runtime"] == "python311" and (ROOT / functions["source"] / "main.py").is_file()
    assert any("vendor_shared.py" in hook for hook in functions["predeploy"])
    assert (ROOT / config["firestore"]["rules"]).is_file() and (ROOT / config["firestore"]["indexes"]).is_file()
    assert (ROOT / config["storage"]["rules"]).is_file()
    assert {"venv", "*.local", ".firegen_core.*"} <= set(functions["ignore"])


def test_the_deploy_source_is_world_readable_even_under_a_strict_umask(tmp_path):
    """Cloud Build reads the uploaded functions as another user: the predeploy hook leaves nothing 0600."""
    dest = tmp_path / "functions"
    shutil.copytree(ROOT / "functions", dest, ignore=shutil.ignore_patterns("venv", "__pycache__", "firegen_core"))
    for path in [dest, *dest.rglob("*")]:  # as a checkout under umask 077 leaves them
        path.chmod(0o700 if path.is_dir() else 0o600)
    script = (
        "import os, sys; os.umask(0o077); sys.path.insert(0, 'scripts'); import vendor_shared as v; from pathlib "
        f"import Path; d = Path({str(dest)!r}); v.vendor(v.ROOT, d); print(len(v.make_readable(d)))"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) > 0  # it had something to fix
    shipped = [dest, *dest.rglob("*")]
    assert (dest / "main.py") in shipped and (dest / "firegen_core" / "jobs.py") in shipped
    for path in shipped:
        mode = path.stat().st_mode
        assert mode & (0o555 if path.is_dir() else 0o444) == (0o555 if path.is_dir() else 0o444), oct(mode)
    # And the hook the CLI runs leaves the repository's own functions/ the same way.
    hook = json.loads((ROOT / "firebase.json").read_text())["functions"][0]["predeploy"][0]
    subprocess.run(hook, shell=True, check=True, cwd=ROOT, env={**os.environ, "PROJECT_DIR": str(ROOT)})
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import vendor_shared

        assert vendor_shared.unreadable() == []
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_the_functions_deploy_as_a_codebase_of_their_own():
    """Deployed into a project an app is deployed in already, `firebase deploy --only functions` from here must
    leave the app's own functions (its `default` codebase) alone: the CLI offers to delete a codebase's functions
    that its folder no longer has (README "Into an existing Firebase project")."""
    [functions] = json.loads((ROOT / "firebase.json").read_text())["functions"]
    assert functions["codebase"] == "firegen"
    readme = (ROOT / "README.md").read_text()
    assert "names their codebase `firegen`" in readme and "`--only functions:firegen`" in readme


def test_vendor_shared_check_says_whether_the_functions_copy_is_current(tmp_path):
    """README: `python3 scripts/vendor_shared.py --check` says whether functions/firegen_core is current: exit 0
    when it is; non-zero, naming each stale file, when the core changed since the copy (or there is none); and
    it repairs nothing. Run on a copy of what the script reads (the folder above its own is its root), never on
    the repository's functions/."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "vendor_shared.py", root / "scripts")
    shutil.copytree(ROOT / "firegen_core", root / "firegen_core", ignore=shutil.ignore_patterns("__pycache__"))
    ignored = shutil.ignore_patterns("venv", "__pycache__", "firegen_core", ".firegen_core.*")
    shutil.copytree(ROOT / "functions", root / "functions", ignore=ignored)

    def vendor_shared(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "scripts/vendor_shared.py", *args]
        return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=60)

    missing = vendor_shared("--check")
    assert missing.returncode != 0 and "vendor_shared: out of date: firegen_core/jobs.py" in missing.stderr
    assert not (root / "functions" / "firegen_core").exists()
    assert vendor_shared().returncode == 0  # the copy, as the predeploy hook and make dev/test write it
    current = vendor_shared("--check")
    assert (current.returncode, current.stdout, current.stderr) == (0, "", "")

    edited = root / "firegen_core" / "jobs.py"
    edited.write_text(edited.read_text() + "\n# changed since the copy\n")
    stale = vendor_shared("--check")
    assert stale.returncode != 0
    assert stale.stderr.splitlines() == ["vendor_shared: out of date: firegen_core/jobs.py"]
    copy = root / "functions" / "firegen_core" / "jobs.py"
    assert copy.read_text() == (ROOT / "firegen_core" / "jobs.py").read_text()  # as it was: nothing repaired
