"""The committed moe/v1 code is what scripts/gen_proto.py generates from proto/ today."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date(tmp_path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "moe").rglob("*") if p.is_file() and p.suffix in (".py", ".pyi"))
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "moe").rglob("*") if p.is_file() and p.suffix in (".py", ".pyi"))
    assert generated == committed
    for rel in generated:
        assert (tmp_path / rel).read_text() == (ROOT / rel).read_text(), f"{rel} is stale: run python scripts/gen_proto.py"


def test_generated_package_imports_and_round_trips() -> None:
    from moe.v1 import expert_service_pb2 as pb

    req = pb.ForwardRequest(layer=3, hidden_states=pb.Tensor(dtype="float32", shape=[2, 4], data=b"\0" * 32), token_ids=[1, 2])
    back = pb.ForwardRequest.FromString(req.SerializeToString())
    assert back == req and list(back.hidden_states.shape) == [2, 4]
    assert pb.DESCRIPTOR.package == "moe.v1"
