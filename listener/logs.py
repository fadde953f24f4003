"""Structured JSON logs: one event per line on stdout, each carrying the worker's id."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(worker_id: str, level: str = "INFO") -> None:
    def add_worker_id(logger, method, event: dict) -> dict:
        event.setdefault("worker_id", worker_id)
        return event

    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_worker_id,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric if isinstance(numeric, int) else logging.INFO),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard module; keep their chatter to warnings, one line each.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
