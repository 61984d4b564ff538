"""SparseGPT: Hessian accumulation and OBS prune-and-update (pure math, torch only).

Frantar & Alistarh (2023).  For a layer with inputs X, H = 2 X X^T / N.  Columns are processed
left to right in blocks; within a block the mask is chosen by the OBS saliency
w^2 / [H_F^-1]_jj^2 (F = columns not yet processed, read off the upper Cholesky factor of H^-1),
and every pruned weight's error is pushed onto the columns to its right so that the layer
output changes as little as possible.  Everything runs in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .masks import prune_count


class HessianAccumulator:
    """Running estimate of H = 2 X X^T / N in fp32, updated batch by batch."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs shaped (..., in_features)."""
        flat = x.reshape(-1, x.shape[-1]).to(self.hessian.device, torch.float32)
        new = flat.shape[0]
        # Keep a running mean so the entries stay O(1) however many tokens are added.
        self.hessian *= self.tokens / (self.tokens + new)
        self.tokens += new
        scaled = flat * (2.0 / self.tokens) ** 0.5
        self.hessian += scaled.T @ scaled

    def inverse(self, damp: float) -> HessianInverse:
        """``invert_hessian`` of the accumulated H, computed once: layers that read the same input
        (q/k/v, gate/up) share this accumulator and so one factorisation."""
        cached = getattr(self, "_inverse", None)
        if cached is None or cached[0] != damp:
            self._inverse = (damp, invert_hessian(self.hessian, damp))
        return self._inverse[1]


@dataclass
class HessianInverse:
    """What pruning needs of H: the upper Cholesky factor of the damped inverse, the columns no
    input ever reached (``dead``: zero diagonal, their weights are pruned), the damping used."""

    upper: torch.Tensor
    dead: torch.Tensor
    damp: float


def invert_hessian(hessian: torch.Tensor, damp: float) -> HessianInverse:
    """Dead columns get a unit diagonal, then ``inverse_cholesky_upper`` (raising the damping if needed)."""
    h = hessian.detach().clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    upper, used = inverse_cholesky_upper(h, damp)
    return HessianInverse(upper, dead, used)


@dataclass
class SparseGPTResult:
    """Pruned-and-updated weight, its mask (True = pruned), and the damping actually used."""

    weight: torch.Tensor
    mask: torch.Tensor
    damp: float
    warnings: list[str] = field(default_factory=list)


class CholeskyError(RuntimeError):
    """H + damping was not positive definite even at the largest damping tried."""


def inverse_cholesky_upper(hessian: torch.Tensor, damp: float, max_damp: float = 1.0) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1.

    On failure the damping is raised tenfold up to ``max_damp``; returns the factor and the
    damping that worked, or raises ``CholeskyError`` naming what was tried.
    """
    tried = []
    scale = torch.mean(torch.diag(hessian))
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    current = damp
    while True:
        tried.append(current)
        damped = hessian + current * scale * eye
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0 and torch.isfinite(factor).all():
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, current
        if current * 10 > max_damp + 1e-12 or not torch.isfinite(hessian).all():
            raise CholeskyError(
                f"Cholesky of the Hessian failed with damping {', '.join(f'{d:g}' for d in tried)}"
                + (
                    " (the Hessian holds NaN/inf: check the calibration activations)"
                    if not torch.isfinite(hessian).all()
                    else ""
                )
            )
        current *= 10


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor | HessianInverse,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    prune_first: torch.Tensor | None = None,
) -> SparseGPTResult:
    """Prune ``weight`` (out x in) to ``sparsity`` (or N:M) and update the kept weights.

    The total number pruned is exactly ``round(numel * sparsity)``: each column block prunes its
    share of the running total, so per-block rounding never accumulates.  Weights flagged in
    ``prune_first`` (already pruned) are *always* in the mask, however many a block or N:M group
    holds, and only the rest of the quota is chosen among the other weights: a flagged weight
    left out of the mask would be moved off zero by the OBS updates of the columns before it.
    The total is then ``max(round(numel * sparsity), flagged)``; N:M groups hold at least N zeros.
    ``hessian`` may be given already inverted (``invert_hessian``), for layers that share it.
    """
    w = weight.detach().clone().float()
    inverse = hessian if isinstance(hessian, HessianInverse) else invert_hessian(hessian, damp)
    hinv, used_damp, dead = inverse.upper.to(w.device), inverse.damp, inverse.dead.to(w.device)
    rows, cols = w.shape
    if nm is not None:
        n, m = nm
        blocksize = max(m, (blocksize // m) * m)
    w[:, dead] = 0.0
    warnings = []
    if used_damp != damp:
        warnings.append(f"Cholesky failed at damping {damp:g}; used {used_damp:g}")

    mask = torch.zeros_like(w, dtype=torch.bool)
    first = prune_first.to(w.device, torch.bool) if prune_first is not None else torch.zeros_like(mask)
    total = prune_count(rows * cols, sparsity)
    pruned_so_far = 0
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        width = end - start
        block = w[:, start:end].clone()
        done = torch.zeros_like(block)
        errors = torch.zeros_like(block)
        hinv_block = hinv[start:end, start:end]
        diag = torch.diag(hinv_block)
        # already-pruned weights are in the mask from the start, whatever the quota
        block_mask = first[:, start:end].clone()
        if nm is None:
            # this block's share of the running total, capped so that the flagged weights of the
            # later blocks still fit: the layer ends at exactly max(total, flagged)
            share = min(prune_count(rows * end, sparsity), total - int(first[:, end:].sum()))
            k = min(share - pruned_so_far - int(block_mask.sum()), int((~block_mask).sum()))
            if k > 0:
                saliency = (block.pow(2) / diag.pow(2).unsqueeze(0)).masked_fill(block_mask, float("inf")).flatten()
                block_mask.view(-1)[torch.topk(saliency, k, largest=False).indices] = True
            pruned_so_far += int(block_mask.sum())
        for i in range(width):
            col = block[:, i]
            if nm is not None and i % nm[1] == 0:
                group = block[:, i : i + nm[1]].pow(2) / diag[i : i + nm[1]].pow(2).unsqueeze(0)
                group = group.masked_fill(block_mask[:, i : i + nm[1]], -1.0)  # flagged weights count first
                lowest = torch.topk(group, nm[0], dim=1, largest=False).indices
                block_mask.scatter_(1, i + lowest, True)
            kept = col.clone()
            kept[block_mask[:, i]] = 0.0
            done[:, i] = kept
            err = (col - kept) / diag[i]
            block[:, i:] -= err.unsqueeze(1) @ hinv_block[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, start:end] = done
        mask[:, start:end] = block_mask
        w[:, end:] -= errors @ hinv[start:end, end:]
    w[mask] = 0.0
    return SparseGPTResult(weight=w, mask=mask, damp=used_damp, warnings=warnings)
