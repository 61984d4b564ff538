"""Where the kernel should switch from its decode product to its prefill GEMM (kernels.h's kGemmFrom).

Run (about two minutes on 2 cores; pin it, e.g. ``taskset -c 1``):
    OMP_WAIT_POLICY=PASSIVE python benchmarks/prefill_switch.py

SmolLM2's shapes and a Llama-2-7B attention shape at 70% unstructured zeros (normal weights, random
mask, seed 0), 1 thread, fp32/bf16/int8 values: for 1-64 input rows, the decode product (each chunk
expanded once per 4 rows) and the GEMM (kept weights times tiles of 64 tokens), both forced through
``sparse_matmul(..., gemm_from=...)``, in interleaved rounds (median).  Writes
benchmarks/results/prefill_switch.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from kernel_speed import interleaved_ms

from common import environment, write_json
from losa_cli.runtime.kernels.native import available_paths, gemm_from, sparse_matmul
from losa_cli.runtime.kernels.packed import pack

RESULTS = Path(__file__).parent / "results" / "prefill_switch.json"
SHAPES = {"SmolLM2 attn q/o (576 x 576)": (576, 576), "SmolLM2 MLP up (1536 x 576)": (1536, 576),
          "SmolLM2 MLP down (576 x 1536)": (576, 1536), "Llama-2-7B attn (4096 x 4096)": (4096, 4096)}
NEVER, ALWAYS = 10**9, 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = available_paths()[0]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features, generator=generator)
        weight[torch.rand(out_features, in_features, generator=generator) < 0.7] = 0
        for dtype in ("float32", "bfloat16", "int8"):
            packed = pack(weight, dtype)
            for tokens in (1, 4, 8, 12, 16, 24, 32, 64):
                x = torch.randn(tokens, in_features, generator=generator)
                ms = interleaved_ms({"decode": lambda x=x, p=packed: sparse_matmul(x, p, path, gemm_from=NEVER),
                                     "gemm": lambda x=x, p=packed: sparse_matmul(x, p, path, gemm_from=ALWAYS)},
                                    args.rounds)
                rows.append({"shape": name, "dtype": dtype, "rows": tokens, "decode_us": ms["decode"] * 1000,
                             "gemm_us": ms["gemm"] * 1000, "gemm_over_decode": ms["gemm"] / ms["decode"]})
    command = f"python benchmarks/prefill_switch.py --threads {args.threads}"
    write_json(RESULTS, {"command": command, "path": path, "gemm_from": gemm_from(), "rounds": args.rounds,
                         "rows": rows, "environment": environment()})
    print(f"{environment()['machine']['cpu']}, {args.threads} thread(s), path {path}, gemm_from {gemm_from()}; "
          f"{command}")
    print("| layer | values | input rows | decode µs | GEMM µs | GEMM / decode |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['dtype']} | {r['rows']} | {r['decode_us']:.0f} | {r['gemm_us']:.0f} | "
              f"{r['gemm_over_decode']:.2f} |")


if __name__ == "__main__":
    main()
