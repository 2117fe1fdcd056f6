"""`moe-serve up | status | down`: operate deployments on a running Ray cluster by name."""

from __future__ import annotations

import time
from typing import Any

import ray

from cluster import registry
from cluster.config import load_config
from cluster.deploy import NAMESPACE, deploy, end_actors, named_actors
from router_svc import names
from router_svc.client import MoEClient


def connect(address: str) -> None:
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)


def up(config_path: str, address: str, wait_s: float = 180.0) -> dict[str, Any]:
    """Deploy detached actors, record them, wait until the gateways report SERVING."""
    cfg = load_config(config_path)
    connect(address)
    dep = deploy(cfg, detached=True, progress=lambda line: print(line, flush=True))
    entry = {
        "name": dep.name,
        "routers": [names.router(dep.name, i) for i in range(len(dep.routers))],
        "groups": [names.group(dep.name, i) for i in range(len(dep.groups))],
        "gateways": dep.gateway_addresses,
        "created": time.time(),
    }
    registry.record(dep.name, entry)
    if dep.gateway_addresses:
        client = MoEClient(dep.gateway_addresses, token=cfg.auth.token, tls=_client_tls(cfg))
        deadline = time.monotonic() + wait_s
        while not client.health():
            if time.monotonic() > deadline:
                raise TimeoutError(f"deployment {dep.name} not healthy after {wait_s:.0f} s")
            time.sleep(0.5)
        client.close()
    return entry


def _client_tls(cfg: Any) -> Any:
    if not cfg.tls.cert:
        return None
    from router_svc.client import TLSOptions

    return TLSOptions(ca=cfg.tls.client_ca or cfg.tls.cert, cert=cfg.tls.cert if cfg.tls.client_ca else None,
                      key=cfg.tls.key if cfg.tls.client_ca else None)


def _actor(name: str) -> Any:
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def _entries(name: str | None) -> list[tuple[str, dict[str, Any]]]:
    """The recorded deployment called `name`, or every recorded one; an unknown name is a LookupError."""
    out = []
    if name is not None and not name:
        raise LookupError("an empty deployment name; give one (see `moe-serve status`), or none for all")
    for dname in [name] if name is not None else registry.names():
        entry = registry.lookup(dname)
        if entry is None:
            raise LookupError(f"no deployment named {dname!r}; known: {registry.names()}")
        out.append((dname, entry))
    return out


def status(address: str, name: str | None = None) -> list[dict[str, Any]]:
    connect(address)
    out = []
    for dname, entry in _entries(name):
        routers = []
        for rname in entry["routers"]:
            actor = _actor(rname)
            try:
                routers.append(ray.get(actor.service_status.remote(), timeout=15) if actor else {"name": rname, "alive": False})
            except Exception as e:
                routers.append({"name": rname, "alive": False, "error": str(e)})
        out.append({**entry, "status": routers})
    return out


def down(address: str, name: str | None = None) -> list[str]:
    """Stop every actor of the deployment(s): routers first (they close their gateways), then groups."""
    connect(address)
    removed = []
    for dname, entry in _entries(name):
        supervisor = _actor(names.supervisor(dname))
        if supervisor is not None:  # first, or it would replace the groups being removed
            try:
                ray.get(supervisor.stop.remote(), timeout=60)
            except Exception:
                pass
            ray.kill(supervisor, no_restart=True)
            removed.append(names.supervisor(dname))
        actors = {aname: actor for aname, actor in named_actors(dname) if aname != names.supervisor(dname)}
        routers = set(entry["routers"])
        end_actors([a for n, a in actors.items() if n in routers])  # first: they stop sending to the groups
        end_actors([a for n, a in actors.items() if n not in routers])
        removed += list(actors)
        registry.forget(dname)
    return removed
