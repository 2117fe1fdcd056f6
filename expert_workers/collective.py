"""A process's torch.distributed state under Ray's gloo collective groups (the RDT path on CPU).

Ray builds a gloo collective group on one default torch process group per process, created
with torch's default timeout: a member joining a group whose other member never comes, or a
send or recv whose peer stopped, waits 30 minutes, and group joins run on the actor's main
thread, in front of every batch. `bound_waits` caps those waits; `reset` drops the state
after a group broke so a new one can form; `store_on_its_address` keeps the group's store off
every interface but the one it is reached on.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

# a collective wait (joining a group, one send or recv of a transfer) gives up after this long
COLLECTIVE_TIMEOUT_S = 30.0


def bound_waits(seconds: float = COLLECTIVE_TIMEOUT_S) -> None:
    """Every gloo process group this process makes from now on gives up a wait after `seconds`.

    NOTE: Ray's `create_collective_group` calls `init_process_group` without a timeout, so
    torch takes its module default (read at call time); this is the only place to set it.
    """
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timedelta(seconds=float(seconds))


def store_on_its_address() -> None:
    """The store of a gloo group this process leads (rank 0) listens on the address its members are
    given, not on every interface.

    NOTE: Ray publishes rank 0's node address and a free port (MASTER_ADDR, MASTER_PORT) and torch's
    TCPStore server then listens on every interface of the machine; handed a socket already bound
    to that address (`master_listen_fd`) it listens there alone: on loopback for a one-machine
    deployment (node address 127.0.0.1), on the node's address in a cluster. Where that address
    cannot be bound (a host name that is not this machine's), torch makes its store as before.
    """
    import importlib
    import socket

    from torch.distributed import TCPStore

    # NOTE: by name: `import torch.distributed.rendezvous as ...` gives the function of that name
    rendezvous = importlib.import_module("torch.distributed.rendezvous")

    original = rendezvous._create_c10d_store
    if getattr(original, "_moe_serve", False):
        return

    def create(hostname: str, port: int, rank: int, world_size: int, timeout: timedelta, use_libuv: bool = True) -> Any:
        if rank != 0 or rendezvous._torchelastic_use_agent_store():
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        sock = socket.socket(socket.AF_INET6 if ":" in hostname else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((hostname, port))
            sock.listen(socket.SOMAXCONN)
        except OSError:
            sock.close()
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        # NOTE: detached: the store owns the descriptor (and closes it) from here on
        return TCPStore(host_name=hostname, port=port, world_size=world_size, is_master=True, timeout=timeout,
                        multi_tenant=True, master_listen_fd=sock.detach(), use_libuv=use_libuv)

    create._moe_serve = True  # type: ignore[attr-defined]
    rendezvous._create_c10d_store = create


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
