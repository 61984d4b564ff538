"""Wanda and magnitude scores (pure math, torch only).

Wanda (Sun et al., 2023) scores weight W_ij by |W_ij| * ||X_j||_2, the weight magnitude times
the l2 norm of its input channel over all calibration tokens, and prunes within each output
row.  The norms are accumulated in fp32 so that bf16/fp16 activations do not lose the sums.
"""

from __future__ import annotations

import torch


class InputNormAccumulator:
    """Running sum of squared input activations per input channel, in fp32."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs shaped (..., in_features)."""
        flat = x.reshape(-1, x.shape[-1]).to(self.sum_sq.device, torch.float32)
        self.sum_sq += flat.pow(2).sum(dim=0)
        self.tokens += flat.shape[0]

    def norms(self) -> torch.Tensor:
        """The l2 norm of each input channel over all tokens seen."""
        return self.sum_sq.sqrt()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j|| broadcast over output rows, in fp32."""
    return weight.detach().float().abs() * input_norms.to(weight.device).float().unsqueeze(0)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| in fp32."""
    return weight.detach().float().abs()
