"""The packed sparse weight format, and its pure-PyTorch reference.

A pruned linear weight W [rows, cols] is stored as:

- ``mask`` uint8 [rows, cols_padded / 8]: bit j of byte k of a row is column 8k + j (little
  endian), set where the weight is kept; rows are padded to a multiple of 64 columns, so a kernel
  may read the mask in 8-, 16-, 32- or 64-bit words without crossing into the next row;
- ``values`` [nnz + PAD]: the kept weights, row after row, in fp32, bf16 or int8 (then with
  ``scale`` float32 [rows], symmetric per output channel: W ~ values * scale), followed by PAD
  zeros so a vector load at the end of the last row stays inside the buffer;
- ``row_offsets`` int64 [rows + 1]: where each row's values start.

Batch-1 decode reads (1 - s) * b + 1 bits per weight instead of b.  ``reference_matmul`` is the
definition the native kernel (``sparse_mv.cpp``) is tested against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

ROW_ALIGN = 64
PAD = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
FORMAT = "losa-bitmask-v1"


@dataclass
class PackedWeight:
    """One linear layer's weight in the bitmask-packed format."""

    mask: torch.Tensor
    values: torch.Tensor
    row_offsets: torch.Tensor
    scale: torch.Tensor | None
    rows: int
    cols: int

    @property
    def dtype(self) -> str:
        return next(name for name, dtype in DTYPES.items() if dtype == self.values.dtype)

    @property
    def cols_padded(self) -> int:
        return self.mask.shape[1] * 8

    def nbytes(self) -> int:
        """Bytes a matrix-vector product reads: mask, values, offsets and scales."""
        tensors = (self.mask, self.values, self.row_offsets) + ((self.scale,) if self.scale is not None else ())
        return sum(t.numel() * t.element_size() for t in tensors)


def pack(weight: torch.Tensor, dtype: str = "float32") -> PackedWeight:
    """Pack a (pruned) weight; exact zeros are dropped, everything else is kept."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    weight = weight.detach().to("cpu", torch.float32)
    rows, cols = weight.shape
    padded = -(-cols // ROW_ALIGN) * ROW_ALIGN
    kept = torch.zeros(rows, padded, dtype=torch.bool)
    kept[:, :cols] = weight != 0
    bits = kept.reshape(rows, padded // 8, 8).to(torch.uint8)
    mask = (bits << torch.arange(8, dtype=torch.uint8)).sum(dim=2, dtype=torch.uint8)
    counts = kept.sum(dim=1)
    row_offsets = torch.zeros(rows + 1, dtype=torch.int64)
    row_offsets[1:] = counts.cumsum(0)
    scale = None
    kept_values = weight[kept[:, :cols]]
    if dtype == "int8":
        scale = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        row_of_value = torch.repeat_interleave(torch.arange(rows), counts)
        kept_values = torch.round(kept_values / scale[row_of_value]).clamp(-127, 127)
    values = torch.cat([kept_values, torch.zeros(PAD)]).to(DTYPES[dtype])
    return PackedWeight(mask.contiguous(), values.contiguous(), row_offsets, scale, rows, cols)


def unpack(packed: PackedWeight) -> torch.Tensor:
    """The dense float32 weight the packed form stands for."""
    shifts = torch.arange(8, dtype=torch.uint8)
    kept = ((packed.mask.unsqueeze(-1) >> shifts) & 1).bool().reshape(packed.rows, -1)[:, : packed.cols]
    dense = torch.zeros(packed.rows, packed.cols)
    nnz = int(packed.row_offsets[-1])
    values = packed.values[:nnz].to(torch.float32)
    if packed.scale is not None:
        counts = packed.row_offsets[1:] - packed.row_offsets[:-1]
        values = values * packed.scale[torch.repeat_interleave(torch.arange(packed.rows), counts)]
    dense[kept] = values
    return dense


def reference_matmul(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """x [batch, cols] float32 times the packed weight's transpose: the kernel's definition."""
    return x.to(torch.float32) @ unpack(packed).T


def save_packed(layers: dict[str, PackedWeight], path: Path, metadata: dict | None = None) -> dict:
    """Write packed layers to one safetensors file; returns the summary a manifest records."""
    from safetensors.torch import save_file

    tensors = {}
    shapes = {}
    for name, packed in layers.items():
        tensors[f"{name}.mask"], tensors[f"{name}.values"] = packed.mask, packed.values
        tensors[f"{name}.row_offsets"] = packed.row_offsets
        if packed.scale is not None:
            tensors[f"{name}.scale"] = packed.scale
        shapes[name] = [packed.rows, packed.cols]
    header = {"format": FORMAT, "shapes": json.dumps(shapes), **{k: str(v) for k, v in (metadata or {}).items()}}
    save_file(tensors, path, metadata=header)
    return {"format": FORMAT, "file": path.name, "layers": len(layers), "bytes": path.stat().st_size,
            "weight_bytes": sum(p.nbytes() for p in layers.values())}


def load_packed(path: Path) -> dict[str, PackedWeight]:
    """Read what ``save_packed`` wrote."""
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        header = handle.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file")
        shapes = json.loads(header["shapes"])
        names = set(handle.keys())
        layers = {}
        for name, (rows, cols) in shapes.items():
            scale = handle.get_tensor(f"{name}.scale") if f"{name}.scale" in names else None
            layers[name] = PackedWeight(handle.get_tensor(f"{name}.mask"), handle.get_tensor(f"{name}.values"),
                                        handle.get_tensor(f"{name}.row_offsets"), scale, rows, cols)
    return layers
