"""structlog set-up, called once by each entry point: JSON off a terminal (journald), console on one.

The standard library's loggers (aiomqtt, onnxruntime, torch, transformers) go through the same renderer.
An event logged with an exception (``log.exception``, or a stdlib record with ``exc_info``) carries its
type, message and traceback: as a structured ``exception`` field in JSON, as a formatted traceback on a
terminal.

No secret reaches a log line: every rendered line has the password of any URL in it masked
(``mqtts://dev-a:***@broker:8883``; ``redact``), whoever logged it (our services, aiomqtt, a traceback),
and a configuration is logged through ``redacted_config``, which also masks secret-named fields (api_key).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys

import structlog
from structlog.tracebacks import ExceptionDictTransformer


# scheme://user:password@ -> scheme://user:***@ (the user name stays: it is the account, and useful)
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:@/\s\"']*):[^@/\s\"']*@")
SECRET_FIELDS = re.compile(r"(password|passwd|secret|token|api_key)", re.IGNORECASE)
MASK = "***"


def redact(text: str) -> str:
    """``text`` with the password of every URL in it masked."""
    return _URL_PASSWORD.sub(lambda match: f"{match['head']}:{MASK}@", text)


def redacted_config(config: object) -> dict[str, object]:
    """A config dataclass as a dict fit for a log line: URL passwords and secret-named fields masked."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config))
    return {name: (MASK if value and SECRET_FIELDS.search(name) else redact(value) if isinstance(value, str) else value)
            for name, value in values.items()}


def _redacting(renderer):
    """The renderer, its output redacted: the last step before a line is written, whatever produced it."""

    def render(logger, method_name, event_dict):
        return redact(renderer(logger, method_name, event_dict))

    return render


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
        rendering = [tracebacks, _redacting(structlog.processors.JSONRenderer())]
    else:  # the console renderer formats exc_info itself
        rendering = [_redacting(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))]
    structlog.configure(
        # Below the level, an event is dropped before any processor runs (no timestamp, no merge): the verifier
        # logs a debug line a verdict; each cost ~7.5 us while nobody read it, ~5.3 us now.
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
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
