"""Hypothesis properties of the gate (router_svc.gate.route) and of LocalMoE.

- permuting tokens permutes the output (dropless policies only: with a capacity
  the priority is by token order, so a permutation may change who is dropped);
- normalised weights sum to 1 per token;
- a token never gets the same expert twice (every policy, reroute and expert_choice included);
- a [B, S, D] input gives the [B*S, D] output reshaped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from expert_workers.spec import RoutingSpec
from router_svc import LocalMoE
from router_svc.gate import Assignments, GateInput, route

pytestmark = pytest.mark.unit

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)
FEW = settings(max_examples=25, deadline=None, derandomize=True, database=None)


# ---------------------------------------------------------------- strategies


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def routing_dicts(draw, num_experts: int, policies: tuple[str, ...], capacity: bool = False) -> dict[str, Any]:
    policy = draw(st.sampled_from(policies))
    k = draw(st.integers(1, min(3, num_experts)))
    r: dict[str, Any] = {"policy": policy, "top_k": k}
    if policy == "sigmoid_group_topk":
        groups = draw(st.sampled_from(divisors(num_experts)))
        per_group = num_experts // groups
        min_groups = -(-k // per_group)  # ceil(k / per_group)
        r.update(
            num_groups=groups,
            topk_groups=draw(st.integers(min_groups, groups)),
            score_function=draw(st.sampled_from(["sigmoid", "softmax"])),
            correction_bias=draw(st.booleans()),
            normalize_topk=draw(st.booleans()),
        )
    elif policy == "topk_softmax":
        r["normalize_topk"] = draw(st.booleans())
    elif policy == "noisy_topk":
        r.update(noisy=True, noise_std=draw(st.sampled_from([0.5, 3.0])), noise_seed=draw(st.integers(0, 100)))
    if draw(st.booleans()):
        r["routed_scaling_factor"] = draw(st.sampled_from([0.5, 2.5]))
    if capacity and policy != "expert_choice":
        r.update(overflow=draw(st.sampled_from(["drop", "reroute", "dropless"])), capacity_factor=draw(st.floats(0.1, 2.0)))
    elif policy == "expert_choice" and draw(st.booleans()):
        r["capacity_factor"] = draw(st.floats(0.1, 2.0))
    return r


@st.composite
def model_configs(draw, policies: tuple[str, ...], capacity: bool = False) -> dict[str, Any]:
    experts = draw(st.integers(2, 8))
    cfg: dict[str, Any] = {
        "hidden_size": draw(st.integers(8, 32)),
        "intermediate_size": draw(st.integers(4, 16)),
        "num_experts": experts,
        "num_layers": 2,
        "moe_layers": [1],
        "activation": draw(st.sampled_from(["silu", "gelu", "gelu_tanh", "relu"])),
        "gated": draw(st.booleans()),
        "routing": draw(routing_dicts(experts, policies, capacity)),
    }
    if draw(st.booleans()):
        cfg["shared_experts"] = {"count": draw(st.integers(1, 2)), "intermediate_size": 8, "sigmoid_gate": draw(st.booleans())}
    return cfg


def hidden(tokens: int, d: int):
    return arrays(np.float32, (tokens, d), elements=st.floats(-2, 2, width=32))


def logits_arrays(max_t: int = 24, max_e: int = 8):
    return st.tuples(st.integers(1, max_t), st.integers(2, max_e)).flatmap(
        lambda te: arrays(np.float32, te, elements=st.floats(-6, 6, width=32))
    )


DROPLESS_TOKEN_CHOICE = ("softmax_topk", "topk_softmax", "sigmoid_group_topk", "hash")
ALL_POLICIES = ("softmax_topk", "topk_softmax", "sigmoid_group_topk", "hash", "noisy_topk", "expert_choice")


def gate_input(logits: np.ndarray, rng_seed: int, spec: RoutingSpec) -> GateInput:
    t, e = logits.shape
    g = torch.Generator().manual_seed(rng_seed)
    bias = torch.randn(e, generator=g) * 0.3 if spec.correction_bias else None
    ids = torch.randint(0, 50_000, (t,), generator=g) if spec.policy == "hash" else None
    return GateInput(torch.from_numpy(logits.copy()), correction_bias_E=bias, token_ids_T=ids)


def per_token(a: Assignments, tokens: int) -> list[dict[int, float]]:
    out: list[dict[int, float]] = [dict() for _ in range(tokens)]
    for t, e, w in zip(a.token_N.tolist(), a.expert_N.tolist(), a.weight_N.tolist()):
        assert e not in out[t], f"token {t} got expert {e} twice"
        out[t][e] = w
    return out


# ---------------------------------------------------------------- gate properties


@FAST
@given(logits=logits_arrays(), data=st.data())
def test_gate_permuting_tokens_permutes_assignments(logits: np.ndarray, data) -> None:
    t, e = logits.shape
    spec = RoutingSpec(**data.draw(routing_dicts(e, DROPLESS_TOKEN_CHOICE)))
    perm = data.draw(st.permutations(range(t)))
    inp = gate_input(logits, 0, spec)
    p = torch.tensor(perm, dtype=torch.int64)
    inp_p = GateInput(
        inp.logits_TE[p], correction_bias_E=inp.correction_bias_E,
        token_ids_T=None if inp.token_ids_T is None else inp.token_ids_T[p],
    )
    base = per_token(route(inp, spec), t)
    permuted = per_token(route(inp_p, spec), t)
    for new_t, old_t in enumerate(perm):
        assert set(permuted[new_t]) == set(base[old_t])
        for ex, w in base[old_t].items():
            assert permuted[new_t][ex] == pytest.approx(w, rel=1e-6, abs=1e-7)


@FAST
@given(logits=logits_arrays(max_t=32), data=st.data())
def test_gate_normalised_weights_sum_to_one(logits: np.ndarray, data) -> None:
    t, e = logits.shape
    k = data.draw(st.integers(1, min(4, e)))
    policy = data.draw(st.sampled_from(["softmax_topk", "topk_softmax", "sigmoid_group_topk"]))
    extra: dict[str, Any] = {}
    if policy == "sigmoid_group_topk":
        groups = data.draw(st.sampled_from(divisors(e)))
        per_group = e // groups
        extra = dict(
            num_groups=groups, topk_groups=data.draw(st.integers(-(-k // per_group), groups)),
            score_function="sigmoid", correction_bias=data.draw(st.booleans()),
        )
    spec = RoutingSpec(policy=policy, top_k=k, normalize_topk=True, routed_scaling_factor=1.0, **extra)
    a = route(gate_input(logits, 1, spec), spec)
    sums = torch.zeros(t, dtype=torch.float64).index_add_(0, a.token_N, a.weight_N.double())
    counts = torch.bincount(a.token_N, minlength=t)
    assert counts.tolist() == [k] * t
    torch.testing.assert_close(sums, torch.ones(t, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert bool((a.weight_N > 0).all())


@FAST
@given(logits=logits_arrays(max_t=48, max_e=10), data=st.data())
def test_gate_never_gives_a_token_the_same_expert_twice(logits: np.ndarray, data) -> None:
    t, e = logits.shape
    spec = RoutingSpec(**data.draw(routing_dicts(e, ALL_POLICIES, capacity=True)))
    a = route(gate_input(logits, 2, spec), spec)
    pairs = list(zip(a.token_N.tolist(), a.expert_N.tolist()))
    assert len(set(pairs)) == len(pairs)
    assert all(0 <= tok < t and 0 <= ex < e for tok, ex in pairs)
    if spec.policy != "expert_choice":
        # token-choice: at most k experts per token, every choice accounted for
        assert int(torch.bincount(a.token_N, minlength=t).max()) <= spec.top_k
        assert len(pairs) + a.dropped == t * spec.top_k


# ---------------------------------------------------------------- LocalMoE properties


@FEW
@given(cfg=model_configs(DROPLESS_TOKEN_CHOICE), data=st.data())
def test_local_moe_permuting_tokens_permutes_output(cfg: dict[str, Any], data) -> None:
    moe = LocalMoE.from_config(cfg, seed=data.draw(st.integers(0, 3)))
    t = data.draw(st.integers(1, 12))
    x = torch.from_numpy(data.draw(hidden(t, cfg["hidden_size"])))
    perm = torch.tensor(data.draw(st.permutations(range(t))), dtype=torch.int64)
    ids = torch.tensor(data.draw(st.lists(st.integers(0, 999), min_size=t, max_size=t)), dtype=torch.int64)
    use_ids = cfg["routing"]["policy"] == "hash"
    y = moe(x, 1, token_ids=ids if use_ids else None)
    y_p = moe(x[perm], 1, token_ids=ids[perm] if use_ids else None)
    torch.testing.assert_close(y_p, y[perm], rtol=1e-5, atol=1e-6)


@FEW
@given(cfg=model_configs(("softmax_topk", "topk_softmax", "sigmoid_group_topk")), data=st.data())
def test_local_moe_report_weights_sum_to_one(cfg: dict[str, Any], data) -> None:
    r = cfg["routing"]
    r.update(normalize_topk=True, routed_scaling_factor=1.0)
    if r["policy"] == "sigmoid_group_topk":
        r["score_function"] = "sigmoid"
    moe = LocalMoE.from_config(cfg)
    t = data.draw(st.integers(1, 16))
    x = torch.from_numpy(data.draw(hidden(t, cfg["hidden_size"])))
    _, report = moe(x, 1, return_routing=True)
    sums = torch.zeros(t, dtype=torch.float64).index_add_(0, report.token_index, report.weight.double())
    torch.testing.assert_close(sums, torch.ones(t, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert sum(report.stats.tokens_per_expert) == t * r["top_k"]


@FEW
@given(cfg=model_configs(ALL_POLICIES, capacity=True), data=st.data())
def test_local_moe_report_has_no_duplicate_expert(cfg: dict[str, Any], data) -> None:
    moe = LocalMoE.from_config(cfg)
    t = data.draw(st.integers(1, 16))
    x = torch.from_numpy(data.draw(hidden(t, cfg["hidden_size"])))
    ids = torch.arange(t) * 7 + 3
    _, report = moe(x, 1, token_ids=ids if cfg["routing"]["policy"] == "hash" else None, return_routing=True)
    pairs = list(zip(report.token_index.tolist(), report.expert.tolist()))
    assert len(set(pairs)) == len(pairs)
    assert sum(report.stats.tokens_per_expert) == len(pairs)


@FEW
@given(cfg=model_configs(ALL_POLICIES, capacity=True), data=st.data())
def test_local_moe_batched_input_equals_flat_input(cfg: dict[str, Any], data) -> None:
    moe = LocalMoE.from_config(cfg)
    b = data.draw(st.integers(1, 3))
    s = data.draw(st.integers(1, 5))
    d = cfg["hidden_size"]
    x = torch.from_numpy(data.draw(arrays(np.float32, (b, s, d), elements=st.floats(-2, 2, width=32))))
    ids = torch.tensor(data.draw(st.lists(st.integers(0, 999), min_size=b * s, max_size=b * s)), dtype=torch.int64)
    use_ids = cfg["routing"]["policy"] == "hash"
    y3, rep3 = moe(x, 1, token_ids=ids.view(b, s) if use_ids else None, return_routing=True)
    y2, rep2 = moe(x.reshape(b * s, d), 1, token_ids=ids if use_ids else None, return_routing=True)
    assert y3.shape == (b, s, d)
    torch.testing.assert_close(y3, y2.reshape(b, s, d), rtol=1e-6, atol=1e-7)
    assert torch.equal(rep3.token_index, rep2.token_index)
    assert torch.equal(rep3.expert, rep2.expert)


@FEW
@given(cfg=model_configs(("softmax_topk", "topk_softmax")), data=st.data())
def test_local_moe_numpy_in_numpy_out(cfg: dict[str, Any], data) -> None:
    moe = LocalMoE.from_config(cfg)
    x = data.draw(hidden(data.draw(st.integers(1, 6)), cfg["hidden_size"]))
    y_np = moe(x, 1)
    assert isinstance(y_np, np.ndarray) and y_np.dtype == np.float32 and y_np.shape == x.shape
    np.testing.assert_array_equal(y_np, moe(torch.from_numpy(x), 1).numpy())
