"""Router: the asyncio actor at the front of the data plane.

admit -> batch (per layer: max tokens / max wait) -> gate per request -> capacity per
request -> plan (sort by group, slot) -> dispatch to every group at once -> combine
-> shared experts -> split back per request.

NOTE: isolation. Gate, capacity and expert choice run per request, before requests
are merged; merging only concatenates rows for dispatch (router_svc.planner). A
request's output never depends on what it was batched with.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import statistics
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from expert_workers import tie, wire
from expert_workers.errors import BackPressureError, ExpertUnavailableError
from expert_workers.source import SourceSpec, open_source
from expert_workers.spec import MoESpec, RoutingSpec
from expert_workers.weights import RouterWeights
from router_svc import admission
from router_svc.batching import Batcher, Pending, settle
from router_svc.config import DataPlaneConfig
from router_svc.dispatch import combine
from router_svc.failover import HUNG_GIVE_UPS, Failover, _Watch
from router_svc.gate import Assignments, RoutingStats, routing_stats
from router_svc.local import SharedExperts
from router_svc.planner import NoLiveReplica, Planned, Planner
from router_svc.table import RoutingTable
from router_svc.telemetry import RouterMetrics, Span, TelemetryConfig, close_tracing, make_tracer
from router_svc.usage import Usage
from router_svc.transports import FALLBACKS, TRANSPORTS, Batch, GroupsDown, RdtTransport, Transport, TransportError

if TYPE_CHECKING:
    from router_svc.gateway import GatewayConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForwardOutput:
    """One request's answer. Arrays are numpy (zero-copy through the object store)."""

    hidden_states: np.ndarray
    dtype: str
    token_index: np.ndarray | None = None
    expert: np.ndarray | None = None
    weight: np.ndarray | None = None
    stats: RoutingStats | None = None
    dropped: int = 0
    rerouted: int = 0
    # token indices (of this request) that lost an expert because no live replica hosted it.
    degraded_tokens: tuple[int, ...] = ()
    transport: str = ""
    batch_requests: int = 1
    routing_table_version: int = 0


def _rows(reqs: Sequence[Pending]) -> torch.Tensor:
    """The requests' token rows, one after another (a lone request's as they are: no copy)."""
    return torch.cat([r.x_TD for r in reqs]) if len(reqs) > 1 else reqs[0].x_TD


# the request span's traceparent, set by forward_tensor for the Pending it queues
_REQUEST_TRACE: contextvars.ContextVar[str] = contextvars.ContextVar("moe_request_trace", default="")


class Router(Failover):
    """Created by `cluster.deploy` with `ray.remote(Router)`; all methods run on one event loop."""

    def __init__(
        self,
        name: str,
        source: SourceSpec,
        routing: RoutingSpec | None,
        table: RoutingTable,
        groups: Sequence[Any],
        config: DataPlaneConfig,
        namespace: str | None = None,
        gateway: "GatewayConfig | None" = None,
        telemetry: TelemetryConfig | None = None,
        index: int = 0,
        tied_to: tuple[str, str | None] | None = None,
    ) -> None:
        """`tied_to` (name, namespace): end this actor once that actor is gone (see expert_workers.tie)."""
        tie.tie_to(tied_to)
        self.name = name
        self.telemetry = telemetry
        self.config = config
        self.gateway_config = gateway
        self.gateway: Any = None
        self._health_task: asyncio.Task | None = None
        self._inflight_tokens = 0
        self._inflight_requests = 0
        self.started = time.monotonic()  # for rates since start (status_view)
        src = open_source(source)
        self.spec: MoESpec = src.spec if routing is None else replace(src.spec, routing=routing)
        self.compute_dtype = wire.DTYPES[config.dtype]
        self.gates: dict[int, RouterWeights] = {layer: src.router(layer) for layer in self.spec.moe_layers}
        self.shared: dict[int, SharedExperts] = {}
        self.shared_gates: dict[int, torch.Tensor] = {}
        for layer in self.spec.moe_layers:
            sw = src.shared(layer)
            if sw is None:
                continue
            if config.shared_experts == "router":
                self.shared[layer] = SharedExperts(sw, self.spec, dtype=self.compute_dtype, device="cpu")
            elif sw.gate is not None:
                self.shared_gates[layer] = sw.gate.to(self.compute_dtype)  # as SharedExperts keeps it
        self.table = table
        self.groups = list(groups)
        self.addresses = [g.grpc_address for g in table.groups]
        self.planner = Planner(self.spec, config, self.gates, self.shared_gates)
        self.transports: dict[str, Transport] = {}
        for tname, cls in TRANSPORTS.items():
            if cls is RdtTransport:
                self.transports[tname] = cls(self.groups, self.addresses, config.device, worker_name=f"{name}-rdt", namespace=namespace)
            else:
                self.transports[tname] = cls(self.groups, self.addresses, config.device)
        self.chain: tuple[str, ...] = self._chain_for(config.transport)
        self.measured_ms: dict[str, float] = {}
        self.batcher = Batcher(config, self._run_batch)
        # the failover's state (router_svc.failover.Failover says what each holds)
        self.dead: set[int] = set()
        self._table_changed = asyncio.Event()
        self._watching: set[_Watch] = set()
        self._holding: set[asyncio.Task] = set()
        self._closing = False
        # batches in flight per routing-table version they were planned with (the supervisor drains by it)
        self._planned: dict[int, int] = {}
        self.counters: dict[str, Any] = {"requests": 0, "batches": 0, "by_transport": {}, "fallbacks": 0, "fallbacks_by_from": {}}
        self.usage = Usage(list(self.spec.moe_layers), self.spec.num_experts)
        self.degraded_tokens = {layer: 0 for layer in self.spec.moe_layers}  # answered without one of their experts
        self.tracer, self._tracing = make_tracer(telemetry, name)
        self.metrics: RouterMetrics | None = None
        if telemetry is not None and (telemetry.prometheus_port is not None or telemetry.otlp_endpoint):
            self.metrics = RouterMetrics(telemetry, name, index, self._metric_state, layers=list(self.spec.moe_layers))

    def _chain_for(self, mode: str) -> tuple[str, ...]:
        chain = FALLBACKS[mode]
        if not self.config.rdt_owner:
            chain = tuple(t for t in chain if t != "rdt") or ("object_store",)
        return chain

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        """Build the collective group if RDT may be used; under `auto`, order transports by measurement."""
        if "rdt" in self.chain:
            await self.transports["rdt"].start()  # type: ignore[attr-defined]
        if self.config.transport == "auto":
            await self._measure()
        if self.gateway_config is not None:
            from router_svc.gateway import Gateway

            self.gateway = Gateway(self, self.gateway_config)
            await self.gateway.start()
        self._health_task = asyncio.get_running_loop().create_task(self._watch_health())
        return {"chain": list(self.chain), "measured_ms": dict(self.measured_ms),
                "gateway": None if self.gateway is None else self.gateway.address,
                "metrics": None if self.metrics is None or not self.metrics.address else self.metrics.address}

    async def _measure(self, repeats: int = 3) -> None:
        """Time one probe batch per transport on real groups; fastest first. Broken ones go last."""
        layer = self.spec.moe_layers[0]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(64, self.spec.hidden_size, generator=gen).to(self.compute_dtype)
        batch, _, _, _ = self._plan(layer, [self.planner.assign(layer, x, None)], x)
        timings = {}
        for tname in self._chain_for("auto"):
            t = self.transports[tname]
            if not t.available():
                continue
            try:
                await t.dispatch(batch)
                samples = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    await t.dispatch(batch)
                    samples.append(time.perf_counter() - t0)
                timings[tname] = 1e3 * statistics.median(samples)
            except Exception as e:
                log.warning("auto: transport %s failed its probe: %s", tname, e)
        self.measured_ms = timings
        ranked = sorted(timings, key=timings.__getitem__)
        self.chain = tuple(ranked + [t for t in self._chain_for("auto") if t not in ranked])

    async def shutdown(self) -> None:
        self._closing = True  # from here new requests are refused; one finding no live replica ends (cancelled), never waits
        if self._health_task is not None:
            self._health_task.cancel()
        for held in list(self._holding):  # requests waiting for a live replica end with the router
            held.cancel()
        self.batcher.close()  # queued requests and batches in their own tasks end with it too
        if self.gateway is not None:
            await self.gateway.stop()
        for t in self.transports.values():
            await t.close()
        # NOTE: both export what they still hold (the final metric values, the last spans)
        if self.metrics is not None:
            self.metrics.shutdown()
        await asyncio.to_thread(close_tracing, self._tracing)

    def gateway_address(self) -> str | None:
        return None if self.gateway is None else self.gateway.address

    # -- requests ----------------------------------------------------------
    async def forward(
        self, x: np.ndarray, dtype: str, layer: int, token_ids: Any = None, return_routing: bool = False, request_id: str = ""
    ) -> ForwardOutput:
        t = admission.as_tensor(wire.from_numpy(x, dtype) if isinstance(x, np.ndarray) else x)
        return await self.forward_tensor(t, layer, token_ids, return_routing, request_id)

    async def forward_tensor(
        self, t: torch.Tensor, layer: int, token_ids: Any = None, return_routing: bool = False, request_id: str = "",
        traceparent: str = "",
    ) -> ForwardOutput:
        """One request: a span (child of `traceparent` when given), admission, its batch; counted by status."""
        t0 = time.perf_counter()
        status = "OK"
        with Span(self.tracer, "moe.router.request", parent=traceparent, attributes={"moe.layer": int(layer) if isinstance(layer, int) else -1,
                                                                                      "moe.request_id": request_id}) as span:
            token = _REQUEST_TRACE.set(span.traceparent)
            try:
                return await self._admit(t, layer, token_ids, return_routing, request_id)
            except BaseException as e:
                from router_svc.gateway import status_name

                status = status_name(e)
                raise
            finally:
                _REQUEST_TRACE.reset(token)
                self.count_request(status, t0)

    def count_request(self, status: str, t0: float) -> None:
        """A request ended with `status` (a gRPC code name), begun at perf_counter `t0`: for the metrics,
        recorded after the answer has left (see RouterMetrics.defer_soon). The gateway counts here those
        it refuses before they reach `forward_tensor` (malformed)."""
        if self.metrics is not None:
            self.metrics.defer_soon(self.metrics.count_request, status, time.perf_counter() - t0)

    async def _admit(
        self, t: torch.Tensor, layer: int, token_ids: Any = None, return_routing: bool = False, request_id: str = ""
    ) -> ForwardOutput:
        """Admit one request (limits, shape, dtype, layer, values, token ids) and await its batch."""
        # NOTE: its form first, then the limits (as the gateway checks): a malformed request is
        # INVALID_ARGUMENT, never told to come back later.
        if self._closing:
            raise ExpertUnavailableError(layer=layer if isinstance(layer, int) else -1, expert=-1, reason="the router is shutting down")
        layer = admission.check_layer(layer, self.spec)
        admission.check_hidden(t, self.spec)
        tokens = t.numel() // max(t.shape[-1], 1) if t.dim() else 0
        if tokens > self.config.max_tokens_per_request:
            raise BackPressureError(limit="tokens per request", value=tokens, maximum=self.config.max_tokens_per_request)
        ids = admission.check_token_ids(token_ids, t, self.spec)
        if self._inflight_tokens + tokens > self.config.max_queued_tokens:
            raise BackPressureError(limit="queued tokens", value=self._inflight_tokens + tokens, maximum=self.config.max_queued_tokens)
        if self._inflight_requests >= self.config.max_queued_requests:
            raise BackPressureError(limit="queued requests", value=self._inflight_requests + 1, maximum=self.config.max_queued_requests)
        x_TD = t.reshape(-1, self.spec.hidden_size).to(self.compute_dtype)
        fut = asyncio.get_running_loop().create_future()
        self.counters["requests"] += 1
        self._inflight_tokens += tokens
        self._inflight_requests += 1
        try:
            p = Pending(x_TD, tuple(t.shape), wire.dtype_name(t.dtype), ids, return_routing, request_id, fut, trace=_REQUEST_TRACE.get())
            alone = self.batcher.add(layer, p)
            if alone is not None:
                await alone
            return await fut
        finally:
            self._inflight_tokens -= tokens
            self._inflight_requests -= 1

    async def _run_batch(self, layer: int, reqs: list[Pending]) -> None:
        traces = [r.trace for r in reqs if r.trace]
        with Span(self.tracer, "moe.router.batch", parent=traces[0] if traces else "", links=traces[1:],
                  attributes={"moe.layer": layer, "moe.requests": len(reqs)}) as span:
            await self._run_batch_in(layer, reqs, span.traceparent)

    async def _run_batch_in(self, layer: int, reqs: list[Pending], trace: str) -> None:
        try:
            t_start = time.perf_counter()
            try:
                assignments = [self.planner.assign(layer, r.x_TD, r.token_ids) if r.assignments is None else r.assignments for r in reqs]
            except (Exception, asyncio.CancelledError) as e:
                settle(reqs, e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                return
            await self._serve(layer, reqs, assignments, trace, (t_start, time.perf_counter()))
        finally:
            self.batcher.done(layer)

    async def _serve(self, layer: int, reqs: list[Pending], assignments: list[Assignments], trace: str,
                     started: tuple[float, float]) -> None:
        """Plan, dispatch and answer gated requests. A request that needs an expert with no live replica
        never holds up the others: under failover 'fail' it fails alone; under 'wait' it waits apart
        (`_hold`), outside the batcher, and the rest go now.

        Every request it still holds ends here, answered or with the error that ended the batch (a
        cancellation cancels them); those handed to `_hold` are no longer its own.
        NOTE: a batch run in its own task carries other callers' requests: they end too, not hang.
        """
        try:
            await self._serve_owned(layer, reqs, assignments, trace, started)
        except (Exception, asyncio.CancelledError) as e:
            settle(reqs, e)
            if isinstance(e, asyncio.CancelledError):
                raise

    async def _serve_owned(self, layer: int, reqs: list[Pending], assignments: list[Assignments], trace: str,
                           started: tuple[float, float]) -> None:
        """`_serve`'s work; `reqs` and `assignments` are narrowed in place to the requests still its own.
        `started`: when the batch began and when its gate was done (a wait for a live replica is not in this
        batch: the requests go back to the batcher, so it counts as their queueing)."""
        m = self.metrics
        t_start, t_gate = started
        retries = 0  # batches given up on dead groups; waits for a live replica do not count
        hung = 0  # of them, on groups whose compute ran past compute_timeout_s
        x_all = _rows(reqs)
        while True:
            try:
                version = self.table.version
                batch, plan, offsets, degraded = self._plan(layer, assignments, x_all, [r.request_id for r in reqs])
            except NoLiveReplica as e:
                self._set_aside(layer, reqs, assignments, e.experts)
                go = [i for i in range(len(reqs)) if i not in e.experts]
                reqs[:], assignments[:] = [reqs[i] for i in go], [assignments[i] for i in go]
                if not reqs:
                    return
                x_all = _rows(reqs)
                continue
            self._planned[version] = self._planned.get(version, 0) + 1
            try:
                with Span(self.tracer, "moe.router.dispatch", parent=trace, attributes={"moe.groups": len({p.group for p in batch.parts})}) as ds:
                    sent = replace(batch, trace=ds.traceparent or trace, stats={})
                    y_ND, used = await self._dispatch(sent)
                    expert_s = sent.stats.get("expert_s")
                break
            except GroupsDown as e:
                retries += 1
                if retries > len(self.groups) + 8:
                    raise ExpertUnavailableError(layer=layer, expert=-1, reason="every retry met a dead group") from None
                if batch.groups is not self.groups:
                    # NOTE: planned with a table replaced since: its group numbers are not this table's.
                    log.info("expert groups of a replaced table down (%s); planning again on the current one", e.reason)
                    continue
                # NOTE: retry at once on the other replicas; the health watch revives a group that answers again.
                log.warning("expert groups %s down; planning around them", list(e.groups))
                self.dead.update(e.groups)
                self.counters["failovers"] = self.counters.get("failovers", 0) + 1
                if m is not None:
                    m.failovers.add(1, {"router": self.name})
                hung += e.hung
                if hung >= HUNG_GIVE_UPS:
                    # NOTE: the requests batched with it fail too (they shared its dispatch).
                    raise ExpertUnavailableError(layer=layer, expert=-1, reason=(
                        f"the batch computed past compute_timeout_s on {hung} expert groups in turn; not sent to another "
                        "(a batch that hangs every group it reaches)")) from None
            finally:
                self._planned[version] -= 1
                if not self._planned[version]:
                    del self._planned[version]
        t_dispatched = time.perf_counter()
        out_TD = combine(y_ND, plan, x_all.shape[0], self.spec.routing.weights_dtype)
        if layer in self.shared:
            out_TD += self.shared[layer].forward(x_all)
        self.counters["batches"] += 1
        by = self.counters["by_transport"]
        by[used] = by.get(used, 0) + 1
        for i, (r, a) in enumerate(zip(reqs, assignments)):
            out = out_TD[offsets[i] : offsets[i + 1]]
            mine = tuple(t - offsets[i] for t in degraded if offsets[i] <= t < offsets[i + 1])
            if not r.future.done():
                r.future.set_result(self._answer(r, out, a, used, len(reqs), mine))
        # NOTE: the books are kept after the answers leave, not before: the callbacks queued by
        # set_result run first, and this still runs before the loop takes any new call (a `load()`
        # sent after an answer arrived sees it counted).
        asyncio.get_running_loop().call_soon(self._keep_books, layer, reqs, assignments, degraded, used,
                                             (t_start, t_gate, t_dispatched, time.perf_counter(), expert_s))

    def _keep_books(self, layer: int, reqs: list[Pending], assignments: list[Assignments], degraded: list[int], used: str,
                    times: tuple[float, float, float, float, float | None]) -> None:
        """Usage counters and batch metrics of an answered batch."""
        for r, a in zip(reqs, assignments):
            self.usage.record(layer, a, r.token_ids)
        self.degraded_tokens[layer] += len(degraded)
        if self.metrics is not None:
            t_start = times[0]
            # plain numbers only: the queue must not keep the requests' tensors alive
            self.metrics.defer_soon(self.metrics.record_batch, layer, [t_start - r.t_enq for r in reqs],
                                    sum(int(r.x_TD.shape[0]) for r in reqs), [(int(a.dropped), int(a.rerouted)) for a in assignments],
                                    used, *times)

    def _metric_state(self) -> dict[str, Any]:
        """What the scrape-time gauges read (called on the exporter's thread: plain reads only)."""
        table, dead = self.table, frozenset(self.dead)
        replicas = {str(l): table.lookup_alive(l, dead)[2][: self.spec.num_experts].tolist() for l in self.spec.moe_layers}
        usage = {str(l): v for l, v in self.usage.counts().items()}
        return {"replicas": replicas, "groups": len(table.groups), "groups_alive": len(table.groups) - len(dead),
                "version": table.version, "usage": usage, "degraded": {str(l): n for l, n in self.degraded_tokens.items()}}

    def _plan(self, layer: int, assignments: list[Assignments], x_all: torch.Tensor, request_ids: Sequence[str] = ()) -> Planned:
        """Plan on the current table, around the groups known dead (see Planner.plan)."""
        return self.planner.plan(layer, assignments, x_all, request_ids, self.table, frozenset(self.dead), self.groups, self.addresses)

    async def _dispatch(self, batch: Batch) -> tuple[torch.Tensor, str]:
        """Try the transports of the chain in order, per batch; the first that answers wins.

        A batch served by any but the chain's first transport counts as a fallback, whether the
        preferred one failed on this batch or was skipped as known broken (a collective group
        being rebuilt); `fallbacks_by_from` says which transport was left.
        """
        errors = []
        for i, tname in enumerate(self.chain):
            t = self.transports[tname]
            if not t.available():
                continue
            try:
                y = await self._dispatch_watched(t, batch)
                if i > 0:
                    self.counters["fallbacks"] += 1
                    by = self.counters["fallbacks_by_from"]
                    by[self.chain[0]] = by.get(self.chain[0], 0) + 1
                return y, tname
            except GroupsDown:
                raise
            except TransportError as e:
                log.warning("batch falls back from %s: %s", tname, e)
                errors.append(str(e))
        raise ExpertUnavailableError(layer=batch.layer, expert=-1, reason="; ".join(errors) or "no transport available")

    def _answer(self, r: Pending, out_TD: torch.Tensor, a: Assignments, used: str, batched: int,
                degraded: tuple[int, ...] = ()) -> ForwardOutput:
        out = out_TD.to(wire.DTYPES[r.dtype]).reshape(r.shape)
        arr, name = wire.to_numpy(out)
        routing = {}
        if r.return_routing:
            routing = dict(
                token_index=a.token_N.numpy(), expert=a.expert_N.numpy(), weight=a.weight_N.float().numpy(),
                stats=routing_stats(a, self.spec.num_experts),
            )
        return ForwardOutput(
            hidden_states=arr, dtype=name, dropped=a.dropped, rerouted=a.rerouted, transport=used, degraded_tokens=degraded,
            batch_requests=batched, routing_table_version=self.table.version, **routing,
        )

    # -- admin -------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        rdt = self.transports.get("rdt")
        return {
            "name": self.name,
            "metrics_address": None if self.metrics is None else self.metrics.address,
            "chain": list(self.chain),
            "measured_ms": dict(self.measured_ms),
            "routing_table_version": self.table.version,
            "counters": {**self.counters, "by_transport": dict(self.counters["by_transport"]), "peak_in_flight": self.batcher.peak_in_flight,
                         "fallbacks_by_from": dict(self.counters["fallbacks_by_from"])},
            "rdt_rebuilds": getattr(rdt, "rebuilds", 0),
            "rdt_ready": bool(rdt is not None and rdt.ready),
            "rdt_routes": None if rdt is None else rdt.routes,
            "rdt_unavailable": None if rdt is None else rdt.unrouted,
            "rdt_owner": self.config.rdt_owner,
            "dead": sorted(self.dead),
            "expert_tokens": {int(l): v.tolist() for l, v in self.usage.tokens.items()},
        }

    async def service_status(self) -> dict[str, Any]:
        """What the gateway's Status RPC reports (see status_view.service_status)."""
        from router_svc import status_view

        return await status_view.service_status(self)

    def load(self, detail: bool = False) -> dict[str, Any]:
        """What the supervisor observes: tokens routed per (layer, expert) since start, the table
        version in use and the oldest version a batch in flight was planned with. `detail` adds
        co-activation matrices and each expert's most frequent token ids (reports)."""
        out = {"name": self.name, "at": time.time(), "version": self.table.version,
               "oldest_in_flight": min(self._planned, default=self.table.version),
               "expert_tokens": {int(l): v.tolist() for l, v in self.usage.tokens.items()}}
        if detail:
            snap = self.usage.snapshot()
            out.update(coactivation=snap["coactivation"], top_token_ids=snap["top_token_ids"],
                       replicas={int(l): [len(self.table.replicas(l, e)) for e in range(self.spec.num_experts)] for l in self.spec.moe_layers})
        return out

    async def update_table(self, table: RoutingTable, groups: Sequence[Any]) -> int:
        """Adopt a newer routing table atomically (batches planned after this call use it)."""
        if table.version <= self.table.version:
            return self.table.version
        rdt = self.transports["rdt"]
        if [g.name for g in table.groups] != [g.name for g in self.table.groups]:
            await rdt.close()  # members changed: RDT is built again with the new ones
        self.table = table
        self.groups = list(groups)
        self.addresses = [g.grpc_address for g in table.groups]
        for t in self.transports.values():
            t.groups, t.addresses = self.groups, self.addresses
        self.dead = set()
        self._placement_changed()
        return table.version

    async def set_transport(self, mode: str) -> dict[str, Any]:
        """Switch the transport mode at run time (same chains as `deployment.transport`)."""
        if mode not in FALLBACKS:
            raise ValueError(f"unknown transport mode {mode!r}; expected one of {sorted(FALLBACKS)}")
        self.config = self.planner.config = self.batcher.config = replace(self.config, transport=mode)  # one config for all three
        self.chain = self._chain_for(mode)
        rdt = self.transports["rdt"]
        if "rdt" in self.chain and not rdt.ready:
            await rdt.start()  # type: ignore[attr-defined]
        if mode == "auto":
            await self._measure()
        return {"chain": list(self.chain), "measured_ms": dict(self.measured_ms)}

    def spec_dict(self) -> dict[str, Any]:
        return self.spec.to_dict()

