"""deploy(config) -> Deployment: expert groups, routers and their wiring on a Ray cluster.

On the current Ray cluster, the one at `address`, or an embedded local one when none
is running. Actors live in the namespace `moe-serve`, named `<name>-group-<i>` and
`<name>-router-<i>`; `Deployment.shutdown()` removes every actor it made.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
import uuid
from dataclasses import replace
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import ray
import torch
from ray.experimental import internal_kv

from cluster.actors import end_actors
from cluster.config import ServiceConfig, load_config
from cluster.placement import all_slots, spread_replicated
from expert_workers import wire
from expert_workers.errors import MoEServeError
from cluster.supervisor import KV_NAMESPACE, Supervisor, state_key
from expert_workers.group import CONCURRENCY_GROUPS, THP_ENV, ExpertGroup
from expert_workers.source import open_source
from expert_workers.spec import MoESpec
from router_svc.config import DataPlaneConfig
from router_svc.gateway import GatewayConfig
from router_svc import names
from router_svc.local import RoutingReport
from router_svc.router import ForwardOutput, Router
from router_svc.table import GroupRef, RoutingTable
from router_svc.transports.rdt import PEER_GPUS

NAMESPACE = names.NAMESPACE
log = logging.getLogger(__name__)


def _ensure_ray(address: str | None, cpus_needed: float) -> bool:
    """Connect to Ray (or start an embedded local instance). Returns True if this call started it."""
    if ray.is_initialized():
        return False
    env_address = os.environ.get("RAY_ADDRESS", "")
    if address is None and env_address and env_address != "local":
        address = "auto"  # a `ray job submit` driver: join the cluster it runs on
    if address is not None:
        ray.init(address=address, namespace=NAMESPACE)
        return False
    cpus = max(os.cpu_count() or 1, int(cpus_needed + 0.999))
    start_local_ray(namespace=NAMESPACE, num_cpus=cpus, include_dashboard=False)
    return True


@contextlib.contextmanager
def one_machine_ray() -> Iterator[None]:
    """Within it, Ray starts nodes and connects drivers as a one-machine cluster, so 127.0.0.1 stays
    127.0.0.1.

    NOTE: otherwise Ray turns a node address of 127.0.0.1 (`_node_ip_address`, `node_ip_address`) back
    into the machine's routable address, and its servers listen on every interface; a driver
    connecting by a loopback address is sent to the routable one. The switch is the one Ray uses on
    macOS and Windows (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read into a constant at import); a
    driver in another process joins by address only with that variable set to 0.
    """
    import ray._private.ray_constants as ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def start_local_ray(**init_kwargs: Any) -> None:
    """Start a fresh embedded Ray on this machine with every server of it on 127.0.0.1 (address="local"
    always starts a fresh instance, whatever RAY_ADDRESS says, "local" included)."""
    with one_machine_ray():
        ray.init(address="local", _node_ip_address="127.0.0.1", **init_kwargs)


PLACE_TIMEOUT_S = 300.0
# deployment.replica_min_rows when unset, per device: about the rows at which one copy's GEMM stops being
# bound by reading its weights (float32 on a CPU core; half precision on a data-center GPU is past 128)
REPLICA_MIN_ROWS = {"cpu": 16, "cuda": 128}


def _placed(refs: list, what: str, cpus: float) -> list:
    """ray.get with a deadline, so a cluster without room fails with a reason instead of hanging."""
    try:
        return ray.get(refs, timeout=PLACE_TIMEOUT_S)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, MoEServeError):  # a reason of ours (a config the node cannot honour): say it as is
            raise cause from None
        raise
    except ray.exceptions.GetTimeoutError:
        have = ray.cluster_resources().get("CPU", 0)
        raise TimeoutError(f"{what} not ready after {PLACE_TIMEOUT_S:.0f} s; the cluster may lack room "
                           f"(they need {cpus:g} CPUs, the cluster has {have:g})") from None


def group_gpu_request(group_gpus: float) -> float:
    """The GPUs a CUDA group asks Ray for: `group_gpus`, less the router's RDT peer's share (PEER_GPUS)
    where it is at most one GPU, so that peer finds room on a GPU beside the groups (Ray takes no
    fraction above one GPU: a group of several GPUs asks for them whole)."""
    if PEER_GPUS < group_gpus <= 1:
        return round(group_gpus - PEER_GPUS, 4)
    return group_gpus


def _resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"


def deploy(config: str | os.PathLike[str] | Mapping[str, Any] | ServiceConfig, address: str | None = None,
           *, detached: bool = False, progress: Callable[[str], None] | None = None) -> "Deployment":
    """Create the deployment; `detached` actors outlive this process (`moe-serve up`).

    `progress` receives a line per step (groups placed, weights loaded per group, routers, supervisor).
    """
    cfg = load_config(config)
    d = cfg.deployment
    started = _ensure_ray(address, d.expert_groups * d.group_cpus + d.routers * d.router_cpus)
    try:
        dep = _create(cfg, detached=detached, progress=progress or (lambda _line: None))
        dep.started_ray = started
        return dep
    except BaseException:
        if started:
            ray.shutdown()
        raise


def _create(cfg: ServiceConfig, *, detached: bool = False, progress: Callable[[str], None]) -> "Deployment":
    d = cfg.deployment
    source = cfg.model.source()
    spec: MoESpec = open_source(source).spec
    routing = cfg.routing_spec(spec.routing)
    if routing is not None:
        spec = replace(spec, routing=routing)
    device = _resolve_device(d.device)
    run_id = uuid.uuid4().hex[:6]
    name = f"{d.name}-{run_id}"
    group_cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(ExpertGroup)
    groups, routers = [], []
    supervisor = None
    # the same for the groups made here and those the supervisor makes later (replacements, added groups)
    group_kwargs = dict(device=device, dtype=cfg.model.dtype, num_threads=max(1, int(d.group_cpus)), grpc_host=d.grpc_host,
                        telemetry=cfg.telemetry, compute_timeout_s=None if d.compute_timeout_s is None else float(d.compute_timeout_s))
    try:
        for i in range(d.expert_groups):
            # NOTE: SPREAD puts groups on different nodes where there are several, so replicas of one
            # expert (always on distinct groups) rarely share a node.
            opts: dict[str, Any] = {"name": names.group(name, i), "namespace": NAMESPACE, "num_cpus": d.group_cpus,
                                    "scheduling_strategy": "SPREAD"}
            if detached:
                opts["lifetime"] = "detached"
            if device == "cuda":
                opts["num_gpus"] = group_gpu_request(d.group_gpus)
            elif d.huge_pages:
                # NOTE: read once by torch when the process starts, so it must be in the worker's environment
                # (Ray merges these variables into any runtime_env the job has).
                opts["runtime_env"] = {"env_vars": {THP_ENV: "1"}}
            groups.append(group_cls.options(**opts).remote(names.group(name, i), source, [], **group_kwargs))
        infos = _placed([g.info.remote() for g in groups], "expert groups", d.expert_groups * d.group_cpus)
        # NOTE: slots are dealt once Ray placed the groups, so copies of one expert go to groups
        # on different nodes wherever the cluster has them.
        placement = spread_replicated(all_slots(spec, shared_as_slot=d.shared_experts == "slot"), d.expert_groups,
                                      d.replicas, nodes=[i["node_id"] for i in infos])
        progress(f"{len(groups)} expert groups placed on {len({i['node_id'] for i in infos})} node(s); loading weights")
        pending = {g.set_slots.remote(slots): i for i, (g, slots) in enumerate(zip(groups, placement))}
        deadline = time.monotonic() + PLACE_TIMEOUT_S
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(deadline - time.monotonic(), 0.0))
            if not ready:
                raise TimeoutError(f"expert groups did not load their weights within {PLACE_TIMEOUT_S:.0f} s")
            i = pending.pop(ready[0])
            ray.get(ready[0])
            progress(f"weights loaded: group {i} ({len(placement[i])} slots), {len(groups) - len(pending)}/{len(groups)}")
        table = RoutingTable.build(1, spec.num_experts, [GroupRef(i["name"], i["grpc_address"], i["node_id"]) for i in infos], placement)
        gw = cfg.gateway
        dp = DataPlaneConfig(transport=d.transport, batch_max_tokens=d.batch_max_tokens, batch_max_wait_us=d.batch_max_wait_us,
                             batch_max_in_flight=d.batch_max_in_flight,
                             device=device, dtype=cfg.model.dtype, shared_experts=d.shared_experts, failover=d.failover,
                             replica_min_rows=REPLICA_MIN_ROWS[device] if d.replica_min_rows is None else d.replica_min_rows,
                             max_tokens_per_request=gw.max_tokens_per_request, max_queued_tokens=gw.max_queued_tokens,
                             max_queued_requests=gw.max_queued_requests)
        router_cls = ray.remote(Router)
        router_specs = []
        for i in range(d.routers):
            spec_i = {"options": dict(num_cpus=d.router_cpus, max_concurrency=1000, lifetime="detached" if detached else None),
                      "kwargs": dict(name=names.router(name, i), source=source, routing=routing, config=replace(dp, rdt_owner=i == 0),
                                     namespace=NAMESPACE, gateway=_gateway_config(cfg, i), telemetry=cfg.telemetry, index=i)}
            router_specs.append(spec_i)
            routers.append(router_cls.options(name=names.router(name, i), namespace=NAMESPACE, **spec_i["options"]).remote(
                table=table, groups=groups, **spec_i["kwargs"]))
        progress(f"starting {len(routers)} router(s) (transport {d.transport})")
        started = _placed([r.start.remote() for r in routers], "routers", d.routers * d.router_cpus)
        if d.supervisor:
            group_opts = {k: v for k, v in opts.items() if k not in ("name", "namespace")}
            sup_opts: dict[str, Any] = dict(name=names.supervisor(name), namespace=NAMESPACE, num_cpus=0, max_restarts=-1)
            if detached:
                sup_opts["lifetime"] = "detached"
            supervisor = ray.remote(Supervisor).options(**sup_opts).remote(
                name, NAMESPACE, source, group_opts, group_kwargs, placement, spec.num_experts,
                [names.group(name, i) for i in range(len(groups))], [names.router(name, i) for i in range(len(routers))],
                d.supervisor_period_s, policy=d.elastic(), router_specs=router_specs, detached=detached)
            ray.get(supervisor.status.remote())
            progress("supervisor running")
    except BaseException:
        # NOTE: the supervisor first: it restarts when killed and would re-create the routers and groups.
        if supervisor is not None:
            _remove_supervisor(supervisor, name)
        for actor in routers + groups:
            ray.kill(actor)
        _kill_named(name)  # what the supervisor made meanwhile
        raise
    dep = Deployment(name=name, spec=spec, config=cfg, groups=groups, routers=routers, table=table, device=device)
    dep.supervisor = supervisor
    dep.gateway_addresses = [s["gateway"] for s in started if s.get("gateway")]
    dep.metrics_addresses = [s["metrics"] for s in started if s.get("metrics")]
    return dep


def _remove_supervisor(supervisor: Any, name: str) -> None:
    """Stop deployment `name`'s supervisor (it deletes its saved state), end it for good and delete
    the state should it not have answered."""
    _stop_supervisor(supervisor)
    _end_supervisor(supervisor, name)


def _stop_supervisor(supervisor: Any) -> None:
    """Its reconcile loop stops (no replacement made from here on) and it deletes its saved state."""
    try:
        ray.get(supervisor.stop.remote(), timeout=60)
    except Exception as e:
        log.info("supervisor stop: %s", e)


def _end_supervisor(supervisor: Any, name: str) -> None:
    """Kill it for good (no restart) and delete its saved state should `stop` not have answered."""
    ray.kill(supervisor, no_restart=True)
    internal_kv._internal_kv_del(state_key(name), namespace=KV_NAMESPACE)


def _kill_named(name: str) -> None:
    """Kill every actor of deployment `name` by its name (those the supervisor made included)."""
    for _, actor in named_actors(name):
        try:
            ray.kill(actor)
        except Exception:
            pass


def named_actors(name: str) -> list[tuple[str, Any]]:
    """(name, handle) of deployment `name`'s live named actors (its supervisor included)."""
    out = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == NAMESPACE and names.owned_by(name, entry["name"]):
            with contextlib.suppress(ValueError):  # gone since it was listed
                out.append((entry["name"], ray.get_actor(entry["name"], namespace=NAMESPACE)))
    return out


def _gateway_config(cfg: ServiceConfig, index: int) -> GatewayConfig | None:
    gw = cfg.gateway
    if not gw.enabled:
        return None
    return GatewayConfig(host=gw.host, port=gw.port + index if gw.port else 0, token=cfg.auth.token,
                         tls_cert=cfg.tls.cert, tls_key=cfg.tls.key, tls_client_ca=cfg.tls.client_ca)


class Deployment:
    """A running deployment. `forward` has LocalMoE's signature and semantics."""

    def __init__(self, *, name: str, spec: MoESpec, config: ServiceConfig, groups: list, routers: list,
                 table: RoutingTable, device: str) -> None:
        self.name = name
        self.spec = spec
        self.config = config
        self.groups = groups
        self.routers = routers
        self.table = table
        self.device = device
        self._next = itertools.count()
        self._closed = False
        # True when deploy() started an embedded Ray for this deployment; shutdown() then stops it.
        self.started_ray = False
        self.gateway_addresses: list[str] = []
        self.metrics_addresses: list[str] = []
        self.supervisor: Any = None
        # the expert groups serving as last known ({name, node_id, slots}) and handles by name (see `_serving`)
        self._views: list[dict[str, Any]] = [{"name": g.name, "node_id": g.node_id, "slots": [list(x) for x in table.placement[i]]}
                                             for i, g in enumerate(table.groups)]
        self._handles: dict[str, Any] = {g.name: h for g, h in zip(table.groups, groups)}

    def submit(self, hidden_states: torch.Tensor | np.ndarray, layer: int, token_ids: Any = None,
               return_routing: bool = False, request_id: str = "") -> ray.ObjectRef:
        """Send a request to the next router; returns the ObjectRef of its ForwardOutput."""
        if isinstance(hidden_states, torch.Tensor):
            x, dtype = wire.to_numpy(hidden_states)
        elif isinstance(hidden_states, np.ndarray):
            x, dtype = hidden_states, str(hidden_states.dtype)
        else:
            x, dtype = hidden_states, "float32"
        ids = token_ids.cpu().numpy() if isinstance(token_ids, torch.Tensor) else token_ids
        router = self.routers[next(self._next) % len(self.routers)]
        return router.forward.remote(x, dtype, layer, ids, return_routing, request_id)

    def result(self, ref: ray.ObjectRef, like: Any, return_routing: bool = False, timeout: float | None = None) -> Any:
        try:
            out: ForwardOutput = ray.get(ref, timeout=timeout)
        except ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None
        y = wire.from_numpy(out.hidden_states, out.dtype)
        value: Any = y.numpy() if isinstance(like, np.ndarray) else y.clone()
        if not return_routing:
            return value
        report = RoutingReport(
            token_index=torch.from_numpy(np.array(out.token_index)), expert=torch.from_numpy(np.array(out.expert)),
            weight=torch.from_numpy(np.array(out.weight)), stats=out.stats,
        )
        return value, report

    def forward(self, hidden_states: torch.Tensor | np.ndarray, layer: int, token_ids: Any = None,
                return_routing: bool = False) -> Any:
        for attempt in range(2):
            ref = self.submit(hidden_states, layer, token_ids, return_routing)
            try:
                return self.result(ref, hidden_states, return_routing)
            except ray.exceptions.RayActorError:
                if attempt or not self._refresh_routers():
                    raise
        raise AssertionError("unreachable")

    __call__ = forward

    def forward_output(self, hidden_states: torch.Tensor, layer: int, token_ids: Any = None) -> ForwardOutput:
        """The router's full answer (transport used, batch size, table version) for one request."""
        for attempt in range(2):
            try:
                return ray.get(self.submit(hidden_states, layer, token_ids, False))
            except ray.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause() from None
            except ray.exceptions.RayActorError:
                if attempt or not self._refresh_routers():
                    raise
        raise AssertionError("unreachable")

    def _refresh_routers(self, timeout: float = 60.0) -> bool:
        """A router died: take the handles of the routers the supervisor re-created (same names).

        Requests are pure functions of their input, so the one that met the dead router is sent again.
        """
        if self.supervisor is None:
            return False
        # NOTE: only dead handles are swapped: dropping the handle that created a live router would end it.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                for i, h in enumerate(self.routers):
                    try:
                        ray.get(h.load.remote(), timeout=10)
                    except ray.exceptions.RayActorError:
                        fresh = ray.get_actor(names.router(self.name, i), namespace=NAMESPACE)
                        ray.get(fresh.load.remote(), timeout=10)
                        self.routers[i] = fresh
                return True
            except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                time.sleep(0.2)
        return False

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        supervisor = self._supervisor_status(timeout)
        groups = []
        for view, g in self._serving(supervisor):
            entry: dict[str, Any] = {**view, "device": self.device}
            try:
                if g is None:
                    raise ValueError(f"no actor named {view['name']}")
                entry.update(alive=True, **ray.get(g.stats.remote(), timeout=timeout))
            except Exception as e:
                entry.update(alive=False, error=str(e))
            groups.append(entry)
        routers = []
        for r in self.routers:
            try:
                routers.append({"alive": True, **ray.get(r.status.remote(), timeout=timeout)})
            except Exception as e:
                routers.append({"alive": False, "error": str(e)})
        version = max([self.table.version] + [r.get("routing_table_version", 0) for r in routers])
        return {"name": self.name, "model": self.spec.family, "device": self.device,
                "routing_table_version": version, "groups": groups, "routers": routers, "supervisor": supervisor}

    def health(self, timeout: float = 10.0) -> bool:
        """True when every router answers and every expert group now serving answers healthy (a group
        one of whose batches computed past `compute_timeout_s` answers False)."""
        try:
            groups = [g for _, g in self._serving(self._supervisor_status(timeout))]
            if any(g is None for g in groups):
                return False
            answers = ray.get([r.status.remote() for r in self.routers] + [g.ping.remote() for g in groups], timeout=timeout)
            return all(ok is True for ok in answers[len(self.routers):])
        except Exception:
            return False

    def current_groups(self) -> list[Any]:
        """Handles of the expert groups now serving (the supervisor replaces dead ones)."""
        if self.supervisor is None:
            return list(self.groups)
        names = ray.get(self.supervisor.status.remote(), timeout=30)["groups"]
        return [ray.get_actor(n, namespace=NAMESPACE) for n in names]

    def _supervisor_status(self, timeout: float) -> dict[str, Any] | None:
        """The supervisor's status; {"alive": False, "error": ...} when it does not answer; None without one."""
        if self.supervisor is None:
            return None
        try:
            return ray.get(self.supervisor.status.remote(), timeout=timeout)
        except Exception as e:
            return {"alive": False, "error": str(e)}

    def _serving(self, supervisor: dict[str, Any] | None) -> list[tuple[dict[str, Any], Any]]:
        """({name, node_id, slots}, handle or None) of every expert group now serving.

        NOTE: the supervisor replaces, adds and removes groups, so its answer is the truth; while it
        does not answer (restarting) the last answer stands, and without a supervisor the deployed groups.
        """
        if supervisor is not None and "group_info" in supervisor:
            self._views = [{"name": i["name"], "node_id": i["node_id"], "slots": i["slots"]} for i in supervisor["group_info"]]
        out = []
        for view in self._views:
            handle = self._handles.get(view["name"])
            if handle is None:
                with contextlib.suppress(ValueError):
                    handle = self._handles[view["name"]] = ray.get_actor(view["name"], namespace=NAMESPACE)
            out.append((view, handle))
        return out

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        # NOTE: the supervisor stops first (it would replace what is ended here) and is killed last: the actors
        # it made for a driver's deployment are tied to it and would end on their own, unflushed, without it.
        if self.supervisor is not None:
            _stop_supervisor(self.supervisor)
        named = [(n, a) for n, a in named_actors(self.name) if n != names.supervisor(self.name)]
        # routers first, by name (one the supervisor re-made is not in self.routers): they stop sending to the
        # groups; then every group, replacements the supervisor made included, and the routers' RDT peers
        routers = self.routers + [a for n, a in named if names.deployment_of_router(n) == self.name]
        end_actors(routers)
        end_actors(self.groups + [a for _, a in named if a not in routers])
        if self.supervisor is not None:
            _end_supervisor(self.supervisor, self.name)
        if self.started_ray:
            ray.shutdown()

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
