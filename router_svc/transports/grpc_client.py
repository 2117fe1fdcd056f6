"""The gRPC data plane: framed raw tensors to each group's endpoint (for peers outside Ray, or a broken collective)."""

from __future__ import annotations

import asyncio

import grpc
import torch

from expert_workers import data_grpc, wire
from expert_workers.errors import InvalidRequestError
from router_svc.transports.base import Batch, Transport, TransportError


class GrpcTransport(Transport):
    name = "grpc"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._stubs: dict[str, object] = {}

    def _stub(self, address: str):
        if address not in self._stubs:
            channel = grpc.aio.insecure_channel(address, options=data_grpc.CHANNEL_OPTIONS)
            self._stubs[address] = channel.unary_unary(data_grpc.METHOD, request_serializer=None, response_deserializer=None)
        return self._stubs[address]

    async def _one(self, batch: Batch, part_index: int) -> torch.Tensor:
        p = batch.parts[part_index]
        data, name, shape = wire.to_bytes(batch.x_ND[p.start : p.end])
        header = {"layer": batch.layer, "experts": list(p.experts), "counts": list(p.counts), "dtype": name,
                  "shape": list(shape), "request_ids": list(batch.request_ids), "traceparent": batch.trace}
        try:
            reply = await self._stub(self.addresses[p.group])(data_grpc.encode_frame(header, data))
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequestError(field="batch", problem=e.details() or "rejected by expert group") from None
            raise TransportError(transport=self.name, reason=f"{e.code().name}: {e.details()}") from e
        out_header, payload = data_grpc.decode_frame(reply)
        if "compute_s" in out_header:
            batch.stats["expert_s"] = max(batch.stats.get("expert_s", 0.0), float(out_header["compute_s"]))
        return wire.from_bytes(bytes(payload), out_header["dtype"], out_header["shape"])

    async def dispatch(self, batch: Batch) -> torch.Tensor:
        outs = await asyncio.gather(*(self._one(batch, i) for i in range(len(batch.parts))))
        return torch.cat(outs) if outs else batch.x_ND[:0].clone()

    async def close(self) -> None:
        self._stubs.clear()
