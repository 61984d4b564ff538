"""Per-token overhead in decode: a model with SmolLM2's depth and almost no arithmetic, on every path.

Run (about 1 minute on 2 cores, most of it compiling):
    OMP_WAIT_POLICY=PASSIVE taskset -c 1 python benchmarks/decode_overhead.py

A Llama with SmolLM2-135M's 30 blocks but width 64 (one head, vocabulary 256), built from config
with seed 0, decodes one token after a past of 128 (the same position each step: transformers' cache
is cropped back, the lean paths overwrite the same cache row), so what is timed is the cost of
module calls, cache bookkeeping and small operators that every decode step of the real model pays on
top of its matrix products.  Paths: transformers' model eager and under ``torch.compile`` (today's
``losa generate``), losa's ``LeanModel`` eager and compiled, and the native decode step with the blocks dense fp32
(ATen's mv) or packed fp32 (losa's kernel).  They take turns in rounds, so a change in the machine's
load hits all alike; each row is the median step.  Writes benchmarks/results/decode_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from common import environment, interleaved_times, write_json

RESULTS = Path(__file__).parent / "results" / "decode_overhead.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--steps", type=int, default=25, help="steps per path per round")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    from losa_cli.runtime.decode import Decoder

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=64, num_hidden_layers=30,
                                  num_attention_heads=1, num_key_value_heads=1, head_dim=64, vocab_size=256,
                                  tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    past = torch.randint(0, 256, (1, args.past))
    with torch.inference_mode():
        cache = model(input_ids=past, use_cache=True).cache
    new, position = 7, args.past
    inputs = {"input_ids": torch.tensor([[new]]), "attention_mask": torch.ones(1, args.past + 1, dtype=torch.long)}

    def hf(forward):
        def step() -> None:
            with torch.inference_mode():
                forward(**inputs, cache=cache, use_cache=True)
                cache.crop(-1)
        return step

    decoders = {}
    for blocks in (None, "float32"):
        decoder = Decoder.from_model(model, blocks=blocks, max_len=position + 1)
        decoder.reserve(position + 1)
        decoder.prefill(past)
        decoders[blocks] = decoder

    def lean(forward):
        def step() -> None:
            with torch.inference_mode():
                forward(inputs["input_ids"], position, last_only=True)
        return step

    compiled = torch.compile(model.forward, dynamic=False)
    lean_compiled = torch.compile(decoders[None].model, fullgraph=True)
    compile_s = {}
    for name, first_step in (("transformers", hf(compiled)), ("LeanModel", lean(lean_compiled))):
        start = time.perf_counter()
        first_step()
        compile_s[name] = time.perf_counter() - start
    steps = {"transformers eager": hf(model.forward), "transformers torch.compile": hf(compiled),
             "LeanModel eager": lean(decoders[None].model), "LeanModel torch.compile": lean(lean_compiled),
             "native step, blocks dense fp32": lambda: decoders[None].step(new, position),
             "native step, blocks packed fp32": lambda: decoders["float32"].step(new, position)}
    load_before = os.getloadavg()
    times = interleaved_times(steps, args.rounds, args.steps)
    load = {"before": load_before, "after": os.getloadavg()}  # 1, 5, 15-minute averages on the machine
    rows = [{"path": name, "ms_per_step": statistics.median(t) * 1000, "p90_ms": sorted(t)[int(0.9 * len(t))] * 1000}
            for name, t in times.items()]
    command = (f"python benchmarks/decode_overhead.py --threads {args.threads} --past {args.past} "
               f"--steps {args.steps} --rounds {args.rounds}")
    write_json(RESULTS, {"command": command, "rows": rows, "blocks": 30, "width": 64, "past": args.past,
                         "tokens_timed_per_path": args.rounds * args.steps, "compile_s": compile_s,
                         "load_average": load,
                         "environment": environment()})
    print(f"{environment()['machine']['cpu']}, {args.threads} thread(s); {command}")
    for row in rows:
        print(f"{row['path']:<34} {row['ms_per_step']:7.3f} ms per decode step (p90 {row['p90_ms']:.3f})")


if __name__ == "__main__":
    main()
