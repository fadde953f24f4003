"""listener.allocator on this machine's glibc: the arenas threads get, counted by glibc itself (`malloc_info`'s
`<heap nr=...>` entries), in a fresh interpreter each (the limit must be set before the threads start)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from listener.allocator import ARENA_MAX

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="arenas are glibc's")

# Eight threads each hold a block from malloc (a bytearray past pymalloc's small-object limit) until all have one:
# glibc gives each new thread an arena of its own, up to its limit.
ARENAS = """
import ctypes, os, sys, tempfile, threading
from listener.allocator import limit_arenas
applied = limit_arenas(os.environ) if sys.argv[1] == "limit" else None
barrier, held = threading.Barrier(9), []
def hold():
    held.append(bytearray(200_000))
    barrier.wait()
threads = [threading.Thread(target=hold) for _ in range(8)]
for thread in threads:
    thread.start()
barrier.wait()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile("r") as out:
    stream = libc.fopen(out.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    print(applied, out.read().count("<heap nr="))
for thread in threads:
    thread.join()
"""


def arenas(mode: str, **env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env
    result = subprocess.run(
        [sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, timeout=60, env=environ, check=True
    )
    applied, count = result.stdout.split()
    return applied, int(count)


def test_threads_get_no_more_than_the_limits_arenas():
    applied, count = arenas("default")
    assert applied == "None" and count > ARENA_MAX  # one a thread (9 here): what the limit is for
    assert arenas("limit") == (str(ARENA_MAX), ARENA_MAX)


def test_malloc_arena_max_in_the_environment_is_glibcs_own_and_wins():
    assert arenas("limit", MALLOC_ARENA_MAX="4") == ("None", 4)


def test_a_blank_malloc_arena_max_is_unset_and_the_limit_applies():
    assert arenas("limit", MALLOC_ARENA_MAX=" ") == (str(ARENA_MAX), ARENA_MAX)
