"""A process's torch.distributed state under Ray's gloo collective groups (the RDT path on CPU).

Ray builds a gloo collective group on one default torch process group per process, created
with torch's default timeout: a member joining a group whose other member never comes, or a
send or recv whose peer stopped, waits 30 minutes, and group joins run on the actor's main
thread, in front of every batch. `bound_waits` caps those waits; `reset` drops the state
after a group broke so a new one can form.
"""

from __future__ import annotations

from datetime import timedelta

# a collective wait (joining a group, one send or recv of a transfer) gives up after this long
COLLECTIVE_TIMEOUT_S = 30.0


def bound_waits(seconds: float = COLLECTIVE_TIMEOUT_S) -> None:
    """Every gloo process group this process makes from now on gives up a wait after `seconds`.

    NOTE: Ray's `create_collective_group` calls `init_process_group` without a timeout, so
    torch takes its module default (read at call time); this is the only place to set it.
    """
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timedelta(seconds=float(seconds))


def reset() -> bool:
    """Tear down this process's torch.distributed state after its collective group broke.

    NOTE: Ray's gloo groups sit on one default process group per process, whose store
    lives with the group's first member. When a member dies that default group is dead
    too, and a new collective group cannot be built on top of it; destroying it here lets
    the next group initialise afresh. True when there was state to drop.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False


def gpu_ids() -> list[str]:
    """The GPU ids Ray gave this process, as strings: how RDT compares where its peers are."""
    import ray

    return [str(i) for i in ray.get_gpu_ids()]
