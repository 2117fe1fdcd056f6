"""Generate the Python gRPC code of proto/moe/v1/*.proto into the importable package `moe.v1`.

    python scripts/gen_proto.py [--out DIR]

The output (moe/v1/*_pb2.py, *_pb2_grpc.py, *_pb2.pyi) is committed; a test regenerates
into a temporary directory and diffs. Imports come out right because the proto path
(moe/v1/...) is the package path: no post-processing.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    sources = sorted(PROTO_ROOT.rglob("*.proto"))
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}"]
    args += [str(s.relative_to(PROTO_ROOT)) for s in sources]
    cwd = pathlib.Path.cwd()
    try:
        import os

        os.chdir(PROTO_ROOT)
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit status {rc}")
    packages = {s.relative_to(PROTO_ROOT).parent for s in sources}
    for pkg in packages:
        for part in range(1, len(pkg.parts) + 1):
            init = out / pathlib.Path(*pkg.parts[:part]) / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated from proto/ by scripts/gen_proto.py; do not edit."""\n')
    return sorted(p for p in out.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=ROOT, help="output root (default: the repository root)")
    args = ap.parse_args()
    for path in generate(args.out.resolve()):
        if path.suffix in (".py", ".pyi") and "moe" in path.parts:
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
