"""Ending actors: one place for how a deployment's actors go (deploy's shutdown, `moe-serve down`,
the supervisor retiring groups)."""

from __future__ import annotations

import contextlib
from typing import Any

import ray


def end_actors(actors: list[Any], timeout_s: float = 15.0) -> None:
    """Shut the actors down together (routers close their gateways; each process exports its last spans
    and metrics), then kill them. One that does not answer within `timeout_s` is killed all the same;
    actors without a `shutdown` method (a router's RDT peer) are only killed."""
    actors = list(dict.fromkeys(actors))  # each once (handles compare by actor id)
    refs = []
    for actor in actors:
        with contextlib.suppress(Exception):  # no such method, or the actor is gone
            refs.append(actor.shutdown.remote())
    if refs:
        # NOTE: ray.wait, not ray.get: a dead actor's error is read here and ends no other actor's wait.
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s, fetch_local=False)
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor)
