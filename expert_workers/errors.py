"""The one exceptions module of moe-serve.

Every error the service raises on purpose derives from `MoEServeError`. Subclasses
take keyword-only arguments so a message always names what was wrong. The gRPC
servicer maps them to status codes in exactly one place.
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type, kwargs: dict[str, Any]) -> "MoEServeError":
    return cls(**kwargs)


class MoEServeError(Exception):
    """Base of every deliberate moe-serve error.

    NOTE: errors cross process boundaries (Ray tasks, actors); pickle rebuilds an
    exception from its positional args, which keyword-only subclasses lack, so each
    subclass records its keyword arguments with `_set` and `__reduce__` replays them.
    """

    _kwargs: dict[str, Any] = {}

    def _set(self, message: str, **kwargs: Any) -> None:
        for key, value in kwargs.items():
            setattr(self, key, value)
        self._kwargs = kwargs
        Exception.__init__(self, message)

    def __reduce__(self) -> Any:
        if not self._kwargs:
            return super().__reduce__()
        return (_rebuild, (type(self), self._kwargs))


class ConfigError(MoEServeError, ValueError):
    """A configuration field holds a value it may not hold."""

    def __init__(self, *, field: str, value: Any, expected: str) -> None:
        self._set(
            f"config field '{field}' = {value!r}: expected {expected}",
            field=field, value=value, expected=expected,
        )


class CheckpointError(MoEServeError, ValueError):
    """A checkpoint is missing, incomplete, malformed or of an unknown family."""

    def __init__(self, *, path: str, problem: str) -> None:
        self._set(
            f"checkpoint {path}: {problem}",
            path=path, problem=problem,
        )


class InvalidRequestError(MoEServeError, ValueError):
    """A forward request is malformed (shape, dtype, layer, token ids, values)."""

    def __init__(self, *, field: str, problem: str) -> None:
        self._set(
            f"invalid request field '{field}': {problem}",
            field=field, problem=problem,
        )


class BackPressureError(MoEServeError):
    """The service is over its admission limits; the caller may retry later."""

    def __init__(self, *, limit: str, value: int, maximum: int) -> None:
        self._set(
            f"{limit}: {value} exceeds the limit of {maximum}",
            limit=limit, value=value, maximum=maximum,
        )


class ExpertUnavailableError(MoEServeError):
    """No live replica can serve an expert and the failover policy is 'fail'."""

    def __init__(self, *, layer: int, expert: int, reason: str) -> None:
        self._set(
            f"expert (layer {layer}, expert {expert}) unavailable: {reason}",
            layer=layer, expert=expert, reason=reason,
        )
