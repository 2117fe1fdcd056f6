"""Errors survive pickling (they cross Ray process boundaries) with their fields and message."""

from __future__ import annotations

import pickle

import pytest

from expert_workers.data_grpc import FrameError
from expert_workers.errors import (
    BackPressureError, CheckpointError, ConfigError, ExpertUnavailableError, InvalidRequestError,
)
from router_svc.transports.base import TransportError

pytestmark = pytest.mark.unit

CASES = [
    ConfigError(field="routing.top_k", value=9, expected="at most 8"),
    CheckpointError(path="/x", problem="missing tensor 'a'"),
    InvalidRequestError(field="layer", problem="layer 7 is not an MoE layer"),
    BackPressureError(limit="queued tokens", value=10, maximum=5),
    ExpertUnavailableError(layer=1, expert=3, reason="no replica"),
    TransportError(transport="rdt", reason="peer died"),
    FrameError(problem="short"),
]


@pytest.mark.parametrize("err", CASES, ids=lambda e: type(e).__name__)
def test_round_trip(err: Exception) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert back.__dict__ == err.__dict__
