"""README claims that had no test: the worker's settings (defaults, bounds, one-line start-up errors and exit
code), LOG_LEVEL, the inline 20 MB refusal, and the runsync answer when Firestore cannot record the job."""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
from fixtures_keys import pem_body, service_account_key

from firegen_core.claims import WorkerJobs
from firegen_core.jobs import ANSWER_TIMEOUT, CALL_TIMEOUT
from generation.video_speed import DEFAULT_CACHE_THRESHOLD
from listener.handler import INLINE_LIMIT_BYTES, RunsyncHandler
from listener.reconciler import Reconciler
from listener.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent
WORKER_VARS = [
    alias
    for info in Settings.model_fields.values()
    for alias in getattr(info.validation_alias, "choices", [info.validation_alias])
]


@pytest.fixture
def clean_env(monkeypatch):
    for name in WORKER_VARS:
        monkeypatch.setenv(str(name), "")  # recorded: whatever the test or its code sets, undone after it
        monkeypatch.delenv(str(name))
    monkeypatch.setenv("STORAGE_BUCKET", "bkt")
    return monkeypatch


# ---------------------------------------------------------------------------------------------- settings
def test_documented_defaults(clean_env):
    s = load_settings()
    assert (s.signed_url_expiry_seconds, s.upload_retry_attempts, s.upload_retry_max_seconds) == (604800, 12, 60)
    assert s.log_level == "INFO"


def test_runpod_log_level_takes_the_sdks_words_and_log_levels_warning(clean_env):
    """The RunPod SDK checks RUNPOD_LOG_LEVEL when it is imported: a word it does not know crashed the worker at
    every start with a traceback (an audit: LOG_LEVEL's `WARNING`). The settings take the SDK's own words, and
    WARNING as its WARN."""
    from runpod.serverless.modules.rp_logger import LOG_LEVELS

    annotation = Settings.model_fields["runpod_log_level"].annotation
    assert list(typing.get_args(annotation)) == LOG_LEVELS
    clean_env.setenv("STORAGE_BUCKET", "bkt")
    assert load_settings().runpod_log_level == "INFO"
    for said, level in (("warning", "WARN"), (" Error ", "ERROR"), ("trace", "TRACE")):
        clean_env.setenv("RUNPOD_LOG_LEVEL", said)
        assert load_settings().runpod_log_level == level


def test_the_sdks_level_and_grpcs_verbosity_default_as_documented(clean_env, capsys):
    """README: RUNPOD_LOG_LEVEL is INFO unless set (the SDK's DEBUG logs every output, inline media included),
    GRPC_VERBOSITY ERROR unless set; set ones are kept. Set before the settings are read: a worker that stops
    at a configuration error has them too."""
    from listener.__main__ import main

    clean_env.delenv("STORAGE_BUCKET")  # main() stops at once, at the settings
    for name in ("RUNPOD_LOG_LEVEL", "GRPC_VERBOSITY"):  # unset, as recorded: what main() sets is undone after
        clean_env.setenv(name, "")
        clean_env.delenv(name)
    assert main([]) == 2
    assert (os.environ["RUNPOD_LOG_LEVEL"], os.environ["GRPC_VERBOSITY"]) == ("INFO", "ERROR")
    clean_env.setenv("RUNPOD_LOG_LEVEL", "WARN")
    clean_env.setenv("GRPC_VERBOSITY", "DEBUG")
    assert main([]) == 2
    assert (os.environ["RUNPOD_LOG_LEVEL"], os.environ["GRPC_VERBOSITY"]) == ("WARN", "DEBUG")
    assert "STORAGE_BUCKET is required" in capsys.readouterr().err


def configuration_table() -> dict[str, str]:
    """The README's worker settings table as variable → default as written: a row's names and its defaults pair
    up in order where it names as many of each (`| `A`, `B` | 120, 5 |`), else each name takes the whole cell."""
    text = (ROOT / "README.md").read_text().split("## Configuration (the worker", 1)[1].split("\n### ", 1)[0]
    table = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([A-Z0-9_]+)`", cells[0].split("(")[0])
        defaults = [re.sub(r"\s*\(.*\)$", "", d).strip("` ") for d in cells[1].split(", ")]
        for name, default in zip(names, defaults if len(defaults) == len(names) else [cells[1]] * len(names)):
            table[name] = default
    return table


def test_the_readmes_configuration_table_gives_each_numeric_and_word_default_as_the_code_has_it(clean_env):
    """Each worker setting the table gives a number, a word or a model id as its default (a review found several rows
    no test held: PLACEHOLDER_GRACE_SECONDS, RUNSYNC_CONCURRENCY, MAX_RELEASES, JOB_TIMEOUT_*)."""
    table = configuration_table()
    fields = {str(info.validation_alias): name for name, info in Settings.model_fields.items()}
    checked = []
    for variable, written in table.items():
        if variable not in fields or not re.fullmatch(r"[\w./-]+", written):
            continue  # a path, a default said in words
        info = Settings.model_fields[fields[variable]]
        # The threshold is read as text and parsed with the cache mode (generation.video_speed).
        default = DEFAULT_CACHE_THRESHOLD if variable == "FIREGEN_VIDEO_CACHE_THRESHOLD" else info.default
        if written in ("required", "unset"):
            assert info.is_required() if written == "required" else default is None, variable
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            assert float(written) == default, variable
        else:
            assert str(default).lower() == written.lower(), variable
        checked.append(variable)
    must = {"LEASE_SECONDS", "MAX_ATTEMPTS", "SWEEP_INTERVAL_SECONDS", "PLACEHOLDER_GRACE_SECONDS", "CONCURRENCY"}
    must |= {"BATCH_MAX", "SHUTDOWN_GRACE_SECONDS", "RUNSYNC_CONCURRENCY", "USER_MAX_RUNNING", "USER_MAX_PENDING"}
    must |= {"USER_DAILY_BUDGET", "MAX_RELEASES", "JOB_TIMEOUT_FLOOR_SECONDS", "JOB_TIMEOUT_MULTIPLE", "URL_STYLE"}
    must |= {"RETENTION_DAYS", "LOG_LEVEL", "FIREGEN_COMPILE", "FIREGEN_FP8", "FIREGEN_VIDEO_CACHE_THRESHOLD"}
    must |= {"STORAGE_BUCKET", "FIREBASE_SERVICE_ACCOUNT_JSON", "IMAGE_MODEL", "VIDEO_MODEL"}
    assert must <= set(checked), must - set(checked)


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("SIGNED_URL_EXPIRY_SECONDS", "604801", "SIGNED_URL_EXPIRY_SECONDS must be less than or equal to 604800"),
        ("SIGNED_URL_EXPIRY_SECONDS", "0", "SIGNED_URL_EXPIRY_SECONDS must be greater than or equal to 1"),
        ("UPLOAD_RETRY_ATTEMPTS", "0", "UPLOAD_RETRY_ATTEMPTS must be greater than or equal to 1"),
        ("UPLOAD_RETRY_MAX_SECONDS", "0", "UPLOAD_RETRY_MAX_SECONDS must be greater than 0"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR"),
        # Times past what a date or a wait holds (a clock audit: each started, then broke every job).
        ("LEASE_SECONDS", "999999999999", "LEASE_SECONDS must be less than or equal to 86400"),
        ("SWEEP_INTERVAL_SECONDS", "999999999999", "SWEEP_INTERVAL_SECONDS must be less than or equal to 3600"),
        ("SHUTDOWN_GRACE_SECONDS", "inf", "SHUTDOWN_GRACE_SECONDS must be a finite number"),
        ("JOB_TIMEOUT_FLOOR_SECONDS", "1e400", "JOB_TIMEOUT_FLOOR_SECONDS must be a finite number"),
        ("JOB_TIMEOUT_MULTIPLE", "1001", "JOB_TIMEOUT_MULTIPLE must be less than or equal to 1000"),
        ("UPLOAD_RETRY_MAX_SECONDS", "3601", "UPLOAD_RETRY_MAX_SECONDS must be less than or equal to 3600"),
        ("RETENTION_DAYS", "1e300", "RETENTION_DAYS must be less than or equal to 36500"),
        ("PLACEHOLDER_GRACE_SECONDS", "61", "PLACEHOLDER_GRACE_SECONDS must be less than or equal to 60"),
        (
            "STORAGE_BUCKET",
            "gs://my-app.firebasestorage.app",
            "STORAGE_BUCKET must be a bucket's name alone, without gs:// or a path (e.g. my-app.firebasestorage.app) "
            "(got 'gs://my-app.firebasestorage.app')",
        ),
        ("STORAGE_BUCKET", "My-App", "STORAGE_BUCKET must be a bucket's name: lowercase letters, digits, - _ and ."),
        ("STORAGE_BUCKET", "my-app-", "STORAGE_BUCKET must be a bucket's name: lowercase letters, digits, - _ and ."),
        ("STORAGE_BUCKET", "ab", "STORAGE_BUCKET must be a bucket's name: 3 to 63 characters, or up to 222 with dots"),
        ("STORAGE_BUCKET", "a" * 64, "STORAGE_BUCKET must be a bucket's name: 3 to 63 characters, or up to 222 with"),
        ("STORAGE_BUCKET", "a" * 64 + ".app", "STORAGE_BUCKET must be a bucket's name: 3 to 63 characters, or up"),
    ],
)
def test_documented_bounds(clean_env, name, value, message):
    clean_env.setenv(name, value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert str(raised.value).startswith(message)


def test_the_documented_bounds_are_accepted(clean_env):
    clean_env.setenv("STORAGE_BUCKET", " my_app.firebasestorage.app\n")  # pasted with its newline
    clean_env.setenv("SIGNED_URL_EXPIRY_SECONDS", "604800")
    clean_env.setenv("UPLOAD_RETRY_ATTEMPTS", "1")
    clean_env.setenv("UPLOAD_RETRY_MAX_SECONDS", "0.5")
    clean_env.setenv("LOG_LEVEL", "debug")
    s = load_settings()
    assert (s.signed_url_expiry_seconds, s.upload_retry_attempts, s.upload_retry_max_seconds) == (604800, 1, 0.5)
    assert s.log_level == "DEBUG"
    assert s.storage_bucket == "my_app.firebasestorage.app"


def test_a_setting_of_spaces_alone_is_unset_as_an_empty_one_is(clean_env):
    """README: empty values count as unset. So do spaces alone (a value cleared to " " in an editor, or pasted with
    its newline): " " was refused "must be a valid integer" where "" took the default."""
    clean_env.setenv("STORAGE_BUCKET", "bkt")
    for name in ("USER_MAX_RUNNING", "LEASE_SECONDS", "URL_STYLE", "FIREGEN_COMPILE", "RETENTION_DAYS"):
        clean_env.setenv(name, " \n")
    s = load_settings()
    assert (s.user_max_running, s.lease_seconds, s.url_style, s.compile, s.retention_days) == (
        2,
        120,
        "token",
        "auto",
        30,
    )
    clean_env.setenv("STORAGE_BUCKET", "  ")
    with pytest.raises(SettingsError, match="^STORAGE_BUCKET is required$"):
        load_settings()


def run_worker(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in {str(n) for n in WORKER_VARS}}
    return subprocess.run(
        [sys.executable, "-m", "listener"],
        env={**base, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "env,line",
    [
        ({}, "listener: configuration error: STORAGE_BUCKET is required"),
        (
            {"STORAGE_BUCKET": "bkt", "SIGNED_URL_EXPIRY_SECONDS": "999999"},
            "listener: configuration error: SIGNED_URL_EXPIRY_SECONDS must be less than or equal to 604800 (got '999999')",
        ),
        (
            {"STORAGE_BUCKET": "bkt", "LOG_LEVEL": "LOUD"},
            "listener: configuration error: LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR",
        ),
        (
            {"STORAGE_BUCKET": "bkt", "RUNPOD_LOG_LEVEL": "LOUD"},
            "listener: configuration error: RUNPOD_LOG_LEVEL must be one of NOTSET, TRACE, DEBUG, INFO, WARN, ERROR",
        ),
    ],
)
def test_a_bad_setting_stops_the_worker_with_one_line_and_exit_code_2(env, line):
    result = run_worker(env)
    assert (result.returncode, result.stderr) == (2, line + "\n")
    assert_configuration_event(result.stdout, line)


def test_a_secret_in_the_wrong_variable_is_never_echoed():
    """A service account's key pasted into STORAGE_BUCKET (the row above in RunPod's editor), as its JSON text or
    its base64: the line names the variable, not the value (an audit: the whole key, private key and all, was
    printed into the platform's logs); a RunPod key there is taken out by the last guard."""
    key_json, _ = service_account_key("p")
    pem = pem_body(key_json)
    for value in (key_json, base64.b64encode(key_json.encode()).decode()):
        result = run_worker({"STORAGE_BUCKET": value})
        line = "listener: configuration error: STORAGE_BUCKET must be a bucket's name"
        assert result.returncode == 2 and result.stderr.startswith(line), result.stderr
        assert f"(got {len(value)} characters, not shown)" in result.stderr
        assert pem not in result.stderr + result.stdout and value[20:60] not in result.stderr + result.stdout
        assert_configuration_event(result.stdout, result.stderr.rstrip("\n"))
    result = run_worker({"STORAGE_BUCKET": "bkt", "LEASE_SECONDS": "rpa_0A1B2C3D4E5F6G7H8I9J"})
    line = "listener: configuration error: LEASE_SECONDS must be a valid integer, unable to parse string as an integer"
    assert (result.returncode, result.stderr) == (2, f"{line} (got '<redacted>')\n")


def test_no_setting_echoes_a_long_value(clean_env):
    """Every setting the worker reads, given a service account's key in base64: a refusal names the variable and
    the value's length alone (an audit: FIREGEN_VIDEO_CACHE_THRESHOLD and FIREGEN_ATTENTION_BACKEND printed the
    whole key, to stderr and the JSON event)."""
    from generation.engine import EngineConfig

    key_json, _ = service_account_key("p")
    value = base64.b64encode(key_json.encode()).decode()
    refused = []
    for name in WORKER_VARS:
        clean_env.setenv(str(name), value)
        try:
            EngineConfig.from_settings(load_settings())
        except (SettingsError, ValueError) as exc:
            refused.append(name)
            assert value[20:60] not in str(exc), (name, str(exc)[:200])
        clean_env.delenv(str(name))
        clean_env.setenv("STORAGE_BUCKET", "bkt")
    assert {"FIREGEN_VIDEO_CACHE_THRESHOLD", "FIREGEN_ATTENTION_BACKEND", "LEASE_SECONDS"} <= set(refused)


def assert_configuration_event(stdout: str, line: str) -> None:
    """The same line as a JSON event on stdout (audit: the one plain-text line of a worker that never starts was
    the one a platform's alert on severity could not see)."""
    (event,) = [json.loads(text) for text in stdout.splitlines()]
    assert (event["event"], event["severity"]) == ("configuration_error", "ERROR")
    assert "listener: configuration error: " + event["error"] == line


# Settings the engine checks once the clients are made (the emulators' clients need no server to be made).
EMULATED = {
    "STORAGE_BUCKET": "bkt",
    "GOOGLE_CLOUD_PROJECT": "demo-settings",
    "FIRESTORE_EMULATOR_HOST": "127.0.0.1:9",
    "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9",
    "IMAGE_MODEL": "none",
    "VIDEO_MODEL": "none",
}


@pytest.mark.parametrize(
    "env,line",
    [
        ({"FIREGEN_DEVICE": "tpu"}, "FIREGEN_DEVICE must be cpu, cuda, cuda:N, mps or xpu (got 'tpu')"),
        # Checked with the cache off too (it was taken as it came once the cache was turned on).
        (
            {"FIREGEN_VIDEO_CACHE_THRESHOLD": "2"},
            "FIREGEN_VIDEO_CACHE_THRESHOLD must be a number greater than 0 and less than 1 (got '2')",
        ),
    ],
)
def test_a_wrong_model_setting_stops_the_worker_with_one_line(env, line):
    result = run_worker({**EMULATED, **env})
    assert (result.returncode, result.stderr) == (2, f"listener: configuration error: {line}\n")
    assert_configuration_event(result.stdout, f"listener: configuration error: {line}")


def test_a_cuda_device_this_machine_lacks_is_one_line_not_a_traceback():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    result = run_worker({**EMULATED, "FIREGEN_DEVICE": "cuda"})
    line = f"listener: configuration error: FIREGEN_DEVICE is cuda but torch {torch.__version__} sees no cuda device"
    assert (result.returncode, result.stderr) == (2, f"{line} on this machine\n")
    assert_configuration_event(result.stdout, f"{line} on this machine")


def test_listener_help():
    result = subprocess.run(
        [sys.executable, "-m", "listener", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("usage: python -m listener") and "STORAGE_BUCKET is required" in result.stdout


def fault_worker(fault: str) -> subprocess.CompletedProcess:
    """`tests.fault_worker` with `fault`, run to its end, no Firebase behind it (EMULATED points at nothing)."""
    return subprocess.run(
        [sys.executable, "-m", "tests.fault_worker"],
        env={**os.environ, **EMULATED, "FAULT": fault},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_failed_fitness_check_off_runpod_says_worker_exit():
    """Off RunPod the worker runs its fitness check itself; its end is logged as any other end."""
    result = fault_worker("fitness")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 1, result.stderr[-2000:]
    assert [e["event"] for e in events if e["event"] in ("fitness_check_failed", "worker_exit")] == [
        "fitness_check_failed",
        "worker_exit",
    ]
    assert events[-1]["code"] == 1 and events[-1]["reason"] == "fitness check failed: RuntimeError"
    assert events[-1]["severity"] == "ERROR"


def test_a_bug_in_the_start_is_said_as_json_then_the_exit_line():
    """The deploy review: an exception the start did not expect (here the engine's wrapping raises a TypeError)
    was a plain traceback on stderr, and no `worker_exit` at all."""
    result = fault_worker("crash")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    crashed, exit_line = [json.loads(line) for line in result.stdout.splitlines()][-2:]
    assert (crashed["event"], crashed["severity"]) == ("worker_crashed", "ERROR")
    assert crashed["exception"].endswith("TypeError: a bug in the worker's start")
    assert (exit_line["event"], exit_line["code"], exit_line["reason"]) == ("worker_exit", 1, "crashed: TypeError")


MAIN_THREAD_SCRIPT = """
from listener.logs import configure
configure("w-1")
raise LookupError("nothing caught it")
"""


def test_an_exception_nothing_caught_in_the_main_thread_is_a_json_event():
    result = subprocess.run(
        [sys.executable, "-c", MAIN_THREAD_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stderr) == (1, "")
    [line] = [json.loads(line) for line in result.stdout.splitlines()]
    assert (line["severity"], line["event"]) == ("ERROR", "uncaught_exception")
    assert line["exception"].endswith("LookupError: nothing caught it")


WARNING_SCRIPT = """
import sys, warnings, structlog
from listener.logs import configure
configure("w-1", sys.argv[1])
structlog.contextvars.bind_contextvars(file_uid="a-job")
warnings.warn("Dynamo detected a call to a `functools.lru_cache`-wrapped function", UserWarning)
"""


@pytest.mark.parametrize("level", ["INFO", "ERROR"])
def test_python_warnings_are_json_lines(level):
    """A library's Python warning (torch's compiler warns at a bf16 UNet's compile) came out in plain text, over
    several lines, on stderr: it is a `python_warning` event, with the job it came from; LOG_LEVEL=ERROR quiets it."""
    result = subprocess.run(
        [sys.executable, "-c", WARNING_SCRIPT, level], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.stderr == ""
    if level == "ERROR":
        assert result.stdout == ""
        return
    line = json.loads(result.stdout)
    assert (line["severity"], line["event"], line["category"], line["file_uid"]) == (
        "WARNING",
        "python_warning",
        "UserWarning",
        "a-job",
    )
    assert line["said"].startswith("Dynamo detected") and line["where"] == "<string>:6"


TRUNCATION_SCRIPT = """
import sys
import torch
from listener.logs import configure
configure("w-1", sys.argv[1])
torch.set_num_threads(1)
from firegen_core.contract import GenerationRequest
from generation.engine import Engine, EngineConfig, quiet_loading
quiet_loading()  # as the worker does: the libraries' records to the root logger
engine = Engine(EngineConfig(image_model="tiny", video_model="tiny", device="cpu"))
prompt = "a red car " + " ".join(f"private-{i}" for i in range(60))  # CLIP keeps 77 tokens: bytes, here
engine.generate(GenerationRequest(prompt=prompt, seed=1, width=64, height=64, num_inference_steps=1))
"""


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
def test_a_prompt_clip_cuts_is_an_info_event_that_does_not_quote_it(level, tiny_cache):
    """The real SDXL pipeline (tiny, random weights) with a prompt past CLIP's 77 tokens: diffusers' note quoted
    the cut text of the user's prompt at WARNING, twice an image (fuzz audit: 52 such lines of a prompt each)."""
    env = {**os.environ, "FIREGEN_CACHE": str(tiny_cache)}  # built once: not a tiny SDXL each run
    result = subprocess.run(
        [sys.executable, "-c", TRUNCATION_SCRIPT, level], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "private" not in result.stdout + result.stderr  # its decoded tokens: "private - 59"
    # transformers' "(597 > 77) ... will result in indexing errors" at WARNING, once per tokenizer: it never does.
    assert "Token indices" not in result.stdout + result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    cut = [e for e in events if e["event"] == "prompt_truncated"]
    if level == "WARNING":
        assert cut == []
        return
    assert len(cut) == 2 and all(  # SDXL's two text encoders
        (e["severity"], e["encoder"], e["max_tokens"], e["message"]) == ("INFO", "CLIP", 77, "prompt_truncated")
        for e in cut
    ), cut


TRUNCATION_WORDINGS = """
import logging
from listener.logs import configure
configure("w-1")
log = logging.getLogger("diffusers.pipelines.some_pipeline")
log.warning("The following part of your input was truncated because CLIP can only handle sequences up to %d tokens: %s",
            77, ["secret words"])
log.warning("The following part of your input was truncated because `max_sequence_length` is set to  512 tokens: %s",
            ["secret words"])
"""


def test_a_truncation_note_in_arguments_or_in_diffusers_other_wording_quotes_no_prompt_either():
    """A review: the note was matched before its arguments were put in, and diffusers' other pipelines word it
    after `max_sequence_length`."""
    result = subprocess.run(
        [sys.executable, "-c", TRUNCATION_WORDINGS], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "secret" not in result.stdout + result.stderr, result.stdout + result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["event"], e["severity"], e["encoder"], e["max_tokens"]) for e in events] == [
        ("prompt_truncated", "INFO", "CLIP", 77),
        ("prompt_truncated", "INFO", "text encoder", 512),
    ]


THREAD_SCRIPT = """
import sys, threading
from listener.logs import configure
configure("w-1")
def crash():
    raise ValueError("a bug in a thread")
def leave():
    sys.exit(0)
for target in (crash, leave):
    thread = threading.Thread(target=target, name=target.__name__)
    thread.start()
    thread.join()
"""


def test_an_exception_no_thread_caught_is_a_json_event():
    """The logs audit: Python printed an uncaught exception of a thread as a plain traceback on stderr."""
    result = subprocess.run([sys.executable, "-c", THREAD_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stderr == ""
    [line] = [json.loads(line) for line in result.stdout.splitlines()]  # a thread's sys.exit() says nothing
    assert (line["severity"], line["event"], line["thread"]) == ("ERROR", "thread_crashed", "crash")
    assert line["exception"].endswith("ValueError: a bug in a thread")


GOOGLE_LOG_SCRIPT = """
import logging, sys
from google.api_core import client_logging
from listener.logs import configure
if sys.argv[1] == "client-first":
    client_logging.initialize_logging()  # what the first Google client runs
configure("w-1")
client_logging.initialize_logging()
logging.getLogger("google.api_core.bidi").warning("Background thread did not exit.")
"""


@pytest.mark.parametrize("order", ["client-first", "logs-first"])
def test_google_clients_records_are_json_lines(order):
    """google-api-core turns the `google` logger's propagation off: its records (a Firestore listener's close that
    timed out, at a worker's exit) came out in plain text on stderr, from Python's last resort."""
    result = subprocess.run(
        [sys.executable, "-c", GOOGLE_LOG_SCRIPT, order], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.stderr == ""
    line = json.loads(result.stdout)
    assert (line["severity"], line["logger"], line["message"]) == (
        "WARNING",
        "google.api_core.bidi",
        "Background thread did not exit.",
    )


LOG_SCRIPT = """
import logging, sys, structlog
from listener.logs import configure, route_runpod_sdk
configure("w-1", sys.argv[1])
route_runpod_sdk()
log = structlog.get_logger("listener.test")
log.debug("a_debug"); log.info("an_info"); log.warning("a_warning"); log.error("an_error")
logging.getLogger("transformers").setLevel(logging.WARNING)  # as transformers sets its own (re-check)
logging.getLogger("transformers.tokenization").warning("a_library_warning")
logging.getLogger("uvicorn.error").info("a_server_info")  # as uvicorn.run() configures it, from LOGGING_CONFIG
"""


def test_every_warning_and_error_event_the_code_writes_is_in_the_readmes_logs():
    """An alert is set on an event's name: each WARNING or ERROR event the worker, the engine or the shared core
    writes (a log call whose first argument is its snake_case name) is named in the README, so none goes unnoticed
    by an operator reading the Logs section."""
    written = set()
    for folder in ("listener", "generation", "firegen_core", "functions"):
        for path in (ROOT / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("warning", "error", "exception", "critical")
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                    and re.fullmatch(r"[a-z]+(_[a-z]+)+|[a-z]+", node.args[0].value)
                ):
                    written.add(node.args[0].value)
    readme = (ROOT / "README.md").read_text()
    assert {"no_gpu", "fitness_check_failed", "job_lost", "thread_crashed", "usage_recounted"} <= written
    assert sorted(name for name in written if f"`{name}`" not in readme) == []


@pytest.mark.parametrize(
    "level,events",
    [
        ("INFO", ["an_info", "a_warning", "an_error", "a_library_warning", "a_server_info"]),
        ("WARNING", ["a_warning", "an_error", "a_library_warning"]),
        ("DEBUG", ["a_debug", "an_info", "a_warning", "an_error", "a_library_warning", "a_server_info"]),
        # Audit: LOG_LEVEL=ERROR still let libraries' warnings and the local API's info lines through.
        ("ERROR", ["an_error"]),
    ],
)
def test_log_level_filters_the_json_events(level, events):
    # uvicorn configured as the SDK's local API configures it (its dict, then the level the SDK passes: the diff
    # review found the level undoing the dict's).
    script = LOG_SCRIPT.replace(
        "route_runpod_sdk()",
        "route_runpod_sdk()\nimport os, uvicorn\n"
        "uvicorn.Config('x:app', log_level=os.environ.get('UVICORN_LOG_LEVEL', 'info'))",
    )
    result = subprocess.run([sys.executable, "-c", script, level], cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line.get("event") for line in lines] == events, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- runsync answers
class SizedGenerator:
    """Results of a chosen size. A stand-in on purpose: the tiny models cannot make 20 MB of output (four noisy
    1024x1024 PNGs are ~12 MB), and the refusal depends only on the size."""

    def __init__(self, size: int):
        self.size = size

    def generate(self, request, progress=None):
        half = self.size // 2
        files = [(b"\0" * half, "png", "image/png"), (b"\0" * (self.size - half), "png", "image/png")]
        return SimpleNamespace(seed=1, files=files, video_info=None)


INLINE = {"prompt": "a car", "use_cloud_storage": False, "num_images_per_prompt": 2}


def test_inline_generations_run_on_threads_of_their_own():
    """Not on the requests' threads, each of which would keep an OpenMP team of torch's for good (a soak)."""
    from concurrent.futures import ThreadPoolExecutor

    names = []

    class Recording(SizedGenerator):
        def generate(self, request, progress=None):
            names.append(threading.current_thread().name)
            return super().generate(request, progress)

    handler = RunsyncHandler(store=None, submit=None, generator=Recording(10))
    with ThreadPoolExecutor(8) as requests:
        answers = list(requests.map(lambda _: handler.handle(INLINE), range(16)))
    assert all(answer["status"] == "completed" for answer in answers)
    assert len(names) == 16 and all(name.startswith("inline-generation") for name in names)
    assert len(set(names)) <= 2


def test_an_inline_result_over_20_mb_once_encoded_is_refused():
    over = INLINE_LIMIT_BYTES * 3 // 4 + 3  # base64 makes 4 bytes of 3: just over 20 MB once encoded
    handler = RunsyncHandler(store=None, submit=None, generator=SizedGenerator(over))
    answer = handler.handle(INLINE)
    assert answer == {
        "status": "failed",
        "error": "Result is 21.0 MB once encoded (base64), over RunPod's 20 MB response limit: use use_cloud_storage: "
        "true, or ask for fewer or smaller outputs",
    }


def test_an_inline_result_just_under_20_mb_is_returned():
    under = INLINE_LIMIT_BYTES * 3 // 4 - 300  # the answer's other fields and base64's padding fit in the rest
    answer = RunsyncHandler(store=None, submit=None, generator=SizedGenerator(under)).handle(INLINE)
    assert answer["status"] == "completed" and answer["image_count"] == 2
    assert "user_id" not in answer and "file_uid" not in answer  # optional inline, echoed only where given
    ids = {"user_id": "u1", "file_uid": "f1"}
    # With no store: an inline request writes no doc and counts against no user's limits (README).
    named = RunsyncHandler(store=None, submit=None, generator=SizedGenerator(64)).handle({**INLINE, **ids})
    assert (named["error"], named["user_id"], named["file_uid"]) == (False, "u1", "f1")
    assert sum(len(base64.b64decode(data)) for data in answer["images"]) == under
    assert len(json.dumps(answer)) <= INLINE_LIMIT_BYTES


def test_an_inline_result_whose_answer_passes_20_mb_by_its_padding_and_fields_is_refused():
    """4/3 of the raw bytes is under the limit, the JSON answer RunPod carries is not (mutation audit: the check
    counted neither base64's padding per file nor the fields around the files)."""
    raw = INLINE_LIMIT_BYTES * 3 // 4 - 3  # two files of 3n+1 and 3n+2 bytes: 4/3 of it is 20 MiB less 4 bytes
    assert raw * 4 / 3 <= INLINE_LIMIT_BYTES
    answer = RunsyncHandler(store=None, submit=None, generator=SizedGenerator(raw)).handle(INLINE)
    assert answer["status"] == "failed" and answer["error"].startswith("Result is 21.0 MB once encoded"), answer


def test_firestore_down_answers_could_not_record_within_its_bound(monkeypatch, unreachable_firestore):
    """Firestore unreachable (nothing listens on its port): runsync answers the README's retry message within
    10 s (well inside the functions' 20 s wait for it), hands nothing to the local slot, and logs
    `request_not_recorded`."""
    import structlog

    import listener.handler as handler_module

    submitted = []
    handler = RunsyncHandler(WorkerJobs(unreachable_firestore, worker_id="w"), lambda key, *rest: submitted.append(key))
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        monkeypatch.setattr(handler_module, "log", structlog.get_logger("listener.handler"))  # as below
        answer = handler.handle({"prompt": "a car", "user_id": "u", "file_uid": "f", "use_cloud_storage": True})
    took = time.monotonic() - started
    [said] = [e for e in logs if e["event"] == "request_not_recorded"]
    assert (said["log_level"], said["user_id"], said["file_uid"]) == ("error", "u", "f") and said["error"]
    assert answer == {
        "status": "failed",
        "error": "Could not record the job in Firestore; please retry (the same file_uid is safe to resend)",
    }
    assert took <= ANSWER_TIMEOUT + 1.5 and submitted == []


def test_firestore_down_answers_a_refusal_within_the_same_bound(unreachable_firestore):
    """A docs review: a refused request first fails the doc its file_uid names, where the doc awaits its parameters
    (the contract's function flow); with Firestore away that look-up (15 s) and then the write (as long) held the
    refusal past the functions' 20 s wait for it. Both end when the answer is due."""
    handler = RunsyncHandler(WorkerJobs(unreachable_firestore, worker_id="w"), lambda *rest: None)
    started = time.monotonic()
    answer = handler.handle({"prompt": "a car", "user_id": "u", "file_uid": "f", "use_cloud_storage": True, "width": 9})
    assert answer == {"status": "failed", "error": "width must be between 256 and 1024"}
    assert time.monotonic() - started <= ANSWER_TIMEOUT + 1.5


def test_firestore_down_fails_a_sweep_within_its_bound(unreachable_firestore):
    """Audit (an operator's view): with Firestore away, a sweep's queries waited out the client's default 300 s,
    so the worker logged one line in 4.5 minutes (its heartbeat and watchdog waited behind it). Each call is
    bounded as the job store's are."""
    reconciler = Reconciler(WorkerJobs(unreachable_firestore, worker_id="w"), runner=None)  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 (what the client raises is its own: unavailable, or its deadline)
        reconciler.sweep()
    assert time.monotonic() - started <= CALL_TIMEOUT + 3


# ---------------------------------------------------------------------------------------------- mutation audit
class SteppingGenerator:
    """Steps until told to stop (its progress callback raises), counting them. A stand-in on purpose: what is
    tested is the handler's stop, not a model's steps."""

    def __init__(self):
        self.started, self.ended, self.steps = threading.Event(), threading.Event(), 0

    def generate(self, request, progress=None):
        try:
            while self.steps < 3000:  # a minute at most: a generation nobody stops
                self.steps += 1
                if progress is not None:
                    progress(self.steps / 3000)
                self.started.set()
                time.sleep(0.02)
            return SimpleNamespace(seed=1, files=[], video_info=None)
        finally:
            self.ended.set()


def test_an_inline_generation_stops_when_runpod_stops_its_request(monkeypatch):
    """A review: RunPod stops a request (its execution timeout, a cancel) by cancelling the handler's task (the SDK's
    `stop_job`), which left the generation's thread running to its end for nobody, holding the model from the
    queue's jobs. It stops at its next step, said as `request_refused` with `reason` `stopped by RunPod`."""
    import asyncio

    import structlog

    import listener.handler as handler_module

    generator = SteppingGenerator()
    handler = RunsyncHandler(store=None, submit=None, generator=generator)

    async def stopped() -> None:
        task = asyncio.create_task(handler({"id": "rp-stopped", "input": INLINE}))
        assert await asyncio.to_thread(generator.started.wait, 30)
        task.cancel()  # as the SDK's JobScaler.stop_job does
        with pytest.raises(asyncio.CancelledError):
            await task

    with structlog.testing.capture_logs() as logs:
        monkeypatch.setattr(handler_module, "log", structlog.get_logger("listener.handler"))
        asyncio.run(stopped())
        assert generator.ended.wait(10) and generator.steps < 3000
    refused = [e for e in logs if e["event"] == "request_refused"]
    assert [(e["inline"], e["reason"]) for e in refused] == [(True, "stopped by RunPod")], logs


def test_an_inline_refusal_over_20_mb_is_logged_as_documented(monkeypatch):
    """README: `request_refused` with `inline: true` and `reason` `over 20 MB` (and the ids where given)."""
    import structlog

    import listener.handler as handler_module

    over = INLINE_LIMIT_BYTES * 3 // 4 + 3
    handler = RunsyncHandler(store=None, submit=None, generator=SizedGenerator(over))
    with structlog.testing.capture_logs() as logs:
        # A logger made inside the capture: one cached by a test that configured the worker's logs in this process
        # would not reach it (as tests/test_reconciler.py's runner_logs).
        monkeypatch.setattr(handler_module, "log", structlog.get_logger("listener.handler"))
        handler.handle({**INLINE, "user_id": "u1", "file_uid": "f1"})
    refused = [e for e in logs if e["event"] == "request_refused"]
    assert [(e["inline"], e["reason"], e["user_id"], e["file_uid"]) for e in refused] == [
        (True, "over 20 MB", "u1", "f1")
    ], logs


BAD_ARGUMENTS = """
import logging
from listener.logs import configure
configure("w-1")
logging.getLogger("some.library").warning("%d tokens", "not a number")  # a library's own bug
print("still running")
"""


def test_a_library_record_whose_arguments_do_not_fit_its_text_does_not_raise_into_its_caller():
    """The truncation filter reads every record's message: one that cannot be formatted must not raise out of the
    library's log call (it would fail the generation that logged it); logging reports it as it always does."""
    result = subprocess.run([sys.executable, "-c", BAD_ARGUMENTS], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "still running" in result.stdout, result.stderr


# ---------------------------------------------------------------------------------------------- make test
# The Makefile's python (PYTHON), seeing `cores` CPUs: it runs the `-c` code make hands it.
FAKE_CORES_PYTHON = """import os, sys
cores = int(os.environ["FAKE_CORES"])
os.sched_getaffinity = lambda pid: set(range(cores))
os.cpu_count = lambda: cores
exec(sys.argv[2])
"""


# What a make running this suite (or the caller's environment) would hand down and set instead.
MAKE_INHERITED = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "TEST_WORKERS", "PYTEST_ARGS", "PYTHON")


def make_test_command(*args: str, env: dict[str, str] | None = None) -> list[str]:
    """The pytest command `make test` runs (printed by `make -n`, nothing run), split into its words."""
    clean = {name: value for name, value in os.environ.items() if name not in MAKE_INHERITED}
    done = subprocess.run(
        ["make", "-n", "--no-print-directory", "test", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [line] = [line for line in done.stdout.splitlines() if " -m pytest " in line]
    return line.split()


def test_make_test_runs_one_process_more_than_cores_from_2_to_4_and_0_runs_in_one(tmp_path):
    """README: `TEST_WORKERS`: one more than the machine has cores, at least 2 and at most 4; `TEST_WORKERS=0` runs
    in one process. The Makefile's own expression, evaluated by make with its python made to see 1, 3, 4 or 16
    cores (this machine has what it has), and here as it is; then the command `TEST_WORKERS=0` gives, run."""
    fake = tmp_path / "fake_cores.py"
    fake.write_text(FAKE_CORES_PYTHON)
    python = f"PYTHON={sys.executable} {fake}"
    for cores, workers in [(1, 2), (2, 3), (3, 4), (4, 4), (16, 4)]:
        command = make_test_command(python, env={"FAKE_CORES": str(cores)})
        assert command[command.index("-n") + 1] == str(workers), (cores, command)
    here = min(4, max(2, len(os.sched_getaffinity(0)) + 1))
    command = make_test_command()
    assert command[command.index("-n") + 1 :][:3] == [str(here), "--dist", "loadfile"]

    one = make_test_command("TEST_WORKERS=0", f"PYTEST_ARGS=-q -p no:cacheprovider {tmp_path / 'test_one.py'}")
    assert one[:6] == [".venv/bin/python", "-m", "pytest", "-n", "0", "--dist"]
    (tmp_path / "test_one.py").write_text(
        "import os\n\ndef test_in_the_main_process():\n    assert 'PYTEST_XDIST_WORKER' not in os.environ\n"
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_")}
    done = subprocess.run(
        [str(ROOT / one[0]), *one[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr
