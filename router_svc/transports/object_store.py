"""Plain Ray actor calls: numpy in, numpy out, through the object store (zero-copy reads)."""

from __future__ import annotations

import asyncio

import torch
from ray.exceptions import RayActorError, RayTaskError

from expert_workers import wire
from router_svc.transports.base import Batch, Transport, TransportError


class ObjectStoreTransport(Transport):
    name = "object_store"

    async def dispatch(self, batch: Batch) -> torch.Tensor:
        x_np, dtype = wire.to_numpy(batch.x_ND)
        refs = [
            self.groups[p.group].forward.remote(batch.layer, list(p.experts), list(p.counts), x_np[p.start : p.end], dtype)
            for p in batch.parts
        ]
        try:
            outs = await asyncio.gather(*refs)
        except RayTaskError as e:
            raise e.as_instanceof_cause() from None
        except RayActorError as e:
            raise TransportError(transport=self.name, reason=f"expert group died: {e}") from e
        return torch.cat([wire.from_numpy(o, dtype) for o in outs]) if outs else batch.x_ND[:0].clone()
