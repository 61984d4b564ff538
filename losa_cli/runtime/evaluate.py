"""Workflow of ``losa eval``: perplexity, multiple-choice accuracy (``zeroshot.py``), and zero fractions of any model.

Perplexity follows the protocol in docs/losa-method.md §6: the evaluation text joined with a
blank line, tokenised once, cut into non-overlapping windows of ``seqlen`` tokens; the mean
token NLL over all predicted tokens.  A BOS token starts every window when the model's
tokenizer adds one by default (Gemma, Llama-2); the result says whether it did.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from ..core.data import bos_token_to_prepend, consecutive_windows, load_documents, token_stream
from ..core.errors import ConfigError
from ..core.modeling import clip_seqlen, load_model, resolve_device, sparsity_report
from ..core.sequential import ProgressFn
from .config import EvalConfig
from .nll import onnx_window_nll, window_nll
from .onnx_io import onnx_prefill_graph, tokenizer_folder
from .zeroshot import ZeroShotResult, resolve_tasks, run_zeroshot


@dataclass
class PerplexityResult:
    data: str
    encoding: str | None  # how the data file was decoded (None: a saved or Hub dataset)
    perplexity: float
    mean_nll: float
    seqlen: int
    windows: int
    predicted_tokens: int
    bos_per_window: bool
    dtype: str
    device: str
    wall_time_s: float


@dataclass
class SparsityResult:
    global_sparsity: float
    per_block_sparsity: list[float]
    per_layer_sparsity: dict[str, float]
    mask_checksum: str


@dataclass
class EvalResult:
    model: str
    perplexity: PerplexityResult | None
    sparsity: SparsityResult | None
    zeroshot: ZeroShotResult | None
    warnings: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def _perplexity(config: EvalConfig, tokenizer, seqlen: int, nll_of, dtype: str, device: str,
                warnings: list[str]) -> PerplexityResult:
    """Cut ``--data`` into the protocol's windows and score them with ``nll_of(windows) -> (total, count)``.

    One place for the windows and the result, whether a PyTorch model or an ONNX graph is scored.
    """
    bos = bos_token_to_prepend(tokenizer)
    documents = load_documents(config.data, config.encoding, "data file", warnings)
    windows = consecutive_windows(token_stream(tokenizer, documents.texts), seqlen, config.max_windows, bos)
    started = time.perf_counter()
    total, count = nll_of(windows)
    mean = total / count
    return PerplexityResult(data=config.data, encoding=documents.encoding, perplexity=math.exp(mean), mean_nll=mean,
                            seqlen=seqlen, windows=int(windows.shape[0]), predicted_tokens=count,
                            bos_per_window=bos is not None,
                            dtype=dtype, device=device, wall_time_s=time.perf_counter() - started)


def _eval_onnx(config: EvalConfig, graph, progress: ProgressFn | None) -> EvalResult:
    """Perplexity of an exported prefill graph through ONNX Runtime (same windows as a PyTorch model)."""
    from transformers import AutoTokenizer


    if config.sparsity or config.tasks is not None or config.data is None:
        raise ConfigError(
            "an ONNX graph gets perplexity only: give --data, and count zeros or run --tasks on the model folder"
        )
    if config.dtype != "float32" or config.device not in ("auto", "cpu"):
        raise ConfigError("ONNX graphs run on ONNX Runtime's CPU in their own precision: drop --dtype and --device")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(graph, config.tokenizer))
    warnings: list[str] = []
    ppl = _perplexity(
        config,
        tokenizer,
        config.seqlen,
        lambda windows: onnx_window_nll(graph, windows, torch.get_num_threads(), config.batch_size, progress),
        "graph's own (ONNX)",
        "cpu (onnxruntime)",
        warnings,
    )
    return EvalResult(model=config.model, perplexity=ppl, sparsity=None, zeroshot=None, warnings=warnings)


def run_eval(config: EvalConfig, progress: ProgressFn | None = None) -> EvalResult:
    """``losa eval``: perplexity on ``--data``, accuracy on ``--tasks`` and/or the zero fractions of the model
    (perplexity only for ONNX graphs)."""
    graph = onnx_prefill_graph(config.model)
    if graph is not None:
        return _eval_onnx(config, graph, progress)
    tasks = (
        resolve_tasks(config.tasks) if config.tasks is not None else None
    )  # bad task files fail before the model loads
    device = resolve_device(config.device)
    loaded = load_model(config.model, config.dtype, config.trust_remote_code)
    warnings: list[str] = []
    sparsity = None
    if config.sparsity:
        per_layer, per_block, global_sparsity, checksum = sparsity_report(loaded.model)
        sparsity = SparsityResult(global_sparsity, per_block, per_layer, checksum)
    ppl = None
    if config.data is not None:
        seqlen = clip_seqlen(loaded.model, config.seqlen, warnings)
        ppl = _perplexity(
            config,
            loaded.tokenizer,
            seqlen,  # moving the model to the device is timed, as before
            lambda windows: window_nll(loaded.model.to(device), windows, device, config.batch_size, progress),
            config.dtype,
            str(device),
            warnings,
        )
    zeroshot = None
    if tasks is not None:
        zeroshot = run_zeroshot(
            loaded.model, loaded.tokenizer, tasks, config.num_fewshot, config.limit, config.batch_size, device, progress
        )
    return EvalResult(model=config.model, perplexity=ppl, sparsity=sparsity, zeroshot=zeroshot, warnings=warnings)
