"""Log lines, through the host: it adds the module name, the request id and
the trace id, rate-limits them, and writes them as JSON with its own.

    berth.log.info(f"greeted {name}")

The stdlib :mod:`logging` can be routed here too::

    berth.log.install()              # the root logger, INFO and above
    logging.getLogger(__name__).warning("stock low: %d", n)

Each line carries a *context*: the name of the calling module here, the
logger's name through :class:`Handler`.
"""

from __future__ import annotations

import logging
import sys

from . import _host

__all__ = ["trace", "debug", "info", "warn", "warning", "error", "Handler", "install"]

#: The ``wasi:logging`` levels, as the host receives them.
LEVELS = ("trace", "debug", "info", "warn", "error", "critical")


def _emit(level: str, message: object, context: str | None) -> None:
    if context is None:
        # The module that called trace()/debug()/...: two frames up.
        context = sys._getframe(2).f_globals.get("__name__", "")
    _host.current().log(level, context, str(message))


def trace(message: object, *, context: str | None = None) -> None:
    """Logs at trace level (very detailed)."""
    _emit("trace", message, context)


def debug(message: object, *, context: str | None = None) -> None:
    """Logs at debug level."""
    _emit("debug", message, context)


def info(message: object, *, context: str | None = None) -> None:
    """Logs at info level (normal operation)."""
    _emit("info", message, context)


def warn(message: object, *, context: str | None = None) -> None:
    """Logs at warn level (something looks wrong)."""
    _emit("warn", message, context)


warning = warn


def error(message: object, *, context: str | None = None) -> None:
    """Logs at error level (something failed)."""
    _emit("error", message, context)


def level_of(levelno: int) -> str:
    """The host level for a :mod:`logging` level number."""
    if levelno >= logging.CRITICAL:
        return "critical"
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warn"
    if levelno >= logging.INFO:
        return "info"
    if levelno >= logging.DEBUG:
        return "debug"
    return "trace"


class Handler(logging.Handler):
    """A :mod:`logging` handler that sends records to the host, with the
    logger's name as context. A record's traceback (``logger.exception``)
    is part of its message."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            _host.current().log(level_of(record.levelno), record.name, message)
        except Exception:
            self.handleError(record)


def install(level: int | str = logging.INFO, logger: logging.Logger | None = None) -> Handler:
    """Routes ``logger`` (default: the root logger) to the host at ``level``
    and above, once (calling it again only sets the level); returns the
    handler."""
    logger = logger if logger is not None else logging.getLogger()
    logger.setLevel(level)
    for handler in logger.handlers:
        if isinstance(handler, Handler):
            return handler
    handler = Handler()
    logger.addHandler(handler)
    return handler
