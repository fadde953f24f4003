"""A local stand-in for the contract's app client: sign in, write the queued doc, call the function, watch the doc.

With the Firebase CLI's emulators (what `make dev` runs when it can), the client does what the contract's client
sample does, as a signed-in user of the Auth emulator: it writes the queued doc with the user's ID token (so
firestore.rules apply), calls the `generateWithRunPod` callable over HTTP (or, `via="document"`, leaves the
dispatch to the Firestore trigger), and follows the doc with a listener, as that user, until it is final (reading
it every few seconds too: see POLL_S).
Without them (the fallback), it writes the doc as admin and posts runsync to the worker itself, as the function
would (or leaves the doc to the worker's reconciler).

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
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

from devtools.emulators import close_firestore
from firegen_core.contract import ContractError, media_type_of, normalise_document_fields, parse_runsync_input

REPO = Path(__file__).resolve().parent.parent
STATE = REPO / "out" / "dev" / "stack.json"
DEV_EMAIL = "dev@firegen.test"
CALLABLE = "generateWithRunPod"
# A listener alone does not always see a job's end. On the Firestore emulator, a doc's Listen target added while
# the doc is written can get that write twice, a stale "no such doc" after it, a corrupt frame (the stream is then
# reopened), or, with no error, no message ever again: under `make dev --once` a worker completed the video while
# its listener, silent since the queued doc, waited out the timeout. So the client writes the doc once its
# listener has its first state, and while it waits for the end it also reads the doc every POLL_S.
LISTENING_S = 10.0  # at most this long for the listener's first state (then it writes anyway: the reads cover it)
POLL_S = 2.0
_print_lock = threading.Lock()


@dataclass
class StackInfo:
    project: str
    firestore: str  # host:port
    storage: str  # URL
    bucket: str
    runsync_url: str
    out: str
    auth: str | None = None  # the Auth emulator's host:port (None: no Firebase CLI, the fallback)
    functions: str | None = None  # base URL of the functions: http://HOST:PORT/PROJECT/us-central1
    web_url: str | None = None  # the web app (Hosting emulator, or a static server in the fallback); None: not built
    # Which Storage emulator serves `storage`: "firebase-cli" (storage.rules, the Firebase Storage API the JS SDK
    # calls) or "gcp-storage-emulator" (PyPI's: the Cloud Storage API alone, no rules)
    storage_emulator: str = "gcp-storage-emulator"


def post_runsync(url: str, data: dict, timeout: float = 60) -> dict:
    body = json.dumps({"input": data}).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def firestore_client(info: StackInfo, token: str | None = None):
    """A Firestore client on the stack's emulator: as admin (rules do not apply), or as the user whose ID token
    is given (rules apply to its reads, writes and listeners)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import firestore

    class UserClient(firestore.Client):
        # The library sends `Bearer owner` (admin) to an emulator on every call; a signed-in app sends its user's
        # ID token instead. (It has no public way to say so: this is the property its calls read.)
        @property
        def _rpc_metadata(self):
            metadata = [m for m in super()._rpc_metadata if m[0] != "authorization"]
            return [*metadata, ("authorization", f"Bearer {token}")]

    # The emulator host is given explicitly so this works without FIRESTORE_EMULATOR_HOST in the shell.
    with mock.patch.dict(os.environ, {"FIRESTORE_EMULATOR_HOST": info.firestore}):
        return (UserClient if token else firestore.Client)(project=info.project, credentials=AnonymousCredentials())


def shown_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _written_at(snapshot) -> datetime:
    """When the snapshot's state was written (update_time: a datetime, or a protobuf Timestamp on some paths)."""
    updated = snapshot.update_time
    return updated if isinstance(updated, datetime) else updated.ToDatetime(tzinfo=UTC)


def _contract_problem(data: dict) -> str:
    """What the contract says of a request the rules refused (": " and its message), as the callable would say
    it; nothing where it finds none (the rules refused for another reason)."""
    try:
        parse_runsync_input({"use_cloud_storage": True, **normalise_document_fields(data)})
    except ContractError as exc:
        return f": {exc.message}"
    return ""


def state_of(doc: dict) -> str:
    """A doc's status as the client says it: `processing 40%`; at 100% the steps are done and a video's decode and
    encode, then the upload, are under way: `processing 100%, finishing` (the web app's words)."""
    state, progress = str(doc.get("status")), doc.get("progress")
    if state == "processing" and progress:
        state += f" {progress:.0%}" + (", finishing" if progress >= 1 else "")
    return state


class Client:
    def __init__(self, info: StackInfo, email: str = DEV_EMAIL):
        self.info = info
        self.failures = 0
        self.uid = self.token = None
        if info.auth:
            from devtools.firebase_cli import sign_in

            self.uid, self.token = sign_in(info.auth, email)
        self.db = firestore_client(info, self.token)

    def close(self) -> None:
        """Close the Firestore client's gRPC channel now rather than whenever the garbage collector frees it."""
        close_firestore(self.db)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def say(self, file_uid: str, text: str) -> None:
        with _print_lock:
            print(f"[{file_uid}] {text}", flush=True)

    def call_function(self, data: dict) -> str:
        """Call the callable as the signed-in user; what it answered, in words."""
        from devtools.firebase_cli import call

        reply = call(f"{self.info.functions}/{CALLABLE}", data, self.token)
        if "error" in reply:
            return f"{CALLABLE} refused it ({reply['error'].get('status')}): {reply['error'].get('message')}"
        result = reply.get("result") or {}
        return f"{CALLABLE} answered {result.get('status')}: {result.get('message')}"

    def _still(self, doc: dict) -> str:
        """Where a job the client stops waiting for stands; it goes on in the worker without the client."""
        where = f" or watch it in the web app ({self.info.web_url})" if self.info.web_url else ""
        state = state_of(doc) if doc.get("status") else "not seen yet"
        return f"the job is {state} and goes on in the worker (wait longer with SUBMIT_ARGS='--wait 1800'{where})"

    def generate(self, data: dict, via: str = "callable", timeout: float = 300) -> dict | None:
        """Run one job the way the contract's client does. `data` is the runsync input (prompt, user_id,
        file_uid, use_cloud_storage, options); signed in, user_id is the user's uid. `via`: "callable" (write the
        doc, then call the function), "document" (write the doc only), "runsync" (the fallback's function: write
        the doc, then post runsync to the worker). Returns the final doc, or None when no doc came to be."""
        from google.api_core import exceptions
        from google.cloud import firestore

        if via == "callable" and not self.info.functions:
            via = "runsync"  # no Functions emulator: do what the function would
        data = {**data, **({"user_id": self.uid} if self.uid else {})}
        file_uid = data["file_uid"]
        options = {k: v for k, v in data.items() if k not in ("prompt", "user_id", "file_uid", "use_cloud_storage")}
        try:  # the client sample's camelCase spellings (numFrames) name video fields too
            media_type = media_type_of(normalise_document_fields(options))
        except ContractError:  # one field given twice: the function says so
            media_type = media_type_of(options)
        ref = self.db.document(f"generations/{data['user_id']}/{media_type}/{file_uid}")
        done, listening = threading.Event(), threading.Event()
        shown_lock = threading.Lock()  # the listener's thread and this one's reads both show states
        started = time.monotonic()
        last: dict = {}
        # The states the listener hears before the request's answer is said wait for it: the answer comes first, then
        # the states in their order, whatever the timing (a refused call's failed doc came before or after it).
        held: list[str] | None = []

        def tell(text: str) -> None:
            if held is None:
                self.say(file_uid, text)
            else:
                held.append(text)

        def answered(text: str | None = None) -> None:
            nonlocal held
            with shown_lock:
                if text is not None:
                    self.say(file_uid, text)
                for line in held or []:
                    self.say(file_uid, line)
                held = None

        def show(snapshot) -> None:
            if not snapshot.exists:
                return
            written_at = _written_at(snapshot)
            with shown_lock:
                # A read and the listener can bring the same write, or an older state after a newer one.
                if "written_at" in last and written_at <= last["written_at"]:
                    return
                doc = snapshot.to_dict() or {}
                shown = (doc.get("status"), doc.get("progress"))
                if shown != (last.get("status"), last.get("progress")):
                    tell(f"{time.monotonic() - started:5.1f}s  {state_of(doc)}")
                last.update(status=shown[0], progress=shown[1], doc=doc, written_at=written_at)
                if doc.get("status") in ("completed", "failed"):
                    done.set()

        def on_snapshot(docs, changes, read_time):
            for snapshot in docs:
                show(snapshot)
            listening.set()

        watch = ref.on_snapshot(on_snapshot)
        try:
            listening.wait(LISTENING_S)  # see LISTENING_S: the write then reaches a listener already in place
            try:  # the contract's client sample: setDoc(docRef, {status: 'queued', created_at: serverTimestamp(), ...})
                ref.set(
                    {
                        "status": "queued",
                        "created_at": firestore.SERVER_TIMESTAMP,
                        "prompt": data.get("prompt"),
                        "generated": False,
                        "error": False,
                        **options,
                    }
                )
                written = True
            except exceptions.PermissionDenied:
                why = _contract_problem(data)
                self.say(file_uid, "firestore.rules refused the queued doc (PERMISSION_DENIED)" + why)
                written = False
            if via == "callable":
                answered(self.call_function(data))
                # A request the callable refused is recorded as a failed doc (the contract's), which is watched.
                written = written or ref.get().exists
            elif via == "runsync" and written:
                answer = post_runsync(self.info.runsync_url, data)
                answered(f"runsync answered {answer.get('status')}: {answer.get('output') or answer.get('error')}")
            answered()
            if not written:
                self.say(file_uid, "no result to watch: the job's doc was not written")
                self.failures += 1
                return None
            deadline = time.monotonic() + timeout
            while not done.wait(max(0.0, min(POLL_S, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    self.say(file_uid, f"no result after {timeout:.0f} s: {self._still(last.get('doc') or {})}")
                    self.failures += 1
                    return None
                try:  # see POLL_S: the end the listener missed
                    show(ref.get(retry=None, timeout=POLL_S * 5))
                except exceptions.GoogleAPICallError:
                    pass  # a read that failed is only a missed look; the listener and the next read go on
        finally:
            answered()  # a call that raised (no server, Ctrl-C) leaves the states heard so far to say
            watch.unsubscribe()
        doc = last["doc"]
        if self.info.functions:  # the dispatch marker of functions/dispatch.py, when a function sent it
            by = doc.get("dispatched_by")
            if by:
                self.say(file_uid, f"dispatched by the {by}")
            elif doc.get("worker_id"):  # else refused before any worker took it: its failure says why
                self.say(file_uid, "taken from the queue by the worker's own listener (no dispatch was needed)")
        if doc["status"] == "failed":
            self.failures += 1
            self.say(file_uid, f"failed ({doc.get('error_type')}): {doc.get('error_message')}")
            return doc
        for url in doc.get("images") or doc.get("videos") or []:
            path = Path(self.info.out) / url.split("%2F")[-1].split("?")[0]
            with urllib.request.urlopen(url, timeout=30) as response:
                path.write_bytes(response.read())
            self.say(file_uid, f"{url}\n    saved {shown_path(path)}")
        return doc


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"a number of seconds above 0 (got {text!r})")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make submit",
        description="Submit one job to the stack `make dev` runs. Make's PROMPT=, VIDEO=1 and OPTIONS= are --prompt, "
        "--video and --options; the other flags go in SUBMIT_ARGS.",
    )
    parser.add_argument("--prompt", required=True, help="the job's prompt (PROMPT=)")
    parser.add_argument("--video", action="store_true", help="a text2video job (16 frames at 8 fps; VIDEO=1)")
    parser.add_argument("--user-id", default="dev-user", help="without the Firebase CLI (signed in: the user's uid)")
    parser.add_argument("--options", default="{}", help="more contract fields as JSON, e.g. OPTIONS='{\"width\": 768}'")
    parser.add_argument(
        "--via",
        choices=("callable", "document"),
        default="callable",
        help="call the function after writing the doc, or only write it (default: callable)",
    )
    parser.add_argument("--stack", type=Path, default=STATE, help="the running stack's state file")
    parser.add_argument(
        "--wait",
        type=_seconds,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for the job's end (default 300; the job goes on in the worker either way)",
    )
    args = parser.parse_args(argv)
    try:
        options = json.loads(args.options)
    except ValueError:
        options = None
    if not isinstance(options, dict):
        print(
            f"make submit: OPTIONS must be a JSON object, e.g. '{{\"width\": 768}}' (got {args.options})",
            file=sys.stderr,
        )
        return 2
    try:
        info = StackInfo(**json.loads(args.stack.read_text()))
    except OSError:
        print("make submit: no running stack (start it with `make dev` in another terminal)", file=sys.stderr)
        return 2
    except (ValueError, TypeError):
        print(f"make submit: {args.stack} is no stack state file (start `make dev` again)", file=sys.stderr)
        return 2
    data = {
        "prompt": args.prompt,
        "user_id": args.user_id,
        "file_uid": uuid.uuid4().hex[:12],
        "use_cloud_storage": True,
        **({"num_frames": 16, "fps": 8} if args.video else {}),
        **options,
    }
    try:
        with Client(info) as client:
            doc = client.generate(data, via=args.via, timeout=args.wait)
    except OSError as exc:  # requests' and urllib's connection errors included
        print(f"make submit: the stack in {args.stack} does not answer ({exc})", file=sys.stderr)
        return 2
    return 0 if doc and doc.get("status") == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
