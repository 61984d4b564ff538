"""``SparseLinear``: an ``nn.Linear`` whose weight lives in the bitmask-packed format.

Its product runs on the native kernel (``native.py``): below ``DENSE_FROM`` input rows (decode,
small batches) on the packed weight, one expansion of each chunk serving up to four rows; from
``DENSE_FROM`` rows on (prefill), the weight is unpacked for the call and multiplied by PyTorch's
dense GEMM, which beats expanding every chunk once per four rows (measured on SmolLM2's MLP shapes
at 70%: the kernel took 2x the time of unpack + GEMM at 32 rows, 3x at 128; the two were level at 8).
``sparsify`` swaps a loaded model's pruned linear layers for it; ``packed.save_packed`` and
``load_packed_into`` keep the packed weights in a safetensors file beside the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .native import available_paths, dense_weight, sparse_matmul
from .packed import PackedWeight, load_packed, pack

#: input rows from which a call unpacks the weight and runs PyTorch's dense GEMM (see the docstring)
DENSE_FROM = 8


class SparseLinear(nn.Module):
    """y = x W^T + b with W packed (fp32, bf16 or int8 values plus a bitmask)."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, path: str | None = None) -> None:
        super().__init__()
        self.packed = packed
        self.in_features, self.out_features = packed.cols, packed.rows
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.path = path or available_paths()[0]  # the best path this CPU runs unless told otherwise

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: str = "float32", path: str | None = None) -> SparseLinear:
        return cls(pack(linear.weight, dtype), linear.bias, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.to(torch.float32)
        if rows.shape[0] >= DENSE_FROM:
            y = F.linear(rows.to(torch.float32), dense_weight(self.packed, self.path), bias)
        else:
            y = sparse_matmul(rows, self.packed, self.path)
            y = y if bias is None else y + bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kept = int(self.packed.row_offsets[-1])
        return (f"in={self.in_features}, out={self.out_features}, {self.packed.dtype}, "
                f"{1 - kept / (self.in_features * self.out_features):.1%} zeros")


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
