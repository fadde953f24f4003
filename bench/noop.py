"""A generator that does no diffusion: the benchmark's way to time the lifecycle alone.

`seconds` stands in for GPU time (default 0: pure overhead), reported as `steps` progress steps. Outputs are a fixed small PNG, so uploads are
real but tiny. `python -m bench.noop` runs a whole worker (job store, reconciler, Storage) around it, as a
separate process like a real worker, for the throughput runs.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from types import SimpleNamespace

from PIL import Image


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


class NoopGenerator:
    """`steps` progress reports spread over `seconds` (a denoising loop's steps, where a cancel can stop it)."""

    def __init__(self, seconds: float = 0.0, steps: int = 4):
        self.seconds = seconds
        self.steps = max(steps, 1)
        self.png = _png()

    def generate(self, request, progress=None):
        end = time.monotonic() + self.seconds
        for step in range(1, self.steps + 1):
            time.sleep(max(end - time.monotonic(), 0) / (self.steps + 1 - step))
            if progress:
                progress(step / self.steps)
        files = [(self.png, "png", "image/png")] * request.num_images_per_prompt
        return SimpleNamespace(seed=request.seed or 0, files=files, video_info=None)


def main() -> int:
    from listener.__main__ import make_worker_id
    from listener.credentials import clients
    from listener.settings import load_settings
    from listener.worker import build_worker

    settings = load_settings()
    generator = NoopGenerator(float(os.environ.get("NOOP_SECONDS", "0")), int(os.environ.get("NOOP_STEPS", "4")))
    worker = build_worker(settings, generator, *clients(settings), worker_id=make_worker_id()).start()
    worker.reconciler.wait_listening(30)  # as the real worker does before it says it is ready
    print("worker_ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            signal.pause()
    finally:
        worker.shutdown(1.0)


if __name__ == "__main__":
    sys.exit(main())
