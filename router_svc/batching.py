"""Dynamic batching of a router's requests, per layer.

A batch of a layer leaves when its queued tokens reach `batch_max_tokens`; at once when no
batch of the layer is in flight (an idle router adds no wait); `batch_max_wait_us` after its
first request while fewer than `batch_max_in_flight` are; else when one in flight finishes
(requests that arrived meanwhile leave together: batching while busy).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine

import torch

from router_svc.config import DataPlaneConfig

Run = Callable[[int, list["Pending"]], Coroutine[Any, Any, None]]


@dataclass
class Pending:
    """One admitted request waiting for its batch's answer."""

    x_TD: torch.Tensor
    shape: tuple[int, ...]
    dtype: str
    token_ids: torch.Tensor | None
    return_routing: bool
    request_id: str
    future: asyncio.Future = field(repr=False)
    t_enq: float = field(default_factory=time.perf_counter)
    trace: str = ""
    # set once it waited for a live replica (failover 'wait'): its gate's assignments (kept, not gated
    # again) and the time.monotonic() past which it fails
    assignments: Any = field(default=None, repr=False)
    hold_until: float | None = None


def settle(reqs: list[Pending] | tuple[Pending, ...], e: BaseException) -> None:
    """Requests not answered yet end with `e` (cancelled, for a cancellation)."""
    for r in reqs:
        if not r.future.done():
            if isinstance(e, asyncio.CancelledError):
                r.future.cancel()
            else:
                r.future.set_exception(e)


class Batcher:
    """The per-layer queues, wait timers and in-flight counts; `run(layer, requests)` runs a batch
    and must call `done(layer)` when it ends, however it ends."""

    def __init__(self, config: DataPlaneConfig, run: Run) -> None:
        self.config = config
        self._run = run
        self._queues: dict[int, list[Pending]] = {}
        self._queued_tokens: dict[int, int] = {}
        self._timers: dict[int, asyncio.Handle] = {}
        self._in_flight: dict[int, int] = {}
        self._running: set[asyncio.Task] = set()
        self.peak_in_flight = 0

    def add(self, layer: int, p: Pending) -> Coroutine[Any, Any, None] | None:
        """Queue a request. A batch of this request alone that leaves at once is returned for the
        caller to run in its own task (one task and loop turn fewer on an idle router's path)."""
        self._queues.setdefault(layer, []).append(p)
        self._queued_tokens[layer] = self._queued_tokens.get(layer, 0) + p.x_TD.shape[0]
        in_flight = self._in_flight.get(layer, 0)
        if self._queued_tokens[layer] >= self.config.batch_max_tokens or not in_flight:
            return self.flush(layer, inline=len(self._queues[layer]) == 1)
        self._arm(layer)
        return None

    def requeue(self, layer: int, ps: list[Pending]) -> None:
        """Queue requests released together (those that waited for a live replica): they leave in as
        few batches as `batch_max_tokens` allows, with what else is queued, as added ones would."""
        for p in ps:
            self._queues.setdefault(layer, []).append(p)
            self._queued_tokens[layer] = self._queued_tokens.get(layer, 0) + p.x_TD.shape[0]
            if self._queued_tokens[layer] >= self.config.batch_max_tokens:
                self.flush(layer)
        if self._queues.get(layer):
            if self._in_flight.get(layer, 0):
                self._arm(layer)
            elif layer not in self._timers:
                # NOTE: on the next loop turn, not now: requests released by the same event (every
                # batch held for one group) are queued by then and leave in this batch.
                self._timers[layer] = asyncio.get_running_loop().call_soon(self.flush, layer)

    def _arm(self, layer: int) -> None:
        """Requests are queued behind a batch in flight: with room for another in flight, they leave
        `batch_max_wait_us` after the first (or at once for 0); else when one in flight finishes."""
        if self._in_flight.get(layer, 0) < self.config.batch_max_in_flight and layer not in self._timers:
            if self.config.batch_max_wait_us == 0:
                self.flush(layer)
            else:
                self._timers[layer] = asyncio.get_running_loop().call_later(self.config.batch_max_wait_us / 1e6, self.flush, layer)

    def close(self) -> None:
        """The router is going: queued requests are cancelled, batches running in their own tasks too
        (their requests end cancelled), and no timer lets another batch out."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for reqs in self._queues.values():
            settle(reqs, asyncio.CancelledError())
        self._queues.clear()
        self._queued_tokens.clear()
        for task in list(self._running):
            task.cancel()

    def flush(self, layer: int, inline: bool = False) -> Coroutine[Any, Any, None] | None:
        """Let the layer's queued requests out as one batch (a task, or returned when `inline`)."""
        timer = self._timers.pop(layer, None)
        if timer is not None:
            timer.cancel()
        reqs = self._queues.pop(layer, [])
        self._queued_tokens[layer] = 0
        if not reqs:
            return None
        self._in_flight[layer] = self._in_flight.get(layer, 0) + 1
        self.peak_in_flight = max(self.peak_in_flight, self._in_flight[layer])
        if inline:
            return self._run(layer, reqs)
        # NOTE: held here while it runs: the event loop keeps only weak references to tasks.
        task = asyncio.get_running_loop().create_task(self._run(layer, reqs))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return None

    def done(self, layer: int) -> None:
        """A batch of `layer` finished: what queued behind it goes now."""
        self._in_flight[layer] -= 1
        if self._queues.get(layer) and self._in_flight[layer] < self.config.batch_max_in_flight:
            self.flush(layer)
