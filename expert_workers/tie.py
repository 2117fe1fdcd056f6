"""Tie an actor's life to another named actor's: for the actors a supervisor makes for a deployment
that ends with its driver.

A supervisor's actors are detached (Ray ends an owned actor with its owner, and a supervisor Ray
restarted is a new process), so they would outlive a driver that exits without `shutdown()`. The
driver's own actors, the supervisor included, end with it; an actor tied to the supervisor's name
then sees the name gone and ends itself. A supervisor being restarted keeps its name (Ray holds it
while the actor is RESTARTING), so a restart never ends anyone.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import ray

log = logging.getLogger(__name__)

# how often the tie is looked at, and how many looks in a row must find it gone
TIE_PERIOD_S = 2.0
TIE_MISSES = 3


def gone(name: str, namespace: str | None) -> bool | None:
    """True when no live actor has `name`; None when that could not be told.

    NOTE: Ray answers any failed lookup with ValueError, an RPC failure on the way to the GCS too;
    the name counts as gone only when the GCS answers another question right after."""
    try:
        ray.get_actor(name, namespace=namespace)
        return False
    except ValueError:
        pass
    except Exception as e:
        log.info("tie %s not checked: %r", name, e)
        return None
    try:
        ray.nodes()
    except Exception as e:  # an unreachable GCS says nothing about the actor
        log.info("tie %s not checked: %r", name, e)
        return None
    return True


def end_self() -> None:
    """End the calling actor for good (from any of its threads)."""
    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def tie_to(tied_to: tuple[str, str | None] | None) -> threading.Thread | None:
    """`watch` the (name, namespace) an actor's constructor was given; None: not tied."""
    return None if tied_to is None else watch(*tied_to)


def watch(name: str, namespace: str | None, *, period_s: float = TIE_PERIOD_S, misses: int = TIE_MISSES,
          on_gone: Callable[[], None] = end_self) -> threading.Thread:
    """A daemon thread calling `on_gone` once `name` has been gone `misses` looks in a row."""

    def run() -> None:
        missed = 0
        while True:
            time.sleep(period_s)
            state = gone(name, namespace)
            if state is None:
                continue
            missed = missed + 1 if state else 0
            if missed >= misses:
                log.warning("%s is gone: this actor ends with it", name)
                on_gone()
                return

    thread = threading.Thread(target=run, name=f"tie-{name}", daemon=True)
    thread.start()
    return thread
