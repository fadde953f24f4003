#!/usr/bin/env python3
"""Set up the web app (web/): its npm packages and its bundle, and with --browser the Chromium its tests drive.

    web/node_modules/   `npm ci` from web/package-lock.json (the Firebase JS SDK, esbuild, TypeScript,
                        axe-core for the browser tests)
    web/dist/           `npm run build`: type-check, then esbuild's bundle beside web/public/ (Hosting serves it)
    /usr/bin/chromium   Debian's `chromium`, installed with apt-get when missing (--browser; `make test`).
                        Playwright's own browser download needs the network's CDN, so the tests use this one.

Each step is skipped when already done (stamps hold a hash of what it was built from). Only the standard library.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "web"
DIST = WEB / "dist"
MODULES_STAMP = WEB / "node_modules" / ".package-lock.sha256"
BUILD_STAMP = DIST / ".sources.sha256"
BUILD_INPUTS = ("package-lock.json", "tsconfig.json", "build.mjs", "src", "public")
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        for file in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
            h.update(str(file.relative_to(WEB)).encode() + b"\0" + file.read_bytes() + b"\0")
    return h.hexdigest()


def npm_packages() -> None:
    want = digest(WEB / "package-lock.json")
    if MODULES_STAMP.is_file() and MODULES_STAMP.read_text() == want:
        return
    if not shutil.which("npm"):
        raise SystemExit("setup_web: npm not found: the web app needs Node.js 20+ and npm")
    run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=WEB)
    MODULES_STAMP.write_text(want)


def bundle() -> Path:
    want = digest(*(WEB / name for name in BUILD_INPUTS))
    if BUILD_STAMP.is_file() and BUILD_STAMP.read_text() == want:
        return DIST
    run(["npm", "run", "--silent", "build"], cwd=WEB)
    BUILD_STAMP.write_text(want)
    return DIST


def app_settings(environ=os.environ) -> Path:
    """web/dist/firegen-app.json, which the page reads at start, from this environment (Hosting's predeploy runs
    this script, so it is the deployer's): the App Check site key (FIREGEN_APP_CHECK_SITE_KEY, a reCAPTCHA
    Enterprise key), or null; the region the callables were deployed to (FIREGEN_FUNCTIONS_REGION, where
    `set_global_options(region=...)` moved them), or null for the SDKs' us-central1. Written at every run: neither
    is an input of the bundle."""
    key = (environ.get("FIREGEN_APP_CHECK_SITE_KEY") or "").strip() or None
    if key is not None and not re.fullmatch(r"[A-Za-z0-9_-]{20,100}", key):
        raise SystemExit("setup_web: FIREGEN_APP_CHECK_SITE_KEY is not a reCAPTCHA Enterprise site key")
    region = (environ.get("FIREGEN_FUNCTIONS_REGION") or "").strip() or None
    if region is not None and not re.fullmatch(r"[a-z]+(-[a-z]+)+[0-9]+", region):
        raise SystemExit("setup_web: FIREGEN_FUNCTIONS_REGION is not a Cloud Functions region such as europe-west1")
    path = DIST / "firegen-app.json"
    path.write_text(json.dumps({"appCheckSiteKey": key, "functionsRegion": region}, indent=2) + "\n")
    return path


def chromium() -> str | None:
    return next((p for p in CHROMIUM_PATHS if os.access(p, os.X_OK)), None) or shutil.which("chromium")


def under_ci(environ=os.environ) -> bool:
    return environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def apt_prefix() -> list[str] | None:
    """How this user runs apt-get: as root, or through a sudo that asks no password; None where neither."""
    if not shutil.which("apt-get"):
        return None
    if os.geteuid() == 0:
        return []
    sudo = shutil.which("sudo")
    if sudo and subprocess.run([sudo, "-n", "true"], capture_output=True).returncode == 0:
        return [sudo, "-n"]
    return None


def install_chromium(environ=os.environ) -> str | None:
    """Debian's chromium, installed where this user may; else None, and the browser tests skip (they fail under CI,
    so CI stops here instead, saying why)."""
    found = chromium()
    if found:
        return found
    prefix = apt_prefix()
    if prefix is None:
        why = "setup_web: Chromium is missing and this user cannot apt-get it: install Debian's package (sudo apt-get install -y chromium)"
        if under_ci(environ):
            raise SystemExit(why)
        print(f"{why}; until then the browser tests skip", file=sys.stderr, flush=True)
        return None
    env = {**environ, "DEBIAN_FRONTEND": "noninteractive"}
    run([*prefix, "apt-get", "update", "-qq"], env=env)
    run([*prefix, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], env=env)
    found = chromium()
    if not found:
        raise SystemExit("setup_web: apt-get installed chromium, but no chromium executable was found")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--browser", action="store_true", help="also install Debian's chromium when missing")
    args = parser.parse_args(argv)
    npm_packages()
    bundle()
    settings = json.loads(app_settings().read_text())
    check = "with App Check (reCAPTCHA Enterprise)" if settings["appCheckSiteKey"] else "without App Check"
    print(f"setup_web: ready; the app is {DIST.relative_to(ROOT)}, {check}", flush=True)
    if args.browser and (browser := install_chromium()):
        print(f"setup_web: browser {browser}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
