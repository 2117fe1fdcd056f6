"""A router's failover: what it does about expert groups that stop answering or die.

- the health watch: every group pinged each second; those not answering (or answering unhealthy: a
  batch past compute_timeout_s) are dead until they answer again, and the gateway reads NOT_SERVING
  while some slot has no live replica;
- the dispatch watch: a dispatch waiting on a group found silent is given up (GroupsDown) and the
  batch planned again around it, as after a death;
- requests that find no live replica: failed (failover 'fail') or held apart until a new table or a
  revived group may give one, each until its own deadline (failover 'wait'), then sent back to the
  batcher together.

`Failover` is a base of `Router` (router_svc.router), split out so router.py reads as the request
path; it works on the router's state named in its class body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from expert_workers.errors import ExpertUnavailableError
from expert_workers.spec import MoESpec
from router_svc.batching import Batcher, Pending, settle
from router_svc.config import DataPlaneConfig
from router_svc.gate import Assignments
from router_svc.table import RoutingTable
from router_svc.telemetry import RouterMetrics
from router_svc.transports import Batch, GroupsDown, Transport, ping_answers

if TYPE_CHECKING:
    from router_svc.gateway import Gateway

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Watch:
    """A dispatch in flight: the task awaiting it, the groups it waits on (indices into `handles`, the
    router's group list it was planned with), the task's cancel count on entry, and those found silent."""

    task: asyncio.Task
    groups: frozenset[int]
    handles: list
    cancels: int = 0
    lost: frozenset[int] = frozenset()
    hung: bool = False  # some of `lost` answered their ping unhealthy (a batch past compute_timeout_s)


# a batch given up this many times on groups whose compute ran past compute_timeout_s fails instead of
# going on: a batch that hangs every group it reaches would otherwise take down copy after copy.
HUNG_GIVE_UPS = 2


class Failover:
    """The health watch, the dispatch watch and requests lacking a live replica (see the module)."""

    # the router's, read and kept here
    name: str
    spec: MoESpec
    config: DataPlaneConfig
    table: RoutingTable
    groups: list  # the current table's group handles; `dead` and watches index this list
    transports: dict[str, Transport]
    chain: tuple[str, ...]  # the transports in use, preferred first
    gateway: "Gateway | None"
    metrics: RouterMetrics | None
    batcher: Batcher
    # groups known dead (failed dispatch or ping); their replicas are skipped until they answer again
    dead: set[int]
    # set (and replaced) when the table or the dead set changes: requests held for a live replica look again
    _table_changed: asyncio.Event
    # dispatches in flight, given up on when one of their groups stops answering pings (see _dispatch_watched)
    _watching: set[_Watch]
    # requests held apart for a live replica (failover 'wait'), see _hold
    _holding: set[asyncio.Task]
    _closing: bool  # the router's shutdown began

    def _all_slots_live(self) -> bool:
        """Every slot of every MoE layer has at least one live replica."""
        for layer in self.spec.moe_layers:
            hosted = self.table.lookup_alive(layer)[2] > 0
            live = self.table.lookup_alive(layer, frozenset(self.dead))[2] > 0
            if bool((hosted & ~live).any()):
                return False
        return True

    async def _watch_health(self, period_s: float = 1.0) -> None:
        """SERVING while every expert group answers a ping within the period. With metrics on, the
        supervisor's events are counted every few periods."""
        tick = 0
        while True:
            tick += 1
            if self.metrics is not None and tick % 5 == 0:
                from router_svc.status_view import ask_supervisor

                st = await ask_supervisor(self.name)
                if st is not None:
                    self.metrics.note_events(list(st.get("events", [])))
            try:
                handles = self.groups
                results = await ping_answers(handles, max(period_s, 2.0))
                # NOTE: a table adopted meanwhile renumbers the groups; these answers are of the old list.
                if handles is self.groups:
                    self._set_dead({g for g, r in enumerate(results) if r is not True}, {g for g, r in enumerate(results) if r is False})
                    if not self.dead:
                        for tname in self.chain:
                            self.transports[tname].revive()
                if self.gateway is not None:
                    await self.gateway.set_serving(self._all_slots_live())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # never let one bad observation stop the watch
                log.warning("health watch: %s", e)
            await asyncio.sleep(period_s)

    def _set_dead(self, dead: set[int], unhealthy: frozenset[int] | set[int] = frozenset()) -> None:
        """What the health watch found (indices into the current `self.groups`). Dispatches waiting on a
        group that no longer answers are given up (planned again around it); every transport is told
        (`abandon`), so a collective group with a silent member tears itself down (it wedges every
        member's transfers, not only the batches sent to that one); batches waiting for a live replica
        look again when a group answers again.

        NOTE: `dead` holds the groups that did not answer (a stopped process, a cut-off host) and those
        that answered False (`unhealthy`: one of their batches computed past its compute_timeout_s, as
        on a hung kernel or device); dispatches given up on the latter count towards HUNG_GIVE_UPS."""
        revived, silent = self.dead - dead, dead - self.dead
        self.dead = dead
        for w in list(self._watching):
            lost = w.groups & dead
            if lost and not w.lost and w.handles is self.groups:
                w.lost = frozenset(lost)
                w.hung = bool(lost & unhealthy)
                w.task.cancel()
                silent |= lost
        if silent:
            for t in self.transports.values():
                t.abandon(f"expert groups {sorted(silent)} stopped answering pings")
        if revived:
            self._placement_changed()

    def _placement_changed(self) -> None:
        self._table_changed.set()
        self._table_changed = asyncio.Event()

    def _set_aside(self, layer: int, reqs: list[Pending], assignments: list[Assignments], lacking: dict[int, int]) -> None:
        """Requests `lacking` an expert with no live replica (request index -> that expert): failed under
        failover 'fail' (or cancelled once the router is going); under 'wait' held apart (`_hold`) until
        a table or a revived group may give one, each until its own deadline."""
        stuck = sorted(lacking)
        if self.config.failover == "fail":
            for i in stuck:
                settle([reqs[i]], ExpertUnavailableError(layer=layer, expert=lacking[i], reason="no live replica (failover policy 'fail')"))
            return
        if self._closing:  # the router is going: nothing waits past it (a request released as it went)
            settle([reqs[i] for i in stuck], asyncio.CancelledError())
            return
        now = time.monotonic()
        for i in stuck:
            reqs[i].assignments = assignments[i]
            if reqs[i].hold_until is None:  # held again after a release: its first deadline stands
                reqs[i].hold_until = now + self.config.failover_wait_s
        # NOTE: the event is taken now, with the plan that found no host: a change in the meantime wakes it.
        held = asyncio.get_running_loop().create_task(self._hold(layer, [reqs[i] for i in stuck], [lacking[i] for i in stuck], self._table_changed))
        self._holding.add(held)
        held.add_done_callback(self._holding.discard)

    async def _hold(self, layer: int, reqs: list[Pending], experts: list[int], changed: asyncio.Event) -> None:
        """Requests that need an expert with no live replica (failover 'wait', `experts[i]` the one
        request i lacks), each until its own `hold_until`. When a table or a revived group may give one,
        those still waiting go back to the batcher with their assignments: released together, every
        request held meanwhile leaves in as few batches as `batch_max_tokens` allows, behind the
        batches in flight (not one batch per batch that was held, each reading its experts' weights
        again). Those past their time fail; those whose callers have gone are dropped. The wait counts
        as the requests' queueing in the stage metrics."""
        try:
            remaining = min(r.hold_until or 0.0 for r in reqs) - time.monotonic()
            if remaining > 0:
                try:
                    await asyncio.wait_for(changed.wait(), timeout=remaining)
                except asyncio.TimeoutError:
                    pass
        except (Exception, asyncio.CancelledError) as e:  # the wait's own (cancelled with the router)
            settle(reqs, e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        now = time.monotonic()
        back = []
        for r, expert in zip(reqs, experts):
            if r.future.done():
                continue
            if now >= (r.hold_until or 0.0):
                settle([r], ExpertUnavailableError(layer=layer, expert=expert, reason="no live replica within failover_wait_s"))
            else:
                back.append(r)
        self.batcher.requeue(layer, back)

    async def _dispatch_watched(self, t: Transport, batch: Batch) -> torch.Tensor:
        """`t.dispatch(batch)`, given up on when the health watch finds one of the batch's groups not
        answering pings: a process stopped or cut off neither answers nor fails its calls, so without
        this the batch (and, one batch in flight per layer, its layer) would wait for it forever.
        Raised as GroupsDown, so the batch is planned again around those groups like a death.

        NOTE: the watch cancels the task awaiting this (no task of its own per dispatch: this is on
        every request's path); the cancellation is taken back here, and one from anyone else still
        propagates (Task.cancelling counts them, from Python 3.11; on 3.10 a cancel from elsewhere
        arriving together with the watch's is taken for the watch's).
        """
        task = asyncio.current_task()
        assert task is not None
        counted = getattr(task, "cancelling", None)  # Python >= 3.11
        w = _Watch(task, frozenset(p.group for p in batch.parts), batch.groups, counted() if counted else 0)
        self._watching.add(w)
        try:
            return await t.dispatch(batch)
        except asyncio.CancelledError:
            if not w.lost:
                raise
            if counted is not None and task.uncancel() > w.cancels:
                raise
            reason = "answered health pings unhealthy (a batch computed past compute_timeout_s)" if w.hung else "stopped answering health pings"
            raise GroupsDown(transport=t.name, groups=tuple(sorted(w.lost)), reason=reason, hung=w.hung) from None
        finally:
            self._watching.discard(w)
