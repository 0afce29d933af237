"""Requests, responses and their headers: plain Python objects, with no WIT
types in them, so handlers can be built and tested outside WebAssembly."""

from __future__ import annotations

import json as _json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Union
from urllib.parse import parse_qsl

from ._errors import JsonError

#: What may be given as headers: a ``Headers``, a dict, or ``(name, value)``
#: pairs (which may repeat a name).
HeadersLike = Union["Headers", Mapping[str, str], Iterable[tuple[str, str]]]

#: What may be given as a body: bytes, or text (sent as UTF-8).
BodyLike = Union[bytes, bytearray, memoryview, str]

# RFC 9110 token characters, for header names and methods.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Header values may not carry line breaks or NUL (header injection).
_BAD_VALUE = re.compile(r"[\r\n\x00]")

_MISSING: Any = object()


def _header_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"header name must be str, not {type(name).__name__}: {name!r}")
    if not _TOKEN.match(name):
        raise ValueError(f"invalid header name {name!r}")
    return name.lower()


def _header_value(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"header {name!r}: value must be str, not {type(value).__name__} "
            f"(convert it with str())"
        )
    if _BAD_VALUE.search(value):
        raise ValueError(f"header {name!r}: value contains a line break or NUL")
    return value


class Headers:
    """HTTP headers: names are case-insensitive (kept in lower case), a name
    may have several values, and the order is kept.

    Indexing and :meth:`get` give the first value of a name;
    :meth:`get_all` gives every one; :meth:`items` gives every pair.
    """

    __slots__ = ("_items",)

    def __init__(self, headers: HeadersLike | None = None) -> None:
        self._items: list[tuple[str, str]] = []
        if headers is None:
            return
        if isinstance(headers, Headers):
            self._items = list(headers._items)
            return
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        for pair in pairs:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise TypeError(f"headers must be (name, value) pairs, not {pair!r}")
            self.add(*pair)

    def add(self, name: str, value: str) -> None:
        """Adds a value, keeping those the name already has."""
        key = _header_name(name)
        self._items.append((key, _header_value(key, value)))

    def set(self, name: str, value: str) -> None:
        """Sets the only value of ``name``."""
        key = _header_name(name)
        value = _header_value(key, value)
        self._items = [(k, v) for k, v in self._items if k != key]
        self._items.append((key, value))

    def setdefault(self, name: str, value: str) -> str:
        """The first value of ``name``, after setting it to ``value`` if it has none."""
        current = self.get(name)
        if current is None:
            self.add(name, value)
            return value
        return current

    def remove(self, name: str) -> None:
        """Removes every value of ``name`` (nothing if it has none)."""
        key = name.lower()
        self._items = [(k, v) for k, v in self._items if k != key]

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``, or ``default``."""
        key = name.lower()
        for k, v in self._items:
            if k == key:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in order."""
        key = name.lower()
        return [v for k, v in self._items if k == key]

    def items(self) -> list[tuple[str, str]]:
        """Every ``(name, value)`` pair, in order, names in lower case."""
        return list(self._items)

    def keys(self) -> list[str]:
        """The distinct names, in order of first appearance."""
        return list(dict.fromkeys(k for k, _ in self._items))

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __setitem__(self, name: str, value: str) -> None:
        self.set(name, value)

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self.remove(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return self._items == other._items
        return NotImplemented

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


def _body_bytes(body: object) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    raise TypeError(
        f"body must be bytes or str, not {type(body).__name__} "
        "(use Response.json(...) or json= for objects)"
    )


def _dumps(value: Any) -> bytes:
    # Compact, UTF-8 and strict (no NaN), like serde_json in the Rust SDK.
    return _json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
        "utf-8"
    )


def _loads(body: bytes, what: str, status: int) -> Any:
    if not body.strip():
        raise JsonError(status, f"{what} is empty, expected JSON")
    try:
        return _json.loads(body)
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError
        raise JsonError(status, f"{what} is not valid JSON: {e}") from None


def _method(method: object) -> str:
    if not isinstance(method, str):
        raise TypeError(f"method must be str, not {type(method).__name__}")
    if not _TOKEN.match(method):
        raise ValueError(f"invalid method {method!r}")
    return method.upper()


class Request:
    """An incoming HTTP request, its body read.

    Build one by hand to test a handler::

        Request("GET", "/hello?name=Ada")
        Request("POST", "/orders", json={"sku": 42})
        Request("PUT", "/notes/7", headers={"content-type": "text/plain"}, body="hi")
    """

    __slots__ = ("method", "path", "query_string", "headers", "body", "_query")

    def __init__(
        self,
        method: str = "GET",
        url: str = "/",
        *,
        headers: HeadersLike | None = None,
        body: BodyLike = b"",
        json: Any = _MISSING,
    ) -> None:
        if not isinstance(url, str):
            raise TypeError(f"url must be str, not {type(url).__name__}")
        path, _, query = url.partition("?")
        #: The method in upper case: ``GET``, ``POST``, ...
        self.method: str = _method(method)
        #: The path, without the query string, as the client sent it
        #: (percent-encoded, route prefix included).
        self.path: str = path or "/"
        #: The raw query string, without ``?`` (``""`` when there is none).
        self.query_string: str = query
        #: The headers, names in lower case.
        self.headers: Headers = Headers(headers)
        #: The body bytes.
        self.body: bytes = _body_bytes(body)
        self._query: dict[str, str] | None = None
        if json is not _MISSING:
            if body:
                raise ValueError("give body or json, not both")
            self.body = _dumps(json)
            self.headers.setdefault("content-type", "application/json")

    @property
    def query(self) -> dict[str, str]:
        """The query parameters, percent-decoded (``+`` is a space); a name
        given twice keeps its first value (see :attr:`query_items`)."""
        if self._query is None:
            query: dict[str, str] = {}
            for name, value in self.query_items:
                query.setdefault(name, value)
            self._query = query
        return self._query

    @property
    def query_items(self) -> list[tuple[str, str]]:
        """Every query parameter as ``(name, value)``, in order, decoded."""
        return parse_qsl(self.query_string, keep_blank_values=True)

    @property
    def segments(self) -> list[str]:
        """The non-empty parts of the path: ``/api/items/7`` gives
        ``["api", "items", "7"]``."""
        return [s for s in self.path.split("/") if s]

    def text(self) -> str:
        """The body as text (UTF-8; invalid bytes become U+FFFD)."""
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON. Raises :class:`berth.JsonError` (status
        400) when it is empty or not JSON; uncaught, it answers 400."""
        return _loads(self.body, "request body", 400)

    def __repr__(self) -> str:
        query = f"?{self.query_string}" if self.query_string else ""
        return f"<Request {self.method} {self.path}{query} ({len(self.body)} bytes)>"


class Response:
    """An HTTP response: what a handler returns, and what an outbound call
    (:mod:`berth.http`) gets back.

    ``Response(body, status=200, headers=None)``, or one of the
    constructors :meth:`json`, :meth:`text`, :meth:`error`,
    :meth:`not_found`. Headers can be changed afterwards through
    :attr:`headers`.
    """

    __slots__ = ("_status", "headers", "body")

    def __init__(
        self,
        body: BodyLike = b"",
        status: int = 200,
        headers: HeadersLike | None = None,
    ) -> None:
        self.status = status
        #: The headers, names in lower case.
        self.headers: Headers = Headers(headers)
        #: The body bytes.
        self.body: bytes = _body_bytes(body)

    @property
    def status(self) -> int:
        """The status code, 100 to 599."""
        return self._status

    @status.setter
    def status(self, status: int) -> None:
        if not isinstance(status, int) or isinstance(status, bool):
            raise TypeError(f"status must be int, not {type(status).__name__}")
        if not 100 <= status <= 599:
            raise ValueError(f"status must be 100 to 599, not {status}")
        self._status = status

    @classmethod
    def json(cls, value: Any, status: int = 200, headers: HeadersLike | None = None) -> Response:
        """``value`` as a JSON body (compact, UTF-8), with
        ``content-type: application/json``. Raises ``TypeError`` for what JSON
        cannot hold and ``ValueError`` for NaN or infinity."""
        response = cls(_dumps(value), status, headers)
        response.headers.setdefault("content-type", "application/json")
        return response

    @classmethod
    def text(cls, text: str, status: int = 200, headers: HeadersLike | None = None) -> Response:
        """A ``text/plain`` UTF-8 body."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        response = cls(text, status, headers)
        response.headers.setdefault("content-type", "text/plain; charset=utf-8")
        return response

    @classmethod
    def error(cls, status: int, message: str) -> Response:
        """An error with a small JSON body: ``{"error": message}``."""
        return cls.json({"error": message}, status)

    @classmethod
    def not_found(cls) -> Response:
        """404 with ``{"error": "not found"}``."""
        return cls.error(404, "not found")

    @property
    def ok(self) -> bool:
        """Whether the status is 2xx."""
        return 200 <= self._status <= 299

    def text_body(self) -> str:
        """The body as text (UTF-8; invalid bytes become U+FFFD)."""
        return self.body.decode("utf-8", errors="replace")

    def json_body(self) -> Any:
        """The body parsed as JSON. Raises :class:`berth.JsonError` (status
        502: this is usually an upstream's answer) when it is not JSON."""
        return _loads(self.body, "response body", 502)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Response):
            return (self._status, self.headers, self.body) == (
                other._status,
                other.headers,
                other.body,
            )
        return NotImplemented

    def __repr__(self) -> str:
        return f"<Response {self._status} ({len(self.body)} bytes)>"


# Built from what the host hands over: its names, methods and statuses are
# valid HTTP already, so they are taken as they are rather than checked
# again (and a value with bytes that are not UTF-8 does not fail a request).


def _host_headers(pairs: Iterable[tuple[str, bytes]]) -> Headers:
    headers = Headers()
    headers._items = [(k.lower(), v.decode("utf-8", errors="replace")) for k, v in pairs]
    return headers


def _request_from_host(
    method: str, path_with_query: str, pairs: Iterable[tuple[str, bytes]], body: bytes
) -> Request:
    request = Request.__new__(Request)
    path, _, query = path_with_query.partition("?")
    request.method = method.upper()
    request.path = path or "/"
    request.query_string = query
    request.headers = _host_headers(pairs)
    request.body = body
    request._query = None
    return request


def _response_from_host(status: int, pairs: Iterable[tuple[str, bytes]], body: bytes) -> Response:
    response = Response.__new__(Response)
    response._status = status
    response.headers = _host_headers(pairs)
    response.body = body
    return response
