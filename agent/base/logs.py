"""structlog setup: JSON lines when not on a terminal (journald), readable console otherwise."""

from __future__ import annotations

import logging
import sys

import structlog

#: Tracebacks as structured data, without local variables (they may hold job inputs or secrets).
_TRACEBACKS = structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written (not when logging was configured)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(fmt: str = "auto", level: int = logging.INFO) -> None:
    """Configure structlog once, in ``main()``. ``fmt`` is auto, json or console."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # JSON lines carry the traceback as structured data; the console renders its own.
            *([_TRACEBACKS] if use_json else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
