"""Per-block sparsity: one rate for all, N:M, a file, or from a pre-pass -- RMI (block similarity) or
OWL (outliers) -- for ``losa prune`` and for every stage of ``losa recover`` alike (``block_rates``).

One sequential pass over the model as it is gathers, block by block, what the allocator needs --
the block's Gram matrix for RMI, or its Wanda-score outlier ratio for OWL -- so the
representations of all blocks are never held at once.  The math lives in ``rmi.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.modeling import find_blocks, find_linears
from ..core.sequential import BlockLoader, ProgressFn, sequential_blocks
from .config import OWL_LAMBDA, OWL_M, Allocation, Method, load_per_layer
from .rmi import (
    DEFAULT_BETA,
    default_delta,
    gram_matrix,
    outlier_ratio,
    owl_rates,
    rmi_rates,
    similarity_matrix,
)
from .wanda import InputNormAccumulator, wanda_scores


@dataclass
class RateRule:
    """How each block's rate is chosen: the fields ``losa prune`` and ``losa recover`` share."""

    allocation: Allocation
    method: Method
    delta: float | None = None  # RMI: max deviation from the target (None: by band, ``default_delta``)
    beta: float | None = None  # RMI: importance temperature (None: the method's ``DEFAULT_BETA``)
    rmi_samples: int = 64
    owl_lambda: float = OWL_LAMBDA
    owl_m: float = OWL_M

    @classmethod
    def of(cls, config) -> RateRule:
        """The rule of a ``PruneConfig`` or ``RecoverConfig`` (both carry these fields)."""
        return cls(config.allocation, config.method, config.delta, config.beta, config.rmi_samples, config.owl_lambda,
                   config.owl_m)


def block_rates(model: nn.Module, rule: RateRule, target: float, windows: torch.Tensor | None, device: torch.device,
                *, nm: tuple[int, int] | None = None, per_layer: str | None = None, floor: list[float] | None = None,
                progress: ProgressFn | None = None, loader: BlockLoader | None = None,
                activations_dir: Path | None = None, grams: list[torch.Tensor] | None = None) -> BlockRates:
    """Per-block target rates: N:M's n/m, an explicit file, RMI, OWL, or ``target`` for all.

    ``floor``: each block's current sparsity (recover prunes the same model again at every stage):
    no rate goes below it, so pruning never has to revive a weight.  ``grams``: RMI's Gram matrices
    of the model as it is, made by a pass that ran anyway (the similarity pass is then skipped)."""
    num_blocks = len(find_blocks(model))
    if nm is not None:
        n, m = nm
        return BlockRates("nm", [n / m] * num_blocks)
    if per_layer:
        return BlockRates("file", load_per_layer(per_layer, num_blocks), {"file": per_layer})
    if rule.allocation == Allocation.RMI and target > 0:
        delta = rule.delta if rule.delta is not None else default_delta(target)
        beta = rule.beta if rule.beta is not None else DEFAULT_BETA[rule.method]
        return rmi_allocation(model, windows[: rule.rmi_samples], device, target, delta, beta, progress, floor=floor,
                              loader=loader, activations_dir=activations_dir, grams=grams)
    if rule.allocation == Allocation.OWL and target > 0:
        found = owl_allocation(model, windows, device, target, rule.owl_lambda, rule.owl_m, progress, loader=loader,
                               activations_dir=activations_dir)
        found.rates = [max(rate, least) for rate, least in zip(found.rates, floor or found.rates)]
        return found
    return BlockRates("uniform", [max(target, least) for least in floor or [target] * num_blocks])


@dataclass
class BlockRates:
    """Per-block rates and how they were found (all of it goes into the manifest)."""

    kind: str
    rates: list[float]
    settings: dict = field(default_factory=dict)
    similarity: list[list[float]] | None = None
    importance: list[float] | None = None
    outlier_ratios: list[float] | None = None


def rmi_allocation(model: nn.Module, windows: torch.Tensor, device: torch.device, sparsity: float, delta: float,
                   beta: float, progress: ProgressFn | None = None, floor: list[float] | None = None,
                   loader: BlockLoader | None = None, activations_dir: Path | None = None,
                   grams: list[torch.Tensor] | None = None) -> BlockRates:
    """Block similarity on ``windows`` (the paper uses 64), then the exact rate assignment
    (each block at least at its ``floor`` sparsity when given).  Given ``grams`` (one per block, made
    on these windows by a pass over the same model), no pass is run."""
    if grams is None:
        grams = []
        for step in sequential_blocks(model, windows, device, _relabel(progress, "similarity pass"), loader=loader,
                                      activations_dir=activations_dir):
            grams.append(gram_matrix(step.inputs))
    similarity = similarity_matrix(grams)
    rates, weights = rmi_rates(similarity, sparsity, delta, beta, floor)
    return BlockRates("rmi", rates, {"delta": delta, "beta": beta, "samples": int(windows.shape[0])},
                      similarity=similarity.tolist(), importance=weights.tolist())


def owl_allocation(model: nn.Module, windows: torch.Tensor, device: torch.device, sparsity: float, lam: float,
                   multiple: float, progress: ProgressFn | None = None, loader: BlockLoader | None = None,
                   activations_dir: Path | None = None) -> BlockRates:
    """OWL outlier ratios from the dense model's Wanda scores, then the OWL rates."""
    ratios = []
    for step in sequential_blocks(model, windows, device, _relabel(progress, "outlier pass"), loader=loader,
                                  activations_dir=activations_dir):
        norms = step.observe_linear_inputs(lambda linear: InputNormAccumulator(linear.in_features, device))
        scores = [wanda_scores(linear.weight, norms[name].norms()) for name, linear in find_linears(step.block).items()]
        ratios.append(outlier_ratio(scores, multiple))
    rates = owl_rates(ratios, sparsity, lam)
    return BlockRates("owl", rates, {"lambda": lam, "M": multiple, "samples": int(windows.shape[0])},
                      outlier_ratios=ratios)


def _relabel(progress: ProgressFn | None, label: str) -> ProgressFn | None:
    if progress is None:
        return None
    return lambda _description, done, total: progress(label, done, total)
