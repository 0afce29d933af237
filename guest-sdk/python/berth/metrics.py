"""Metrics the module defines, exported by the host on its Prometheus
endpoint as ``berth_guest_<module>_<name>`` (counters get ``_total``)::

    ORDERS = Counter("orders")
    LOOKUP = Histogram("lookup_seconds")

    ORDERS.inc()
    ORDERS.add(2, labels={"kind": "book"})
    LOOKUP.observe(0.012)

Define them at the module's top level and update them in the handler.
Names and arguments are checked here, so a mistake fails in unit tests;
what only the host can judge (a change of label names, a series over the
operator's cap) is dropped and counted by the host, never an error here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from . import _host

__all__ = ["Counter", "Gauge", "Histogram"]

_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_U64_MAX = 2**64 - 1

Labels = Mapping[str, str]


def _name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"metric name must be str, not {type(name).__name__}")
    if not _NAME.match(name):
        raise ValueError(f"invalid metric name {name!r}: use [a-zA-Z_][a-zA-Z0-9_]*")
    return name


def _labels(metric: str, labels: Labels | None) -> list[tuple[str, str]]:
    if labels is None:
        return []
    if not isinstance(labels, Mapping):
        raise TypeError(
            f"{metric}: labels must be a dict of str to str, not {type(labels).__name__}"
        )
    pairs = []
    for key, value in labels.items():
        if not isinstance(key, str) or not _NAME.match(key):
            raise ValueError(f"{metric}: invalid label name {key!r}")
        if not isinstance(value, str):
            raise TypeError(
                f"{metric}: label {key!r} must be str, not {type(value).__name__} "
                "(convert it with str())"
            )
        pairs.append((key, value))
    return pairs


def _number(metric: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{metric}: value must be a number, not {type(value).__name__}")
    return float(value)


class Counter:
    """A counter: only goes up."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = _name(name)

    def inc(self, labels: Labels | None = None) -> None:
        """Adds one."""
        self.add(1, labels)

    def add(self, n: int, labels: Labels | None = None) -> None:
        """Adds ``n`` (a whole number, 0 or more)."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"{self.name}: a counter adds an int, not {type(n).__name__}")
        if not 0 <= n <= _U64_MAX:
            raise ValueError(f"{self.name}: a counter only goes up; cannot add {n}")
        _host.current().counter_add(self.name, n, _labels(self.name, labels))

    def __repr__(self) -> str:
        return f"Counter({self.name!r})"


class Gauge:
    """A gauge: a value that goes up and down."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = _name(name)

    def set(self, value: float, labels: Labels | None = None) -> None:
        """Sets the value."""
        _host.current().gauge_set(self.name, _number(self.name, value), _labels(self.name, labels))

    def __repr__(self) -> str:
        return f"Gauge({self.name!r})"


class Histogram:
    """A histogram of values (seconds, for durations).

    Its buckets are the host's latency buckets (0.5 ms to 30 s) unless
    ``buckets`` gives others: 1 to 64 finite upper bounds, strictly
    increasing (``+Inf`` is added). Bounds that differ from those the
    histogram already has on the host (from an earlier version of the
    module) are dropped and counted by the host, which keeps its own.
    """

    __slots__ = ("name", "buckets", "_told")

    def __init__(self, name: str, buckets: Sequence[float] | None = None) -> None:
        self.name = _name(name)
        self.buckets: list[float] | None = None
        if buckets is not None:
            bounds = [_number(name, b) for b in buckets]
            if not 1 <= len(bounds) <= 64:
                raise ValueError(f"{name}: a histogram has 1 to 64 buckets, not {len(bounds)}")
            if not all(math.isfinite(b) for b in bounds):
                raise ValueError(f"{name}: bucket bounds must be finite (+Inf is added)")
            if any(a >= b for a, b in zip(bounds, bounds[1:])):
                raise ValueError(f"{name}: bucket bounds must be strictly increasing")
            self.buckets = bounds
        # The host this histogram told its buckets to. Each request runs in
        # a fresh instance (WASI 0.2), so in a component it tells them once
        # per request, as the Rust SDK does; a unit test's new FakeHost is
        # told again.
        self._told: object = None

    def observe(self, value: float, labels: Labels | None = None) -> None:
        """Records a value."""
        value = _number(self.name, value)
        pairs = _labels(self.name, labels)
        host = _host.current()
        if self.buckets is not None and self._told is not host:
            host.histogram_buckets(self.name, self.buckets)
            self._told = host
        host.histogram_observe(self.name, value, pairs)

    def __repr__(self) -> str:
        return f"Histogram({self.name!r})"
