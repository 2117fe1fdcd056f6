"""`moe-serve report`: where a deployment's tokens go, over time, as PNG plots and JSON.

`collect(routers, supervisor, duration_s, period_s, drive)` samples every router's `load(detail=True)`
and the supervisor's status once a `period_s` while `drive` (a workload) runs, and records the latency
of each of its requests. `summarise(samples)` turns the samples into the numbers plotted (pure, no Ray);
`write_report(samples, out_dir)` writes them:

    heatmap_layer<L>.png        tokens per expert per interval (experts x time)
    replicas.png                copies per expert over time, one panel per layer
    latency.png                 request latency p50 / p90 / p99 per interval
    coactivation_layer<L>.png   tokens that chose both experts i and j (the window's)
    specialisation.json         per layer and expert: the token ids it saw most
    report.json                 every number above, and the routers' summed counters

Counts are token-expert assignments (a token routed to k experts counts k times). An interval's
count is the rise of the routers' cumulative counters between two samples, so the heatmap of a layer
sums to the counters' rise from the first sample to the last (a router that restarted counts from 0).

`SkewedWorkload` is the traffic: closed-loop gRPC clients whose token ids follow a Zipf law; each id
has a fixed hidden state that its layer's gate sends mostly to one "home" expert, so frequent ids make
hot experts (replicas appear) and each expert sees a recognisable set of ids (specialisation).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import ray
import torch

from router_svc import names

# Legend: V vocabulary, D hidden size, E experts, T tokens.
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOP_IDS = 10

Record = Callable[[float], None]            # a finished request's latency in seconds
Drive = Callable[[threading.Event, Record], None]  # runs requests until the event is set


# -- sampling -------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Sample:
    at: float                                # unix time
    routers: Mapping[str, Mapping[str, Any]]  # router name -> its load(detail=True); absent if it did not answer
    replicas: Mapping[int, tuple[int, ...]]  # layer -> copies per expert (the supervisor's, else the routers')


@dataclass(frozen=True, kw_only=True)
class Samples:
    samples: tuple[Sample, ...]
    latencies: tuple[tuple[float, float], ...]  # (finished at, unix time; seconds)


def _layers(d: Mapping[Any, Any]) -> dict[int, Any]:
    """Layer-keyed dicts arrive with int or str keys (Ray keeps ints, JSON makes strings)."""
    return {int(k): v for k, v in d.items()}


def _sample(routers: Sequence[Any], supervisor: Any, timeout: float) -> Sample:
    loads: dict[str, Mapping[str, Any]] = {}
    for i, r in enumerate(routers):
        try:
            load = ray.get(r.load.remote(detail=True), timeout=timeout)
            loads[load.get("name") or f"router-{i}"] = load
        except Exception:  # a router restarting: its counts land in a later interval
            continue
    replicas: dict[int, tuple[int, ...]] = {}
    if supervisor is not None:
        try:
            experts = ray.get(supervisor.status.remote(), timeout=timeout)["experts"]
            per: dict[int, dict[int, int]] = {}
            for x in experts:
                per.setdefault(int(x["layer"]), {})[int(x["expert"])] = int(x["replicas"])
            replicas = {l: tuple(v.get(e, 0) for e in range(max(v) + 1)) for l, v in per.items()}
        except Exception:
            replicas = {}
    if not replicas:  # no supervisor answer: the routers' tables
        for load in loads.values():
            for l, row in _layers(load.get("replicas", {})).items():
                old = replicas.get(l, (0,) * len(row))
                replicas[l] = tuple(max(a, int(b)) for a, b in zip(old, row))
    return Sample(at=time.time(), routers=loads, replicas=replicas)


def collect(routers: Sequence[Any], supervisor: Any, duration_s: float, period_s: float, drive: Drive | None = None,
            progress: Callable[[str], None] | None = None, timeout_s: float = 10.0) -> Samples:
    """Sample every `period_s` for `duration_s` while `drive` runs in a thread.

    NOTE: the drive starts after the first sample and is stopped and joined before the last, so every
    request it made is inside the window and counted by exactly one interval.
    """
    lock = threading.Lock()
    latencies: list[tuple[float, float]] = []

    def record(seconds: float) -> None:
        with lock:
            latencies.append((time.time(), seconds))

    stop = threading.Event()
    samples = [_sample(routers, supervisor, timeout_s)]
    thread = threading.Thread(target=drive, args=(stop, record), daemon=True) if drive is not None else None
    if thread is not None:
        thread.start()
    steps = max(1, round(duration_s / period_s))
    t0 = time.monotonic()
    for k in range(1, steps + 1):
        time.sleep(max(0.0, t0 + k * period_s - time.monotonic()))
        if k == steps:
            stop.set()
            if thread is not None:
                thread.join()
        samples.append(_sample(routers, supervisor, timeout_s))
        if progress is not None:
            progress(_progress_line(k, steps, samples[-2], samples[-1], latencies, lock))
    with lock:
        return Samples(samples=tuple(samples), latencies=tuple(latencies))


def _progress_line(k: int, steps: int, prev: Sample, cur: Sample, latencies: list, lock: threading.Lock) -> str:
    with lock:
        recent = [s for at, s in latencies if prev.at < at <= cur.at]
    tokens = sum(sum(row) for name, load in cur.routers.items() if name in prev.routers
                 for row in _rise(_counts(load), _counts(prev.routers[name])).values())
    p50 = f"{1e3 * float(np.percentile(recent, 50)):.1f} ms" if recent else "-"
    extra = sum(max(0, c - 1) for row in cur.replicas.values() for c in row)
    done = round(20 * k / steps)
    return (f"[{'#' * done}{'.' * (20 - done)}] {k}/{steps}  {tokens / max(cur.at - prev.at, 1e-9):8.0f} assignments/s  "
            f"{len(recent):4d} requests  p50 {p50}  extra copies {extra}")


# -- the numbers plotted ----------------------------------------------------------------------------

def _counts(load: Mapping[str, Any]) -> dict[int, list[int]]:
    return {l: [int(c) for c in row] for l, row in _layers(load["expert_tokens"]).items()}


def _rise(cur: Mapping[int, list[int]], prev: Mapping[int, list[int]]) -> dict[int, list[int]]:
    """One router's counter rise between two loads; a drop means it restarted, so it counts from 0."""
    if any(a < b for l in cur for a, b in zip(cur[l], prev.get(l, []))):
        return {l: list(row) for l, row in cur.items()}
    return {l: [a - b for a, b in zip(row, prev.get(l, [0] * len(row)))] for l, row in cur.items()}


def _router_deltas(samples: Sequence[Sample]) -> dict[str, list[dict[int, list[int]]]]:
    """Per router, its counters' rise in each interval. A router missing from a sample adds 0 then,
    and its rise since it last answered later; the first sample it answers is its baseline."""
    last: dict[str, dict[int, list[int]]] = {}
    out: dict[str, list[dict[int, list[int]]]] = {}
    for i, s in enumerate(samples):
        for name, load in s.routers.items():
            cur = _counts(load)
            if name in last:
                out.setdefault(name, [{} for _ in range(len(samples) - 1)])[i - 1] = _rise(cur, last[name])
            last[name] = cur
    return out


def _heatmaps(samples: Sequence[Sample]) -> dict[int, list[list[int]]]:
    """layer -> (intervals, E) tokens per interval, summed over routers."""
    intervals = len(samples) - 1
    out: dict[int, list[list[int]]] = {}
    for per_interval in _router_deltas(samples).values():
        for i, d in enumerate(per_interval):
            for l, row in d.items():
                grid = out.setdefault(l, [[0] * len(row) for _ in range(intervals)])
                grid[i] = [a + b for a, b in zip(grid[i], row)]
    return dict(sorted(out.items()))


def _first_last(samples: Sequence[Sample]) -> tuple[dict[str, Mapping[str, Any]], dict[str, Mapping[str, Any]]]:
    first: dict[str, Mapping[str, Any]] = {}
    last: dict[str, Mapping[str, Any]] = {}
    for s in samples:
        for name, load in s.routers.items():
            first.setdefault(name, load)
            last[name] = load
    return first, last


def _summed(loads: Mapping[str, Mapping[str, Any]], key: str) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for load in loads.values():
        for l, m in _layers(load.get(key, {})).items():
            a = np.asarray(m, dtype=np.int64)
            out[l] = out[l] + a if l in out else a
    return out


def _coactivation(first: Mapping[str, Mapping[str, Any]], last: Mapping[str, Mapping[str, Any]]) -> dict[int, np.ndarray]:
    """layer -> (E, E) tokens that chose both experts within the window, summed over routers (a router
    that restarted in the window counts from its restart)."""
    out: dict[int, np.ndarray] = {}
    for name, load in last.items():
        for l, m in _layers(load.get("coactivation", {})).items():
            end = np.asarray(m, dtype=np.int64)
            start = np.asarray(_layers(first[name].get("coactivation", {})).get(l, np.zeros_like(end)), dtype=np.int64)
            d = end if (np.diag(end) < np.diag(start)).any() else end - start
            out[l] = out[l] + d if l in out else d
    return dict(sorted(out.items()))


def _specialisation(last: Mapping[str, Mapping[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """layer -> per expert: its most frequent token ids (summed over routers, since they started)."""
    ids: dict[int, list[Counter]] = {}
    for load in last.values():
        for l, rows in _layers(load.get("top_token_ids", {})).items():
            acc = ids.setdefault(l, [Counter() for _ in rows])
            for c, row in zip(acc, rows):
                c.update({int(t): int(n) for t, n in row})
    seen = _summed(last, "coactivation")
    out: dict[int, list[dict[str, Any]]] = {}
    for l, counters in sorted(ids.items()):
        tokens = np.diag(seen[l]) if l in seen else np.zeros(len(counters), dtype=np.int64)
        out[l] = []
        for e, c in enumerate(counters):
            top = c.most_common(TOP_IDS)
            covered = sum(n for _, n in top)
            out[l].append({"expert": e, "tokens": int(tokens[e]), "top_token_ids": [[t, n] for t, n in top],
                           "top_share": covered / int(tokens[e]) if tokens[e] else 0.0})
    return out


def _latency(samples: Sequence[Sample], latencies: Sequence[tuple[float, float]]) -> list[dict[str, float]]:
    """Per interval: requests finished in it and their p50 / p90 / p99 in ms (NaN-free: 0 when none)."""
    out = []
    for prev, cur in zip(samples, samples[1:]):
        ms = np.array([1e3 * s for at, s in latencies if prev.at < at <= cur.at])
        p = np.percentile(ms, [50, 90, 99]) if ms.size else np.zeros(3)
        out.append({"requests": int(ms.size), "p50_ms": float(p[0]), "p90_ms": float(p[1]), "p99_ms": float(p[2])})
    return out


def summarise(samples: Samples) -> dict[str, Any]:
    """Everything plotted, as plain data (JSON keys: layers as strings)."""
    s = samples.samples
    t0 = s[0].at
    first, last = _first_last(s)
    heat = _heatmaps(s)
    layers = sorted(set(heat) | {l for x in s for l in x.replicas})
    co = _coactivation(first, last)
    spec = _specialisation(last)
    c_first, c_last = _summed(first, "expert_tokens"), _summed(last, "expert_tokens")
    return {
        "layers": layers,
        "sample_times_s": [x.at - t0 for x in s],
        "heatmap": {str(l): heat[l] for l in heat},
        "tokens_per_expert": {str(l): [int(v) for v in np.sum(heat[l], axis=0)] if heat[l] else [] for l in heat},
        "counters_first": {str(l): v.tolist() for l, v in sorted(c_first.items())},
        "counters_last": {str(l): v.tolist() for l, v in sorted(c_last.items())},
        "routers": sorted(last),
        "replicas": {str(l): [list(x.replicas.get(l, ())) for x in s] for l in layers},
        "latency": _latency(s, samples.latencies),
        "requests": len(samples.latencies),
        "coactivation": {str(l): m.tolist() for l, m in co.items()},
        "specialisation": {str(l): v for l, v in spec.items()},
    }


# -- plots ------------------------------------------------------------------------------------------

def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # NOTE: files only; no display on servers, and no GUI thread next to Ray's
    import matplotlib.pyplot as plt

    return plt


def _heatmap_png(plt: Any, path: Path, layer: int, grid: list[list[int]], times: list[float]) -> None:
    m_EI = np.asarray(grid, dtype=np.float64).T if grid else np.zeros((1, 1))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * m_EI.shape[1] + 2), 0.4 * m_EI.shape[0] + 2))
    edges = times if len(times) == m_EI.shape[1] + 1 else list(range(m_EI.shape[1] + 1))
    im = ax.pcolormesh(edges, np.arange(m_EI.shape[0] + 1) - 0.5, m_EI, cmap="viridis", shading="flat")
    ax.set(xlabel="time (s)", ylabel="expert", title=f"layer {layer}: tokens per expert per interval "
           f"(total {int(m_EI.sum())})", yticks=range(m_EI.shape[0]))
    fig.colorbar(im, ax=ax, label="token assignments")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _replicas_png(plt: Any, path: Path, summary: Mapping[str, Any]) -> None:
    layers = summary["layers"]
    times = summary["sample_times_s"]
    fig, axes = plt.subplots(len(layers) or 1, 1, figsize=(8, 2.6 * max(len(layers), 1)), squeeze=False, sharex=True)
    for ax, l in zip(axes[:, 0], layers):
        rows = summary["replicas"][str(l)]
        experts = max((len(r) for r in rows), default=0)
        top = 1
        for e in range(experts):
            copies = [r[e] if e < len(r) else 0 for r in rows]
            top = max([top, *copies])
            # NOTE: a small offset per expert keeps equal counts from hiding each other
            ax.step(times, [c + 0.03 * (e - experts / 2) for c in copies], where="post", label=f"E{e}")
        ax.set(ylabel="copies", title=f"layer {l}: replicas per expert", yticks=range(0, top + 2))
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _latency_png(plt: Any, path: Path, summary: Mapping[str, Any]) -> None:
    times = summary["sample_times_s"]
    mids = [(a + b) / 2 for a, b in zip(times, times[1:])]
    rows = summary["latency"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for key in ("p50_ms", "p90_ms", "p99_ms"):
        ax.plot(mids, [r[key] if r["requests"] else np.nan for r in rows], marker="o", label=key[:3])
    ax.set(xlabel="time (s)", ylabel="latency (ms)", title=f"request latency per interval ({summary['requests']} requests)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _coactivation_png(plt: Any, path: Path, layer: int, m: list[list[int]]) -> None:
    m_EE = np.asarray(m, dtype=np.float64)
    off = m_EE.copy()
    np.fill_diagonal(off, np.nan)  # NOTE: the diagonal (tokens per expert) would swamp the pairs
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(off, cmap="magma")
    labels = [f"E{e} ({int(m_EE[e, e])})" for e in range(len(m_EE))]
    ax.set(xticks=range(len(m_EE)), yticks=range(len(m_EE)), yticklabels=labels,
           title=f"layer {layer}: tokens choosing both experts\n(diagonal: tokens per expert, in the labels)")
    fig.colorbar(im, ax=ax, label="tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(samples: Samples, out_dir: str | Path) -> dict[str, Any]:
    """Write the PNGs and JSON; returns the summary with `files` (the paths written)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(samples)
    plt = _plt()
    files = []
    for key, grid in summary["heatmap"].items():
        files.append(out / f"heatmap_layer{key}.png")
        _heatmap_png(plt, files[-1], int(key), grid, summary["sample_times_s"])
    files.append(out / "replicas.png")
    _replicas_png(plt, files[-1], summary)
    files.append(out / "latency.png")
    _latency_png(plt, files[-1], summary)
    for key, m in summary["coactivation"].items():
        files.append(out / f"coactivation_layer{key}.png")
        _coactivation_png(plt, files[-1], int(key), m)
    files.append(out / "specialisation.json")
    files[-1].write_text(json.dumps(summary["specialisation"], indent=1))
    files.append(out / "report.json")
    summary["files"] = [str(f) for f in files]
    files[-1].write_text(json.dumps(summary, indent=1))
    return summary


def table(summary: Mapping[str, Any], hottest: int = 3) -> str:
    """Tokens per expert per layer, final copies, and the top ids of each layer's hottest experts."""
    lines = []
    for key, totals in summary["tokens_per_expert"].items():
        if not totals:
            continue
        copies = (summary["replicas"].get(key) or [[]])[-1]
        lines.append(f"layer {key}  " + " ".join(f"{'E' + str(e):>7}" for e in range(len(totals))))
        lines.append(f"{'tokens':<9}" + " ".join(f"{t:>7}" for t in totals))
        lines.append(f"{'copies':<9}" + " ".join(f"{c:>7}" for c in copies))
        for e in sorted(range(len(totals)), key=lambda e: -totals[e])[:hottest]:
            top = summary["specialisation"].get(key, [])[e]["top_token_ids"] if summary["specialisation"].get(key) else []
            lines.append(f"  E{e} top ids: " + (", ".join(f"{t} ({n})" for t, n in top[:6]) or "none (no token ids)"))
    lat = [r for r in summary["latency"] if r["requests"]]
    if lat:
        lines.append(f"requests {summary['requests']}; median per-interval p50 {np.median([r['p50_ms'] for r in lat]):.1f} ms, "
                     f"worst p99 {max(r['p99_ms'] for r in lat):.1f} ms")
    return "\n".join(lines)


# -- the workload -------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class WorkloadSpec:
    clients: int = 4
    tokens: int = 16          # tokens per request
    skew: float = 1.2         # Zipf exponent of the token ids (0: uniform)
    vocab: int = 512
    home_scale: float = 4.0   # pull of an id's hidden state towards its home expert's gate row
    seed: int = 0
    timeout_s: float = 30.0   # per request


@dataclass
class WorkloadCounts:
    requests: int = 0
    tokens: dict[int, int] = field(default_factory=dict)              # layer -> tokens sent
    assignments: dict[int, list[int]] = field(default_factory=dict)   # layer -> per expert, from the replies
    dropped: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class SkewedWorkload:
    """Closed-loop clients; `send(x_TD, layer, ids_T) -> RoutingReport` is one request (e.g. over gRPC).

    Token ids are Zipf-distributed over `vocab` (id 0 the most frequent). Id v has a fixed hidden
    state per layer: `home_scale` x the unit gate row of its home expert perm_L[v mod E], plus a fixed
    random vector (so its other choices are stable too), plus a little noise per occurrence.
    """

    def __init__(self, send: Callable[[torch.Tensor, int, torch.Tensor], Any], gates: Mapping[int, torch.Tensor],
                 spec: WorkloadSpec) -> None:
        self.send, self.spec = send, spec
        self.layers = sorted(gates)
        self.num_experts = int(gates[self.layers[0]].shape[0])
        gen = torch.Generator().manual_seed(spec.seed)
        self.embed_VD: dict[int, torch.Tensor] = {}
        for l in self.layers:
            w_ED = gates[l].float()
            e, d = w_ED.shape
            home_V = torch.randperm(e, generator=gen)[torch.arange(spec.vocab) % e]
            unit_ED = w_ED / w_ED.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.embed_VD[l] = spec.home_scale * unit_ED[home_V] + torch.randn(spec.vocab, d, generator=gen)
        self.probs_V = (torch.arange(1, spec.vocab + 1, dtype=torch.float64) ** -spec.skew)
        self.counts = WorkloadCounts()
        self._lock = threading.Lock()

    def __call__(self, stop: threading.Event, record: Record) -> None:
        threads = [threading.Thread(target=self._client, args=(k, stop, record), daemon=True) for k in range(self.spec.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _client(self, k: int, stop: threading.Event, record: Record) -> None:
        gen = torch.Generator().manual_seed(self.spec.seed * 1000 + k + 1)
        n = 0
        while not stop.is_set():
            layer = self.layers[(k + n) % len(self.layers)]
            n += 1
            ids_T = torch.multinomial(self.probs_V, self.spec.tokens, replacement=True, generator=gen)
            x_TD = self.embed_VD[layer][ids_T] + 0.1 * torch.randn(self.spec.tokens, self.embed_VD[layer].shape[1], generator=gen)
            t0 = time.perf_counter()
            try:
                routing = self.send(x_TD, layer, ids_T)
            except Exception as e:  # counted; the caller decides whether errors matter
                with self._lock:
                    self.counts.errors.append(repr(e))
                continue
            record(time.perf_counter() - t0)
            per_E = torch.bincount(routing.expert, minlength=self.num_experts).tolist()
            with self._lock:
                c = self.counts
                c.requests += 1
                c.tokens[layer] = c.tokens.get(layer, 0) + self.spec.tokens
                c.assignments[layer] = [a + b for a, b in zip(c.assignments.get(layer, [0] * self.num_experts), per_E)]
                c.dropped[layer] = c.dropped.get(layer, 0) + int(routing.stats.dropped)


# -- what a report observes and drives ------------------------------------------------------------

@dataclass
class Target:
    name: str
    routers: list[Any]                # router actor handles
    supervisor: Any                   # its handle, or None
    gateways: list[str]
    gates: dict[int, torch.Tensor]    # layer -> (E, D) gate weights, to aim the workload's inputs
    token: str | None = None
    tls: Any = None
    close: Callable[[], None] = lambda: None


def embedded_config(seed: int = 0) -> dict[str, Any]:
    """chaos's small deployment, one copy per expert at the start; hot experts get up to 3, fast."""
    from cluster.chaos import embedded_config as small

    cfg = small(replicas=1, seed=seed)
    cfg["deployment"].update(name="report", max_replicas=3, hot_threshold=1.5, rebalance_period_s=0.5,
                             load_window_s=2.0, replica_down_delay_s=5.0)
    # NOTE: any free metrics port: the fixed default collides with other deployments on this host.
    cfg["telemetry"] = {"prometheus_port": 0}
    return cfg


def embedded(seed: int = 0, address: str | None = None) -> Target:
    """Start `embedded_config(seed)` (on an embedded Ray unless one is connected); close() removes it."""
    from cluster.chaos import SMALL_MODEL
    from cluster.deploy import deploy
    from router_svc.local import LocalMoE

    dep = deploy(embedded_config(seed), address=address, progress=lambda line: print("  " + line, flush=True))
    ref = LocalMoE.from_config(SMALL_MODEL, seed=seed)
    return Target(name=dep.name, routers=list(dep.routers), supervisor=dep.supervisor, gateways=list(dep.gateway_addresses),
                  gates={l: ref.layer(l).router.weight.detach() for l in ref.spec.moe_layers}, close=dep.shutdown)


def attach(name: str, config_path: str, address: str = "auto") -> Target:
    """A deployment `moe-serve up` recorded; its YAML gives the gate weights, token and TLS."""
    from cluster import ops, registry
    from cluster.config import load_config
    from cluster.deploy import NAMESPACE
    from expert_workers.source import open_source
    from router_svc.local import LocalMoE

    cfg = load_config(config_path)
    ops.connect(address)
    entry = registry.lookup(name)
    if entry is None:
        raise LookupError(f"no deployment named {name!r} recorded on this cluster")
    try:
        supervisor = ray.get_actor(names.supervisor(name), namespace=NAMESPACE)
    except ValueError:
        supervisor = None
    src = open_source(cfg.model.source())
    ref = LocalMoE(src, routing=cfg.routing_spec(src.spec.routing))
    return Target(name=name, routers=[ray.get_actor(n, namespace=NAMESPACE) for n in entry["routers"]], supervisor=supervisor,
                  gateways=list(entry["gateways"]), gates={l: ref.layer(l).router.weight.detach() for l in ref.spec.moe_layers},
                  token=cfg.auth.token, tls=ops._client_tls(cfg))


def run(target: Target, out_dir: str | Path, *, seconds: float, period: float, workload: WorkloadSpec,
        progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], WorkloadCounts]:
    """Drive `workload` through the gateways for `seconds`, sampling every `period`; write the report."""
    from router_svc.client import MoEClient

    if not target.gateways:
        raise LookupError(f"deployment {target.name} has no gateways to send the workload to")
    with MoEClient(target.gateways, token=target.token, tls=target.tls, timeout=workload.timeout_s) as client:
        deadline = time.monotonic() + 60
        while not client.health():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no gateway of {target.name} is SERVING after 60 s")
            time.sleep(0.2)
        drive = SkewedWorkload(lambda x, l, ids: client.forward(x, l, token_ids=ids, return_routing=True)[1], target.gates, workload)
        samples = collect(target.routers, target.supervisor, seconds, period, drive, progress)
    return write_report(samples, out_dir), drive.counts
