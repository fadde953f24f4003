"""Structured JSON logs: one event per line on stdout, each carrying the worker's id.

Our own modules log through structlog; libraries (and the few modules of ours that use the standard
`logging`) go through the same JSON renderer, so every line of the worker's output parses the same way.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(worker_id: str, level: str = "INFO") -> None:
    def add_worker_id(logger, method, event: dict) -> dict:
        event.setdefault("worker_id", worker_id)
        return event

    numeric = logging.getLevelName(level.upper())
    numeric = numeric if isinstance(numeric, int) else logging.INFO
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_worker_id,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries' chatter stays at warnings; our own standard-logging modules follow the chosen level.
    root.setLevel(logging.WARNING)
    for name in ("generation", "listener"):
        logging.getLogger(name).setLevel(numeric)
