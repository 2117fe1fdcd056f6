"""Benchmark: the moe-serve deployment vs LocalMoE, plain Ray actors and Ray Serve, in one run.

One Mixtral-shaped layer (hidden 1024, expert width 2816, 8 experts, top-2, float32),
saved as a one-layer Hugging Face checkpoint exactly as bench/local_engine.py builds it.
Engines, all on one `ray.init(num_cpus=8)` with node IP 127.0.0.1, timed alternately:

  local_moe         LocalMoE in the driver process (the reference);
  moe[<transport>]  cluster.deploy (2 expert groups, 1 router, 1 CPU each), one deployment,
                    its transport switched with Router.set_transport: object_store, grpc,
                    rdt (gloo on CPU) and auto (re-measured on every switch back to auto),
                    called from the driver through `Deployment.forward` (a Ray actor call);
  moe[auto] gRPC API  the same deployment with `auto`, called as an outside client would,
                    `MoEClient` over the router's gRPC gateway;
  naive_ray         one plain Ray actor per expert; the driver runs the gate and makes one
                    actor call per expert hit per request through the object store, then combines;
  ray_serve         a Ray Serve router deployment that runs the gate and fans out to 2 expert
                    deployments (the deployment's own placement of experts on groups) with
                    `await handle.remote(...)`, called from the driver through its handle.

Every engine computes experts with the same kernel (expert_workers.ffn.GroupedExperts),
one torch thread per actor/replica (LocalMoE: the driver's threads) and its weights in
transparent huge pages (THP_MEM_ALLOC_ENABLE=1 for every process of the run), so differences
are routing, transport and orchestration, not GEMMs or memory pages.

Measured: tokens/s at 4096 tokens per request (median of repeats after warm-up); p50/p99
latency at 8 tokens per request with 1 client and with 16 concurrent clients (threads,
closed loop; bounded by a request count and a time budget, split into interleaved rounds);
relative error of every engine vs LocalMoE at 8 and 4096 tokens. Then the 1-client latency
again with each system alone on the machine (sessions alternate: the deployment up and Serve
shut down, then the reverse; --alone-rounds times), since side by side each pays for the
other's background work.

Targets (checked here, exit status 1 if missed):
  - moe-serve (best transport) >= 0.8x LocalMoE tokens/s at 4096 tokens;
  - moe-serve p50 at 8 tokens, 1 client <= 0.5x Ray Serve's (each alone; side by side shown too);
  - moe-serve tokens/s at 8 tokens under 16 clients >= 2x Ray Serve's;
  - every engine within 1e-5 relative error of LocalMoE.
The run also measures the CPU time other processes took during the timed phases; above
--max-foreign (5%) of the machine its numbers are not valid and it exits with status 3.

    python bench/service.py [--quick] [--repeats 7] [--device cpu|cuda] [--out bench/results/service.json]

The full run writes bench/results/service.json and the "Service benchmark" section of
bench/RESULTS.md; --quick (a smoke run) writes bench/results/service_quick.json only.
With --device cuda every engine computes on the one GPU (LocalMoE on it; the deployment's
groups, the naive actors and the Serve expert replicas each take a share of it) and the run
writes service_gpu.json and the "Service benchmark (GPU)" section, naming the GPU. The goals
above are set for the 2-core CPU machine: on a GPU they are reported, and only correctness
sets the exit status.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

# NOTE: the deployment's CPU groups keep their weights in transparent huge pages (deployment.huge_pages,
# on by default). Set here, before torch loads, it holds for every engine alike: LocalMoE in this
# process and every Ray worker started from it (naive actors, Serve replicas, the router).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from local_engine import EXPERTS, HIDDEN, TOP_K, WIDTH, build  # noqa: E402
from service_engines import (LAYER, NAIVE_GPUS, SHARD_GPUS, DeploymentEngine, Engine, GatewayEngine, LocalEngine,  # noqa: E402
                             NaiveRayEngine, ServeEngine)

SMALL, LARGE = 8, 4096
CLIENTS = 16
MODES = ("object_store", "grpc", "rdt", "auto")
GROUPS = 2
RESULTS_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
SECTION = "## Service benchmark"
SECTIONS = {"cpu": SECTION, "cuda": SECTION + " (GPU)"}
# the share of the one GPU each expert group asks for with --device cuda (deploy leaves the RDT peer's share)
GROUP_GPUS = 0.1


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def _delta(a: dict[str, float] | None, b: dict[str, float] | None, acc: dict[str, float]) -> None:
    if a is not None and b is not None:
        for k in a:
            acc[k] = acc.get(k, 0.0) + b[k] - a[k]


def _throughput(engines: list[Engine], x: torch.Tensor, repeats: int,
                warmup: int) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Seconds per call at one size, engines alternated; and each engine's server-side counter deltas."""
    for e in engines:
        e.prepare()
        for _ in range(warmup):
            e.call(x)
    times: dict[str, list[float]] = {e.name: [] for e in engines}
    server: dict[str, dict[str, float]] = {e.name: {} for e in engines}
    for _ in range(repeats):  # alternate so drift and neighbours hit every engine alike
        for e in engines:
            e.prepare()
            c0 = e.counters()
            t0 = time.perf_counter()
            e.call(x)
            times[e.name].append(time.perf_counter() - t0)
            _delta(c0, e.counters(), server[e.name])
    return times, server


def _round(engine: Engine, inputs: list[torch.Tensor], n: int, budget_s: float, clients: int,
           pool: cf.ThreadPoolExecutor) -> tuple[list[float], float]:
    """One closed-loop round: `clients` callers until n requests or the time budget. -> (latencies, wall)."""
    counter = itertools.count()
    deadline = time.perf_counter() + budget_s

    def client() -> list[float]:
        lat = []
        while True:
            i = next(counter)
            if i >= n or time.perf_counter() > deadline:
                return lat
            x = inputs[i % len(inputs)]
            t0 = time.perf_counter()
            engine.call(x)
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    if clients == 1:
        lat = client()
    else:
        lat = list(itertools.chain.from_iterable(f.result() for f in [pool.submit(client) for _ in range(clients)]))
    return lat, time.perf_counter() - t0


def _latency(engines: list[Engine], inputs: list[torch.Tensor], clients: int, requests: int, budget_s: float,
             rounds: int, pool: cf.ThreadPoolExecutor) -> dict[str, dict[str, Any]]:
    per_round, budget = max(1, requests // rounds), budget_s / rounds
    for e in engines:  # warm-up
        e.prepare()
        _round(e, inputs, 2 * clients, budget, clients, pool)
    lat: dict[str, list[float]] = {e.name: [] for e in engines}
    tps: dict[str, list[float]] = {e.name: [] for e in engines}
    server: dict[str, dict[str, float]] = {e.name: {"wall_s": 0.0} for e in engines}
    for _ in range(rounds):
        for e in engines:
            e.prepare()
            c0 = e.counters()
            ls, wall = _round(e, inputs, per_round, budget, clients, pool)
            _delta(c0, e.counters(), server[e.name])
            server[e.name]["wall_s"] += wall
            lat[e.name] += ls
            tps[e.name].append(len(ls) * inputs[0].shape[0] / wall)
    out = {}
    for e in engines:
        out[e.name] = {**_summary(lat[e.name]), "mean_s": float(np.mean(lat[e.name])), "all_s": lat[e.name],
                       "tokens_per_s": statistics.median(tps[e.name]),
                       "tokens_per_s_rounds": tps[e.name], "server": _server_summary(server[e.name], GROUPS)}
    return out


def _summary(latencies: list[float]) -> dict[str, Any]:
    a = np.array(latencies)
    return {"requests": int(a.size), "p50_s": float(np.percentile(a, 50)), "p99_s": float(np.percentile(a, 99))}


def _server_summary(c: dict[str, float], groups: int) -> dict[str, float]:
    """Requests per router batch, and the fraction of wall time the expert groups spent computing."""
    if "batches" not in c:
        return {}
    out = {**c, "requests_per_batch": c["requests"] / max(1, c["batches"])}
    if c.get("wall_s"):
        out["group_busy_fraction"] = c["group_busy_s"] / (groups * c["wall_s"])
        out["group_compute_ms_per_batch"] = 1e3 * c["group_busy_s"] / max(1, c["group_batches"])
    return out


# -- the machine ---------------------------------------------------------------

def _cpu_snapshot() -> dict[str, float]:
    """Busy CPU seconds of the whole machine, and of this process and its descendants (Linux /proc).

    Their difference over the run is CPU taken by processes outside this benchmark: on a
    2-core machine anything else running skews every number, so the run reports it.
    """
    hz = os.sysconf("SC_CLK_TCK")
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        procs: dict[int, tuple[int, int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        rest = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                procs[int(d)] = (int(rest[1]), sum(int(x) for x in rest[11:15]))  # ppid; utime stime cutime cstime
    except OSError:
        return {}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    ours, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        ours += procs.get(pid, (0, 0))[1]
        todo += children.get(pid, [])
    return {"machine_busy_s": (sum(v) - v[3] - v[4]) / hz, "ours_s": ours / hz, "t": time.perf_counter()}


def _foreign(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    if not a or not b:
        return {}
    wall = b["t"] - a["t"]
    foreign = max(0.0, (b["machine_busy_s"] - a["machine_busy_s"]) - (b["ours_s"] - a["ours_s"]))
    return {"wall_s": wall, "ours_cpu_s": b["ours_s"] - a["ours_s"], "foreign_cpu_s": foreign,
            "foreign_fraction": foreign / (wall * (os.cpu_count() or 1))}


def _foreign_total(windows: list[dict[str, float]]) -> dict[str, float]:
    """Several timed windows as one. NOTE: windows, not one span over the run: an actor process that
    exits (a system shut down between sessions) takes its CPU seconds out of this process tree's sum."""
    windows = [w for w in windows if w]
    if not windows:
        return {}
    out = {k: sum(w[k] for w in windows) for k in ("wall_s", "ours_cpu_s", "foreign_cpu_s")}
    return {**out, "windows": len(windows), "foreign_fraction": out["foreign_cpu_s"] / (out["wall_s"] * (os.cpu_count() or 1))}


# -- the run -------------------------------------------------------------------

def _deploy(path: str, args: argparse.Namespace) -> Any:
    from cluster import deploy

    return deploy({"model": {"path": path}, "deployment": {
        "name": "bench", "expert_groups": GROUPS, "routers": 1, "group_cpus": 1, "router_cpus": 1,
        "transport": "auto", "device": args.device, "grpc_host": "127.0.0.1",
        **({"group_gpus": GROUP_GPUS} if args.device == "cuda" else {}),
        **({} if args.batch_wait_us is None else {"batch_max_wait_us": args.batch_wait_us})},
        # NOTE: the gateway stays on (the default) but on any free loopback port, not the fixed
        # default 50051, which another deployment on this machine may hold.
        "gateway": {"port": 0}})


def _alone(args: argparse.Namespace, path: str, moe: Any, inputs: list[torch.Tensor], placement: list[list[int]],
           pool: cf.ThreadPoolExecutor, live: dict[str, Any], windows: list[dict[str, float]]) -> dict[str, Any]:
    """1-client latency with each system alone on the machine: sessions alternate, moe-serve (its deployment
    up, Serve shut down) then Ray Serve (the deployment shut down, Serve up), `args.alone_rounds` times.

    NOTE: side by side, each system pays for the other's background work on the 2 cores (Serve's
    controller loop and metrics pushes; the deployment's supervisor and health pings): with Serve
    merely running, moe-serve's 1-client p50 rose by about 1 ms. A user runs one of them, so this
    phase measures each without the other. LocalMoE runs in every session as a control for drift.
    `live` holds what is up ("dep", "serve"); whatever is up at the end is left for the caller to stop.
    Each session's timed window is appended to `windows` (CPU taken by other processes).
    """
    lat: dict[str, list[float]] = {}
    session_p50: dict[str, list[float]] = {}
    for _ in range(args.alone_rounds):
        for system in ("moe-serve", "ray_serve"):
            if system == "moe-serve":
                if live.get("serve") is not None:
                    live.pop("serve").serve.shutdown()
                if live.get("dep") is None:
                    live["dep"] = _deploy(path, args)
                state: dict[str, Any] = {"mode": "auto"}
                engines: list[Engine] = [LocalEngine(moe), DeploymentEngine(live["dep"], "auto", state),
                                         GatewayEngine(live["dep"], "auto", state), GatewayEngine(live["dep"], "auto", state, stream=True)]
            else:
                if live.get("dep") is not None:
                    live.pop("dep").shutdown()
                if live.get("serve") is None:
                    live["serve"] = ServeEngine(path, args.serve_max_ongoing, placement, args.device)
                engines = [LocalEngine(moe), live["serve"]]
            print(f"  {system} alone ...", flush=True)
            c0 = _cpu_snapshot()
            r = _latency(engines, inputs, 1, args.requests, args.budget_s, 2, pool)
            windows.append(_foreign(c0, _cpu_snapshot()))
            for e in engines:
                if isinstance(e, GatewayEngine):
                    e.client.close()
            for n, v in r.items():
                label = f"{n} ({system})" if n == "local_moe" else n  # LocalMoE once per system's sessions
                lat.setdefault(label, []).extend(v["all_s"])
                session_p50.setdefault(label, []).append(1e3 * v["p50_s"])
    return {"engines": {n: {**_summary(ls), "sessions_p50_ms": session_p50[n]} for n, ls in lat.items()}}


def run(args: argparse.Namespace) -> dict:
    import ray

    from cluster.deploy import start_local_ray

    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(1)
    x_large = torch.randn(LARGE, HIDDEN, generator=gen)
    inputs = [torch.randn(SMALL, HIDDEN, generator=gen) for _ in range(64)]
    result: dict[str, Any] = {"config": {k: getattr(args, k) for k in ("quick", "repeats", "warmup", "requests", "budget_s", "rounds",
                                                                        "serve_max_ongoing", "batch_wait_us", "max_foreign", "alone_rounds",
                                                                        "device")}}
    dep = serve_engine = naive = None
    with tempfile.TemporaryDirectory() as tmp:
        model, moe = build(tmp)
        del model
        # the reference stays LocalMoE on the CPU in float32; the `local_moe` engine runs on the benchmark's device
        local = moe if args.device == "cpu" else type(moe).from_pretrained(tmp, device=args.device)
        start_local_ray(num_cpus=8, include_dashboard=False, log_to_driver=False)  # every server on 127.0.0.1
        result["node_ip"] = ray.util.get_node_ip_address()
        try:
            t0 = time.perf_counter()
            dep = _deploy(tmp, args)
            result["deployment_settings"] = {k: getattr(dep.config.deployment, k) for k in (
                "expert_groups", "routers", "group_cpus", "router_cpus", "batch_max_tokens", "batch_max_wait_us")}
            state: dict[str, Any] = {"mode": "auto"}
            result["startup_s"] = {"deployment": time.perf_counter() - t0}
            infos = ray.get([g.info.remote() for g in dep.groups])
            result["thp_mode"] = infos[0]["thp_mode"]
            result["group_huge_page_mib"] = sum(m["huge_page_bytes"] for m in ray.get([g.memory.remote() for g in dep.groups])) >> 20
            t0 = time.perf_counter()
            naive = NaiveRayEngine(tmp, moe, args.device)
            result["startup_s"]["naive_ray"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            # the same experts per group as the deployment's routing table
            placement = [sorted(e for layer, e in slots if layer == LAYER) for slots in dep.table.placement]
            result["placement"] = placement
            serve_engine = ServeEngine(tmp, args.serve_max_ongoing, placement, args.device)
            result["startup_s"]["ray_serve"] = time.perf_counter() - t0
            deployments = [DeploymentEngine(dep, m, state) for m in MODES] + [GatewayEngine(dep, "auto", state),
                                                                               GatewayEngine(dep, "auto", state, stream=True)]
            engines: list[Engine] = [LocalEngine(local), *deployments, naive, serve_engine]

            print("correctness vs LocalMoE (relative error):")
            refs = {SMALL: moe.forward(inputs[0], LAYER), LARGE: moe.forward(x_large, LAYER)}
            errors: dict[str, dict[str, Any]] = {}
            for e in engines:
                e.prepare()
                errors[e.name] = {}
                for tokens, x in ((SMALL, inputs[0]), (LARGE, x_large)):
                    y, info = e.check(x)
                    errors[e.name][str(tokens)] = {"rel_err": _rel(y, refs[tokens]), **info}
                line = "  ".join(f"{t} tok {v['rel_err']:.2e}" + (f" (via {v['transport_used']})" if "transport_used" in v else "")
                                 for t, v in errors[e.name].items())
                print(f"  {e.name:>18}: {line}")
            result["errors"] = errors

            cpu0 = _cpu_snapshot()
            print(f"throughput at {LARGE} tokens ({args.repeats} repeats, {args.warmup} warm-up) ...", flush=True)
            times, server = _throughput(engines, x_large, args.repeats, args.warmup)
            result["throughput_large"] = {n: {"median_s": statistics.median(ts), "all_s": ts, "tokens_per_s": LARGE / statistics.median(ts),
                                              "server": _server_summary(server[n], GROUPS)} for n, ts in times.items()}
            with cf.ThreadPoolExecutor(CLIENTS) as pool:
                for clients in (1, CLIENTS):
                    print(f"latency at {SMALL} tokens, {clients} client(s) ...", flush=True)
                    result[f"latency_{clients}"] = _latency(engines, inputs, clients, args.requests, args.budget_s, args.rounds, pool)
                windows = [_foreign(cpu0, _cpu_snapshot())]
                result["deployment_status"] = dep.status()
                result["auto_chains"] = [c for d in deployments if d.mode == "auto" for c in d.chains]
                result["auto_measured_ms"] = state.get("auto_measured_ms", [])
                for d in deployments:
                    if isinstance(d, GatewayEngine):
                        d.client.close()
                naive.shutdown()
                naive = None
                if args.alone_rounds:
                    print(f"latency at {SMALL} tokens, 1 client, each system alone ({args.alone_rounds} rounds) ...", flush=True)
                    live = {"dep": dep, "serve": serve_engine}
                    try:
                        result["latency_1_alone"] = _alone(args, tmp, local, inputs, placement, pool, live, windows)
                    finally:
                        dep, serve_engine = live.get("dep"), live.get("serve")
            result["foreign_cpu"] = _foreign_total(windows)
            result["engines"] = [{"name": e.name, "kind": e.kind} for e in engines]
        finally:
            if serve_engine is not None:
                serve_engine.serve.shutdown()
            if dep is not None:
                dep.shutdown()
            if naive is not None:
                naive.shutdown()
            ray.shutdown()
    return result


def table(result: dict) -> list[dict[str, Any]]:
    local = result["throughput_large"]["local_moe"]["tokens_per_s"]
    serve_tp = result["throughput_large"]["ray_serve"]["tokens_per_s"]
    l1, l16 = result["latency_1"], result[f"latency_{CLIENTS}"]
    rows = []
    for e in result["engines"]:
        n = e["name"]
        tp = result["throughput_large"][n]["tokens_per_s"]
        rows.append({
            "engine": n, "kind": e["kind"],
            "tps_4096": tp, "tps_4096_x_local": tp / local, "tps_4096_x_serve": tp / serve_tp,
            "p50_1c_ms": 1e3 * l1[n]["p50_s"], "p99_1c_ms": 1e3 * l1[n]["p99_s"],
            "p50_1c_x_local": l1[n]["p50_s"] / l1["local_moe"]["p50_s"], "p50_1c_x_serve": l1[n]["p50_s"] / l1["ray_serve"]["p50_s"],
            "p50_16c_ms": 1e3 * l16[n]["p50_s"], "p99_16c_ms": 1e3 * l16[n]["p99_s"],
            "tps_8_16c": l16[n]["tokens_per_s"], "tps_8_16c_x_local": l16[n]["tokens_per_s"] / l16["local_moe"]["tokens_per_s"],
            "tps_8_16c_x_serve": l16[n]["tokens_per_s"] / l16["ray_serve"]["tokens_per_s"],
            "max_rel_err": max(v["rel_err"] for v in result["errors"][n].values()),
        })
    return rows


COLUMNS = [  # (key, header, format)
    ("engine", "engine", "{}"),
    ("tps_4096", "tok/s @4096", "{:.0f}"), ("tps_4096_x_local", "x local", "{:.2f}"), ("tps_4096_x_serve", "x serve", "{:.2f}"),
    ("p50_1c_ms", "p50 ms 1c", "{:.2f}"), ("p99_1c_ms", "p99 ms 1c", "{:.2f}"),
    ("p50_1c_x_local", "p50 x local", "{:.2f}"), ("p50_1c_x_serve", "p50 x serve", "{:.2f}"),
    ("p50_16c_ms", "p50 ms 16c", "{:.1f}"), ("p99_16c_ms", "p99 ms 16c", "{:.1f}"),
    ("tps_8_16c", "tok/s 16c", "{:.0f}"), ("tps_8_16c_x_local", "x local", "{:.2f}"), ("tps_8_16c_x_serve", "x serve", "{:.2f}"),
    ("max_rel_err", "max rel err", "{:.1e}"),
]


def check(result: dict, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    dep = [r for r in rows if r["kind"] == "deployment"]
    auto = next(r for r in dep if r["engine"] == "moe[auto]")
    best_tp = max(dep, key=lambda r: r["tps_4096"])
    best_p50 = min(dep, key=lambda r: r["p50_1c_ms"])
    alone = alone_rows(result)
    best_16 = max(dep, key=lambda r: r["tps_8_16c"])
    worst_err = max(rows, key=lambda r: r["max_rel_err"])
    return [
        {"target": f"{LARGE} tok: moe-serve tokens/s / LocalMoE's", "goal": ">= 0.80", "value": best_tp["tps_4096_x_local"],
         "best": best_tp["engine"], "auto": auto["tps_4096_x_local"], "met": best_tp["tps_4096_x_local"] >= 0.8},
        _p50_target(best_p50, auto, alone),
        {"target": f"{SMALL} tok, {CLIENTS} clients: moe-serve tokens/s / Ray Serve's", "goal": ">= 2.00",
         "value": best_16["tps_8_16c_x_serve"], "best": best_16["engine"], "auto": auto["tps_8_16c_x_serve"],
         "met": best_16["tps_8_16c_x_serve"] >= 2.0},
        {"target": f"every engine vs LocalMoE, max rel. error ({SMALL} and {LARGE} tok)", "goal": "< 1e-5",
         "value": worst_err["max_rel_err"], "best": worst_err["engine"], "auto": auto["max_rel_err"], "met": worst_err["max_rel_err"] < 1e-5},
    ]


def alone_rows(result: dict) -> list[dict[str, Any]]:
    """The 'each system alone' 1-client latencies, with ratios to Ray Serve's alone."""
    a = result.get("latency_1_alone")
    if not a:
        return []
    serve = a["engines"]["ray_serve"]["p50_s"]
    return [{"engine": n, "p50_ms": 1e3 * v["p50_s"], "p99_ms": 1e3 * v["p99_s"], "p50_x_serve": v["p50_s"] / serve,
             "requests": v["requests"], "sessions_p50_ms": v["sessions_p50_ms"]} for n, v in a["engines"].items()]


def control_drift(alone: list[dict[str, Any]]) -> dict[str, float] | None:
    """LocalMoE's p50 in each system's alone sessions: how much the machine moved between them."""
    ctl = {r["engine"]: r["p50_ms"] for r in alone}
    a, b = ctl.get("local_moe (moe-serve)"), ctl.get("local_moe (ray_serve)")
    if not a or not b:
        return None
    return {"moe_serve_ms": a, "ray_serve_ms": b, "ratio": b / a}


def _p50_target(best_side: dict[str, Any], auto: dict[str, Any], alone: list[dict[str, Any]]) -> dict[str, Any]:
    """1 client p50 / Ray Serve's: judged with each system alone when measured (see _alone), else side by side."""
    side = f"side by side {best_side['p50_1c_x_serve']:.4g} ({best_side['engine']})"
    if not alone:
        return {"target": f"{SMALL} tok, 1 client: moe-serve p50 / Ray Serve's (side by side)", "goal": "<= 0.50",
                "value": best_side["p50_1c_x_serve"], "best": best_side["engine"], "auto": auto["p50_1c_x_serve"],
                "met": best_side["p50_1c_x_serve"] <= 0.5}
    ours = [r for r in alone if r["engine"].startswith("moe[")]
    best = min(ours, key=lambda r: r["p50_ms"])
    a_auto = next(r for r in ours if r["engine"] == "moe[auto]")
    return {"target": f"{SMALL} tok, 1 client: moe-serve p50 / Ray Serve's (each alone; {side})", "goal": "<= 0.50",
            "value": best["p50_x_serve"], "best": best["engine"], "auto": a_auto["p50_x_serve"], "met": best["p50_x_serve"] <= 0.5}


SERVER_HEADERS = ("engine", "req/batch 1c", "req/batch 16c", "group busy 1c", "group busy 16c", "group ms/batch 16c",
                  f"group ms/batch @{LARGE}")


def server_rows(result: dict) -> list[list[str]]:
    rows = []
    for e in result["engines"]:
        if e["kind"] != "deployment":
            continue
        n = e["name"]
        s1, s16, sl = result["latency_1"][n]["server"], result[f"latency_{CLIENTS}"][n]["server"], result["throughput_large"][n]["server"]
        rows.append([n, f"{s1['requests_per_batch']:.2f}", f"{s16['requests_per_batch']:.2f}", f"{100 * s1['group_busy_fraction']:.0f}%",
                     f"{100 * s16['group_busy_fraction']:.0f}%", f"{s16['group_compute_ms_per_batch']:.1f}",
                     f"{1e3 * sl['group_busy_s'] / max(1, sl['group_batches']):.0f}"])
    return rows


def _fmt_targets(targets: list[dict[str, Any]]) -> list[str]:
    out = []
    for t in targets:
        who = "worst" if "error" in t["target"] else "best"
        out.append(f"[{'PASS' if t['met'] else 'MISS'}] {t['target']}: {t['value']:.4g} (goal {t['goal']}; "
                   f"{who}: {t['best']}; moe[auto]: {t['auto']:.4g})")
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    widths = [max(len(h), 18 if k == "engine" else 0) for k, h, _ in COLUMNS]
    print(" ".join(f"{h:>{w}}" for (_, h, _), w in zip(COLUMNS, widths)))
    for r in rows:
        print(" ".join(f"{f.format(r[k]):>{w}}" for (k, _, f), w in zip(COLUMNS, widths)))


def markdown(result: dict, rows: list[dict[str, Any]], targets: list[dict[str, Any]]) -> str:
    m, c, d = result["machine"], result["config"], result["deployment_settings"]
    gpu = c.get("device") == "cuda"
    weights = (f"Every engine computes on the GPU: LocalMoE on it, each expert group with {GROUP_GPUS} of it (less the RDT "
               f"peer's share), each naive actor {NAIVE_GPUS}, each Serve expert replica {SHARD_GPUS}; routers and the "
               "Serve router on the CPU." if gpu else
               f"Weights in transparent huge pages for every engine (`THP_MEM_ALLOC_ENABLE={m.get('thp_env', '?')}`, kernel THP "
               f"mode `{m.get('thp_mode', '?')}`; the deployment's groups held {m.get('group_huge_page_mib', '?')} MiB in huge pages).")
    lines = [
        SECTIONS[c.get("device", "cpu")], "",
        f"Written by `python bench/service.py{' --device cuda' if gpu else ''}` on {m['date']} at commit `{result['commit']}`; "
        f"raw numbers in `{result['out']}`.",
        "",
        f"Machine: {m['cores']} cores, {m['platform']}, Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} threads in the driver), Ray {m['ray']}, {m.get('gpu') or 'no GPU'}. "
        f"One `ray.init(num_cpus=8)` for every engine, node IP {result.get('node_ip')}; Serve without an HTTP proxy "
        f"(handles only); the groups' gRPC data plane on 127.0.0.1. {weights} Load average (1 min) {result['loadavg_before'][0]:.2f} "
        f"before the run, {result['loadavg_after'][0]:.2f} after; run took {result['wall_s']:.0f} s.",
        "",
        f"Model: one Mixtral-shaped layer (hidden {HIDDEN}, expert width {WIDTH}, {EXPERTS} experts, top-{TOP_K}, float32), "
        "a one-layer Hugging Face checkpoint built as in `bench/local_engine.py`. Engines: `local_moe` (LocalMoE in the "
        f"driver), `moe[...]` (one `cluster.deploy`: {d['expert_groups']} expert groups, {d['routers']} router, "
        f"{d['group_cpus']:g} CPU per group, `batch_max_tokens` {d['batch_max_tokens']} / `batch_max_wait_us` "
        f"{d['batch_max_wait_us']}{' (library default)' if c['batch_wait_us'] is None else ''}; transport switched with "
        "`Router.set_transport`; called through `Deployment.forward`, a Ray actor call), `moe[auto] gRPC API` (the same "
        "deployment called as an outside client would: `MoEClient` over the router's gRPC gateway), `naive_ray` "
        "(one Ray actor per expert, gate in the driver, one call per expert hit), `ray_serve` (a Serve router deployment "
        f"fanning out with `await handle.remote()` to {GROUPS} expert deployments with the same placement, "
        f"`max_ongoing_requests={c['serve_max_ongoing']}`, no `@serve.batch`). All compute experts with the same kernel, "
        "one torch thread per actor/replica.",
        "",
        f"Throughput: {LARGE} tokens per request, median of {c['repeats']} after {c['warmup']} warm-up, engines alternated. "
        f"Latency: {SMALL} tokens per request, closed loop with 1 and {CLIENTS} client threads, up to {c['requests']} "
        f"requests / {c['budget_s']} s per engine and setting in {c['rounds']} interleaved rounds; `tok/s 16c` is the median "
        "over rounds (for `local_moe`, 16 threads call one LocalMoE concurrently). Ratios: `x local` = engine / local_moe, "
        "`x serve` = engine / ray_serve (for p50, lower is better).",
        "",
        "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|" + "|".join("---" if k == "engine" else "---:" for k, _, _ in COLUMNS) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(f.format(r[k]) for k, _, f in COLUMNS) + " |")
    lines += ["", "Deployment, server side (router counters and expert-group compute time over the same slots):", "",
              "| " + " | ".join(h for h in SERVER_HEADERS) + " |", "|---" + "|---:" * (len(SERVER_HEADERS) - 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in server_rows(result)]
    alone = alone_rows(result)
    if alone:
        lines += ["", f"Latency at {SMALL} tokens, 1 client, each system alone: sessions alternate {c.get('alone_rounds')} times, "
                  "moe-serve (its deployment up, Serve shut down) then Ray Serve (the deployment shut down, Serve up), "
                  f"{c['requests']} requests / {c['budget_s']} s per engine per session in 2 interleaved rounds; LocalMoE runs "
                  "in every session as a control. Side by side (the table above) each system also pays for the other's "
                  "background work on the 2 cores (Serve's controller loop and metrics, the deployment's supervisor and "
                  "health pings); a user runs one of them. p50 of all requests of all sessions.", "",
                  "| engine | p50 ms | p99 ms | p50 x serve | requests | p50 ms per session |", "|---|---:|---:|---:|---:|---|"]
        lines += [f"| {r['engine']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p50_x_serve']:.2f} | {r['requests']} | "
                  + " / ".join(f"{v:.2f}" for v in r["sessions_p50_ms"]) + " |" for r in alone]
        drift = control_drift(alone)
        if drift is not None:
            lines += ["", f"Control: LocalMoE's p50 was {drift['moe_serve_ms']:.2f} ms in moe-serve's sessions and "
                      f"{drift['ray_serve_ms']:.2f} ms in Ray Serve's ({drift['ratio']:.2f}x): the machine itself (memory "
                      "bandwidth shared with other tenants) was that much faster or slower for one system than for the "
                      "other, so a p50 ratio that close to its goal is not settled by one run."]
    lines += ["", "Targets (moe-serve = its best transport for each target; `moe[auto]` shown alongside"
              + ("; the goals are set for the 2-core CPU machine: on a GPU only correctness sets the exit status" if gpu else "")
              + "). " + _foreign_line(result), ""]
    lines += [f"- {t}" for t in _fmt_targets(targets)]
    chains = sorted({" > ".join(ch) for ch in result.get("auto_chains", [])})
    lines += ["", f"`auto` chose (over {len(result.get('auto_chains', []))} switches): " + "; ".join(f"`{ch}`" for ch in chains) + "."]
    lines += [f"Startup: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["startup_s"].items()) + "."]
    return "\n".join(lines) + "\n"


def _foreign_line(result: dict) -> str:
    f = result.get("foreign_cpu") or {}
    if not f:
        return "CPU used outside this benchmark: not measured (no /proc)."
    limit = result["config"].get("max_foreign", 0.05)
    warn = (f" Above the {100 * limit:.0f}% limit: other processes competed for the CPUs, so this run's numbers and "
            "verdicts are NOT VALID." if f["foreign_fraction"] > limit else "")
    return (f"CPU used outside this benchmark during the timed phases: {f['foreign_cpu_s']:.1f} s of "
            f"{f['wall_s'] * (os.cpu_count() or 1):.0f} core-seconds ({100 * f['foreign_fraction']:.1f}%); "
            f"this run used {f['ours_cpu_s']:.0f} s.{warn}")


def write_results_md(text: str, path: str = RESULTS_MD, section: str = SECTION) -> None:
    """Replace (or add) the benchmark's section, keeping any other sections."""
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmark results\n\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old, count=1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    with open(path, "w", encoding="utf-8") as f:
        f.write(new.rstrip("\n") + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer repeats and requests; writes service_quick.json only")
    ap.add_argument("--repeats", type=int, default=None, help=f"timed repeats at {LARGE} tokens (median; >= 5; quick: 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls per engine before timing (quick: 1)")
    ap.add_argument("--requests", type=int, default=None, help="max requests per engine and latency setting (quick: 32)")
    ap.add_argument("--budget-s", type=float, default=None, help="max seconds per engine and latency setting (quick: 1)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per latency setting (quick: 2)")
    ap.add_argument("--batch-wait-us", type=int, default=None,
                    help="the deployment's batch_max_wait_us (default: the library's default)")
    ap.add_argument("--alone-rounds", type=int, default=None,
                    help="sessions of the 1-client latency with each system alone, alternated (0: skip; quick: 1)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where every engine computes (cuda: the one GPU, shared; see the docstring)")
    ap.add_argument("--serve-max-ongoing", type=int, default=32, help="Ray Serve max_ongoing_requests per deployment")
    ap.add_argument("--max-foreign", type=float, default=0.05,
                    help="largest fraction of the CPUs other processes may use during the timed phases (else exit 3)")
    ap.add_argument("--out", default=None, help="JSON result (default bench/results/service.json; quick: service_quick.json)")
    ap.add_argument("--no-results-md", action="store_true", help="do not write bench/RESULTS.md (quick never does)")
    args = ap.parse_args()
    q = args.quick
    defaults = {"repeats": 3 if q else 7, "warmup": 1 if q else 2, "requests": 32 if q else 200, "budget_s": 1.0 if q else 8.0,
                "rounds": 2 if q else 4, "alone_rounds": 1 if q else 2}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not q and args.repeats < 5:
        ap.error("--repeats must be >= 5 (use --quick for a smoke run)")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    if args.out is None:
        args.out = f"bench/results/service{'_gpu' if args.device == 'cuda' else ''}{'_quick' if q else ''}.json"
    try:
        import ray
        import ray.serve  # noqa: F401
    except ImportError as e:
        print(f"Ray Serve is not importable ({e}); install it with: pip install 'ray[serve]'", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    t_start, load_before = time.perf_counter(), os.getloadavg()
    result = run(args)
    result["loadavg_before"], result["loadavg_after"] = load_before, os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start
    result["out"] = "bench/results/" + os.path.basename(args.out)  # where the JSON lives in the repository
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=repo).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench"],
                             capture_output=True, text=True, cwd=repo).stdout.split("\n")
    changed = [line[3:] for line in changed if line.strip()]
    result["commit"] = (head or "unknown") + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")
    result["machine"] = {
        "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "ray": ray.__version__,
        "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
        or datetime.datetime.now().isoformat(timespec="seconds"),
        "thp_env": os.environ.get("THP_MEM_ALLOC_ENABLE"), "thp_mode": result.get("thp_mode"),
        "group_huge_page_mib": result.get("group_huge_page_mib"),
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
    }
    rows = table(result)
    targets = check(result, rows)
    result["table"], result["targets"] = rows, targets
    print()
    print_table(rows)
    print()
    print(" ".join(f"{h:>18}" for h in SERVER_HEADERS))
    for row in server_rows(result):
        print(" ".join(f"{v:>18}" for v in row))
    print(f"auto chains: {sorted({' > '.join(c) for c in result['auto_chains']})}; "
          f"router counters: {result['deployment_status']['routers'][0].get('counters')}")
    for line in _fmt_targets(targets):
        print("  " + line)
    print(_foreign_line(result))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    if not q and not args.no_results_md:
        write_results_md(markdown(result, rows, targets), section=SECTIONS[args.device])
        print(f"wrote {os.path.relpath(RESULTS_MD)}")
    if result.get("foreign_cpu", {}).get("foreign_fraction", 0.0) > args.max_foreign:
        print("machine busy: verdicts not valid (exit 3); rerun when nothing else runs", file=sys.stderr)
        return 3
    gated = targets if args.device == "cpu" else [t for t in targets if "rel. error" in t["target"]]
    return 0 if all(t["met"] for t in gated) else 1


if __name__ == "__main__":
    sys.exit(main())
