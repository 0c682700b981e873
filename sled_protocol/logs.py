"""structlog set-up, called once by each entry point: JSON off a terminal (journald), console on one.

The standard library's loggers (aiomqtt, onnxruntime, torch, transformers) go through the same renderer.
An event logged with an exception (``log.exception``, or a stdlib record with ``exc_info``) carries its
type, message and traceback: as a structured ``exception`` field in JSON, as a formatted traceback on a
terminal.
"""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.tracebacks import ExceptionDictTransformer


def configure_logging(level: str = "info", *, json_logs: bool | None = None) -> None:
    json_logs = (not sys.stderr.isatty()) if json_logs is None else json_logs
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_logs:  # exc_info becomes {"exception": [{"exc_type", "exc_value", "frames": [...]}, ...]}
        # No local variables in the frames: they would copy secrets (a broker password) into the journal.
        tracebacks = structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
        rendering = [tracebacks, structlog.processors.JSONRenderer()]
    else:  # the console renderer formats exc_info itself
        rendering = [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("transformers", "torch", "onnxruntime", "mqtt"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
