"""End-to-end decode and prefill of the recovered model on every engine: losa's kernel, DeepSparse, ONNX Runtime.

Run (about 20 minutes on 2 cores; needs ``losa run --out runs/default`` first, for its export and
dense-export folders):
    OMP_WAIT_POLICY=PASSIVE python benchmarks/decode_engines.py --run runs/default

Two ``losa bench`` runs on the same export, the recipe's protocol (batch 1, prefill of --seqlen
tokens, decode of one token after a past of --seqlen, --decode-tokens steps per iteration):

1. every engine in one run: ONNX Runtime and DeepSparse (when installed) on the exported graphs,
   against the dense export; losa's engine on the export's safetensors with its linear layers
   bitmask-packed, against the same model in dense PyTorch; all under ``torch.compile`` for losa
   (``--compile``), which removes most of PyTorch's per-token overhead;
2. the losa engine alone without ``torch.compile``: what a plain PyTorch user sees.

Prints one table (decode and prefill per engine, model, precision, with the speed-ups and the share
of the bandwidth ceiling) and writes benchmarks/results/decode_engines.json.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import environment, write_json  # noqa: E402
from losa_cli.export import bench_graphs  # noqa: E402
from losa_cli.runtime import BenchConfig, run_bench  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "decode_engines.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a losa run folder with export/ and dense-export/ (runs/default)")
    parser.add_argument("--precisions", default="fp32,bf16,int8")
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="default: cores - 1, as losa bench")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args()


def _rows(result: dict, compiled: bool) -> list[dict]:
    timings = {(r["engine"], r["model"], r["precision"], r["phase"]): r for r in result["runs"] if r["timing"]}
    rows = []
    for (engine, model, precision, phase), run in timings.items():
        if phase != "decode":
            continue
        prefill = timings.get((engine, model, precision, "prefill"))
        ceiling = run.get("ceiling") or {}
        rows.append(
            {
                "engine": engine + (" (compiled)" if compiled and engine == "losa" else ""),
                "model": model,
                "precision": precision,
                "decode_ms": run["timing"]["median_ms"],
                "decode_p90_ms": run["timing"]["p90_ms"],
                "tokens_per_s": run["timing"]["tokens_per_s"],
                "vs_onnxruntime_dense_fp32": run["speedup_vs_onnxruntime_dense_fp32"],
                "vs_same_engine_dense": run["speedup_vs_same_engine_dense"],
                "ceiling_ms": ceiling.get("ceiling_ms"),
                "format": ceiling.get("format"),
                "share": ceiling.get("share"),
                "prefill_ms": prefill["timing"]["median_ms"] if prefill else None,
            }
        )
    return rows


def main() -> None:
    args = parse_args()
    run = Path(args.run)
    common = dict(
        model=str(run / "export"),
        precisions=args.precisions,
        seqlen=args.seqlen,
        decode_tokens=args.decode_tokens,
        iterations=args.iterations,
        warmup=args.warmup,
        threads=args.threads,
    )
    config = BenchConfig(
        dense_baseline=str(run / "dense-export"), engines="onnxruntime,deepsparse,losa", compile=True, **common
    )
    with bench_graphs(config) as graphs:
        every = run_bench(config, graphs).to_dict()
    eager = run_bench(BenchConfig(engines="losa", compile=False, **common)).to_dict()
    rows = _rows(every, True) + _rows(eager, False)
    command = (
        f"python benchmarks/decode_engines.py --run {args.run} --precisions {args.precisions} --seqlen {args.seqlen} "
        f"--decode-tokens {args.decode_tokens} --iterations {args.iterations} --warmup {args.warmup}"
        + (f" --threads {args.threads}" if args.threads else "")
    )
    write_json(
        Path(args.out),
        {"command": command, "rows": rows, "every_engine": every, "losa_eager": eager, "environment": environment()},
    )
    machine = every["machine"]
    print(
        f"{machine['cpu']} ({', '.join(machine['isa_flags'])}), {every['settings']['threads']} thread(s), read "
        "bandwidth "
        f"{machine['read_bandwidth_gb_s']:.1f} GB/s; load average {every['load_average_before'][0]:.2f} -> "
        f"{every['load_average_after'][0]:.2f}; {command}"
    )
    print(
        "| engine | model | precision | decode ms (p90) | tokens/s | vs ORT dense fp32 | vs same engine dense | "
        "ceiling ms (format) | share | prefill ms |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:

        def fmt(value, spec):
            return format(value, spec) if value is not None else "–"

        print(
            f"| {r['engine']} | {r['model']} | {r['precision']} | {r['decode_ms']:.1f} ({r['decode_p90_ms']:.1f}) | "
            f"{r['tokens_per_s']:.1f} | {fmt(r['vs_onnxruntime_dense_fp32'], '.2f')}x | "
            f"{fmt(r['vs_same_engine_dense'], '.2f')}x | "
            f"{fmt(r['ceiling_ms'], '.1f')} ({r['format']}) | {fmt(r['share'], '.0%')} | "
            f"{fmt(r['prefill_ms'], '.0f')} |"
        )
    for warning in every["warnings"] + eager["warnings"]:
        print(f"warning: {warning}")


if __name__ == "__main__":
    main()
