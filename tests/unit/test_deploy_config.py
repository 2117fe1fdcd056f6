"""The deployment config (cluster.config.load_config): dict and YAML agree; every bad field is named."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from cluster.config import DeploymentSettings, ModelConfig, ServiceConfig, load_config
from expert_workers.errors import ConfigError
from expert_workers.source import SourceSpec
from expert_workers.spec import MoESpec, RoutingSpec, SharedExpertSpec

pytestmark = pytest.mark.unit

RANDOM = {
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_experts": 6,
    "num_layers": 2,
    "moe_layers": [0, 1],
    "routing": {"policy": "softmax_topk", "top_k": 2, "normalize_topk": False},
    "shared_experts": {"count": 1, "intermediate_size": 12},
}
FULL = {
    "model": {"random": RANDOM, "seed": 7, "dtype": "bfloat16"},
    "routing": {"top_k": 3, "capacity_factor": 1.5, "overflow": "drop"},
    "deployment": {
        "name": "moe-test_1",
        "expert_groups": 3,
        "routers": 2,
        "transport": "grpc",
        "batch_max_tokens": 256,
        "batch_max_wait_us": 0,
        "device": "cpu",
        "shared_experts": "slot",
        "group_cpus": 0.5,
        "group_gpus": 0,
        "router_cpus": 2,
        "grpc_host": "0.0.0.0",
    },
}
# the same configuration written by hand, not produced by yaml.dump of FULL
FULL_YAML = """\
# a test deployment
model:
  seed: 7
  dtype: bfloat16
  random:
    hidden_size: 16
    intermediate_size: 24
    num_experts: 6
    num_layers: 2
    moe_layers: [0, 1]
    routing: {policy: softmax_topk, top_k: 2, normalize_topk: false}
    shared_experts:
      count: 1
      intermediate_size: 12
routing:
  top_k: 3
  capacity_factor: 1.5
  overflow: drop
deployment:
  name: moe-test_1
  expert_groups: 3
  routers: 2
  transport: grpc
  batch_max_tokens: 256
  batch_max_wait_us: 0
  device: cpu
  shared_experts: slot
  group_cpus: 0.5
  group_gpus: 0
  router_cpus: 2
  grpc_host: 0.0.0.0
"""
EXPECTED_SPEC = MoESpec(
    hidden_size=16, intermediate_size=24, num_experts=6, num_layers=2, moe_layers=(0, 1),
    routing=RoutingSpec(policy="softmax_topk", top_k=2, normalize_topk=False),
    shared_experts=SharedExpertSpec(count=1, intermediate_size=12),
)


def with_(base: dict[str, Any], section: str, **values: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out.setdefault(section, {}).update(values)
    return out


MINIMAL = {"model": {"random": RANDOM}}


def test_dict_gives_the_expected_config() -> None:
    cfg = load_config(FULL)
    assert cfg.model == ModelConfig(random=EXPECTED_SPEC, seed=7, dtype="bfloat16")
    assert cfg.routing == {"top_k": 3, "capacity_factor": 1.5, "overflow": "drop"}
    d = cfg.deployment
    assert (d.name, d.expert_groups, d.routers, d.transport) == ("moe-test_1", 3, 2, "grpc")
    assert (d.batch_max_tokens, d.batch_max_wait_us, d.device, d.shared_experts) == (256, 0, "cpu", "slot")
    assert (d.group_cpus, d.group_gpus, d.router_cpus, d.grpc_host) == (0.5, 0, 2, "0.0.0.0")


def test_yaml_file_and_dict_give_the_same_config(tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(FULL_YAML, encoding="utf-8")
    from_file = load_config(path)
    assert from_file == load_config(FULL)
    assert load_config(str(path)) == from_file
    assert isinstance(from_file, ServiceConfig)


def test_a_service_config_passes_through() -> None:
    cfg = load_config(FULL)
    assert load_config(cfg) is cfg


def test_defaults() -> None:
    cfg = load_config(MINIMAL)
    assert cfg.model.seed == 0 and cfg.model.dtype == "float32" and cfg.model.path is None
    assert cfg.routing == {}
    d = cfg.deployment
    assert (d.name, d.expert_groups, d.routers, d.transport, d.device, d.shared_experts) == ("moe", 2, 1, "auto", "auto", "router")
    assert (d.batch_max_tokens, d.batch_max_wait_us, d.grpc_host, d.huge_pages) == (4096, 500, "127.0.0.1", True)
    assert d.compute_timeout_s == 60.0
    assert load_config(with_(MINIMAL, "deployment", compute_timeout_s=None)).deployment.compute_timeout_s is None
    # empty sections are the defaults too
    assert load_config({"model": {"random": RANDOM}, "routing": None, "deployment": None}) == cfg


def test_model_source() -> None:
    assert load_config(FULL).model.source() == SourceSpec(random=EXPECTED_SPEC, seed=7)


def test_model_path_that_exists(tmp_path: Path) -> None:
    cfg = load_config({"model": {"path": str(tmp_path)}})
    assert cfg.model.path == str(tmp_path) and cfg.model.random is None
    assert cfg.model.source() == SourceSpec(path=str(tmp_path), seed=0)


# -- routing overrides ------------------------------------------------------------------


def test_routing_overrides_merge_into_the_model_routing_spec() -> None:
    cfg = load_config(FULL)
    merged = cfg.routing_spec(cfg.model.random.routing)
    # policy and normalize_topk from the model, the rest from the overrides, defaults elsewhere
    assert merged == RoutingSpec(policy="softmax_topk", top_k=3, normalize_topk=False, capacity_factor=1.5, overflow="drop")
    assert merged.routed_scaling_factor == 1.0


def test_no_routing_overrides_give_none() -> None:
    cfg = load_config(MINIMAL)
    assert cfg.routing_spec(cfg.model.random.routing) is None


# -- errors ---------------------------------------------------------------------------


def bad(cfg: Any, field: str, *more: str) -> ConfigError:
    with pytest.raises(ConfigError, match=re.escape(f"config field '{field}'")) as info:
        load_config(cfg)
    assert info.value.field == field
    for text in more:
        assert text in str(info.value)
    return info.value


def test_unknown_top_level_section() -> None:
    err = bad({**MINIMAL, "deploy": {"expert_groups": 2}}, "deploy", "one of the sections")
    assert "'deployment'" in str(err) and err.value == {"expert_groups": 2}


def test_unknown_key_in_deployment() -> None:
    bad(with_(MINIMAL, "deployment", gpus_per_group=1), "deployment.gpus_per_group", "no such field")


def test_unknown_key_in_model() -> None:
    bad(with_(MINIMAL, "model", weights="x"), "model.weights", "no such field")


def test_unknown_key_in_the_random_spec() -> None:
    bad({"model": {"random": {**RANDOM, "hiden_size": 8}}}, "hiden_size", "no such field")


def test_both_path_and_random(tmp_path: Path) -> None:
    bad({"model": {"path": str(tmp_path), "random": RANDOM}}, "model", "exactly one of 'path'")


@pytest.mark.parametrize("cfg", [{"model": {}}, {"model": {"seed": 3}}, {"deployment": {"expert_groups": 2}}, {}], ids=repr)
def test_neither_path_nor_random(cfg: dict[str, Any]) -> None:
    bad(cfg, "model", "exactly one of 'path'")


def test_path_that_does_not_exist(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-checkpoint")
    err = bad({"model": {"path": missing}}, "model.path", "an existing checkpoint directory")
    assert err.value == missing


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("expert_groups", 0, "an integer >= 1"),
        ("expert_groups", True, "an integer >= 1"),
        ("routers", 1.5, "an integer >= 1"),
        ("transport", "carrier-pigeon", "one of ("),
        ("device", "tpu", "one of ("),
        ("batch_max_wait_us", -1, "an integer >= 0"),
        ("batch_max_tokens", 0, "an integer >= 1"),
        ("shared_experts", "nowhere", "one of ("),
        ("name", "has space", "letters, digits"),
        ("group_cpus", -1, "a finite number >= 0"),
        ("group_cpus", float("inf"), "a finite number >= 0"),
        ("huge_pages", "yes", "a bool"),
        ("huge_pages", 1, "a bool"),
        ("replica_min_rows", 0, "an integer >= 1 (or unset)"),
        ("replica_min_rows", 2.5, "an integer >= 1 (or unset)"),
        ("replica_min_rows", True, "an integer >= 1 (or unset)"),
        ("compute_timeout_s", 0, "a finite number of seconds > 0"),
        ("compute_timeout_s", -1.5, "a finite number of seconds > 0"),
        ("compute_timeout_s", "30", "a finite number of seconds > 0"),
        ("compute_timeout_s", True, "a finite number of seconds > 0"),
        ("compute_timeout_s", float("inf"), "a finite number of seconds > 0"),
    ],
)
def test_bad_deployment_values(key: str, value: Any, expected: str) -> None:
    err = bad(with_(MINIMAL, "deployment", **{key: value}), f"deployment.{key}", expected)
    assert err.value == value
    assert f"config field 'deployment.{key}' = {value!r}" in str(err)


@pytest.mark.parametrize(
    "key, value, expected",
    [("dtype", "float64", "one of ("), ("seed", "7", "an integer"), ("seed", False, "an integer")],
)
def test_bad_model_values(key: str, value: Any, expected: str) -> None:
    bad(with_(MINIMAL, "model", **{key: value}), f"model.{key}", expected)


def test_bad_routing_override_key() -> None:
    bad({**MINIMAL, "routing": {"topk": 2}}, "routing.topk", "no such field")


@pytest.mark.parametrize(
    "override, field",
    [
        ({"policy": "coin_flip"}, "routing.policy"),
        ({"top_k": 7}, "routing.top_k"),  # more than the model's 6 experts
        ({"overflow": "drop"}, "routing.capacity_factor"),  # drop needs a capacity
    ],
    ids=repr,
)
def test_bad_routing_override_value(override: dict[str, Any], field: str) -> None:
    bad({**MINIMAL, "routing": override}, field)


@pytest.mark.parametrize("section", ["model", "routing", "deployment"])
def test_section_that_is_not_a_mapping(section: str) -> None:
    cfg = copy.deepcopy(MINIMAL)
    cfg[section] = [1, 2]
    bad(cfg, section, "a mapping")


def test_config_that_is_not_a_mapping() -> None:
    bad([MINIMAL], "config", "a mapping with 'model'")


def test_model_random_that_is_not_a_mapping() -> None:
    """BUG (cluster/config.py, load_config / ModelConfig): `model.random` is only parsed
    when it is a mapping and ModelConfig never checks its type, so `{"random": 5}` (or a
    string) loads into a ServiceConfig whose model.random is 5, failing much later in deploy.
    """
    for value in (5, "tiny", [1, 2]):
        with pytest.raises(ConfigError, match=re.escape("config field 'model")):
            load_config({"model": {"random": value}})


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  random: [unclosed\n  seed: 1\n", encoding="utf-8")
    err = bad(path, "config", "valid YAML")
    assert err.value == str(path)


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- routing\n", encoding="utf-8")
    bad(path, "config", "a mapping with 'model'")


def test_empty_yaml_file_has_no_model(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n", encoding="utf-8")
    bad(path, "model", "exactly one of 'path'")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    err = bad(path, "config", "an existing YAML file")
    assert err.value == str(path)
    bad(str(path), "config", "an existing YAML file")


def test_directory_instead_of_a_file(tmp_path: Path) -> None:
    """BUG (cluster/config.py, load_config): only FileNotFoundError and YAMLError are turned into
    ConfigError; a directory path raises a bare IsADirectoryError (and an unreadable file a
    PermissionError) instead of "config field 'config' ...".
    """
    with pytest.raises(ConfigError, match=re.escape("config field 'config'")):
        load_config(tmp_path)


def test_deployment_settings_direct() -> None:
    # the dataclass validates on its own, too (not only through load_config)
    with pytest.raises(ConfigError, match=re.escape("config field 'deployment.expert_groups' = 0")):
        DeploymentSettings(expert_groups=0)


# a period of 0 spins the supervisor's loop; inf overflows Event.wait / ray.get timeouts
PERIODS = ("supervisor_period_s", "rebalance_period_s", "load_window_s")
DELAYS = ("replica_down_delay_s", "scale_up_delay_s", "scale_down_delay_s", "place_timeout_s", "drain_timeout_s")


@pytest.mark.parametrize("key", PERIODS + DELAYS + ("hot_threshold", "target_group_tokens_per_s", "hot_replica_min_rate",
                                                     "router_cpus"))
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_times_and_rates_must_be_finite(key: str, value: float) -> None:
    err = bad(with_(MINIMAL, "deployment", **{key: value}), f"deployment.{key}", "a finite number")
    assert err.value == value or (value != value and err.value != err.value)


@pytest.mark.parametrize("key", PERIODS)
def test_periods_must_be_above_zero(key: str) -> None:
    bad(with_(MINIMAL, "deployment", **{key: 0}), f"deployment.{key}", "a finite number > 0")
    assert getattr(load_config(with_(MINIMAL, "deployment", **{key: 0.01})).deployment, key) == 0.01


@pytest.mark.parametrize("key", DELAYS)
def test_delays_may_be_zero(key: str) -> None:
    assert getattr(load_config(with_(MINIMAL, "deployment", **{key: 0})).deployment, key) == 0


@pytest.mark.parametrize("section, key", [("gateway", "port"), ("telemetry", "prometheus_port")])
def test_ports_of_the_last_router_must_exist(section: str, key: str) -> None:
    # router i serves port + i: 3 routers from 65534 would need 65536, which grpc / the metrics server bind as any free port
    cfg = with_(with_(MINIMAL, "deployment", routers=3), section, **{key: 65534})
    err = bad(cfg, f"{section}.{key}", "at most 65533 with deployment.routers=3")
    assert err.value == 65534
    assert getattr(getattr(load_config(with_(cfg, section, **{key: 65533})), section), key) == 65533
    assert getattr(getattr(load_config(with_(cfg, section, **{key: 0})), section), key) == 0  # any free port, per router


def test_disabled_gateway_port_is_not_checked_against_routers() -> None:
    cfg = load_config(with_(with_(MINIMAL, "deployment", routers=3), "gateway", enabled=False, port=65535))
    assert cfg.gateway.port == 65535


def test_queue_bound_below_the_request_limit() -> None:
    # requests between the two limits could never be admitted: refused as back-pressure however idle the router
    err = bad(with_(MINIMAL, "gateway", max_tokens_per_request=100, max_queued_tokens=99), "gateway.max_queued_tokens",
              "at least max_tokens_per_request=100")
    assert err.value == 99
    assert load_config(with_(MINIMAL, "gateway", max_tokens_per_request=100, max_queued_tokens=100)).gateway.max_queued_tokens == 100
