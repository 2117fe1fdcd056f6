"""The transport interface: send each group its sorted rows, get the FFN outputs back.

Legend: N rows of a merged batch, sorted by (group, local slot); D hidden.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from expert_workers.errors import MoEServeError


@dataclass(frozen=True)
class Part:
    """Rows [start, end) of the batch go to `group`; `experts`/`counts` in that group's slot order."""

    group: int
    start: int
    end: int
    experts: tuple[int, ...]
    counts: tuple[int, ...]


@dataclass(frozen=True)
class Batch:
    """One dispatch. `groups` / `addresses`: the group handles and data-plane addresses of the routing
    table the batch was planned with; `parts` index these, not a transport's current lists (a table
    adopted while the batch is in flight renumbers the groups)."""

    layer: int
    x_ND: torch.Tensor
    parts: tuple[Part, ...]
    groups: Sequence[Any] = field(compare=False, repr=False)
    addresses: Sequence[str] = field(compare=False, repr=False)
    request_ids: tuple[str, ...] = ()
    # W3C traceparent of the dispatch span ('' when not traced); groups parent their compute span on it
    trace: str = ""
    # filled by the transport: "expert_s", the slowest group's compute seconds (where the path reports it)
    stats: dict = field(default_factory=dict, compare=False)


class TransportError(MoEServeError):
    """A path to the expert groups is broken; the router tries the next transport."""

    def __init__(self, *, transport: str, reason: str) -> None:
        self._set(f"transport {transport} failed: {reason}", transport=transport, reason=reason)


class GroupsDown(TransportError):
    """Expert groups died: the router plans again around them (other replicas) before any fallback.
    `hung`: they live but one of their batches computed past its compute_timeout_s."""

    def __init__(self, *, transport: str, groups: tuple[int, ...], reason: str, hung: bool = False) -> None:
        self._set(f"transport {transport}: expert groups {list(groups)} down: {reason}",
                  transport=transport, groups=tuple(groups), reason=reason, hung=bool(hung))


async def ping_answers(groups: Sequence[Any], timeout_s: float) -> list[Any]:
    """Every group's `ping`, concurrently: True (healthy), False (one of its batches computed past its
    limit), or the exception in place of an answer (dead, or none within `timeout_s`: stopped, cut off)."""
    pings = [asyncio.wait_for(g.ping.remote(), timeout=timeout_s) for g in groups]
    return await asyncio.gather(*pings, return_exceptions=True)


class Transport(ABC):
    """One way to reach the expert groups. `groups[i]` is group i's actor handle."""

    name: str = ""

    def __init__(self, groups: Sequence[Any], addresses: Sequence[str], device: str) -> None:
        self.groups = list(groups)
        self.addresses = list(addresses)
        self.device = device

    def available(self) -> bool:
        """False while the path is known broken (e.g. a collective group being rebuilt)."""
        return True

    def revive(self) -> None:
        """Every group answers pings again: a path broken while one was silent starts building again
        now, not at the next batch. Called on the event loop: must not block."""
        return None

    @abstractmethod
    async def dispatch(self, batch: Batch) -> torch.Tensor:
        """All parts, concurrently -> outputs (N, D) in the batch's row order. Raises TransportError."""

    def abandon(self, reason: str) -> None:
        """Groups stopped answering pings (the router then gives up the dispatches waiting on them); a
        path whose state may now be stuck (a collective half-way through a transfer) breaks itself
        here. Called on the event loop: must not block."""
        return None

    async def close(self) -> None:
        return None
