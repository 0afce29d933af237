"""Which host the SDK's helpers talk to.

Inside a component built by componentize-py it is the Berth host, through
the generated ``wit_world`` bindings (``berth._wasi``). Outside WebAssembly
those bindings do not exist: there it is whatever a test installed
(``berth.testing.FakeHost``), else a stand-in whose every call says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ._message import Response
    from .http import OutgoingRequest


class Host(Protocol):
    """The capabilities of the ``berth:sdk/service`` world, as plain Python."""

    def config_get(self, key: str) -> str | None: ...

    def config_get_all(self) -> list[tuple[str, str]]: ...

    def log(self, level: str, context: str, message: str) -> None: ...

    def counter_add(self, name: str, value: int, labels: list[tuple[str, str]]) -> None: ...

    def gauge_set(self, name: str, value: float, labels: list[tuple[str, str]]) -> None: ...

    def histogram_buckets(self, name: str, buckets: list[float]) -> None: ...

    def histogram_observe(self, name: str, value: float, labels: list[tuple[str, str]]) -> None: ...

    def send(self, request: OutgoingRequest) -> Response: ...

    async def send_async(self, request: OutgoingRequest) -> Response: ...


class _Absent:
    """The host outside a component, when no test double is installed."""

    def __getattr__(self, name: str):
        raise RuntimeError(
            "berth: no host here: this code runs outside a Berth component. "
            "In unit tests, install a berth.testing.FakeHost first."
        )


try:
    # The runtime module exists only inside a component, and is importable
    # while componentize-py pre-initializes the app, so the bindings are
    # imported then and are part of the snapshot (componentize-py cannot
    # import modules later, at request time).
    import componentize_py_runtime  # noqa: F401
except ImportError:
    _wasi = None
    _current: Host = _Absent()  # type: ignore[assignment]
else:
    from . import _wasi  # type: ignore[no-redef]

    _current = _wasi.WasiHost()

#: Whether the SDK runs inside a component.
IN_COMPONENT = _wasi is not None


def current() -> Host:
    """The host calls go to now."""
    return _current


def install(host: Host | None) -> Host:
    """Makes ``host`` the one calls go to (``None``: the default again);
    returns the previous one."""
    global _current
    previous = _current
    if host is not None:
        _current = host
    elif _wasi is not None:
        _current = _wasi.WasiHost()
    else:
        _current = _Absent()  # type: ignore[assignment]
    return previous
