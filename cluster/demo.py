"""The distributed half of `moe-serve demo`: deploy on an embedded Ray, drive skewed gRPC traffic, check every answer."""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from cluster.deploy import deploy
from router_svc.client import MoEClient
from router_svc.local import LocalMoE


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_gateway_demo(args: argparse.Namespace, base: LocalMoE) -> None:
    spec = base.spec
    model = {"path": args.model} if args.model else {"random": spec.to_dict(), "seed": args.seed}
    print(f"\ndeploying {args.groups} expert groups + 1 router with a gRPC gateway on an embedded Ray ...")
    dep = deploy({"model": model, "gateway": {"port": 0}, "deployment": {"name": "demo", "expert_groups": args.groups, "transport": "auto"}},
                 progress=lambda line: print("  " + line, flush=True))
    stop = threading.Event()
    lock = threading.Lock()
    lat: list[float] = []
    counts = {"ok": 0, "wrong": 0, "errors": 0}
    worst = [0.0]

    def client_loop(k: int) -> None:
        gen = torch.Generator().manual_seed(args.seed + 100 + k)
        # NOTE: a per-client offset skews routing toward a few experts, as real traffic is.
        skew = 1.5 * torch.randn(spec.hidden_size, generator=gen)
        layers = list(spec.moe_layers)
        with MoEClient(dep.gateway_addresses, timeout=30) as client:
            i = 0
            while not stop.is_set():
                n = [1, 8, 32, 128][i % 4]
                layer = layers[i % len(layers)]
                x = torch.randn(n, spec.hidden_size, generator=gen) + skew
                t0 = time.perf_counter()
                try:
                    y = client.forward(x, layer)
                except Exception:
                    with lock:
                        counts["errors"] += 1
                    stop.wait(0.2)  # a failing service is not hammered in a tight loop
                    continue
                dt = time.perf_counter() - t0
                want = base.forward(x, layer)
                err = float((y - want).norm() / want.norm())
                with lock:
                    lat.append(dt)
                    worst[0] = max(worst[0], err)
                    counts["ok" if err < 1e-5 else "wrong"] += 1
                i += 1

    try:
        router = dep.status()["routers"][0]
        print(f"gateway {', '.join(dep.gateway_addresses)}; transport order by measurement {router['chain']} "
              f"({', '.join(f'{k} {v:.1f} ms' for k, v in router['measured_ms'].items())})")
        threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(args.clients)]
        for t in threads:
            t.start()
        print(f"{'t (s)':>6}{'ok':>8}{'wrong':>7}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}")
        t_start = time.monotonic()
        while time.monotonic() - t_start < args.seconds:
            time.sleep(1.0)
            with lock:
                snap, c = list(lat), dict(counts)
            print(f"{time.monotonic() - t_start:>6.1f}{c['ok']:>8}{c['wrong']:>7}{c['errors']:>8}"
                  f"{1e3 * _percentile(snap, 0.5):>9.2f}{1e3 * _percentile(snap, 0.99):>9.2f}")
        stop.set()
        for t in threads:
            t.join(timeout=60)
        with MoEClient(dep.gateway_addresses) as client:
            st = client.status()
        print(f"\n{'layer':>6}{'expert':>7}{'replicas':>9}{'tok/s':>10}")
        for e in sorted(st.experts, key=lambda e: (e.layer, e.expert)):
            print(f"{e.layer:>6}{e.expert:>7}{e.replicas:>9}{e.tokens_per_s:>10.0f}")
        mean = statistics.mean(lat) * 1e3 if lat else 0.0
        print(f"\n{counts['ok']} answers checked against LocalMoE (max relative error {worst[0]:.1e}), "
              f"{counts['wrong']} wrong, {counts['errors']} errors; mean latency {mean:.2f} ms")
        if counts["wrong"] or counts["errors"] or not counts["ok"]:
            raise SystemExit("moe-serve demo: FAILED (wrong answers or errors)")
    finally:
        dep.shutdown()
