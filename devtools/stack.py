"""`make dev`: the whole system on this machine, then the contract's two examples as a client would run them.

Starts the Firestore emulator, a Storage emulator and a worker (`python -m listener --rp_serve_api`, tiny
models), each in a process group of its own, then:
- image example: the client writes the queued doc, then "the function" posts runsync to the worker;
- video example: the client writes the queued doc only, and the worker's reconciler finds it;
and prints each doc's status progression live, with the result URLs and the files saved under out/dev/.
It keeps running for `make submit PROMPT=...` until Ctrl-C, which stops every process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from devtools import emulators as emu
from devtools.client import Client, StackInfo
from devtools.worker import WorkerProcess

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "out" / "dev"
STATE = OUT / "stack.json"

IMAGE_EXAMPLE = {"prompt": "A sunset over mountains", "user_id": "test-user", "file_uid": "test-img-001",
                 "use_cloud_storage": True, "width": 512, "height": 512}
VIDEO_EXAMPLE = {"prompt": "Waves crashing on beach", "user_id": "test-user", "file_uid": "test-vid-001",
                 "use_cloud_storage": True, "num_frames": 16, "fps": 8}


def firebase_config() -> tuple[str, dict[str, int]]:
    """The demo project from .firebaserc and the emulator ports from firebase.json (defaults where absent)."""
    project = "demo-firegen"
    ports = {"firestore": 8080, "storage": 9199, "worker": 8000}
    try:
        project = json.loads((REPO / ".firebaserc").read_text())["projects"]["default"]
    except (OSError, KeyError, ValueError):
        pass
    try:
        emulators = json.loads((REPO / "firebase.json").read_text()).get("emulators", {})
        ports.update({name: int(emulators[name]["port"]) for name in ("firestore", "storage") if name in emulators})
    except (OSError, ValueError, KeyError):
        pass
    return project, ports


def say(text: str) -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make dev", description=__doc__.splitlines()[0])
    parser.add_argument("--image-model", default=os.environ.get("IMAGE_MODEL", "tiny"))
    parser.add_argument("--video-model", default=os.environ.get("VIDEO_MODEL", "tiny"))
    parser.add_argument("--once", action="store_true", help="stop after the two examples (for scripts and CI)")
    args = parser.parse_args(argv)

    project, ports = firebase_config()
    OUT.mkdir(parents=True, exist_ok=True)
    logs = OUT / "logs"
    started: list[emu.Emulator] = []

    def stop_all(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_all)
    t0 = time.monotonic()
    try:
        firestore = emu.FirestoreEmulator(logs, port=ports["firestore"])
        storage = emu.StorageEmulator(logs, port=ports["storage"], in_memory=True)
        for emulator in (firestore, storage):
            say(f"starting {emulator.name} emulator on {emulator.host_port} (log {emulator.log_path})")
            started.append(emulator.start())
        bucket = f"{project}.appspot.com"
        storage.client(project).create_bucket(bucket)
        env = emu.emulator_env(firestore, storage, project, bucket)
        worker = WorkerProcess(logs, env, port=ports["worker"], IMAGE_MODEL=args.image_model,
                               VIDEO_MODEL=args.video_model)
        say(f"starting worker on {worker.url} (IMAGE_MODEL={args.image_model}, VIDEO_MODEL={args.video_model}, "
            f"log {worker.log_path})")
        started.append(worker.start())
        info = StackInfo(project=project, firestore=firestore.host_port, storage=storage.url, bucket=bucket,
                         runsync_url=worker.runsync_url, out=str(OUT))
        STATE.write_text(json.dumps(info.__dict__, indent=2))
        say(f"stack ready in {time.monotonic() - t0:.1f} s\n")

        client = Client(info)
        runs = [
            threading.Thread(target=client.generate, args=(IMAGE_EXAMPLE,), kwargs={"via": "runsync"}),
            threading.Thread(target=client.generate, args=(VIDEO_EXAMPLE,), kwargs={"via": "document"}),
        ]
        for run in runs:
            run.start()
        for run in runs:
            run.join()
        say(f"\nboth examples done {time.monotonic() - t0:.1f} s after start; results in {OUT}")
        if args.once:
            return 0 if client.failures == 0 else 1
        say("the stack keeps running: in another terminal, `make submit PROMPT='a lighthouse at dusk'` "
            "(add VIDEO=1 for a video). Ctrl-C stops everything.")
        while True:
            signal.pause()
    except KeyboardInterrupt:
        say("\nstopping...")
        return 0
    except (emu.EmulatorError, emu.EmulatorUnavailable) as exc:
        say(f"make dev: {exc}")
        return 1
    finally:
        for process in reversed(started):
            process.stop()
        STATE.unlink(missing_ok=True)
        if started:
            say("all processes stopped")


if __name__ == "__main__":
    sys.exit(main())
