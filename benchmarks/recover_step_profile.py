"""Where a recovery step's time goes on the CPU: the parts of one training step of SmolLM2-135M
pruned to 70% (magnitude; the pattern does not change dense-matmul cost), batch 4 x 256 tokens,
fp32, timed one after the other in one process (ratios are what to compare).

Run (about 5 minutes on 2 cores):
    python benchmarks/recover_step_profile.py

Rows: the dense teacher's forward (what ``--loss kd`` adds); the student's forward + backward
with frozen weights and no adapter (the floor of any adapter); the KD loss alone; the student
with fused masked LoRA (rank 16; KD and CE loss), with LoSiA subnets (ratio 1/8), and with every
kept weight trained (+ AdamW), the last two with the KD loss.  A KD step is the teacher row plus
a KD student row; a CE step is the CE row alone.  Each row: one warm-up, then the best of ``--repeats``.
Writes benchmarks/results/recover_step_profile.json.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from common import environment, write_json
from losa_cli.core.modeling import find_blocks, load_model
from losa_cli.prune.pruning import Criterion, prune_blocks
from losa_cli.recover.losses import kd_loss
from losa_cli.recover.masked_lora import attach, detach
from losa_cli.recover.subnet import attach_subnets

RESULTS = Path(__file__).parent / "results" / "recover_step_profile.json"


def best_time(step, repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model("smollm2-135m").model
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    blocks = find_blocks(model)
    prune_blocks(model, Criterion("magnitude"), [0.7] * len(blocks), None, torch.device("cpu"))
    model.requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    with torch.no_grad():
        target = teacher(**batch).logits

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher(**batch)

    def student_step() -> None:
        kd_loss(model(**batch).logits, target, batch["attention_mask"]).backward()

    def frozen_step() -> None:  # input gradients through every layer, no weight gradient
        handle = model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        try:
            student_step()
        finally:
            handle.remove()

    def kd_alone() -> None:
        kd_loss(target.clone().requires_grad_(True), target, batch["attention_mask"]).backward()

    rows = {"teacher forward (no grad)": best_time(teacher_forward, args.repeats),
            "student fwd+bwd, frozen, no adapter (floor)": best_time(frozen_step, args.repeats),
            "KD loss fwd+bwd alone": best_time(kd_alone, args.repeats)}
    wrappers = attach(blocks, 16, 32.0, 0.0, True)
    for wrapper in wrappers.values():
        for parameter in wrapper.trainable():
            parameter.requires_grad_(True)
    rows["student fwd+bwd, fused masked LoRA r16 (KD loss)"] = best_time(student_step, args.repeats)
    rows["student fwd+bwd, fused masked LoRA r16 (CE loss)"] = best_time(
        lambda: model(**batch, labels=batch["input_ids"]).loss.backward(), args.repeats)
    detach(blocks)
    model.requires_grad_(False)
    wrappers = attach_subnets(blocks, 0.125, 50)
    for wrapper in wrappers.values():
        wrapper.countdown.fill_(10**6)  # no scoring step: the common case between relocalisations
        wrapper.delta.requires_grad_(True)
    rows["student fwd+bwd, LoSiA subnets 1/8"] = best_time(student_step, args.repeats)
    detach(blocks)
    model.requires_grad_(False)
    weights = [m.weight for block in blocks for m in block.modules() if isinstance(m, torch.nn.Linear)]
    for weight in weights:
        weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(weights, lr=1e-6)

    def full_step() -> None:
        student_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rows["student fwd+bwd + AdamW, every kept weight"] = best_time(full_step, args.repeats)
    tokens = args.batch * args.length
    env = environment()
    print(f"| part of one step ({args.batch} x {args.length} tokens) | seconds | tokens/s |\n|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.2f} | {tokens / seconds:.0f} |")
    print(f"\nfp32, torch threads {env['torch_threads']}, {env['machine']['cpu']}, {env['versions']}")
    write_json(
        args.out,
        {
            "setup": {
                "batch": args.batch,
                "length": args.length,
                "repeats": args.repeats,
                "dtype": "float32",
                "sparsity": 0.7,
                "environment": env,
            },
            "seconds": rows,
        },
    )


if __name__ == "__main__":
    main()
