"""Ray Direct Transport: tensors move peer to peer over gloo (CPU), CUDA IPC (peers sharing one GPU)
or NCCL (between GPUs), not through the object store.

NOTE: Ray only moves a tensor by RDT as the single return value of a method declared
with `tensor_transport`, and only for tasks submitted by the process that created the
collective group; an actor cannot be in a group it creates, and may be in at most one
group per backend. So the Router is the controller: it creates one group of a
`DispatchWorker` (its data-holding peer) plus the expert groups, and drives
    worker.take(x) --RDT--> group.forward_<backend>(rows) --RDT--> worker.gather(ys)
The batch reaches the worker and the result comes back through the object store.
A group's forward is submitted only once its rows are ready (`refs_ready`): Ray sends an actor the calls
of one caller in order, each once its arguments are, so a forward submitted with its rows still
being taken (behind the last batch's gather, waiting on that batch's forwards) would hold every later
call from the router to that group, health pings included, and the group would read as silent. The
gather is submitted at once: it holds only the worker's queue, which no ping uses (waiting for the
forwards first, a second thread hop per batch, measured 5-10% fewer 512-token batches per second).
On CUDA the backend is chosen per expert group where Ray placed it (`rdt_routes`): CUDA IPC
(one-sided, no collective group) with a group on the worker's own GPU, NCCL with a group on
another GPU (one rank per GPU). The worker needs a share of a GPU (`PEER_GPUS`; deploy leaves it
free beside the groups); Ray's placement of it is waited for only `place_s`.
A dead member breaks the group: it is destroyed, the transport reports itself
unavailable, and it is rebuilt in the background while other transports serve. It is
rebuilt only with members that answer a ping: a member that never joins would hold the
others' main threads (where Ray runs the join) until the collective timeout.
"""

from __future__ import annotations

import asyncio
import logging
import threading
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
# the share of a GPU the router's RDT peer (DispatchWorker) asks for; deploy leaves it free beside the groups
PEER_GPUS = 0.01
# how long Ray may take to place the RDT peer (on CUDA it waits for a free share of a GPU)
PLACE_S = 30.0
# the wait before trying again when the peer could not be placed or the groups' GPUs admit no RDT route
UNROUTED_RETRY_S = 60.0
# how long the refs of a failed or abandoned dispatch are waited for in the background (see `_settle`):
# past Ray's wait for an RDT tensor that never arrives (a group's forward then fails) and one collective wait
SETTLE_S = getattr(ray._private.ray_constants, "RDT_FETCH_FAIL_TIMEOUT_SECONDS", 60.0) + collective.COLLECTIVE_TIMEOUT_S
SETTLE_POLL_S = 0.2
# how often a thread waiting for refs to be ready (see `refs_ready`) looks whether its wait was given up
READY_SLICE_S = 1.0
# the transfers whose failure kills no actor: gloo (CPU) and CUDA IPC (one-sided: the receiver maps the
# sender's memory or fails; a group whose device then stalls reads as hung through compute_timeout_s and
# is replaced alone). NOTE: NCCL keeps Ray's kill: a communicator with a failed peer can leave kernels
# waiting on the device, which only ending the process clears.
_SPARED_BACKENDS = {"GLOO", "TORCH_GLOO", "CUDA_IPC"}


def spare_actors_of_failed_transfers() -> bool:
    """Stop Ray from killing both ends of a gloo or CUDA IPC RDT transfer that failed or timed out (its
    answer for transports that cannot abort a transfer); this transport destroys and rebuilds what it
    built instead, and the expert groups keep serving on the other transports.

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


class Unrouted(Exception):
    """RDT cannot reach the expert groups as Ray placed them (or the worker was not placed)."""


async def refs_ready(refs: Sequence[Any]) -> None:
    """Until every ref in `refs` is ready (a value or an error), without fetching it: an RDT tensor
    stays with the actor that holds it (awaiting one would fetch it into the router, which is in no
    collective group). Ray's wait blocks, so it runs on a thread of its own, a daemon (a wait given up
    by cancellation ends within READY_SLICE_S; one left at exit holds nothing up)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()
    gone = threading.Event()

    def wait() -> None:
        pending, error = list(refs), None
        try:
            while pending and not gone.is_set():
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=READY_SLICE_S, fetch_local=False)
        except BaseException as e:  # e.g. the worker shutting down; anything, lest the dispatch wait on forever
            error = e if isinstance(e, Exception) else RuntimeError(f"the wait for the batch's refs ended: {e!r}")
        if not gone.is_set():
            try:
                loop.call_soon_threadsafe(_settle_future, done, error)
            except RuntimeError:  # the loop closed meanwhile: nobody waits any more
                pass

    threading.Thread(target=wait, name="rdt-ready", daemon=True).start()
    try:
        await done
    finally:
        gone.set()


def _settle_future(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():  # cancelled meanwhile
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def rdt_routes(worker_at: tuple[str, tuple[str, ...]], members_at: Sequence[tuple[str, tuple[str, ...]]]) -> list[str]:
    """The CUDA backend to each member, from (node id, Ray GPU ids) of the worker and of each member:
    `cuda_ipc` to a member on the worker's GPU (same node, its first GPU id), `nccl` to the others.
    Raises Unrouted when a member holds no GPU or two NCCL members share one (NCCL takes one rank per GPU)."""
    node, gpus = worker_at
    if not gpus:
        raise Unrouted("the router's RDT peer holds no GPU")
    routes: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    for i, (n, g) in enumerate(members_at):
        if not g:
            raise Unrouted(f"expert group {i} holds no GPU")
        if n == node and g[0] == gpus[0]:
            routes.append("cuda_ipc")
            continue
        if (n, g[0]) in ranks:
            raise Unrouted(f"expert groups {ranks[(n, g[0])]} and {i} share GPU {g[0]} of node {n[:12]} away from the "
                           "router's RDT peer: NCCL takes one rank per GPU")
        ranks[(n, g[0])] = i
        routes.append("nccl")
    return routes


class DispatchWorker:
    """The router's RDT peer: cuts the batch into per-group tensors, gathers outputs."""

    def __init__(self, device: str) -> None:
        self.device = device
        collective.bound_waits()
        collective.store_on_its_address()

    def where(self) -> dict[str, Any]:
        """Its node id and Ray GPU ids (as an expert group's `info()` gives them)."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": collective.gpu_ids()}

    @ray.method(tensor_transport="gloo")
    def take_gloo(self, x: np.ndarray, dtype: str, start: int, end: int) -> torch.Tensor:
        return wire.from_numpy(x, dtype)[start:end].clone()

    @ray.method(tensor_transport="nccl")
    def take_nccl(self, x: np.ndarray, dtype: str, start: int, end: int) -> torch.Tensor:
        return wire.from_numpy(x, dtype)[start:end].to("cuda")

    @ray.method(tensor_transport="cuda_ipc")
    def take_cuda_ipc(self, x: np.ndarray, dtype: str, start: int, end: int) -> torch.Tensor:
        return wire.from_numpy(x, dtype)[start:end].to("cuda")

    def gather(self, *ys: torch.Tensor) -> tuple[np.ndarray, str]:
        return wire.to_numpy(torch.cat([y.to("cpu") for y in ys]))


class RdtTransport(Transport):
    name = "rdt"

    def __init__(self, groups: Sequence[Any], addresses: Sequence[str], device: str, *, worker_name: str | None = None,
                 namespace: str | None = None, place_s: float = PLACE_S) -> None:
        super().__init__(groups, addresses, device)
        self.backend = "nccl" if device == "cuda" else "gloo"
        self.worker_name = worker_name
        self.namespace = namespace
        self.place_s = place_s
        self.worker: Any = None
        # the collective group (None where every route is CUDA IPC) and each expert group's backend once built
        self.group: Any = None
        self.routes: list[str] | None = None
        # why the last build found no route (the peer unplaced, GPUs that admit none), for status
        self.unrouted: str | None = None
        self._broken_since: float | None = None
        self._retry_s = REBUILD_DELAY_S
        self._building: asyncio.Task | None = None
        # the expert groups in the current collective group, and a teardown running in the background
        self._members: list[Any] = []
        self._tearing: asyncio.Task | None = None
        self.rebuilds = 0
        self._attempts = 0
        # background waits on the refs of failed dispatches (see `_settle`)
        self._settling: set[asyncio.Task] = set()
        if not spare_actors_of_failed_transfers():
            log.warning("this Ray has no RDTManager._abort_transport: a failed transfer kills both its ends")

    @property
    def ready(self) -> bool:
        return self.routes is not None

    def describe(self) -> str:
        """For status: "ready: <backend to each group>", "unavailable: <why>", or "not built"."""
        if self.routes is not None:
            return "ready: " + ", ".join(self.routes)
        return f"unavailable: {self.unrouted}" if self.unrouted else "not built"

    def available(self) -> bool:
        if self.routes is not None:
            return True
        if self._building is None or self._building.done():
            if self._broken_since is None or time.monotonic() - self._broken_since >= self._retry_s:
                self._building = asyncio.get_running_loop().create_task(self._build())
        return False

    def revive(self) -> None:
        """Build again now if broken (see `available`); not where the last build found no route: that waits
        for a batch (each try places a peer that may ask the cluster for a GPU share)."""
        if self.unrouted is None:
            self.available()

    async def start(self) -> None:
        await self._build()

    async def _build(self) -> None:
        from ray.experimental.collective import create_collective_group

        if self._tearing is not None:
            await asyncio.gather(self._tearing, return_exceptions=True)  # never build beside a teardown
            self._tearing = None
        worker = None
        built_for = self.groups  # the table's list: a new table replaces it (update_table), never edits it
        members = list(built_for)
        silent = [i for i, a in enumerate(await ping_answers(members, MEMBER_PING_S)) if a is not True]
        if silent:  # nothing built, nothing to reset; try again after the rebuild delay
            log.info("collective group (%s) not rebuilt: expert groups %s did not answer a ping within %s s",
                     self.backend, silent, MEMBER_PING_S)
            self._broken_since = time.monotonic()
            return
        collective_members: list[Any] = []
        try:
            opts: dict[str, Any] = {"num_cpus": 0}
            if self.device == "cuda":
                opts["num_gpus"] = PEER_GPUS
            if self.worker_name:
                opts.update(name=f"{self.worker_name}-{self._attempts}", namespace=self.namespace)
            self._attempts += 1
            worker = ray.remote(DispatchWorker).options(**opts).remote(self.device)
            try:
                at = await asyncio.wait_for(worker.where.remote(), timeout=self.place_s)
            except asyncio.TimeoutError:
                need = f" (it needs {PEER_GPUS} of a GPU: leave that share free beside the expert groups)" if self.device == "cuda" else ""
                raise Unrouted(f"Ray did not place the router's RDT peer within {self.place_s:g} s{need}") from None
            if self.device == "cuda":
                infos = await asyncio.gather(*(asyncio.wait_for(g.info.remote(), timeout=MEMBER_PING_S) for g in members))
                routes = rdt_routes((at["node_id"], tuple(at["gpu_ids"])), [(i["node_id"], tuple(i["gpu_ids"])) for i in infos])
            else:
                routes = ["gloo"] * len(members)
            collective_members = [m for m, r in zip(members, routes) if r != "cuda_ipc"]
            group = None
            if collective_members:
                backend = "nccl" if self.backend == "nccl" else "torch_gloo"
                loop = asyncio.get_running_loop()
                # NOTE: create_collective_group blocks on its members; keep it off the event loop.
                group = await loop.run_in_executor(None, lambda: create_collective_group([worker, *collective_members], backend=backend))
            if self.groups is not built_for:  # a new table arrived during the build: these are not its groups
                log.info("RDT built for a replaced group list; building again for the new one")
                self._broken_since, self._retry_s = time.monotonic(), REBUILD_DELAY_S
                await self._teardown(group, worker, collective_members)
                return
            self.worker, self.group, self._members, self.routes = worker, group, collective_members, routes
            self._broken_since, self._retry_s, self.unrouted = None, REBUILD_DELAY_S, None
            self.rebuilds += 1
            if self.device == "cuda":
                log.info("RDT routes to the expert groups: %s", routes)
        except Unrouted as e:  # nothing built; the layout changes only with the table (which closes this)
            log.warning("RDT unavailable: %s; other transports serve (next try in %g s)", e, UNROUTED_RETRY_S)
            self.unrouted = str(e)
            self._broken_since, self._retry_s = time.monotonic(), UNROUTED_RETRY_S
            if worker is not None:
                ray.kill(worker)
        except Exception as e:  # a dead member makes creation fail; try again later
            log.warning("collective group (%s) could not be built: %s", self.backend, e)
            self._broken_since, self._retry_s = time.monotonic(), REBUILD_DELAY_S
            if worker is not None:
                ray.kill(worker)
            await self._reset_members(collective_members)

    def abandon(self, reason: str) -> None:
        """A member stopped answering: the group reads as unavailable at once and is torn down in the
        background (destroying it may wait on the stopped member); the next build waits for that."""
        if self.routes is not None or self.worker is not None:
            self._tearing = asyncio.get_running_loop().create_task(self._teardown(*self._detach(reason)))

    async def _break(self, reason: str) -> None:
        await self._teardown(*self._detach(reason))

    async def _break_if_current(self, worker: Any, reason: str) -> None:
        """A batch sent through `worker` failed: tear down the group it used, unless it is gone already
        (the failure surfaced after another batch's break, or after the health watch's rebuild: the
        group now built is healthy and stays)."""
        if self.worker is worker:
            await self._break(reason)

    def _detach(self, reason: str) -> tuple[Any, Any, list[Any]]:
        if reason != "closing":
            log.warning("collective group broken (%s); destroying it, other transports serve meanwhile", reason)
        detached = self.group, self.worker, self._members
        self.group, self.worker, self._members, self.routes = None, None, [], None
        self._broken_since, self._retry_s = time.monotonic(), REBUILD_DELAY_S
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
        # NOTE: taken now: a new table (update_table) may replace them while the rows are taken
        routes, worker, groups = self.routes, self.worker, self.groups
        if routes is None:
            raise TransportError(transport=self.name, reason=self.unrouted or "collective group not built")
        if batch.groups is not self.groups and list(batch.groups) != self.groups:
            # NOTE: the routes are the current table's; a batch planned with a replaced one goes another way.
            raise TransportError(transport=self.name, reason="the batch was planned with a replaced routing table's groups")
        x_np, dtype = wire.to_numpy(batch.x_ND)
        x_ref = ray.put(x_np)
        # NOTE: the forwards are submitted once their rows are ready (see the module)
        takes = [getattr(worker, f"take_{routes[p.group]}").remote(x_ref, dtype, p.start, p.end) for p in batch.parts]
        refs = list(takes)
        try:
            await refs_ready(takes)
            if self.worker is not worker:  # broken (or built again) meanwhile: these rows' group is gone
                self._settle(refs)
                raise TransportError(transport=self.name, reason="the collective group broke while the batch's rows were taken")
            y_refs = []
            for p, rows in zip(batch.parts, takes):
                y_refs.append(getattr(groups[p.group], f"forward_{routes[p.group]}").remote(
                    batch.layer, list(p.experts), list(p.counts), rows, batch.trace))
                refs.append(y_refs[-1])
            y_np, y_dtype = await worker.gather.remote(*y_refs)
        except ray.exceptions.RayTaskError as e:
            self._settle(refs)
            cause = e.as_instanceof_cause()
            if isinstance(cause, ValueError):
                raise cause from None
            await self._break_if_current(worker, str(e))
            raise TransportError(transport=self.name, reason=str(e)) from e
        except asyncio.CancelledError:  # the router's watch giving up a dispatch to a silent group
            self._settle(refs)
            raise
        except TransportError:
            raise
        except Exception as e:  # a dead peer
            self._settle(refs)
            await self._break_if_current(worker, str(e))
            raise TransportError(transport=self.name, reason=str(e)) from e
        return wire.from_numpy(y_np, y_dtype)

    def _settle(self, refs: Sequence[Any]) -> None:
        """Wait in the background (SETTLE_S at most) for what a failed or abandoned dispatch left behind.

        NOTE: Ray logs an "Unhandled error" for each ref that ends in an error and is dropped unread:
        after a dead peer, each group's forward (its input never computed) and each take; the
        dispatch read only the gather's. A `ray.wait` on a ref that has ended counts as reading it
        (`fetch_local=False`: an RDT tensor that did arrive stays where it is; awaiting one here would
        fetch it into the router, which is in no collective group, and time out). The gather's ref
        needs none of this: awaiting it read it, even when the await was cancelled."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # the dispatch closed outside a running loop (the process exiting): nothing to wait on
            return

        async def read() -> None:
            pending, until = list(refs), time.monotonic() + SETTLE_S
            while pending and time.monotonic() < until:
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=0, fetch_local=False)
                if pending:
                    await asyncio.sleep(SETTLE_POLL_S)

        task = loop.create_task(read())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def close(self) -> None:
        """Tear down what was built; the next use builds again after the short delay (a new table may
        have placed the groups where RDT reaches them)."""
        if self.routes is not None or self.worker is not None:
            # NOTE: as a teardown in the background (abandon's): a build started meanwhile (the health
            # watch's, a batch's) waits for it instead of forming a group of members still in this one.
            self._tearing = asyncio.get_running_loop().create_task(self._teardown(*self._detach("closing")))
            await asyncio.shield(self._tearing)
        self._retry_s = REBUILD_DELAY_S
