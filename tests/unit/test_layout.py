"""The project's shape: imports run one way (cluster -> router_svc -> expert_workers); packaging is declared."""

from __future__ import annotations

import ast
import pathlib
import tomllib

import pytest

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[2]
# a package may import only the packages below it.
FORBIDDEN = {
    "expert_workers": {"router_svc", "cluster"},
    "router_svc": {"cluster"},
    "cluster": set(),
}


def _imported_top_levels(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    for path in files:
        bad = _imported_top_levels(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: imports must run cluster -> router_svc -> expert_workers"


def test_pyproject_declares_distribution_script_and_dependencies() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "moe-serve"
    assert project["scripts"]["moe-serve"] == "cluster.cli:main"
    deps = {d.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
    for needed in ("ray", "torch", "grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "msgpack",
                   "opentelemetry-sdk", "safetensors", "pyyaml"):
        assert needed in deps, needed
    assert any(d.startswith("ray[default]") for d in project["dependencies"])
    test_extra = {d.split(">")[0].split("=")[0] for d in project["optional-dependencies"]["test"]}
    assert {"pytest", "hypothesis", "transformers"} <= test_extra


def test_readme_opens_with_the_two_commands_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    blocks = [line for line in readme[:15] if line.startswith("    ") or line.startswith("$ ")]
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = ".venv/bin/python -m pytest"
    assert any("moe-serve demo" in line for line in blocks), "first command must set up and run the demo"
    assert any(line.strip() == test_cmd for line in blocks), "second command must run the tests"
    assert test_cmd in ci.splitlines()[-1], ".ci/run must end by running the README's test command"
