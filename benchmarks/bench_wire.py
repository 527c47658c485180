"""Round-trip time of a structure client -> server -> client over loopback gRPC.

The request carries the structure (positions, numbers, cell, pbc, velocities);
the reply carries energy, forces (n, 3) and stress — the Oracle service's Label
RPC answered from its content-hash cache, so no physics is timed, only the
wire: client encode, HTTP/2 on 127.0.0.1, server decode + hash + cache lookup,
server encode, client decode.

Usage:  python benchmarks/bench_wire.py [--repeats 200] [--sizes 32,1000,10000]
Prints medians (and 10th/90th percentiles) in milliseconds.  Goal (issue 2):
10,000 atoms round-trip in <= 5 ms.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from ase.build import bulk  # noqa: E402

from oracle_service.client import OracleClient  # noqa: E402
from oracle_service.server import OracleServiceConfig, start_oracle_server  # noqa: E402
from protos import wire  # noqa: E402
from protos.epicycle.v1 import common_pb2  # noqa: E402


def structure(n_target: int):
    unit = bulk("Cu", "fcc", a=3.61, cubic=True)
    reps = max(1, round((n_target / 4) ** (1 / 3)))
    atoms = unit.repeat((reps, reps, max(1, round(n_target / (4 * reps * reps)))))
    atoms.rattle(0.02, seed=0)
    atoms.set_velocities(np.random.default_rng(0).normal(scale=0.01, size=(len(atoms), 3)))
    return atoms


def percentiles(xs):
    q = np.percentile(xs, [10, 50, 90])
    return q[0] * 1e3, q[1] * 1e3, q[2] * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--sizes", default="32,1000,10000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    print(f"{'atoms':>7} {'request kB':>10} {'reply kB':>9} {'codec ms':>9} "
          f"{'round trip ms (p10 / median / p90)':>36}")
    with start_oracle_server(OracleServiceConfig(max_atoms=200_000)) as running:
        with OracleClient(running.address, timeout=600) as client:
            for n in sizes:
                atoms = structure(n)
                first = client.label(atoms)  # computes and caches (EMT), not timed
                for _ in range(10):  # warm-up: connection, allocator
                    client.label(atoms)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    result = client.label(atoms)
                    times.append(time.perf_counter() - t0)
                    assert result.cached
                req = wire.structure_to_proto(atoms).ByteSize()
                reply = wire.labels_to_proto(first.labels.energy, first.labels.forces,
                                             first.labels.stress).ByteSize()
                codec = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    data = wire.structure_to_proto(atoms).SerializeToString()
                    wire.structure_from_proto(common_pb2.Structure.FromString(data))
                    codec.append(time.perf_counter() - t0)
                p10, p50, p90 = percentiles(times)
                print(f"{len(atoms):>7} {req / 1e3:>10.1f} {reply / 1e3:>9.1f} {statistics.median(codec) * 1e3:>9.3f} "
                      f"{p10:>14.3f} / {p50:.3f} / {p90:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
