"""Train every kept weight of a sparse layer directly (the mask enforced), instead of an adapter.

At a budget of tens of thousands of tokens this is the stronger form: in the GPU sweep
(docs/results.md) training every kept weight at lr 2e-4 reached wiki 90.9 at 70% where masked LoRA
at the same rate reached 155.8, and a step costs about what a fused masked-LoRA step costs on the
CPU (the dense weight gradient is computed by both).  What it gives up: the adapter's small state
(AdamW holds two moments per kept weight) and the low-rank update's regularisation.

The layer computes y = x (W * M)^T + b with M the mask (True = kept).  The product is formed in the
forward and again in the backward rather than saved, and the weight gradient is (g^T x) * M, so a
pruned weight gets a zero gradient and its effective value is zero whatever the optimizer does to
it (AdamW's moments from before a stage's pruning included); ``merge`` writes the zeros back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .masked_lora import AdapterLinear


class _MaskedWeightLinear(torch.autograd.Function):
    """y = x (W * M)^T + b; dW = (g^T x) * M; the masked weight is recomputed, not stored."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask):  # noqa: D401 - autograd API
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, mask)
        return F.linear(x, weight * mask, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mask = ctx.saved_tensors
        grad_x = grad_out @ (weight * mask).to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_flat.T @ x.reshape(-1, x.shape[-1])).to(weight.dtype) * mask
        grad_bias = grad_flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None


class KeptWeightsLinear(AdapterLinear):
    """A sparse ``nn.Linear`` whose kept weights (and bias) are trained in place."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("mask", base.weight.detach() != 0)
        self.merged = False

    def trainable(self) -> list[nn.Parameter]:
        return [self.base.weight] + ([self.base.bias] if self.base.bias is not None else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.base.weight.requires_grad:
            return self.base(x)
        return _MaskedWeightLinear.apply(x, self.base.weight, self.base.bias, self.mask)

    @torch.no_grad()
    def merge(self) -> None:
        """Write the mask's zeros into W (the weights are the model already), refusing NaN/inf."""
        if self.merged:
            return
        if not torch.isfinite(self.base.weight).all():
            raise FloatingPointError("the trained weights hold NaN/inf; not merging")
        self.base.weight.masked_fill_(~self.mask, 0.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self, new_mask: bool = False) -> None:
        """Train again; with ``new_mask`` the mask is re-read from W's zeros (a freshly pruned layer)."""
        if not self.merged:
            return
        if new_mask:
            self.mask.copy_(self.base.weight != 0)
        self.merged = False
