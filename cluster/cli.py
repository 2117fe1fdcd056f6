"""The `moe-serve` command line.

    moe-serve demo      run a small MoE model locally, then deploy it on an embedded Ray and drive it
                        through the gRPC gateway, checking every answer against LocalMoE
    moe-serve up        deploy onto a running Ray cluster (detached) and print the gateway addresses
    moe-serve status    show deployments: routers, groups, per-expert load
    moe-serve down      remove a deployment's actors
    moe-serve chaos     load from gRPC clients while groups, routers, the supervisor (and nodes) are killed
    moe-serve bench     run the service benchmark
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from typing import Sequence

import torch

from expert_workers.errors import MoEServeError
from expert_workers.spec import ROUTING_POLICIES, MoESpec, RoutingSpec
from router_svc.local import LocalMoE

# supervisor events `moe-serve status` prints per deployment (--json has all the routers relay)
STATUS_EVENTS = 10

DEMO_SPEC = MoESpec(
    hidden_size=256,
    intermediate_size=512,
    num_experts=8,
    num_layers=2,
    moe_layers=(0, 1),
    routing=RoutingSpec(policy="softmax_topk", top_k=2),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-serve", description="An elastic, distributed Mixture-of-Experts expert service on Ray.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run a small MoE model in this process and print routing statistics per policy",
        description="Builds a seeded random MoE (or loads a Hugging Face checkpoint with --model) and runs "
        "batches through every routing policy, printing latency, throughput and routing statistics.",
    )
    demo.add_argument("--model", metavar="DIR", default=None, help="Hugging Face checkpoint directory (default: a seeded random 8-expert model)")
    demo.add_argument("--tokens", type=int, default=512, help="tokens per batch (default: 512)")
    demo.add_argument("--batches", type=int, default=3, help="batches per routing policy (default: 3)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)")
    demo.add_argument("--capacity-factor", type=float, default=1.25, help="capacity factor for the drop/reroute runs (default: 1.25)")
    demo.add_argument("--groups", type=int, default=2, help="expert groups (Ray actors) of the distributed part (default: 2)")
    demo.add_argument("--local-only", action="store_true", help="skip the distributed part (no Ray)")
    demo.add_argument("--seconds", type=float, default=4.0, help="how long the gRPC traffic runs (default: 4)")
    demo.add_argument("--clients", type=int, default=4, help="concurrent gRPC clients (default: 4)")

    address_help = "Ray cluster address: 'auto' (the running cluster), HOST:PORT or ray://HOST:PORT (default: auto)"
    up = sub.add_parser("up", help="deploy onto a running Ray cluster (detached) and print the gateway addresses",
                        description="Creates the expert groups and routers as detached actors, waits until every "
                        "gateway reports SERVING, records the deployment in Ray's GCS and prints the gateways.")
    up.add_argument("--config", required=True, metavar="FILE", help="deployment YAML (model, routing, deployment, gateway, auth, tls)")
    up.add_argument("--address", default="auto", help=address_help)
    up.add_argument("--wait", type=float, default=180.0, metavar="SECONDS", help="how long to wait for health (default: 180)")
    st = sub.add_parser("status", help="show the deployments on a cluster: groups, routers, per-expert load",
                        description="Reads the deployments recorded in Ray's GCS and asks their routers for status.")
    st.add_argument("--address", default="auto", help=address_help)
    st.add_argument("--name", default=None, help="one deployment (default: all)")
    st.add_argument("--json", action="store_true", help="print JSON instead of tables")
    dn = sub.add_parser("down", help="remove a deployment's actors from the cluster",
                        description="Shuts the routers' gateways down, then removes every actor of the deployment(s).")
    dn.add_argument("--address", default="auto", help=address_help)
    dn.add_argument("--name", default=None, help="one deployment (default: all recorded)")
    ch = sub.add_parser("chaos", help="drive gRPC load while killing groups, routers, the supervisor (and nodes); check every answer",
                        description="Against a running deployment (--name, --config), or, given no --name, one it starts on an "
                        "embedded Ray with a small model. Prints a report, writes it as JSON, exits 1 if any request failed "
                        "or any answer was wrong.")
    ch.add_argument("--address", default=None, help="Ray cluster address (default: an embedded Ray, or 'auto' with --name)")
    ch.add_argument("--name", default=None, help="a deployment recorded by `moe-serve up` (needs --config)")
    ch.add_argument("--config", default=None, metavar="FILE", help="that deployment's YAML (the reference model and auth token)")
    ch.add_argument("--clients", type=int, default=8, help="concurrent gRPC clients (default: 8)")
    ch.add_argument("--duration", type=float, default=40.0, metavar="SECONDS", help="how long load runs (default: 40)")
    ch.add_argument("--group-every", type=float, default=6.0, metavar="SECONDS", help="kill a random expert group this often (0: never; default: 6)")
    ch.add_argument("--router-at", type=float, nargs="*", default=[14.0], metavar="SECONDS", help="kill a router at these times (default: 14)")
    ch.add_argument("--supervisor-at", type=float, nargs="*", default=[22.0, 24.0], metavar="SECONDS",
                    help="kill the supervisor at these times (default: 22 24)")
    ch.add_argument("--node-at", type=float, nargs="*", default=[], metavar="SECONDS", help="kill a node (its raylet) at these times (multi-node only)")
    ch.add_argument("--stop-group-at", type=float, nargs="*", default=[], metavar="SECONDS",
                    help="stop a random expert group's process (SIGSTOP: alive but silent) at these times")
    ch.add_argument("--hang-group-at", type=float, nargs="*", default=[], metavar="SECONDS",
                    help="hang a random expert group's compute (batches never return, pings still answer) at these times")
    ch.add_argument("--quiet", type=float, default=10.0, metavar="SECONDS", help="fault-free time at the end (default: 10)")
    ch.add_argument("--replicas", type=int, default=2, help="embedded deployment: copies per expert (default: 2)")
    ch.add_argument("--failover", default="wait", choices=["wait", "reroute", "drop", "fail"], help="embedded deployment: failover policy")
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--out", default="chaos-report.json", metavar="FILE", help="JSON report (default: chaos-report.json)")
    rp = sub.add_parser("report", help="plot where tokens go: per-expert heatmaps, replicas, latency, co-activation, specialisation",
                        description="Drives a skewed workload (Zipf token ids) through the gateways while sampling the routers' "
                        "counters and the supervisor every --period; writes PNG plots, specialisation.json and report.json to --out. "
                        "Against a running deployment (--name, --config), or, given no --name, a small one on an embedded Ray.")
    rp.add_argument("--out", required=True, metavar="DIR", help="directory for the plots and JSON")
    rp.add_argument("--address", default=None, help="Ray cluster address (default: an embedded Ray, or 'auto' with --name)")
    rp.add_argument("--name", default=None, help="a deployment recorded by `moe-serve up` (needs --config)")
    rp.add_argument("--config", default=None, metavar="FILE", help="that deployment's YAML (gate weights for the workload, auth token)")
    rp.add_argument("--seconds", type=float, default=20.0, help="how long the workload runs and is sampled (default: 20)")
    rp.add_argument("--period", type=float, default=1.0, metavar="SECONDS", help="sampling period (default: 1)")
    rp.add_argument("--clients", type=int, default=4, help="concurrent gRPC clients (default: 4)")
    rp.add_argument("--skew", type=float, default=1.2, help="Zipf exponent of the token ids; 0 is uniform (default: 1.2)")
    rp.add_argument("--seed", type=int, default=0)
    bench = sub.add_parser("bench", help="run the service benchmark (bench/service.py) and write bench/RESULTS.md",
                           description="Runs bench/service.py from a source checkout; extra arguments pass through.")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for bench/service.py (e.g. --quick)")
    return p


def _up(args: argparse.Namespace) -> int:
    from cluster import ops

    entry = ops.up(args.config, args.address, wait_s=args.wait)
    print(f"deployment {entry['name']} is SERVING")
    for addr in entry["gateways"]:
        print(f"gateway {addr}")
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from cluster import ops

    deps = ops.status(args.address, args.name)
    if args.json:
        print(json.dumps(deps, indent=2, default=str))
        return 0
    if not deps:
        print("no deployments")
    from rich.console import Console

    console = Console()
    for d in deps:
        for table in status_tables(d):
            console.print(table)
        _print_events(d["status"])
    return 0


def status_tables(d: dict) -> list:
    """`moe-serve status` as rich tables: routers, groups, experts (busiest first)."""
    from rich.table import Table

    tables = []
    for r in d["status"]:
        if "groups" not in r:
            t = Table(title=f"deployment {d['name']}: router {r.get('name')} DOWN")
            t.add_column("error")
            t.add_row(str(r.get("error", "")))
            tables.append(t)
            continue
        title = (f"deployment {d['name']}  model {r['model']}  routing table v{r['routing_table_version']}  "
                 f"gateways {', '.join(d['gateways']) or '-'}")
        routers = Table(title=title, title_justify="left")
        for col in ("router", "gateway", "transports", "requests", "batches", "rdt"):
            routers.add_column(col, justify="right" if col in ("requests", "batches") else "left")
        for rr in r["routers"]:
            routers.add_row(rr["name"], rr["address"], " > ".join(rr["transports"]), str(rr["requests"]), str(rr["batches"]),
                            rr.get("rdt", ""))
        groups = Table(title="expert groups", title_justify="left")
        for col in ("group", "node", "alive", "device", "slots", "tok/s", "scaled"):
            groups.add_column(col, justify="right" if col in ("slots", "tok/s") else "left")
        for g in r["groups"]:
            groups.add_row(g["name"], (g.get("node_id") or "")[:12], "yes" if g["alive"] else "[red]NO[/red]", g.get("device", ""),
                           str(g["slots"]), f"{g.get('tokens_per_s', 0.0):.0f}", "yes" if g.get("scaled") else "")
        experts = Table(title="experts (busiest first)", title_justify="left")
        for col in ("layer", "expert", "copies", "tok/s", "on groups"):
            experts.add_column(col, justify="right" if col != "on groups" else "left")
        for e in sorted(r["experts"], key=lambda e: -e["tokens_per_s"])[:16]:
            experts.add_row(str(e["layer"]), str(e["expert"]), str(e["replicas"]), f"{e['tokens_per_s']:.0f}", ", ".join(e.get("groups", [])))
        tables += [routers, groups, experts]
    return tables


def _print_events(statuses: list[dict]) -> None:
    """The supervisor's recent events, once per deployment (every router relays the same ones)."""
    answered = [r for r in statuses if r.get("supervisor_alive")]
    if not answered:
        print("  supervisor: none answered (placement and load above are the routers' own view)")
        return
    events = answered[0]["events"][-STATUS_EVENTS:]
    print(f"  supervisor: alive, {answered[0]['supervisor_restarts']} restarts; last {len(events)} events")
    for e in events:
        print("  " + _event_line(e))


def _event_line(e: dict) -> str:
    """`2026-01-02 03:04:05  failover  v7  groups=a replacements=b  recovery 1.25 s`"""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at_unix"]))
    recovery = f"  recovery {e['recovery_s']:.2f} s" if e["recovery_s"] > 0 else ""
    return f"{when}  {e['kind']:<20}v{e['version']:<5} {e['detail']}{recovery}"


def _down(args: argparse.Namespace) -> int:
    from cluster import ops

    removed = ops.down(args.address, args.name)
    print(f"removed {len(removed)} actors" + (": " + ", ".join(removed) if removed else ""))
    return 0


def _chaos(args: argparse.Namespace) -> int:
    import ray

    from cluster import chaos

    plan = chaos.ChaosPlan(clients=args.clients, duration_s=args.duration, group_kill_every_s=args.group_every,
                           router_kill_at_s=tuple(args.router_at), supervisor_kill_at_s=tuple(args.supervisor_at),
                           node_kill_at_s=tuple(args.node_at), group_stop_at_s=tuple(args.stop_group_at),
                           group_hang_at_s=tuple(args.hang_group_at), quiet_s=args.quiet, seed=args.seed)
    dep = None
    if args.name is None:
        from cluster import deploy

        cfg = chaos.embedded_config(replicas=args.replicas, failover=args.failover, seed=args.seed)
        print(f"starting an embedded deployment ({cfg['deployment']['expert_groups']} groups, "
              f"{cfg['deployment']['routers']} routers, {args.replicas} copies per expert, failover {args.failover}) ...", flush=True)
        dep = deploy(cfg, address=args.address, progress=lambda line: print("  " + line, flush=True))
        target = chaos.Target(dep.name, dep.gateway_addresses, LocalMoE.from_config(chaos.SMALL_MODEL, seed=args.seed))
    else:
        from cluster import ops, registry
        from cluster.config import load_config
        from expert_workers.source import open_source

        if args.config is None:
            raise LookupError("--name needs --config (the deployment's YAML: the reference model and token)")
        cfg = load_config(args.config)
        ops.connect(args.address or "auto")
        entry = registry.lookup(args.name)
        if entry is None:
            raise LookupError(f"no deployment named {args.name!r} recorded on this cluster")
        src = open_source(cfg.model.source())
        ref = LocalMoE(src, routing=cfg.routing_spec(src.spec.routing))
        target = chaos.Target(args.name, list(entry["gateways"]), ref, token=cfg.auth.token, tls=ops._client_tls(cfg))
    try:
        print(f"load: {plan.clients} clients for {plan.duration_s:g} s; faults: "
              + (", ".join(f"{k}@{t:g}s" for t, k in plan.schedule()) or "none"), flush=True)
        report = chaos.run_chaos(target, plan, progress=lambda m: print(m, flush=True))
    finally:
        if dep is not None:
            dep.shutdown()
            if ray.is_initialized():
                ray.shutdown()
    print(report.table())
    chaos.write_report(report, args.out)
    print(f"wrote {args.out}")
    return 0 if report.ok else 1


def _report(args: argparse.Namespace) -> int:
    from cluster import report

    if args.seconds <= 0 or args.period <= 0 or args.clients < 1:
        raise SystemExit("moe-serve report: --seconds and --period must be > 0, --clients >= 1")
    if args.name is None:
        print("starting an embedded deployment (small model, 1 copy per expert, up to 3 for hot experts) ...", flush=True)
        target = report.embedded(seed=args.seed, address=args.address)
    elif args.config is None:
        raise LookupError("--name needs --config (the deployment's YAML: gate weights and auth token)")
    else:
        target = report.attach(args.name, args.config, args.address or "auto")
    workload = report.WorkloadSpec(clients=args.clients, skew=args.skew, seed=args.seed)
    print(f"deployment {target.name}: {args.clients} clients, Zipf {args.skew:g} token ids, {args.seconds:g} s, "
          f"a sample every {args.period:g} s", flush=True)
    try:
        summary, counts = report.run(target, args.out, seconds=args.seconds, period=args.period, workload=workload,
                                     progress=lambda m: print(m, flush=True))
    finally:
        target.close()
    print(report.table(summary))
    if counts.errors:
        print(f"{len(counts.errors)} requests failed, e.g. {counts.errors[0]}")
    for path in summary["files"]:
        print(f"wrote {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import pathlib
    import runpy

    script = pathlib.Path(__file__).resolve().parents[1] / "bench" / "service.py"
    if not script.exists():
        print(f"moe-serve bench: {script} not found; run it from a source checkout", file=sys.stderr)
        return 2
    sys.argv = [str(script), *[a for a in args.rest if a != "--"]]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.tokens < 1 or args.batches < 1:
        raise SystemExit("moe-serve demo: --tokens and --batches must be >= 1")
    base = LocalMoE.from_pretrained(args.model) if args.model else LocalMoE.from_config(DEMO_SPEC, seed=args.seed)
    spec = base.spec
    print(f"model: family={spec.family} hidden={spec.hidden_size} expert_width={spec.intermediate_size} "
          f"experts={spec.num_experts} top_k={spec.routing.top_k} moe_layers={list(spec.moe_layers)}")
    gen = torch.Generator().manual_seed(args.seed)
    # NOTE: a shared offset skews the gate the way real hidden states do, so capacity limits bite.
    x = torch.randn(args.tokens, spec.hidden_size, generator=gen) + 1.5 * torch.randn(spec.hidden_size, generator=gen)
    token_ids = torch.randint(0, 32000, (args.tokens,), generator=gen)
    layer = spec.moe_layers[0]
    runs = [(p, spec.routing.overflow, spec.routing.capacity_factor) for p in ROUTING_POLICIES if p != "sigmoid_group_topk" or spec.routing.num_groups > 1]
    runs += [("topk_softmax", "drop", args.capacity_factor), ("topk_softmax", "reroute", args.capacity_factor)]
    header = f"{'policy':<20}{'overflow':<10}{'ms/batch':>10}{'tok/s':>11}{'dropped':>9}{'rerouted':>9}{'entropy':>9}{'lb_loss':>9}{'max/mean':>9}"
    print(header)
    print("-" * len(header))
    for policy, overflow, cf in runs:
        routing = replace(spec.routing, policy=policy, overflow=overflow, capacity_factor=cf)
        moe = LocalMoE(base.source, routing=routing)
        moe.forward(x[:8], layer, token_ids=token_ids[:8])  # load weights, warm up
        times = []
        for _ in range(args.batches):
            t0 = time.perf_counter()
            _, report = moe.forward(x, layer, token_ids=token_ids, return_routing=True)
            times.append(time.perf_counter() - t0)
        ms = 1e3 * sorted(times)[len(times) // 2]
        s = report.stats
        print(f"{policy:<20}{overflow:<10}{ms:>10.2f}{args.tokens / ms * 1e3:>11.0f}{s.dropped:>9}{s.rerouted:>9}"
              f"{s.utilisation_entropy:>9.3f}{s.load_balancing_loss:>9.3f}{s.max_over_mean_load:>9.2f}")
    if not args.local_only:
        _demo_distributed(args, base, x)
    return 0


def _demo_distributed(args: argparse.Namespace, base: LocalMoE, x: torch.Tensor) -> None:
    """The same model deployed on an embedded Ray, driven through its gRPC gateway; every answer checked."""
    from cluster.demo import run_gateway_demo

    run_gateway_demo(args, base)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"demo": _demo, "up": _up, "status": _status, "down": _down, "chaos": _chaos, "report": _report, "bench": _bench}
    try:
        return commands[args.command](args)
    except (MoEServeError, LookupError, TimeoutError, ConnectionError) as e:
        print(f"moe-serve {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
