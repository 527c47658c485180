"""The committed generated gRPC code must equal a fresh generation from the .proto files."""

from __future__ import annotations

from pathlib import Path

from protos.generate import PROTO_DIR, ROOT, generate, proto_files


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh = {p.name: p.read_bytes() for p in generate(tmp_path)}
    committed = {p.name: p.read_bytes() for p in PROTO_DIR.glob("*_pb2*.py*")}
    assert fresh, "protoc produced no files"
    missing = sorted(set(fresh) - set(committed))
    extra = sorted(set(committed) - set(fresh))
    stale = sorted(name for name in fresh.keys() & committed.keys() if fresh[name] != committed[name])
    hint = "run `make protos` (python -m protos.generate) and commit the result"
    assert not missing, f"generated files not committed: {missing}; {hint}"
    assert not extra, f"generated files without a .proto source: {extra}; {hint}"
    assert not stale, f"stale generated files: {stale}; {hint}"


def test_every_proto_declares_the_versioned_package() -> None:
    for path in proto_files():
        text = path.read_text()
        assert "package epicycle.v1;" in text, path
        assert 'syntax = "proto3";' in text, path
    assert (ROOT / "protos" / "epicycle" / "v1" / "common.proto") in proto_files()
