"""The LoSA schedule: how sparse each stage is, and the learning rate within it (pure math).

Unstructured runs follow the cubic ramp s_t = S (1 - (1 - t/T)^3), fast early and gentle near
the target.  N:M runs ramp the pattern itself along the same curve (2:4 over five stages:
1:4, 2:4, 2:4, 2:4, 2:4; 4:8: 2:8, 3:8, 4:8, 4:8, 4:8), so every stage is a valid N:M model
and the last one has exactly N zeros in every group of M (or the input's own zeros, where a group
already held more: ``stages.NMTarget``).  (The paper does not specify N:M with
the dynamic schedule; laying N:M over an unstructured ramp leaves more than N zeros in groups.)
"""

from __future__ import annotations

import math


def cubic_sparsity(target: float, stage: int, stages: int) -> float:
    """s_t = S (1 - (1 - t/T)^3): fast early, gentle near the target (t = 1..T)."""
    return target * (1.0 - (1.0 - stage / stages) ** 3)


def nm_ramp(n: int, m: int, stage: int, stages: int) -> tuple[int, int]:
    """The N:M pattern of stage t: N_t = round(cubic share of N), at least 1, exactly N at t = T."""
    if stage >= stages:
        return n, m
    return max(1, min(n, int(math.floor(cubic_sparsity(n, stage, stages) + 0.5)))), m


def lr_factor(step: int, steps: list[int], warmup: float) -> float:
    """Linear warm-up then linear decay, restarted at every stage (``step`` counts over all stages)."""
    for length in steps:
        if step < length:
            warm = max(1, int(round(length * warmup)))
            if step < warm:
                return (step + 1) / warm
            return max(0.0, (length - step) / max(1, length - warm))
        step -= length
    return 0.0
