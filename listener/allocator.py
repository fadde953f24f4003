"""The C allocator's arenas, limited before the worker starts its threads.

glibc gives each new thread an arena of its own, up to 8 per core; the worker's ~30 threads (gRPC's, the
Firestore watches', the job's, torch's) each keep the freed blocks of theirs. Measured with `make bench`'s soak
section over 1,000 jobs: the worker's resident memory wandered between 775 and 1,120 MiB and its floor rose, where
with two arenas it stayed between 687 and 696 MiB (README "Benchmarks"). `MALLOC_ARENA_MAX` set in the
environment is glibc's own setting and wins: this only supplies the default, for every way the worker is
started (the image, make dev, a custom image).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from collections.abc import Mapping

ARENA_MAX = 2
_M_ARENA_MAX = -8  # malloc.h


def limit_arenas(environ: Mapping[str, str]) -> int | None:
    """Apply ARENA_MAX unless the environment sets MALLOC_ARENA_MAX (glibc read it at start) or the C library is
    not glibc (musl has no arenas to limit). Returns the limit it applied, else None."""
    # Blank counts as unset, as for every other setting (glibc ignores it: the threads got their arenas again).
    if environ.get("MALLOC_ARENA_MAX", "").strip() or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        applied = libc.mallopt(_M_ARENA_MAX, ARENA_MAX) == 1
    except (OSError, AttributeError):
        return None
    return ARENA_MAX if applied else None
