"""The control plugin's settings: the ``[plugin.control]`` table, checked at set-up."""

from __future__ import annotations

from dataclasses import dataclass

from .plane import DEFAULT_MAX_SUBSCRIBERS, DEFAULT_SUBSCRIBER_IDLE_SECONDS

__all__ = ["ControlSettings"]


@dataclass(frozen=True)
class ControlSettings:
    """``[plugin.control]``; :class:`~planes.plugins.control.ControlPlugin` says what each key does."""

    read_only: bool = False
    keepalive_seconds: float = 15.0
    deltas: bool = True
    max_subscribers: int = DEFAULT_MAX_SUBSCRIBERS
    subscriber_idle_seconds: float = DEFAULT_SUBSCRIBER_IDLE_SECONDS
