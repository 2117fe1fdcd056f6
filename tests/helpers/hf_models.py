"""Tiny Hugging Face MoE models of the five families, with every MoE tensor randomised.

`transformers` is the reference: a model is built here, its MoE tensors filled with
random values (routers, experts, shared experts, correction biases; the library's
own init leaves some of them zero), saved with `save_pretrained`, and its MoE blocks
are the oracle for moe-serve's outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    make: Callable[[], Any]


def _attn(hidden: int) -> dict[str, int]:
    # attention is not under test: the smallest shapes transformers accepts.
    return dict(num_attention_heads=2, num_key_value_heads=1, vocab_size=64, head_dim=4)


def mixtral(hidden: int = 24, inter: int = 40, layers: int = 2, experts: int = 6, k: int = 2, act: str = "silu") -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_local_experts=experts, num_experts_per_tok=k, hidden_act=act, **_attn(hidden))
    return MixtralForCausalLM(cfg)


def qwen2_moe(hidden: int = 20, inter: int = 12, layers: int = 3, experts: int = 5, k: int = 2,
              shared: int = 28, norm: bool = False, step: int = 1, dense: tuple[int, ...] = ()) -> Any:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(hidden_size=hidden, intermediate_size=36, moe_intermediate_size=inter,
                         shared_expert_intermediate_size=shared, num_hidden_layers=layers, num_experts=experts,
                         num_experts_per_tok=k, norm_topk_prob=norm, decoder_sparse_step=step,
                         mlp_only_layers=list(dense), **_attn(hidden))
    return Qwen2MoeForCausalLM(cfg)


def qwen3_moe(hidden: int = 16, inter: int = 10, layers: int = 3, experts: int = 7, k: int = 3,
              norm: bool = True, dense: tuple[int, ...] = (1,)) -> Any:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(hidden_size=hidden, intermediate_size=36, moe_intermediate_size=inter,
                         num_hidden_layers=layers, num_experts=experts, num_experts_per_tok=k,
                         norm_topk_prob=norm, mlp_only_layers=list(dense), **_attn(hidden))
    return Qwen3MoeForCausalLM(cfg)


def olmoe(hidden: int = 18, inter: int = 14, layers: int = 2, experts: int = 9, k: int = 3,
          norm: bool = False, act: str = "silu") -> Any:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_experts=experts,
                      num_experts_per_tok=k, norm_topk_prob=norm, hidden_act=act, **_attn(hidden))
    return OlmoeForCausalLM(cfg)


def deepseek_v3(hidden: int = 16, inter: int = 6, layers: int = 3, experts: int = 12, k: int = 3,
                groups: int = 4, topk_groups: int = 2, shared: int = 2, first_dense: int = 1,
                scale: float = 2.5, norm: bool = True) -> Any:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(hidden_size=hidden, intermediate_size=20, moe_intermediate_size=inter,
                           num_hidden_layers=layers, first_k_dense_replace=first_dense, n_routed_experts=experts,
                           n_shared_experts=shared, num_experts_per_tok=k, n_group=groups, topk_group=topk_groups,
                           routed_scaling_factor=scale, norm_topk_prob=norm, num_attention_heads=2,
                           num_key_value_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4,
                           qk_nope_head_dim=4, v_head_dim=4, vocab_size=64)
    return DeepseekV3ForCausalLM(cfg)


def randomise_moe(model: Any, seed: int) -> Any:
    """Fill every MoE-block parameter and buffer with seeded random values.

    NOTE: the experts run transformers' "eager" implementation, its readable
    per-expert loop: the default grouped kernel refuses odd widths on CPU.
    """
    model.set_experts_implementation("eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if ".mlp." not in name:
                continue
            std = 0.3 if "bias" in name else max(t.shape[-1], 1) ** -0.5
            t.copy_(torch.randn(t.shape, generator=gen) * std)
    return model.eval()


def save(model: Any, path: str | os.PathLike[str], *, max_shard_size: str | None = None) -> str:
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(os.fspath(path), **kwargs)
    return os.fspath(path)


def moe_block(model: Any, layer: int) -> Any:
    return model.model.layers[layer].mlp
