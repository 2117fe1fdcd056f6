"""Ray Direct Transport: tensors move peer to peer over gloo (CPU) or NCCL (GPU), not through the object store.

NOTE: Ray only moves a tensor by RDT as the single return value of a method declared
with `tensor_transport`, and only for tasks submitted by the process that created the
collective group; an actor cannot be in a group it creates, and may be in at most one
group per backend. So the Router is the controller: it creates one group of a
`DispatchWorker` (its data-holding peer) plus the expert groups, and drives
    worker.take(x) --RDT--> group.forward_<backend>(rows) --RDT--> worker.gather(ys)
The batch reaches the worker and the result comes back through the object store.
A dead member breaks the group: it is destroyed, the transport reports itself
unavailable, and it is rebuilt in the background while other transports serve. It is
rebuilt only with members that answer a ping: a member that never joins would hold the
others' main threads (where Ray runs the join) until the collective timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Sequence

import numpy as np
import ray
import torch

from expert_workers import collective, wire
from router_svc.transports.base import Batch, Transport, TransportError, ping_answers

log = logging.getLogger(__name__)
REBUILD_DELAY_S = 1.0
# every member must answer a ping within this before a collective group is built with it
MEMBER_PING_S = 2.0
# the transfers whose failure kills no actor: gloo (CPU). NOTE: NCCL keeps Ray's kill: a communicator with
# a failed peer can leave kernels waiting on the device, which only ending the process clears.
_SPARED_BACKENDS = {"GLOO", "TORCH_GLOO"}


def spare_actors_of_failed_transfers() -> bool:
    """Stop Ray from killing both ends of a gloo RDT transfer that failed or timed out (its answer for
    collective backends, which cannot abort a transfer); this transport destroys and rebuilds the
    collective group instead, and the expert groups keep serving on the other transports.

    NOTE: without this, killing our DispatchWorker while transfers are in flight (a teardown), or
    one transfer stuck behind a stopped member, makes Ray kill every expert group with a transfer
    pending: a whole deployment lost to one silent member. Ray keeps this bookkeeping in
    `RDTManager._abort_transport(failed_ref, ref_info_map, exception)` of the process driving the
    transfers (the router); the replacement does the same bookkeeping without the kills. Returns
    False, and leaves Ray's behaviour, where that internal is not there.
    """
    manager = ray._private.worker.global_worker.rdt_manager
    original = getattr(manager, "_abort_transport", None)
    if original is None or getattr(original, "_moe_serve", False):
        return original is not None

    def abort(failed_ref: Any, ref_info_map: dict, exception: Exception) -> None:
        info = ref_info_map.get(failed_ref.hex())
        if info is None or str(getattr(info, "backend", "")).upper() not in _SPARED_BACKENDS:
            return original(failed_ref, ref_info_map, exception)
        ref_info_map.pop(failed_ref.hex(), None)
        if info.send_ref is not None:
            ref_info_map.pop(info.send_ref.hex(), None)
        ref_info_map.pop(info.recv_ref.hex(), None)
        text = str(exception).strip()
        reason = text.splitlines()[0] if text else type(exception).__name__
        log.warning("RDT transfer %s failed (%s); the collective group is rebuilt, no actor killed", info.obj_id, reason)

    abort._moe_serve = True  # type: ignore[attr-defined]
    manager._abort_transport = abort
    return True


class DispatchWorker:
    """The router's peer in the collective group: cuts the batch into per-group tensors, gathers outputs."""

    def __init__(self, device: str) -> None:
        self.device = device
        collective.bound_waits()

    def ping(self) -> bool:
        return True

    @ray.method(tensor_transport="gloo")
    def take_gloo(self, x: np.ndarray, dtype: str, start: int, end: int) -> torch.Tensor:
        return wire.from_numpy(x, dtype)[start:end].clone()

    @ray.method(tensor_transport="nccl")
    def take_nccl(self, x: np.ndarray, dtype: str, start: int, end: int) -> torch.Tensor:
        return wire.from_numpy(x, dtype)[start:end].to("cuda")

    def gather(self, *ys: torch.Tensor) -> tuple[np.ndarray, str]:
        return wire.to_numpy(torch.cat([y.to("cpu") for y in ys]))


class RdtTransport(Transport):
    name = "rdt"

    def __init__(self, groups: Sequence[Any], addresses: Sequence[str], device: str, *, worker_name: str | None = None,
                 namespace: str | None = None) -> None:
        super().__init__(groups, addresses, device)
        self.backend = "nccl" if device == "cuda" else "gloo"
        self.worker_name = worker_name
        self.namespace = namespace
        self.worker: Any = None
        self.group: Any = None
        self._broken_since: float | None = None
        self._building: asyncio.Task | None = None
        # the expert groups the current collective group was built with, and a teardown running in the background
        self._members: list[Any] = []
        self._tearing: asyncio.Task | None = None
        self.rebuilds = 0
        self._attempts = 0
        if not spare_actors_of_failed_transfers():
            log.warning("this Ray has no RDTManager._abort_transport: a failed transfer kills both its ends")

    def available(self) -> bool:
        if self.group is not None:
            return True
        if self._building is None or self._building.done():
            if self._broken_since is None or time.monotonic() - self._broken_since >= REBUILD_DELAY_S:
                self._building = asyncio.get_running_loop().create_task(self._build())
        return False

    async def start(self) -> None:
        await self._build()

    async def _build(self) -> None:
        from ray.experimental.collective import create_collective_group

        if self._tearing is not None:
            await asyncio.gather(self._tearing, return_exceptions=True)  # never build beside a teardown
            self._tearing = None
        worker = None
        members = list(self.groups)
        silent = [i for i, a in enumerate(await ping_answers(members, MEMBER_PING_S)) if a is not True]
        if silent:  # nothing built, nothing to reset; try again after the rebuild delay
            log.info("collective group (%s) not rebuilt: expert groups %s did not answer a ping within %s s",
                     self.backend, silent, MEMBER_PING_S)
            self._broken_since = time.monotonic()
            return
        try:
            opts: dict[str, Any] = {"num_cpus": 0}
            if self.device == "cuda":
                opts["num_gpus"] = 0.01
            if self.worker_name:
                opts.update(name=f"{self.worker_name}-{self._attempts}", namespace=self.namespace)
            self._attempts += 1
            worker = ray.remote(DispatchWorker).options(**opts).remote(self.device)
            await worker.ping.remote()
            backend = "nccl" if self.backend == "nccl" else "torch_gloo"
            loop = asyncio.get_running_loop()
            # NOTE: create_collective_group blocks on its members; keep it off the event loop.
            group = await loop.run_in_executor(None, lambda: create_collective_group([worker, *members], backend=backend))
            self.worker, self.group, self._members = worker, group, members
            self._broken_since = None
            self.rebuilds += 1
        except Exception as e:  # a dead member makes creation fail; try again later
            log.warning("collective group (%s) could not be built: %s", self.backend, e)
            self._broken_since = time.monotonic()
            if worker is not None:
                ray.kill(worker)
            await self._reset_members(members)

    def abandon(self, reason: str) -> None:
        """A member stopped answering: the group reads as unavailable at once and is torn down in the
        background (destroying it may wait on the stopped member); the next build waits for that."""
        if self.group is not None or self.worker is not None:
            self._tearing = asyncio.get_running_loop().create_task(self._teardown(*self._detach(reason)))

    async def _break(self, reason: str) -> None:
        await self._teardown(*self._detach(reason))

    def _detach(self, reason: str) -> tuple[Any, Any, list[Any]]:
        if reason != "closing":
            log.warning("collective group broken (%s); destroying it, other transports serve meanwhile", reason)
        detached = self.group, self.worker, self._members
        self.group, self.worker, self._members = None, None, []
        self._broken_since = time.monotonic()
        return detached

    async def _teardown(self, group: Any, worker: Any, members: list[Any]) -> None:
        from ray.experimental.collective import destroy_collective_group

        # NOTE: the worker goes first: members waiting on a transfer from it (stuck behind a member that
        # stopped answering) fail at once instead of at Ray's transfer timeout; destroying may then wait.
        if worker is not None:
            try:
                ray.kill(worker)
            except Exception:
                pass
        if group is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, lambda: destroy_collective_group(group))
            except Exception as e:  # members may already be gone
                log.info("destroying the broken collective group: %s", e)
        await self._reset_members(members)

    async def _reset_members(self, members: Sequence[Any]) -> None:
        """Drop the members' torch.distributed state so a new group can form (see ExpertGroup)."""
        resets = [g.reset_collective.remote() for g in members]
        for ref in resets:
            try:
                await asyncio.wait_for(ref, timeout=30)
            except Exception as e:  # a dead member has nothing to reset; the supervisor replaces it
                log.info("resetting a collective member: %s", e)

    async def dispatch(self, batch: Batch) -> torch.Tensor:
        if self.group is None:
            raise TransportError(transport=self.name, reason="collective group not built")
        worker = self.worker
        x_np, dtype = wire.to_numpy(batch.x_ND)
        x_ref = ray.put(x_np)
        take = worker.take_nccl if self.backend == "nccl" else worker.take_gloo
        y_refs = []
        for p in batch.parts:
            rows = take.remote(x_ref, dtype, p.start, p.end)
            fwd = self.groups[p.group].forward_nccl if self.backend == "nccl" else self.groups[p.group].forward_gloo
            y_refs.append(fwd.remote(batch.layer, list(p.experts), list(p.counts), rows))
        try:
            y_np, y_dtype = await worker.gather.remote(*y_refs)
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, ValueError):
                raise cause from None
            await self._break(str(e))
            raise TransportError(transport=self.name, reason=str(e)) from e
        except Exception as e:
            await self._break(str(e))
            raise TransportError(transport=self.name, reason=str(e)) from e
        return wire.from_numpy(y_np, y_dtype)

    async def close(self) -> None:
        if self.group is not None or self.worker is not None:
            await self._break("closing")
