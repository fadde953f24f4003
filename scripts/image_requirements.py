"""`python image_requirements.py pyproject.toml`: the image's requirements, one a line: pyproject.toml's
dependencies and its fp8 extra. The image installs these, not the project (its code runs from /app), so that an
edit to the code, the README or pyproject.toml's tool settings rebuilds no layer of dependencies or weights. The
standard library alone: it runs in the Dockerfile's first stage, before anything is installed."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

EXTRAS = ("fp8",)


def requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    return [*project["dependencies"], *(req for extra in EXTRAS for req in project["optional-dependencies"][extra])]


if __name__ == "__main__":
    print("\n".join(requirements(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))))
