"""Wall time of one-shot ``losa prune`` on SmolLM2-135M before and after a change, and whether the masks agree.

Each run is the real command in its own process, on the source tree given (``--tree``: a checkout or
``git archive`` export of the code to time; default this tree):
    losa prune --model smollm2-135m --out WORK/LABEL --method wanda --sparsity 0.7 --calib c4-sample.txt
               --nsamples 128 --seqlen 512 --seed 0 --force --json
Run the two labels one after the other (never at once: they share 2 cores), then compare:
    git archive BASE | tar -x -C /tmp/base
    python benchmarks/prune_speed.py --label before --tree /tmp/base
    python benchmarks/prune_speed.py --label after
    python benchmarks/prune_speed.py --compare before after
One pruning pass of a recover stage (RMI similarity pass + Wanda pass, 32 x 256 windows as in the default
recipe, timed after loading): ``--stage-pass --label before --tree /tmp/base`` and ``--stage-pass --label after``.
The comparison loads both outputs and reports whether block 0's masks are bit-identical (its
statistics come from the same embeddings either way), how many layers' masks agree in the whole
model, and the largest weight difference.  Results go to benchmarks/results/prune_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from common import SHARED_DATA, write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "prune_speed.json"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def run(label: str, tree: Path, work: Path, args: argparse.Namespace) -> dict:
    out = work / label
    prune_args = ["prune", "--model", "smollm2-135m", "--out", str(out), "--method", args.method, "--sparsity",
                  str(args.sparsity), "--calib", str(SHARED_DATA / "c4-sample.txt"), "--nsamples", str(args.nsamples),
                  "--seqlen", str(args.seqlen), "--seed", "0", "--force", "--json", *args.extra]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_WAIT_POLICY": "PASSIVE"}
    load_before = os.getloadavg()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from losa_cli.cli import main; main()", *prune_args], env=env,
                          capture_output=True, text=True, cwd=tree)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    result = json.loads(done.stdout)
    return {"label": label, "tree": str(tree), "command": "losa " + shlex.join(prune_args), "wall_s": seconds,
            "reported_s": result["wall_time_s"], "mask_checksum": result["mask_checksum"],
            "load_average": {"before": load_before, "after": os.getloadavg()}, "torch_threads": torch.get_num_threads()}


#: one pruning pass of a ``losa recover`` stage as the default recipe runs it (32 x 256 calibration windows,
#: RMI on 32, Wanda), timed inside the process after the model is loaded
STAGE_PASS = """
import json, time, torch
from losa_cli.core.data import bos_token_to_prepend, read_documents, sample_windows, token_stream
from losa_cli.core.modeling import load_model
from losa_cli.prune import Criterion, RateRule, block_rates, prune_blocks
loaded = load_model("smollm2-135m")
path = "{calib}"
windows = sample_windows(token_stream(loaded.tokenizer, read_documents(path)), 32, 256, 0,
                         bos_token_to_prepend(loaded.tokenizer), path)
cpu = torch.device("cpu")
started = time.perf_counter()
rates = block_rates(loaded.model, RateRule("rmi", "wanda", rmi_samples=32), {sparsity}, windows, cpu).rates
similarity = time.perf_counter() - started
prune_blocks(loaded.model, Criterion("wanda"), rates, windows, cpu)
print(json.dumps({{"similarity_s": similarity, "pass_s": time.perf_counter() - started}}))
"""


def stage_pass(label: str, tree: Path, sparsity: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_WAIT_POLICY": "PASSIVE"}
    load_before = os.getloadavg()
    code = STAGE_PASS.format(calib=SHARED_DATA / "c4-sample.txt", sparsity=sparsity)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tree)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return {"label": label, "tree": str(tree), **json.loads(done.stdout.strip().splitlines()[-1]),
            "load_average": {"before": load_before, "after": os.getloadavg()}}


def compare(work: Path, first: str, second: str) -> dict:
    a, b = _tensors(work / first), _tensors(work / second)
    linear = [name for name in a if name.endswith("proj.weight") or name.endswith("fc1.weight")
              or name.endswith("fc2.weight")]
    same_mask = {name: torch.equal(a[name] == 0, b[name] == 0) for name in linear}
    block0 = [name for name in linear if ".layers.0." in name]
    return {
        "first_block_masks_identical": all(same_mask[name] for name in block0),
        "first_block_weights_identical": all(torch.equal(a[name], b[name]) for name in block0),
        "layers_with_identical_masks": f"{sum(same_mask.values())} / {len(linear)}",
        "whole_model_identical": all(torch.equal(a[name], b[name]) for name in a),
        "max_abs_weight_difference": max(float((a[name] - b[name]).abs().max()) for name in a),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label")
    parser.add_argument("--tree", type=Path, default=REPO)
    parser.add_argument("--compare", nargs=2, metavar=("FIRST", "SECOND"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/losa-prune-speed"))
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--extra", nargs="*", default=[], help="more prune arguments")
    parser.add_argument("--stage-pass", action="store_true",
                        help="time one recover-stage pruning pass (RMI similarity + Wanda, 32 x 256 windows) instead")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}, "comparisons": []}
    if args.label and args.stage_pass:
        results.setdefault("stage_pass", {})[args.label] = stage_pass(args.label, args.tree.resolve(), args.sparsity)
        print(json.dumps(results["stage_pass"][args.label], indent=1))
    elif args.label:
        results["runs"][args.label] = run(args.label, args.tree.resolve(), args.work, args)
        print(json.dumps(results["runs"][args.label], indent=1))
    if args.compare:
        found = {"between": args.compare, **compare(args.work, *args.compare)}
        results["comparisons"].append(found)
        print(json.dumps(found, indent=1))
    write_json(args.out, results)


if __name__ == "__main__":
    main()
