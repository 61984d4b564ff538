"""Helpers shared by the benchmarks: fixed evaluation windows, environment record, table output."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from losa_cli.core.data import bos_token_to_prepend, consecutive_windows, read_documents, token_stream  # noqa: E402
from losa_cli.core.manifest import library_versions, machine_info  # noqa: E402
from losa_cli.runtime.nll import window_nll  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EVAL_SETS = ("wiki-sample.txt", "enwiki-articles.txt")


def eval_windows(tokenizer, seqlen: int, windows: int) -> dict[str, torch.Tensor]:
    """The first ``windows`` non-overlapping windows of each evaluation set (same for every row)."""
    bos = bos_token_to_prepend(tokenizer)
    return {
        name: consecutive_windows(
            token_stream(tokenizer, read_documents(str(SHARED_DATA / name))), seqlen, windows, bos
        )
        for name in EVAL_SETS
    }


def perplexities(model: torch.nn.Module, windows: dict[str, torch.Tensor], device: str = "cpu") -> dict[str, float]:
    """Perplexity on each evaluation set (the model is moved to ``device``)."""
    out = {}
    model.to(device)
    for name, w in windows.items():
        total, count = window_nll(model, w, torch.device(device))
        out[name] = float(torch.tensor(total / count).exp())
    return out


def environment() -> dict:
    """Versions, machine and threads: printed with every benchmark."""
    return {
        "versions": library_versions(),
        "machine": machine_info(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def interleaved_times(steps: dict, rounds: int, per_round: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds of each call of each step function, the functions taking turns in ``rounds`` rounds of
    ``per_round`` calls, so a change in the machine's load hits every one alike."""
    import time

    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(per_round):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return times
