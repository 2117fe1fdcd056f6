"""The names of a deployment's Ray actors and the Ray namespace they live in: the scheme in one place.

`cluster.deploy` names what it creates this way; the supervisor, the operations commands, chaos,
reports and a router looking for its supervisor find them by the same names.
"""

from __future__ import annotations

import re

NAMESPACE = "moe-serve"
_ROUTER = re.compile(r"(.+)-router-\d+")


def group(deployment: str, index: int) -> str:
    return f"{deployment}-group-{index}"


def router(deployment: str, index: int) -> str:
    return f"{deployment}-router-{index}"


def supervisor(deployment: str) -> str:
    return f"{deployment}-supervisor"


def owned_by(deployment: str, actor_name: str) -> bool:
    """Whether `actor_name` is one of `deployment`'s actors: its supervisor, a router or a router's RDT
    peer, an expert group or a group's replacement. Exact: deployment `a` owns nothing of `a-b`."""
    return re.fullmatch(re.escape(deployment) + r"-(supervisor|router-\d+(-rdt-\d+)?|group-\d+(-r\d+)?)", actor_name) is not None


def deployment_of_router(router_name: str) -> str | None:
    """`<deployment>-router-<i>` -> `<deployment>`; None for a name not of that form."""
    m = _ROUTER.fullmatch(router_name)
    return None if m is None else m.group(1)
