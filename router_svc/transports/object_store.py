"""Plain Ray actor calls: numpy in, numpy out, through the object store (zero-copy reads)."""

from __future__ import annotations

import asyncio

import torch
from ray.exceptions import RayActorError, RayTaskError

from expert_workers import wire
from router_svc.transports.base import Batch, GroupsDown, Transport, TransportError


class ObjectStoreTransport(Transport):
    name = "object_store"

    async def dispatch(self, batch: Batch) -> torch.Tensor:
        x_np, dtype = wire.to_numpy(batch.x_ND)
        refs = [
            batch.groups[p.group].forward_timed.remote(batch.layer, list(p.experts), list(p.counts), x_np[p.start : p.end], dtype, batch.trace)
            for p in batch.parts
        ]
        results = await asyncio.gather(*refs, return_exceptions=True)
        dead = tuple(p.group for p, r in zip(batch.parts, results) if isinstance(r, RayActorError))
        if dead:
            raise GroupsDown(transport=self.name, groups=dead, reason="actor died")
        for r in results:
            if isinstance(r, RayTaskError):
                raise r.as_instanceof_cause() from None
            if isinstance(r, BaseException):
                raise TransportError(transport=self.name, reason=f"{type(r).__name__}: {r}") from r
        outs = [r[0] for r in results]
        if results:
            batch.stats["expert_s"] = max(r[1] for r in results)
        return torch.cat([wire.from_numpy(o, dtype) for o in outs]) if outs else batch.x_ND[:0].clone()
