"""The one exceptions module of moe-serve.

Every error the service raises on purpose derives from `MoEServeError`. Subclasses
take keyword-only arguments so a message always names what was wrong. The gRPC
servicer maps them to status codes in exactly one place.
"""

from __future__ import annotations

from typing import Any


class MoEServeError(Exception):
    """Base of every deliberate moe-serve error."""


class ConfigError(MoEServeError, ValueError):
    """A configuration field holds a value it may not hold."""

    def __init__(self, *, field: str, value: Any, expected: str) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"config field '{field}' = {value!r}: expected {expected}")


class CheckpointError(MoEServeError, ValueError):
    """A checkpoint is missing, incomplete, malformed or of an unknown family."""

    def __init__(self, *, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"checkpoint {path}: {problem}")


class InvalidRequestError(MoEServeError, ValueError):
    """A forward request is malformed (shape, dtype, layer, token ids, values)."""

    def __init__(self, *, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"invalid request field '{field}': {problem}")


class BackPressureError(MoEServeError):
    """The service is over its admission limits; the caller may retry later."""

    def __init__(self, *, limit: str, value: int, maximum: int) -> None:
        self.limit = limit
        self.value = value
        self.maximum = maximum
        super().__init__(f"{limit}: {value} exceeds the limit of {maximum}")


class ExpertUnavailableError(MoEServeError):
    """No live replica can serve an expert and the failover policy is 'fail'."""

    def __init__(self, *, layer: int, expert: int, reason: str) -> None:
        self.layer = layer
        self.expert = expert
        self.reason = reason
        super().__init__(f"expert (layer {layer}, expert {expert}) unavailable: {reason}")
