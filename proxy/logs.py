"""structlog set-up: JSON in production, console for humans; request id from contextvars.

Nothing here logs message content, prompts, completions, keys or Authorization headers: call
sites log sizes, hashes, statuses and timings only.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(*, fmt: str = "json", level: str = "info") -> None:
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
