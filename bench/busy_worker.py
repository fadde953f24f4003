"""`python -m bench.busy_worker`: the real worker (`python -m listener`, same flags and settings) whose every job
first waits BUSY_SECONDS (default 2) before the tiny model runs: the time a GPU would be busy, with the CPU
free, as on a RunPod worker. The runsync accept latency measured against it is what a client sees while the
worker's one slot is generating; the tiny model's own CPU time stays small (256x256 in the benchmark)."""

from __future__ import annotations

import os
import sys
import time

from generation.engine import Engine


def main() -> int:
    seconds = float(os.environ.get("BUSY_SECONDS", "2"))
    generate = Engine.generate

    def busy_generate(self, request, progress=None):
        time.sleep(seconds)  # the GPU's share: the CPU is left to the request path, as on a GPU worker
        return generate(self, request, progress)

    Engine.generate = busy_generate
    from listener.__main__ import main as listener_main

    return listener_main()


if __name__ == "__main__":
    sys.exit(main())
