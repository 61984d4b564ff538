"""Sequential pruning of a model's blocks with one criterion (shared by prune and recover).

For each block, on the outputs of the already-pruned blocks before it: collect fp32 statistics
of every linear layer's inputs (input norms for Wanda, the Hessian for SparseGPT), prune each
layer to the block's rate (or N:M), then re-run the block for the next one.  Weights that are
already zero are always pruned first, so pruning never revives a weight (LoSA prunes the same
model again at every stage).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..core.config import CalibrationConfig
from ..core.data import bos_token_to_prepend, document_windows, load_documents, sample_windows, token_stream
from ..core.errors import ConfigError, NumericalError
from ..core.modeling import clip_seqlen, find_blocks, find_linears
from ..core.sequential import BlockLoader, ProgressFn, move_all_but_blocks, sequential_blocks
from .config import parse_nm
from .masks import layerwise_mask, nm_mask, rowwise_mask
from .reconstruction import Reconstructor
from .sparsegpt import CholeskyError, HessianAccumulator, sparsegpt_prune
from .wanda import InputNormAccumulator, magnitude_scores, wanda_scores

OutputsFn = Callable[[int, list[torch.Tensor]], None]


@dataclass
class Criterion:
    """How to prune: the method, an optional N:M pattern, and SparseGPT's settings."""

    method: str
    nm: tuple[int, int] | None = None
    damp: float = 0.01
    blocksize: int = 128


def check_nm_widths(model: nn.Module, pattern: str) -> None:
    """Every pruned layer's input width must be a multiple of M."""
    _, m = parse_nm(pattern)
    for index, block in enumerate(find_blocks(model)):
        for name, linear in find_linears(block).items():
            if linear.in_features % m:
                raise ConfigError(
                    f"--pattern {pattern}: block {index} {name} has input width {linear.in_features}, not a "
                    f"multiple of {m}"
                )


class CalibrationWindows(NamedTuple):
    """Calibration token windows, and the encoding their file was read with (for the manifest)."""

    windows: torch.Tensor
    encoding: str | None  # None: a saved or Hub dataset, already text


def calibration_windows(
    model: nn.Module, tokenizer, calibration: CalibrationConfig, warnings: list[str]
) -> CalibrationWindows:
    """Sample the windows ``calibration`` describes (``sampling``: "stream" or "document", see
    ``core/data.py``), clipping its ``seqlen`` to the model's context (with a warning).  Taking the
    whole config keeps every caller on the same file, encoding, count, length, seed and sampling."""
    source, seed = calibration.calib, calibration.seed
    documents = load_documents(source, calibration.encoding, "calibration file", warnings)
    seqlen = clip_seqlen(model, calibration.seqlen, warnings)
    if calibration.sampling == "document":
        windows = document_windows(tokenizer, documents.texts, calibration.nsamples, seqlen, seed, source)
    else:
        stream = token_stream(tokenizer, documents.texts)
        windows = sample_windows(stream, calibration.nsamples, seqlen, seed, bos_token_to_prepend(tokenizer), source)
    return CalibrationWindows(windows, documents.encoding)


def _select_mask(scores: torch.Tensor, rate: float, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    if nm is not None:
        return nm_mask(scores, *nm)
    return rowwise_mask(scores, rate) if per_row else layerwise_mask(scores, rate)


@torch.no_grad()
def prune_linear(linear: nn.Linear, criterion: Criterion, rate: float, stats, where: str) -> list[str]:
    """Prune one layer in place (already-zero weights first); returns warnings.

    Raises if any weight that was zero before is not zero after: pruned weights never come back.
    """
    weight = linear.weight
    already = weight == 0
    warnings = []
    if criterion.method == "sparsegpt":
        try:
            result = sparsegpt_prune(
                weight, stats.inverse(criterion.damp), rate, criterion.nm, criterion.blocksize, criterion.damp,
                prune_first=already,
            )
        except CholeskyError as exc:
            raise NumericalError(
                f"{where}: {exc}; raise --damp (now {criterion.damp:g}) or use more calibration data"
            ) from None
        weight.copy_(result.weight.to(weight.dtype))
        warnings = [f"{where}: {w}" for w in result.warnings]
    else:
        scores = wanda_scores(weight, stats.norms()) if criterion.method == "wanda" else magnitude_scores(weight)
        scores.masked_fill_(already, -1.0)
        weight.masked_fill_(_select_mask(scores, rate, criterion.nm, per_row=criterion.method == "wanda"), 0.0)
    came_back = int((weight[already] != 0).sum())
    if came_back:
        raise NumericalError(
            f"{where}: {came_back} weights that were zero became non-zero while pruning; "
            "not saving -- this is a bug in losa, please report it"
        )
    return warnings


def prune_blocks(
    model: nn.Module,
    criterion: Criterion,
    rates: list[float],
    windows: torch.Tensor | None,
    device: torch.device,
    progress: ProgressFn | None = None,
    on_outputs: OutputsFn | None = None,
    loader: BlockLoader | None = None,
    activations_dir: Path | None = None,
    reconstructor: Reconstructor | None = None,
) -> list[str]:
    """Prune every block's linear layers in place, sequentially; returns warnings.

    ``windows`` may be None for magnitude pruning, which needs no activations.  ``on_outputs``
    receives each pruned block's outputs (LoSA measures reconstruction error with them).
    ``loader`` brings each block into memory and takes it out again (``--low-memory``);
    ``activations_dir`` keeps the windows' hidden states in files there.  With ``reconstructor``
    each pruned block is fitted to its dense outputs before the next block sees it
    (``reconstruction.py``; its ``fits`` say how it went).
    """
    warnings: list[str] = []
    blocks = find_blocks(model)
    if windows is None:
        if criterion.method != "magnitude" or reconstructor is not None:
            raise ValueError(f"{criterion.method} needs calibration windows")
        for index, block in enumerate(blocks):
            if loader is not None:
                loader.load(index, block, device)
            for name, linear in find_linears(block).items():
                warnings += prune_linear(linear, criterion, rates[index], None, f"block {index} {name}")
            if loader is not None:
                loader.release(index, block)
            if progress:
                progress("blocks", index + 1, len(blocks))
        return warnings
    accumulator = HessianAccumulator if criterion.method == "sparsegpt" else InputNormAccumulator
    make = None if criterion.method == "magnitude" else (lambda linear: accumulator(linear.in_features, device))
    try:
        for step in sequential_blocks(model, windows, device, progress, on_outputs, loader, activations_dir):
            if reconstructor is not None:
                stats = reconstructor.observe(step, make)
            else:
                stats = {} if make is None else step.observe_linear_inputs(make)
            for name, linear in find_linears(step.block).items():
                warnings += prune_linear(
                    linear, criterion, rates[step.index], stats.get(name), f"block {step.index} {name}"
                )
            if reconstructor is not None:
                reconstructor.fit(step, len(blocks))
    finally:
        if reconstructor is not None:
            reconstructor.close()
    return warnings


def revived(pruned: dict[str, torch.Tensor], linears: dict[str, nn.Linear]) -> dict[str, int]:
    """Layers in which weights flagged in ``pruned`` (True = pruned) are non-zero, with counts.

    Every stage checks its result against the mask of the stage before with this: pruned
    weights never come back."""
    counts = {}
    for name, mask in pruned.items():
        weight = linears[name].weight.detach()
        count = int((weight[mask.to(weight.device)] != 0).sum())
        if count:
            counts[name] = count
    return counts


class _HeadInputsSeen(Exception):
    """Stops a forward pass once the output head's inputs are recorded (the logits are not needed)."""


def untie_lm_head(model: nn.Module) -> bool:
    """Give the output head its own copy of a tied embedding matrix; returns whether it was tied.

    Pruning a tied head would zero the embedding rows too; the copy costs one matrix on disk
    (stated in the manifest) and leaves the input embedding intact.
    """
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None or head.weight is not embedding.weight:
        return False
    head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return True


@torch.no_grad()
def prune_lm_head(
    model: nn.Module, criterion: Criterion, rate: float, windows: torch.Tensor | None, device: torch.device
) -> list[str]:
    """Prune the output head (untied first) with the same criterion, on the inputs it sees.

    Its inputs are the final-normed hidden states of the already pruned blocks, recorded by a
    pre-hook that stops each forward pass before the (vocabulary-wide) logits are computed.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ConfigError("--prune-lm-head: this model has no linear output head")
    stats = None
    if criterion.method != "magnitude":
        if windows is None:
            raise ValueError(f"{criterion.method} needs calibration windows")
        accumulator = HessianAccumulator if criterion.method == "sparsegpt" else InputNormAccumulator
        stats = accumulator(head.in_features, device)

        def record(_module: nn.Module, args: tuple) -> None:
            stats.add(args[0].to(device))
            raise _HeadInputsSeen

        handle = head.register_forward_pre_hook(record)
        home = next(find_blocks(model)[0].parameters()).device
        move_all_but_blocks(model, find_blocks(model), home)  # the sequential pass left them on ``device``
        try:
            for row in range(windows.shape[0]):
                try:
                    model(input_ids=windows[row : row + 1].to(home), use_cache=False)
                except _HeadInputsSeen:
                    pass
        finally:
            handle.remove()
    return prune_linear(head, criterion, rate, stats, "lm_head")
