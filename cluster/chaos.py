"""Chaos: load from concurrent gRPC clients while a fault schedule kills expert groups, routers, the
supervisor and nodes, or stops or hangs a group (`cluster.faults`); every answer is checked
against LocalMoE.

`run_chaos(target, plan)` drives one deployment (found by name on the connected Ray cluster) and
returns a `ChaosReport`: requests sent / succeeded / failed (by status), wrong answers, degraded
tokens, latency percentiles before / during / after the faults, and the recovery time of every
fault (kill -> the supervisor's matching event: group replaced, router re-created, supervisor back).
`moe-serve chaos` wraps it: against a running deployment, or on an embedded Ray with a small model.

Answers: a degraded token (failover `reroute` or `drop`) is counted, not compared; every other token
must equal LocalMoE's within `tolerance`. Every request has a deadline; nothing loops unbounded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from cluster.faults import ACTIONS, FAULTS, Fault, Target
from expert_workers.errors import MoEServeError
from router_svc.client import MoEClient


@dataclass(frozen=True, kw_only=True)
class ChaosPlan:
    """Load and fault schedule. Times are seconds from the start of the load."""

    clients: int = 8
    duration_s: float = 40.0
    # kill a random expert group every this many seconds (0: never), from the first period on
    group_kill_every_s: float = 6.0
    router_kill_at_s: tuple[float, ...] = (14.0,)
    supervisor_kill_at_s: tuple[float, ...] = (22.0, 24.0)
    node_kill_at_s: tuple[float, ...] = ()
    # stop a random expert group's process (SIGSTOP: alive, silent) at these times; the supervisor replaces it
    group_stop_at_s: tuple[float, ...] = ()
    # hang a random expert group's compute (its batches never return; its process still answers) at these
    # times: it reports itself unhealthy after deployment.compute_timeout_s and the supervisor replaces it
    group_hang_at_s: tuple[float, ...] = ()
    # no fault in the last `quiet_s` seconds: the "after" phase
    quiet_s: float = 10.0
    max_tokens: int = 32
    request_timeout_s: float = 120.0
    tolerance: float = 1e-5
    seed: int = 0

    def schedule(self) -> list[tuple[float, str]]:
        last = self.duration_s - self.quiet_s
        faults: list[tuple[float, str]] = []
        if self.group_kill_every_s > 0:
            t = self.group_kill_every_s
            while t <= last:
                faults.append((t, "group"))
                t += self.group_kill_every_s
        faults += [(t, "router") for t in self.router_kill_at_s if t <= last]
        faults += [(t, "supervisor") for t in self.supervisor_kill_at_s if t <= last]
        faults += [(t, "node") for t in self.node_kill_at_s if t <= last]
        faults += [(t, "group_stop") for t in self.group_stop_at_s if t <= last]
        faults += [(t, "group_hang") for t in self.group_hang_at_s if t <= last]
        return sorted(faults)


@dataclass
class ChaosReport:
    sent: int = 0
    succeeded: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    wrong: int = 0
    degraded_tokens: int = 0
    degraded_requests: int = 0
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    duration_s: float = 0.0
    plan: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Traffic flowed (at least one request) and nothing was lost or wrong; a client that broke off is a failure."""
        return self.sent > 0 and not self.failed and not self.errors and self.wrong == 0 and self.sent == self.succeeded

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        return d

    def table(self) -> str:
        lines = [f"requests: sent {self.sent}, succeeded {self.succeeded}, failed {sum(self.failed.values())} "
                 f"{dict(self.failed) if self.failed else ''}, wrong answers {self.wrong}, degraded tokens {self.degraded_tokens} "
                 f"(in {self.degraded_requests} requests), {self.duration_s:.1f} s",
                 f"{'phase':<8} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"]
        for phase in ("before", "during", "after"):
            s = self.latency_ms.get(phase)
            if s:
                lines.append(f"{phase:<8} {int(s['n']):>8} {s['p50']:>8.1f} {s['p99']:>8.1f} {s['max']:>8.1f}")
        lines.append(f"{'fault':<11} {'at s':>6} {'recovered s':>12}  victim")
        for f in self.faults:
            rec = f"{f.recovered_s:.2f}" if f.recovered_s is not None else "-"
            lines.append(f"{f.kind:<11} {f.at_s:>6.1f} {rec:>12}  {f.victim}{'  (' + f.error + ')' if f.error else ''}")
        lines.extend(f"client error: {e}" for e in self.errors)
        if self.sent == 0:
            lines.append("FAIL: no request was sent")
        else:
            lines.append("PASS: nothing lost, every answer right" if self.ok else "FAIL: requests failed or answers were wrong")
        return "\n".join(lines)


# -- load ----------------------------------------------------------------------------------------

@dataclass
class _Sample:
    t: float
    latency_s: float
    status: str


def _client(target: Target, plan: ChaosPlan, k: int, stop: threading.Event, t0: float, out: list[_Sample],
            report: ChaosReport, lock: threading.Lock) -> None:
    try:
        _load(target, plan, k, stop, t0, out, report, lock)
    except Exception as e:  # a client that broke off (a bug, no gateway to call): the run fails, saying why
        with lock:
            report.errors.append(f"client {k}: {type(e).__name__}: {e}")


def _load(target: Target, plan: ChaosPlan, k: int, stop: threading.Event, t0: float, out: list[_Sample],
          report: ChaosReport, lock: threading.Lock) -> None:
    ref = target.reference
    spec = ref.spec
    gen = torch.Generator().manual_seed(plan.seed * 1000 + k)
    rng = random.Random(plan.seed * 1000 + k)
    client = MoEClient(target.gateways, token=target.token, tls=target.tls, timeout=plan.request_timeout_s,
                       max_attempts=1000, backoff_s=0.05)
    try:
        while not stop.is_set():
            n = rng.randint(1, plan.max_tokens)
            layer = rng.choice(list(spec.moe_layers))
            x = torch.randn(n, spec.hidden_size, generator=gen)
            start = time.monotonic()
            status, wrong, degraded = "OK", False, 0
            try:
                resp = client.forward_response(x, layer, timeout=plan.request_timeout_s)
                from expert_workers import wire

                h = resp.hidden_states
                got = wire.from_bytes(h.data, h.dtype, list(h.shape)).float()
                want = ref.forward(x, layer).float()
                keep = torch.ones(n, dtype=torch.bool)
                if len(resp.degraded_tokens):
                    keep[torch.tensor(list(resp.degraded_tokens), dtype=torch.int64)] = False
                    degraded = len(resp.degraded_tokens)
                if bool(keep.any()):
                    err = float((got[keep] - want[keep]).norm() / want[keep].norm().clamp_min(1e-30))
                    wrong = not err < plan.tolerance
            except MoEServeError as e:
                status = getattr(e, "code", None) or type(e).__name__
            end = time.monotonic()
            with lock:
                report.sent += 1
                if status == "OK":
                    report.succeeded += 1
                    report.wrong += wrong
                    report.degraded_tokens += degraded
                    report.degraded_requests += degraded > 0
                else:
                    report.failed[status] = report.failed.get(status, 0) + 1
                out.append(_Sample(start - t0, end - start, status))
    finally:
        client.close()


def _percentiles(samples: Sequence[_Sample]) -> dict[str, float]:
    ms = sorted(1e3 * s.latency_s for s in samples if s.status == "OK")
    if not ms:
        return {}
    return {"n": float(len(ms)), "p50": statistics.median(ms), "p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))], "max": ms[-1]}


def run_chaos(target: Target, plan: ChaosPlan, progress: Callable[[str], None] | None = None) -> ChaosReport:
    """Drive load for `plan.duration_s` while the faults of `plan.schedule()` run; returns the report."""
    say = progress or (lambda _m: None)
    report = ChaosReport(plan=dataclasses.asdict(plan))
    samples: list[_Sample] = []
    lock = threading.Lock()
    stop = threading.Event()
    t0 = time.monotonic()
    threads = [threading.Thread(target=_client, args=(target, plan, k, stop, t0, samples, report, lock), daemon=True, name=f"chaos-client-{k}")
               for k in range(plan.clients)]
    for t in threads:
        t.start()
    rng = random.Random(plan.seed)
    recover_timeout = max(plan.quiet_s, 30.0)
    injectors: list[threading.Thread] = []

    def inject(kind: str, started: float, seed: int) -> None:
        say(f"{started:6.1f} s  {ACTIONS.get(kind, 'kill ' + kind)}")
        try:
            fault = FAULTS[kind](target, random.Random(seed), recover_timeout)
        except Exception as e:  # a fault that could not be injected is reported, not fatal
            fault = Fault(kind, 0.0, error=repr(e))
        fault.at_s = started
        with lock:
            report.faults.append(fault)
        rec = f"recovered in {fault.recovered_s:.2f} s" if fault.recovered_s is not None else (fault.error or "no recovery seen")
        say(f"{time.monotonic() - t0:6.1f} s  {kind} {fault.victim}: {rec}")

    try:
        # NOTE: each fault fires on schedule in its own thread, which then waits for its recovery,
        # so a slow recovery never delays the next fault.
        for at, kind in plan.schedule():
            wait = at - (time.monotonic() - t0)
            if wait > 0:
                time.sleep(wait)
            th = threading.Thread(target=inject, args=(kind, time.monotonic() - t0, rng.randrange(1 << 30)), daemon=True)
            th.start()
            injectors.append(th)
        rest = plan.duration_s - (time.monotonic() - t0)
        if rest > 0:
            time.sleep(rest)
        for th in injectors:
            th.join(timeout=recover_timeout + 60)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=plan.request_timeout_s + 10)
        report.duration_s = time.monotonic() - t0
    report.faults.sort(key=lambda f: f.at_s)
    first = min((f.at_s for f in report.faults), default=report.duration_s)
    last = max((f.at_s + (f.recovered_s or 0.0) for f in report.faults), default=report.duration_s)
    report.latency_ms = {
        "before": _percentiles([s for s in samples if s.t + s.latency_s < first]),
        "during": _percentiles([s for s in samples if s.t + s.latency_s >= first and s.t < last]),
        "after": _percentiles([s for s in samples if s.t >= last]),
    }
    return report


def write_report(report: ChaosReport, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report.to_dict(), f, indent=2)


# -- the embedded default ------------------------------------------------------------------------

SMALL_MODEL = dict(hidden_size=64, intermediate_size=128, num_experts=8, num_layers=2, moe_layers=[0, 1],
                   routing=dict(policy="topk_softmax", top_k=2, normalize_topk=True))


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """A base port such that base .. base + count - 1 are free now (router i serves base + i)."""
    import socket

    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base + count >= 65536:
            continue
        socks = []
        try:
            for i in range(count):
                t = socket.socket()
                socks.append(t)
                t.bind((host, base + i))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise OSError(f"no {count} consecutive free ports on {host}")


def embedded_config(*, replicas: int = 2, failover: str = "wait", groups: int = 4, routers: int = 2, seed: int = 0) -> dict[str, Any]:
    """The deployment `moe-serve chaos` starts when given no cluster: small, fast to heal.

    NOTE: fixed gateway ports (router i: base + i), so a re-created router serves the address its
    clients already hold; with any-free-port gateways, losing every original router would strand them.
    """
    return {"model": {"random": SMALL_MODEL, "seed": seed}, "gateway": {"port": free_ports(routers)},
            "deployment": {"name": "chaos", "expert_groups": groups, "routers": routers, "replicas": replicas,
                           "failover": failover, "transport": "object_store", "supervisor_period_s": 0.2,
                           # batches here take milliseconds: a hung one is told from a slow one within 2 s
                           "compute_timeout_s": 2.0,
                           "group_cpus": 0.5, "router_cpus": 0.5}}
