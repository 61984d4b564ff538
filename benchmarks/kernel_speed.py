"""Speed of losa's kernels: decode products against the byte ceiling, prefill GEMMs against PyTorch.

Decode (one input row, also four): per layer shape and value type (fp32, bf16, int8 with int8
activations), the bitmask layout at ``--sparsity`` zeros and the dense layout (layers without
zeros, e.g. the output head), against dense fp32 ``F.linear`` on the same shape.  One "step"
multiplies by K distinct copies of the layer, K chosen so the step reads more than the CPU's caches
(``--step-mb``), as a decode step reads every layer once.  Reported per layer: ms, GB/s (the bytes
the format reads: ``PackedWeight.nbytes()``), the share of the ceiling (the best dense ``F.linear``
read rate of the same run and thread count) and the speed-up over dense ``F.linear``.

Prefill (8-512 input rows): the kernel's GEMM against unpacking the weight then ``F.linear``, and
against dense ``F.linear`` on the unpruned-shape weight.

Every variant of a row group runs in interleaved rounds (A, B, C, A, B, C, ...) and keeps its median,
so all see the same spells of a busy machine.  Pin it (``taskset -c 1`` for one thread):

    OMP_WAIT_POLICY=PASSIVE taskset -c 1 python benchmarks/kernel_speed.py --threads 1
    OMP_WAIT_POLICY=PASSIVE taskset -c 0,1 python benchmarks/kernel_speed.py --threads 1,2

About 5 minutes per thread count on 2 cores (AMD EPYC Zen 3).  Writes benchmarks/results/kernel_speed.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from common import environment, write_json
from losa_cli.runtime.kernels.native import available_paths, dense_weight, extension, gemm_from, sparse_matmul
from losa_cli.runtime.kernels.packed import PackedWeight, pack

SMOL = {"SmolLM2 attn q/o (576 x 576)": (576, 576), "SmolLM2 attn k/v (192 x 576)": (192, 576),
        "SmolLM2 MLP up/gate (1536 x 576)": (1536, 576), "SmolLM2 MLP down (576 x 1536)": (576, 1536)}
LLAMA = {"Llama-2-7B MLP (11008 x 4096)": (11008, 4096)}
#: dense-layout shapes: SmolLM2's head (no zeros) and the Llama layer unpruned
HEADS = {"SmolLM2 head (49152 x 576)": (49152, 576), "Llama-2-7B MLP, no zeros (11008 x 4096)": (11008, 4096)}
PREFILL = {**SMOL, "Llama-2-7B attn (4096 x 4096)": (4096, 4096), **LLAMA}
DTYPES = ("float32", "bfloat16", "int8")
ISA = ("avx2", "fma", "bmi2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")


def interleaved_ms(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms of each run over ``rounds`` rounds that call every run once, in turn (after one warm-up each)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def _pruned(rows: int, cols: int, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    weight = torch.randn(rows, cols, generator=generator)
    return weight.masked_fill(torch.rand(rows, cols, generator=generator) < sparsity, 0.0) if sparsity else weight


def _call(packed: PackedWeight, x: torch.Tensor, path: str) -> Callable[[], object]:
    """The raw extension call (no Python-side padding or dispatch), as a decode step would make it."""
    empty = torch.empty(0)
    parts = [empty if t is None else t for t in (packed.mask, packed.values, packed.row_offsets, packed.scale)]
    return lambda: extension().sparse_matmul(x, *parts, path)


def decode_rows(shapes: dict, sparsity: float, dense: bool, step_mb: int, rounds: int, threads: int,
                batches: tuple[int, ...], path: str) -> list[dict]:
    """Per shape: dense F.linear and every value type in one layout, `batches` input rows, interleaved."""
    rows_out = []
    for name, (rows, cols) in shapes.items():
        generator = torch.Generator().manual_seed(0)
        copies = max(1, -(-step_mb * 2**20 // (rows * cols * 4)))
        weights = [_pruned(rows, cols, sparsity, generator) for _ in range(copies)]
        packed = {dtype: [pack(w, dtype, dense=dense) for w in weights] for dtype in DTYPES}
        for batch in batches:
            x = torch.randn(batch, cols, generator=generator)
            runs: dict[str, Callable[[], object]] = {
                "dense F.linear": lambda x=x, weights=weights: [F.linear(x, w) for w in weights]}
            for dtype, layers in packed.items():
                calls = [_call(p, x, path) for p in layers]
                runs[dtype] = lambda calls=calls: [call() for call in calls]
            ms = {key: value / copies for key, value in interleaved_ms(runs, rounds).items()}
            for key, value in ms.items():
                nbytes = rows * cols * 4 if key == "dense F.linear" else packed[key][0].nbytes()
                layout = "" if key == "dense F.linear" else (" dense" if dense else " bitmask")
                rows_out.append({"shape": name, "rows": rows, "cols": cols, "sparsity": sparsity, "batch": batch,
                                 "threads": threads, "format": key + layout, "path": "F.linear" if key.startswith(
                                     "dense F") else path, "copies": copies, "ms": value, "bytes": nbytes,
                                 "gb_s": nbytes / value / 1e6, "speedup_vs_dense": ms["dense F.linear"] / value})
        del packed, weights
    return rows_out


def prefill_rows(shapes: dict, sparsity: float, tokens: tuple[int, ...], rounds: int, threads: int, path: str,
                 dtypes: tuple[str, ...]) -> list[dict]:
    """Kernel GEMM vs unpack + F.linear vs dense F.linear, per shape, value type and number of input rows."""
    out = []
    for name, (rows, cols) in shapes.items():
        generator = torch.Generator().manual_seed(0)
        weight = _pruned(rows, cols, sparsity, generator)
        dense = torch.randn(rows, cols, generator=generator)
        for dtype in dtypes:
            packed = pack(weight, dtype, dense=False)
            for n in tokens:
                x = torch.randn(n, cols, generator=generator)
                ms = interleaved_ms({"kernel": lambda x=x, p=packed: sparse_matmul(x, p, path),
                                     "unpack + F.linear": lambda x=x, p=packed: F.linear(x, dense_weight(p, path)),
                                     "dense F.linear": lambda x=x, d=dense: F.linear(x, d)}, rounds)
                out.append({"shape": name, "rows": rows, "cols": cols, "sparsity": sparsity,
                            "format": dtype + " bitmask", "tokens": n, "threads": threads,
                            **{f"{k} ms": v for k, v in ms.items()},
                            "kernel vs dense": ms["dense F.linear"] / ms["kernel"],
                            "kernel vs unpack": ms["unpack + F.linear"] / ms["kernel"]})
    return out


def isa_flags() -> list[str]:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), []) if Path("/proc/cpuinfo").exists() else []
    return [flag for flag in ISA if flag in flags]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1", help="Comma-separated thread counts, e.g. 1,2.")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--step-mb", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prefill-tokens", default="8,32,128,512")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernel_speed.json"))
    args = parser.parse_args()
    path = available_paths()[0]
    tokens = tuple(int(t) for t in args.prefill_tokens.split(","))
    load_before = os.getloadavg()
    decode, prefill, ceilings = [], [], {}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        rows = decode_rows({**SMOL, **LLAMA}, args.sparsity, False, args.step_mb, args.rounds, threads, (1,), path)
        rows += decode_rows(LLAMA, args.sparsity, False, args.step_mb, args.rounds, threads, (4,), path)
        rows += decode_rows(HEADS, 0.0, True, args.step_mb, args.rounds, threads, (1,), path)
        ceilings[threads] = max(r["gb_s"] for r in rows if r["path"] == "F.linear")
        for r in rows:
            r["share_of_ceiling"] = r["gb_s"] / ceilings[threads]
        decode += rows
        print(f"decode done at {threads} thread(s); ceiling {ceilings[threads]:.1f} GB/s", flush=True)
        prefill_rounds = max(5, args.rounds // 2 + 1)
        prefill += prefill_rows(PREFILL, args.sparsity, tokens, prefill_rounds, threads, path, ("float32",))
        prefill += prefill_rows({k: SMOL[k] for k in list(SMOL)[2:3]}, args.sparsity, tokens, prefill_rounds,
                                threads, path, ("bfloat16", "int8"))
        print(f"prefill done at {threads} thread(s)", flush=True)
    command = f"OMP_WAIT_POLICY=PASSIVE python benchmarks/kernel_speed.py --threads {args.threads}"
    write_json(Path(args.out), {"command": command, "path": path, "isa": isa_flags(), "torch": torch.__version__,
                                "seed": 0, "sparsity": args.sparsity, "rounds": args.rounds, "step_mb": args.step_mb,
                                "gemm_from": gemm_from(), "ceiling_gb_s": ceilings,
                                "load_average": {"before": load_before, "after": os.getloadavg()},
                                "decode": decode, "prefill": prefill, "environment": environment()})
    print(f"{environment()['machine']['cpu']} ({', '.join(isa_flags())}), torch {torch.__version__}, path {path}; "
          f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print("| layer | threads | batch | format | ms | GB/s | share of ceiling | vs dense F.linear |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for r in decode:
        print(f"| {r['shape']} | {r['threads']} | {r['batch']} | {r['format']} | {r['ms']:.3f} | {r['gb_s']:.1f} | "
              f"{r['share_of_ceiling']:.0%} | {r['speedup_vs_dense']:.2f}x |")
    print("\n| layer | threads | format | tokens | kernel ms | unpack + F.linear ms | dense F.linear ms | "
          "kernel vs dense |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in prefill:
        print(f"| {r['shape']} | {r['threads']} | {r['format']} | {r['tokens']} | {r['kernel ms']:.2f} | "
              f"{r['unpack + F.linear ms']:.2f} | {r['dense F.linear ms']:.2f} | {r['kernel vs dense']:.2f}x |")


if __name__ == "__main__":
    main()
