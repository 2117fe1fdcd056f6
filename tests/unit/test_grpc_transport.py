"""router_svc.transports.GrpcTransport against live data-plane servers on 127.0.0.1.

The servers run the real frame protocol with a handler standing in for an expert group
(each row times its expert's id plus one), so every answer says which frame it belongs to:
concurrent batches on one stream must each get their own rows back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest
import torch

from expert_workers import data_grpc, wire
from expert_workers.errors import InvalidRequestError
from router_svc.transports import Batch, GrpcTransport, Part, TransportError

pytestmark = pytest.mark.unit


class FakeGroup:
    """A data-plane handler: rows of expert e come back times (e + 1); `delay_s` per frame; `gate` holds frames."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.frames = 0
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, header: dict[str, Any], payload: memoryview) -> tuple[dict[str, Any], Any]:
        self.gate.wait(30)
        self.frames += 1
        if header.get("layer") == 99:
            raise InvalidRequestError(field="layer", problem="this group hosts no slot of layer 99")
        x = wire.from_bytes(payload, header["dtype"], header["shape"])
        scale = torch.repeat_interleave(torch.tensor([e + 1.0 for e in header["experts"]]), torch.tensor(header["counts"]))
        time.sleep(self.delay_s)
        data, name, shape = wire.to_bytes(x * scale[:, None])
        return {"dtype": name, "shape": list(shape), "compute_s": self.delay_s}, data


def _batch(addresses: list[str], x: torch.Tensor, layer: int = 0) -> tuple[Batch, torch.Tensor]:
    """Rows split over two groups (at `addresses`): group 0 experts (0, 2), group 1 expert 1; and the expected answer."""
    n = x.shape[0]
    a, b = n // 3, 2 * n // 3
    parts = (Part(group=0, start=0, end=b, experts=(0, 2), counts=(a, b - a)), Part(group=1, start=b, end=n, experts=(1,), counts=(n - b,)))
    scale = torch.cat([torch.full((a,), 1.0), torch.full((b - a,), 3.0), torch.full((n - b,), 2.0)])
    return Batch(layer=layer, x_ND=x, parts=parts, groups=(None, None), addresses=tuple(addresses)), x * scale[:, None]


class Servers:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.handlers = [FakeGroup(delay_s), FakeGroup(delay_s)]
        self.servers, self.addresses = [], []
        for h in self.handlers:
            server, port = data_grpc.serve(h, host="127.0.0.1", port=0, workers=4)
            self.servers.append(server)
            self.addresses.append(f"127.0.0.1:{port}")

    def stop(self) -> None:
        for s in self.servers:
            s.stop(grace=None)


@pytest.fixture
def servers() -> Any:
    s = Servers(delay_s=0.002)
    yield s
    s.stop()


def test_concurrent_batches_on_one_stream_each_get_their_own_rows(servers: Servers) -> None:
    async def main() -> None:
        t = GrpcTransport([None, None], servers.addresses, "cpu")
        try:
            gen = torch.Generator().manual_seed(0)
            batches = [_batch(servers.addresses, torch.randn(3 + i % 7, 5, generator=gen)) for i in range(48)]
            outs = await asyncio.gather(*(t.dispatch(b) for b, _ in batches))
            for (b, want), got in zip(batches, outs):
                assert torch.equal(got, want)
            assert len(t._streams) == 2  # one stream per group carried all 48 batches
            assert all(b.stats["expert_s"] == pytest.approx(0.002) for b, _ in batches)
        finally:
            await t.close()

    asyncio.run(main())
    assert [h.frames for h in servers.handlers] == [48, 48]


def test_a_refused_batch_is_invalid_request_and_the_stream_keeps_serving(servers: Servers) -> None:
    async def main() -> None:
        t = GrpcTransport([None, None], servers.addresses, "cpu")
        try:
            bad, _ = _batch(servers.addresses, torch.ones(6, 4), layer=99)
            with pytest.raises(InvalidRequestError, match="this group hosts no slot of layer 99"):
                await t.dispatch(bad)
            good, want = _batch(servers.addresses, torch.ones(6, 4))
            assert torch.equal(await t.dispatch(good), want)
            assert all(s.broken is None for s in t._streams.values())
        finally:
            await t.close()

    asyncio.run(main())


def test_a_batch_whose_caller_goes_away_does_not_shift_the_next_answers(servers: Servers) -> None:
    async def main() -> None:
        t = GrpcTransport([None, None], servers.addresses, "cpu")
        try:
            for h in servers.handlers:
                h.gate.clear()
            first, _ = _batch(servers.addresses, torch.full((6, 4), 7.0))
            task = asyncio.create_task(t.dispatch(first))
            await asyncio.sleep(0.05)
            task.cancel()
            for h in servers.handlers:
                h.gate.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            for i in range(5):
                b, want = _batch(servers.addresses, torch.full((6, 4), float(i)))
                assert torch.equal(await t.dispatch(b), want)
        finally:
            await t.close()

    asyncio.run(main())


def test_a_dead_group_fails_its_waiting_batches_and_a_new_stream_serves_after(caplog: pytest.LogCaptureFixture) -> None:
    s = Servers(delay_s=0.0)
    try:
        async def main() -> None:
            t = GrpcTransport([None, None], s.addresses, "cpu")
            try:
                b, want = _batch(s.addresses, torch.ones(6, 4))
                assert torch.equal(await t.dispatch(b), want)
                s.handlers[1].gate.clear()  # group 1 holds the next frame, then goes away
                pending = asyncio.create_task(t.dispatch(b))
                await asyncio.sleep(0.1)
                s.servers[1].stop(grace=None)
                s.handlers[1].gate.set()
                with pytest.raises(TransportError, match="grpc"):
                    await asyncio.wait_for(pending, 20)
                with pytest.raises(TransportError):
                    await asyncio.wait_for(t.dispatch(b), 20)  # nothing listens at the address now
                # the group is back at a new address (a new routing table): the dead stream is dropped
                server, port = data_grpc.serve(s.handlers[1], host="127.0.0.1", port=0, workers=4)
                s.servers[1] = server
                old = s.addresses[1]
                t.addresses = [s.addresses[0], f"127.0.0.1:{port}"]
                b, want = _batch(t.addresses, torch.ones(6, 4))
                assert torch.equal(await t.dispatch(b), want)
                assert old not in t._streams
            finally:
                await t.close()

        with caplog.at_level(logging.CRITICAL):
            asyncio.run(main())
    finally:
        s.stop()


def test_a_batch_in_flight_to_a_retired_group_completes_and_its_stream_closes_after(servers: Servers) -> None:
    """A new routing table without a group: the batch planned with the old one, still waiting on that
    group's stream, gets its answer from that group (it is drained, not cut off); the stream closes then."""
    async def main() -> None:
        t = GrpcTransport([None, None], servers.addresses, "cpu")
        try:
            b, want = _batch(servers.addresses, torch.full((6, 4), 2.0))
            assert torch.equal(await t.dispatch(b), want)
            servers.handlers[1].gate.clear()
            pending = asyncio.create_task(t.dispatch(b))
            await asyncio.sleep(0.1)
            retired = servers.addresses[1]
            t.addresses = [servers.addresses[0]]  # group 1 retired while the batch waits on it
            assert retired in t._streams and t._streams[retired].broken is None
            servers.handlers[1].gate.set()
            assert torch.equal(await asyncio.wait_for(pending, 20), want)
            assert retired not in t._streams
        finally:
            await t.close()

    asyncio.run(main())


def test_a_retired_groups_stream_closes_when_the_batch_waiting_on_it_lost_its_caller(servers: Servers) -> None:
    async def main() -> None:
        t = GrpcTransport([None, None], servers.addresses, "cpu")
        try:
            b, _ = _batch(servers.addresses, torch.ones(6, 4))
            servers.handlers[1].gate.clear()
            pending = asyncio.create_task(t.dispatch(b))
            await asyncio.sleep(0.1)
            retired = servers.addresses[1]
            t.addresses = [servers.addresses[0]]
            pending.cancel()  # the caller goes while its batch waits on the retired group
            with pytest.raises(asyncio.CancelledError):
                await pending
            servers.handlers[1].gate.set()
            for _ in range(200):  # bounded: the late reply is read, then the stream is closed
                if retired not in t._streams:
                    break
                await asyncio.sleep(0.05)
            assert retired not in t._streams
        finally:
            await t.close()

    asyncio.run(main())
