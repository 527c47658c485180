"""``epicycle label IN.xyz --oracle HOST:PORT --out OUT.xyz``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from protos.errors import EpicycleError, InvalidInput


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("label", help="label the structures of an (extended) XYZ file through an Oracle service",
                       description="Send every structure of IN to the Oracle service and write the labelled "
                       "structures (energy eV, forces eV/Å, stress eV/Å³) as extended XYZ. Each frame is "
                       "written as soon as it is labelled; a frame the oracle rejects is reported and skipped.\n\n"
                       "example (with `epicycle serve oracle --backend emt` running):\n"
                       "  epicycle label examples/cu_rattled.xyz --oracle 127.0.0.1:50051 --out cu_labelled.xyz")
    p.add_argument("input", type=Path, help="structures to label (any format ASE reads; all frames)")
    p.add_argument("--oracle", required=True, metavar="HOST:PORT", help="address of the Oracle service")
    p.add_argument("--out", required=True, type=Path, help="output extended XYZ file")
    p.add_argument("--properties", default="", help="comma-separated subset of energy,forces,stress (default: all the backend implements)")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline of each label call, seconds (default 600)")
    p.add_argument("--wait", type=float, default=10.0, help="wait up to this many seconds for the oracle to be SERVING (default 10)")
    p.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) to verify the server; enables TLS")
    p.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", type=Path, help="client key (PEM) for mutual TLS")
    p.set_defaults(func=run_label)


def run_label(args: argparse.Namespace) -> int:
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    from oracle_service.client import OracleClient
    from protos.client import ClientTLS

    if not args.input.is_file():
        raise InvalidInput(f"input file not found: {args.input}")
    try:
        frames = ase.io.read(args.input, index=":")
    except Exception as exc:  # noqa: BLE001 - ASE raises many kinds
        raise InvalidInput(f"cannot read structures from {args.input}: {exc}") from None
    if not frames:
        raise InvalidInput(f"{args.input} contains no structures")
    props = tuple(p.strip() for p in args.properties.split(",") if p.strip())
    tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    written = 0
    started = time.perf_counter()
    with OracleClient(args.oracle, tls=tls, timeout=args.timeout) as client:
        client.wait_ready(args.wait)
        info = client.describe()
        print(f"oracle {args.oracle}: backend {info.backend} ({info.version}), "
              f"{len(frames)} structure(s) from {args.input}", flush=True)
        with open(args.out, "w") as handle:
            for i, atoms in enumerate(frames):
                try:
                    result = client.label(atoms, props)
                except EpicycleError as exc:
                    failures.append(f"frame {i}: {exc}")
                    print(f"[{i + 1}/{len(frames)}] FAILED: {exc}", file=sys.stderr, flush=True)
                    continue
                lab = result.labels
                atoms.calc = SinglePointCalculator(atoms, energy=lab.energy, forces=lab.forces, stress=lab.stress)
                atoms.info["oracle_backend"] = result.backend
                atoms.info["structure_hash"] = result.structure_hash
                ase.io.write(handle, atoms, format="extxyz")
                handle.flush()
                written += 1
                fmax = float(np.linalg.norm(lab.forces, axis=1).max()) if lab.forces is not None else float("nan")
                energy = f"E = {lab.energy:.6f} eV" if lab.energy is not None else "E = -"
                how = "cached" if result.cached else f"{result.compute_seconds:.3f} s"
                print(f"[{i + 1}/{len(frames)}] {len(atoms)} atoms  {energy}  max|F| = {fmax:.4f} eV/Å  ({how})",
                      flush=True)
    print(f"wrote {written} labelled structure(s) to {args.out} in {time.perf_counter() - started:.2f} s", flush=True)
    if failures:
        print(f"{len(failures)} structure(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0
