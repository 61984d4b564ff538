"""Where SparseLinear should switch from the packed product to unpack + dense GEMM (its DENSE_FROM).

Run (about a minute on 2 cores):
    OMP_WAIT_POLICY=PASSIVE python benchmarks/prefill_switch.py

SmolLM2's MLP shapes at 70% unstructured zeros (normal weights, random mask, seed 0), fp32 values,
1 thread: for 1-128 input rows, the median of 15 calls of the packed product (``sparse_matmul``), of
unpacking the weight natively then ``F.linear`` (what SparseLinear does from DENSE_FROM rows on), and
of dense ``F.linear`` on the original weight.  Writes benchmarks/results/prefill_switch.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import environment, write_json
from losa_cli.runtime.kernels.native import available_paths, dense_weight, sparse_matmul
from losa_cli.runtime.kernels.packed import pack
from losa_cli.runtime.kernels.sparse_linear import DENSE_FROM

RESULTS = Path(__file__).parent / "results" / "prefill_switch.json"
SHAPES = {"SmolLM2 MLP up (1536 x 576)": (1536, 576), "SmolLM2 MLP down (576 x 1536)": (576, 1536)}


def median_us(run, repeats: int = 15) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = available_paths()[0]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features, generator=generator)
        weight[torch.rand(out_features, in_features, generator=generator) < 0.7] = 0
        packed = pack(weight)
        for tokens in (1, 2, 4, 8, 16, 32, 128):
            x = torch.randn(tokens, in_features, generator=generator)
            packed_us = median_us(lambda x=x, packed=packed: sparse_matmul(x, packed, path))
            unpacked_us = median_us(lambda x=x, packed=packed: F.linear(x, dense_weight(packed, path)))
            dense_us = median_us(lambda x=x, weight=weight: F.linear(x, weight))
            rows.append({"shape": name, "rows": tokens, "packed_us": packed_us, "unpack_gemm_us": unpacked_us,
                         "dense_us": dense_us, "packed_over_unpack": packed_us / unpacked_us})
    command = f"python benchmarks/prefill_switch.py --threads {args.threads}"
    write_json(
        RESULTS,
        {"command": command, "path": path, "dense_from": DENSE_FROM, "rows": rows, "environment": environment()},
    )
    print(f"{environment()['machine']['cpu']}, {args.threads} thread(s), path {path}; {command}")
    print("| layer | input rows | packed µs | unpack + GEMM µs | dense F.linear µs | packed / unpack |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['rows']} | {r['packed_us']:.0f} | {r['unpack_gemm_us']:.0f} | {r['dense_us']:.0f} | "
            f"{r['packed_over_unpack']:.2f} |"
        )


if __name__ == "__main__":
    main()
