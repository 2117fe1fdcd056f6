"""MoESpec / RoutingSpec validation: every bad config is a ConfigError naming its field."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from expert_workers.errors import ConfigError
from expert_workers.spec import MoESpec, RoutingSpec, SharedExpertSpec

pytestmark = pytest.mark.unit

BASE: dict[str, Any] = {
    "hidden_size": 16,
    "intermediate_size": 8,
    "num_experts": 4,
    "num_layers": 3,
    "moe_layers": [0, 2],
}


def cfg(**changes: Any) -> dict[str, Any]:
    """BASE with top-level changes; `routing` / `shared_experts` dicts are passed through."""
    d = copy.deepcopy(BASE)
    d.update(changes)
    return d


def without(key: str) -> dict[str, Any]:
    d = copy.deepcopy(BASE)
    del d[key]
    return d


def field_re(name: str) -> str:
    return re.escape(f"config field '{name}'")


def test_base_config_is_valid() -> None:
    spec = MoESpec.from_dict(BASE)
    assert spec.moe_layers == (0, 2)
    assert spec.is_moe_layer == frozenset({0, 2})
    assert spec.routing == RoutingSpec()
    assert spec.shared_experts == SharedExpertSpec()


BAD = [
    # routing
    ("top_k > num_experts", cfg(routing={"top_k": 5}), "routing.top_k"),
    ("top_k zero", cfg(routing={"top_k": 0}), "routing.top_k"),
    ("top_k bool", cfg(routing={"top_k": True}), "routing.top_k"),
    ("top_k float", cfg(routing={"top_k": 2.0}), "routing.top_k"),
    ("unknown policy", cfg(routing={"policy": "sinkhorn"}), "routing.policy"),
    ("unknown overflow", cfg(routing={"overflow": "spill", "capacity_factor": 1.0}), "routing.overflow"),
    ("drop without capacity_factor", cfg(routing={"overflow": "drop"}), "routing.capacity_factor"),
    ("reroute without capacity_factor", cfg(routing={"overflow": "reroute"}), "routing.capacity_factor"),
    ("negative capacity_factor", cfg(routing={"overflow": "drop", "capacity_factor": -1.0}), "routing.capacity_factor"),
    ("zero capacity_factor", cfg(routing={"capacity_factor": 0}), "routing.capacity_factor"),
    ("nan capacity_factor", cfg(routing={"capacity_factor": float("nan")}), "routing.capacity_factor"),
    ("bool capacity_factor", cfg(routing={"capacity_factor": True}), "routing.capacity_factor"),
    ("unknown score function", cfg(routing={"score_function": "tanh"}), "routing.score_function"),
    ("zero scaling", cfg(routing={"routed_scaling_factor": 0.0}), "routing.routed_scaling_factor"),
    ("inf scaling", cfg(routing={"routed_scaling_factor": float("inf")}), "routing.routed_scaling_factor"),
    ("string normalize", cfg(routing={"normalize_topk": "yes"}), "routing.normalize_topk"),
    ("int correction_bias", cfg(routing={"correction_bias": 1}), "routing.correction_bias"),
    ("int noisy", cfg(routing={"noisy": 0}), "routing.noisy"),
    ("negative noise_std", cfg(routing={"noise_std": -0.5}), "routing.noise_std"),
    ("bool noise_seed", cfg(routing={"noise_seed": True}), "routing.noise_seed"),
    ("float noise_seed", cfg(routing={"noise_seed": 1.5}), "routing.noise_seed"),
    ("unknown logits dtype", cfg(routing={"logits_dtype": "bfloat16"}), "routing.logits_dtype"),
    ("unknown weights dtype", cfg(routing={"weights_dtype": "half"}), "routing.weights_dtype"),
    (
        "num_groups does not divide num_experts",
        cfg(routing={"policy": "sigmoid_group_topk", "num_groups": 3, "topk_groups": 1, "top_k": 1}),
        "routing.num_groups",
    ),
    ("num_groups zero", cfg(routing={"num_groups": 0}), "routing.num_groups"),
    ("num_groups bool", cfg(routing={"num_groups": True}), "routing.num_groups"),
    (
        "groups with a non-group policy",
        cfg(routing={"policy": "softmax_topk", "num_groups": 2, "topk_groups": 1, "top_k": 1}),
        "routing.num_groups",
    ),
    ("topk_groups > num_groups", cfg(routing={"policy": "sigmoid_group_topk", "num_groups": 2, "topk_groups": 3}), "routing.topk_groups"),
    ("topk_groups zero", cfg(routing={"topk_groups": 0}), "routing.topk_groups"),
    (
        "topk_groups too few for top_k",
        cfg(routing={"policy": "sigmoid_group_topk", "num_groups": 4, "topk_groups": 1, "top_k": 2}),
        "routing.topk_groups",
    ),
    ("unknown routing key", cfg(routing={"topk": 2}), "routing.topk"),
    ("routing not a mapping", cfg(routing=["softmax_topk"]), "routing"),
    # shared experts
    ("negative shared count", cfg(shared_experts={"count": -1}), "shared_experts.count"),
    ("bool shared count", cfg(shared_experts={"count": True, "intermediate_size": 8}), "shared_experts.count"),
    ("shared count without width", cfg(shared_experts={"count": 1}), "shared_experts.intermediate_size"),
    ("shared negative width", cfg(shared_experts={"count": 2, "intermediate_size": -8}), "shared_experts.intermediate_size"),
    ("shared gate not bool", cfg(shared_experts={"sigmoid_gate": "true"}), "shared_experts.sigmoid_gate"),
    ("unknown shared key", cfg(shared_experts={"size": 8}), "shared_experts.size"),
    # top level
    ("negative hidden_size", cfg(hidden_size=-16), "hidden_size"),
    ("zero intermediate_size", cfg(intermediate_size=0), "intermediate_size"),
    ("zero num_experts", cfg(num_experts=0), "num_experts"),
    ("negative num_layers", cfg(num_layers=-1, moe_layers=[0]), "num_layers"),
    ("bool hidden_size", cfg(hidden_size=True), "hidden_size"),
    ("bool num_experts", cfg(num_experts=True), "num_experts"),
    ("float hidden_size", cfg(hidden_size=16.0), "hidden_size"),
    ("string num_layers", cfg(num_layers="3"), "num_layers"),
    ("moe layer past the end", cfg(moe_layers=[0, 3]), "moe_layers"),
    ("negative moe layer", cfg(moe_layers=[-1]), "moe_layers"),
    ("duplicated moe layer", cfg(moe_layers=[0, 2, 0]), "moe_layers"),
    ("no moe layers", cfg(moe_layers=[]), "moe_layers"),
    ("bool moe layer", cfg(moe_layers=[True]), "moe_layers"),
    ("moe_layers not a list", cfg(moe_layers=2), "moe_layers"),
    ("unknown activation", cfg(activation="tanh"), "activation"),
    ("gated not bool", cfg(gated=1), "gated"),
    ("unknown family", cfg(family="gpt2"), "family"),
    ("unknown top-level key", cfg(hiden_size=16), "hiden_size"),
    ("missing hidden_size", without("hidden_size"), "hidden_size"),
    ("missing num_experts", without("num_experts"), "num_experts"),
    ("missing moe_layers", without("moe_layers"), "moe_layers"),
]


@pytest.mark.parametrize("data,field", [pytest.param(d, f, id=name) for name, d, f in BAD])
def test_bad_config_names_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field_re(field)) as info:
        MoESpec.from_dict(data)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [["silu"], {"name": "silu"}], ids=["list", "dict"])
def test_unhashable_activation_is_a_config_error(value: Any) -> None:
    # BUG pin: YAML like `activation: [silu]` must be a ConfigError naming 'activation', like any
    # other bad value; from_dict looks the value up in ACTIVATION_ALIASES first and raises
    # TypeError: unhashable type (expert_workers/spec.py, `if act in ACTIVATION_ALIASES`).
    with pytest.raises(ConfigError, match=field_re("activation")):
        MoESpec.from_dict(cfg(activation=value))


def test_from_dict_needs_a_mapping() -> None:
    with pytest.raises(ConfigError, match=field_re("model")):
        MoESpec.from_dict([("hidden_size", 16)])  # type: ignore[arg-type]


def test_error_message_names_value_and_expectation() -> None:
    with pytest.raises(ConfigError) as info:
        MoESpec.from_dict(cfg(routing={"top_k": 5}))
    msg = str(info.value)
    assert "= 5" in msg
    assert "num_experts=4" in msg
    assert info.value.value == 5


def test_unknown_key_error_lists_known_fields() -> None:
    with pytest.raises(ConfigError, match=field_re("routing.topk")) as info:
        MoESpec.from_dict(cfg(routing={"topk": 2}))
    assert "top_k" in info.value.expected


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ConfigError, match=field_re("routing.top_k")):
        RoutingSpec(top_k=-1)
    with pytest.raises(ConfigError, match=field_re("moe_layers")):
        # a list (not a tuple) is only converted by from_dict
        MoESpec(hidden_size=8, intermediate_size=8, num_experts=2, num_layers=1, moe_layers=[0])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=field_re("routing.top_k")):
        MoESpec(hidden_size=8, intermediate_size=8, num_experts=2, num_layers=1, moe_layers=(0,), routing=RoutingSpec(top_k=3))


def test_valid_edge_values_are_accepted() -> None:
    spec = MoESpec.from_dict(
        cfg(
            num_experts=8,
            routing={
                "policy": "sigmoid_group_topk", "top_k": 8, "num_groups": 4, "topk_groups": 4,
                "capacity_factor": 1, "overflow": "reroute", "noise_std": 0, "noise_seed": 0,
            },
            shared_experts={"count": 2, "intermediate_size": 4, "sigmoid_gate": True},
        )
    )
    assert spec.routing.top_k == 8
    assert spec.routing.num_groups == 4
    assert spec.shared_experts.count == 2


@pytest.mark.parametrize(
    "alias,activation,gated",
    [
        ("swiglu", "silu", True),
        ("geglu", "gelu", True),
        ("reglu", "relu", True),
        ("swish", "silu", True),               # not a GLU name: gated keeps its default
        ("gelu_pytorch_tanh", "gelu_tanh", True),
        ("gelu_new", "gelu_tanh", True),
        ("silu", "silu", True),
    ],
)
def test_activation_aliases(alias: str, activation: str, gated: bool) -> None:
    spec = MoESpec.from_dict(cfg(activation=alias))
    assert spec.activation == activation
    assert spec.gated is gated


def test_non_glu_alias_keeps_explicit_gated_false() -> None:
    spec = MoESpec.from_dict(cfg(activation="gelu_new", gated=False))
    assert (spec.activation, spec.gated) == ("gelu_tanh", False)


def test_from_dict_does_not_mutate_its_input() -> None:
    data = cfg(activation="swiglu", routing={"top_k": 1})
    before = copy.deepcopy(data)
    MoESpec.from_dict(data)
    assert data == before


def test_to_dict_round_trip() -> None:
    spec = MoESpec.from_dict(
        cfg(
            family="deepseek_v3", activation="swiglu",
            routing={"policy": "sigmoid_group_topk", "top_k": 2, "num_groups": 2, "topk_groups": 1,
                     "score_function": "sigmoid", "correction_bias": True, "routed_scaling_factor": 2.5},
            shared_experts={"count": 1, "intermediate_size": 8},
        )
    )
    d = spec.to_dict()
    assert d["routing"]["routed_scaling_factor"] == 2.5
    assert d["moe_layers"] == (0, 2)
    assert MoESpec.from_dict(d) == spec
