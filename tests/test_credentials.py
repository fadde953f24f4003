"""Credentials from a service account key's JSON text (a RunPod secret is an environment string), with a key
generated in the test: both clients use it, signed URLs are signed with it (the signature verified against the
key), a malformed value stops start-up with one line that names the variable and never echoes the value, and
no log line carries a signed URL's signature, a token or a key."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import redirect_stdout
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from fixtures_keys import pem_body, service_account_key

from devtools.worker import REPO
from listener.credentials import NO_PROJECT, clients
from listener.settings import SettingsError, load_settings
from listener.storage import ResultStore

SECRET_MARK = "SUPERSECRET-do-not-print-0123456789"


@pytest.fixture
def production_env(monkeypatch):
    """No emulators: the clients are built for Google Cloud (constructing them makes no network call)."""
    for name in (
        "FIRESTORE_EMULATOR_HOST",
        "STORAGE_EMULATOR_HOST",
        "GOOGLE_CLOUD_PROJECT",
        "GCLOUD_PROJECT",
        "FIREBASE_SERVICE_ACCOUNT_JSON",
        "GOOGLE_APPLICATION_CREDENTIALS",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STORAGE_BUCKET", "demo-keyed.firebasestorage.app")
    return monkeypatch


def verify_v4_signature(url: str, key) -> None:
    """Recompute the V4 string-to-sign from the URL (GET, host header only, unsigned payload) and check the
    signature with the key's public half: raises InvalidSignature when it was not signed with this key."""
    parts = urlsplit(url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    signature = dict(params)["X-Goog-Signature"]
    raw = [p for p in parts.query.split("&") if not p.startswith("X-Goog-Signature=")]
    canonical = "\n".join(
        ["GET", parts.path, "&".join(sorted(raw)), f"host:{parts.netloc}", "", "host", "UNSIGNED-PAYLOAD"]
    )
    values = dict(params)
    scope = values["X-Goog-Credential"].split("/", 1)[1]
    to_sign = "\n".join(
        ["GOOG4-RSA-SHA256", values["X-Goog-Date"], scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key.public_key().verify(bytes.fromhex(signature), to_sign.encode(), padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize("variable", ["FIREBASE_SERVICE_ACCOUNT_JSON", "GOOGLE_APPLICATION_CREDENTIALS"])
def test_the_keys_json_text_builds_both_clients_and_signs_urls(production_env, variable):
    key_json, key = service_account_key("demo-keyed")
    production_env.setenv(variable, key_json)
    settings = load_settings()
    assert settings.service_account[0] == variable
    assert key_json not in repr(settings) and pem_body(key_json) not in str(settings.model_dump())
    db, files = clients(settings)
    email = "firegen-worker@demo-keyed.iam.gserviceaccount.com"
    assert db.project == files.project == "demo-keyed"  # the key's project_id when none is set
    assert db._credentials.service_account_email == files._credentials.service_account_email == email
    url = ResultStore(files, settings.storage_bucket, url_style="signed").url_for("generating/u/image/f.png")
    assert url.startswith("https://storage.googleapis.com/demo-keyed.firebasestorage.app/generating/u/image/f.png?")
    assert dict(parse_qsl(urlsplit(url).query))["X-Goog-Credential"].startswith(email + "/")
    verify_v4_signature(url, key)  # signed offline with the key from the variable
    _, other = service_account_key("demo-keyed")
    with pytest.raises(InvalidSignature):
        verify_v4_signature(url, other)


def wrapped_base64(text: str, encode=base64.b64encode) -> str:
    """As `base64` prints it: 76 characters a line."""
    packed = encode(text.encode()).decode()
    return "\n".join(packed[i : i + 76] for i in range(0, len(packed), 76))


@pytest.mark.parametrize(
    "variable,form",
    [
        ("FIREBASE_SERVICE_ACCOUNT_JSON", "base64"),
        ("FIREBASE_SERVICE_ACCOUNT_JSON", "urlsafe-base64"),
        ("FIREBASE_SERVICE_ACCOUNT_JSON", "file"),
        ("FIREBASE_SERVICE_ACCOUNT_JSON", "pasted-newlines"),
        ("GOOGLE_APPLICATION_CREDENTIALS", "base64"),
    ],
)
def test_the_key_in_the_other_forms_a_secret_holds(production_env, tmp_path, variable, form):
    """What guides tell users to put in a secret besides the JSON text: its base64 (wrapped or not, either
    alphabet), a key file's path (a network volume), the JSON with its private key's \\n escapes turned into
    real newlines by a form. Before: "is not valid JSON" for each, and a path or base64 in
    GOOGLE_APPLICATION_CREDENTIALS went to Google's lookup, whose message quotes the value."""
    key_json, key = service_account_key("demo-keyed")
    path = tmp_path / "key.json"
    path.write_text(key_json)
    value = {
        "base64": wrapped_base64(key_json),
        "urlsafe-base64": base64.urlsafe_b64encode(key_json.encode()).decode().rstrip("="),
        "file": str(path),
        "pasted-newlines": key_json.replace("\\n", "\n"),
    }[form]
    assert value != key_json
    production_env.setenv(variable, value)
    settings = load_settings()
    assert settings.service_account[0] == variable
    assert settings.service_account[1] == json.loads(key_json)
    _, files = clients(settings)
    url = ResultStore(files, settings.storage_bucket, url_style="signed").url_for("generating/u/image/f.png")
    verify_v4_signature(url, key)


def test_a_blank_emulator_variable_is_no_emulator_for_the_libraries_either(production_env):
    """A review: a blank FIRESTORE_EMULATOR_HOST (a compose file's `${...}` with nothing behind it), unset for the
    settings, was an emulator at '' for google-cloud-firestore, which reads the variable itself: every call failed
    "Failed to create channel to ''" and the worker left at each start, naming no variable."""
    key_json, _ = service_account_key("demo-keyed")
    production_env.setenv("FIREBASE_SERVICE_ACCOUNT_JSON", key_json)
    production_env.setenv("FIRESTORE_EMULATOR_HOST", "")
    production_env.setenv("STORAGE_EMULATOR_HOST", "  ")
    settings = load_settings()
    assert settings.firestore_emulator_host is None and settings.storage_emulator_host is None
    db, files = clients(settings)
    assert db._emulator_host is None and db._credentials.service_account_email.startswith("firegen-worker@")
    assert files._connection.API_BASE_URL == "https://storage.googleapis.com"


def test_a_key_file_path_is_left_to_application_default_credentials(production_env, tmp_path):
    path = tmp_path / "key.json"
    path.write_text(service_account_key("demo-keyed")[0])
    production_env.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    assert load_settings().service_account is None


def test_credentials_that_name_no_project_ask_for_google_cloud_project(production_env, tmp_path):
    """A review: a user account's Application Default Credentials (`gcloud auth application-default login`), with
    no GOOGLE_CLOUD_PROJECT, read "GOOGLE_APPLICATION_CREDENTIALS names a path that cannot be read as a key
    file": google-cloud-core's "Project was not passed" is an OSError."""
    path = tmp_path / "adc.json"
    user = {"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "r"}
    path.write_text(json.dumps(user))
    production_env.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    with pytest.raises(SettingsError) as refused:
        clients(load_settings())
    assert str(refused.value) == NO_PROJECT


@pytest.mark.parametrize("variable", ["FIREBASE_SERVICE_ACCOUNT_JSON", "GOOGLE_APPLICATION_CREDENTIALS"])
def test_a_key_without_its_project_id_asks_for_google_cloud_project(production_env, variable):
    """A review: a key with no `project_id` (the settings take it: the key's email and private key are what a
    key needs) and no GOOGLE_CLOUD_PROJECT was told "no Google credentials: set FIREBASE_SERVICE_ACCOUNT_JSON",
    the variable it had set: Google's lookup of a project failed as a lookup of credentials."""
    key = json.loads(service_account_key("demo-keyed")[0])
    del key["project_id"]
    production_env.setenv(variable, json.dumps(key))
    with pytest.raises(SettingsError) as refused:
        clients(load_settings())
    assert str(refused.value) == NO_PROJECT
    production_env.setenv("GOOGLE_CLOUD_PROJECT", "demo-named")
    assert clients(load_settings())[0].project == "demo-named"


def test_the_libraries_read_the_google_variables_as_the_settings_do(production_env, tmp_path):
    """A review: Google's libraries read GOOGLE_CLOUD_PROJECT and GOOGLE_APPLICATION_CREDENTIALS themselves: a blank
    project (unset to the settings) was the Firestore client's project of spaces, and a key file's path with a
    newline after it (pasted) was no readable file to the library."""
    path = tmp_path / "key.json"
    path.write_text(service_account_key("demo-keyed")[0])
    production_env.setenv("GOOGLE_APPLICATION_CREDENTIALS", f"{path}\n")
    production_env.setenv("GOOGLE_CLOUD_PROJECT", "  ")
    db, _ = clients(load_settings())
    assert db.project == "demo-keyed" and db._credentials.service_account_email.startswith("firegen-worker@")


@pytest.mark.parametrize(
    "variable,value,line",
    [
        (
            "FIREBASE_SERVICE_ACCOUNT_JSON",
            f'{{"private_key": "{SECRET_MARK}", ',
            "FIREBASE_SERVICE_ACCOUNT_JSON is not valid JSON (expected a service account key's JSON text)",
        ),
        (
            "GOOGLE_APPLICATION_CREDENTIALS",
            json.dumps({"private_key": SECRET_MARK}),
            "GOOGLE_APPLICATION_CREDENTIALS is not a service account key (JSON with client_email and private_key)",
        ),
        (
            "FIREBASE_SERVICE_ACCOUNT_JSON",
            json.dumps({"client_email": "a@b.c", "private_key": f"-----BEGIN PRIVATE KEY-----\n{SECRET_MARK}\n"}),
            "FIREBASE_SERVICE_ACCOUNT_JSON holds a service account key that cannot be loaded",
        ),
        (
            "FIREBASE_SERVICE_ACCOUNT_JSON",
            SECRET_MARK,
            "FIREBASE_SERVICE_ACCOUNT_JSON is neither a service account key's JSON text, its base64, nor a key "
            "file's path",
        ),
        (
            "FIREBASE_SERVICE_ACCOUNT_JSON",
            base64.b64encode(json.dumps({"private_key": SECRET_MARK}).encode()).decode(),
            "FIREBASE_SERVICE_ACCOUNT_JSON is not a service account key (JSON with client_email and private_key)",
        ),
    ],
)
def test_a_malformed_key_stops_start_up_naming_the_variable_never_its_value(variable, value, line):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FIREBASE_SERVICE_ACCOUNT_JSON", "GOOGLE_APPLICATION_CREDENTIALS")
    }
    env.update({"STORAGE_BUCKET": "bkt", "GOOGLE_CLOUD_PROJECT": "demo-x", variable: value})
    result = subprocess.run(
        [sys.executable, "-m", "listener"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr == f"listener: configuration error: {line}\n"
    assert SECRET_MARK not in result.stderr + result.stdout


@pytest.fixture
def configured_logging_undone(monkeypatch):
    """All that `listener.logs.configure` sets in this process, put back after the test (the test review: the root
    logger left at WARNING, the worker's excepthooks and structlog's configuration leaked into the tests that came
    after it in the same process, whose log captures then missed records)."""
    import sys
    import warnings

    import structlog

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", root.handlers[:])
    loggers = [root, *(logging.getLogger(name) for name in ("generation", "listener", "firegen_core", "google"))]
    kept = [(logger, logger.level, logger.propagate) for logger in loggers]
    for module, name in ((threading, "excepthook"), (sys, "excepthook"), (warnings, "showwarning")):
        monkeypatch.setattr(module, name, getattr(module, name))
    was_configured, config = structlog.is_configured(), structlog.get_config()
    yield
    if was_configured:
        structlog.configure(**config)
    else:
        structlog.reset_defaults()
    for logger, level, propagate in kept:
        logger.setLevel(level)  # which also empties the loggers' cached answers
        logger.propagate = propagate


def test_settings_errors_never_echo_a_secret(production_env):
    production_env.setenv("FIREBASE_SERVICE_ACCOUNT_JSON", SECRET_MARK)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert SECRET_MARK not in str(caught.value) and "FIREBASE_SERVICE_ACCOUNT_JSON" in str(caught.value)


def test_no_log_line_carries_a_signed_url_a_token_or_a_key(
    firestore_client, storage_client, bucket, monkeypatch, configured_logging_undone
):
    """A job run with signed URLs (uploaded to the emulator, signed with the generated key), its log captured."""
    from google.oauth2 import service_account

    from bench.noop import NoopGenerator
    from firegen_core.claims import WorkerJobs
    from firegen_core.contract import parse_runsync_input
    from firegen_core.jobs import JobKey
    from listener import logs
    from listener.runner import JobRunner

    key_json, _ = service_account_key("demo-keyed")
    signer = service_account.Credentials.from_service_account_info(json.loads(key_json))
    results = ResultStore(storage_client, bucket.name, url_style="signed", signing_credentials=signer)
    store = WorkerJobs(firestore_client, worker_id="log-test", lease_seconds=30)
    request = parse_runsync_input(
        {"prompt": "p", "user_id": "u", "file_uid": "signed-1", "use_cloud_storage": True, "num_images_per_prompt": 2}
    )
    captured = io.StringIO()
    # The worker's own RunPod key (RunPod sets it), of no shape the guard's patterns know.
    monkeypatch.setenv("RUNPOD_AI_API_KEY", "OLDSTYLE0RUNPOD0KEY0123")
    with redirect_stdout(captured):
        logs.configure("log-test")
        store.ensure_queued(request)
        job = store.claim(JobKey.of(request))
        assert JobRunner(store, NoopGenerator(), results).run(job) == "completed"
        # Were a URL or a key ever passed to a log call, the last guard takes the secret parts out.
        import structlog

        structlog.get_logger("test").warning(
            "leak_attempt",
            url="https://x/o?X-Goog-Signature=abc123&token=t0k3n",
            key=json.loads(key_json)["private_key"],
            # Within a list or a dict too (the logs audit: only top-level strings were looked at).
            urls=["https://x/o?alt=media&token=l1stt0k3n"],
            nested={"answer": '{"access_token": "ya29.n3st3d", "expires_in": 3599}'},
            sdk="job fetch refused for OLDSTYLE0RUNPOD0KEY0123",
        )
    doc = firestore_client.document(JobKey.of(request).path).get().to_dict()
    signatures = [dict(parse_qsl(urlsplit(url).query))["X-Goog-Signature"] for url in doc["images"]]
    text = captured.getvalue()
    assert '"job_completed"' in text and '"leak_attempt"' in text
    assert "job fetch refused for <redacted>" in text
    for secret in (
        *signatures,
        "abc123",
        "t0k3n",
        "l1stt0k3n",
        "ya29.n3st3d",
        "OLDSTYLE0RUNPOD0KEY",
        pem_body(key_json),
    ):
        assert secret not in text
    assert all(json.loads(line)["severity"] for line in text.splitlines())


def test_no_credentials_at_all_stop_start_up_with_one_line(tmp_path):
    """A RunPod worker deployed without its key has no Application Default Credentials either: one line, exit 2
    (before, a DefaultCredentialsError traceback, and RunPod restarting the worker for ever)."""
    from listener.credentials import NO_CREDENTIALS

    drop = ("FIREBASE_SERVICE_ACCOUNT_JSON", "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG", "HOME")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.endswith("_EMULATOR_HOST")}
    # No gcloud login to find (an empty home and SDK config) and no metadata server to ask (not on Google Cloud).
    env.update(
        STORAGE_BUCKET="bkt",
        GOOGLE_CLOUD_PROJECT="demo-x",
        HOME=str(tmp_path),
        CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
        NO_GCE_CHECK="True",
    )
    result = subprocess.run(
        [sys.executable, "-m", "listener"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert (result.returncode, result.stderr) == (2, f"listener: configuration error: {NO_CREDENTIALS}\n")


def test_a_key_path_that_names_no_file_stops_start_up_without_quoting_it(tmp_path):
    """A key pasted into GOOGLE_APPLICATION_CREDENTIALS in a form the worker cannot read is taken for a path by
    Google's lookup, whose error quotes it ("File ... was not found"): one line naming the variable instead."""
    from listener.credentials import BAD_KEY_PATH

    env = {k: v for k, v in os.environ.items() if k != "FIREBASE_SERVICE_ACCOUNT_JSON"}
    env = {k: v for k, v in env.items() if not k.endswith("_EMULATOR_HOST")}
    env.update(STORAGE_BUCKET="bkt", GOOGLE_CLOUD_PROJECT="demo-x", GOOGLE_APPLICATION_CREDENTIALS=SECRET_MARK)
    result = subprocess.run(
        [sys.executable, "-m", "listener"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert (result.returncode, result.stderr) == (2, f"listener: configuration error: {BAD_KEY_PATH}\n")
    assert SECRET_MARK not in result.stdout


@pytest.mark.parametrize("what", ["a file with no key", "a folder", "a file of JSON null"])
def test_a_key_file_that_holds_no_key_says_so(tmp_path, what):
    """A readable file with no key in it (a key cut short, a file of another kind; JSON that is no object, which
    google-auth reads with `.get`: a review saw a traceback, exit 1): not "no readable key file"; a path Google's
    lookup cannot open (a folder; as root no file is unreadable): one line, not a traceback."""
    from listener.credentials import BAD_KEY_FILE, UNREADABLE_KEY_FILE

    key_file = tmp_path / "key.json"
    if what == "a folder":
        key_file.mkdir()
    elif what == "a file of JSON null":
        key_file.write_text("null")
    else:
        key_file.write_text('{"type": "service_account", "private_key": "' + SECRET_MARK + '"')  # cut short
    env = {k: v for k, v in os.environ.items() if k != "FIREBASE_SERVICE_ACCOUNT_JSON"}
    env = {k: v for k, v in env.items() if not k.endswith("_EMULATOR_HOST")}
    env.update(STORAGE_BUCKET="bkt", GOOGLE_CLOUD_PROJECT="demo-x", GOOGLE_APPLICATION_CREDENTIALS=str(key_file))
    result = subprocess.run(
        [sys.executable, "-m", "listener"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    said = UNREADABLE_KEY_FILE if what == "a folder" else BAD_KEY_FILE
    assert (result.returncode, result.stderr) == (2, f"listener: configuration error: {said}\n")
    assert SECRET_MARK not in result.stdout


def test_an_application_default_credentials_file_that_cannot_be_read_says_so():
    """No key given, and gcloud's Application Default Credentials file is there but may not be read (a volume
    mounted with the wrong owner): one line that says what to set instead, not GOOGLE_APPLICATION_CREDENTIALS,
    which is unset. Root reads every file: there, the worker runs as `nobody` (setpriv)."""
    from listener.credentials import UNREADABLE_ADC

    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: no file is unreadable")
        prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
        probe = subprocess.run([*prefix, sys.executable, "-c", "import listener.credentials"], cwd=REPO, check=False)
        if probe.returncode:
            pytest.skip("`nobody` cannot run the worker from this checkout (a folder above it is root's alone)")
    home = Path(tempfile.mkdtemp(prefix="firegen-adc-"))  # pytest's own folders are root's alone
    try:
        adc = home / ".config" / "gcloud" / "application_default_credentials.json"
        adc.parent.mkdir(parents=True)
        adc.write_text(service_account_key("demo-x")[0])
        adc.chmod(0)
        for folder in (adc.parent, adc.parent.parent, home):
            folder.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k not in ("FIREBASE_SERVICE_ACCOUNT_JSON", "CLOUDSDK_CONFIG")}
        env = {k: v for k, v in env.items() if not k.endswith("_EMULATOR_HOST")}
        env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
        env.update(STORAGE_BUCKET="bkt", GOOGLE_CLOUD_PROJECT="demo-x", HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
        result = subprocess.run(
            [*prefix, sys.executable, "-m", "listener"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        shutil.rmtree(home)
    assert (result.returncode, result.stderr) == (
        2,
        f"listener: configuration error: {UNREADABLE_ADC} (PermissionError)\n",
    ), result.stdout[-2000:]


def test_the_last_guard_takes_out_credentials_in_a_field_of_any_value():
    """A review: a field whose value was neither text nor a list or dict (an exception passed as `error=exc`,
    bytes) went past the guard, and the JSON renderer wrote its repr after it, unredacted. Now its text, redacted;
    numbers, booleans and None stay as they are."""
    from datetime import UTC, datetime

    from firegen_core.redaction import redacted

    error = ConnectionError("Authorization: Bearer ya29.a0AfH6SMBsecret and https://s/o?X-Goog-Signature=abc123")
    fields = {"error": error, "at": datetime(2026, 12, 6, tzinfo=UTC), "n": 3, "ok": True, "none": None, "x": 1.5}
    assert redacted(fields) == {
        "error": "Authorization: Bearer <redacted> and https://s/o?X-Goog-Signature=<redacted>",
        "at": "2026-12-06 00:00:00+00:00",
        "n": 3,
        "ok": True,
        "none": None,
        "x": 1.5,
    }


@pytest.mark.parametrize(
    "text,shown",
    [
        ("https://x/o?alt=media&token=abc-123", "https://x/o?alt=media&token=<redacted>"),
        (
            "next=https%3A%2F%2Fx%2Fo%3Falt%3Dmedia%26token%3Dabc",
            "next=https%3A%2F%2Fx%2Fo%3Falt%3Dmedia%26token%3D<redacted>",
        ),
        (
            '{"access_token": "ya29.abc", "token_type": "Bearer"}',
            '{"access_token": "<redacted>", "token_type": "Bearer"}',
        ),
        ("Authorization: Bearer eyJhbGciOi.x.y", "Authorization: Bearer <redacted>"),
        ('{\\"access_token\\": \\"ya29.abc\\"}', '{\\"access_token\\": \\"<redacted>\\"}'),
        ("grant=x&refresh_token=1//0abc&client_id=9", "grant=x&refresh_token=<redacted>&client_id=9"),
        ("u=%3Fa%3D1%26token%3Dabc%26foo%3Dbar", "u=%3Fa%3D1%26token%3D<redacted>%26foo%3Dbar"),  # the rest kept
        # Bare ones (a review): an ID or App Check token, an access token, a RunPod key, an api_key parameter.
        ("token eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2ln-_x rejected", "token <redacted> rejected"),
        ("credentials ya29.a0AfB_byC-1.x expired", "credentials <redacted> expired"),
        ("RUNPOD_API_KEY=rpa_ABCDEFGHIJ0123456789xyz set", "RUNPOD_API_KEY=<redacted> set"),
        ("401 for hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567: gated", "401 for <redacted>: gated"),  # a Hugging Face token
        ("hf_hub_download of a shelf_of_books", "hf_hub_download of a shelf_of_books"),
        ("GET /v1/x?api_key=abc123&n=1", "GET /v1/x?api_key=<redacted>&n=1"),
        # Nothing else: words that only look like it are left as they are (a prompt may reach a library's line).
        ("the tokenizer's token count: 77", "the tokenizer's token count: 77"),
        ("a flag bearer  riding, a standard-bearer\nwalks", "a flag bearer  riding, a standard-bearer\nwalks"),
        ('{"token_count": 77}', '{"token_count": 77}'),
        ("eyJust a word. eyJump. rpa_short ya29 laps", "eyJust a word. eyJump. rpa_short ya29 laps"),
        ("Eyjafjallajokull.eyjolfur.x", "Eyjafjallajokull.eyjolfur.x"),  # not a JWT: those start with eyJ
        ("?monkey=1&hotkey=3", "?monkey=1&hotkey=3"),  # a key parameter is key, api_key or another's *_key
        ("?private_key=a&x-api-key=b&n=1", "?private_key=<redacted>&x-api-key=<redacted>&n=1"),
    ],
)
def test_the_last_guard_of_the_logs_takes_out_what_looks_like_a_credential(text, shown):
    from firegen_core.redaction import redact, redacted

    assert redact(text) == shown
    assert redacted({"a": [text, (text, 1)], "b": None}) == {"a": [shown, [shown, 1]], "b": None}
    itself: list = ["https://x/o?token=s3cr3t"]
    itself.append(itself)  # a value that holds itself is written as its text, not recursed into for ever
    assert "s3cr3t" not in str(redacted(itself)) and "token=<redacted>" in str(redacted(itself))


@pytest.mark.parametrize(
    "url,shown",
    [
        ("https://hooks.slack.com/services/T000/B000/XXSECRET", "https://hooks.slack.com/<redacted>"),
        ("https://user:SECRET@app.example:8443/hook?sig=SECRET&n=1", "https://app.example:8443/<redacted>"),
        ("http://[::1]:9/h/SECRET", "http://[::1]:9/<redacted>"),
    ],
)
def test_a_webhook_that_could_not_be_sent_is_logged_with_its_scheme_and_host_alone(url, shown):
    """The docs review: a secret may sit anywhere in a webhook's URL (a path, `?sig=`, `user:pass@`), which the last
    guard's patterns do not know; the SDK's line quotes it twice, the error its path alone too."""
    from listener.logs import webhook_said

    path = url.split("/", 3)[3]
    said = webhook_said(f"WEBHOOK | Request to {url} failed: 404 Not Found for url: {url} (with url: /{path})")
    assert said == f"WEBHOOK | Request to {shown} failed: 404 Not Found for url: {shown} (with url: /<redacted>)"
    assert webhook_said("WEBHOOK | sent") == "WEBHOOK | sent"


# ---------------------------------------------------------------------------------------------- mutation audit
@pytest.mark.parametrize(
    "text,shown",
    [
        # A V4 signed URL's credential (the signer's account and scope) as well as its signature.
        (
            "https://s/o?X-Goog-Credential=sa%40p.iam%2F20240101&X-Goog-Date=1",
            "https://s/o?X-Goog-Credential=<redacted>&X-Goog-Date=1",
        ),
        ("GET https://x/v1/a:lookup?key=AIzaSyFAKEFAKE", "GET https://x/v1/a:lookup?key=<redacted>"),  # an API key
        (
            '{"client_secret": "GOCSPX-abc", "type": "authorized_user"}',
            '{"client_secret": "<redacted>", "type": "authorized_user"}',
        ),
        ("grant=x&client_secret=GOCSPX-abc&a=1", "grant=x&client_secret=<redacted>&a=1"),
        # Any case: lower-case percent-encoding, a parameter's name in capitals.
        ("u=%3fa%3d1%26token%3dabc%26foo%3dbar", "u=%3fa%3d1%26token%3d<redacted>%26foo%3dbar"),
        ("https://x/o?alt=media&Token=abc", "https://x/o?alt=media&Token=<redacted>"),
        # A key cut short (a message clipped at 300 characters) has no END line: the rest is taken out all the same.
        ("key: -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0B", "key: <redacted>"),
        # Two keys: each is taken out, what lies between them is kept.
        (
            "-----BEGIN PRIVATE KEY-----\nA\n-----END PRIVATE KEY----- kept -----BEGIN RSA PRIVATE KEY-----\nB\n"
            "-----END RSA PRIVATE KEY-----",
            "<redacted> kept <redacted>",
        ),
    ],
)
def test_the_last_guard_also_takes_out_credentials_api_keys_client_secrets_any_case_and_cut_keys(text, shown):
    from firegen_core.redaction import redact

    assert redact(text) == shown


@pytest.mark.parametrize(
    "variable",
    ["RUNPOD_API_KEY", "RUNPOD_AI_API_KEY", "FIREBASE_SERVICE_ACCOUNT_JSON", "GOOGLE_APPLICATION_CREDENTIALS"],
)
def test_the_last_guard_takes_out_the_processs_own_secrets_whatever_their_shape(monkeypatch, variable):
    """A key made before RunPod's `rpa_` prefix matches no pattern: the value the process holds is taken out as it
    is (the review: only messages the functions' RunPod client built were scrubbed of it); a placeholder too short
    to be a key (make dev's are longer) is left, lest every line holding its letters be garbled."""
    from firegen_core.redaction import SECRET_VARIABLES, redact

    assert variable in SECRET_VARIABLES
    for name in SECRET_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    line = "runsync refused: 401 for key 0A1B2C3D4E5F6G7H8I9J (twice: 0A1B2C3D4E5F6G7H8I9J)"
    assert redact(line) == line  # no pattern knows it
    monkeypatch.setenv(variable, " 0A1B2C3D4E5F6G7H8I9J\n")  # a secret pasted with its newline
    assert redact(line) == "runsync refused: 401 for key <redacted> (twice: <redacted>)"
    monkeypatch.setenv(variable, "key")
    assert redact(line) == line
