"""Benchmark: hot-expert replication under skewed traffic, and recovery from a killed expert group.

One random MoE layer (hidden 256, expert width 512, 16 experts, top-2, float32, gated SiLU)
served by `cluster.deploy` with 4 expert groups (expert e starts on group e mod 4), 1 router,
the object-store transport, on one `ray.init(num_cpus=8)` with node IP 127.0.0.1.

Traffic is skewed: each token is drawn toward one expert e ~ Zipf(s) over the experts (rank r
is expert r - 1): x = noise + pull * (the gate's unit row for e), so the gate's top-1 follows
Zipf and its second choice is left to the noise. The realized distribution (LocalMoE's
routing report over the request pool) is printed. Two deployments live side by side and are
timed alternately (order swapped every repeat):

  before  max_replicas 1: every expert keeps its one starting copy;
  after   max_replicas 3, hot_threshold 1.5, fast supervisor periods: the same traffic is
          driven until the supervisor's replica events settle (bounded), then timed alike.

A timed window follows a warm-up (the supervisor's load window refills, so its load shares
are current) and runs N client threads in a closed loop for a bounded time. Throughput =
input tokens answered / wall. Group load = token-expert rows each group computed in the
window, from the groups' own counters (ExpertGroup.stats); reported as max/mean over groups,
with the groups' compute seconds (busy) alongside.

Recovery: on the `before` deployment (1 copy per expert, failover=wait, supervisor period
0.2 s), under light traffic, a random group is killed K times. Per kill: the supervisor's
failover event (`recovery_s`, its replace-and-publish time, and kill -> event) and the
client-observed time from the kill until a probe whose tokens go to the killed group's
experts is answered (sent once the group is seen dead, so the old actor cannot serve it).

Every answer (timed windows, settling, recovery traffic and probes) is compared with
LocalMoE.from_config(spec, seed); references are computed before any timing.

Targets (checked here, exit status 1 if missed):
  - group load max/mean after replication <= 0.8x before (medians over repeats);
  - tokens/s after >= 0.9x before (on 2 cores copies cannot add compute, only balance it);
  - every answer within 1e-5 relative error of LocalMoE.
CPU taken by other processes during the timed windows is measured as bench/service.py does;
above --max-foreign (5%) of the machine the numbers are not valid and it exits with status 3.

    python bench/elastic.py [--quick] [--repeats 3] [--kills 5] [--zipf 1.2]

The full run writes bench/results/elastic.json and the "Elastic benchmark" section of
bench/RESULTS.md; --quick (a smoke run) writes bench/results/elastic_quick.json only.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import itertools
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# NOTE: the same /proc accounting of foreign CPU as the service benchmark, so the two read alike.
from service import _cpu_snapshot, _foreign  # noqa: E402

LAYER = 0
GROUPS = 4
SEED = 11
HIDDEN, WIDTH, EXPERTS, TOP_K = 256, 512, 16, 2
SPEC = dict(hidden_size=HIDDEN, intermediate_size=WIDTH, num_experts=EXPERTS, num_layers=1, moe_layers=[LAYER],
            routing=dict(policy="topk_softmax", top_k=TOP_K, normalize_topk=True))
NOISE, PULL = 1.0, 4.0  # token = NOISE * N(0, I_D) + PULL * unit gate row of its drawn expert
MAX_REL_ERR = 1e-5
PHASES = ("before", "after")
RESULTS_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
SECTION = "## Elastic benchmark"


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def _max_over_mean(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else float("nan")


# -- traffic -------------------------------------------------------------------

def zipf(num: int, s: float) -> torch.Tensor:
    """(num,) probabilities of ranks 1..num under Zipf(s)."""
    p = torch.arange(1, num + 1, dtype=torch.float64) ** -s
    return p / p.sum()


def directed(gate_ED: torch.Tensor, experts_T: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(T,) expert ids -> (T, D) tokens, token t pulled toward expert experts_T[t]'s gate row."""
    unit_ED = gate_ED / gate_ED.norm(dim=1, keepdim=True)
    return NOISE * torch.randn(len(experts_T), gate_ED.shape[1], generator=gen) + PULL * unit_ED[experts_T]


def top1(report: Any, tokens: int) -> torch.Tensor:
    """A LocalMoE routing report -> (T,) each token's highest-weight expert."""
    w_TE = torch.zeros(tokens, EXPERTS)
    w_TE[report.token_index, report.expert] = report.weight.float()
    return w_TE.argmax(dim=1)


@dataclass(frozen=True)
class Pool:
    """The requests clients cycle through, with LocalMoE's answers and routing over all of them."""

    inputs: list[torch.Tensor]   # R of (T, D)
    refs: list[torch.Tensor]     # R of (T, D)
    drawn_E: list[int]           # tokens drawn toward each expert
    top1_E: list[int]            # tokens whose gate top-1 is each expert
    rows_E: list[int]            # token-expert assignments per expert (LocalMoE's tokens_per_expert)
    hit_rate: float              # fraction of tokens whose gate top-1 is the expert they were drawn toward


def make_pool(ref: Any, requests: int, tokens: int, s: float, seed: int) -> Pool:
    gen = torch.Generator().manual_seed(seed)
    gate_ED, p_E = ref.layer(LAYER).router.weight.float(), zipf(EXPERTS, s)
    inputs, refs = [], []
    drawn, first, rows = (torch.zeros(EXPERTS, dtype=torch.int64) for _ in range(3))
    hits = 0
    for _ in range(requests):
        e_T = torch.multinomial(p_E, tokens, replacement=True, generator=gen)
        x = directed(gate_ED, e_T, gen)
        y, report = ref.forward(x, LAYER, return_routing=True)
        inputs.append(x)
        refs.append(y)
        drawn += torch.bincount(e_T, minlength=EXPERTS)
        first_T = top1(report, tokens)
        hits += int((first_T == e_T).sum())
        first += torch.bincount(first_T, minlength=EXPERTS)
        rows += torch.tensor(report.stats.tokens_per_expert)
    return Pool(inputs=inputs, refs=refs, drawn_E=drawn.tolist(), top1_E=first.tolist(), rows_E=rows.tolist(),
                hit_rate=hits / (requests * tokens))


class Tally:
    """Answers checked against LocalMoE, from many client threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ok = self.wrong = self.failed = 0
        self.max_err = 0.0
        self.errors: list[str] = []

    def answer(self, got: torch.Tensor, want: torch.Tensor) -> None:
        err = _rel(got, want)
        with self._lock:
            self.max_err = max(self.max_err, err)
            if err < MAX_REL_ERR:
                self.ok += 1
            else:
                self.wrong += 1
                self._note(f"wrong answer: rel. error {err:.2e}")

    def failure(self, e: BaseException) -> None:
        with self._lock:
            self.failed += 1
            self._note(repr(e)[:300])

    def _note(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "wrong": self.wrong, "failed": self.failed, "max_rel_err": self.max_err, "errors": self.errors}


def closed_loop(dep: Any, pool: Pool, clients: int, seconds: float, tally: Tally,
                stop: threading.Event | None = None, pause_s: float = 0.0) -> dict[str, float]:
    """`clients` threads send pool requests back to back (or `pause_s` apart) for `seconds` or until `stop`."""
    deadline = time.perf_counter() + seconds
    counter = itertools.count()
    stop = stop or threading.Event()

    def client() -> tuple[int, int]:
        n = tokens = 0
        while time.perf_counter() < deadline and not stop.is_set():
            i = next(counter) % len(pool.inputs)
            try:
                got = dep.forward(pool.inputs[i], LAYER)
            except Exception as e:  # counted and reported; the loop goes on
                tally.failure(e)
                time.sleep(0.05)
                continue
            tally.answer(got, pool.refs[i])
            n, tokens = n + 1, tokens + pool.inputs[i].shape[0]
            if pause_s:
                time.sleep(pause_s)
        return n, tokens

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as ex:
        done = [f.result() for f in [ex.submit(client) for _ in range(clients)]]
    return {"requests": sum(n for n, _ in done), "tokens": sum(t for _, t in done), "wall_s": time.perf_counter() - t0}


# -- observing the deployment ----------------------------------------------------

def supervisor_status(dep: Any) -> dict[str, Any]:
    import ray

    return ray.get(dep.supervisor.status.remote(), timeout=30)


def group_counters(dep: Any) -> dict[str, dict[str, float]]:
    """Per live group: token-expert rows computed and compute seconds since it started (its own counters)."""
    import ray

    from cluster import NAMESPACE

    names = supervisor_status(dep)["groups"]
    stats = ray.get([ray.get_actor(n, namespace=NAMESPACE).stats.remote() for n in names], timeout=30)
    return {n: {"rows": sum(c for _, _, c in s["tokens"]), "busy_s": s["busy_s"]} for n, s in zip(names, stats)}


def copies(status: dict[str, Any]) -> dict[int, int]:
    """Expert -> copies, for experts with more than one."""
    return {x["expert"]: x["replicas"] for x in status["experts"] if x["layer"] == LAYER and x["replicas"] > 1}


def timed_window(dep: Any, pool: Pool, args: argparse.Namespace, tally: Tally) -> dict[str, Any]:
    """Warm-up, then one closed-loop window: tokens/s and the groups' load spread in it."""
    closed_loop(dep, pool, args.clients, args.warmup_s, tally)
    st0, c0, cpu0 = supervisor_status(dep), group_counters(dep), _cpu_snapshot()
    run = closed_loop(dep, pool, args.clients, args.window_s, tally)
    cpu1, c1, st1 = _cpu_snapshot(), group_counters(dep), supervisor_status(dep)
    rows = [c1[n]["rows"] - c0.get(n, {}).get("rows", 0) for n in c1]
    busy = [c1[n]["busy_s"] - c0.get(n, {}).get("busy_s", 0.0) for n in c1]
    return {**run, "tokens_per_s": run["tokens"] / run["wall_s"], "group_rows": rows, "group_busy_s": busy,
            "rows_max_over_mean": _max_over_mean(rows), "busy_max_over_mean": _max_over_mean(busy),
            "copies": copies(st1), "table_versions": [st0["version"], st1["version"]], "foreign": _foreign(cpu0, cpu1)}


def settle(dep: Any, pool: Pool, args: argparse.Namespace, tally: Tally) -> dict[str, Any]:
    """Drive the traffic until the supervisor made copies and no replica event came for `quiet_s` (bounded)."""
    stop, t0 = threading.Event(), time.time()
    kinds = ("replica_added", "replica_removed")
    with cf.ThreadPoolExecutor(1) as ex:
        traffic = ex.submit(closed_loop, dep, pool, args.clients, args.settle_timeout_s, tally, stop)
        settled = False
        while time.time() - t0 < args.settle_timeout_s and not settled:
            time.sleep(0.5)
            events = [e for e in supervisor_status(dep)["events"] if e["kind"] in kinds]
            settled = bool(events) and time.time() - max(e["at"] for e in events) >= args.quiet_s
        stop.set()
        run = traffic.result()
    st = supervisor_status(dep)
    added = [e for e in st["events"] if e["kind"] == "replica_added"]
    return {"settled": settled, "wall_s": time.time() - t0, "requests": run["requests"], "copies": copies(st),
            "first_copy_s": min(e["at"] for e in added) - t0 if added else None,
            "last_copy_s": max(e["at"] for e in added) - t0 if added else None,
            "events": [e for e in st["events"] if e["kind"] in kinds], "version": st["version"]}


# -- recovery ------------------------------------------------------------------

def _wait_dead(actor: Any, timeout_s: float = 30.0) -> bool:
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=2.0)
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.01)
    return False


def _failover_event(dep: Any, victim: str, timeout_s: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [e for e in supervisor_status(dep)["events"] if e["kind"] == "failover" and victim in e["groups"]]
        if found:
            return found[-1]
        time.sleep(0.1)
    return None


def _probe(dep: Any, x: torch.Tensor, want: torch.Tensor, deadline: float, tally: Tally) -> tuple[int, int | None]:
    """Send `x` until answered (checked) or `deadline` -> (attempts, table version of the answer)."""
    import ray

    from expert_workers import wire

    attempts = 0
    while time.monotonic() < deadline:
        attempts += 1
        try:
            out = ray.get(dep.submit(x, LAYER), timeout=max(0.1, deadline - time.monotonic()))
        except Exception as e:
            tally.failure(e)
            time.sleep(0.05)
            continue
        tally.answer(wire.from_numpy(out.hidden_states, out.dtype), want)
        return attempts, out.routing_table_version
    return attempts, None


def kill_once(dep: Any, ref: Any, rng: random.Random, k: int, args: argparse.Namespace, tally: Tally) -> dict[str, Any]:
    """Kill one random group; time the supervisor's failover and the first answer touching its experts."""
    import ray

    from cluster import NAMESPACE

    st = supervisor_status(dep)
    g = rng.randrange(len(st["groups"]))
    victim = st["groups"][g]
    experts = sorted(e for layer, e in st["placement"][g] if layer == LAYER and e >= 0)
    x = directed(ref.layer(LAYER).router.weight.float(), torch.tensor(experts).repeat(2), torch.Generator().manual_seed(1000 + k))
    want, report = ref.forward(x, LAYER, return_routing=True)
    touched = sorted(set(report.expert.tolist()) & set(experts))
    actor = ray.get_actor(victim, namespace=NAMESPACE)
    time.sleep(args.pre_kill_s)  # light traffic runs on the intact deployment first
    t_kill, wall_kill = time.monotonic(), time.time()
    ray.kill(actor, no_restart=True)
    dead = _wait_dead(actor)
    dead_s = time.monotonic() - t_kill
    attempts, version = _probe(dep, x, want, t_kill + args.recovery_timeout_s, tally)
    client_s = time.monotonic() - t_kill if version is not None else None
    event = _failover_event(dep, victim, args.recovery_timeout_s)
    return {"kill": k, "group": g, "victim": victim, "experts": experts, "probe_touches": touched, "seen_dead": dead,
            "kill_to_dead_s": dead_s, "client_s": client_s, "probe_attempts": attempts, "probe_version": version,
            "version_before": st["version"], "recovery_s": event["recovery_s"] if event else None,
            "kill_to_event_s": event["at"] - wall_kill if event else None,
            "replacement": event["replacements"][0] if event else None}


def recovery(dep: Any, ref: Any, pool: Pool, args: argparse.Namespace, tally: Tally) -> list[dict[str, Any]]:
    rng, stop = random.Random(SEED), threading.Event()
    kills = []
    with cf.ThreadPoolExecutor(1) as ex:
        bound = args.kills * (args.pre_kill_s + 2 * args.recovery_timeout_s) + 60
        traffic = ex.submit(closed_loop, dep, pool, 1, bound, tally, stop, args.light_pause_s)
        try:
            for k in range(args.kills):
                kills.append(kill_once(dep, ref, rng, k, args, tally))
                print(f"  kill {k}: {kills[-1]['victim']} -> {kills[-1]['replacement']}: "
                      f"client {_fmt_s(kills[-1]['client_s'])}, supervisor recovery_s {_fmt_s(kills[-1]['recovery_s'])}, "
                      f"kill->event {_fmt_s(kills[-1]['kill_to_event_s'])}", flush=True)
        finally:
            stop.set()
            light = traffic.result()
    print(f"  light traffic during the kills: {light['requests']} requests")
    return kills


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


# -- the run -------------------------------------------------------------------

def deployment_config(name: str, args: argparse.Namespace, **elastic: Any) -> dict[str, Any]:
    return {"model": {"random": SPEC, "seed": SEED}, "gateway": {"port": 0},
            "deployment": {"name": name, "expert_groups": GROUPS, "routers": 1, "transport": "object_store", "device": "cpu",
                           # NOTE: half a CPU each (one torch thread still) so both deployments fit in num_cpus=8.
                           "group_cpus": 0.5, "router_cpus": 0.5, "failover": "wait",
                           "supervisor_period_s": args.supervisor_period_s, **elastic}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from cluster import deploy
    from cluster.deploy import start_local_ray
    from router_svc import LocalMoE

    torch.set_grad_enabled(False)
    ref = LocalMoE.from_config(SPEC, seed=SEED)
    pool = make_pool(ref, args.pool, args.tokens, args.zipf, SEED)
    result: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k not in ("out",)}, "spec": SPEC,
                              "traffic": {"zipf_p": zipf(EXPERTS, args.zipf).tolist(), "drawn_E": pool.drawn_E,
                                          "top1_E": pool.top1_E, "rows_E": pool.rows_E, "hit_rate": pool.hit_rate}}
    print_distribution(result["traffic"])
    tally = Tally()
    deps: dict[str, Any] = {}
    # NOTE: a fresh instance even where other Ray instances run on this machine, on 127.0.0.1 only
    start_local_ray(num_cpus=8, include_dashboard=False, log_to_driver=False)
    result["node_ip"] = ray.util.get_node_ip_address()
    try:
        t0 = time.perf_counter()
        deps["before"] = deploy(deployment_config("elastic-before", args, max_replicas=1))
        deps["after"] = deploy(deployment_config(
            "elastic-after", args, max_replicas=args.max_replicas, hot_threshold=args.hot_threshold, load_window_s=2.0,
            rebalance_period_s=0.5, replica_down_delay_s=3600.0, drain_timeout_s=10.0))
        result["startup_s"] = time.perf_counter() - t0
        result["placement"] = [sorted(e for layer, e in slots if layer == LAYER) for slots in deps["before"].table.placement]
        result["predicted_before_max_over_mean"] = _max_over_mean([sum(pool.rows_E[e] for e in g) for g in result["placement"]])
        print(f"placement (expert e on group e mod {GROUPS}): {result['placement']}; group load max/mean that "
              f"LocalMoE's routing predicts without copies: {result['predicted_before_max_over_mean']:.2f}")
        print("settling replicas on 'after' ...", flush=True)
        result["settle"] = settle(deps["after"], pool, args, tally)
        s = result["settle"]
        print(f"  settled={s['settled']} in {s['wall_s']:.1f} s; copies {s['copies']}; "
              f"first copy at {_fmt_s(s['first_copy_s'])}, last at {_fmt_s(s['last_copy_s'])}", flush=True)
        windows: dict[str, list[dict[str, Any]]] = {p: [] for p in PHASES}
        for r in range(args.repeats):
            for phase in (PHASES if r % 2 == 0 else PHASES[::-1]):  # swapped order: drift hits both alike
                w = timed_window(deps[phase], pool, args, tally)
                windows[phase].append(w)
                print(f"  repeat {r} {phase:>6}: {w['tokens_per_s']:.0f} tok/s, group rows max/mean "
                      f"{w['rows_max_over_mean']:.2f}, busy max/mean {w['busy_max_over_mean']:.2f}, copies {w['copies']}", flush=True)
        result["windows"] = windows
        deps.pop("after").shutdown()
        print(f"recovery: {args.kills} kills on 'before' (1 copy, failover=wait) ...", flush=True)
        result["kills"] = recovery(deps["before"], ref, pool, args, tally)
    finally:
        for d in deps.values():
            try:
                d.shutdown()
            except Exception as e:  # the run's own error, if any, is the one to see
                print(f"shutdown: {e!r}", file=sys.stderr)
        ray.shutdown()
    result["answers"] = tally.as_dict()
    return result


# -- summary -------------------------------------------------------------------

def summarize(result: dict[str, Any]) -> dict[str, Any]:
    med = statistics.median
    out: dict[str, Any] = {}
    for p in PHASES:
        ws = result["windows"][p]
        total = [sum(w["group_rows"]) for w in ws]
        out[p] = {"tokens_per_s": med(w["tokens_per_s"] for w in ws), "rows_max_over_mean": med(w["rows_max_over_mean"] for w in ws),
                  "busy_max_over_mean": med(w["busy_max_over_mean"] for w in ws),
                  "tokens_per_s_repeats": [w["tokens_per_s"] for w in ws], "rows_max_over_mean_repeats": [w["rows_max_over_mean"] for w in ws],
                  "group_share": [med(w["group_rows"][g] / t for w, t in zip(ws, total)) for g in range(len(ws[0]["group_rows"]))]}
    b, a = out["before"], out["after"]
    out["ratio"] = {"tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"], "rows_max_over_mean": a["rows_max_over_mean"] / b["rows_max_over_mean"],
                    "busy_max_over_mean": a["busy_max_over_mean"] / b["busy_max_over_mean"]}
    # NOTE: each repeat's two windows ran back to back, so their ratio sees the same neighbours on the machine.
    out["ratio_repeats"] = {k: [wa[k] / wb[k] for wa, wb in zip(result["windows"]["after"], result["windows"]["before"])]
                            for k in ("tokens_per_s", "rows_max_over_mean")}
    kills = result["kills"]
    for key in ("client_s", "recovery_s", "kill_to_event_s", "kill_to_dead_s"):
        vals = [k[key] for k in kills if k[key] is not None]
        out[key] = {"median": med(vals) if vals else None, "max": max(vals) if vals else None, "n": len(vals)}
    out["recovered"] = sum(k["client_s"] is not None and k["recovery_s"] is not None for k in kills)
    return out


def check(result: dict[str, Any]) -> list[dict[str, Any]]:
    s, ans = result["summary"], result["answers"]
    return [
        {"target": "group load max/mean, after / before replication", "goal": "<= 0.80", "value": s["ratio"]["rows_max_over_mean"],
         "met": s["ratio"]["rows_max_over_mean"] <= 0.8},
        {"target": "tokens/s, after / before replication", "goal": ">= 0.90", "value": s["ratio"]["tokens_per_s"],
         "met": s["ratio"]["tokens_per_s"] >= 0.9},
        {"target": f"every answer vs LocalMoE, max rel. error ({ans['ok'] + ans['wrong']} answers, {ans['wrong']} wrong)",
         "goal": "< 1e-5", "value": ans["max_rel_err"], "met": ans["wrong"] == 0 and ans["ok"] > 0 and ans["max_rel_err"] < MAX_REL_ERR},
    ]


def foreign_total(result: dict[str, Any]) -> dict[str, float]:
    parts = [w["foreign"] for p in PHASES for w in result["windows"][p] if w["foreign"]]
    if not parts:
        return {}
    tot = {k: sum(f[k] for f in parts) for k in ("wall_s", "ours_cpu_s", "foreign_cpu_s")}
    tot["foreign_fraction"] = tot["foreign_cpu_s"] / (tot["wall_s"] * (os.cpu_count() or 1))
    return tot


def print_distribution(t: dict[str, Any]) -> None:
    n = sum(t["top1_E"])
    print(f"traffic over {EXPERTS} experts (share of tokens; rows = top-{TOP_K} assignments):")
    print(" ".join(f"{h:>7}" for h in ("expert", "zipf", "drawn", "top-1", "rows")))
    for e in range(EXPERTS):
        print(f"{e:>7} {t['zipf_p'][e]:>7.3f} {t['drawn_E'][e] / n:>7.3f} {t['top1_E'][e] / n:>7.3f} {t['rows_E'][e] / sum(t['rows_E']):>7.3f}")
    print(f"{100 * t['hit_rate']:.1f}% of tokens have the expert they were drawn toward as the gate's top-1")


HEADERS = ("phase", "copies", "tok/s", "tok/s per repeat", "group load max/mean", "per repeat", "busy max/mean", "group shares")


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    s = result["summary"]
    rows = []
    for p in PHASES:
        x = s[p]
        cp = result["windows"][p][-1]["copies"]
        rows.append([p, ", ".join(f"e{e}x{n}" for e, n in sorted(cp.items())) or "none", f"{x['tokens_per_s']:.0f}",
                     " / ".join(f"{v:.0f}" for v in x["tokens_per_s_repeats"]), f"{x['rows_max_over_mean']:.2f}",
                     " / ".join(f"{v:.2f}" for v in x["rows_max_over_mean_repeats"]), f"{x['busy_max_over_mean']:.2f}",
                     " / ".join(f"{100 * v:.0f}%" for v in x["group_share"])])
    r, rr = s["ratio"], s["ratio_repeats"]
    rows.append(["after / before", "", f"{r['tokens_per_s']:.2f}", " / ".join(f"{v:.2f}" for v in rr["tokens_per_s"]),
                 f"{r['rows_max_over_mean']:.2f}", " / ".join(f"{v:.2f}" for v in rr["rows_max_over_mean"]), f"{r['busy_max_over_mean']:.2f}", ""])
    return rows


KILL_HEADERS = ("kill", "group", "experts", "seen dead", "client-observed", "supervisor recovery_s", "kill -> failover event", "probe tries")


def kill_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = [[str(k["kill"]), "group-" + k["victim"].rsplit("-group-", 1)[-1], ",".join(map(str, k["experts"])),
             _fmt_s(k["kill_to_dead_s"]), _fmt_s(k["client_s"]), _fmt_s(k["recovery_s"]), _fmt_s(k["kill_to_event_s"]),
             str(k["probe_attempts"])] for k in result["kills"]]
    s = result["summary"]
    for stat in ("median", "max"):
        rows.append([stat, "", "", _fmt_s(s["kill_to_dead_s"][stat]), _fmt_s(s["client_s"][stat]), _fmt_s(s["recovery_s"][stat]),
                     _fmt_s(s["kill_to_event_s"][stat]), ""])
    return rows


def _fmt_targets(targets: list[dict[str, Any]]) -> list[str]:
    return [f"[{'PASS' if t['met'] else 'MISS'}] {t['target']}: {t['value']:.4g} (goal {t['goal']})" for t in targets]


def _print_table(headers: tuple[str, ...], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(f"{h:>{w}}" for h, w in zip(headers, widths)))
    for r in rows:
        print("  ".join(f"{v:>{w}}" for v, w in zip(r, widths)))


def _md_table(headers: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|---" + "|---:" * (len(headers) - 1) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def _foreign_line(result: dict[str, Any]) -> str:
    f = result.get("foreign_cpu") or {}
    if not f:
        return "CPU used outside this benchmark: not measured (no /proc)."
    limit = result["config"]["max_foreign"]
    warn = (f" Above the {100 * limit:.0f}% limit: other processes competed for the CPUs, so this run's numbers and "
            "verdicts are NOT VALID." if f["foreign_fraction"] > limit else "")
    return (f"CPU used outside this benchmark during the timed windows: {f['foreign_cpu_s']:.1f} s of "
            f"{f['wall_s'] * (os.cpu_count() or 1):.0f} core-seconds ({100 * f['foreign_fraction']:.1f}%); "
            f"this run used {f['ours_cpu_s']:.0f} s.{warn}")


def markdown(result: dict[str, Any]) -> str:
    m, c, s, st = result["machine"], result["config"], result["summary"], result["settle"]
    ans = result["answers"]
    t = result["traffic"]
    n = sum(t["top1_E"])
    lines = [
        SECTION, "",
        f"Written by `python bench/elastic.py` on {m['date']} at commit `{result['commit']}`; raw numbers in `bench/results/elastic.json`.",
        "",
        f"Machine: {m['cores']} cores, {m['platform']}, Python {m['python']}, torch {m['torch']}, Ray {m['ray']}, no GPU. "
        f"One `ray.init(num_cpus=8)`, node IP {result.get('node_ip')}. Load average (1 min) {result['loadavg_before'][0]:.2f} "
        f"before the run, {result['loadavg_after'][0]:.2f} after; run took {result['wall_s']:.0f} s.",
        "",
        f"Model: one random MoE layer (hidden {HIDDEN}, expert width {WIDTH}, {EXPERTS} experts, top-{TOP_K}, float32). "
        f"Deployments: {GROUPS} expert groups (expert e starts on group e mod {GROUPS}), 1 router, object-store transport, "
        f"failover `wait`, supervisor period {c['supervisor_period_s']} s. `before`: max_replicas 1. `after`: max_replicas "
        f"{c['max_replicas']}, hot_threshold {c['hot_threshold']}, load window 2 s, rebalance every 0.5 s.",
        "",
        f"Traffic: every token pulled toward one expert drawn from Zipf(s={c['zipf']}) (rank r = expert r-1); "
        f"{c['pool']} requests of {c['tokens']} tokens cycled. Realized gate top-1 share (LocalMoE's routing report), "
        "experts 0..: " + ", ".join(f"{100 * v / n:.1f}%" for v in t["top1_E"][:6]) + ", ... (Zipf: "
        + ", ".join(f"{100 * v:.1f}%" for v in t["zipf_p"][:6]) + ", ...). Without copies LocalMoE's routing predicts "
        f"group load max/mean {result['predicted_before_max_over_mean']:.2f}.",
        "",
        f"Replication: the supervisor made copies {', '.join(f'e{e}x{k}' for e, k in sorted(st['copies'].items())) or 'none'}; "
        f"first at {_fmt_s(st['first_copy_s'])}, last at {_fmt_s(st['last_copy_s'])} after traffic started "
        f"({'settled' if st['settled'] else 'NOT settled'}: no replica event for {c['quiet_s']} s).",
        "",
        f"Timed windows: {c['clients']} client threads, closed loop, {c['warmup_s']} s warm-up then {c['window_s']} s timed, "
        f"`before` and `after` alternated over {c['repeats']} repeats (medians). Group load = token-expert rows each group "
        "computed in the window (the groups' own counters), max/mean over groups; busy = the groups' compute seconds; "
        "group shares = each group's share of rows. Ratios: of the medians, and per repeat (the two windows of a repeat ran "
        "back to back).",
        "",
    ]
    lines += _md_table(HEADERS, table_rows(result))
    lines += ["", f"Recovery: {len(result['kills'])} kills of a random group of `before` (1 copy per expert) under light traffic "
              f"(1 client, {c['light_pause_s']} s between requests). Client-observed: from `ray.kill` until a probe whose tokens "
              "go to the killed group's experts is answered (sent once the group is seen dead). Supervisor `recovery_s`: its "
              "failover event (replace the group, publish the table); kill -> event adds detection.", ""]
    lines += _md_table(KILL_HEADERS, kill_rows(result))
    lines += ["", f"Answers: {ans['ok']} exact, {ans['wrong']} wrong, {ans['failed']} failed requests; max rel. error "
              f"{ans['max_rel_err']:.1e}. " + _foreign_line(result), ""]
    lines += [f"- {x}" for x in _fmt_targets(result["targets"])]
    return "\n".join(lines) + "\n"


def write_results_md(text: str, path: str = RESULTS_MD) -> None:
    """Replace (or add) the "Elastic benchmark" section, keeping any other sections."""
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmark results\n\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old, count=1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    with open(path, "w", encoding="utf-8") as f:
        f.write(new.rstrip("\n") + "\n")


def _commit(repo: str) -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=repo).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench"],
                             capture_output=True, text=True, cwd=repo).stdout.split("\n")
    changed = [line[3:] for line in changed if line.strip()]
    return (head or "unknown") + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, short windows, 2 kills; writes elastic_quick.json only")
    ap.add_argument("--repeats", type=int, default=None, help="alternated before/after windows (median; quick: 1, else 3)")
    ap.add_argument("--window-s", type=float, default=None, help="timed seconds per window (quick: 4, else 10)")
    ap.add_argument("--warmup-s", type=float, default=None, help="untimed traffic before each window (quick: 3, else 4)")
    ap.add_argument("--kills", type=int, default=None, help="groups killed for the recovery time (quick: 2, else 5)")
    ap.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent s of the traffic over experts")
    ap.add_argument("--clients", type=int, default=4, help="closed-loop client threads in timed windows")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request")
    ap.add_argument("--pool", type=int, default=32, help="distinct requests (references computed up front)")
    ap.add_argument("--max-replicas", type=int, default=3, help="'after': copies per expert at most")
    ap.add_argument("--hot-threshold", type=float, default=1.5, help="'after': an expert above this x its layer's mean rate is hot")
    ap.add_argument("--supervisor-period-s", type=float, default=0.2, help="supervisor tick (both deployments)")
    ap.add_argument("--settle-timeout-s", type=float, default=None, help="bound on driving 'after' until copies settle (quick: 30, else 60)")
    ap.add_argument("--quiet-s", type=float, default=3.0, help="settled: no replica event for this long")
    ap.add_argument("--pre-kill-s", type=float, default=1.0, help="light traffic before each kill")
    ap.add_argument("--recovery-timeout-s", type=float, default=90.0, help="bound on each kill's recovery")
    ap.add_argument("--light-pause-s", type=float, default=0.05, help="pause between the recovery phase's light requests")
    ap.add_argument("--max-foreign", type=float, default=0.05,
                    help="largest fraction of the CPUs other processes may use during the timed windows (else exit 3)")
    ap.add_argument("--out", default=None, help="JSON result (default bench/results/elastic.json; quick: elastic_quick.json)")
    ap.add_argument("--no-results-md", action="store_true", help="do not write bench/RESULTS.md (quick never does)")
    args = ap.parse_args()
    q = args.quick
    defaults = {"repeats": 1 if q else 3, "window_s": 4.0 if q else 10.0, "warmup_s": 3.0 if q else 4.0, "kills": 2 if q else 5,
                "settle_timeout_s": 30.0 if q else 60.0}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.repeats < 1 or args.kills < 1:
        ap.error("--repeats and --kills must be >= 1")
    if not 1 <= args.max_replicas <= GROUPS:
        ap.error(f"--max-replicas must be in [1, {GROUPS}]")
    if args.out is None:
        args.out = "bench/results/elastic_quick.json" if q else "bench/results/elastic.json"
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    t_start, load_before = time.perf_counter(), os.getloadavg()
    result = run(args)
    result["loadavg_before"], result["loadavg_after"] = load_before, os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start
    import ray

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result["commit"] = _commit(repo)
    result["machine"] = {
        "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "ray": ray.__version__,
        "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
        or datetime.datetime.now().isoformat(timespec="seconds"),
    }
    result["summary"] = summarize(result)
    result["foreign_cpu"] = foreign_total(result)
    result["targets"] = check(result)
    print(f"\nmachine: {os.cpu_count()} cores; load average {result['loadavg_before'][0]:.2f} before, "
          f"{result['loadavg_after'][0]:.2f} after; commit {result['commit']}; {result['wall_s']:.0f} s\n")
    _print_table(HEADERS, table_rows(result))
    print()
    _print_table(KILL_HEADERS, kill_rows(result))
    ans = result["answers"]
    print(f"\nanswers: {ans['ok']} exact, {ans['wrong']} wrong, {ans['failed']} failed requests" +
          (f"; first errors: {ans['errors'][:3]}" if ans["errors"] else ""))
    for line in _fmt_targets(result["targets"]):
        print("  " + line)
    print(_foreign_line(result))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {args.out}")
    if not q and not args.no_results_md:
        write_results_md(markdown(result))
        print(f"wrote {os.path.relpath(RESULTS_MD)}")
    if result["foreign_cpu"].get("foreign_fraction", 0.0) > args.max_foreign:
        print("machine busy: verdicts not valid (exit 3); rerun when nothing else runs", file=sys.stderr)
        return 3
    return 0 if all(t["met"] for t in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
