"""A stand-in for the Berth host, to unit-test handlers with plain
``python -m unittest`` (or pytest), outside WebAssembly::

    import unittest
    import berth
    from berth.testing import FakeHost

    import app

    class HelloTest(unittest.TestCase):
        def setUp(self):
            self.host = FakeHost(config={"greeting": "Hi"}).install()
            self.addCleanup(self.host.uninstall)

        def test_greets(self):
            response = app.handle(berth.Request("GET", "/hello?name=Ada"))
            self.assertEqual(response.json_body(), {"message": "Hi, Ada!"})
            self.assertEqual(self.host.log_messages("info"), ["greeted Ada"])
            self.assertEqual(self.host.counter("greetings"), 1)

A :class:`FakeHost` serves config (and secrets) from a dict, records log
lines and metric updates, and answers outbound calls with the responses
(or errors) a test gives it; any other outbound call is refused, as the
real host refuses a destination outside ``allowed_outbound_hosts``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from . import _host, _serve
from ._errors import ConfigError, Denied
from ._message import Request, Response
from .http import OutgoingRequest

__all__ = ["FakeHost", "LogLine", "MetricUpdate", "call"]

#: What an outbound call gets: a response, an exception to raise (e.g.
#: ``berth.http.Denied(url)``), or a function of the request giving either.
Answer = Union[Response, BaseException, Callable[[OutgoingRequest], Response]]


@dataclass(frozen=True)
class LogLine:
    """A line logged through the host."""

    level: str
    context: str
    message: str


@dataclass(frozen=True)
class MetricUpdate:
    """One update of a metric: ``kind`` is ``counter`` (``value`` added),
    ``gauge`` (set) or ``histogram`` (observed)."""

    kind: str
    name: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


class FakeHost:
    """The host's capabilities, in memory.

    ``config`` and ``secrets`` are read by :mod:`berth.config` (the real
    host serves both through one store); ``config_error`` makes every read
    fail as a broken store would.

    Install it for a test with ``install()``/``uninstall()``, or as a
    context manager (``with FakeHost(...) as host:``).
    """

    def __init__(
        self,
        config: Mapping[str, str] | None = None,
        *,
        secrets: Mapping[str, str] | None = None,
        config_error: str | None = None,
    ) -> None:
        self.config: dict[str, str] = {}
        for source in (config or {}, secrets or {}):
            for key, value in source.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise TypeError(
                        f"config {key!r}: keys and values are str, as the host's are "
                        f"(got {type(value).__name__}; write it as text)"
                    )
                self.config[key] = value
        self.config_error = config_error
        #: Every line logged, in order.
        self.logs: list[LogLine] = []
        #: Every metric update, in order.
        self.metrics: list[MetricUpdate] = []
        #: The buckets each histogram chose.
        self.buckets: dict[str, list[float]] = {}
        #: Every outbound request sent, in order.
        self.requests: list[OutgoingRequest] = []
        self._answers: list[tuple[str, str | None, Answer]] = []
        self._previous: Any = None
        self._installed = False

    # Installing.

    def install(self) -> FakeHost:
        """Makes the SDK's calls come here; returns ``self``."""
        if self._installed:
            raise RuntimeError("this FakeHost is installed already")
        self._previous = _host.install(self)
        self._installed = True
        return self

    def uninstall(self) -> None:
        """Gives the SDK back the host it had before."""
        if self._installed:
            _host.install(self._previous)
            self._installed = False

    def __enter__(self) -> FakeHost:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    # Outbound answers.

    def on_fetch(self, url: str, answer: Answer, *, method: str | None = None) -> None:
        """Answers calls to exactly ``url`` (with ``method``, or any) with
        ``answer``. A later answer for the same URL wins."""
        if not isinstance(answer, (Response, BaseException)) and not callable(answer):
            raise TypeError(
                "answer must be a berth.Response, an exception or a function of the request, "
                f"not {type(answer).__name__}"
            )
        self._answers.append((url, method.upper() if method else None, answer))

    # What the test reads back.

    def log_messages(self, level: str | None = None) -> list[str]:
        """The messages logged (at ``level`` only, if given)."""
        return [line.message for line in self.logs if level is None or line.level == level]

    def counter(self, name: str, labels: Mapping[str, str] | None = None) -> int:
        """What was added to counter ``name`` (the series with exactly
        ``labels``; none: the series without labels)."""
        return int(sum(u.value for u in self._series("counter", name, labels)))

    def gauge(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """The last value gauge ``name`` was set to, or ``None``."""
        updates = self._series("gauge", name, labels)
        return updates[-1].value if updates else None

    def observations(self, name: str, labels: Mapping[str, str] | None = None) -> list[float]:
        """The values histogram ``name`` observed, in order."""
        return [u.value for u in self._series("histogram", name, labels)]

    def _series(self, kind: str, name: str, labels: Mapping[str, str] | None) -> list[MetricUpdate]:
        wanted = dict(labels or {})
        return [u for u in self.metrics if (u.kind, u.name, u.labels) == (kind, name, wanted)]

    # The host's side (berth._host.Host).

    def config_get(self, key: str) -> str | None:
        if self.config_error is not None:
            raise ConfigError(key, self.config_error)
        return self.config.get(key)

    def config_get_all(self) -> list[tuple[str, str]]:
        if self.config_error is not None:
            raise ConfigError(None, self.config_error)
        return list(self.config.items())

    def log(self, level: str, context: str, message: str) -> None:
        self.logs.append(LogLine(level, context, message))

    def counter_add(self, name: str, value: int, labels: list[tuple[str, str]]) -> None:
        self.metrics.append(MetricUpdate("counter", name, value, dict(labels)))

    def gauge_set(self, name: str, value: float, labels: list[tuple[str, str]]) -> None:
        self.metrics.append(MetricUpdate("gauge", name, value, dict(labels)))

    def histogram_buckets(self, name: str, buckets: list[float]) -> None:
        # Like the host: the first choice stays.
        self.buckets.setdefault(name, list(buckets))

    def histogram_observe(self, name: str, value: float, labels: list[tuple[str, str]]) -> None:
        self.metrics.append(MetricUpdate("histogram", name, value, dict(labels)))

    def send(self, request: OutgoingRequest) -> Response:
        self.requests.append(request)
        for url, method, answer in reversed(self._answers):
            if url == request.url and method in (None, request.method):
                break
        else:
            denied = Denied(request.url)
            denied.message += (
                f" (berth.testing: the FakeHost has no answer for {request.method} "
                f"{request.url}; give one with on_fetch)"
            )
            raise denied
        if isinstance(answer, BaseException):
            raise answer
        if not isinstance(answer, Response):
            answer = answer(request)
            if not isinstance(answer, Response):
                raise TypeError(
                    f"the on_fetch function returned {type(answer).__name__}, not a berth.Response"
                )
        # A copy, so a handler that changes it does not change the next answer.
        return Response(answer.body, answer.status, answer.headers)

    async def send_async(self, request: OutgoingRequest) -> Response:
        return self.send(request)


def call(handler: _serve.Handler, request: Request) -> Response:
    """What a client would get from ``handler`` for ``request``: its
    response, or the error response the SDK makes of an exception
    (``HttpError`` → its status, anything else → 500 and an error log line).
    An ``async def`` handler is run to completion."""
    return _serve.respond(handler, request, _run)


def _run(awaitable: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await awaitable

    return asyncio.run(main())
