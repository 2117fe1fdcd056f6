"""The gRPC data plane: framed raw tensors to each group's endpoint (for peers outside Ray, or a broken collective).

Each group is reached over one long-lived bidirectional stream (`ForwardStream`), opened on
first use: batches are written in order and the group answers in the same order, so a
reply resolves the oldest waiting batch (its `seq` must match). A broken stream (the group
died, the channel closed, a reply out of order) fails every batch waiting on it with
TransportError and is opened afresh by the next batch.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from typing import Any, Sequence

import grpc
import torch

from expert_workers import data_grpc, wire
from expert_workers.errors import InvalidRequestError
from router_svc.transports.base import Batch, Transport, TransportError

log = logging.getLogger(__name__)


def _nothing() -> None:
    return None


class _GroupStream:
    """One open ForwardStream to one group: ordered writes, a reader resolving replies in order."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=data_grpc.CHANNEL_OPTIONS)
        self.call = self.channel.stream_stream(data_grpc.STREAM_METHOD, request_serializer=None, response_deserializer=None)()
        self.waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        self.write_lock = asyncio.Lock()
        self.broken: str | None = None
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def request(self, seq: int, frame: bytes) -> tuple[dict[str, Any], memoryview]:
        fut = asyncio.get_running_loop().create_future()
        await self.write_lock.acquire()
        unlock = self.write_lock.release
        try:
            if self.broken is not None:
                raise TransportError(transport="grpc", reason=f"stream to {self.address} broken: {self.broken}")
            self.waiting.append((seq, fut))
            write = asyncio.ensure_future(self.call.write(frame))
            try:
                # NOTE: shielded, and the lock held until it ends: a write cut half-way would leave the
                # group's reply order unknown. The batch's caller may go; its reply is then dropped.
                await asyncio.shield(write)
            except asyncio.CancelledError:
                write.add_done_callback(lambda _: self.write_lock.release())
                unlock = _nothing
                raise
            except Exception as e:
                self._break(f"write failed: {e}")
                raise TransportError(transport="grpc", reason=f"stream to {self.address}: {e}") from None
        finally:
            unlock()
        return await fut

    async def _read(self) -> None:
        try:
            while True:
                reply = await self.call.read()
                if reply is grpc.aio.EOF:
                    self._break("the group closed the stream")
                    return
                header, payload = data_grpc.decode_frame(reply)
                if not self.waiting:
                    self._break("a reply with no batch waiting")
                    return
                seq, fut = self.waiting[0]
                got = header.get("seq")
                # an error frame for a frame too broken to read carries no seq; order still holds
                if got != seq and not (got is None and "error" in header):
                    self._break(f"reply seq {got!r} while batch {seq} is the oldest waiting")
                    return
                self.waiting.popleft()
                if not fut.done():
                    fut.set_result((header, payload))
        except asyncio.CancelledError:
            self._break("closed")
            raise
        except grpc.aio.AioRpcError as e:
            self._break(f"{e.code().name}: {e.details()}")
        except Exception as e:  # a malformed reply frame: the stream cannot be trusted any more
            self._break(f"{type(e).__name__}: {e}")

    def _break(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
        while self.waiting:
            _, fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(TransportError(transport="grpc", reason=f"stream to {self.address} broken: {reason}"))
        self.call.cancel()

    async def close(self) -> None:
        self._break("closed")
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.channel.close()


class GrpcTransport(Transport):
    name = "grpc"

    def __init__(self, groups: Sequence[Any], addresses: Sequence[str], device: str) -> None:
        self._streams: dict[str, _GroupStream] = {}
        self._closing: set[asyncio.Task] = set()
        self._seq = itertools.count()
        super().__init__(groups, addresses, device)

    @property
    def addresses(self) -> list[str]:
        return self._addresses

    @addresses.setter
    def addresses(self, value: Sequence[str]) -> None:
        """A new routing table: streams to groups no longer in it are closed once no batch waits on
        them (batches planned with the old table still reach those groups while the supervisor drains)."""
        self._addresses = list(value)
        for address in [a for a in self._streams if a not in self._addresses]:
            self._close_if_retired(address)

    def _close_later(self, s: _GroupStream) -> None:
        task = asyncio.get_running_loop().create_task(s.close())
        self._closing.add(task)  # held while it runs: the event loop keeps only weak references to tasks
        task.add_done_callback(self._closing.discard)

    def _close_if_retired(self, address: str) -> None:
        s = self._streams.get(address)
        # NOTE: a batch whose caller went has its future done (cancelled) but waits on for its reply
        if s is not None and address not in self._addresses and all(fut.done() for _, fut in s.waiting):
            self._close_later(self._streams.pop(address))

    def _stream(self, address: str) -> _GroupStream:
        s = self._streams.get(address)
        if s is None or s.broken is not None:
            if s is not None:
                self._close_later(s)
            s = self._streams[address] = _GroupStream(address)
        return s

    async def _one(self, batch: Batch, part_index: int) -> torch.Tensor:
        p = batch.parts[part_index]
        data, name, shape = wire.to_bytes(batch.x_ND[p.start : p.end])
        seq = next(self._seq)
        header = {"layer": batch.layer, "experts": list(p.experts), "counts": list(p.counts), "dtype": name,
                  "shape": list(shape), "request_ids": list(batch.request_ids), "traceparent": batch.trace, "seq": seq}
        address = batch.addresses[p.group]
        try:
            out_header, payload = await self._stream(address).request(seq, data_grpc.encode_frame(header, data))
        finally:
            self._close_if_retired(address)
        failed = data_grpc.error_of(out_header)
        if failed is not None:
            if failed.code == grpc.StatusCode.INVALID_ARGUMENT.name:
                raise InvalidRequestError(field="batch", problem=failed.message or "rejected by expert group")
            raise TransportError(transport=self.name, reason=f"{failed.code}: {failed.message}")
        if "compute_s" in out_header:
            batch.stats["expert_s"] = max(batch.stats.get("expert_s", 0.0), float(out_header["compute_s"]))
        return wire.from_bytes(bytes(payload), out_header["dtype"], out_header["shape"])

    async def dispatch(self, batch: Batch) -> torch.Tensor:
        outs = await asyncio.gather(*(self._one(batch, i) for i in range(len(batch.parts))))
        return torch.cat(outs) if outs else batch.x_ND[:0].clone()

    async def close(self) -> None:
        streams, self._streams = list(self._streams.values()), {}
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
