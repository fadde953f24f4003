"""`python -m tests.fault_worker`: the production worker (`python -m listener`) with an injected fault, for the
tests: this machine has no GPU to break, so the fault is raised where a broken card raises it; and Firestore's
listen streams cannot be made to stay silent on demand.

FAULT=job        every generation raises the CUDA error of a corrupted context (not out-of-memory)
FAULT=fitness    the start-up device check (the SDK's fitness check) raises one
FAULT=listeners  the listeners attach, but no snapshot of theirs reaches the worker (as when the listen streams
                 never answer), and the start's 30 s wait for them is cut to 1 s
FAULT=stall      the models' load never returns (as from a network volume that stalls, or a card whose driver
                 hangs CUDA's initialisation: no file here can be made to stall a read)
FAULT=gate-video the video model's load waits until the file FAULT_GATE names exists (for good, when it never
                 does), in torch's C++ code as a load is (a wait on its TCP store, taking no CPU): the worker's
                 background load of its second model, held as long as a test needs
FAULT=gate-image the same for the image model's load (the second model where the oldest queued job is a video)
FAULT=storage    every generation returns a small PNG at once, and the bucket refuses each upload HTTP 403 (the
                 worker's grant revoked while it runs: the Storage emulator has no IAM to revoke)
FAULT=crash      a bug in the start: the engine's wrapping raises a TypeError
FAULT=crash-sdk  a bug in the RunPod SDK's loop: its start() raises, once the worker serves
Several at once, comma-separated: FAULT=fitness,stall.
"""

from __future__ import annotations

import os
import sys

GATES = {"gate-image": "generation.image.ImagePipeline", "gate-video": "generation.video.VideoPipeline"}


class FaultyGenerator:
    def __init__(self, engine, faults: set[str]):
        self.engine = engine
        self.faults = faults

    def generate(self, request, progress=None):
        if "job" in self.faults:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if "storage" in self.faults:
            from PIL import Image

            from generation.engine import GenerationResult, OutputFile
            from generation.media import encode_png

            png = OutputFile(encode_png(Image.new("RGB", (request.width, request.height))), "png", "image/png")
            return GenerationResult(request.task_type, 1, [png], request.width, request.height)
        return self.engine.generate(request, progress)

    def loading(self, task_type: str) -> bool:
        return self.engine.loading(task_type)

    def check_device(self) -> None:
        if "fitness" in self.faults:
            raise RuntimeError("CUDA error: uncorrectable ECC error encountered")
        self.engine.check_device()


def silence_listeners() -> None:
    """FAULT=listeners (the worker's listeners open their watches through listener.watching alone)."""
    from listener import watching
    from listener.reconciler import Reconciler

    on_snapshot, wait_listening = watching.on_snapshot, Reconciler.wait_listening

    def attach_deaf(query, callback):
        return on_snapshot(query, lambda *args: None)

    def wait_a_second_at_most(reconciler, timeout):
        return wait_listening(reconciler, min(timeout, 1.0))

    watching.on_snapshot = attach_deaf
    Reconciler.wait_listening = wait_a_second_at_most  # type: ignore[method-assign]


if __name__ == "__main__":
    from listener.__main__ import main

    faults = set(os.environ["FAULT"].split(","))
    if "listeners" in faults:
        silence_listeners()
    if "stall" in faults:
        import threading

        from generation.engine import Engine

        def stalled_preload(engine, *task_types):
            threading.Event().wait()

        Engine.preload = stalled_preload  # type: ignore[method-assign]
    gated = [pipeline for fault, pipeline in GATES.items() if fault in faults]
    if gated:
        import contextlib
        import importlib
        from pathlib import Path

        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # each wait's timeout is a C++ warning otherwise

        gate = Path(os.environ["FAULT_GATE"])
        for name in gated:
            module, _, cls_name = name.rpartition(".")
            cls = getattr(importlib.import_module(module), cls_name)

            def gated_load(cls, *args, load=cls.load.__func__, **kwargs):
                from datetime import timedelta

                import torch.distributed as dist

                # Waiting in torch's C++ code, as a load is (the GIL released, no CPU taken): a wait on a key of
                # torch's own TCP store that is never set, a fifth of a second at a time.
                store = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
                while not gate.exists():
                    with contextlib.suppress(dist.DistStoreError):
                        store.wait(["never"], timedelta(milliseconds=200))
                return load(cls, *args, **kwargs)

            cls.load = classmethod(gated_load)
    if "storage" in faults:
        from google.api_core.exceptions import Forbidden
        from google.cloud.storage import Blob

        def refused(blob, *args, **kwargs):
            raise Forbidden("worker@project.iam.gserviceaccount.com does not have storage.objects.create access")

        Blob.upload_from_string = refused  # type: ignore[method-assign]
    if "crash-sdk" in faults:
        from listener.startup import import_runpod_sdk

        import_runpod_sdk()
        import runpod.serverless

        def broken_start(config):
            raise RuntimeError("a bug in the SDK's loop")

        runpod.serverless.start = broken_start

    def wrap(engine):
        if "crash" in faults:
            raise TypeError("a bug in the worker's start")
        return FaultyGenerator(engine, faults)

    sys.exit(main(wrap_generator=wrap))
