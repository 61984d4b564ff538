"""Mask selection from scores and sparsity counting (torch only).

Convention: a *mask* is a bool tensor shaped like the weight that is ``True`` where the weight
is pruned (set to zero).  Selection picks an exact count with ``topk`` rather than a threshold,
so ties can never push a row or layer past its target.
"""

from __future__ import annotations

import torch


def prune_count(total: int, sparsity: float) -> int:
    """Number of weights to prune out of ``total`` for a target rate (nearest integer)."""
    return int(round(total * sparsity))


def rowwise_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest-scoring ``round(in * sparsity)`` weights of every output row (Wanda)."""
    k = prune_count(scores.shape[1], sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        lowest = torch.topk(scores, k, dim=1, largest=False).indices
        mask.scatter_(1, lowest, True)
    return mask


def layerwise_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest-scoring ``round(numel * sparsity)`` weights of the whole layer (magnitude)."""
    k = prune_count(scores.numel(), sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` lowest scores in every group of ``m`` consecutive inputs of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M with M={m} needs the input width to be a multiple of {m}; got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def group_zero_counts(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Zeros in every group of ``m`` consecutive inputs of each row, shaped (rows, cols / m)."""
    rows, cols = weight.shape
    return (weight.detach().reshape(rows, cols // m, m) == 0).sum(dim=2)


def satisfies_nm(weight: torch.Tensor, n: int, m: int, exact: bool = False) -> bool:
    """True when every group of ``m`` consecutive inputs holds at least (``exact``: exactly) ``n`` zeros."""
    zeros = group_zero_counts(weight, m)
    return bool((zeros == n).all() if exact else (zeros >= n).all())


def zero_fraction(weight: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return float((weight == 0).sum()) / weight.numel()
