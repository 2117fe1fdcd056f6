"""ops/: the manifests parse, and agree with each other and with ops/deploy.yaml.

One image (the tag ops/Dockerfile builds) everywhere; the gateway ports (gateway.port + i) and the
routers' metrics ports (telemetry.prometheus_port + i) wherever a manifest names a port; GPU workers
sized for exactly one expert group; the Grafana dashboard's PromQL over exactly the metrics the
routers expose (METRICS below, to be cross-checked against router_svc/telemetry.py).
"""

from __future__ import annotations

import json
import pathlib
import re
import tomllib
from typing import Any, Iterator

import pytest
import yaml

from cluster.config import load_config
from expert_workers.errors import ConfigError

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
YAML_FILES = sorted([*OPS.rglob("*.yaml"), *OPS.rglob("*.yml")])
RAY_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001}

# Every series the routers expose, as Prometheus shows it, with its labels.
COUNTERS = {
    "moe_requests_total": {"router", "status"},
    "moe_tokens_total": {"router", "layer", "expert", "outcome"},
    "moe_tokens_dropped_total": {"router", "layer"},
    "moe_tokens_rerouted_total": {"router", "layer"},
    "moe_batches_total": {"router", "transport"},
    "moe_failovers_total": {"router"},
    "moe_scaling_events_total": {"router", "kind"},
}
HISTOGRAMS = {
    "moe_stage_seconds": {"router", "stage"},
    "moe_batch_requests": {"router"},
    "moe_batch_tokens": {"router"},
    "moe_recovery_seconds": {"router"},
}
GAUGES = {
    "moe_expert_replicas": {"router", "layer", "expert"},
    "moe_groups_alive": {"router"},
    "moe_groups": {"router"},
    "moe_routing_table_version": {"router"},
    "moe_layer_entropy": {"router", "layer"},
    "moe_layer_balance_loss": {"router", "layer"},
    "moe_layer_max_over_mean": {"router", "layer"},
}
METRICS = {**COUNTERS, **HISTOGRAMS, **GAUGES}
LABEL_VALUES = {"outcome": {"routed", "degraded"}, "stage": {"queue", "gate", "dispatch", "combine", "total"}}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _series_labels() -> dict[str, set[str]]:
    """Exposed series name -> its labels (a histogram's _bucket also has `le`)."""
    out = {**COUNTERS, **GAUGES}
    for name, labels in HISTOGRAMS.items():
        for suffix in HISTOGRAM_SUFFIXES:
            out[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def _base(series: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if series.endswith(suffix) and series[: -len(suffix)] in HISTOGRAMS:
            return series[: -len(suffix)]
    return series


# ---------------------------------------------------------------- loading


def _docs(path: pathlib.Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kind(path: pathlib.Path, kind: str) -> dict[str, Any]:
    found = [d for d in _docs(path) if isinstance(d, dict) and d.get("kind") == kind]
    assert len(found) == 1, f"{path.relative_to(ROOT)}: expected one {kind}, found {len(found)}"
    return found[0]


def _deploy() -> dict[str, Any]:
    return yaml.safe_load((OPS / "deploy.yaml").read_text())


def _raycluster() -> dict[str, Any]:
    return _kind(OPS / "kuberay" / "raycluster.yaml", "RayCluster")


def _head() -> dict[str, Any]:
    return _raycluster()["spec"]["headGroupSpec"]


def _head_container() -> dict[str, Any]:
    return _head()["template"]["spec"]["containers"][0]


def _gpu_group() -> dict[str, Any]:
    groups = [g for g in _raycluster()["spec"]["workerGroupSpecs"]
              if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})]
    assert len(groups) == 1, "expected one GPU worker group (limits nvidia.com/gpu)"
    return groups[0]


def _launcher() -> dict[str, Any]:
    return yaml.safe_load((OPS / "cluster-launcher.yaml").read_text())


def _ports() -> tuple[set[int], set[int]]:
    """(gateway ports, metrics ports) of ops/deploy.yaml: base + i for router i."""
    d = _deploy()
    routers = d["deployment"]["routers"]
    gateway = d["gateway"]["port"]
    metrics = d["telemetry"]["prometheus_port"]
    return {gateway + i for i in range(routers)}, {metrics + i for i in range(routers)}


def _pyproject_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _dockerfile() -> str:
    return (OPS / "Dockerfile").read_text()


def _built_image() -> str:
    tags = re.findall(r"docker build -f ops/Dockerfile -t (\S+) \.", _dockerfile())
    assert len(set(tags)) == 1, f"ops/Dockerfile should name the tag it builds once (docker build ... -t IMAGE .), found {tags}"
    return tags[0]


def _walk_images(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("image", "head_image", "worker_image") and isinstance(value, str):
                yield value
            else:
                yield from _walk_images(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_images(value)


def _flag(command: str, name: str) -> str:
    found = re.findall(rf"--{name}[= ](\S+)", command)
    assert len(found) == 1, f"expected one --{name} in {command!r}"
    return found[0]


# ---------------------------------------------------------------- every file


def test_ops_has_the_manifests() -> None:
    names = {p.relative_to(OPS).as_posix() for p in YAML_FILES}
    assert {"deploy.yaml", "cluster-launcher.yaml", "prometheus.yml", "kuberay/raycluster.yaml",
            "kuberay/deploy-job.yaml"} <= names
    assert (OPS / "Dockerfile").is_file() and (OPS / "grafana" / "moe-serve-dashboard.json").is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(OPS).as_posix())
def test_yaml_parses(path: pathlib.Path) -> None:
    docs = _docs(path)
    assert docs, f"{path.relative_to(ROOT)} is empty"
    assert all(isinstance(d, dict) for d in docs), f"{path.relative_to(ROOT)}: every document should be a mapping"


def test_operations_doc_names_every_ops_file() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    for path in sorted(OPS.rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if path.is_file() and path.name not in ("README.md", "Dockerfile.dockerignore"):
            assert rel in doc, f"docs/operations.md does not mention {rel}"


# ---------------------------------------------------------------- image


def test_dockerfile_builds_on_ray_cuda_and_names_the_package_version() -> None:
    text = _dockerfile()
    base = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert len(base) == 1 and re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-cu\d+", base[0]), base
    assert base[0].split(":")[1].split("-")[0] == _raycluster()["spec"]["rayVersion"] == "2.60.0"
    assert _built_image() == f"moe-serve:{_pyproject_version()}"
    assert f'org.opencontainers.image.version="{_pyproject_version()}"' in text
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert not users or users[-1] not in ("root", "0"), "the image must not run as root"


def test_every_manifest_runs_the_built_image() -> None:
    images = [(p.relative_to(ROOT).as_posix(), image) for p in YAML_FILES for d in _docs(p) for image in _walk_images(d)]
    files = {f for f, _ in images}
    assert {"ops/kuberay/raycluster.yaml", "ops/cluster-launcher.yaml"} <= files
    assert len([f for f, _ in images if f == "ops/kuberay/raycluster.yaml"]) >= 2, "head and GPU worker name their image"
    wrong = [(f, image) for f, image in images if image != _built_image()]
    assert not wrong, f"images other than {_built_image()} (the tag ops/Dockerfile builds): {wrong}"


# ---------------------------------------------------------------- ports


def test_dockerfile_exposes_the_gateway_and_metrics_ports() -> None:
    exposed = {int(p.split("/")[0]) for line in re.findall(r"^EXPOSE\s+(.+)$", _dockerfile(), flags=re.M) for p in line.split()}
    d = _deploy()
    assert {d["gateway"]["port"], d["telemetry"]["prometheus_port"]} <= exposed
    assert (d["gateway"]["port"], d["telemetry"]["prometheus_port"]) == (50051, 9464)


def test_raycluster_head_exposes_ray_gateway_and_metrics_ports() -> None:
    gateway, metrics = _ports()
    ports = {p["name"]: p["containerPort"] for p in _head_container()["ports"]}
    assert set(RAY_PORTS.values()) <= set(ports.values())
    assert {ports[n] for n in ports if re.fullmatch(r"gateway-\d+", n)} == gateway
    assert {ports[n] for n in ports if re.fullmatch(r"moe-metrics-\d+", n)} == metrics
    for name, port in ports.items():
        if m := re.fullmatch(r"(gateway|moe-metrics)-(\d+)", name):
            base = min(gateway) if m[1] == "gateway" else min(metrics)
            assert port == base + int(m[2]), f"{name} should be {base} + {m[2]}"


def test_gateway_service_selects_the_head_and_maps_every_router_port() -> None:
    service = _kind(OPS / "kuberay" / "raycluster.yaml", "Service")
    assert service["spec"]["selector"] == {"ray.io/cluster": _raycluster()["metadata"]["name"], "ray.io/node-type": "head"}
    gateway, metrics = _ports()
    container = {p["name"]: p["containerPort"] for p in _head_container()["ports"]}
    mapped = {}
    for p in service["spec"]["ports"]:
        target = p.get("targetPort", p["port"])
        mapped[p["port"]] = container[target] if isinstance(target, str) else target
    assert set(mapped) == gateway | metrics
    assert all(port == target for port, target in mapped.items()), mapped


def test_prometheus_scrapes_the_metrics_ports() -> None:
    config = yaml.safe_load((OPS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    _, metrics = _ports()
    static = [t for s in jobs["moe-serve"]["static_configs"] for t in s["targets"]]
    assert {int(t.rsplit(":", 1)[1]) for t in static} == metrics
    k8s = [j for j in jobs.values() if any(r.get("source_labels") == ["__meta_kubernetes_pod_container_port_name"]
                                          for r in j.get("relabel_configs", [])) and "moe" in j["job_name"]]
    assert len(k8s) == 1, "one kubernetes_sd job for the routers' metrics ports"
    keep = {r["source_labels"][0]: r["regex"] for r in k8s[0]["relabel_configs"] if r.get("action") == "keep"}
    assert re.fullmatch(keep["__meta_kubernetes_pod_label_ray_io_cluster"], _raycluster()["metadata"]["name"])
    names = [p for p in _head_container()["ports"] if re.fullmatch(keep["__meta_kubernetes_pod_container_port_name"], p["name"])]
    assert {p["containerPort"] for p in names} == metrics


def test_launcher_opens_the_gateway_and_metrics_ports() -> None:
    gateway, metrics = _ports()
    rules = _launcher()["provider"]["security_group"]["IpPermissions"]
    for port in gateway | metrics:
        assert any(r["FromPort"] <= port <= r["ToPort"] for r in rules), f"port {port} not opened in the security group"


# ---------------------------------------------------------------- resources


def test_gpu_worker_group_holds_one_expert_group() -> None:
    d = _deploy()["deployment"]
    group = _gpu_group()
    resources = group["template"]["spec"]["containers"][0]["resources"]
    gpus = int(resources["limits"]["nvidia.com/gpu"])
    assert gpus == int(group["rayStartParams"]["num-gpus"]) == d["group_gpus"] == 1
    assert int(resources.get("requests", {}).get("nvidia.com/gpu", gpus)) == gpus
    assert float(group["rayStartParams"]["num-cpus"]) == d["group_cpus"], "a worker advertises exactly one group's CPUs"
    assert float(resources["limits"]["cpu"]) >= d["group_cpus"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (d["expert_groups"], d["min_groups"], d["max_groups"])


def test_head_hosts_the_routers_and_no_expert_group() -> None:
    d = _deploy()["deployment"]
    head = _head()
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in _head_container()["resources"].get("limits", {})
    assert float(head["rayStartParams"]["num-cpus"]) >= d["routers"] * d["router_cpus"]
    assert float(_head_container()["resources"]["limits"]["cpu"]) >= float(head["rayStartParams"]["num-cpus"])
    assert _raycluster()["spec"]["enableInTreeAutoscaling"] is True


def test_launcher_node_types_match_the_deployment() -> None:
    d = _deploy()["deployment"]
    launcher = _launcher()
    types = launcher["available_node_types"]
    head, workers = types[launcher["head_node_type"]], [t for n, t in types.items() if n != launcher["head_node_type"]]
    assert len(workers) == 1
    worker = workers[0]
    assert worker["resources"] == {"CPU": d["group_cpus"], "GPU": d["group_gpus"]}
    assert (worker["min_workers"], worker["max_workers"]) == (d["expert_groups"], d["max_groups"])
    assert launcher["max_workers"] >= worker["max_workers"]
    assert head["resources"]["GPU"] == 0 and head["resources"]["CPU"] >= d["routers"] * d["router_cpus"]
    start_head = " ".join(launcher["head_start_ray_commands"])
    start_worker = " ".join(launcher["worker_start_ray_commands"])
    assert (int(_flag(start_head, "num-cpus")), int(_flag(start_head, "num-gpus"))) == (head["resources"]["CPU"], 0)
    assert (int(_flag(start_worker, "num-cpus")), int(_flag(start_worker, "num-gpus"))) == (worker["resources"]["CPU"], worker["resources"]["GPU"])
    assert "./ops/deploy.yaml" in launcher["file_mounts"].values()


def test_launcher_config_fits_rays_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_launcher(), schema)


def test_deploy_job_runs_up_on_the_raycluster_with_the_mounted_config() -> None:
    job = _kind(OPS / "kuberay" / "deploy-job.yaml", "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": _raycluster()["metadata"]["name"]}
    entry = job["spec"]["entrypoint"]
    assert entry.startswith("moe-serve up --config ")
    config_path = _flag(entry, "config")
    volumes = {v["name"]: v for v in _head()["template"]["spec"]["volumes"]}
    mounts = [m for m in _head_container()["volumeMounts"] if "configMap" in volumes[m["name"]]]
    assert any(config_path == f"{m['mountPath']}/deploy.yaml" for m in mounts), f"{config_path} is not on a mounted ConfigMap"
    env = {e["name"]: e for e in _head_container()["env"]}
    assert "secretKeyRef" in env["MOE_SERVE_TOKEN"]["valueFrom"], "the gateway token comes from a Secret"


# ---------------------------------------------------------------- deploy.yaml


def test_deploy_yaml_is_set_up_for_a_cluster() -> None:
    d = _deploy()
    assert d["deployment"]["device"] == "cuda"
    assert d["gateway"]["host"] == "0.0.0.0" and d["telemetry"]["prometheus_host"] == "0.0.0.0"
    assert d["gateway"]["port"] > 0 and d["telemetry"]["prometheus_port"] > 0, "0 is any free port: manifests cannot name it"
    assert "token" not in (d.get("auth") or {}), "the token comes from MOE_SERVE_TOKEN, not the file"
    assert d["deployment"]["transport"] != "grpc", "grpc_host is one address for every group (docs/deploy.md section 7)"


def _load_deploy_yaml(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, data: dict[str, Any]) -> Any:
    # NOTE: model.path must exist where the config is read; the cluster's is a mounted volume.
    data["model"]["path"] = str(tmp_path)
    monkeypatch.setenv("MOE_SERVE_TOKEN", "x" * 32)
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_deploy_yaml_loads_without_telemetry(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _deploy()
    data.pop("telemetry")
    cfg = _load_deploy_yaml(tmp_path, monkeypatch, data)
    assert cfg.deployment.device == "cuda" and cfg.auth.token == "x" * 32
    assert cfg.deployment.group_range == (data["deployment"]["min_groups"], data["deployment"]["max_groups"])


def test_deploy_yaml_loads(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        cfg = _load_deploy_yaml(tmp_path, monkeypatch, _deploy())
    except ConfigError as e:
        if e.field == "telemetry":
            pytest.xfail("load_config does not know the telemetry section yet")
        raise
    assert cfg.telemetry.prometheus_host == "0.0.0.0"
    assert cfg.telemetry.prometheus_port == min(_ports()[1])


# ---------------------------------------------------------------- Grafana


def _dashboard() -> dict[str, Any]:
    return json.loads((OPS / "grafana" / "moe-serve-dashboard.json").read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _exprs() -> list[str]:
    dash = _dashboard()
    exprs = [t["expr"] for p in _panels(dash) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if var["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_dashboard_is_importable() -> None:
    dash = _dashboard()
    assert dash["uid"] == "moe-serve" and dash["title"]
    ids = [p["id"] for p in _panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in _panels(dash):
        if p["type"] != "row":
            assert p.get("targets") and all(t["expr"].strip() for t in p["targets"]), p["title"]
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    for expr in _exprs():
        for var in re.findall(r"\$(\w+)", expr):
            assert var.startswith("__") or var in variables, f"${var} is not a dashboard variable: {expr}"


def test_dashboard_uses_exactly_the_exposed_metrics() -> None:
    series = _series_labels()
    used = {name for expr in _exprs() for name in re.findall(r"\bmoe_[a-z_]+\b", expr)}
    unknown = used - set(series)
    assert not unknown, f"the dashboard queries series no router exposes: {sorted(unknown)}"
    unused = set(METRICS) - {_base(n) for n in used}
    assert not unused, f"metrics no panel shows: {sorted(unused)}"


def test_dashboard_queries_only_labels_the_metrics_have() -> None:
    series = _series_labels()
    for expr in _exprs():
        names = re.findall(r"\bmoe_[a-z_]+\b", expr)
        for name, selector in re.findall(r"\b(moe_[a-z_]+)\{([^}]*)\}", expr):
            for label, value in re.findall(r'(\w+)\s*(?:=~|!~|!=|=)\s*"([^"]*)"', selector):
                assert label in series[name], f"{name} has no label {label}: {expr}"
                if label in LABEL_VALUES and "$" not in value:
                    assert value in LABEL_VALUES[label], f"{label}={value!r} is never exposed: {expr}"
        grouped = set().union(*(series[n] for n in names)) if names else set()
        for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in (x.strip() for x in clause.split(",") if x.strip()):
                assert label in grouped, f"no metric in {expr!r} has the label {label}"
        # counters and histogram series only make sense as rates or increases.
        for name in names:
            if name in COUNTERS or _base(name) != name:
                assert re.search(rf"\b(?:rate|increase|irate)\(\s*{name}\b", expr) or "label_values" in expr, \
                    f"{name} used without rate()/increase(): {expr}"

