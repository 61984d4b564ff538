"""PyTorch's per-token overhead in decode: a model with SmolLM2's depth and almost no arithmetic.

Run (about 2 minutes on 2 cores, most of it compiling):
    OMP_WAIT_POLICY=PASSIVE python benchmarks/decode_overhead.py

A Llama with SmolLM2-135M's 30 blocks but width 64 (one head, vocabulary 256), built from config
with seed 0, decodes one token after a past of 128 (the cache cropped back after each step, as
``losa bench`` times decode), eager and under ``torch.compile``: what is left is the cost of module
calls, cache bookkeeping and small operators, which every decode step of the real model pays on top
of its matrix products.  Writes benchmarks/results/decode_overhead.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from common import environment, write_json

RESULTS = Path(__file__).parent / "results" / "decode_overhead.json"


def step_ms(forward, model_inputs: dict, cache, steps: int) -> tuple[float, float]:
    """Median decode step in ms, and the seconds the first three steps took (compiling, if any)."""
    def step() -> None:
        with torch.inference_mode():
            forward(**model_inputs, past_key_values=cache, use_cache=True)
            cache.crop(-1)

    start = time.perf_counter()
    for _ in range(3):
        step()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=30,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=256,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.inference_mode():
        cache = model(input_ids=torch.randint(0, 256, (1, args.past)), use_cache=True).past_key_values
    inputs = {
        "input_ids": torch.randint(0, 256, (1, 1)),
        "attention_mask": torch.ones(1, args.past + 1, dtype=torch.long),
    }
    rows = []
    for label, forward in (("eager", model.forward), ("torch.compile", torch.compile(model.forward, dynamic=False))):
        ms, first_s = step_ms(forward, inputs, cache, args.steps)
        rows.append({"mode": label, "ms_per_step": ms, "first_three_steps_s": first_s})
    command = f"python benchmarks/decode_overhead.py --threads {args.threads} --past {args.past} --steps {args.steps}"
    write_json(RESULTS, {"command": command, "rows": rows, "blocks": 30, "width": 64, "environment": environment()})
    print(f"{environment()['machine']['cpu']}, {args.threads} thread(s); {command}")
    for row in rows:
        print(
            f"{row['mode']}: {row['ms_per_step']:.2f} ms per decode step (first three steps "
            f"{row['first_three_steps_s']:.1f} s)"
        )


if __name__ == "__main__":
    main()
