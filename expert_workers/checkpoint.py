"""Lazy reader of Hugging Face safetensors checkpoints (sharded or not).

Only MoE-block tensors are ever read (gate, correction bias, experts, shared
experts), one (layer, expert) at a time: safetensors memory-maps the file and
`get_tensor` / `get_slice` copy out just the bytes asked for, so a worker that
hosts three experts reads three experts' bytes.

Experts are read from either layout a checkpoint may use: one tensor per
projection per expert (`experts.{e}.gate_proj.weight`, as `save_pretrained`
writes) or fused 3-D tensors (`experts.gate_up_proj` (E, 2I, D),
`experts.down_proj` (E, D, I)), sliced per expert.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open

from expert_workers.errors import CheckpointError
from expert_workers.families import Family, family_for
from expert_workers.spec import MoESpec
from expert_workers.weights import ExpertWeights, RouterWeights, SharedWeights

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors dtype names of the weights moe-serve reads as they are.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


class HFCheckpoint:
    """A `WeightSource` over a checkpoint directory: config.json + safetensors."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.config = self._read_config()
        self.family: Family = family_for(self.config, self.path)
        self.spec: MoESpec = self.family.spec_from_config(self.config, self.path)
        self._handles: dict[str, Any] = {}
        self._file_of = self._index()

    # -- files -------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        if not os.path.isdir(self.path):
            raise CheckpointError(path=self.path, problem="not a directory")
        cfg_path = os.path.join(self.path, "config.json")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(path=self.path, problem="config.json is missing") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(path=self.path, problem=f"config.json is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(path=self.path, problem="config.json is not a JSON object")
        # NOTE: multimodal wrappers nest the language model's config.
        cfg = cfg.get("text_config", cfg) if "model_type" not in cfg else cfg
        quant = cfg.get("quantization_config") if isinstance(cfg, dict) else None
        if quant:
            # NOTE: quantized weights need their scales applied (DeepSeek-V3's fp8 blocks and
            # weight_scale_inv); read as plain tensors they would give wrong numbers, silently.
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
            raise CheckpointError(path=self.path, problem=f"quantized checkpoints are not supported (quantization_config, quant_method={method!r}); "
                                                          "dequantize it to bfloat16, float16 or float32 first")
        return cfg

    def _index(self) -> dict[str, str]:
        """tensor name -> file name, from the index json or by listing the files' headers."""
        index_path = os.path.join(self.path, INDEX_FILE)
        if os.path.exists(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(path=self.path, problem=f"{INDEX_FILE} is malformed: {e!r}") from None
            for fname in set(weight_map.values()):
                if not os.path.exists(os.path.join(self.path, fname)):
                    raise CheckpointError(path=self.path, problem=f"shard {fname} named in {INDEX_FILE} is missing")
            return dict(weight_map)
        files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(path=self.path, problem=f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file")
        file_of: dict[str, str] = {}
        for fname in files:
            for key in self._open(fname).keys():
                file_of[key] = fname
        return file_of

    def _open(self, fname: str) -> Any:
        if fname not in self._handles:
            try:
                self._handles[fname] = safe_open(os.path.join(self.path, fname), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(path=self.path, problem=f"cannot read {fname}: {e}") from None
        return self._handles[fname]

    def has(self, key: str) -> bool:
        return key in self._file_of

    def _slice(self, key: str) -> Any:
        if key not in self._file_of:
            raise CheckpointError(path=self.path, problem=f"missing tensor '{key}'")
        sl = self._open(self._file_of[key]).get_slice(key)
        if sl.get_dtype() not in FLOAT_DTYPES:
            raise CheckpointError(path=self.path, problem=f"tensor '{key}' is {sl.get_dtype()}; expected one of {sorted(FLOAT_DTYPES)} "
                                                          "(quantized weights must be dequantized first)")
        return sl

    def _tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        sl = self._slice(key)
        got = tuple(sl.get_shape())
        if got != shape:
            raise CheckpointError(path=self.path, problem=f"tensor '{key}' has shape {got}, expected {shape}")
        return sl[:]

    # -- WeightSource ------------------------------------------------------
    def _check_layer(self, layer: int) -> None:
        if layer not in self.spec.is_moe_layer:
            raise CheckpointError(path=self.path, problem=f"layer {layer} is not an MoE layer {self.spec.moe_layers}")

    def router(self, layer: int) -> RouterWeights:
        self._check_layer(layer)
        s = self.spec
        weight = self._tensor(self.family.router_key(layer), (s.num_experts, s.hidden_size))
        bias = None
        if s.routing.correction_bias:
            bias = self._tensor(self.family.bias_key(layer), (s.num_experts,))
        return RouterWeights(weight=weight, correction_bias=bias)

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        self._check_layer(layer)
        s = self.spec
        if not 0 <= expert < s.num_experts:
            raise CheckpointError(path=self.path, problem=f"expert {expert} out of range [0, {s.num_experts})")
        d, i = s.hidden_size, s.intermediate_size
        gate_key, up_key, down_key = self.family.expert_keys(layer, expert)
        if not self.has(gate_key) and self.has(self.family.fused_expert_keys(layer)[0]):
            return self._fused_expert(layer, expert)
        w_in = torch.cat([self._tensor(gate_key, (i, d)), self._tensor(up_key, (i, d))])
        return ExpertWeights(w_in=w_in, w_out=self._tensor(down_key, (d, i)))

    def _fused_expert(self, layer: int, expert: int) -> ExpertWeights:
        s = self.spec
        d, i, e = s.hidden_size, s.intermediate_size, s.num_experts
        gu_key, down_key = self.family.fused_expert_keys(layer)
        gu, down = self._slice(gu_key), self._slice(down_key)
        for key, sl, shape in ((gu_key, gu, (e, 2 * i, d)), (down_key, down, (e, d, i))):
            if tuple(sl.get_shape()) != shape:
                raise CheckpointError(path=self.path, problem=f"tensor '{key}' has shape {tuple(sl.get_shape())}, expected {shape}")
        return ExpertWeights(w_in=gu[expert : expert + 1][0], w_out=down[expert : expert + 1][0])

    def shared(self, layer: int) -> SharedWeights | None:
        self._check_layer(layer)
        sh = self.spec.shared_experts
        if sh.count == 0:
            return None
        d, w = self.spec.hidden_size, sh.count * sh.intermediate_size
        g, u, dn = self.family.shared_keys(layer)
        ffn = ExpertWeights(
            w_in=torch.cat([self._tensor(g, (w, d)), self._tensor(u, (w, d))]),
            w_out=self._tensor(dn, (d, w)),
        )
        gate = self._tensor(self.family.shared_gate_key(layer), (1, d)) if sh.sigmoid_gate else None
        return SharedWeights(ffn=ffn, gate=gate)

    def validate(self) -> None:
        """Check names and shapes of every MoE tensor from the headers, reading no data."""
        s = self.spec
        d, i = s.hidden_size, s.intermediate_size
        for layer in s.moe_layers:
            self._check_shape(self.family.router_key(layer), (s.num_experts, d))
            if s.routing.correction_bias:
                self._check_shape(self.family.bias_key(layer), (s.num_experts,))
            fused = self.family.fused_expert_keys(layer)
            if self.has(fused[0]) and not self.has(self.family.expert_keys(layer, 0)[0]):
                self._check_shape(fused[0], (s.num_experts, 2 * i, d))
                self._check_shape(fused[1], (s.num_experts, d, i))
            else:
                for e in range(s.num_experts):
                    g, u, dn = self.family.expert_keys(layer, e)
                    self._check_shape(g, (i, d))
                    self._check_shape(u, (i, d))
                    self._check_shape(dn, (d, i))
            if s.shared_experts.count:
                w = s.shared_experts.count * s.shared_experts.intermediate_size
                g, u, dn = self.family.shared_keys(layer)
                self._check_shape(g, (w, d))
                self._check_shape(u, (w, d))
                self._check_shape(dn, (d, w))
                if s.shared_experts.sigmoid_gate:
                    self._check_shape(self.family.shared_gate_key(layer), (1, d))

    def _check_shape(self, key: str, shape: tuple[int, ...]) -> None:
        got = tuple(self._slice(key).get_shape())
        if got != shape:
            raise CheckpointError(path=self.path, problem=f"tensor '{key}' has shape {got}, expected {shape}")
