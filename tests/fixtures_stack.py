"""`python -m devtools.stack` (what `make dev` runs) as a test's subprocess, as a terminal runs it.

Import by name (`from fixtures_stack import running_stack`). The stack gets a process session of its own, as a
terminal's foreground job has: Ctrl-C is SIGINT to the whole group, and that is how the helper stops it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from devtools import emulators as emu

ROOT = Path(__file__).resolve().parent.parent
READY_LINE = "the stack keeps running"
READY_S = 240  # the Firebase CLI's emulators and a worker, on a loaded 2-core machine


@dataclass
class StackProcess:
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.lines)


@contextlib.contextmanager
def running_stack(cmd: list[str], env: dict[str, str], stop: int = signal.SIGINT) -> Iterator[StackProcess]:
    """Start the stack, wait until it says it keeps running, yield it; then Ctrl-C it (or send `stop` to its
    process group: SIGHUP, its terminal closed) and wait for its exit.

    Its return code is the caller's to check (`stack.proc.returncode`, once the block has ended)."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    stack = StackProcess(proc)
    reader = threading.Thread(target=lambda: stack.lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        assert emu.wait_until(
            lambda: any(READY_LINE in line for line in stack.lines) or proc.poll() is not None, READY_S, 0.2
        ), stack.output
        assert proc.poll() is None, stack.output
        yield stack
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, stop)
        proc.wait(timeout=90)
        reader.join(10)
