"""The SDK inside a component: the ``berth:sdk/service`` world through the
bindings componentize-py generates (module ``wit_world``, from
``-d vendor/berth-sdk/wit -w berth:sdk/service``).

Imported only inside a component, by ``berth._host``, at the app's import
time (which componentize-py runs at build time and snapshots).

Everything that waits (body bytes, an outbound response, room to write) is
written once, as a generator that yields the pollable it waits on; a
blocking driver (``_block_on``) runs it for synchronous calls, an awaiting
one (``_await_on``) inside an async handler's :class:`PollLoop`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import traceback
from collections.abc import Generator
from typing import Any, NoReturn, TypeVar

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import logging as wasi_logging
from wit_world.imports import metrics as wasi_metrics
from wit_world.imports import monotonic_clock, outgoing_handler, poll, store, streams, types

from . import _serve
from ._errors import (
    ConfigError,
    Denied,
    FetchError,
    InvalidRequest,
    Timeout,
    Unavailable,
    UpstreamError,
    _shown,
)
from ._loop import PollLoop
from ._message import Request, Response, _request_from_host, _response_from_host

T = TypeVar("T")
Steps = Generator[Any, None, T]

# The most one read asks for; the host may give less.
READ_SIZE = 64 * 1024

_LEVELS = {
    "trace": wasi_logging.Level.TRACE,
    "debug": wasi_logging.Level.DEBUG,
    "info": wasi_logging.Level.INFO,
    "warn": wasi_logging.Level.WARN,
    "error": wasi_logging.Level.ERROR,
    "critical": wasi_logging.Level.CRITICAL,
}

_METHODS: dict[str, types.Method] = {
    "GET": types.Method_Get(),
    "HEAD": types.Method_Head(),
    "POST": types.Method_Post(),
    "PUT": types.Method_Put(),
    "DELETE": types.Method_Delete(),
    "CONNECT": types.Method_Connect(),
    "OPTIONS": types.Method_Options(),
    "TRACE": types.Method_Trace(),
    "PATCH": types.Method_Patch(),
}

_TIMEOUTS = (
    types.ErrorCode_ConnectionTimeout,
    types.ErrorCode_ConnectionReadTimeout,
    types.ErrorCode_ConnectionWriteTimeout,
    types.ErrorCode_DnsTimeout,
    types.ErrorCode_HttpResponseTimeout,
)


class WasiHost:
    """The Berth host, through ``wasi:config``, ``wasi:logging``,
    ``berth:metrics`` and ``wasi:http``.

    It answers only while a request is served: the app's top level runs at
    build time, inside componentize-py, where each of these imports is a
    stub that traps with a message easy to miss.
    """

    #: Set when the host first calls the handler.
    serving = False

    def config_get(self, key: str) -> str | None:
        if not self.serving:
            _refuse(f"config.get({key!r})")
        try:
            return store.get(key)
        except Err as e:
            raise ConfigError(key, e.value.value) from None

    def config_get_all(self) -> list[tuple[str, str]]:
        if not self.serving:
            _refuse("config.get_all()")
        try:
            return store.get_all()
        except Err as e:
            raise ConfigError(None, e.value.value) from None

    def log(self, level: str, context: str, message: str) -> None:
        if not self.serving:
            _refuse("logging")
        wasi_logging.log(_LEVELS[level], context, message)

    def counter_add(self, name: str, value: int, labels: list[tuple[str, str]]) -> None:
        if not self.serving:
            _refuse(f"updating metric {name!r}")
        wasi_metrics.counter_add(name, value, labels)

    def gauge_set(self, name: str, value: float, labels: list[tuple[str, str]]) -> None:
        if not self.serving:
            _refuse(f"updating metric {name!r}")
        wasi_metrics.gauge_set(name, value, labels)

    def histogram_buckets(self, name: str, buckets: list[float]) -> None:
        if not self.serving:
            _refuse(f"updating metric {name!r}")
        wasi_metrics.histogram_buckets(name, buckets)

    def histogram_observe(self, name: str, value: float, labels: list[tuple[str, str]]) -> None:
        if not self.serving:
            _refuse(f"updating metric {name!r}")
        wasi_metrics.histogram_observe(name, value, labels)

    def send(self, request: Any) -> Response:
        if not self.serving:
            _refuse(f"fetching {request.url}")
        return _block_on(_exchange(request))

    async def send_async(self, request: Any) -> Response:
        if not self.serving:
            _refuse(f"fetching {request.url}")
        return await _await_on(_exchange(request))


def _refuse(what: str) -> NoReturn:
    raise RuntimeError(
        f"berth: {what} at import time: the module's top level runs once, when "
        "componentize-py builds the component, where there is no host. "
        "Call it inside the handler."
    )


# Drivers.


def _block_on(steps: Steps[T]) -> T:
    """Runs ``steps``, blocking on each pollable it yields."""
    try:
        pollable = next(steps)
        while True:
            with pollable:
                pollable.block()
            pollable = steps.send(None)
    except StopIteration as done:
        return done.value
    finally:
        steps.close()


async def _await_on(steps: Steps[T]) -> T:
    """Runs ``steps`` in the request's loop, other tasks running while it
    waits."""
    loop = asyncio.get_running_loop()
    if not isinstance(loop, PollLoop):
        # Not in a handler's loop (nothing else can run in a component):
        # wait the simple way.
        return _block_on(steps)
    try:
        pollable = next(steps)
        while True:
            await loop.wait(pollable)
            pollable = steps.send(None)
    except StopIteration as done:
        return done.value
    finally:
        # On cancellation: unwind the steps, dropping their resources
        # children first (the pollable is already dropped by `wait`).
        steps.close()


def run_async(awaitable: Any) -> Any:
    """Runs an async handler's coroutine in a fresh loop."""
    loop = PollLoop(
        poll=poll.poll,
        timer=lambda seconds: monotonic_clock.subscribe_duration(max(0, round(seconds * 1e9))),
        clock=lambda: monotonic_clock.now() / 1e9,
        on_error=_log_async_error,
    )
    try:
        return loop.run_until_complete(awaitable)
    finally:
        loop.close()


def _log_async_error(context: dict[str, Any]) -> None:
    message = context.get("message", "asyncio error")
    exc = context.get("exception")
    if exc is not None:
        message += ":\n" + "".join(traceback.format_exception(exc))
    wasi_logging.log(wasi_logging.Level.ERROR, "berth", message)


# Bodies.


class _StreamFailed(Exception):
    pass


def _stream_error(error: Any) -> str:
    if isinstance(error, streams.StreamError_LastOperationFailed):
        return error.value.to_debug_string()
    return "the stream is closed"


def _read_body(body: types.IncomingBody) -> Steps[bytes]:
    chunks: list[bytes] = []
    with body.stream() as stream:
        while True:
            try:
                chunk = stream.read(READ_SIZE)
            except Err as e:
                if isinstance(e.value, streams.StreamError_Closed):
                    break
                raise _StreamFailed(_stream_error(e.value)) from None
            if chunk:
                chunks.append(chunk)
            else:
                yield stream.subscribe()
    # The stream (a child of the body) is dropped by now, as it must be.
    with types.IncomingBody.finish(body):
        pass
    return b"".join(chunks)


def _write_body(body: types.OutgoingBody, data: bytes) -> Steps[None]:
    with body.write() as stream:
        try:
            offset = 0
            while offset < len(data):
                permitted = stream.check_write()
                if permitted == 0:
                    yield stream.subscribe()
                    continue
                stream.write(data[offset : offset + permitted])
                offset += permitted
            stream.flush()
            # check-write gives 0 until the flush is done.
            while stream.check_write() == 0:
                yield stream.subscribe()
        except Err as e:
            raise _StreamFailed(_stream_error(e.value)) from None
    types.OutgoingBody.finish(body, None)


# Incoming requests.


def incoming_handler(handler: _serve.Handler) -> type:
    """The class componentize-py exports as ``wasi:http/incoming-handler``."""

    class IncomingHandler(exports.IncomingHandler):
        def handle(
            self, request: types.IncomingRequest, response_out: types.ResponseOutparam
        ) -> None:
            WasiHost.serving = True
            try:
                incoming = _read_request(request)
            except _StreamFailed as e:
                response = Response.error(400, f"cannot read the request body: {e}")
            else:
                response = _serve.respond(handler, incoming, run_async)
            _send_response(response, response_out)

    IncomingHandler.handler = staticmethod(handler)  # type: ignore[attr-defined]
    return IncomingHandler


def _method_name(method: types.Method) -> str:
    if isinstance(method, types.Method_Other):
        return method.value
    return type(method).__name__.removeprefix("Method_").upper()


def _read_request(request: types.IncomingRequest) -> Request:
    with request:
        method = _method_name(request.method())
        path = request.path_with_query() or "/"
        with request.headers() as fields:
            pairs = fields.entries()
        body = _block_on(_read_body(request.consume()))
    return _request_from_host(method, path, pairs, body)


def _send_response(response: Response, out: types.ResponseOutparam) -> None:
    fields = types.Fields()
    for name, value in response.headers.items():
        try:
            fields.append(name, value.encode("utf-8"))
        except Err as e:
            # A header the host forbids (e.g. `connection`) is dropped rather
            # than failing the whole response.
            wasi_logging.log(
                wasi_logging.Level.WARN,
                "berth",
                f"response header {name!r} dropped: {_describe(e.value)}",
            )
    outgoing = types.OutgoingResponse(fields)
    outgoing.set_status_code(response.status)
    body = outgoing.body()
    types.ResponseOutparam.set(out, Ok(outgoing))
    try:
        _block_on(_write_body(body, response.body))
    except _StreamFailed:
        # The client went away; the host counts and logs that.
        pass


# Outbound requests.


def _exchange(request: Any) -> Steps[Response]:
    url = request.url
    headers = request.headers.items()
    if request.body and "content-length" not in request.headers:
        # The body is known whole: say its length rather than have it sent
        # chunked, which some servers do not take in a request.
        headers.append(("content-length", str(len(request.body))))
    fields = types.Fields()
    for name, value in headers:
        try:
            fields.append(name, value.encode("utf-8"))
        except Err as e:
            raise InvalidRequest(url, f"header {name!r}: {_describe(e.value)}") from None
    outgoing = types.OutgoingRequest(fields)
    _set(
        url,
        "method",
        outgoing.set_method,
        _METHODS.get(request.method) or types.Method_Other(request.method),
    )
    _set(url, "scheme", outgoing.set_scheme, _scheme(request.scheme))
    _set(url, "authority", outgoing.set_authority, request.authority)
    _set(url, "path", outgoing.set_path_with_query, request.path_with_query)
    options = _options(request)
    body = outgoing.body()
    try:
        future = outgoing_handler.handle(outgoing, options)
    except Err as e:
        raise _fetch_error(url, e.value) from None
    try:
        yield from _write_body(body, request.body)
        unsent = None
    except _StreamFailed as e:
        # The host stopped reading: its answer (below) says why.
        unsent = str(e)
    with future:
        while (result := future.get()) is None:
            yield future.subscribe()
    if isinstance(result, Err):
        raise UpstreamError(url, "the response was already taken")
    if isinstance(result.value, Err):
        raise _fetch_error(url, result.value.value)
    if unsent is not None:
        raise UpstreamError(url, f"sending the request body failed: {unsent}")
    with result.value.value as response:
        status = response.status()
        with response.headers() as headers:
            pairs = headers.entries()
        try:
            data = yield from _read_body(response.consume())
        except _StreamFailed as e:
            raise UpstreamError(url, f"reading the response body failed: {e}") from None
    return _response_from_host(status, pairs, data)


def _set(url: str, what: str, setter: Any, value: Any) -> None:
    try:
        setter(value)
    except Err:
        raise InvalidRequest(url, f"the host refused the {what} of {_shown(url)}") from None


def _scheme(scheme: str) -> types.Scheme:
    if scheme == "http":
        return types.Scheme_Http()
    if scheme == "https":
        return types.Scheme_Https()
    return types.Scheme_Other(scheme)


def _options(request: Any) -> types.RequestOptions | None:
    if request.timeout is None and request.connect_timeout is None:
        return None
    options = types.RequestOptions()
    # A host that does not support a timeout refuses it; its own applies.
    if request.timeout is not None:
        nanos = round(request.timeout * 1e9)
        for setter in (options.set_first_byte_timeout, options.set_between_bytes_timeout):
            try:
                setter(nanos)
            except Err:
                pass
    if request.connect_timeout is not None:
        try:
            options.set_connect_timeout(round(request.connect_timeout * 1e9))
        except Err:
            pass
    return options


def _fetch_error(url: str, code: Any) -> FetchError:
    if isinstance(
        code, (types.ErrorCode_HttpRequestDenied, types.ErrorCode_DestinationIpProhibited)
    ):
        return Denied(url)
    if isinstance(code, types.ErrorCode_DestinationUnavailable):
        return Unavailable(url)
    if isinstance(code, _TIMEOUTS):
        return Timeout(url)
    return UpstreamError(url, _describe(code))


def _describe(variant: Any) -> str:
    """A WIT variant case as text: ``ErrorCode_ConnectionRefused()`` is
    ``connection refused``, ``ErrorCode_InternalError("x")`` is
    ``internal error: x``."""
    name = type(variant).__name__.partition("_")[2] or type(variant).__name__
    words = re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()
    value = getattr(variant, "value", None)
    if value is None:
        return words
    if dataclasses.is_dataclass(value):
        fields = ", ".join(
            f"{f.name}={getattr(value, f.name)}"
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None
        )
        return f"{words} ({fields})" if fields else words
    return f"{words}: {value}"
