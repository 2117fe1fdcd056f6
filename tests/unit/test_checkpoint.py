"""Checkpoint loading: lazy per-(layer, expert) reads, fused layout, and bad checkpoints named precisely."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from expert_workers.checkpoint import HFCheckpoint
from expert_workers.errors import CheckpointError, InvalidRequestError
from router_svc import LocalMoE
from tests.helpers import hf_models as hf

pytestmark = pytest.mark.unit
# NOTE: two engines over the same weights may differ in the last bit: MKL picks kernels by buffer
# alignment, which differs between files. Outputs are compared at float32 rounding, not bitwise.


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> str:
    model = hf.randomise_moe(hf.qwen2_moe(hidden=20, inter=12, layers=3, experts=5, k=2, shared=28), seed=11)
    return hf.save(model, tmp_path_factory.mktemp("ckpt") / "qwen2")


@pytest.fixture(scope="module")
def dsv3_dir(tmp_path_factory) -> str:
    model = hf.randomise_moe(hf.deepseek_v3(), seed=12)
    return hf.save(model, tmp_path_factory.mktemp("ckpt") / "dsv3")


def _tensors(path: str) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return os.fspath(dst)


def test_expert_reads_exactly_that_experts_tensors(qwen2_dir: str) -> None:
    ckpt = HFCheckpoint(qwen2_dir)
    stored = _tensors(qwen2_dir)
    w = ckpt.expert(2, 3)
    base = "model.layers.2.mlp.experts.3"
    torch.testing.assert_close(w.w_in, torch.cat([stored[f"{base}.gate_proj.weight"], stored[f"{base}.up_proj.weight"]]), rtol=0, atol=0)
    torch.testing.assert_close(w.w_out, stored[f"{base}.down_proj.weight"], rtol=0, atol=0)
    shared = ckpt.shared(1)
    assert shared is not None and shared.gate is not None
    torch.testing.assert_close(shared.gate, stored["model.layers.1.mlp.shared_expert_gate.weight"], rtol=0, atol=0)


def test_only_moe_tensors_are_needed(qwen2_dir: str, tmp_path) -> None:
    """A checkpoint stripped of every non-MoE tensor still loads and computes the same."""
    stored = _tensors(qwen2_dir)
    moe_only = {k: v for k, v in stored.items() if ".mlp." in k}
    assert len(moe_only) < len(stored)
    dst = tmp_path / "moe_only"
    dst.mkdir()
    shutil.copy(os.path.join(qwen2_dir, "config.json"), dst / "config.json")
    save_file(moe_only, os.fspath(dst / "model.safetensors"))
    x = torch.randn(9, 20)
    torch.testing.assert_close(LocalMoE.from_pretrained(dst).forward(x, 0), LocalMoE.from_pretrained(qwen2_dir).forward(x, 0), rtol=1e-6, atol=1e-7)


def test_a_worker_can_load_its_slots_when_other_layers_are_absent(qwen2_dir: str, tmp_path) -> None:
    stored = _tensors(qwen2_dir)
    dst = tmp_path / "partial"
    dst.mkdir()
    shutil.copy(os.path.join(qwen2_dir, "config.json"), dst / "config.json")
    save_file({k: v for k, v in stored.items() if "layers.0.mlp.experts.1." in k}, os.fspath(dst / "model.safetensors"))
    ckpt = HFCheckpoint(dst)
    assert ckpt.expert(0, 1).w_in.shape == (24, 20)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.0\.mlp\.gate\.weight'"):
        ckpt.validate()


def test_fused_expert_layout_loads_the_same(dsv3_dir: str, tmp_path) -> None:
    """Checkpoints that store experts as (E, 2I, D) / (E, D, I) tensors are sliced per expert."""
    stored = _tensors(dsv3_dir)
    spec = HFCheckpoint(dsv3_dir).spec
    fused = {k: v for k, v in stored.items() if ".experts." not in k}
    for layer in spec.moe_layers:
        base = f"model.layers.{layer}.mlp.experts"
        fused[f"{base}.gate_up_proj"] = torch.stack([
            torch.cat([stored[f"{base}.{e}.gate_proj.weight"], stored[f"{base}.{e}.up_proj.weight"]])
            for e in range(spec.num_experts)
        ])
        fused[f"{base}.down_proj"] = torch.stack([stored[f"{base}.{e}.down_proj.weight"] for e in range(spec.num_experts)])
    dst = tmp_path / "fused"
    dst.mkdir()
    shutil.copy(os.path.join(dsv3_dir, "config.json"), dst / "config.json")
    save_file(fused, os.fspath(dst / "model.safetensors"))
    x = torch.randn(33, spec.hidden_size)
    ref = LocalMoE.from_pretrained(dsv3_dir)
    got = LocalMoE.from_pretrained(dst)
    for layer in spec.moe_layers:
        torch.testing.assert_close(got.forward(x, layer), ref.forward(x, layer), rtol=1e-6, atol=1e-7)


def test_dense_layers_before_first_k_dense_replace_are_not_moe(dsv3_dir: str) -> None:
    moe = LocalMoE.from_pretrained(dsv3_dir)
    assert moe.spec.moe_layers == (1, 2)
    with pytest.raises(InvalidRequestError, match=r"layer 0 is not an MoE layer; MoE layers: \[1, 2\]"):
        moe.forward(torch.randn(2, 16), 0)
    with pytest.raises(InvalidRequestError, match=r"layer 3 out of range \[0, 3\)"):
        moe.forward(torch.randn(2, 16), 3)


def test_missing_expert_tensor_is_named(qwen2_dir: str, tmp_path) -> None:
    stored = _tensors(qwen2_dir)
    del stored["model.layers.1.mlp.experts.3.up_proj.weight"]
    dst = tmp_path / "missing"
    dst.mkdir()
    shutil.copy(os.path.join(qwen2_dir, "config.json"), dst / "config.json")
    save_file(stored, os.fspath(dst / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'"):
        LocalMoE.from_pretrained(dst)


def test_wrong_shape_is_named(qwen2_dir: str, tmp_path) -> None:
    stored = _tensors(qwen2_dir)
    stored["model.layers.2.mlp.experts.0.down_proj.weight"] = torch.zeros(20, 11)
    dst = tmp_path / "shape"
    dst.mkdir()
    shutil.copy(os.path.join(qwen2_dir, "config.json"), dst / "config.json")
    save_file(stored, os.fspath(dst / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.mlp\.experts\.0\.down_proj\.weight' has shape \(20, 11\), expected \(20, 12\)"):
        LocalMoE.from_pretrained(dst)


def test_missing_correction_bias_is_named(dsv3_dir: str, tmp_path) -> None:
    stored = _tensors(dsv3_dir)
    del stored["model.layers.2.mlp.gate.e_score_correction_bias"]
    dst = tmp_path / "nobias"
    dst.mkdir()
    shutil.copy(os.path.join(dsv3_dir, "config.json"), dst / "config.json")
    save_file(stored, os.fspath(dst / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.mlp\.gate\.e_score_correction_bias'"):
        LocalMoE.from_pretrained(dst)


def _edit_config(src: str, dst, **changes) -> str:
    path = _copy(src, dst)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return path


def test_unknown_family_is_named(qwen2_dir: str, tmp_path) -> None:
    path = _edit_config(qwen2_dir, tmp_path / "llama", model_type="llama")
    with pytest.raises(CheckpointError, match=r"unknown model family model_type='llama'; supported: \['deepseek_v3', 'mixtral', 'olmoe', 'qwen2_moe', 'qwen3_moe'\]"):
        LocalMoE.from_pretrained(path)


def test_missing_config_key_is_named(qwen2_dir: str, tmp_path) -> None:
    path = _edit_config(qwen2_dir, tmp_path / "nohidden", hidden_size=None)
    with pytest.raises(CheckpointError, match=r"config\.json lacks required key 'hidden_size'"):
        LocalMoE.from_pretrained(path)


def test_invalid_hyper_parameters_are_named(dsv3_dir: str, tmp_path) -> None:
    path = _edit_config(dsv3_dir, tmp_path / "groups", n_group=5)
    with pytest.raises(CheckpointError, match=r"routing\.num_groups"):
        LocalMoE.from_pretrained(path)


def test_omitted_keys_take_transformers_defaults(qwen2_dir: str, tmp_path) -> None:
    """A config.json without `shared_expert_intermediate_size` is a Qwen2-MoE with transformers'
    default shared expert (5632 wide), not one without it."""
    from transformers import Qwen2MoeConfig

    path = _edit_config(qwen2_dir, tmp_path / "noshared", shared_expert_intermediate_size=None)
    spec = HFCheckpoint(path).spec
    default = Qwen2MoeConfig().shared_expert_intermediate_size
    assert (spec.shared_experts.count, spec.shared_experts.intermediate_size, spec.shared_experts.sigmoid_gate) == (1, default, True)


def test_deepseek_v3_scoring_other_than_sigmoid_is_refused(dsv3_dir: str, tmp_path) -> None:
    assert HFCheckpoint(_edit_config(dsv3_dir, tmp_path / "sig", scoring_func="sigmoid")).spec.routing.score_function == "sigmoid"
    path = _edit_config(dsv3_dir, tmp_path / "softmax", scoring_func="softmax")
    with pytest.raises(CheckpointError, match=r"deepseek_v3 routes with sigmoid scores .*scoring_func='softmax'"):
        LocalMoE.from_pretrained(path)


def test_quantized_checkpoint_is_refused(dsv3_dir: str, tmp_path) -> None:
    """fp8 weights read without their scales would give wrong numbers: refused, by config and by tensor dtype."""
    quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    path = _edit_config(dsv3_dir, tmp_path / "quant", quantization_config=quant)
    with pytest.raises(CheckpointError, match=r"quantized checkpoints are not supported .*quant_method='fp8'"):
        LocalMoE.from_pretrained(path)
    stored = _tensors(dsv3_dir)
    key = "model.layers.1.mlp.experts.2.gate_proj.weight"
    if key not in stored:  # saved fused
        key = "model.layers.1.mlp.experts.gate_up_proj"
    stored[key] = stored[key].to(torch.float8_e4m3fn)
    dst = tmp_path / "fp8"
    dst.mkdir()
    shutil.copy(os.path.join(dsv3_dir, "config.json"), dst / "config.json")
    save_file(stored, os.fspath(dst / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' is F8_E4M3; expected one of"):
        LocalMoE.from_pretrained(dst, dtype=torch.float32)


def test_missing_or_broken_files(qwen2_dir: str, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a directory"):
        HFCheckpoint(tmp_path / "nowhere")
    no_cfg = _copy(qwen2_dir, tmp_path / "nocfg")
    os.remove(os.path.join(no_cfg, "config.json"))
    with pytest.raises(CheckpointError, match="config.json is missing"):
        HFCheckpoint(no_cfg)
    bad_json = _copy(qwen2_dir, tmp_path / "badjson")
    with open(os.path.join(bad_json, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        HFCheckpoint(bad_json)
    no_weights = _copy(qwen2_dir, tmp_path / "noweights")
    os.remove(os.path.join(no_weights, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors, model\.safetensors\.index\.json or \*\.safetensors file"):
        HFCheckpoint(no_weights)
    corrupt = _copy(qwen2_dir, tmp_path / "corrupt")
    with open(os.path.join(corrupt, "model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(CheckpointError, match=r"cannot read model\.safetensors"):
        HFCheckpoint(corrupt)


def test_index_naming_a_missing_shard(tmp_path) -> None:
    model = hf.randomise_moe(hf.olmoe(), seed=4)
    path = hf.save(model, tmp_path / "sharded", max_shard_size="10KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointError, match=f"shard {shard} named in model.safetensors.index.json is missing"):
        HFCheckpoint(path)
