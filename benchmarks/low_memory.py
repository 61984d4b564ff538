"""Pruning a model larger than its memory budget: a random Llama-2-7B-shaped model, one block at a time.

Builds (once) a bf16 model of Llama-2-7B's shape from its config with random weights, block by
block so the builder never holds it whole either, then times ``losa prune --low-memory`` on it
in a child process and reads the child's peak resident memory (VmHWM, from its manifest).  The
goal: peak RSS <= 25% of the model's size.  Writes benchmarks/results/low_memory.json and prints
a markdown row for the README.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/low_memory.py --workdir /work/runs/low-memory

Budget on 2 cores: ~3 minutes to build (13.5 GB written), then the prune; bf16 matrix products
run at ~10 GFLOP/s on a CPU without native bf16, so the default calibration is small (2 x 64
tokens, ~6 minutes of compute for 32 blocks x 2 passes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import SHARED_DATA, environment, write_json

SHAPES = {
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2),
    # a few seconds: checks the script itself
    "smoke": dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2),
}


def block_bytes(shape: dict) -> int:
    """bf16 bytes of one Llama block: q, k, v, o; gate, up, down; two norms."""
    hidden, mlp = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return 2 * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp + 2 * hidden)


def _tokenizer(vocab_size: int):
    """A byte-level BPE trained on the calibration text (the model is random, so any tokenizer
    whose ids fit its vocabulary exercises the same computation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(SHARED_DATA / "c4-sample.txt")], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build(folder: Path, shape: dict, seed: int) -> dict:
    """Random bf16 weights (normal, std 0.02; norms 1), written one block per shard."""
    import torch
    from transformers import LlamaConfig

    from losa_cli.core.modeling import find_blocks
    from losa_cli.core.offload import ShardWriter, empty_model, module_name

    started = time.perf_counter()
    config = LlamaConfig(**shape)
    model = empty_model(config, torch.bfloat16, trust_remote_code=False)
    blocks = find_blocks(model)
    staging = folder.with_name(folder.name + ".tmp")
    staging.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(staging, module_name(model, blocks), len(blocks))
    generator = torch.Generator().manual_seed(seed)

    def fill(module: torch.nn.Module) -> None:
        state = {name: (torch.ones(t.shape) if "norm" in name else torch.randn(t.shape, generator=generator) * 0.02)
                 .to(torch.bfloat16) for name, t in module.state_dict().items()}
        module.load_state_dict(state, assign=True, strict=False)

    for index, block in enumerate(blocks):
        fill(block)
        writer.write_block(index, block)
        block.to("meta")
        print(f"built block {index + 1}/{len(blocks)}", file=sys.stderr, flush=True)
    fill(model.model.embed_tokens), fill(model.model.norm), fill(model.lm_head)
    writer.write_outside_blocks(model)
    writer.finish()
    model.config.save_pretrained(staging)
    _tokenizer(8000).save_pretrained(staging)
    staging.rename(folder)
    return {"build_s": time.perf_counter() - started, "bytes": writer.total_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/low-memory")
    parser.add_argument("--nsamples", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-2-7b")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "low_memory.json"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    shape = SHAPES[args.shape]
    model = workdir / f"{args.shape}-shape-random"
    built = build(model, shape, args.seed) if not model.exists() else {"build_s": None}
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    command = [sys.executable, "-c", "import sys; from losa_cli.cli import main; sys.argv[0] = 'losa'; main()",
               "prune", "--model", str(model), "--out", str(workdir / "pruned"), "--low-memory", "--dtype", "bfloat16",
               "--method", "wanda", "--sparsity", "0.5", "--calib", str(SHARED_DATA / "c4-sample.txt"),
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
               "--device", "cpu", "--force", "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"losa prune failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    peak = result["peak_memory_mib"] * 2**20
    row = {
        "model": f"random {args.shape} shape, bf16", "shape": shape,
        "model_bytes": model_bytes, "block_bytes": block_bytes(shape),
        "peak_rss_bytes": peak, "peak_share_of_model": peak / model_bytes, "goal_share": 0.25,
        "prune_wall_s": wall, "prune_reported_s": result["wall_time_s"], "build": built,
        "calibration": {"file": "c4-sample.txt", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed},
        "global_sparsity": result["global_sparsity"], "mask_checksum": result["mask_checksum"],
        "command": " ".join(["losa"] + command[3:]), "environment": environment(),
    }
    write_json(Path(args.out), row)
    gib = 2**30
    print("| model | size on disk | peak RSS | share | goal | prune time | calibration |")
    print("|---|---:|---:|---:|---:|---:|---|")
    print(
        f"| {args.shape} shape, random, bf16 | {model_bytes / gib:.1f} GiB | {peak / gib:.2f} GiB | "
        f"{peak / model_bytes:.1%} "
        f"| <= 25% | {wall / 60:.1f} min | {args.nsamples} x {args.seqlen} tokens of c4-sample.txt |"
    )


if __name__ == "__main__":
    main()
