"""Collect finished `losa run` folders into one results file and one plot: each run's recipe, seed,
sparsity, wiki perplexity before and after (its eval stage), the recover stage's wall time and peak
memory, and with --next-sentence the multiple-choice accuracy of the recovered model.

    losa run examples/default.yaml seed=1 bench=null export=null --out runs/seed1
    python benchmarks/recipe_runs.py runs/seed0 runs/seed1 runs/seed2 --next-sentence \
        --out benchmarks/results/recipe_runs.json --plot benchmarks/results/recipe_runs.png

The plot is wiki perplexity against the recover stage's wall minutes, one point per run, beside the
rows of `recover_quality*.json` measured on the CPU at the same sparsity (the earlier recipe's seeds).
Runs already in --out are kept (keyed by folder), so runs can be added one at a time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import environment, write_json

RESULTS = Path(__file__).parent / "results"


def run_row(folder: Path) -> dict:
    """One `losa run` folder's numbers, read from its manifests (nothing is recomputed)."""
    run = json.loads((folder / "losa_run.json").read_text())
    recover = json.loads((folder / "recover" / "losa_manifest.json").read_text())
    evaluated = json.loads((folder / "eval" / "losa_manifest.json").read_text())["results"]
    recipe = run["recipe"]
    settings = recipe["recover"]
    return {
        "folder": str(folder.resolve()),
        "argv": run["argv"],
        "seed": recipe["seed"],
        "sparsity": settings.get("sparsity"),
        "pattern": settings.get("pattern"),
        "reconstruct": bool(settings.get("reconstruct", False)),
        "reconstruct_target": recover["settings"].get("reconstruct_target", "stage"),
        "adapter": recover["settings"].get("adapter", "masked-lora"),
        "stages": recover["settings"]["stages"],
        "steps": sum(recover["settings"]["steps_per_stage"]),
        "teacher_topk": recover["settings"].get("teacher_topk", 0),
        "zeros": recover["results"]["global_sparsity"],
        "wiki_dense": evaluated["input"]["perplexity"]["perplexity"],
        "wiki": evaluated["final"]["perplexity"]["perplexity"],
        "recover_wall_s": recover["results"]["wall_time_s"],
        "peak_memory_mib": recover["results"]["peak_memory_mib"],
        "tokens_trained": recover["results"]["tokens_trained"],
        "machine": recover.get("machine"),
    }


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from losa_cli.core.plots import save_figure

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        dense_target = row.get("reconstruct_target") == "dense"
        fitted = "blocks fitted to " + ("the dense model" if dense_target else "the stage's start")
        label = (f"{row['stages']} stage{'s' if row['stages'] > 1 else ''}, {row['steps']} steps, "
                 f"{fitted if row['reconstruct'] else 'no reconstruction'}, seed {row['seed']}")
        if row.get("adapter", "masked-lora") != "masked-lora":
            label += f", {row['adapter']}"
        if (row.get("machine") or {}).get("torch_threads"):
            label += f", {row['machine']['torch_threads']} thread(s)"
        ax.scatter(row["recover_wall_s"] / 60, row["wiki"], marker="o", label=label)
    for path in sorted(RESULTS.glob("recover_quality*.json")):
        payload = json.loads(path.read_text())
        if "runs" in payload or payload["setup"]["device"] != "cpu":
            continue
        for row in payload["rows"]:
            if row.get("tokens_trained") and row.get("wall_s") and payload["setup"]["sparsity"] == rows[0]["sparsity"]:
                ax.scatter(row["wall_s"] / 60, row["perplexity"]["wiki-sample.txt"], marker="x",
                           label=f"{row['name']}, seed {payload['setup']['seed']} ({path.stem})")
    ax.axhline(rows[0]["wiki_dense"], color="black", linewidth=0.8, label=f"dense {rows[0]['wiki_dense']:.1f}")
    ax.axhline(60, color="green", linestyle="--", linewidth=0.8, label="goal 60")
    ax.set_yscale("log")
    ax.set_xlabel("wall minutes of the recover stage, 2 CPU cores (shared with other jobs in some runs)")
    ax.set_ylabel("wiki perplexity (32 x 512 tokens)")
    ax.set_title(f"SmolLM2-135M at {rows[0]['sparsity']:.0%}: perplexity against CPU minutes")
    ax.legend(fontsize=6)
    save_figure(fig, png)
    print(f"wrote {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="finished `losa run` output folders")
    parser.add_argument("--next-sentence", action="store_true", help="score each recovered model (about 5 CPU minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS / "recipe_runs.json")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    previous = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    rows = {row["folder"]: row for row in previous}
    for folder in args.folders:
        row = run_row(folder)
        kept = rows.get(row["folder"], {})
        if args.next_sentence and "next_sentence" not in kept:
            from next_sentence import next_sentence_accuracy

            row["next_sentence"] = next_sentence_accuracy(str(folder / "recover"))
        elif "next_sentence" in kept:
            row["next_sentence"] = kept["next_sentence"]
        rows[row["folder"]] = row
        accuracy = row.get("next_sentence", {}).get("acc")
        print(f"{folder}: seed {row['seed']}, wiki {row['wiki']:.2f}, recover {row['recover_wall_s']:.0f} s"
              + (f", next-sentence acc {accuracy:.2f}" if accuracy is not None else ""), flush=True)
    write_json(args.out, {"environment": environment(), "rows": list(rows.values())})
    if args.plot:
        plot(list(rows.values()), args.plot)


if __name__ == "__main__":
    main()
