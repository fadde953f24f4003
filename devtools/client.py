"""A local stand-in for the contract's app client: write the queued doc, wake a worker, watch the doc live.

`python -m devtools.client --prompt "..." [--video]` (what `make submit` runs) talks to the stack that
`make dev` started, found through out/dev/stack.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from generation.contract import ContractError, parse_runsync_input

STATE = Path(__file__).resolve().parent.parent / "out" / "dev" / "stack.json"
_print_lock = threading.Lock()


@dataclass
class StackInfo:
    project: str
    firestore: str
    storage: str
    bucket: str
    runsync_url: str
    out: str


def post_runsync(url: str, data: dict, timeout: float = 60) -> dict:
    body = json.dumps({"input": data}).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class Client:
    def __init__(self, info: StackInfo):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import firestore

        self.info = info
        self.failures = 0
        # The emulator host is given explicitly so this works without FIRESTORE_EMULATOR_HOST in the shell.
        with mock.patch.dict(os.environ, {"FIRESTORE_EMULATOR_HOST": info.firestore}):
            self.db = firestore.Client(project=info.project, credentials=AnonymousCredentials())

    def say(self, file_uid: str, text: str) -> None:
        with _print_lock:
            print(f"[{file_uid}] {text}", flush=True)

    def generate(self, data: dict, via: str = "document", timeout: float = 300) -> dict | None:
        """Run one job the way the contract's client does; `via` "runsync" also calls the worker like the function."""
        from google.cloud import firestore

        try:
            request = parse_runsync_input(data)
        except ContractError as exc:
            self.say(data.get("file_uid", "?"), f"refused: {exc.message}")
            self.failures += 1
            return None
        ref = self.db.document(f"generations/{request.user_id}/{request.media_type}/{request.file_uid}")
        done = threading.Event()
        started = time.monotonic()
        last: dict = {}

        def on_snapshot(docs, changes, read_time):
            for snapshot in docs:
                doc = snapshot.to_dict() or {}
                shown = (doc.get("status"), doc.get("progress"))
                if shown != (last.get("status"), last.get("progress")):
                    progress = f" {doc['progress']:.0%}" if doc.get("status") == "processing" and doc.get("progress") else ""
                    self.say(request.file_uid, f"{time.monotonic() - started:5.1f}s  {doc.get('status')}{progress}")
                last.update(status=shown[0], progress=shown[1], doc=doc)
                if doc.get("status") in ("completed", "failed"):
                    done.set()

        watch = ref.on_snapshot(on_snapshot)
        try:
            options = {k: v for k, v in request.parameters().items() if k not in ("user_id", "file_uid", "use_cloud_storage")}
            ref.set({"status": "queued", "created_at": firestore.SERVER_TIMESTAMP, "generated": False, "error": False,
                     **options})
            if via == "runsync":
                answer = post_runsync(self.info.runsync_url, request.parameters())
                self.say(request.file_uid, f"runsync answered {answer.get('status')}: {answer.get('output') or answer.get('error')}")
            if not done.wait(timeout):
                self.say(request.file_uid, f"no result after {timeout:.0f} s")
                self.failures += 1
                return None
        finally:
            watch.unsubscribe()
        doc = last["doc"]
        if doc["status"] == "failed":
            self.failures += 1
            self.say(request.file_uid, f"failed ({doc.get('error_type')}): {doc.get('error_message')}")
            return doc
        for url in doc.get("images") or doc.get("videos") or []:
            path = Path(self.info.out) / url.split("%2F")[-1].split("?")[0]
            with urllib.request.urlopen(url, timeout=30) as response:
                path.write_bytes(response.read())
            self.say(request.file_uid, f"{url}\n    saved {path}")
        return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make submit", description="Submit one job to the stack `make dev` runs.")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--video", action="store_true", help="a text2video job (16 frames at 8 fps)")
    parser.add_argument("--user-id", default="dev-user")
    parser.add_argument("--options", default="{}", help='more contract fields as JSON, e.g. \'{"width": 768}\'')
    args = parser.parse_args(argv)
    try:
        info = StackInfo(**json.loads(STATE.read_text()))
    except OSError:
        print("make submit: no running stack (start it with `make dev` in another terminal)", file=sys.stderr)
        return 2
    data = {"prompt": args.prompt, "user_id": args.user_id, "file_uid": uuid.uuid4().hex[:12],
            "use_cloud_storage": True, **({"num_frames": 16, "fps": 8} if args.video else {}),
            **json.loads(args.options)}
    doc = Client(info).generate(data)
    return 0 if doc and doc.get("status") == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
