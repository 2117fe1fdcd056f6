"""`moe-serve report` on its embedded deployment: the plots exist and are PNGs, and the numbers
plotted are the routers' counters (exactly) and what the workload sent (tokens x top_k - dropped)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import ray

from cluster import cli, report
from cluster.chaos import SMALL_MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SECONDS = 8.0


def _counters(routers: list[Any]) -> dict[int, np.ndarray]:
    """Tokens per (layer, expert) since the routers started, summed over routers."""
    out: dict[int, np.ndarray] = {}
    for load in ray.get([r.load.remote() for r in routers], timeout=30):
        for layer, row in load["expert_tokens"].items():
            out[int(layer)] = out.get(int(layer), 0) + np.asarray(row, dtype=np.int64)
    return out


def test_report_writes_pngs_whose_heatmap_totals_match_the_counters(ray_local, tmp_path) -> None:
    target = report.embedded(seed=3)
    try:
        before = _counters(target.routers)
        summary, sent = report.run(target, tmp_path, seconds=SECONDS, period=1.0, workload=report.WorkloadSpec(clients=4, seed=3))
        after = _counters(target.routers)
    finally:
        target.close()
    assert not sent.errors, sent.errors[:3]
    assert sent.requests > 0

    layers = SMALL_MODEL["moe_layers"]
    pngs = [f"heatmap_layer{l}.png" for l in layers] + ["replicas.png", "latency.png"] + [f"coactivation_layer{l}.png" for l in layers]
    for name in pngs:
        data = (tmp_path / name).read_bytes()
        assert len(data) > 1000 and data.startswith(report.PNG_MAGIC), name
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["heatmap"] == summary["heatmap"]
    assert len(on_disk["latency"]) == round(SECONDS) and sum(r["requests"] for r in on_disk["latency"]) == sent.requests

    top_k = SMALL_MODEL["routing"]["top_k"]
    specialisation = json.loads((tmp_path / "specialisation.json").read_text())
    for l in layers:
        heat = np.asarray(on_disk["heatmap"][str(l)], dtype=np.int64)
        assert heat.shape == (round(SECONDS), SMALL_MODEL["num_experts"])
        totals = heat.sum(axis=0)
        # the counters, read by the test around the run and as the report sampled them
        assert totals.tolist() == (after[l] - before[l]).tolist()
        assert totals.tolist() == (np.asarray(on_disk["counters_last"][str(l)]) - on_disk["counters_first"][str(l)]).tolist()
        # what the workload sent: every token to top_k experts (dropless), as its replies said
        assert int(totals.sum()) == sent.tokens[l] * top_k - sent.dropped[l]
        assert sent.dropped[l] == 0 and totals.tolist() == sent.assignments[l]
        assert np.diag(np.asarray(on_disk["coactivation"][str(l)])).tolist() == totals.tolist()
        for e, row in enumerate(specialisation[str(l)]):
            assert bool(row["top_token_ids"]) == (row["tokens"] > 0), (l, e)
        # the skew is visible: the hottest expert well above the mean, and it got copies
        assert totals.max() > 1.3 * totals.mean()
    assert max(max(on_disk["replicas"][str(l)][-1]) for l in layers) >= 2, "no hot expert was replicated"


def test_report_command_line() -> None:
    args = cli._parser().parse_args(["report", "--out", "plots"])
    assert (args.out, args.name, args.seconds, args.period, args.clients, args.skew) == ("plots", None, 20.0, 1.0, 4, 1.2)
    assert cli.main(["report", "--out", "plots", "--name", "x"]) == 2  # --name needs --config
