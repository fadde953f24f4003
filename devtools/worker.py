"""`python -m listener` as a real subprocess for the tests, on the emulators, with the tiny models.

It reuses the emulator harness's process handling (own process group, readiness poll with a deadline, log
file, SIGTERM then SIGKILL), so a worker can be started, signalled and stopped like any emulator.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from devtools import emulators as emu

REPO = Path(__file__).resolve().parent.parent


class WorkerProcess(emu.Emulator):
    """The RunPod worker serving the SDK's local API (`/runsync`) on a free port."""

    name = "worker"
    health_path = "/"  # the SDK's local API serves its docs page there

    def __init__(
        self,
        log_dir: Path,
        env: dict[str, str],
        *,
        port: int | None = None,
        serve_api: bool = True,
        module: str = "listener",
        **settings: str,
    ):
        super().__init__(log_dir, port)
        self.env = env
        self.serve_api = serve_api
        self.module = module  # bench.busy_worker wraps the same entry point
        self.settings = {
            "IMAGE_MODEL": "tiny",
            "VIDEO_MODEL": "tiny",
            "SWEEP_INTERVAL_SECONDS": "1",
            "LEASE_SECONDS": "10",
            **settings,
        }

    def command(self) -> list[str]:
        api = ["--rp_serve_api", "--rp_api_host", self.host, "--rp_api_port", str(self.port)]
        return [sys.executable, "-m", self.module, *(api if self.serve_api else [])]

    def process_env(self) -> dict[str, str]:
        return {**os.environ, **self.env, **self.settings, "PYTHONUNBUFFERED": "1"}

    def cwd(self) -> Path:
        return REPO

    def is_ready(self) -> bool:
        if self.serve_api:
            return super().is_ready()
        return "worker_ready" in self.log_tail(200)

    @property
    def runsync_url(self) -> str:
        return f"{self.url}/runsync"

    def signal(self, signum: int) -> None:
        os.killpg(self.pid, signum)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self._proc.wait(timeout)
        except Exception:
            return None

    def events(self, name: str) -> list[str]:
        return [line for line in self.log_path.read_text().splitlines() if f'"event": "{name}"' in line]

    def start_events(self) -> list[dict]:
        """The JSON lines of its latest start."""
        events = []
        for line in self.log_tail(400).splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def loading(self) -> bool:
        """Whether it is ready and still loading a model in the background (`worker_ready`'s `loading`, until
        `models_loaded`)."""
        events = self.start_events()
        ready = next((event for event in events if event.get("event") == "worker_ready"), None)
        loaded = any(event.get("event") == "models_loaded" for event in events)
        return bool(ready and ready.get("loading")) and not loaded

    def start_warnings(self) -> list[str]:
        """What its latest start warned of, one line each (`no_gpu`, `model_not_available`): make dev says them
        on the terminal, where a newcomer looks, not only in the log. Up to `worker_ready`, and then the failure of
        the model loaded in the background."""
        said = []
        events = self.start_events()
        names = [event.get("event") for event in events]
        ready = names.index("worker_ready") if "worker_ready" in names else len(names)
        for at, event in enumerate(events):
            if at > ready and names[at] != "model_not_available":  # the background load's, after ready
                continue
            if event.get("severity") in ("WARNING", "ERROR"):
                about = f" ({event['task_type']})" if event.get("task_type") else ""
                detail = event.get("note") or event.get("error") or ""
                what = f"{event.get('event')}{about}{': ' if detail else ''}{detail}"
                library = str(event.get("logger") or "listener").split(".")[0]  # a library's own word: whose
                said.append(" ".join((what if library == "listener" else f"{library}: {what}").split()))
        return said
