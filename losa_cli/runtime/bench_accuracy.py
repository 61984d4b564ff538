"""How accurate each format a bench times is, measured the way users judge it (``losa bench --data``).

Beside its speed, every row gets the perplexity of that exact format on the evaluation protocol of
``losa eval`` (non-overlapping windows of ``data_seqlen`` tokens, a BOS per window where the
tokenizer adds one) and its teacher-forced top-1 agreement with the fp32 sparse model (the model
folder in PyTorch): at every position, does this format predict the same next token?  Agreement is
judged per position, so one early flip does not spoil the rest as in a free-running greedy comparison.

Formats: the losa engine's sparse precisions through ``LeanModel`` with the packed layers (the kernel's
arithmetic, int8 activations included); its dense row is the reference model itself; ONNX graph sets
(fp32 and int8) through ONNX Runtime -- a DeepSparse row shares the number of the graph it runs.  A
densified copy (the dense timing reference when no dense model is given) computes nothing meaningful
and gets none.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.data import bos_token_to_prepend, consecutive_windows, load_documents, token_stream
from ..core.modeling import load_model
from ..core.sequential import ProgressFn
from .bench_plan import LosaModel
from .config import BenchConfig
from .graph_sets import GraphSet


@dataclass
class FormatAccuracy:
    """One format's accuracy on the evaluation windows."""

    perplexity: float
    top1_agreement: float | None  # share of positions whose argmax equals the fp32 sparse model's
    windows: int
    seqlen: int
    scored_by: str


def _key(timed: GraphSet | LosaModel) -> tuple:
    """Rows that run the same numbers share one measurement."""
    if isinstance(timed, LosaModel):
        return ("losa", timed.role, timed.precision) if timed.kernel else ("reference",)
    return ("onnx", str(timed.folder), timed.precision)


def _score(logits_of: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor,
           reference: list[torch.Tensor] | None) -> tuple[float, list[torch.Tensor], float | None]:
    """Mean next-token NLL over every predicted position, each window's argmax, and the share of them equal
    to ``reference``'s."""
    total, count, agree, predictions = 0.0, 0, 0, []
    for index in range(windows.shape[0]):
        window = windows[index : index + 1]
        logits = logits_of(window).float().reshape(window.shape[1], -1)[:-1]
        total += float(F.cross_entropy(logits, window[0, 1:], reduction="sum"))
        count += window.shape[1] - 1
        predictions.append(logits.argmax(-1))
        if reference is not None:
            agree += int((predictions[-1] == reference[index]).sum())
    return total / count, predictions, (agree / count if reference is not None else None)


def _logits_of(timed: GraphSet | LosaModel, config: BenchConfig, threads: int) -> tuple[Callable | None, str]:
    """How one format computes the logits of a window [1, T] -> [T, vocab], and what runs it (None: skip)."""
    if isinstance(timed, LosaModel):
        from .losa_engine import build_decoder

        decoder, _ = build_decoder(config.model, timed.precision, True, config.trust_remote_code,
                                   max_len=config.data_seqlen)
        decoder.reserve(config.data_seqlen)

        def lean(window: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return decoder.model(window, 0)

        return lean, f"losa lean decoder ({timed.precision} packed)"
    if timed.origin.startswith("densified"):
        return None, "densified copy (its outputs are meaningless)"
    import numpy as np

    from .onnx_io import ort_session

    session = ort_session(timed.path("prefill"), threads)

    def graph(window: torch.Tensor) -> torch.Tensor:
        ids = window.numpy().astype(np.int64)
        return torch.from_numpy(session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0])

    return graph, "ONNX Runtime"


def measure_accuracy(config: BenchConfig, timed_sets: list, threads: int, progress: ProgressFn | None,
                     warnings: list[str]) -> dict[tuple, FormatAccuracy | None]:
    """Accuracy of every distinct format among ``timed_sets`` (the bench plan's graph sets and losa models),
    keyed as ``_key`` keys them; the fp32 sparse model is the reference for agreement."""
    todo = {_key(timed): timed for timed in timed_sets}
    done = 0

    def tick() -> None:
        if progress:
            progress("accuracy", done, len(todo) + 1)

    tick()
    windows, first = _reference(config, warnings)
    reference = first.pop("predictions")
    results: dict[tuple, FormatAccuracy | None] = {("reference",): FormatAccuracy(**first)}
    for key, timed in todo.items():
        done += 1
        tick()
        if key in results:
            continue
        logits_of, scored_by = _logits_of(timed, config, threads)
        if logits_of is None:
            results[key] = None
            continue
        nll, _, agreement = _score(logits_of, windows, reference if _sparse(timed) else None)
        results[key] = FormatAccuracy(math.exp(nll), agreement, int(windows.shape[0]), config.data_seqlen, scored_by)
        gc.collect()
    return results


def _reference(config: BenchConfig, warnings: list[str]) -> tuple[torch.Tensor, dict]:
    """The evaluation windows, and the fp32 sparse model's accuracy and predictions on them (the reference)."""
    loaded = load_model(config.model, "float32", config.trust_remote_code)
    documents = load_documents(config.data, config.encoding, "data file", warnings)
    stream = token_stream(loaded.tokenizer, documents.texts)
    bos = bos_token_to_prepend(loaded.tokenizer)
    windows = consecutive_windows(stream, config.data_seqlen, config.data_windows, bos)
    with torch.inference_mode():
        nll, predictions, _ = _score(lambda w: loaded.model(input_ids=w, use_cache=False).logits, windows, None)
    return windows, {"perplexity": math.exp(nll), "top1_agreement": 1.0, "windows": int(windows.shape[0]),
                     "seqlen": config.data_seqlen, "scored_by": "the model folder in PyTorch (fp32): the reference",
                     "predictions": predictions}


def _sparse(timed: GraphSet | LosaModel) -> bool:
    return timed.role == "sparse"


def accuracy_of(timed: GraphSet | LosaModel, results: dict[tuple, FormatAccuracy | None]) -> FormatAccuracy | None:
    """The measurement of the format one row runs."""
    return results.get(_key(timed))

