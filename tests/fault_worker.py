"""`python -m tests.fault_worker`: the production worker (`python -m listener`) with an injected accelerator
fault, for the tests: this machine has no GPU to break, so the fault is raised where a broken card raises it.

FAULT=job      every generation raises the CUDA error of a corrupted context (not out-of-memory)
FAULT=fitness  the start-up device check (the SDK's fitness check) raises one
"""

from __future__ import annotations

import os
import sys


class FaultyGenerator:
    def __init__(self, engine, fault: str):
        self.engine = engine
        self.fault = fault

    def generate(self, request, progress=None):
        if self.fault == "job":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.engine.generate(request, progress)

    def check_device(self) -> None:
        if self.fault == "fitness":
            raise RuntimeError("CUDA error: uncorrectable ECC error encountered")
        self.engine.check_device()


if __name__ == "__main__":
    from listener.__main__ import main

    fault = os.environ["FAULT"]
    sys.exit(main(wrap_generator=lambda engine: FaultyGenerator(engine, fault)))
