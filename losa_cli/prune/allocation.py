"""Per-block sparsity from a dense pre-pass: RMI (block similarity) or OWL (outliers).

One sequential pass over the *unpruned* model gathers, block by block, what the allocator
needs -- the block's Gram matrix for RMI, or its Wanda-score outlier ratio for OWL -- so the
representations of all blocks are never held at once.  The math lives in ``rmi.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.sequential import BlockLoader, ProgressFn, sequential_blocks
from ..core.modeling import find_linears
from .rmi import gram_matrix, outlier_ratio, owl_rates, rmi_rates, similarity_matrix
from .wanda import InputNormAccumulator, wanda_scores


@dataclass
class Allocation:
    """Per-block rates and how they were found (all of it goes into the manifest)."""

    kind: str
    rates: list[float]
    settings: dict = field(default_factory=dict)
    similarity: list[list[float]] | None = None
    importance: list[float] | None = None
    outlier_ratios: list[float] | None = None


def rmi_allocation(model: nn.Module, windows: torch.Tensor, device: torch.device, sparsity: float, delta: float,
                   beta: float, progress: ProgressFn | None = None, floor: list[float] | None = None,
                   loader: BlockLoader | None = None, activations_dir: Path | None = None) -> Allocation:
    """Block similarity on ``windows`` (the paper uses 64), then the exact rate assignment
    (each block at least at its ``floor`` sparsity when given)."""
    grams = []
    for step in sequential_blocks(model, windows, device, _relabel(progress, "similarity pass"), loader=loader,
                                  activations_dir=activations_dir):
        grams.append(gram_matrix(step.inputs))
    similarity = similarity_matrix(grams)
    rates, weights = rmi_rates(similarity, sparsity, delta, beta, floor)
    return Allocation("rmi", rates, {"delta": delta, "beta": beta, "samples": int(windows.shape[0])},
                      similarity=similarity.tolist(), importance=weights.tolist())


def owl_allocation(model: nn.Module, windows: torch.Tensor, device: torch.device, sparsity: float, lam: float,
                   multiple: float, progress: ProgressFn | None = None, loader: BlockLoader | None = None,
                   activations_dir: Path | None = None) -> Allocation:
    """OWL outlier ratios from the dense model's Wanda scores, then the OWL rates."""
    ratios = []
    for step in sequential_blocks(model, windows, device, _relabel(progress, "outlier pass"), loader=loader,
                                  activations_dir=activations_dir):
        norms: dict[str, InputNormAccumulator] = {}

        def observer(name: str, linear: nn.Linear):
            norms[name] = InputNormAccumulator(linear.in_features, device)
            return norms[name].add

        step.observe_linear_inputs(observer)
        scores = [wanda_scores(linear.weight, norms[name].norms()) for name, linear in find_linears(step.block).items()]
        ratios.append(outlier_ratio(scores, multiple))
    rates = owl_rates(ratios, sparsity, lam)
    return Allocation("owl", rates, {"lambda": lam, "M": multiple, "samples": int(windows.shape[0])},
                      outlier_ratios=ratios)


def _relabel(progress: ProgressFn | None, label: str) -> ProgressFn | None:
    if progress is None:
        return None
    return lambda _description, done, total: progress(label, done, total)
