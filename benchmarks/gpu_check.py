"""GPU check: prune -> recover (a few steps) -> export -> eval on CUDA, on a model built from config.

Not part of CI (no GPU there).  On a machine with a CUDA GPU, ``benchmarks/gpu_check.sh`` runs
this in well under 5 minutes and prints one table: each stage's time, peak GPU memory and result.
With more than one GPU it also runs the recover stage under ``accelerate launch`` (DDP).

The model is a random Llama of ~100M parameters (``low_memory.build`` with the ``gpu`` shape),
so perplexities are not meaningful: the check is that every stage runs on the GPU, keeps every
pruned weight zero, and exports graphs that match.  Text comes from ../shared/data when present,
else from a generated file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from low_memory import SHAPES, build

from common import SHARED_DATA

SHAPES["gpu"] = dict(
    vocab_size=8000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
)


def _text(workdir: Path) -> Path:
    shared = SHARED_DATA / "c4-sample.txt"
    if shared.is_file():
        return shared
    words = "the a model sparse weight layer block prune river city house tree water light and or but if then".split()
    rng = random.Random(0)
    path = workdir / "text.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(300)) for _ in range(400)) + "\n")
    return path


def _losa(args: list[str], launcher: list[str] | None = None) -> tuple[dict, float]:
    entry = ["-c", "import sys; from losa_cli.cli import main; sys.argv[0] = 'losa'; main()"]
    command = (launcher or [sys.executable]) + entry + args + ["--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"failed: losa {' '.join(args)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout[done.stdout.index("{") :]), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/gpu-check")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cuda", help="cpu with --shape smoke: a quick check of this script itself")
    parser.add_argument("--shape", default="gpu", choices=sorted(SHAPES))
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible: this check is for GPU machines (CI does not run it)")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "model"
    if not model.exists():
        build(model, SHAPES[args.shape], seed=0)
    text = str(_text(workdir))
    rows = []
    pruned, t = _losa(
        [
            "prune",
            "--model",
            str(model),
            "--out",
            str(workdir / "pruned"),
            "--device",
            args.device,
            "--force",
            "--method",
            "sparsegpt",
            "--sparsity",
            "0.5",
            "--calib",
            text,
            "--nsamples",
            "32",
            "--seqlen",
            "256",
        ]
    )
    rows.append(("prune (SparseGPT 50%)", t, pruned["peak_memory_mib"], f"zeros {pruned['global_sparsity']:.4f}"))
    common = [
        "--model",
        str(model),
        "--device",
        args.device,
        "--force",
        "--sparsity",
        "0.6",
        "--stages",
        "2",
        "--total-steps",
        str(args.steps),
        "--data",
        text,
        "--calib",
        text,
        "--nsamples",
        "16",
        "--seqlen",
        "256",
    ]
    recovered, t = _losa(["recover", "--out", str(workdir / "recover"), *common])
    rows.append(
        (
            f"recover (LoSA 60%, 2 stages, {args.steps} steps)",
            t,
            recovered.get("peak_memory_mib", float("nan")),
            f"zeros {recovered['global_sparsity']:.4f}",
        )
    )
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if gpus > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus)]
        ddp, t = _losa(["recover", "--out", str(workdir / "recover-ddp"), *common], launcher)
        rows.append(
            (
                f"recover, DDP on {gpus} GPUs",
                t,
                ddp.get("peak_memory_mib", float("nan")),
                f"zeros {ddp['global_sparsity']:.4f}",
            )
        )
    exported, t = _losa(["export", str(workdir / "recover"), "--out", str(workdir / "export"), "--onnx"])
    verification = exported["onnx"]["verification"]
    rows.append(
        (
            "export (ONNX, verified on CPU)",
            t,
            exported["peak_memory_mib"],
            f"max |diff| {verification['prefill_max_abs_diff']:.2g}, zeros kept: {not verification['zero_mismatches']}",
        )
    )
    evaluated, t = _losa(
        [
            "eval",
            "--model",
            str(workdir / "export"),
            "--data",
            text,
            "--device",
            args.device,
            "--max-windows",
            "8",
            "--seqlen",
            "256",
        ]
    )
    rows.append(("eval (perplexity, random model)", t, float("nan"), f"{evaluated['perplexity']['perplexity']:.1f}"))
    where = f"GPU: {torch.cuda.get_device_name(0)} x {gpus}" if gpus else f"device {args.device}"
    print(f"{where}; torch {torch.__version__}; CUDA {torch.version.cuda}")
    print("| stage | seconds | peak memory MiB | result |")
    print("|---|---:|---:|---|")
    for name, seconds, memory, result in rows:
        print(f"| {name} | {seconds:.1f} | {memory:.0f} | {result} |")
    print(f"total {sum(r[1] for r in rows):.1f} s")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
