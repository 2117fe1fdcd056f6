"""The engines `bench/service.py` times side by side, each behind `Engine.call(x [T, D]) -> [T, D]`:
LocalMoE in the driver, the deployment (through a Ray handle, or its gRPC gateway as an outside
client), one plain Ray actor per expert, and a Ray Serve application (a router deployment fanning
out to expert deployments through `DeploymentHandle`s). See service.py's docstring for the setup.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from local_engine import EXPERTS

LAYER = 0


class Engine:
    """`call(x [T, D] float32) -> [T, D]`; `prepare()` runs before each timed slot (not timed)."""

    name = ""
    kind = ""

    def prepare(self) -> None:
        return None

    def call(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.call(x), {}

    def counters(self) -> dict[str, float] | None:
        """Cumulative server-side counters (not timed), or None."""
        return None


class LocalEngine(Engine):
    name, kind = "local_moe", "local"

    def __init__(self, moe: Any) -> None:
        self.moe = moe

    def call(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe.forward(x, LAYER)


class DeploymentEngine(Engine):
    kind = "deployment"

    def __init__(self, dep: Any, mode: str, state: dict[str, Any]) -> None:
        import ray

        self.ray, self.dep, self.mode, self.state = ray, dep, mode, state
        self.name = f"moe[{mode}]"
        self.chains: list[list[str]] = []

    def prepare(self) -> None:
        if self.state.get("mode") != self.mode:
            r = self.ray.get(self.dep.routers[0].set_transport.remote(self.mode))
            self.state["mode"] = self.mode
            self.chains.append(r["chain"])
            if self.mode == "auto":
                self.state.setdefault("auto_measured_ms", []).append(r["measured_ms"])

    def call(self, x: torch.Tensor) -> torch.Tensor:
        return self.dep.forward(x, LAYER)

    def counters(self) -> dict[str, float]:
        """The router's requests and batches, and the groups' summed compute seconds and batches."""
        r = self.ray.get(self.dep.routers[0].status.remote())["counters"]
        gs = self.ray.get([g.stats.remote() for g in self.dep.groups])
        return {"requests": r["requests"], "batches": r["batches"], "group_busy_s": sum(g["busy_s"] for g in gs),
                "group_batches": sum(g["batches"] for g in gs)}

    def check(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        from expert_workers import wire

        out = self.dep.forward_output(x, LAYER)
        return wire.from_numpy(out.hidden_states, out.dtype).clone(), {"transport_used": out.transport}


class GatewayEngine(DeploymentEngine):
    """The same deployment called as an outside client would: `MoEClient` over the router's gRPC gateway
    (one `Forward` call per request, or with `stream` every request on one open `ForwardStream`)."""

    def __init__(self, dep: Any, mode: str, state: dict[str, Any], stream: bool = False) -> None:
        from router_svc.client import MoEClient

        super().__init__(dep, mode, state)
        self.name = f"moe[{mode}] gRPC {'stream' if stream else 'API'}"
        self.client = MoEClient(dep.gateway_addresses[0], stream=stream)

    def call(self, x: torch.Tensor) -> torch.Tensor:
        return self.client.forward(x, LAYER)

    def check(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        r = self.client.forward_response(x, LAYER)
        from expert_workers import wire

        h = r.hidden_states
        return wire.from_bytes(h.data, h.dtype, list(h.shape)).clone(), {"transport_used": r.transport}


class NaiveExpert:
    """One expert's weights in a plain Ray actor; numpy rows in, numpy rows out."""

    def __init__(self, path: str, expert: int, device: str = "cpu") -> None:
        from expert_workers.checkpoint import HFCheckpoint
        from expert_workers.ffn import GroupedExperts

        torch.set_num_threads(1)
        ck = HFCheckpoint(path)
        self.device = device
        self.experts = GroupedExperts([ck.expert(LAYER, expert).to(device=device)], activation=ck.spec.activation, gated=ck.spec.gated)

    def ping(self) -> bool:
        return True

    def forward(self, x: np.ndarray) -> np.ndarray:
        from expert_workers import wire

        with torch.no_grad():
            return self.experts.forward(wire.from_numpy(x, "float32").to(self.device), [x.shape[0]]).cpu().numpy()


# the share of the one GPU each baseline actor / replica takes with --device cuda (all fit beside the deployment)
NAIVE_GPUS = 0.05
SHARD_GPUS = 0.2


class NaiveRayEngine(Engine):
    """The driver gates (router_svc.gate.route + router_svc.dispatch), one actor call per expert hit, combines."""

    name, kind = "naive_ray", "baseline"

    def __init__(self, path: str, moe: Any, device: str = "cpu") -> None:
        import ray

        self.ray = ray
        cls = ray.remote(NaiveExpert).options(num_cpus=0.25, **({"num_gpus": NAIVE_GPUS} if device == "cuda" else {}))
        self.actors = [cls.remote(path, e, device) for e in range(EXPERTS)]
        ray.get([a.ping.remote() for a in self.actors])
        self.gate = moe.layer(LAYER).router.weight.float()
        self.routing = moe.spec.routing

    @torch.no_grad()
    def call(self, x: torch.Tensor) -> torch.Tensor:
        from router_svc.dispatch import combine, gather_rows, plan_by_expert
        from router_svc.gate import GateInput, route

        a = route(GateInput(logits_TE=F.linear(x.float(), self.gate)), self.routing)
        plan = plan_by_expert(a, EXPERTS)
        rows = gather_rows(x, plan).numpy()
        refs, start = [], 0
        for e, n in enumerate(plan.counts_E.tolist()):
            if n:
                refs.append(self.actors[e].forward.remote(rows[start:start + n]))
            start += n
        y = torch.from_numpy(np.concatenate(self.ray.get(refs)))
        return combine(y, plan, x.shape[0])

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


def _serve_app(path: str, max_ongoing: int, placement: list[list[int]], device: str = "cpu") -> Any:
    """A Ray Serve app as a Ray user would write it: a router deployment and one deployment per expert group."""
    from ray import serve

    shard_resources = {"num_cpus": 1, **({"num_gpus": SHARD_GPUS} if device == "cuda" else {})}

    @serve.deployment(max_ongoing_requests=max_ongoing, ray_actor_options=shard_resources)
    class ExpertShard:
        def __init__(self, path: str, experts: list[int], device: str) -> None:
            from expert_workers.checkpoint import HFCheckpoint
            from expert_workers.ffn import GroupedExperts

            torch.set_num_threads(1)
            ck = HFCheckpoint(path)
            self.device = device
            self.experts = GroupedExperts([ck.expert(LAYER, e).to(device=device) for e in experts], activation=ck.spec.activation,
                                          gated=ck.spec.gated)

        def __call__(self, x: np.ndarray, counts: list[int]) -> np.ndarray:
            from expert_workers import wire

            with torch.no_grad():
                return self.experts.forward(wire.from_numpy(x, "float32").to(self.device), counts).cpu().numpy()

    @serve.deployment(max_ongoing_requests=max_ongoing, ray_actor_options={"num_cpus": 1})
    class MoERouter:
        def __init__(self, path: str, shards: list, placement: list[list[int]]) -> None:
            from expert_workers.checkpoint import HFCheckpoint

            torch.set_num_threads(1)
            ck = HFCheckpoint(path)
            self.gate = ck.router(LAYER).weight.float()
            self.routing = ck.spec.routing
            self.shards, self.placement = shards, placement
            self.shard_of = torch.empty(EXPERTS, dtype=torch.int64)
            for g, experts in enumerate(placement):
                self.shard_of[experts] = g

        async def __call__(self, x: np.ndarray) -> np.ndarray:
            from expert_workers import wire
            from router_svc.gate import GateInput, route

            with torch.no_grad():
                x_TD = wire.from_numpy(x, "float32")
                a = route(GateInput(logits_TE=F.linear(x_TD, self.gate)), self.routing)
                key = self.shard_of[a.expert_N] * EXPERTS + a.expert_N  # sort by (shard, expert)
                order = torch.sort(key, stable=True).indices
                token, expert, weight = a.token_N[order], a.expert_N[order], a.weight_N[order]
                rows = x_TD.index_select(0, token).numpy()
                per_expert = torch.bincount(expert, minlength=EXPERTS).tolist()
                calls, start = [], 0
                for g, experts in enumerate(self.placement):
                    counts = [per_expert[e] for e in experts]
                    n = sum(counts)
                    if n:
                        calls.append(self.shards[g].remote(rows[start:start + n], counts))
                    start += n
                ys = await asyncio.gather(*calls)
                y = torch.from_numpy(np.concatenate(ys))
                out = torch.zeros_like(x_TD).index_add_(0, token, y * weight[:, None])
                return out.numpy()

    shards = [ExpertShard.options(name=f"experts-{g}").bind(path, experts, device) for g, experts in enumerate(placement)]
    return MoERouter.bind(path, shards, placement)


class ServeEngine(Engine):
    name, kind = "ray_serve", "baseline"

    def __init__(self, path: str, max_ongoing: int, placement: list[list[int]], device: str = "cpu") -> None:
        from ray import serve

        self.serve = serve
        # NOTE: no HTTP proxy at all (handles only), so nothing listens beyond Ray's own loopback ports.
        serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1"})
        self.handle = serve.run(_serve_app(path, max_ongoing, placement, device), name="moe_bench", route_prefix=None)

    def call(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.handle.remote(x.numpy()).result())


# -- timing --------------------------------------------------------------------
