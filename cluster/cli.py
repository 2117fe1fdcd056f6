"""The `moe-serve` command line.

    moe-serve demo      run a small MoE model locally, then as a deployment on an embedded Ray,
                        and check that every distributed answer equals the local one
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
    return p


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
    """The same model as a deployment on an embedded Ray: every answer is checked against LocalMoE."""
    import ray

    from cluster.deploy import deploy

    spec = base.spec
    model = {"path": args.model} if args.model else {"random": spec.to_dict(), "seed": args.seed}
    print(f"\ndeploying {args.groups} expert groups + 1 router on an embedded Ray ...")
    dep = deploy({"model": model, "gateway": {"port": 0}, "deployment": {"name": "demo", "expert_groups": args.groups, "transport": "auto"}})
    try:
        router = dep.status()["routers"][0]
        measured = ", ".join(f"{k} {v:.2f} ms" for k, v in router["measured_ms"].items())
        print(f"transport auto: measured {measured}; order {router['chain']}")
        sizes = [8, 64, 512, 1, 32, 256, 16, 128] * 2
        layer = spec.moe_layers[-1]
        t0 = time.perf_counter()
        refs = [dep.submit(x[:n], layer) for n in sizes]
        outs = ray.get(refs)
        wall = time.perf_counter() - t0
        worst = 0.0
        for n, out in zip(sizes, outs):
            want = base.forward(x[:n], layer)
            got = torch.from_numpy(out.hidden_states.copy())
            worst = max(worst, float((got - want).norm() / want.norm()))
        batched = sum(o.batch_requests > 1 for o in outs)
        print(f"{len(sizes)} concurrent requests ({sum(sizes)} tokens) in {1e3 * wall:.1f} ms; {batched} shared a batch; "
              f"transports used {sorted({o.transport for o in outs})}; max relative error vs LocalMoE {worst:.2e}")
        if worst >= 1e-5:
            raise SystemExit("moe-serve demo: distributed answers differ from LocalMoE")
    finally:
        dep.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
    except MoEServeError as e:
        print(f"moe-serve {args.command}: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
