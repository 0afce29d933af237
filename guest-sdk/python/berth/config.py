"""Configuration values set by the operator for this module:
``[modules.NAME.config]`` in ``berth.toml`` (each key overridable by an
environment variable on the host) and ``[modules.NAME.secrets]``, which the
host serves through the same store but never prints.

Read them inside the handler, not at import time: the module's top level
runs once, when componentize-py builds the component, where there is no
config.
"""

from __future__ import annotations

from . import _host

__all__ = ["get", "get_or", "get_all"]


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"config key must be str, not {type(key).__name__}")
    return key


def get(key: str) -> str | None:
    """The value of ``key``, or ``None`` when it is not set.

    Raises :class:`berth.ConfigError` (naming the key) when the host fails
    to read its config, which a missing key is not.
    """
    return _host.current().config_get(_check_key(key))


def get_or(key: str, default: str) -> str:
    """The value of ``key``, or ``default`` when it is not set."""
    value = get(key)
    return default if value is None else value


def get_all() -> list[tuple[str, str]]:
    """Every ``(key, value)`` pair, secrets included."""
    return _host.current().config_get_all()
