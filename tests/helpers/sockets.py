"""The TCP sockets processes listen on, read from /proc (Linux), to check that a test's servers bind to loopback."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
from typing import Any, Callable, Iterable, Iterator

_LISTEN = "0A"


def _address(hexaddr: str, v6: bool) -> str:
    raw = bytes.fromhex(hexaddr)
    # the kernel prints each 32-bit word in host (little-endian) order
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET6 if v6 else socket.AF_INET, raw)


def listening(pids: Iterable[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state held by one of `pids`."""
    owner: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[int(link[8:-1])] = pid
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != _LISTEN or int(fields[9]) not in owner:
                continue
            hexaddr, hexport = fields[1].split(":")
            out.append((_address(hexaddr, v6), int(hexport, 16), owner[int(fields[9])]))
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def not_on_loopback(pids: Iterable[int]) -> list[tuple[str, int, int]]:
    """The listening sockets of `pids` bound elsewhere than loopback (every interface included)."""
    return [s for s in listening(pids) if not is_loopback(s[0])]


def descendants(*roots: int) -> list[int]:
    """`roots` and every live process below them (by parent pid)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def node_pids(*nodes: Any) -> list[int]:
    """The processes Ray started for these nodes (`ray._private.node.Node`: GCS, raylet, agents, ...);
    None (no node: Ray shut down meanwhile) has none."""
    return [p.process.pid for node in nodes if node is not None for procs in node.all_processes.values() for p in procs]


@contextlib.contextmanager
def only_loopback(roots: Callable[[], list[int]], every_s: float = 2.0) -> Iterator[None]:
    """Every `every_s` while it is open, and once at its end, the processes `roots()` and all below them
    (a Ray node's servers, its workers, the actors in them) may listen on loopback alone; any socket
    seen elsewhere fails it at its end. NOTE: sampled, since actors come and go within a test: a server
    that lives less than `every_s` may go unseen (a deployment's live for the deployment)."""
    seen: dict[tuple[str, int], int] = {}
    stop = threading.Event()

    def sample() -> None:
        for address, port, pid in not_on_loopback(descendants(*roots())):
            seen.setdefault((address, port), pid)

    def watch() -> None:
        while not stop.wait(every_s):
            sample()

    thread = threading.Thread(target=watch, name="loopback-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    sample()
    assert not seen, f"servers listening beyond loopback ((address, port) -> pid): {seen}"
