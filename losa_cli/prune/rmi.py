"""Layer-wise sparsity allocation: block similarity (RMI / linear CKA), OWL, and the exact
rate assignment (pure math, torch only).

RMI (LoSA, §2 of docs/losa-method.md): X_l holds block l's input on n sequences, one flattened
sequence per row.  K_l = X_l X_l^T is formed once per block (n x n, fp64), centred
(K~ = H K H), and RMI(l, m) = <K~_l, K~_m>_F / (|K~_l|_F |K~_m|_F): L Gram matrices for an
L x L similarity matrix.  Blocks similar to many others are redundant and get more sparsity.

OWL (Yin et al., 2024): the fraction of a block's Wanda scores |W| * |X| above M x their mean;
blocks with many outliers keep more weights (the published linear rule, ``owl_rates``).
"""

from __future__ import annotations

import math

import torch

DEFAULT_BETA = {"wanda": 1.0, "sparsegpt": 100.0, "magnitude": 1.0}


def default_delta(sparsity: float) -> float:
    """The paper's bands: 0.01 up to 50%, 0.02 up to 60%, 0.03 up to 70%.  Above 70% (which the
    paper's code leaves undefined) we continue the band by one step per 10 points: 0.04 up to
    80%, 0.05 above, always leaving s + delta below 1."""
    for limit, delta in ((0.5, 0.01), (0.6, 0.02), (0.7, 0.03), (0.8, 0.04)):
        if sparsity <= limit + 1e-12:
            return delta
    return min(0.05, (1.0 - sparsity) / 2)


def gram_matrix(sequences: list[torch.Tensor], chunk: int = 1 << 20) -> torch.Tensor:
    """K = X X^T (fp64) for X whose row i is sequence i flattened; built in feature chunks so
    no fp64 copy of the whole representation is ever made."""
    flat = [s.reshape(-1) for s in sequences]
    n, width = len(flat), flat[0].numel()
    gram = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, width, chunk):
        part = torch.stack([f[start : start + chunk] for f in flat]).to("cpu", torch.float64)
        gram += part @ part.T
    return gram


def center(gram: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T / n."""
    return gram - gram.mean(dim=0, keepdim=True) - gram.mean(dim=1, keepdim=True) + gram.mean()


def similarity_matrix(grams: list[torch.Tensor]) -> torch.Tensor:
    """Linear-CKA similarity between every pair of blocks, from one Gram matrix per block."""
    centred = [center(g) for g in grams]
    norms = torch.stack([c.norm() for c in centred])
    flat = torch.stack([c.reshape(-1) for c in centred])
    sim = (flat @ flat.T) / (norms.unsqueeze(0) * norms.unsqueeze(1)).clamp_min(1e-300)
    return sim


def importance(similarity: torch.Tensor, beta: float) -> torch.Tensor:
    """I_l = exp(-beta * R_l / sum R), with redundancy R_l = sum over m != l of RMI(l, m)."""
    redundancy = similarity.sum(dim=1) - similarity.diagonal()
    return torch.exp(-beta * redundancy / redundancy.sum())


def allocate_exact(
    scores: torch.Tensor, target: float, lower: float | list[float], upper: float | list[float]
) -> list[float]:
    """Exact minimiser of sum_l s_l * scores_l subject to mean(s) = target, lower_l <= s_l <= upper_l.

    A linear program over a box with one equality: start every block at its lower bound and hand
    out the remaining budget to the lowest-scoring blocks first, each up to its upper bound.  With
    symmetric bounds s +- delta this gives s + delta to the less important half, s - delta to the
    more important half and the remainder to the middle block.  Only the order of the scores
    matters.  Per-block bounds let LoSA keep a block at least as sparse as it already is.
    """
    count = len(scores)
    lows = [float(lower)] * count if isinstance(lower, (int, float)) else [float(v) for v in lower]
    highs = [float(upper)] * count if isinstance(upper, (int, float)) else [float(v) for v in upper]
    if not sum(lows) - 1e-9 <= target * count <= sum(highs) + 1e-9:
        raise ValueError(f"target {target} cannot be met within the per-block bounds")
    rates = list(lows)
    budget = target * count - sum(lows)
    for index in sorted(range(count), key=lambda i: (float(scores[i]), i)):
        give = min(highs[index] - lows[index], budget)
        rates[index] = lows[index] + give
        budget -= give
        if budget <= 0:
            break
    return rates


def rmi_rates(
    similarity: torch.Tensor, sparsity: float, delta: float, beta: float, floor: list[float] | None = None
) -> tuple[list[float], torch.Tensor]:
    """Per-block rates from the similarity matrix; also returns the importance I_l.

    ``floor`` raises a block's lower bound to the sparsity it already has (pruning never revives
    a weight); if that makes the target unreachable the floors themselves are returned.
    """
    weights = importance(similarity, beta)
    lower, upper = max(0.0, sparsity - delta), min(sparsity + delta, math.nextafter(1.0, 0.0))
    if floor is None:
        return allocate_exact(weights, sparsity, lower, upper), weights
    lows = [max(lower, f) for f in floor]
    highs = [max(upper, f) for f in floor]
    if sum(lows) >= sparsity * len(lows):
        return lows, weights
    return allocate_exact(weights, sparsity, lows, highs), weights


def outlier_ratio(scores: list[torch.Tensor], multiple: float) -> float:
    """Fraction of all of a block's scores above ``multiple`` times their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > multiple * flat.mean()).float().mean())


def owl_rates(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """OWL's published rule (Yin et al., the authors' code): rescale the outlier ratios linearly
    onto [0, 2 lam] (z_l), give block l the density 1 - s + z_l - mean(z), i.e. the rate
    s_l = s - (z_l - mean(z)).  The mean is s exactly, rates span 2 lam, and the block richest in
    outliers keeps the most weights.  No clipping and no shift: that is what the paper does.

    Rates lie within s +- 2 lam; ``losa prune`` checks that this fits in [0, 1).  Only where it
    cannot (recover's early stages, whose targets lie below 2 lam) are the deviations scaled down
    uniformly so that no rate falls below 0 -- the mean and the order stay as published.
    """
    values = torch.tensor(ratios, dtype=torch.float64)
    spread = values.max() - values.min()
    if spread <= 0:
        return [float(sparsity)] * len(ratios)
    z = (values - values.min()) / spread * (2 * lam)
    deviation = z - z.mean()
    scale = 1.0
    if sparsity - float(deviation.max()) < 0:
        scale = sparsity / float(deviation.max())
    top = math.nextafter(1.0, 0.0)
    if sparsity - float(deviation.min()) > top:
        scale = min(scale, (top - sparsity) / -float(deviation.min()))
    return [float(sparsity - scale * d) for d in deviation]
