"""Structured JSON logs: one event per line on stdout, each carrying the worker's id.

Our own modules log through structlog; libraries (and the few modules of ours that use the standard
`logging`) go through the same JSON renderer, so every line of the worker's output parses the same way.

Each line carries the fields the platforms read: `severity` (Cloud Logging's level names) and `message` (the
event), beside `event` and `level`; and `requestId`, RunPod's job id, on the lines of a runsync request (and
of a job a RunPod job dispatched, from its doc's `runpod_job_id`). As a last guard, what looks like a
credential in a line, in any field (firegen_core/redaction.py), is replaced by `<redacted>` before it is written.
Python's own plain-text output, a warning or a thread's uncaught exception, is made an event too.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings
from urllib.parse import SplitResult, urlsplit

import structlog
from structlog.typing import EventDict, Processor

from firegen_core.redaction import redacted

SEVERITY = {"debug": "DEBUG", "info": "INFO", "warning": "WARNING", "warn": "WARNING", "error": "ERROR"}
SEVERITY.update(critical="CRITICAL", exception="ERROR")


def _platform_fields(logger: object, method: str, event: EventDict) -> EventDict:
    event.setdefault("severity", SEVERITY.get(str(event.get("level", method)).lower(), "DEFAULT"))
    event.setdefault("message", event.get("event"))
    return event


def _redact(logger: object, method: str, event: EventDict) -> EventDict:
    return {key: redacted(value) for key, value in event.items()}


_add_extras = structlog.stdlib.ExtraAdder()


def _extras(logger: logging.Logger, method: str, event: EventDict) -> EventDict:
    """A record's `extra={...}` fields, but uvicorn's `color_message` (the message again, with terminal colours)."""
    event = _add_extras(logger, method, event)
    event.pop("color_message", None)
    return event


# diffusers' notes on a prompt longer than its text encoder takes, which quote the cut text: "... because CLIP can
# only handle sequences up to 77 tokens: [...]" (SDXL) or "... because `max_sequence_length` is set to 512 tokens".
_TRUNCATED = re.compile(
    r"The following part of your input was truncated because (?:(\w+) can only handle sequences up to|.*? is set to)"
    r" *(\d+) tokens"
)
# transformers' warning before it, once per tokenizer: diffusers tokenizes a prompt untruncated only to quote what it
# cut, and encodes it truncated, so the "indexing errors" it foretells never come.
_LONGER = "Token indices sequence length is longer than the specified maximum sequence length"


class _PromptTruncated(logging.Filter):
    """diffusers' note quoted the rest of a user's prompt (up to ~2,000 characters, twice an image: SDXL's two
    encoders) at WARNING in every line (fuzz audit): an event of ours, `prompt_truncated`, without the text, at
    INFO: a long prompt is the client's right, nothing for the operator to act on. transformers' warning that comes
    first, of errors that never come, is dropped."""

    def __init__(self, floor: int) -> None:
        super().__init__()
        self.floor = floor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            said = record.getMessage()  # as written: the text may come in the record's arguments
        except (TypeError, ValueError):
            said = str(record.msg)
        if said.startswith(_LONGER):
            return False
        match = _TRUNCATED.match(said)
        if match is None:
            return True
        if self.floor > logging.INFO:
            return False
        record.msg, record.args, record.levelno, record.levelname = "prompt_truncated", (), logging.INFO, "INFO"
        record.encoder, record.max_tokens = match[1] or "text encoder", int(match[2])  # the event's fields
        return True


def configure(worker_id: str, level: str = "INFO") -> None:
    def add_worker_id(logger: object, method: str, event: EventDict) -> EventDict:
        event.setdefault("worker_id", worker_id)
        return event

    numeric = logging.getLevelName(level.upper())
    numeric = numeric if isinstance(numeric, int) else logging.INFO
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_worker_id,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            _platform_fields,
            _redact,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    # The floor for every record, libraries' too: a library that sets its own logger's level (transformers,
    # diffusers: WARNING) passes the root's by, since a record is weighed by the logger it starts from.
    handler.setLevel(numeric)
    handler.addFilter(_PromptTruncated(numeric))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # `extra={...}`: the fields of our own modules' standard-library records (firegen_core is shared with
            # the functions, so it logs through `logging`).
            foreign_pre_chain=[structlog.stdlib.add_logger_name, _extras, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _platform_fields,
                _redact,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    keep_google_records()
    # Libraries' chatter stays at warnings; our own standard-logging modules follow the chosen level.
    root.setLevel(max(logging.WARNING, numeric))  # LOG_LEVEL=ERROR quiets them too
    for name in ("generation", "listener", "firegen_core"):
        logging.getLogger(name).setLevel(numeric)
    warnings.showwarning = _warning_event
    threading.excepthook = _thread_crashed
    sys.excepthook = _uncaught


def _uncaught(exc_type, exc, traceback) -> None:
    """An exception that ends the process with nothing of the worker's to say it (main() says its own, as
    `worker_crashed`): an ERROR event with the traceback, where Python prints it in plain text on stderr. Ctrl-C's
    stays as Python shows it, at a terminal."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, traceback)
        return
    structlog.get_logger("listener").error("uncaught_exception", exc_info=(exc_type, exc, traceback))


def _thread_crashed(args: threading.ExceptHookArgs) -> None:
    """An exception no code of a thread caught (a library's thread, or a bug of ours): Python prints its traceback
    in plain text on stderr. An ERROR event with the traceback instead; a thread's SystemExit stays silent."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else None
    structlog.get_logger("listener").error(
        "thread_crashed", thread=name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
    )


def _warning_event(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning (a library's UserWarning or FutureWarning: torch's compiler warns at a bf16 UNet's compile)
    as an event of this stream: Python writes it in plain text, over several lines, on stderr."""
    structlog.get_logger("py.warnings").warning(
        "python_warning", category=category.__name__, said=str(message), where=f"{filename}:{lineno}"
    )


def keep_google_records() -> None:
    """google-api-core (client_logging, on its first client) turns off the `google` logger's propagation unless
    that logger was configured: its records then reach no handler, and Python's last resort writes them in plain
    text on stderr ("Background thread did not exit." at every Firestore listener's close that timed out). A level
    of its own counts as configured there; propagation is set back in case a client came first."""
    google = logging.getLogger("google")
    google.setLevel(logging.WARNING)
    google.propagate = True


# The SDK's level names, and the closest of structlog's.
_RUNPOD_LEVELS = {"TRACE": "debug", "DEBUG": "debug", "INFO": "info", "WARN": "warning", "ERROR": "error"}


_WEBHOOK_FAILED = re.compile(r"WEBHOOK \| Request to (\S+) failed: ")


def webhook_said(text: str) -> str:
    """The SDK's webhook failure with the webhook's URL cut to its scheme and host, wherever it is quoted (the error
    repeats it, or its path): a secret may sit in any part of it (a Slack-style path, `?sig=`, `user:pass@`), which
    no pattern of the redaction filter knows (a docs review)."""
    match = _WEBHOOK_FAILED.match(text)
    if not match:
        return text
    url = match.group(1)
    parts = urlsplit(url)
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host  # IPv6
    shown = f"{parts.scheme}://{host}{f':{parts.port}' if _port(parts) else ''}/<redacted>"
    rest = text.replace(url, shown)
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    if len(tail) > 1:  # requests' errors quote the path and query alone too ("with url: /hook?...")
        rest = rest.replace(tail, "/<redacted>")
    if parts.username or parts.password:
        rest = rest.replace(parts.netloc, host)
    return rest


def _port(parts: SplitResult) -> int | None:
    try:
        return parts.port
    except ValueError:  # a port that is not a number: the SDK could not have reached it anyway
        return None


def _clipped(text: str, most: int = 4096) -> str:
    """As the SDK cuts a long message (an inline result's base64 media, in `--test_input`'s `Job result`): from
    the middle, so that its end (the result's status) is kept."""
    if len(text) <= most:
        return text
    return f"{text[: most // 2]} ...{len(text) - most} characters cut... {text[-most // 2 :]}"


def route_runpod_sdk(local_api: bool = False) -> None:
    """The RunPod SDK's output as events of this stream: its logger (plain `INFO   | <id> | Started.` lines
    outside RunPod, JSON of its own shape, without `severity`, on it), its start banner (a bare `print`), the local API's
    webhook failure (with `local_api`; a bare `print` too, quoting the webhook's URL) and its uvicorn lines
    (uvicorn's own handlers). Each becomes a `runpod_sdk` event with `said` and, for a
    job's line, `requestId`. Left as it is where the SDK's internals are not the ones this was written for."""
    import runpod.serverless
    from runpod.serverless.modules import rp_logger

    log = structlog.get_logger("runpod")
    levels = getattr(rp_logger, "LOG_LEVELS", None)
    if isinstance(levels, list) and callable(getattr(rp_logger.RunPodLogger, "log", None)):

        def sdk_log(self, message, message_level="INFO", job_id=None):
            # The SDK's own filter: its level (RUNPOD_LOG_LEVEL), and TIP always shown.
            level = str(message_level).upper()
            if self.level == "NOTSET" or (
                level in levels and levels.index(self.level) > levels.index(level) and level != "TIP"
            ):
                return
            fields = {"requestId": job_id} if job_id else {}
            getattr(log, _RUNPOD_LEVELS.get(level, "info"))("runpod_sdk", said=_clipped(str(message)), **fields)

        rp_logger.RunPodLogger.log = sdk_log

    def said(*args: object, **kwargs: object) -> None:
        log.info("runpod_sdk", said=" ".join(str(a) for a in args).strip(" -"))

    runpod.serverless.print = said  # the module's `print`: only the banner uses it
    if local_api:  # the SDK imports its local API only to serve it (--rp_serve_api, or its realtime port)
        from runpod.serverless.modules import rp_fastapi

        def webhook_failed(*args: object, **kwargs: object) -> None:
            # Its one print: a webhook that could not be sent, quoting the webhook's URL.
            log.warning("runpod_sdk", said=webhook_said(" ".join(str(a) for a in args)))

        rp_fastapi.print = webhook_failed
    try:
        from uvicorn.config import LOGGING_CONFIG
    except ImportError:  # pragma: no cover - the SDK's local API always brings uvicorn
        return
    # uvicorn.run() applies this dict (its default argument, the same object) when the local API starts.
    level = logging.getLevelName(max(logging.INFO, logging.getLogger("listener").getEffectiveLevel()))
    # The SDK passes uvicorn.run() a level of its own (UVICORN_LOG_LEVEL, else info), set after the dict: too.
    os.environ.setdefault("UVICORN_LOG_LEVEL", level.lower())
    for name in ("uvicorn", "uvicorn.access"):
        LOGGING_CONFIG["loggers"][name] = {"handlers": [], "level": level, "propagate": True}
    LOGGING_CONFIG["loggers"]["uvicorn.error"] = {"level": level}
