"""Hugging Face model families: `config.json` -> MoESpec, and checkpoint tensor names.

This is the one place where checkpoint names are mapped to moe-serve's layout.
Each family is a small `Family` record in `FAMILIES`; adding one means adding a
record, not an `if` elsewhere. Defaults for keys a `config.json` may omit are the
ones `transformers` documents for that model type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from expert_workers.errors import CheckpointError, ConfigError
from expert_workers.spec import ACTIVATION_ALIASES, MoESpec, RoutingSpec, SharedExpertSpec


@dataclass(frozen=True, kw_only=True)
class Family:
    """Where one family keeps its MoE tensors, and how its config reads."""

    name: str
    # module holding the MoE block inside `model.layers.{L}`.
    block: str
    # per-expert projection names: (gate, up, down).
    proj: tuple[str, str, str]
    # shared-expert module name inside the block, or None.
    shared: str | None
    # Qwen2-MoE's sigmoid gate over the shared expert, or None.
    shared_gate: str | None
    spec_from_config: Callable[[Mapping[str, Any], str], MoESpec]

    def router_key(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.weight"

    def bias_key(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.e_score_correction_bias"

    def expert_keys(self, layer: int, expert: int) -> tuple[str, str, str]:
        base = f"model.layers.{layer}.{self.block}.experts.{expert}"
        return tuple(f"{base}.{p}.weight" for p in self.proj)  # type: ignore[return-value]

    def fused_expert_keys(self, layer: int) -> tuple[str, str]:
        """The (E, 2I, D) gate_up and (E, D, I) down tensors of checkpoints saved fused."""
        base = f"model.layers.{layer}.{self.block}.experts"
        return f"{base}.gate_up_proj", f"{base}.down_proj"

    def shared_keys(self, layer: int) -> tuple[str, str, str]:
        assert self.shared is not None
        base = f"model.layers.{layer}.{self.block}.{self.shared}"
        return tuple(f"{base}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))  # type: ignore[return-value]

    def shared_gate_key(self, layer: int) -> str:
        assert self.shared_gate is not None
        return f"model.layers.{layer}.{self.block}.{self.shared_gate}.weight"


def _get(cfg: Mapping[str, Any], key: str | tuple[str, ...], where: str, default: Any = ...) -> Any:
    """The first of `key` (or of its alternative spellings) that config.json sets."""
    keys = (key,) if isinstance(key, str) else key
    for k in keys:
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    if default is ...:
        raise CheckpointError(path=where, problem=f"config.json lacks required key '{keys[0]}'")
    return default


# NOTE: newer transformers releases write `num_local_experts` where older checkpoints say
# `num_experts` / `n_routed_experts`; both spellings are real checkpoints in the wild.
_NUM_EXPERTS = ("num_experts", "num_local_experts")


def _activation(cfg: Mapping[str, Any], where: str) -> str:
    act = _get(cfg, "hidden_act", where, "silu")
    return ACTIVATION_ALIASES.get(act, (act, None))[0]


def _build(where: str, **fields: Any) -> MoESpec:
    try:
        return MoESpec(**fields)
    except ConfigError as e:
        raise CheckpointError(path=where, problem=f"config.json gives an invalid MoE spec: {e}") from e


def _mixtral(cfg: Mapping[str, Any], where: str) -> MoESpec:
    n = _get(cfg, "num_hidden_layers", where)
    return _build(
        where,
        family="mixtral",
        hidden_size=_get(cfg, "hidden_size", where),
        intermediate_size=_get(cfg, "intermediate_size", where),
        num_experts=_get(cfg, ("num_local_experts", "num_experts"), where),
        num_layers=n,
        moe_layers=tuple(range(n)),
        activation=_activation(cfg, where),
        routing=RoutingSpec(policy="softmax_topk", top_k=_get(cfg, "num_experts_per_tok", where),
                            logits_dtype="compute", weights_dtype="float32"),
    )


def _qwen_like(family: str, shared: bool) -> Callable[[Mapping[str, Any], str], MoESpec]:
    def parse(cfg: Mapping[str, Any], where: str) -> MoESpec:
        n = _get(cfg, "num_hidden_layers", where)
        step = _get(cfg, "decoder_sparse_step", where, 1)
        dense = set(_get(cfg, "mlp_only_layers", where, []))
        num_experts = _get(cfg, _NUM_EXPERTS, where)
        layers = tuple(i for i in range(n) if i not in dense and num_experts > 0 and (i + 1) % step == 0)
        shared_spec = SharedExpertSpec()
        if shared:
            # NOTE: transformers' default when config.json omits it; Qwen2-MoE always has the shared expert.
            width = _get(cfg, "shared_expert_intermediate_size", where, 5632)
            shared_spec = SharedExpertSpec(count=1 if width else 0, intermediate_size=width, sigmoid_gate=bool(width))
        return _build(
            where,
            family=family,
            hidden_size=_get(cfg, "hidden_size", where),
            intermediate_size=_get(cfg, "moe_intermediate_size", where),
            num_experts=num_experts,
            num_layers=n,
            moe_layers=layers,
            activation=_activation(cfg, where),
            routing=RoutingSpec(
                policy="topk_softmax",
                top_k=_get(cfg, "num_experts_per_tok", where),
                normalize_topk=bool(_get(cfg, "norm_topk_prob", where, False)),
                logits_dtype="compute",
                weights_dtype="compute",
            ),
            shared_experts=shared_spec,
        )

    return parse


def _olmoe(cfg: Mapping[str, Any], where: str) -> MoESpec:
    n = _get(cfg, "num_hidden_layers", where)
    return _build(
        where,
        family="olmoe",
        hidden_size=_get(cfg, "hidden_size", where),
        intermediate_size=_get(cfg, "intermediate_size", where),
        num_experts=_get(cfg, _NUM_EXPERTS, where),
        num_layers=n,
        moe_layers=tuple(range(n)),
        activation=_activation(cfg, where),
        routing=RoutingSpec(
            policy="topk_softmax",
            top_k=_get(cfg, "num_experts_per_tok", where),
            normalize_topk=bool(_get(cfg, "norm_topk_prob", where, False)),
            logits_dtype="compute",
            weights_dtype="compute",
        ),
    )


def _deepseek_v3(cfg: Mapping[str, Any], where: str) -> MoESpec:
    n = _get(cfg, "num_hidden_layers", where)
    first_moe = _get(cfg, "first_k_dense_replace", where, 3)
    width = _get(cfg, "moe_intermediate_size", where)
    n_shared = _get(cfg, "n_shared_experts", where, 1)
    # NOTE: transformers' DeepSeek-V3 always scores with sigmoid and never reads `scoring_func`; a
    # config.json that names another would be served unlike the reference, so it is refused.
    score = _get(cfg, "scoring_func", where, "sigmoid")
    if score != "sigmoid":
        raise CheckpointError(path=where, problem=f"deepseek_v3 routes with sigmoid scores (as transformers does); config.json says scoring_func={score!r}")
    return _build(
        where,
        family="deepseek_v3",
        hidden_size=_get(cfg, "hidden_size", where),
        intermediate_size=width,
        num_experts=_get(cfg, ("n_routed_experts", "num_local_experts"), where),
        num_layers=n,
        moe_layers=tuple(range(first_moe, n)),
        activation=_activation(cfg, where),
        routing=RoutingSpec(
            policy="sigmoid_group_topk",
            top_k=_get(cfg, "num_experts_per_tok", where),
            normalize_topk=bool(_get(cfg, "norm_topk_prob", where, True)),
            routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", where, 2.5)),
            num_groups=_get(cfg, "n_group", where, 8),
            topk_groups=_get(cfg, "topk_group", where, 4),
            score_function=score,
            correction_bias=True,
            logits_dtype="float32",
            weights_dtype="float32",
        ),
        shared_experts=SharedExpertSpec(count=n_shared, intermediate_size=width),
    )


_QWEN_PROJ = ("gate_proj", "up_proj", "down_proj")
FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        name="mixtral", block="block_sparse_moe", proj=("w1", "w3", "w2"),
        shared=None, shared_gate=None, spec_from_config=_mixtral,
    ),
    "qwen2_moe": Family(
        name="qwen2_moe", block="mlp", proj=_QWEN_PROJ,
        shared="shared_expert", shared_gate="shared_expert_gate", spec_from_config=_qwen_like("qwen2_moe", True),
    ),
    "qwen3_moe": Family(
        name="qwen3_moe", block="mlp", proj=_QWEN_PROJ,
        shared=None, shared_gate=None, spec_from_config=_qwen_like("qwen3_moe", False),
    ),
    "olmoe": Family(
        name="olmoe", block="mlp", proj=_QWEN_PROJ, shared=None, shared_gate=None, spec_from_config=_olmoe,
    ),
    "deepseek_v3": Family(
        name="deepseek_v3", block="mlp", proj=_QWEN_PROJ,
        shared="shared_experts", shared_gate=None, spec_from_config=_deepseek_v3,
    ),
}


def family_for(cfg: Mapping[str, Any], where: str) -> Family:
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            path=where,
            problem=f"unknown model family model_type={model_type!r}; supported: {sorted(FAMILIES)}",
        )
    return FAMILIES[model_type]
