"""Structured JSON logs: one event per line on stdout, each carrying the worker's id.

Our own modules log through structlog; libraries (and the few modules of ours that use the standard
`logging`) go through the same JSON renderer, so every line of the worker's output parses the same way.

Each line carries the fields the platforms read: `severity` (Cloud Logging's level names) and `message` (the
event), beside `event` and `level`; and `requestId`, RunPod's job id, on the lines of a runsync request (and
of a job a RunPod job dispatched, from its doc's `runpod_job_id`). As a last guard, what looks like a
credential in a line (a signed URL's signature, a download token, a private key, a bearer token) is replaced
by `<redacted>` before it is written.
"""

from __future__ import annotations

import logging
import re
import sys

import structlog
from structlog.typing import EventDict, Processor

SEVERITY = {"debug": "DEBUG", "info": "INFO", "warning": "WARNING", "warn": "WARNING", "error": "ERROR"}
SEVERITY.update(critical="CRITICAL", exception="ERROR")

_SECRETS = re.compile(
    r"(?P<keep>(?:[?&](?:X-Goog-Signature|X-Goog-Credential|Signature|token|access_token|key)=)|"
    r"(?:Bearer\s+))[^&\s\"']+"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
    re.IGNORECASE | re.DOTALL,
)


def redact(text: str) -> str:
    return _SECRETS.sub(lambda m: (m.group("keep") or "") + "<redacted>", text)


def _platform_fields(logger: object, method: str, event: EventDict) -> EventDict:
    event.setdefault("severity", SEVERITY.get(str(event.get("level", method)).lower(), "DEFAULT"))
    event.setdefault("message", event.get("event"))
    return event


def _redact(logger: object, method: str, event: EventDict) -> EventDict:
    return {key: redact(value) if isinstance(value, str) else value for key, value in event.items()}


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
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # `extra={...}`: the fields of our own modules' standard-library records (firegen_core is shared with
            # the functions, so it logs through `logging`).
            foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder(), *shared],
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
    # Libraries' chatter stays at warnings; our own standard-logging modules follow the chosen level.
    root.setLevel(logging.WARNING)
    for name in ("generation", "listener", "firegen_core"):
        logging.getLogger(name).setLevel(numeric)
