"""Decode and prefill of a sparse model on every engine, with each format's accuracy: the table a user decides from.

Run (each model about 10-15 minutes on 2 cores):
    OMP_WAIT_POLICY=PASSIVE python benchmarks/decode_engines.py --model runs/default/export \
        --dense runs/default/dense-export --threads 1 --out benchmarks/results/decode_engines.json
    OMP_WAIT_POLICY=PASSIVE python benchmarks/decode_engines.py --midsize runs/midsize --threads 1 \
        --out benchmarks/results/decode_engines_midsize.json

One ``losa bench`` run per model, the bench's protocol (batch 1; prefill of --seqlen tokens; decode of
one token after a past of --seqlen, --decode-tokens steps per iteration): ONNX Runtime (and
DeepSparse when installed) on the exported graphs in fp32 and int8, sparse and dense; losa's engine
on the model folder, sparse in fp32, bf16 and int8 and dense fp32; with ``--data`` each row's
perplexity and teacher-forced top-1 agreement with the fp32 sparse model (``--data-windows`` x
``--data-seqlen`` wiki tokens).

``--midsize FOLDER`` first builds (once) a Llama from config -- hidden 1024, 8 blocks, 16 heads / 4
KV heads, intermediate 2816, vocab 49152 (SmolLM2's tokenizer), an untied head, random weights (seed
0) -- prunes it to 70% by magnitude with ``losa prune`` and exports both with ``losa export --onnx``,
so the ratios can be checked on shapes other than SmolLM2's (its perplexity means nothing: random
weights; the agreement between formats still shows their numerical fidelity).

``--rounds`` runs the whole bench that many times (only the first scores ``--data``): on these VMs a
row's time can move 1.5x between minutes, so each round times every row, each speed-up is the
median over rounds of that round's ratio (rows compared within one round), each time the median
over rounds; every round's numbers are kept in the JSON.

Prints the table (decode, prefill, speed-ups, share of the bandwidth ceiling, perplexity, agreement)
and writes the JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import SHARED_DATA, environment, write_json  # noqa: E402
from losa_cli.export import bench_graphs  # noqa: E402
from losa_cli.runtime import BenchConfig, run_bench  # noqa: E402

LOSA = [sys.executable, "-c", "import sys; from losa_cli.cli import main; sys.argv[0] = 'losa'; main()"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="the sparse model: a losa export folder (safetensors + onnx/)")
    parser.add_argument("--dense", help="the dense model's ONNX export (the ORT/DeepSparse dense baseline)")
    parser.add_argument("--midsize", help="folder for the mid-size Llama (built, pruned and exported there once)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--engines", default="onnxruntime,deepsparse,losa")
    parser.add_argument("--data", default=str(SHARED_DATA / "wiki-sample.txt"), help="'' for speed only")
    parser.add_argument("--data-seqlen", type=int, default=512)
    parser.add_argument("--data-windows", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3,
                        help="whole bench runs (the first also scores --data); each row keeps the median over rounds")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def build_midsize(folder: Path) -> tuple[str, str]:
    """The mid-size Llama's 70% export and dense export under ``folder`` (made once)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from losa_cli.core.modeling import resolve_source

    dense, sparse = folder / "dense", folder / "sparse-70"
    if not (folder / "sparse-70-export").is_dir():
        if not dense.is_dir():
            torch.manual_seed(0)
            config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                                 num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048,
                                 tie_word_embeddings=False)
            LlamaForCausalLM(config).save_pretrained(dense)
            # SmolLM2's tokenizer: the bench and --data need one; the weights are random anyway
            AutoTokenizer.from_pretrained(resolve_source("smollm2-135m").location,
                                          gguf_file=resolve_source("smollm2-135m").gguf_file).save_pretrained(dense)
        subprocess.run([*LOSA, "prune", "--model", str(dense), "--out", str(sparse), "--method", "magnitude",
                        "--sparsity", "0.7", "--force"], check=True)
        subprocess.run([*LOSA, "export", str(sparse), "--out", str(folder / "sparse-70-export"), "--onnx", "--force"],
                       check=True)
        subprocess.run([*LOSA, "export", str(dense), "--out", str(folder / "dense-export"), "--onnx",
                        "--no-safetensors", "--force"], check=True)
    return str(folder / "sparse-70-export"), str(folder / "dense-export")


def rows_of(result: dict) -> list[dict]:
    """One row per engine, model and precision: decode and prefill side by side."""
    timings = {(r["engine"], r["model"], r["precision"], r["phase"]): r for r in result["runs"]}
    rows = []
    for (engine, model, precision, phase), run in timings.items():
        if phase != "decode":
            continue
        prefill = timings.get((engine, model, precision, "prefill"))
        ceiling, accuracy = run.get("ceiling") or {}, run.get("accuracy") or {}
        timed = run["timing"] or {}
        rows.append({"engine": engine, "model": model, "precision": precision, "decode_ms": timed.get("median_ms"),
                     "decode_p90_ms": timed.get("p90_ms"), "tokens_per_s": timed.get("tokens_per_s"),
                     "vs_onnxruntime_dense_fp32": run.get("speedup_vs_onnxruntime_dense_fp32"),
                     "vs_same_engine_dense": run.get("speedup_vs_same_engine_dense"),
                     "ceiling_ms": ceiling.get("ceiling_ms"), "format": ceiling.get("format"),
                     "share": ceiling.get("share"), "error": run["error"],
                     "prefill_ms": prefill["timing"]["median_ms"] if prefill and prefill["timing"] else None,
                     "perplexity": accuracy.get("perplexity"), "top1_agreement": accuracy.get("top1_agreement")})
    return rows


def over_rounds(rounds: list[list[dict]]) -> list[dict]:
    """The first round's rows (with its accuracy), times and speed-ups as medians over the rounds: a speed-up
    is the median of each round's own ratio, so two rows are only ever compared within one round."""
    rows = []
    for index, first in enumerate(rounds[0]):
        same = [r[index] for r in rounds]
        row = dict(first, decode_ms_rounds=[r["decode_ms"] for r in same])
        for name in ("decode_ms", "decode_p90_ms", "tokens_per_s", "prefill_ms", "vs_onnxruntime_dense_fp32",
                     "vs_same_engine_dense"):
            values = [r[name] for r in same if r[name] is not None]
            row[name] = statistics.median(values) if values else None
        if row["ceiling_ms"] and row["decode_ms"]:
            row["share"] = row["ceiling_ms"] / row["decode_ms"]
        rows.append(row)
    return rows


def print_table(rows: list[dict], result: dict, command: str, rounds: int) -> None:
    def fmt(value, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    machine = result["machine"]
    print(f"{machine['cpu']} ({', '.join(machine['isa_flags'])}), {result['settings']['threads']} thread(s), read "
          f"bandwidth {machine['read_bandwidth_gb_s']:.1f} GB/s; load average {result['load_average_before'][0]:.2f} "
          f"-> {result['load_average_after'][0]:.2f} (first round); median of {rounds} round(s); {command}")
    print("| engine | model | precision | decode ms (p90) | vs ORT dense fp32 | vs same engine dense | ceiling ms "
          "(format) | share | prefill ms | perplexity | top-1 = fp32 |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engine']} | {r['model']} | {r['precision']} | {fmt(r['decode_ms'], '.1f')} "
              f"({fmt(r['decode_p90_ms'], '.1f')}) | {fmt(r['vs_onnxruntime_dense_fp32'], '.2f')}x | "
              f"{fmt(r['vs_same_engine_dense'], '.2f')}x | {fmt(r['ceiling_ms'], '.1f')} ({r['format']}) | "
              f"{fmt(r['share'], '.0%')} | {fmt(r['prefill_ms'], '.0f')} | {fmt(r['perplexity'], '.2f')} | "
              f"{fmt(r['top1_agreement'], '.1%')} |")
    for warning in result["warnings"]:
        print(f"warning: {warning}")


def main() -> None:
    args = parse_args()
    model, dense = (build_midsize(Path(args.midsize)) if args.midsize else (args.model, args.dense))
    if not model:
        raise SystemExit("give --model (and --dense) or --midsize")
    config = BenchConfig(model=model, dense_baseline=dense, engines=args.engines, precisions="fp32,bf16,int8",
                         seqlen=args.seqlen, decode_tokens=args.decode_tokens, iterations=args.iterations,
                         warmup=args.warmup, threads=args.threads, data=args.data or None,
                         data_seqlen=args.data_seqlen, data_windows=args.data_windows)
    results = []
    with bench_graphs(config) as graphs:
        for round_number in range(args.rounds):
            results.append(run_bench(config if round_number == 0 else replace(config, data=None), graphs).to_dict())
    rows = over_rounds([rows_of(result) for result in results])
    command = " ".join(["python benchmarks/decode_engines.py", *sys.argv[1:]])
    write_json(Path(args.out), {"command": command, "rows": rows, "bench": results[0], "rounds": results,
                                "environment": environment()})
    print_table(rows, results[0], command, len(results))


if __name__ == "__main__":
    main()
