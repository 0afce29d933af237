"""From a handler function to the class componentize-py exports, and what a
handler's outcome becomes: the same code answers in the component and in
``berth.testing.call``, so a unit test sees what a client would."""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, Union

from . import _host, log
from ._errors import HttpError
from ._message import Request, Response

#: A handler: ``def handle(request) -> Response`` or ``async def``.
Handler = Callable[[Request], Union[Response, Awaitable[Response]]]


def respond(handler: Handler, request: Request, run: Callable[[Awaitable[Any]], Any]) -> Response:
    """Calls ``handler`` (awaiting it with ``run`` when it is a coroutine)
    and returns the response the client gets:

    - what the handler returned, if it is a :class:`berth.Response`;
    - for a :class:`berth.HttpError` (:class:`berth.JsonError`, an outbound
      :class:`berth.http.FetchError`), its status and ``{"error": message}``;
    - for any other exception, 500 ``{"error": "internal error"}``, the
      traceback going to the log and not to the client.
    """
    try:
        result = handler(request)
        if inspect.isawaitable(result):
            result = run(result)
        if not isinstance(result, Response):
            raise TypeError(
                f"the handler returned {type(result).__name__}, not a berth.Response "
                "(e.g. berth.Response.json(...))"
            )
        return result
    except HttpError as e:
        if e.status >= 500:
            log.error(f"handler failed: {e}", context=_context(handler))
        try:
            return Response.error(e.status, e.message)
        except (TypeError, ValueError):  # a status that is no HTTP status
            return Response.error(500, e.message)
    except Exception:
        log.error(f"handler failed:\n{traceback.format_exc()}", context=_context(handler))
        return Response.error(500, "internal error")


def _context(handler: Handler) -> str:
    return getattr(handler, "__module__", None) or "berth"


def serve(handler: Handler) -> type:
    """Serves ``handler`` for every request of the module; returns the class
    componentize-py looks for in the app module, so assign it there::

        def handle(request: berth.Request) -> berth.Response:
            ...

        IncomingHandler = berth.serve(handle)

    The handler may be ``async def``. The class keeps it as
    ``IncomingHandler.handler``.
    """
    if not callable(handler):
        raise TypeError(f"berth.serve takes the handler function, not {type(handler).__name__}")
    if _host._wasi is not None:
        return _host._wasi.incoming_handler(handler)

    class IncomingHandler:
        """Outside a component there is nothing to export: the host calls
        ``handle`` only inside one. Test the handler itself, with
        ``berth.testing``."""

        def handle(self, request: object, response_out: object) -> None:
            raise RuntimeError(
                "IncomingHandler.handle is called by the host, inside a component; "
                "in unit tests call the handler (berth.testing.call(handle, request))"
            )

    IncomingHandler.handler = staticmethod(handler)  # type: ignore[attr-defined]
    return IncomingHandler
