"""What can go wrong in a module's calls to the host, and how a handler
answers with an error status."""

from __future__ import annotations


class BerthError(Exception):
    """Base class of every error the SDK raises."""


class HttpError(BerthError):
    """Raise it from a handler to answer ``status`` with the JSON body
    ``{"error": message}``.

    ``raise berth.HttpError(404, "no such order")`` is the same as returning
    ``berth.Response.error(404, "no such order")``.
    """

    status: int = 500

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


class JsonError(HttpError, ValueError):
    """A body is not the JSON that was expected.

    :meth:`berth.Request.json` raises it with status 400 (the client sent
    it), :meth:`berth.Response.json_body` with 502 (an upstream sent it), so
    a handler that does not catch it answers with the right status.
    """


class ConfigError(BerthError):
    """The host failed to read configuration (not a missing key: that is
    ``None``)."""

    def __init__(self, key: str | None, reason: str) -> None:
        what = f"reading {key!r}" if key is not None else "listing the keys"
        super().__init__(f"config store failed {what}: {reason}")
        self.key = key
        self.reason = reason


def _shown(url: str) -> str:
    """A URL as error text shows it: no userinfo, query or fragment. That
    text reaches clients (an uncaught FetchError is the 502 body) and logs,
    and secrets ride in queries (``?api_key=``) and userinfo."""
    url = url.split("#", 1)[0].split("?", 1)[0]
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


class FetchError(HttpError):
    """An outbound request failed. Uncaught in a handler, it answers 502
    (504 for :class:`Timeout`) with its message."""

    default_status = 502

    def __init__(self, url: str, message: str) -> None:
        super().__init__(self.default_status, message)
        self.url = url


class Denied(FetchError):
    """The host's outbound policy refused the call: the destination is not in
    the module's ``allowed_outbound_hosts``."""

    def __init__(self, url: str) -> None:
        super().__init__(
            url,
            f"outbound request to {_shown(url)} denied by the host: "
            "its destination is not in this module's allowed_outbound_hosts",
        )


class Timeout(FetchError, TimeoutError):
    """The call did not finish within the host's (or the request's) timeout."""

    default_status = 504

    def __init__(self, url: str) -> None:
        super().__init__(url, f"outbound request to {_shown(url)} timed out")


class Unavailable(FetchError):
    """The host is failing calls to this upstream fast: its circuit breaker is
    open after repeated failures."""

    def __init__(self, url: str) -> None:
        super().__init__(
            url,
            f"outbound request to {_shown(url)} failed fast: "
            "the upstream is failing and its circuit is open",
        )


class UpstreamError(FetchError):
    """The upstream could not be reached or answered badly; ``reason`` is the
    ``wasi:http`` error code as text (``connection refused``, ...)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(url, f"outbound request to {_shown(url)} failed: {reason}")
        self.reason = reason


class InvalidRequest(FetchError, ValueError):
    """The URL, method or a header of an outbound request is not valid: a bug
    in the module, so uncaught it answers 500."""

    default_status = 500

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(url, f"invalid outbound request: {problem}")
        self.problem = problem
