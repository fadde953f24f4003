"""Which code a worker runs: a digest of its Python sources (firegen_core, listener, generation) and of the
distributions installed beside them (name and version: torch, diffusers, ...), alike on every worker of one image
and different on the next. It is `code_version` on the worker's doc (`workers/{worker_id}`) and in `worker_ready`,
so an operator sees a rollout's two deploys side by side and when the last old worker has gone (README,
Upgrading). A digest rather than a number: nothing to bump by hand, and an image built from a checkout without
.git (RunPod's builds) carries no commit. Settings and baked model weights are not in it."""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path

PACKAGES = ("firegen_core", "listener", "generation")
_ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def code_version() -> str:
    return source_digest(_ROOT)


def source_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for package in PACKAGES:
        for source in sorted((root / package).rglob("*.py")):
            digest.update(source.relative_to(root).as_posix().encode() + b"\0" + source.read_bytes() + b"\0")
    installed = sorted({f"{dist.metadata['Name']}=={dist.version}".lower() for dist in metadata.distributions()})
    digest.update("\n".join(installed).encode())
    return digest.hexdigest()[:12]
