"""Speed of losa's sparse kernel: batch-1 matrix-vector products against dense F.linear and the ceiling.

For each shape, sparsity (0/50/70/90%), value format (fp32, bf16, int8 + bitmask) and kernel path
(``avx2``, ``generic``), one "step" multiplies a vector by K distinct copies of the layer, K
chosen so the step reads more than the CPU's caches (``--step-mb``, default 512 MB of dense fp32),
as a decode step reads every layer once.  Reported per layer: median time, GB/s read (the format's
bytes: mask, values, offsets, scales), effective GFLOP/s (2 x rows x cols / time), the share of the
bandwidth ceiling (bytes / measured read bandwidth over time), and the speed-up over dense fp32
``F.linear`` on the same shape in the same run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/kernel_speed.py --threads 1

Budget: about 5 minutes on 2 cores (AMD EPYC Zen 3).  Writes benchmarks/results/kernel_speed.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import environment, write_json
from losa_cli.kernels.native import available_paths, extension
from losa_cli.kernels.packed import pack
from losa_cli.runtime.ceiling import measure_bandwidth

SHAPES = {"SmolLM2 MLP up (1536 x 576)": (1536, 576), "SmolLM2 MLP down (576 x 1536)": (576, 1536),
          "Llama-2-7B MLP (11008 x 4096)": (11008, 4096)}


def _median_ms(run, repeats: int) -> float:
    run()  # warm-up: page faults, first-touch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _copies(rows: int, cols: int, step_mb: int) -> int:
    return max(1, -(-step_mb * 2**20 // (rows * cols * 4)))


def bench_shape(name: str, rows: int, cols: int, sparsities: list[float], dtypes: list[str], paths: list[str],
                step_mb: int, repeats: int, bandwidth: float) -> list[dict]:
    copies = _copies(rows, cols, step_mb)
    generator = torch.Generator().manual_seed(0)
    dense = [torch.randn(rows, cols, generator=generator) for _ in range(copies)]
    x = torch.randn(1, cols, generator=generator)
    dense_ms = _median_ms(lambda: [F.linear(x, w) for w in dense], repeats) / copies
    dense_bytes = rows * cols * 4
    rows_out = [{"shape": name, "rows": rows, "cols": cols, "sparsity": 0.0, "format": "dense fp32", "path": "F.linear",
                 "copies": copies, "ms": dense_ms, "bytes": dense_bytes, "gb_s": dense_bytes / dense_ms / 1e6,
                 "gflop_s": 2 * rows * cols / dense_ms / 1e6, "share": dense_bytes / (bandwidth * 1e6) / dense_ms,
                 "speedup_vs_dense": 1.0}]
    module = extension()
    for sparsity in sparsities:
        pruned = []
        for weight in dense:
            mask = torch.rand(rows, cols, generator=generator) < sparsity
            pruned.append(weight.masked_fill(mask, 0.0))
        for dtype in dtypes:
            packed = [pack(w, dtype) for w in pruned]
            padded = torch.zeros(1, packed[0].cols_padded)
            padded[:, :cols] = x
            empty = torch.empty(0)
            nbytes = packed[0].nbytes()
            for path in paths:
                def step(path=path):
                    for p in packed:
                        module.sparse_matmul(padded, p.mask, p.values, p.row_offsets,
                                             p.scale if p.scale is not None else empty, path)
                ms = _median_ms(step, repeats) / copies
                rows_out.append({"shape": name, "rows": rows, "cols": cols, "sparsity": sparsity, "format": f"{dtype} + bitmask",
                                 "path": path, "copies": copies, "ms": ms, "bytes": nbytes, "gb_s": nbytes / ms / 1e6,
                                 "gflop_s": 2 * rows * cols / ms / 1e6, "share": nbytes / (bandwidth * 1e6) / ms,
                                 "speedup_vs_dense": dense_ms / ms})
            del packed
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=max(1, (torch.get_num_threads() or 2) - 1))
    parser.add_argument("--sparsities", default="0,0.5,0.7,0.9")
    parser.add_argument("--dtypes", default="float32,bfloat16,int8")
    parser.add_argument("--step-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernel_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = available_paths()
    bandwidth = measure_bandwidth(args.threads)
    rows = []
    for name, (out_features, in_features) in SHAPES.items():
        rows += bench_shape(name, out_features, in_features, [float(s) for s in args.sparsities.split(",")],
                            args.dtypes.split(","), paths, args.step_mb, args.repeats, bandwidth)
        print(f"done: {name}", flush=True)
    write_json(Path(args.out), {"threads": args.threads, "paths": paths, "read_bandwidth_gb_s": bandwidth,
                                "step_mb": args.step_mb, "repeats": args.repeats, "rows": rows,
                                "command": f"python benchmarks/kernel_speed.py --threads {args.threads}",
                                "environment": environment()})
    print(f"read bandwidth {bandwidth:.1f} GB/s at {args.threads} thread(s); paths: {', '.join(paths)}")
    print("| layer | sparsity | format | path | µs | GB/s | GFLOP/s | share of ceiling | vs dense F.linear |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['sparsity']:.0%} | {r['format']} | {r['path']} | {r['ms'] * 1000:.0f} | "
              f"{r['gb_s']:.1f} | {r['gflop_s']:.1f} | {r['share']:.0%} | {r['speedup_vs_dense']:.2f}x |")


if __name__ == "__main__":
    main()
