"""Training-step cost of plain LoRA (peft, no mask: not mergeable into a sparse model) vs masked
LoRA in its plain form (dense masked delta, second matmul) and its fused form (one matmul,
custom backward), on SmolLM2-135M pruned to 70% (magnitude; the pattern does not change the cost).

Run (about 5 minutes on 2 cores):
    python benchmarks/recover_speed.py --batch 2 --length 256 --steps 6 --rank 16

Each form runs in its own subprocess (so peak RSS is its own), --dtype (fp32 default) on the CPU, dropout 0,
AdamW over the adapters only; the first step is a warm-up and is not timed.  Prints a table and
writes benchmarks/results/recover_speed.json.  Target from the issue: fused <= 1.6x plain LoRA's
step time, and faster than the plain masked form.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "recover_speed.json"
FORMS = ("peft-lora", "masked-plain", "masked-fused")


def measure(form: str, batch: int, length: int, steps: int, rank: int, dtype: str) -> dict:
    """One form, in this process: step times and peak RSS."""
    import torch

    from common import environment
    from losa_cli.core.manifest import peak_rss_mib
    from losa_cli.core.modeling import find_blocks, load_model
    from losa_cli.prune.pruning import Criterion, prune_blocks
    from losa_cli.recover.masked_lora import attach

    torch.manual_seed(0)
    loaded = load_model("smollm2-135m", dtype)
    model = loaded.model
    prune_blocks(model, Criterion("magnitude"), [0.7] * len(find_blocks(model)), None, torch.device("cpu"))
    for p in model.parameters():
        p.requires_grad_(False)
    if form == "peft-lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        wrappers = attach(find_blocks(model), rank, 2.0 * rank, 0.0, fused=form == "masked-fused")
        params = [p for w in wrappers.values() for p in (w.lora_A, w.lora_B)]
        for w in wrappers.values():
            torch.nn.init.normal_(w.lora_B, std=1e-3)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    model.train()
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step > 0:
            times.append(time.perf_counter() - started)
    return {
        "form": form,
        "dtype": dtype,
        "tokens_per_s": batch * length / statistics.median(times),
        "step_s_median": statistics.median(times),
        "step_s": times,
        "peak_rss_mib": peak_rss_mib(),
        "trainable_params": sum(p.numel() for p in params),
        "environment": environment(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="base weights and compute")
    parser.add_argument("--form", choices=FORMS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.form:
        print(json.dumps(measure(args.form, args.batch, args.length, args.steps, args.rank, args.dtype)))
        return
    rows = []
    for form in FORMS:
        command = [
            sys.executable,
            __file__,
            "--form",
            form,
            "--batch",
            str(args.batch),
            "--length",
            str(args.length),
            "--steps",
            str(args.steps),
            "--rank",
            str(args.rank),
            "--dtype",
            args.dtype,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(
            f"{form:>14}: {rows[-1]['step_s_median']:.2f} s/step, {rows[-1]['tokens_per_s']:.0f} tokens/s, peak RSS "
            f"{rows[-1]['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    base = rows[0]["step_s_median"]
    setup = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised), 70% magnitude-pruned",
        "batch": args.batch,
        "length": args.length,
        "timed_steps": args.steps,
        "rank": args.rank,
        "dtype": args.dtype,
        "device": "cpu",
        "environment": rows[0]["environment"],
    }
    from common import write_json

    write_json(args.out, {"setup": setup, "rows": rows})
    print("\n| form | step time (s, median) | vs peft LoRA | peak RSS (MiB) | mergeable into the sparse model |")
    print("|---|---|---|---|---|")
    for row in rows:
        mergeable = "no (dense update)" if row["form"] == "peft-lora" else "yes (zeros kept)"
        print(
            f"| {row['form']} | {row['step_s_median']:.2f} | {row['step_s_median'] / base:.2f}x | "
            f"{row['peak_rss_mib']:.0f} | {mergeable} |"
        )
    env = setup["environment"]
    print(
        f"\nbatch {args.batch} x {args.length} tokens, rank {args.rank}, {args.dtype} CPU, torch threads "
        f"{env['torch_threads']}, "
        f"{env['machine']['cpu']}, versions {env['versions']}"
    )


if __name__ == "__main__":
    main()
