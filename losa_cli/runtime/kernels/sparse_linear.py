"""``SparseLinear``: an ``nn.Linear`` whose weight lives in the bitmask-packed format.

Its product runs on the native kernel (``native.py``) at every batch size: decode expands each
weight chunk once per four input rows, and from ``gemm_from()`` rows on (prefill) the kernel's GEMM
multiplies only the kept weights into tiles of 64 tokens, which beats unpacking the weight for
PyTorch's dense GEMM at every size measured (benchmarks/kernel_speed.py).  The one exception is a
dense-layout fp32 or bf16 weight (a layer without zeros, e.g. the head) at prefill sizes: it has no
zeros to skip, so PyTorch's GEMM on its float32 values is the faster product.
``sparsify`` swaps a loaded model's pruned linear layers for it; ``packed.save_packed`` and
``load_packed_into`` keep the packed weights in a safetensors file beside the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .native import available_paths, gemm_from, sparse_matmul
from .packed import PackedWeight, load_packed, pack


class SparseLinear(nn.Module):
    """y = x W^T + b with W packed (fp32, bf16 or int8 values plus a bitmask)."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, path: str | None = None) -> None:
        super().__init__()
        self.packed = packed
        self.in_features, self.out_features = packed.cols, packed.rows
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.path = path or available_paths()[0]  # the best path this CPU runs unless told otherwise
        self.gemm_from = gemm_from()  # read once: torch.compile traces an attribute, not the cached call

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: str = "float32", path: str | None = None) -> SparseLinear:
        return cls(pack(linear.weight, dtype), linear.bias, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.to(torch.float32)
        packed = self.packed
        if packed.dense and packed.scale is None and rows.shape[0] >= self.gemm_from:
            weight = packed.values[:, : packed.cols].to(torch.float32)
            y = F.linear(rows.to(torch.float32), weight, bias)
        else:
            y = sparse_matmul(rows, packed, self.path)
            y = y if bias is None else y + bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        layout = "dense" if self.packed.dense else "bitmask"
        zeros = 1 - self.packed.kept / (self.in_features * self.out_features) if not self.packed.dense else 0.0
        return f"in={self.in_features}, out={self.out_features}, {self.packed.dtype} {layout}, {zeros:.1%} zeros"


def block_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every linear layer in the decoder blocks (the layers pruning made sparse)."""
    from ...core.modeling import find_blocks, find_linears
    from ...core.offload import module_name

    blocks = find_blocks(model)
    prefix = module_name(model, blocks)
    return [f"{prefix}.{index}.{name}" for index, block in enumerate(blocks) for name in find_linears(block)]


def sparsify(
    model: nn.Module, names: list[str], dtype: str = "float32", path: str | None = None
) -> dict[str, PackedWeight]:
    """Replace the named ``nn.Linear`` modules by ``SparseLinear``; returns their packed weights."""
    packed = {}
    for name in names:
        module = SparseLinear.from_linear(model.get_submodule(name), dtype, path)
        _replace(model, name, module)
        packed[name] = module.packed
    return packed


def load_packed_into(model: nn.Module, path: Path, kernel_path: str | None = None) -> list[str]:
    """Swap the layers named in a packed file for ``SparseLinear`` modules holding its weights."""
    layers = load_packed(path)
    for name, packed in layers.items():
        linear = model.get_submodule(name)
        if (linear.out_features, linear.in_features) != (packed.rows, packed.cols):
            raise ValueError(
                f"{path}: {name} is {packed.rows}x{packed.cols}, the model's is "
                f"{linear.out_features}x{linear.in_features}"
            )
        _replace(model, name, SparseLinear(packed, linear.bias, kernel_path))
    return list(layers)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
