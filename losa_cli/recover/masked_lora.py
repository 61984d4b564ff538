"""Masked LoRA: low-rank adapters whose update keeps a sparse layer's zero pattern.

y = W x + s * ((B[:, :r] A[:r]) * M) dropout(x),   M = 1[W != 0],   s = alpha / r_max.

Two forms compute the same function:
* ``plain`` builds the dense masked delta and applies it as a second matmul (autograd keeps
  the delta for the backward pass) -- what the LoSA paper's code does;
* ``fused`` is a custom autograd function: without dropout it forms W + s*delta once and does
  one matmul; its backward computes the masked weight gradient dW = (g^T x) * M and from it
  dB = s dW A^T and dA = s B^T dW, recomputing the delta instead of storing it.
Components above the active rank r get no gradient (they are sliced away, not deleted) and come
back if the rank grows.  ``merge`` folds the delta into W and can never revive a pruned weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class _FusedMaskedLoRA(torch.autograd.Function):
    """y = x W^T + s * x_drop (delta)^T with delta = (B A) * M, memory-lean backward."""

    @staticmethod
    def forward(ctx, x, x_drop, weight, bias, lora_a, lora_b, mask, scale):  # noqa: D401 - autograd API
        delta = (lora_b @ lora_a) * mask
        same = x_drop is x
        if same:
            out = F.linear(x, weight + scale * delta, bias)
        else:
            out = F.linear(x, weight, bias) + scale * F.linear(x_drop, delta)
        ctx.same = same
        ctx.scale = scale
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, x_drop if not same else torch.empty(0), weight, lora_a, lora_b, mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, x_drop, weight, lora_a, lora_b, mask = ctx.saved_tensors
        if ctx.same:
            x_drop = x
        scale = ctx.scale
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        delta = (lora_b @ lora_a) * mask
        grad_x = grad_x_drop = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            if ctx.same:
                grad_x = grad_out @ (weight + scale * delta).to(grad_out.dtype)
            else:
                grad_x = grad_out @ weight.to(grad_out.dtype)
                grad_x_drop = grad_out @ (scale * delta).to(grad_out.dtype)
        masked_grad = (grad_flat.T @ x_drop.reshape(-1, x_drop.shape[-1])).to(lora_a.dtype) * mask
        grad_a = scale * (lora_b.T @ masked_grad)
        grad_b = scale * (masked_grad @ lora_a.T)
        grad_bias = grad_flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, grad_x_drop, None, grad_bias, grad_a, grad_b, None, None


class AdapterLinear(nn.Module):
    """What the LoSA workflow needs of a trainable wrapper around a frozen sparse ``nn.Linear``:
    ``base``, ``mask`` (True = kept), ``merged``, ``merge()``, ``unmerge(new_mask)`` and
    ``trainable()``.  Masked LoRA and the LoSiA-style subnet (``subnet.py``) both are one."""

    base: nn.Linear
    mask: torch.Tensor
    merged: bool

    def trainable(self) -> list[nn.Parameter]:
        raise NotImplementedError


class MaskedLoRALinear(AdapterLinear):
    """A frozen sparse ``nn.Linear`` plus a masked low-rank update (see module docstring)."""

    def __init__(self, base: nn.Linear, r_max: int, alpha: float, dropout: float = 0.0, fused: bool = True) -> None:
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r_max, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r_max, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_buffer("mask", base.weight.detach() != 0)
        self.r_max = r_max
        self.rank = r_max
        self.scale = alpha / r_max
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fused = fused
        self.merged = False

    def trainable(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]

    def active(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors cut to the active rank (slicing leaves the rest without gradient)."""
        return self.lora_A[: self.rank], self.lora_B[:, : self.rank]

    def delta(self) -> torch.Tensor:
        """s * (B A) * M in fp32."""
        lora_a, lora_b = self.active()
        return self.scale * (lora_b @ lora_a) * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.rank == 0:
            return self.base(x)
        lora_a, lora_b = self.active()
        x_drop = self.dropout(x)
        weight = self.base.weight
        if self.fused:
            dtype = weight.dtype
            # the bool mask goes in as is: a float copy saved for backward would cost a dense weight
            return _FusedMaskedLoRA.apply(x, x_drop, weight, self.base.bias, lora_a.to(dtype), lora_b.to(dtype),
                                          self.mask, self.scale)
        delta = ((lora_b @ lora_a) * self.mask).to(x.dtype)
        return self.base(x) + self.scale * F.linear(x_drop, delta)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s (B A) * M, refusing to write NaN/inf."""
        if self.merged:
            return
        update = self.delta()
        if not torch.isfinite(update).all():
            raise FloatingPointError("the adapter update holds NaN/inf; not merging")
        self.base.weight.add_(update.to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self, new_mask: bool = False) -> None:
        """W <- W - s (B A) * M.  With ``new_mask`` the mask is first re-read from W's zeros, so
        the adapter continues on a freshly pruned layer and the layer's output is unchanged."""
        if not self.merged:
            return
        if new_mask:
            self.mask.copy_(self.base.weight != 0)
        self.base.weight.sub_(self.delta().to(self.base.weight.dtype))
        self.base.weight.masked_fill_(~self.mask, 0.0)
        self.merged = False


def attach(blocks: nn.ModuleList, r_max: int, alpha: float, dropout: float, fused: bool) -> dict[str, MaskedLoRALinear]:
    """Wrap every nn.Linear inside the blocks in masked LoRA; returns the wrappers by qualified name."""
    return wrap_linears(blocks, lambda linear: MaskedLoRALinear(linear, r_max, alpha, dropout, fused))


def wrap_linears(blocks: nn.ModuleList, make: Callable[[nn.Linear], AdapterLinear]) -> dict[str, AdapterLinear]:
    """Wrap every nn.Linear inside the blocks with ``make(linear)``; the wrappers by qualified name."""
    wrappers = {}
    for index, block in enumerate(blocks):
        for name, module in list(block.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and not isinstance(module, AdapterLinear):
                    wrapper = make(child)
                    setattr(module, child_name, wrapper)
                    wrappers[f"{index}.{name + '.' if name else ''}{child_name}"] = wrapper
    return wrappers


def detach(blocks: nn.ModuleList) -> None:
    """Put the plain nn.Linear layers back (merge first to keep the adapters' effect)."""
    for block in blocks:
        for module in list(block.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, AdapterLinear):
                    setattr(module, child_name, child.base)


def wrappers_of(blocks: nn.ModuleList) -> dict[str, AdapterLinear]:
    """The attached wrappers (masked LoRA or subnet) by qualified name (``block.path``)."""
    found = {}
    for index, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, AdapterLinear):
                found[f"{index}.{name}"] = module
    return found


def set_block_ranks(blocks: nn.ModuleList, ranks: list[int]) -> None:
    """All masked-LoRA adapters of block l share rank ranks[l] (subnets have no rank: ignored)."""
    for index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(module, MaskedLoRALinear):
                if not 0 <= ranks[index] <= module.r_max:
                    raise ValueError(f"rank {ranks[index]} for block {index} outside [0, {module.r_max}]")
                module.rank = int(ranks[index])
