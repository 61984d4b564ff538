"""Speed of losa's sparse kernel: batch-1 matrix-vector products against dense F.linear and the ceiling.

For each shape, sparsity (0/50/70/90%), value format (fp32, bf16, int8 + bitmask) and kernel path
(``avx2``, ``generic``), one "step" multiplies a vector by K distinct copies of the layer, K
chosen so the step reads more than the CPU's caches (``--step-mb``, default 512 MB of dense fp32),
as a decode step reads every layer once.  Reported per layer: median time, GB/s read (the format's
bytes: mask, values, offsets, scales), effective GFLOP/s (2 x rows x cols / time), the share of the
bandwidth ceiling (GB/s over the best read rate seen: numpy's sum or dense F.linear), and the speed-up over dense fp32
``F.linear`` on the same shape in the same run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/kernel_speed.py --threads 1 --recovered runs/default/recover

With ``--recovered``, also the decode of that model end to end in PyTorch: dense, then with every
block linear layer replaced by ``SparseLinear`` (fp32, bf16, int8 values), in the same run.

Budget: about 5 minutes on 2 cores (AMD EPYC Zen 3).  Writes benchmarks/results/kernel_speed.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import environment, write_json
from losa_cli.runtime.ceiling import measure_bandwidth
from losa_cli.runtime.kernels.native import available_paths, extension
from losa_cli.runtime.kernels.packed import pack

SHAPES = {"SmolLM2 MLP up (1536 x 576)": (1536, 576), "SmolLM2 MLP down (576 x 1536)": (576, 1536),
          "Llama-2-7B MLP (11008 x 4096)": (11008, 4096)}


def _median_ms(run, repeats: int) -> float:
    run()  # warm-up: page faults, first-touch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _copies(rows: int, cols: int, step_mb: int) -> int:
    return max(1, -(-step_mb * 2**20 // (rows * cols * 4)))


def bench_shape(name: str, rows: int, cols: int, sparsities: list[float], dtypes: list[str], paths: list[str],
                step_mb: int, repeats: int, bandwidth: float) -> list[dict]:
    copies = _copies(rows, cols, step_mb)
    generator = torch.Generator().manual_seed(0)
    dense = [torch.randn(rows, cols, generator=generator) for _ in range(copies)]
    x = torch.randn(1, cols, generator=generator)
    dense_ms = _median_ms(lambda: [F.linear(x, w) for w in dense], repeats) / copies
    dense_bytes = rows * cols * 4
    rows_out = [{"shape": name, "rows": rows, "cols": cols, "sparsity": 0.0, "format": "dense fp32", "path": "F.linear",
                 "copies": copies, "ms": dense_ms, "bytes": dense_bytes, "gb_s": dense_bytes / dense_ms / 1e6,
                 "gflop_s": 2 * rows * cols / dense_ms / 1e6, "share": dense_bytes / (bandwidth * 1e6) / dense_ms,
                 "speedup_vs_dense": 1.0}]
    module = extension()
    for sparsity in sparsities:
        pruned = []
        for weight in dense:
            mask = torch.rand(rows, cols, generator=generator) < sparsity
            pruned.append(weight.masked_fill(mask, 0.0))
        for dtype in dtypes:
            packed = [pack(w, dtype) for w in pruned]
            padded = torch.zeros(1, packed[0].cols_padded)
            padded[:, :cols] = x
            empty = torch.empty(0)
            nbytes = packed[0].nbytes()
            for path in paths:
                def step(path=path, packed=packed, padded=padded, empty=empty):
                    for p in packed:
                        module.sparse_matmul(padded, p.mask, p.values, p.row_offsets,
                                             p.scale if p.scale is not None else empty, path)
                ms = _median_ms(step, repeats) / copies
                rows_out.append(
                    {
                        "shape": name,
                        "rows": rows,
                        "cols": cols,
                        "sparsity": sparsity,
                        "format": f"{dtype} + bitmask",
                        "path": path,
                        "copies": copies,
                        "ms": ms,
                        "bytes": nbytes,
                        "gb_s": nbytes / ms / 1e6,
                        "gflop_s": 2 * rows * cols / ms / 1e6,
                        "share": nbytes / (bandwidth * 1e6) / ms,
                        "speedup_vs_dense": dense_ms / ms,
                    }
                )
            del packed
    return rows_out


def decode_step_ms(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> tuple[float, list[int]]:
    """Median time of one greedy decode step with the KV cache (lean loop: one forward per token)."""
    times, tokens = [], []
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        for _ in range(steps + 1):
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1000, tokens


def end_to_end(recovered: str, prompt_tokens: int, steps: int, rounds: int) -> list[dict]:
    """Decode of the recovered model: dense PyTorch, then its linears as SparseLinear per format.

    The variants run in interleaved rounds and each keeps its best round: this VM's neighbours
    move single timings by up to 1.5x, and interleaving lets every variant see the same quiet spells."""
    from common import SHARED_DATA
    from losa_cli.core.data import read_documents
    from losa_cli.core.modeling import load_model
    from losa_cli.core.offload import module_name
    from losa_cli.runtime.kernels.sparse_linear import block_linear_names, sparsify

    loaded = load_model(recovered)
    ids = loaded.tokenizer(read_documents(str(SHARED_DATA / "wiki-sample.txt"))[0], return_tensors="pt")["input_ids"]
    prompt = ids[:, :prompt_tokens]
    names = block_linear_names(loaded.model)
    head = module_name(loaded.model, loaded.model.get_output_embeddings())
    variants = {"dense fp32 (PyTorch)": loaded.model}
    for dtype, with_head in (
        ("float32", False),
        ("bfloat16", False),
        ("int8", False),
        ("bfloat16", True),
        ("int8", True),
    ):
        model = load_model(recovered).model
        sparsify(model, names + ([head] if with_head else []), dtype)
        variants[f"{dtype} + bitmask ({'blocks and head' if with_head else 'blocks; head dense fp32'})"] = model
    best: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    for _ in range(rounds):
        for name, model in variants.items():
            ms, tokens[name] = decode_step_ms(model, prompt, steps)
            best[name] = min(best.get(name, float("inf")), ms)
    dense = "dense fp32 (PyTorch)"
    return [
        {
            "model": recovered,
            "format": name,
            "ms_per_token": best[name],
            "speedup": best[dense] / best[name],
            "greedy_agreement": sum(a == b for a, b in zip(tokens[name], tokens[dense])) / len(tokens[dense]),
            "rounds": rounds,
        }
        for name in variants
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=max(1, (torch.get_num_threads() or 2) - 1))
    parser.add_argument("--sparsities", default="0,0.5,0.7,0.9")
    parser.add_argument("--dtypes", default="float32,bfloat16,int8")
    parser.add_argument("--step-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recovered", help="Also time decode of this (recovered) model folder end to end.")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument(
        "--rounds", type=int, default=3, help="Interleaved rounds of the end-to-end decode (best kept)."
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernel_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = available_paths()
    bandwidth = measure_bandwidth(args.threads)
    rows = []
    for name, (out_features, in_features) in SHAPES.items():
        rows += bench_shape(
            name,
            out_features,
            in_features,
            [float(s) for s in args.sparsities.split(",")],
            args.dtypes.split(","),
            paths,
            args.step_mb,
            args.repeats,
            bandwidth,
        )
        print(f"done: {name}", flush=True)
    # numpy's one-thread sum under-reads this machine (dense F.linear streams faster): the ceiling is
    # the faster of the two, so no row can claim more than 100% of it
    ceiling = max([bandwidth] + [r["gb_s"] for r in rows if r["path"] == "F.linear"])
    for r in rows:
        r["share"] = r["gb_s"] / ceiling
    decode = end_to_end(args.recovered, args.prompt_tokens, args.decode_steps, args.rounds) if args.recovered else []
    write_json(
        Path(args.out),
        {
            "threads": args.threads,
            "paths": paths,
            "read_bandwidth_gb_s": bandwidth,
            "ceiling_gb_s": ceiling,
            "step_mb": args.step_mb,
            "repeats": args.repeats,
            "rows": rows,
            "decode": decode,
            "command": f"python benchmarks/kernel_speed.py --threads {args.threads}",
            "environment": environment(),
        },
    )
    print(
        f"read bandwidth {bandwidth:.1f} GB/s (numpy sum), ceiling {ceiling:.1f} GB/s (best of that and dense "
        "F.linear) "
        f"at {args.threads} thread(s); paths: {', '.join(paths)}"
    )
    print("| layer | sparsity | format | path | µs | GB/s | GFLOP/s | share of ceiling | vs dense F.linear |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['sparsity']:.0%} | {r['format']} | {r['path']} | {r['ms'] * 1000:.0f} | "
            f"{r['gb_s']:.1f} | {r['gflop_s']:.1f} | {r['share']:.0%} | {r['speedup_vs_dense']:.2f}x |"
        )
    if decode:
        print(
            f"\ndecode, batch 1, {args.prompt_tokens}-token prompt, median of {args.decode_steps} steps, best of "
            f"{args.rounds} interleaved rounds, {args.threads} thread(s)"
        )
        print("| model | weights | ms per token | tokens/s | vs dense PyTorch | greedy tokens equal |")
        print("|---|---|---:|---:|---:|---:|")
        for r in decode:
            print(
                f"| {r['model']} | {r['format']} | {r['ms_per_token']:.1f} | {1000 / r['ms_per_token']:.1f} | "
                f"{r['speedup']:.2f}x | {r['greedy_agreement']:.0%} |"
            )


if __name__ == "__main__":
    main()
