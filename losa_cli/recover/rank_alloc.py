"""Reconstruction error per block and error-driven LoRA ranks (pure math, torch only).

E_l = mean over hidden channels c of |Y_dense[..., c] - Y_sparse[..., c]|^2 / |Y_dense[..., c]|^2,
reduced in fp32.  Ranks r_l proportional to E_l with sum(r) equal to the budget *exactly* and
r_min <= r_l <= r_max, where r_max is the real width of the adapters' factors.
"""

from __future__ import annotations

import math

import torch


class ReconstructionError:
    """Accumulates the channel-relative squared error of one block over several windows."""

    def __init__(self) -> None:
        self.diff = None
        self.ref = None

    def add(self, dense: torch.Tensor, sparse: torch.Tensor) -> None:
        d = dense.float().reshape(-1, dense.shape[-1])
        s = sparse.float().reshape(-1, sparse.shape[-1]).to(d.device)
        diff, ref = (d - s).pow(2).sum(0), d.pow(2).sum(0)
        self.diff = diff if self.diff is None else self.diff + diff
        self.ref = ref if self.ref is None else self.ref + ref

    def value(self) -> float:
        return float((self.diff / self.ref.clamp_min(1e-12)).mean())


def allocate_ranks(errors: list[float], mean_rank: float, r_min: int, r_max: int) -> list[int]:
    """Integer ranks proportional to the errors, summing to round(mean_rank * L) exactly.

    Water-filling: find c with sum clip(c * E_l, r_min, r_max) = budget (bisection), then round
    down and hand the leftover units to the largest remainders that still have room.
    """
    count = len(errors)
    budget = int(round(mean_rank * count))
    if not count * r_min <= budget <= count * r_max:
        raise ValueError(f"a mean rank of {mean_rank} cannot be met with ranks in [{r_min}, {r_max}]")
    weights = torch.tensor([float(e) for e in errors], dtype=torch.float64)
    if not torch.isfinite(weights).all():
        raise ValueError("reconstruction errors hold NaN/inf")
    weights = weights.clamp_min(0.0)
    if float(weights.sum()) == 0.0:
        weights = torch.ones_like(weights)

    def filled(c: float) -> torch.Tensor:
        return (c * weights).clamp(r_min, r_max)

    low, high = 0.0, 1.0
    while float(filled(high).sum()) < budget and high < 1e300:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if float(filled(mid).sum()) < budget:
            low = mid
        else:
            high = mid
    target = filled(high)
    ranks = [int(math.floor(v + 1e-9)) for v in target.tolist()]
    # Hand out (or take back) the difference one unit at a time, largest remainders first, for as
    # many passes as it takes: when many errors are 0 the proportional share cannot reach the
    # budget and one pass would stop short.
    order = sorted(range(count), key=lambda i: (-(float(target[i]) - ranks[i]), -float(weights[i]), i))
    while sum(ranks) != budget:
        step = 1 if sum(ranks) < budget else -1
        for i in order if step > 0 else reversed(order):
            if sum(ranks) != budget and r_min <= ranks[i] + step <= r_max:
                ranks[i] += step
    return ranks
