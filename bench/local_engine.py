"""Benchmark: LocalMoE vs transformers' MixtralSparseMoeBlock on the same weights.

A Mixtral-shaped layer (hidden 1024, expert width 2816, 8 experts, top-2), float32,
16 and 4096 tokens; median of several repeats after warm-up, both engines timed
alternately in one run. The machine's own ceilings are measured in the same run:
a plain 4096 x hidden x width GEMM (GFLOP/s; the faster of MKL and oneDNN) and a large memory copy (GB/s).

Targets (checked here, exit status 1 if missed):
  - LocalMoE >= 0.95x the faster transformers implementation, at both sizes;
  - >= 85% of the measured GEMM rate at 4096 tokens;
  - at 16 tokens, within 1.3x of (weight bytes read / measured copy bandwidth).

    python bench/local_engine.py [--repeats 7] [--out bench/results/local_engine.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch

from expert_workers.ffn import onednn_linear, onednn_pack

HIDDEN, WIDTH, EXPERTS, TOP_K = 1024, 2816, 8, 2


def _median_time(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


class Ceilings:
    """The machine's own ceilings, timed inside the same repeat loop as the engines."""

    def __init__(self, copy_bytes: int = 512 * 2**20) -> None:
        self.a, self.b = torch.randn(4096, HIDDEN), torch.randn(HIDDEN, WIDTH)
        self.out = torch.empty(4096, WIDTH)
        self.src = torch.ones(copy_bytes // 4)
        self.dst = torch.empty_like(self.src)
        self.copy_bytes = copy_bytes
        self._packed: torch.Tensor | None = None

    def gemm(self) -> object:
        """The faster of torch's two CPU GEMMs on this shape: MKL (torch.mm) and oneDNN over a packed weight,
        which LocalMoE uses where torch has it (on AMD CPUs MKL takes a slower path)."""
        if self._packed is None:
            return torch.mm(self.a, self.b, out=self.out)
        return onednn_linear(self.a, self._packed)

    def pick_gemm(self, repeats: int = 3) -> str:
        """Time both once per repeat, keep the faster; -> its name."""
        from expert_workers.ffn import onednn_available

        self._packed = None
        mkl = min(_median_time(self.gemm, repeats))
        if not onednn_available(torch.float32):
            return "mkl"
        self._packed = onednn_pack(self.b.t().contiguous())
        if min(_median_time(self.gemm, repeats)) < mkl:
            return "onednn"
        self._packed = None
        return "mkl"

    def copy(self) -> object:
        return self.dst.copy_(self.src)

    def rates(self, gemm_s: float, copy_s: float) -> dict[str, float]:
        return {"gemm_gflops": 2 * 4096 * HIDDEN * WIDTH / gemm_s / 1e9, "copy_gbps": self.copy_bytes / copy_s / 1e9}


def build(tmp: str):
    """A one-layer Mixtral saved in the Hugging Face layout; the HF block and LocalMoE over the same file."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from router_svc import LocalMoE

    cfg = MixtralConfig(hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=1, num_local_experts=EXPERTS,
                        num_experts_per_tok=TOP_K, num_attention_heads=8, num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.normal_(0, HIDDEN ** -0.5)
    model.save_pretrained(tmp)
    return model, LocalMoE.from_pretrained(tmp)


def run(repeats: int) -> dict:
    torch.set_grad_enabled(False)
    ceil = Ceilings()
    gemm_impl = ceil.pick_gemm()
    with tempfile.TemporaryDirectory() as tmp:
        model, moe = build(tmp)
    block = model.model.layers[0].mlp
    default_impl = model.config._experts_implementation or "eager"
    rows, ceiling_times = [], {"gemm": [], "copy": []}
    for tokens in (16, 4096):
        x = torch.randn(1, tokens, HIDDEN)
        engines: dict[str, Callable[[], object]] = {"local_moe": lambda: moe.forward(x[0], 0)}
        for impl in sorted({default_impl, "eager"}):
            def hf_call(impl: str = impl) -> object:
                model.set_experts_implementation(impl)
                return block(x)
            engines[f"transformers[{impl}]"] = hf_call
        ref = engines["transformers[eager]"]()
        err = float((moe.forward(x[0], 0) - ref[0]).norm() / ref.norm())
        timed = {**engines, "gemm": ceil.gemm, "copy": ceil.copy}
        for fn in timed.values():  # warm-up
            fn()
            fn()
        times: dict[str, list[float]] = {name: [] for name in timed}
        for _ in range(repeats):  # alternate so drift and neighbours hit every engine alike
            for name, fn in timed.items():
                times[name] += _median_time(fn, 1)
        for k in ceiling_times:
            ceiling_times[k] += times.pop(k)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        rates = ceil.rates(statistics.median(ceiling_times["gemm"]), statistics.median(ceiling_times["copy"]))
        best_hf = min(v for k, v in med.items() if k.startswith("transformers"))
        _, report = moe.forward(x[0], 0, return_routing=True)
        hit = sum(1 for c in report.stats.tokens_per_expert if c > 0)
        weight_bytes = hit * 3 * HIDDEN * WIDTH * 4
        flops = 2 * tokens * TOP_K * 3 * HIDDEN * WIDTH
        rows.append({
            "tokens": tokens,
            "median_s": med,
            "all_s": times,
            "ceilings_in_this_loop": rates,
            "tokens_per_s": {k: tokens / v for k, v in med.items()},
            "ratio_vs_best_transformers": best_hf / med["local_moe"],
            "gflops_local_moe": flops / med["local_moe"] / 1e9,
            "fraction_of_gemm_ceiling": flops / med["local_moe"] / 1e9 / rates["gemm_gflops"],
            "weight_bytes_read": weight_bytes,
            "time_over_weight_read_bound": med["local_moe"] / (weight_bytes / (rates["copy_gbps"] * 1e9)),
            "rel_err_vs_transformers": err,
        })
    ceilings = ceil.rates(statistics.median(ceiling_times["gemm"]), statistics.median(ceiling_times["copy"]))
    return {"ceilings": {**ceilings, "gemm_impl": gemm_impl}, "rows": rows, "repeats": repeats}


def check(result: dict) -> list[tuple[str, float, str, bool]]:
    small, large = result["rows"]
    return [
        ("16 tok: ratio vs transformers", small["ratio_vs_best_transformers"], ">= 0.95", small["ratio_vs_best_transformers"] >= 0.95),
        ("4096 tok: ratio vs transformers", large["ratio_vs_best_transformers"], ">= 0.95", large["ratio_vs_best_transformers"] >= 0.95),
        ("4096 tok: fraction of GEMM ceiling", large["fraction_of_gemm_ceiling"], ">= 0.85", large["fraction_of_gemm_ceiling"] >= 0.85),
        ("16 tok: time / weight-read bound", small["time_over_weight_read_bound"], "<= 1.30", small["time_over_weight_read_bound"] <= 1.3),
        ("fp32 rel. error vs transformers", max(r["rel_err_vs_transformers"] for r in result["rows"]), "< 1e-5",
         max(r["rel_err_vs_transformers"] for r in result["rows"]) < 1e-5),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per engine and size (median; >= 5)")
    ap.add_argument("--out", default="bench/results/local_engine.json", help="where to write the JSON result")
    args = ap.parse_args()
    if args.repeats < 5:
        ap.error("--repeats must be >= 5")
    result = run(args.repeats)
    result["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    c = result["ceilings"]
    print(f"machine ceilings: GEMM {c['gemm_gflops']:.1f} GFLOP/s (4096x{HIDDEN}x{WIDTH}, {c['gemm_impl']}), copy {c['copy_gbps']:.2f} GB/s")
    names = list(result["rows"][0]["median_s"])
    print(f"{'tokens':>7} " + " ".join(f"{n + ' ms':>26}" for n in names) + f" {'ratio':>7} {'GFLOP/s':>8} {'%GEMM':>6} {'t/bound':>8}")
    for r in result["rows"]:
        print(f"{r['tokens']:>7} " + " ".join(f"{1e3 * r['median_s'][n]:>26.2f}" for n in names)
              + f" {r['ratio_vs_best_transformers']:>7.3f} {r['gflops_local_moe']:>8.1f} {100 * r['fraction_of_gemm_ceiling']:>5.1f}%"
              + f" {r['time_over_weight_read_bound']:>8.2f}")
    checks = check(result)
    result["targets"] = [{"target": n, "value": v, "goal": g, "met": ok} for n, v, g, ok in checks]
    for name, value, goal, ok in checks:
        print(f"  [{'PASS' if ok else 'MISS'}] {name}: {value:.4g} (goal {goal})")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0 if all(ok for *_, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
