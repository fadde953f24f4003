"""`python -m bench.busy_worker`: the real worker (`python -m listener`, same flags and settings) whose every job
first waits BUSY_SECONDS (default 2) before the tiny model runs: the time a GPU would be busy, with the CPU
free, as on a RunPod worker. The runsync accept latency measured against it is what a client sees while the
worker's one slot is generating; the tiny model's own CPU time stays small (256x256 in the benchmark)."""

from __future__ import annotations

import os
import sys
import time


class BusyGenerator:
    """The engine, each job first holding its slot `seconds` as a busy GPU would (the CPU stays free)."""

    def __init__(self, engine, seconds: float):
        self.engine = engine
        self.seconds = seconds

    def generate(self, request, progress=None):
        time.sleep(self.seconds)  # the GPU's share: the CPU is left to the request path, as on a GPU worker
        return self.engine.generate(request, progress)

    def check_device(self) -> None:
        self.engine.check_device()


def main() -> int:
    from listener.__main__ import main as listener_main

    seconds = float(os.environ.get("BUSY_SECONDS", "2"))
    return listener_main(wrap_generator=lambda engine: BusyGenerator(engine, seconds))


if __name__ == "__main__":
    sys.exit(main())
