"""Generate the Python gRPC code from the .proto files — the only way it is made.

    python -m protos.generate            # write next to the .proto files
    python -m protos.generate --out DIR  # write into DIR (used by the staleness test)

The generated ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` files are
committed so that ``pip install`` needs no build step; never edit them by hand.
``tests/test_protos_generated.py`` regenerates them and fails if the committed
copies differ.  grpcio-tools is pinned exactly in pyproject.toml because its
version is part of the output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: repository root: imports in the .proto files are relative to it
ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "epicycle" / "v1"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto file, writing the Python modules under ``out_dir``."""
    import importlib.resources

    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    files = [str(p.relative_to(ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}: {' '.join(args)}")
    return sorted((out_dir / "protos" / "epicycle" / "v1").glob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    written = generate(args.out)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
