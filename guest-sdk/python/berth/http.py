"""Outbound HTTP. Every call goes through the host, which applies the
module's ``allowed_outbound_hosts``, timeouts, retries and circuit breaker;
a destination the operator has not allowed fails fast with :class:`Denied`.

    stock = berth.http.get("http://inventory.default.svc:8080/stock/42")
    created = berth.http.post("http://orders.default.svc:8080/orders", json={"sku": 42})
    created.status, created.json_body()

The whole response is read before the call returns. In an ``async def``
handler, the ``*_async`` variants let calls run at the same time::

    a, b = await asyncio.gather(berth.http.get_async(url_a), berth.http.get_async(url_b))

Failures raise a :class:`FetchError`: :class:`Denied`, :class:`Timeout`,
:class:`Unavailable`, :class:`UpstreamError`, or :class:`InvalidRequest`
for a URL, method or header that is not valid. An answer with an error
status (404, 500, ...) is not an exception: check ``response.status``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import _host
from ._errors import (
    Denied,
    FetchError,
    InvalidRequest,
    Timeout,
    Unavailable,
    UpstreamError,
    _shown,
)
from ._message import (
    _MISSING,
    BodyLike,
    Headers,
    HeadersLike,
    Response,
    _body_bytes,
    _dumps,
    _method,
)

__all__ = [
    "fetch",
    "get",
    "post",
    "put",
    "delete",
    "fetch_async",
    "get_async",
    "post_async",
    "OutgoingRequest",
    "build_request",
    "FetchError",
    "Denied",
    "Timeout",
    "Unavailable",
    "UpstreamError",
    "InvalidRequest",
]


@dataclass
class OutgoingRequest:
    """An outbound request, checked and ready to send: what a
    ``berth.testing.FakeHost`` records and hands to its fakes."""

    method: str
    url: str
    scheme: str
    #: ``host`` or ``host:port``.
    authority: str
    #: The path and query: ``/x/y?z=1``.
    path_with_query: str
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    #: Seconds to the first byte, and between bytes, if shorter than the host's.
    timeout: float | None = None
    #: Seconds to connect, if shorter than the host's.
    connect_timeout: float | None = None


def split_url(url: str) -> tuple[str, str, str]:
    """``http://host:port/path?q`` as ``(scheme, authority, path_with_query)``;
    a fragment is dropped. Raises :class:`InvalidRequest`."""
    if not isinstance(url, str):
        raise TypeError(f"url must be str, not {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        raise InvalidRequest(url, f"{_shown(url)!r} has no scheme (http:// or https://)")
    rest = rest.partition("#")[0]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if not authority:
        raise InvalidRequest(url, f"{_shown(url)!r} has no host")
    if any(c.isspace() for c in url):
        raise InvalidRequest(url, f"{_shown(url)!r} contains whitespace")
    if not path.startswith("/"):
        path = "/" + path
    return scheme.lower(), authority, path


def _seconds(url: str, what: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidRequest(url, f"{what} must be a positive number of seconds, not {value!r}")
    return float(value)


def build_request(
    url: str,
    *,
    method: str = "GET",
    headers: HeadersLike | None = None,
    body: BodyLike | None = None,
    json: Any = _MISSING,
    timeout: float | None = None,
    connect_timeout: float | None = None,
) -> OutgoingRequest:
    """Checks and builds an outbound request, without sending it."""
    scheme, authority, path = split_url(url)
    try:
        method = _method(method)
        fields = Headers(headers)
        payload = b"" if body is None else _body_bytes(body)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(url, str(e)) from None
    if json is not _MISSING:
        if body is not None:
            raise InvalidRequest(url, "give body or json, not both")
        payload = _dumps(json)
        fields.setdefault("content-type", "application/json")
    return OutgoingRequest(
        method=method,
        url=url,
        scheme=scheme,
        authority=authority,
        path_with_query=path,
        headers=fields,
        body=payload,
        timeout=_seconds(url, "timeout", timeout),
        connect_timeout=_seconds(url, "connect_timeout", connect_timeout),
    )


def fetch(
    url: str,
    *,
    method: str = "GET",
    headers: HeadersLike | None = None,
    body: BodyLike | None = None,
    json: Any = _MISSING,
    timeout: float | None = None,
    connect_timeout: float | None = None,
) -> Response:
    """Sends a request and reads the whole response.

    ``json=`` sends a JSON body (and its content type) instead of
    ``body=``. ``timeout`` (to the first byte, and between bytes) and
    ``connect_timeout`` are seconds, and only shorten the host's limits.
    """
    outgoing = build_request(
        url,
        method=method,
        headers=headers,
        body=body,
        json=json,
        timeout=timeout,
        connect_timeout=connect_timeout,
    )
    return _host.current().send(outgoing)


async def fetch_async(
    url: str,
    *,
    method: str = "GET",
    headers: HeadersLike | None = None,
    body: BodyLike | None = None,
    json: Any = _MISSING,
    timeout: float | None = None,
    connect_timeout: float | None = None,
) -> Response:
    """:func:`fetch` for ``async def`` handlers: other tasks run while it waits."""
    outgoing = build_request(
        url,
        method=method,
        headers=headers,
        body=body,
        json=json,
        timeout=timeout,
        connect_timeout=connect_timeout,
    )
    return await _host.current().send_async(outgoing)


def get(url: str, **kwargs: Any) -> Response:
    """``GET url``; keyword arguments as for :func:`fetch`."""
    return fetch(url, method="GET", **kwargs)


def post(url: str, **kwargs: Any) -> Response:
    """``POST url``, e.g. ``post(url, json={...})``."""
    return fetch(url, method="POST", **kwargs)


def put(url: str, **kwargs: Any) -> Response:
    """``PUT url``."""
    return fetch(url, method="PUT", **kwargs)


def delete(url: str, **kwargs: Any) -> Response:
    """``DELETE url``."""
    return fetch(url, method="DELETE", **kwargs)


async def get_async(url: str, **kwargs: Any) -> Response:
    """``GET url``, for ``async def`` handlers."""
    return await fetch_async(url, method="GET", **kwargs)


async def post_async(url: str, **kwargs: Any) -> Response:
    """``POST url``, for ``async def`` handlers."""
    return await fetch_async(url, method="POST", **kwargs)
