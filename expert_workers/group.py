"""ExpertGroup: a set of (layer, expert) slots in one process, run as a grouped computation.

Legend: N rows sorted by local slot, D hidden.

A group knows nothing of routing. It is handed rows already sorted by its local
slot order (for each layer: routed experts ascending, then the shared expert, id
SHARED) with the expert ids and row counts, and returns the rows' FFN outputs in
the same order. `GroupCore` is the plain-Python part (testable without Ray);
`ExpertGroup` is the Ray actor around it, reachable three ways: plain actor calls
(object store), Ray Direct Transport (gloo on CPU, NCCL on GPU) and gRPC frames.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import ray
import torch

from expert_workers import collective, data_grpc, tie, wire
from expert_workers.errors import ConfigError, InvalidRequestError
from expert_workers.ffn import GroupedExperts
from expert_workers.source import SourceSpec, open_source

log = logging.getLogger(__name__)
# expert id of a layer's shared experts when they are hosted as a slot.
SHARED = -1
# a running batch counts as hung only past max(compute_timeout_s, this x the group's longest finished batch)
LONGEST_FACTOR = 4.0
# Ray concurrency groups of the actor: health calls and slot changes never queue behind compute.
CONCURRENCY_GROUPS = {"control": 2, "admin": 1}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def local_order(experts: Sequence[int]) -> list[int]:
    """A group's slot order within one layer: routed experts ascending, the shared slot last."""
    routed = sorted(e for e in experts if e != SHARED)
    return routed + ([SHARED] if SHARED in experts else [])


@dataclass
class _LayerSlots:
    experts: list[int]  # local order
    grouped: GroupedExperts | None
    shared: GroupedExperts | None  # the shared experts' FFN, one "expert"


class GroupCore:
    """Weights of the slots, the grouped compute over them, and per-slot counters."""

    def __init__(self, source: SourceSpec, slots: Sequence[tuple[int, int]], *, device: str, dtype: str) -> None:
        self.device = torch.device(device)
        self.dtype = wire.DTYPES[dtype]
        self._src = open_source(source)
        self.spec = self._src.spec
        self._lock = threading.Lock()
        # NOTE: one batch computes at a time whichever transport brought it (actor thread, gRPC
        # server threads): overlapping batches would only split the group's torch threads.
        self._compute = threading.Lock()
        self.layers: dict[int, _LayerSlots] = {}
        self.slots: list[tuple[int, int]] = []
        self.tokens: dict[tuple[int, int], int] = {}
        self.busy_s = 0.0
        self.batches = 0
        self.longest_s = 0.0  # the longest batch finished within its limit (see `limit_s`)
        # a running batch past `limit_s()` counts as hung (None: never); set by ExpertGroup
        self.compute_timeout_s: float | None = None
        # monotonic time the batch computing now began (None: idle); read by the health check
        self._computing_since: float | None = None
        # NOTE: with more than one torch thread on CPU, batches run on one thread of their own: each
        # thread that enters a parallel region keeps an OpenMP team of its own, and batches arriving on
        # several (gRPC server threads, the actor's thread) left idle teams spinning beside the working one
        # (8 rows, 2 threads: 5-15% slower per batch than from one thread). With one thread there is no
        # team, and no hand-off to pay.
        self._runner = (ThreadPoolExecutor(1, thread_name_prefix="moe-compute")
                        if self.device.type == "cpu" and torch.get_num_threads() > 1 else None)
        self.set_slots(slots)

    def _layer(self, layer: int, experts: Sequence[int]) -> _LayerSlots:
        order = local_order(experts)
        routed = [e for e in order if e != SHARED]
        bad = [e for e in routed if not 0 <= e < self.spec.num_experts]
        if layer not in self.spec.is_moe_layer or bad:
            raise ConfigError(field="slots", value=[(layer, e) for e in (bad or routed)],
                              expected=f"slots of MoE layers {list(self.spec.moe_layers)}, experts in [0, {self.spec.num_experts}) or {SHARED} (shared)")
        grouped = None
        if routed:
            # NOTE: read from the source each time a layer is built, not kept: the grouped compute holds
            # its own (packed or stacked) copy, and a second one here would double the group's memory.
            grouped = GroupedExperts([self._src.expert(layer, e).to(dtype=self.dtype, device=self.device) for e in routed],
                                     activation=self.spec.activation, gated=self.spec.gated)
        shared = None
        if SHARED in order:
            sw = self._src.shared(layer)
            if sw is None:
                raise ConfigError(field="slots", value=(layer, SHARED), expected=f"a shared-expert slot only on a model with shared experts (layer {layer} has no shared experts)")
            shared = GroupedExperts([sw.ffn.to(dtype=self.dtype, device=self.device)], activation=self.spec.activation, gated=self.spec.gated)
        return _LayerSlots(experts=order, grouped=grouped, shared=shared)

    def set_slots(self, slots: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """Host exactly `slots` from now on: load the weights of new ones, free those gone.

        Layers whose slot set changed are rebuilt off the compute lock and swapped in under it,
        so batches keep running meanwhile; a batch naming an expert no longer hosted is refused.
        """
        by_layer: dict[int, list[int]] = {}
        for layer, expert in slots:
            if int(expert) not in by_layer.setdefault(int(layer), []):
                by_layer[int(layer)].append(int(expert))
        # NOTE: every changed layer is built before any is swapped in: one that fails leaves the group as it was.
        built = {layer: self._layer(layer, experts) for layer, experts in sorted(by_layer.items())
                 if layer not in self.layers or sorted(self.layers[layer].experts) != sorted(local_order(experts))}
        with self._compute:
            layers = {layer: built.get(layer) or self.layers[layer] for layer in sorted(by_layer)}
            self.layers = layers
            self.slots = [(layer, e) for layer, ls in layers.items() for e in ls.experts]
            with self._lock:
                self.tokens = {slot: self.tokens.get(slot, 0) for slot in self.slots}
        return list(self.slots)

    def compute(self, layer: int, experts: Sequence[int], counts: Sequence[int], x_ND: torch.Tensor) -> torch.Tensor:
        """Rows sorted by this group's slot order -> FFN outputs (N, D), same order and dtype as x.

        `layer`, `experts` and `counts` must be integers (a frame's msgpack header may carry anything:
        a count of 1.5 would pass a sum check and shift rows onto the next slot)."""
        if not _is_int(layer):
            raise InvalidRequestError(field="layer", problem=f"{layer!r} is not an integer")
        for field, values in (("experts", experts), ("counts", counts)):
            if not isinstance(values, (list, tuple)) or not all(_is_int(v) for v in values):
                raise InvalidRequestError(field=field, problem=f"{values!r} is not a list of integers")
        if x_ND.dim() != 2 or x_ND.shape[1] != self.spec.hidden_size:
            raise InvalidRequestError(field="rows", problem=f"shape {tuple(x_ND.shape)}; expected (rows, {self.spec.hidden_size})")
        if any(c < 0 for c in counts):
            raise InvalidRequestError(field="counts", problem=f"negative count in {list(counts)}")
        if len(experts) != len(counts) or sum(counts) != x_ND.shape[0]:
            raise InvalidRequestError(field="counts", problem=f"{len(experts)} experts, counts {list(counts)} for {x_ND.shape[0]} rows")
        with self._compute:
            # NOTE: the layer is read under the compute lock: a batch naming slots `set_slots` has just
            # removed is refused, never computed after it returned.
            ls = self.layers.get(layer)
            if ls is None:
                raise InvalidRequestError(field="layer", problem=f"this group hosts no slot of layer {layer}")
            pos = {e: i for i, e in enumerate(ls.experts)}
            missing = [e for e in experts if e not in pos]
            if missing:
                raise InvalidRequestError(field="experts", problem=f"layer {layer} experts {missing} are not hosted here (hosted: {ls.experts})")
            idx = [pos[e] for e in experts]
            if idx != sorted(idx) or len(set(idx)) != len(idx):
                raise InvalidRequestError(field="experts", problem=f"experts {list(experts)} not in slot order {ls.experts}")
            n_routed = len(ls.experts) - (1 if ls.shared is not None else 0)
            full = [0] * len(ls.experts)
            for i, c in zip(idx, counts):
                full[i] = c
            t0 = time.perf_counter()
            self._computing_since = time.monotonic()
            try:
                if self._runner is None:
                    out = self._run(ls, x_ND, full[:n_routed])
                else:
                    out = self._runner.submit(self._run, ls, x_ND, full[:n_routed]).result()
            finally:
                self._computing_since = None
            dt = time.perf_counter() - t0
        with self._lock:
            for e, c in zip(experts, counts):
                if (layer, e) in self.tokens:  # not a slot set_slots removed meanwhile
                    self.tokens[(layer, e)] += c
            self.busy_s += dt
            self.batches += 1
            if dt <= self.limit_s():  # one that ran past it was taken for hung: not an honest length
                self.longest_s = max(self.longest_s, dt)
        return out.to(x_ND.dtype) if out.dtype != x_ND.dtype else out

    def _run(self, ls: _LayerSlots, x_ND: torch.Tensor, routed_counts: list[int]) -> torch.Tensor:
        """The grouped compute over rows in slot order: the routed experts' rows, then the shared slot's."""
        with torch.no_grad():
            x = x_ND.to(device=self.device, dtype=self.dtype)
            out = torch.empty_like(x)
            split = sum(routed_counts)
            if split:
                out[:split] = ls.grouped.forward(x[:split], routed_counts)  # type: ignore[union-attr]
            if split < x.shape[0]:
                out[split:] = ls.shared.forward(x[split:], [x.shape[0] - split])  # type: ignore[union-attr]
            if self.device.type == "cuda":
                # NOTE: CUDA kernels run after their launch returns; without this a hung kernel would
                # block later (the copy out, the NCCL send), outside the timed window, and go unseen.
                torch.cuda.current_stream(self.device).synchronize()
        return out

    def computing_for(self) -> float:
        """Seconds the batch computing now has been at it (0.0 when none is)."""
        since = self._computing_since
        return 0.0 if since is None else max(time.monotonic() - since, 0.0)

    def limit_s(self) -> float:
        """How long a batch may compute before it counts as hung: `compute_timeout_s`, and never less than
        LONGEST_FACTOR x the longest batch finished within its limit (inf when there is no timeout)."""
        if self.compute_timeout_s is None:
            return math.inf
        return max(self.compute_timeout_s, LONGEST_FACTOR * self.longest_s)

    def hung(self) -> bool:
        """The batch computing now has run past `limit_s()`."""
        return self.computing_for() > self.limit_s()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "tokens": [[layer, e, n] for (layer, e), n in self.tokens.items()],
                "busy_s": self.busy_s,
                "batches": self.batches,
            }


# torch's CPU allocator puts allocations of 2 MiB and more in transparent huge pages when this is 1.
THP_ENV = "THP_MEM_ALLOC_ENABLE"


def huge_pages() -> dict[str, Any]:
    """Whether this process asked torch for huge pages, and the kernel's THP mode (cheap: two small reads)."""
    mode = ""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = next((w.strip("[]") for w in f.read().split() if w.startswith("[")), "")
    except OSError:  # not Linux, or no THP
        pass
    return {"huge_pages": os.environ.get(THP_ENV) == "1", "thp_mode": mode}


def huge_page_bytes() -> int:
    """Bytes this process holds in transparent huge pages (0 where the kernel does not say).

    NOTE: the kernel walks the whole address space to answer (about 8 ms for a group holding 300 MiB,
    20 ms while it computes, its compute contending for the same page-table lock), so it is read only
    on request (`ExpertGroup.memory`), never on the health and status paths."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("AnonHugePages:")), 0)
    except OSError:
        return 0


class ExpertGroup:
    """The Ray actor hosting a GroupCore. Created by `cluster.deploy` with `ray.remote(ExpertGroup)`."""

    def __init__(
        self,
        name: str,
        source: SourceSpec,
        slots: Sequence[tuple[int, int]],
        *,
        device: str = "cpu",
        dtype: str = "float32",
        num_threads: int = 1,
        grpc_host: str = "127.0.0.1",
        telemetry: Any = None,
        tied_to: tuple[str, str | None] | None = None,
        compute_timeout_s: float | None = None,
    ) -> None:
        """`tied_to` (name, namespace): end this actor once that actor is gone (see expert_workers.tie).
        `compute_timeout_s`: a batch computing longer than this makes `ping` answer False (None: never)."""
        if device == "cpu":
            torch.set_num_threads(max(1, int(num_threads)))
        collective.bound_waits()
        collective.store_on_its_address()
        self.name = name
        self._stall_logged = False
        self.core = GroupCore(source, slots, device=device, dtype=dtype)
        self.core.compute_timeout_s = compute_timeout_s
        from expert_workers.telemetry import make_tracer

        self.tracer, self._tracing = make_tracer(telemetry, name)
        self._server, port = data_grpc.serve(self._grpc_forward, host=grpc_host)
        self.grpc_address = f"{grpc_host}:{port}"
        tie.tie_to(tied_to)

    @ray.method(concurrency_group="control")
    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {
            "healthy": not self.core.hung(),
            "computing_s": self.core.computing_for(),
            "name": self.name,
            "node_id": ctx.get_node_id(),
            "pid": os.getpid(),
            "device": str(self.core.device),
            "slots": [list(s) for s in self.core.slots],
            "grpc_address": self.grpc_address,
            "threads": torch.get_num_threads(),
            "gpu_ids": collective.gpu_ids(),
            **huge_pages(),
        }

    @ray.method(concurrency_group="control")
    def ping(self) -> bool:
        """Answered on its own thread, so a group busy computing still reads as alive: True, unless
        one batch has computed for longer than `compute_timeout_s` (a hung kernel or a stuck device
        leaves the process answering while no batch ever returns). Routers then give up what they
        sent here and plan around it; a supervisor replaces the group at its first False. Without
        one, the group reads healthy again once that batch returns. The limit never drops below
        LONGEST_FACTOR x the longest batch the group has finished."""
        if not self.core.hung():
            self._stall_logged = False
            return True
        if not self._stall_logged:
            self._stall_logged = True
            log.error("expert group %s: one batch has computed for %.1f s (limit %.1f s: compute_timeout_s %s, %gx its longest "
                      "finished batch %.2f s); reporting unhealthy", self.name, self.core.computing_for(), self.core.limit_s(),
                      self.core.compute_timeout_s, LONGEST_FACTOR, self.core.longest_s)
        return False

    @ray.method(concurrency_group="admin")
    def set_slots(self, slots: Sequence[tuple[int, int]]) -> list[list[int]]:
        """Host exactly `slots` (the supervisor adds a replica before publishing it, and removes
        one after routers drained it). Loading runs beside compute, not behind it."""
        return [list(s) for s in self.core.set_slots([(int(l), int(e)) for l, e in slots])]

    @ray.method(concurrency_group="control")
    def stats(self) -> dict[str, Any]:
        return self.core.stats()

    @ray.method(concurrency_group="control")
    def memory(self) -> dict[str, Any]:
        """What this process holds: resident bytes and, of them, bytes in transparent huge pages. Costs
        a walk of the address space (see `huge_page_bytes`): for reports, not for health checks."""
        rss = 0
        try:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            pass
        return {"rss_bytes": rss, "huge_page_bytes": huge_page_bytes()}

    def forward(self, layer: int, experts: list[int], counts: list[int], x: np.ndarray, dtype: str, trace: str = "") -> np.ndarray:
        """Object-store path: numpy in (zero-copy read), numpy out."""
        return self.forward_timed(layer, experts, counts, x, dtype, trace)[0]

    def forward_timed(self, layer: int, experts: list[int], counts: list[int], x: np.ndarray, dtype: str,
                      trace: str = "") -> tuple[np.ndarray, float]:
        """`forward` plus the seconds the experts computed (the router's `expert` stage)."""
        t0 = time.perf_counter()
        y = self._traced_compute(layer, experts, counts, wire.from_numpy(x, dtype), trace)
        return wire.to_numpy(y)[0], time.perf_counter() - t0

    def _span(self, trace: str, layer: int, rows: int) -> Any:
        from expert_workers.telemetry import Span

        return Span(self.tracer if trace else None, "moe.group.compute", parent=trace,
                    attributes={"moe.group": self.name, "moe.layer": int(layer), "moe.rows": int(rows)})

    @ray.method(tensor_transport="gloo")
    def forward_gloo(self, layer: int, experts: list[int], counts: list[int], x: torch.Tensor, trace: str = "") -> torch.Tensor:
        """RDT path on CPU: the tensor arrives from and returns to a collective-group peer over gloo."""
        return self._traced_compute(layer, experts, counts, x, trace)

    @ray.method(tensor_transport="nccl")
    def forward_nccl(self, layer: int, experts: list[int], counts: list[int], x: torch.Tensor, trace: str = "") -> torch.Tensor:
        """RDT path on GPU from a peer on another GPU: NCCL."""
        return self._traced_compute(layer, experts, counts, x, trace)

    @ray.method(tensor_transport="cuda_ipc")
    def forward_cuda_ipc(self, layer: int, experts: list[int], counts: list[int], x: torch.Tensor, trace: str = "") -> torch.Tensor:
        """RDT path on GPU from a peer on this group's GPU: CUDA IPC (the peers map each other's memory)."""
        return self._traced_compute(layer, experts, counts, x, trace)

    def _traced_compute(self, layer: int, experts: list[int], counts: list[int], x: torch.Tensor, trace: str) -> torch.Tensor:
        with self._span(trace, layer, x.shape[0] if x.dim() else 0):
            return self.core.compute(layer, experts, counts, x)

    def _grpc_forward(self, header: dict[str, Any], payload: memoryview) -> tuple[dict[str, Any], Any]:
        try:
            dtype, shape, layer, experts, counts = (header[k] for k in ("dtype", "shape", "layer", "experts", "counts"))
        except KeyError as e:
            raise InvalidRequestError(field="header", problem=f"missing key {e}") from None
        if not isinstance(dtype, str) or not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise InvalidRequestError(field="header", problem=f"dtype {dtype!r} and shape {shape!r}: expected a string and a list of integers")
        if not _is_int(layer):  # before the span names it (experts and counts: GroupCore.compute checks them)
            raise InvalidRequestError(field="header", problem=f"layer {layer!r}: expected an integer")
        x = wire.from_bytes(payload, dtype, shape)
        t0 = time.perf_counter()
        y = self._traced_compute(layer, experts, counts, x, str(header.get("traceparent") or ""))
        data, name, shape = wire.to_bytes(y)
        return {"dtype": name, "shape": list(shape), "request_ids": header.get("request_ids", []),
                "compute_s": time.perf_counter() - t0}, data

    def reset_collective(self) -> bool:
        """Drop this process's torch.distributed state after its collective group broke (see
        expert_workers.collective)."""
        return collective.reset()

    def shutdown(self) -> None:
        """Stop the data-plane server and export the spans still buffered (see `close_tracing`)."""
        from expert_workers.telemetry import close_tracing

        self._server.stop(grace=0)
        close_tracing(self._tracing)
