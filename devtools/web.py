"""The web app's local serving for `make dev` and the browser tests: its folder and, without the CLI, its server.

The bundle (web/dist, built by scripts/setup_web.py) is copied into a folder per run with
`firegen-emulators.json`: where the emulators of this run listen, which the page reads when served from this
machine. Under the Firebase CLI the Hosting emulator serves that folder (devtools/firebase_cli.py) and answers
`/__/firebase/init.json` itself; `StaticSite` serves it elsewhere (make dev's fallback), with an init.json file
of the same shape.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from devtools import emulators as emu

REPO = Path(__file__).resolve().parent.parent
DIST = REPO / "web" / "dist"
EMULATORS_FILE = "firegen-emulators.json"
APP_FILE = "firegen-app.json"  # scripts/setup_web.py's app_settings()


def missing() -> str | None:
    """Why the web app cannot be served here, or None."""
    if not (DIST / "app.js").is_file() or not (DIST / "index.html").is_file():
        return "web/dist is not built (python3 scripts/setup_web.py)"
    return None


def default_web_config(project: str) -> dict[str, str]:
    """What the Hosting emulator's /__/firebase/init.json holds for a demo project (firebase-tools'
    constructDefaultWebSetup): no real keys, which the emulators do not need."""
    return {
        "projectId": project,
        "apiKey": "fake-api-key",
        "authDomain": f"{project}.firebaseapp.com",
        "storageBucket": f"{project}.appspot.com",
    }


def prepare_site(
    root: Path,
    *,
    firestore: str,
    auth: str | None,
    functions: str | None,
    project: str | None = None,
    uid: str | None = None,
) -> Path:
    """Fill `root` with the bundle and this run's emulator addresses (host:port; None where one does not run).
    `project`: also write /__/firebase/init.json, for a server that is not Hosting."""
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(DIST, root, ignore=shutil.ignore_patterns(".*"))
    emulators = {"auth": auth, "firestore": firestore, "functions": functions, **({"uid": uid} if uid else {})}
    (root / EMULATORS_FILE).write_text(json.dumps(emulators, indent=2))
    if not (root / APP_FILE).exists():  # a bundle built before setup_web wrote it: no App Check
        (root / APP_FILE).write_text(json.dumps({"appCheckSiteKey": None}))
    if project:
        init = root / "__" / "firebase" / "init.json"
        init.parent.mkdir(parents=True)
        init.write_text(json.dumps(default_web_config(project), indent=2))
    return root


class StaticSite(emu.Emulator):
    """A static file server for a prepared site (Python's http.server), where the Hosting emulator cannot run."""

    name = "web"

    def __init__(self, log_dir: Path, root: Path, port: int | None = None):
        super().__init__(log_dir, port)
        self.root = Path(root)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "http.server", "--bind", self.host, "--directory", str(self.root), str(self.port)]
