"""berth: write Berth modules in plain Python.

A Berth module is a WebAssembly component that answers HTTP requests; the
host does everything operational (routing, limits, retries, logs, metrics,
traces), so a module is only business logic. This package turns the
component plumbing into a function from :class:`Request` to
:class:`Response`, plus :mod:`berth.config`, :mod:`berth.log`,
:mod:`berth.metrics` and outbound :mod:`berth.http`::

    import berth
    from berth import Request, Response, config, log

    def handle(request: Request) -> Response:
        name = request.query.get("name", "world")
        log.info(f"greeted {name}")
        return Response.json({"message": f"{config.get_or('greeting', 'Hello')}, {name}!"})

    # componentize-py exports the class `IncomingHandler` of the app module.
    IncomingHandler = berth.serve(handle)

Build it with componentize-py against the world in the SDK's ``wit/``
folder (``-w berth:sdk/service``). Outside WebAssembly the package imports
as well, and :mod:`berth.testing` stands in for the host in unit tests.
"""

from . import config, http, log, metrics
from ._errors import BerthError, ConfigError, HttpError, JsonError
from ._message import Headers, Request, Response
from ._serve import serve

__version__ = "0.1.0"

__all__ = [
    "BerthError",
    "ConfigError",
    "Headers",
    "HttpError",
    "JsonError",
    "Request",
    "Response",
    "config",
    "http",
    "log",
    "metrics",
    "serve",
]
