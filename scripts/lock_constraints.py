#!/usr/bin/env python3
"""Write constraints.txt: the exact versions of every package firegen-worker[dev] needs, as installed in .venv.

constraints.txt is the one lock of this project: `make venv` (hence `make test` and CI), and the Dockerfile's pip
step install with `-c constraints.txt`, so the image runs the diffusers, transformers and runpod releases that the
tests ran. torch is pinned by version only (`torch==2.13.0`): the local venv installs the CPU wheel (2.13.0+cpu)
and the image the CUDA one from PyTorch's index (2.13.0+cu128); both satisfy the same pin.

    .venv/bin/python scripts/lock_constraints.py           # after changing pyproject.toml's dependencies
    .venv/bin/python scripts/lock_constraints.py --check   # exit 1 when constraints.txt differs (tests do this)

It starts from pyproject.toml's requirements (with the `dev` extra) and follows the installed distributions'
requirements (importlib.metadata), so nothing is downloaded and whatever else happens to be installed is left out.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
EXTRAS = ("dev",)
HEADER = """\
# The one lock: exact versions of firegen-worker[dev] and everything it pulls in, as the tests ran them.
# Used by `make venv` (so `make test` and CI) and by the Dockerfile's pip step (`pip install -c constraints.txt`).
# torch is pinned by version only: the CPU wheel locally (+cpu), the CUDA wheel in the image (+cu128).
# Regenerate with `.venv/bin/python scripts/lock_constraints.py` after changing pyproject.toml's dependencies.
"""


def _applies(req: Requirement, extras: tuple[str, ...]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in (*extras, ""))


def project_requirements(extras: tuple[str, ...] = EXTRAS) -> list[Requirement]:
    """pyproject.toml's dependencies plus those of `extras` (the source, not a possibly stale installed copy)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project.get("optional-dependencies", {}).get(extra, [])
    return [Requirement(line) for line in lines]


def closure(extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """{canonical name: installed version} of everything the project (with `extras`) needs."""
    found: dict[str, str] = {}
    todo = [(req.name, tuple(sorted(req.extras))) for req in project_requirements(extras) if _applies(req, extras)]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        name, wanted = todo.pop()
        key = (canonicalize_name(name), wanted)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"lock_constraints: {name} is required but not installed; run `make venv`") from None
        found[canonicalize_name(name)] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if _applies(req, wanted):
                todo.append((req.name, tuple(sorted(req.extras))))
    return found


def render(pins: dict[str, str]) -> str:
    lines = [f"{name}=={Version(version).public}" for name, version in sorted(pins.items())]
    return HEADER + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when constraints.txt is not up to date")
    args = parser.parse_args(argv)
    text = render(closure())
    if args.check:
        if CONSTRAINTS.read_text() != text:
            print("constraints.txt is out of date: run .venv/bin/python scripts/lock_constraints.py", file=sys.stderr)
            return 1
        return 0
    CONSTRAINTS.write_text(text)
    print(f"wrote {CONSTRAINTS.relative_to(ROOT)} ({text.count('==')} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
