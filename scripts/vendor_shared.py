#!/usr/bin/env python3
"""Ship the shared core to the Cloud Functions: copy the `firegen_core` package whole into functions/.

`firegen_core/` (the request contract, error types, job state machine and job store) is the one source. The
functions deploy from functions/ alone, so firebase.json's `predeploy` hook runs this script before every
`firebase deploy --only functions`, and `make dev`/the tests run it before the emulators load the functions.
The copy keeps the package's own name (nothing else in functions/ or the worker is called that, so it cannot
shadow anything), is git-ignored, world-readable (Cloud Build reads it as another user), and is the whole
package, so no hand-kept list of modules can drift.

    python scripts/vendor_shared.py          # (re)write the copy; make the whole deploy source world-readable
    python scripts/vendor_shared.py --check  # exit 1 when the copy is missing or differs from the original

Cloud Build unpacks the uploaded source and reads it as another user, so a file checked out or written under a
strict umask (0600) would break the deploy: every file the functions deploy is made readable by all (and every
folder searchable), not only the copy.

Only the standard library: it runs with whatever python3 the Firebase CLI finds.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ROOT / "functions"
PACKAGE = "firegen_core"
# Copies an older layout wrote (the worker's own package names): removed so they can never be imported again.
RETIRED = ("generation", "listener")
FILE_MODE, DIR_MODE = 0o644, 0o755


def _sources(root: Path) -> list[Path]:
    return sorted(p.relative_to(root / PACKAGE) for p in (root / PACKAGE).rglob("*.py"))


def stale(root: Path = ROOT, dest: Path = FUNCTIONS) -> list[str]:
    """What is wrong with the copy: files missing, different, extra, or not world-readable."""
    problems = []
    wanted = _sources(root)
    copy = dest / PACKAGE
    for rel in wanted:
        target = copy / rel
        if not target.is_file() or not filecmp.cmp(root / PACKAGE / rel, target, shallow=False):
            problems.append(f"{PACKAGE}/{rel}")
        elif target.stat().st_mode & 0o444 != 0o444:
            problems.append(f"{PACKAGE}/{rel} (not world-readable)")
    if copy.is_dir():
        problems += [
            f"{PACKAGE}/{p.relative_to(copy)} (extra)"
            for p in sorted(copy.rglob("*.py"))
            if p.relative_to(copy) not in wanted
        ]
    problems += [f"{name}/ (retired copy)" for name in RETIRED if (dest / name).exists()]
    return problems


def vendor(root: Path = ROOT, dest: Path = FUNCTIONS) -> bool:
    """Replace the copy when it is stale; returns whether anything was written."""
    if not stale(root, dest):
        return False
    for name in RETIRED:
        shutil.rmtree(dest / name, ignore_errors=True)
    # Built beside the target and swapped in, so a running emulator never imports a half-written package.
    staging = Path(tempfile.mkdtemp(dir=dest, prefix=f".{PACKAGE}."))
    try:
        built = staging / PACKAGE
        shutil.copytree(root / PACKAGE, built, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for path in [built, *built.rglob("*")]:
            path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)
        old = dest / PACKAGE
        if old.exists():
            old.rename(staging / "old")
        built.rename(old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


# Never deployed (firebase.json's `ignore`), and not ours to change: the venv is a build of its own.
NOT_DEPLOYED = ("venv", "__pycache__")


def unreadable(dest: Path = FUNCTIONS) -> list[Path]:
    """Files and folders of the deploy source that another user could not read (or enter)."""
    found = []
    for folder, dirs, files in os.walk(dest):
        dirs[:] = [d for d in dirs if d not in NOT_DEPLOYED and not os.path.islink(os.path.join(folder, d))]
        for name, want in [*((d, 0o555) for d in dirs), *((f, 0o444) for f in files)]:
            path = Path(folder, name)
            if not path.is_symlink() and path.stat().st_mode & want != want:
                found.append(path)
    if dest.stat().st_mode & 0o555 != 0o555:
        found.append(dest)
    return sorted(found)


def make_readable(dest: Path = FUNCTIONS) -> list[Path]:
    """Add read (and, for folders, search) permission for all to what `unreadable` finds; returns those paths."""
    fixed = unreadable(dest)
    for path in fixed:
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    return fixed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report what is out of date")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale()
        for problem in problems:
            print(f"vendor_shared: out of date: {problem}", file=sys.stderr)
        return 1 if problems else 0
    written = vendor()
    print(f"vendor_shared: functions/{PACKAGE}/ {'written' if written else 'up to date'}")
    for path in make_readable():
        print(f"vendor_shared: made world-readable: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
