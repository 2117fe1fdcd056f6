"""router_svc.batching.Batcher on a real event loop: when a batch leaves, what goes in it, how many fly.

The batch runner here records each batch and finishes it when the test says so, standing in
for the router's dispatch (the queueing rules are the part under test; the router's batches
are checked end to end in tests/integration/test_dataplane.py).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from router_svc.batching import Batcher, Pending
from router_svc.config import DataPlaneConfig

pytestmark = pytest.mark.unit


class Runner:
    """Runs batches as the router would: each one waits until released, then calls done()."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, list[str]]] = []
        self.release: dict[int, asyncio.Event] = {}
        self.batcher: Batcher | None = None

    async def run(self, layer: int, reqs: list[Pending]) -> None:
        i = len(self.batches)
        self.batches.append((layer, [r.request_id for r in reqs]))
        self.release[i] = asyncio.Event()
        try:
            await self.release[i].wait()
            for r in reqs:
                r.future.set_result(i)
        finally:
            assert self.batcher is not None
            self.batcher.done(layer)


def _pending(rid: str, tokens: int = 2) -> Pending:
    return Pending(torch.zeros(tokens, 4), (tokens, 4), "float32", None, False, rid, asyncio.get_running_loop().create_future())


def _batcher(**config: int) -> tuple[Batcher, Runner]:
    runner = Runner()
    b = Batcher(DataPlaneConfig(**config), runner.run)
    runner.batcher = b
    return b, runner


async def _turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_an_idle_layer_hands_a_lone_request_its_batch_to_run_inline() -> None:
    async def main() -> None:
        b, runner = _batcher()
        p = _pending("a")
        alone = b.add(0, p)
        assert alone is not None and runner.batches == []  # nothing started until the caller runs it
        task = asyncio.ensure_future(alone)
        await _turns()
        assert runner.batches == [(0, ["a"])]
        runner.release[0].set()
        await task
        assert p.future.result() == 0 and b.peak_in_flight == 1
    asyncio.run(main())


def test_requests_arriving_while_a_batch_flies_leave_together_when_it_ends() -> None:
    async def main() -> None:
        b, runner = _batcher(batch_max_wait_us=0)
        first = asyncio.ensure_future(b.add(0, _pending("a")))  # type: ignore[arg-type]
        await _turns()
        later = [_pending(r) for r in "bcd"]
        assert all(b.add(0, p) is None for p in later)
        await _turns()
        assert runner.batches == [(0, ["a"])]  # batch_max_in_flight=1: the others wait
        runner.release[0].set()
        await first
        await _turns()
        assert runner.batches == [(0, ["a"]), (0, ["b", "c", "d"])]
        runner.release[1].set()
        assert await asyncio.gather(*(p.future for p in later)) == [1, 1, 1]
        assert b.peak_in_flight == 1
    asyncio.run(main())


def test_requests_released_together_leave_in_one_batch_or_behind_the_one_in_flight() -> None:
    """`requeue` (requests that waited for a live replica, released by one event): several calls in
    one loop turn on an idle layer make one batch; a full queue still leaves at batch_max_tokens;
    with a batch in flight they wait for it, as added requests do."""
    async def main() -> None:
        b, runner = _batcher(batch_max_tokens=8, batch_max_wait_us=10_000_000)
        b.requeue(0, [_pending("a"), _pending("b")])
        b.requeue(0, [_pending("c")])  # the same turn: joins
        assert runner.batches == []
        await _turns()
        assert runner.batches == [(0, ["a", "b", "c"])]
        b.requeue(0, [_pending(r) for r in "defgh"])  # 10 tokens: d..g fill a batch (8) at once; h waits
        await _turns()
        assert runner.batches[1:] == [(0, ["d", "e", "f", "g"])]
        runner.release[0].set()
        await _turns()
        assert len(runner.batches) == 2  # one still in flight (batch_max_in_flight=1)
        runner.release[1].set()
        await _turns()
        assert runner.batches[2:] == [(0, ["h"])]
        for e in runner.release.values():
            e.set()
        await _turns()
    asyncio.run(main())


def test_close_cancels_what_is_queued_and_running_and_lets_no_batch_out() -> None:
    async def main() -> None:
        b, runner = _batcher(batch_max_wait_us=10_000_000)
        running = asyncio.ensure_future(b.add(0, _pending("a")))  # type: ignore[arg-type]
        await _turns()
        queued = _pending("b")
        b.add(0, queued)
        released = _pending("c")
        b.requeue(1, [released])  # a flush due on the next turn, on an idle layer
        b.close()
        await _turns()
        assert queued.future.cancelled() and released.future.cancelled()
        assert runner.batches == [(0, ["a"])]  # nothing left after close
        running.cancel()  # an inline batch is its caller's: it ends with the caller's task
        await asyncio.gather(running, return_exceptions=True)
    asyncio.run(main())


def test_a_full_queue_leaves_at_once_and_layers_batch_apart() -> None:
    async def main() -> None:
        b, runner = _batcher(batch_max_tokens=5, batch_max_wait_us=10_000_000)
        asyncio.ensure_future(b.add(0, _pending("a")))  # type: ignore[arg-type]
        await _turns()
        b.add(0, _pending("b", tokens=2))
        asyncio.ensure_future(b.add(1, _pending("x")))  # type: ignore[arg-type]  # another layer is idle: its own batch
        await _turns()
        assert runner.batches == [(0, ["a"]), (1, ["x"])]
        b.add(0, _pending("c", tokens=3))  # 5 queued tokens: full, leaves beside the one in flight
        await _turns()
        assert runner.batches[-1] == (0, ["b", "c"]) and b.peak_in_flight == 2
        for e in runner.release.values():
            e.set()
        await _turns()
    asyncio.run(main())


def test_below_the_in_flight_limit_a_batch_leaves_after_the_wait() -> None:
    async def main() -> None:
        b, runner = _batcher(batch_max_in_flight=2, batch_max_wait_us=20_000)
        asyncio.ensure_future(b.add(0, _pending("a")))  # type: ignore[arg-type]
        await _turns()
        b.add(0, _pending("b"))
        b.add(0, _pending("c"))
        await _turns()
        assert len(runner.batches) == 1  # waiting for more, up to 20 ms
        for _ in range(500):  # the timer fires; bounded at 5 s on a loaded machine
            if len(runner.batches) == 2:
                break
            await asyncio.sleep(0.01)
        assert runner.batches == [(0, ["a"]), (0, ["b", "c"])] and b.peak_in_flight == 2
        for e in runner.release.values():
            e.set()
        await _turns()
    asyncio.run(main())


def test_a_failed_batch_still_frees_its_slot() -> None:
    async def main() -> None:
        b = None

        async def failing(layer: int, reqs: list[Pending]) -> None:
            try:
                raise RuntimeError("groups down")
            finally:
                assert b is not None
                b.done(layer)

        b = Batcher(DataPlaneConfig(), failing)
        with pytest.raises(RuntimeError):
            await b.add(0, _pending("a"))  # type: ignore[misc]
        nxt = b.add(0, _pending("b"))
        assert nxt is not None  # idle again: the next request runs at once
        with pytest.raises(RuntimeError):
            await nxt
    asyncio.run(main())
