"""The model spec: one typed description of a model's MoE layers.

Frozen, keyword-only dataclasses, nested as the parts nest (`MoESpec` holds a
`RoutingSpec` and a `SharedExpertSpec`). Every field is validated once, when the
spec is built; an error names the field, the value and what was expected.
`MoESpec.from_dict` is the single entry point for YAML / JSON / plain dicts and
rejects unknown keys by name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from expert_workers.errors import ConfigError

ROUTING_POLICIES = (
    "softmax_topk",
    "topk_softmax",
    "sigmoid_group_topk",
    "expert_choice",
    "hash",
    "noisy_topk",
)
OVERFLOW_POLICIES = ("drop", "reroute", "dropless")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
ARITHMETIC_DTYPES = ("compute", "float32")
# NOTE: names as Hugging Face configs spell `hidden_act`, plus the usual GLU names.
# A gated FFN computes act(x W_gate) * (x W_up); an ungated one act(x W_in).
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
ACTIVATION_ALIASES = {
    "swiglu": ("silu", True),
    "geglu": ("gelu", True),
    "reglu": ("relu", True),
    "gelu_pytorch_tanh": ("gelu_tanh", None),
    "gelu_new": ("gelu_tanh", None),
    "swish": ("silu", None),
}
FAMILIES = ("random", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(field=name, value=value, expected=expected)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True, kw_only=True)
class RoutingSpec:
    """How the gate turns router logits into (token, expert, weight) triples."""

    policy: str = "softmax_topk"
    top_k: int = 2
    # softmax then top-k: renormalise the k weights to sum to 1 (Mixtral, Qwen3 yes; OLMoE no).
    normalize_topk: bool = True
    # multiplies routed weights after normalisation (DeepSeek-V3: 2.5).
    routed_scaling_factor: float = 1.0
    # group-limited routing: experts split into `num_groups`, tokens use the best `topk_groups`.
    num_groups: int = 1
    topk_groups: int = 1
    score_function: str = "softmax"
    # the layer has a per-expert correction bias, added to scores for selection only.
    correction_bias: bool = False
    # capacity = ceil(capacity_factor * tokens * top_k / num_experts); None = no cap.
    capacity_factor: float | None = None
    overflow: str = "dropless"
    # noisy_topk only: noise is added only when `noisy` is true (off at inference).
    noisy: bool = False
    noise_std: float = 1.0
    noise_seed: int | None = None
    # the dtype the router logits are computed in: "compute" (the experts' dtype: Mixtral, Qwen-MoE,
    # OLMoE) or "float32" (DeepSeek-V3); the gate itself always runs in float32 from those logits.
    logits_dtype: str = "float32"
    # the dtype each expert output is multiplied by its weight in: "compute" (the weight rounded to the
    # experts' dtype first: Qwen-MoE, OLMoE) or "float32" (Mixtral, DeepSeek-V3); equal in float32.
    weights_dtype: str = "float32"

    def __post_init__(self) -> None:
        p = "routing."
        _require(self.policy in ROUTING_POLICIES, p + "policy", self.policy, f"one of {ROUTING_POLICIES}")
        _require(_is_int(self.top_k) and self.top_k >= 1, p + "top_k", self.top_k, "an integer >= 1")
        _require(isinstance(self.normalize_topk, bool), p + "normalize_topk", self.normalize_topk, "a bool")
        _require(
            _is_num(self.routed_scaling_factor) and self.routed_scaling_factor > 0,
            p + "routed_scaling_factor", self.routed_scaling_factor, "a finite number > 0",
        )
        _require(_is_int(self.num_groups) and self.num_groups >= 1, p + "num_groups", self.num_groups, "an integer >= 1")
        _require(
            _is_int(self.topk_groups) and 1 <= self.topk_groups <= self.num_groups,
            p + "topk_groups", self.topk_groups, f"an integer in [1, num_groups={self.num_groups}]",
        )
        _require(self.score_function in SCORE_FUNCTIONS, p + "score_function", self.score_function, f"one of {SCORE_FUNCTIONS}")
        _require(isinstance(self.correction_bias, bool), p + "correction_bias", self.correction_bias, "a bool")
        _require(self.overflow in OVERFLOW_POLICIES, p + "overflow", self.overflow, f"one of {OVERFLOW_POLICIES}")
        if self.capacity_factor is not None:
            _require(
                _is_num(self.capacity_factor) and self.capacity_factor > 0,
                p + "capacity_factor", self.capacity_factor, "a finite number > 0, or null for no capacity limit",
            )
        if self.overflow in ("drop", "reroute"):
            _require(
                self.capacity_factor is not None, p + "capacity_factor", self.capacity_factor,
                f"a number > 0 when overflow is '{self.overflow}'",
            )
        _require(isinstance(self.noisy, bool), p + "noisy", self.noisy, "a bool")
        _require(_is_num(self.noise_std) and self.noise_std >= 0, p + "noise_std", self.noise_std, "a finite number >= 0")
        if self.noise_seed is not None:
            _require(_is_int(self.noise_seed), p + "noise_seed", self.noise_seed, "an integer or null")
        _require(self.logits_dtype in ARITHMETIC_DTYPES, p + "logits_dtype", self.logits_dtype, f"one of {ARITHMETIC_DTYPES}")
        _require(self.weights_dtype in ARITHMETIC_DTYPES, p + "weights_dtype", self.weights_dtype, f"one of {ARITHMETIC_DTYPES}")


@dataclass(frozen=True, kw_only=True)
class SharedExpertSpec:
    """Experts every token goes through (Qwen2-MoE, DeepSeek-V3). count 0 = none.

    NOTE: `count` shared experts of `intermediate_size` each are one FFN of width
    count * intermediate_size, the way DeepSeek-V3 stores them.
    """

    count: int = 0
    intermediate_size: int = 0
    # Qwen2-MoE: output scaled by sigmoid(x @ w_shared_gate), w_shared_gate of shape (1, D).
    sigmoid_gate: bool = False

    def __post_init__(self) -> None:
        p = "shared_experts."
        _require(_is_int(self.count) and self.count >= 0, p + "count", self.count, "an integer >= 0")
        if self.count:
            _require(
                _is_int(self.intermediate_size) and self.intermediate_size >= 1,
                p + "intermediate_size", self.intermediate_size, "an integer >= 1 when count > 0",
            )
        _require(isinstance(self.sigmoid_gate, bool), p + "sigmoid_gate", self.sigmoid_gate, "a bool")


@dataclass(frozen=True, kw_only=True)
class MoESpec:
    """The MoE layers of one model. Shapes: D = hidden_size, I = intermediate_size, E = num_experts."""

    family: str = "random"
    hidden_size: int
    # width of one routed expert's FFN.
    intermediate_size: int
    num_experts: int
    # transformer layer count of the model; `moe_layers` are the indices that hold an MoE block.
    num_layers: int
    moe_layers: tuple[int, ...]
    activation: str = "silu"
    gated: bool = True
    routing: RoutingSpec = field(default_factory=RoutingSpec)
    shared_experts: SharedExpertSpec = field(default_factory=SharedExpertSpec)

    def __post_init__(self) -> None:
        _require(self.family in FAMILIES, "family", self.family, f"one of {FAMILIES}")
        for name in ("hidden_size", "intermediate_size", "num_experts", "num_layers"):
            v = getattr(self, name)
            _require(_is_int(v) and v >= 1, name, v, "an integer >= 1")
        layers = self.moe_layers
        _require(
            isinstance(layers, tuple) and len(layers) > 0 and all(_is_int(i) for i in layers),
            "moe_layers", layers, "a non-empty list of layer indices",
        )
        _require(
            all(0 <= i < self.num_layers for i in layers) and len(set(layers)) == len(layers),
            "moe_layers", layers, f"distinct indices in [0, num_layers={self.num_layers})",
        )
        _require(self.activation in ACTIVATIONS, "activation", self.activation, f"one of {ACTIVATIONS} (or an alias in {tuple(ACTIVATION_ALIASES)})")
        _require(isinstance(self.gated, bool), "gated", self.gated, "a bool")
        r = self.routing
        _require(
            r.top_k <= self.num_experts, "routing.top_k", r.top_k, f"at most num_experts={self.num_experts}",
        )
        _require(
            self.num_experts % r.num_groups == 0, "routing.num_groups", r.num_groups,
            f"a divisor of num_experts={self.num_experts}",
        )
        if r.num_groups > 1:
            per_group = self.num_experts // r.num_groups
            _require(
                r.topk_groups * per_group >= r.top_k, "routing.topk_groups", r.topk_groups,
                f"enough groups to hold top_k={r.top_k} experts ({per_group} experts per group)",
            )
            _require(
                r.policy == "sigmoid_group_topk", "routing.num_groups", r.num_groups,
                "1 unless routing.policy is 'sigmoid_group_topk'",
            )

    @property
    def is_moe_layer(self) -> frozenset[int]:
        return frozenset(self.moe_layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MoESpec":
        """Build from plain data (YAML/JSON). Unknown keys are errors naming the key."""
        _require(isinstance(data, Mapping), "model", data, "a mapping of MoESpec fields")
        data = dict(data)
        routing = _sub(RoutingSpec, data.pop("routing", {}), "routing")
        shared = _sub(SharedExpertSpec, data.pop("shared_experts", {}), "shared_experts")
        act = data.get("activation", "silu")
        if isinstance(act, str) and act in ACTIVATION_ALIASES:
            base, gated = ACTIVATION_ALIASES[act]
            data["activation"] = base
            if gated is not None:
                data.setdefault("gated", gated)
        if "moe_layers" in data and isinstance(data["moe_layers"], list):
            data["moe_layers"] = tuple(data["moe_layers"])
        _check_keys(cls, data, "")
        return cls(routing=routing, shared_experts=shared, **data)


def _check_keys(cls: type, data: Mapping[str, Any], prefix: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(field=prefix + str(key), value=data[key], expected=f"no such field; known fields: {sorted(known)}")
    missing = [
        f.name for f in dataclasses.fields(cls)
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        and f.name not in ("routing", "shared_experts")
    ]
    if missing:
        raise ConfigError(field=prefix + missing[0], value=None, expected="a value (this field is required)")


def _sub(cls: type, data: Any, name: str) -> Any:
    _require(isinstance(data, Mapping), name, data, f"a mapping of {cls.__name__} fields")
    _check_keys(cls, data, name + ".")
    return cls(**data)
