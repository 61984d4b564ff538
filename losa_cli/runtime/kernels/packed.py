"""The packed weight format, its validation, and its pure-PyTorch reference.

A linear weight W [rows, cols] is stored in one of two layouts, both with rows padded to
``cols_padded`` (a multiple of 64 columns, so kernels read whole 64-column words):

- bitmask (pruned layers): ``mask`` uint8 [rows, cols_padded / 8], bit j of byte k of a row set
  where column 8k + j is kept (little endian); ``values`` [nnz + PAD], the kept weights row after
  row, then PAD zeros so a vector load at the end of the last row stays inside the buffer;
  ``row_offsets`` int64 [rows + 1], where each row's values start.  Batch-1 decode reads
  (1 - s) * b + 1 bits per weight instead of b.
- dense (layers without zeros, e.g. the output head, where a mask would only add bytes):
  ``mask`` and ``row_offsets`` are None and ``values`` is [rows, cols_padded], zero past ``cols``.

Values are fp32, bf16 or int8; int8 comes with ``scale`` float32 [rows], symmetric per output
channel (W ~ values * scale, values in [-127, 127]), and multiplies int8 activations: each input
row x is quantized per call as s = max|x| / 127, q = clamp(round(x / s), -127, 127) (q = 0 for an
all-zero row), the integer sums are exact and y = float(sum) * s * scale.  ``reference_matmul``
defines every product the native kernels (``kernels.h``) compute, and is what they are tested against.

A ``PackedWeight`` is validated once when it is built or loaded (``ValueError``, one line), so that
a corrupt file cannot make the kernels read out of bounds; the kernels themselves do not re-check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

ROW_ALIGN = 64
PAD = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
#: v2 adds dense layers (no mask, no row offsets) to v1's bitmask layers; v1 files still load
FORMAT = "losa-packed-v2"
READABLE_FORMATS = (FORMAT, "losa-bitmask-v1")
_POPCOUNT = torch.tensor([bin(byte).count("1") for byte in range(256)], dtype=torch.int64)


@dataclass
class PackedWeight:
    """One linear layer's weight in the packed format (bitmask, or dense when ``mask`` is None)."""

    mask: torch.Tensor | None
    values: torch.Tensor
    row_offsets: torch.Tensor | None
    scale: torch.Tensor | None
    rows: int
    cols: int

    def __post_init__(self) -> None:
        problem = _layout_problem(self)
        if problem:
            raise ValueError(f"invalid packed weight ({self.rows}x{self.cols}): {problem}")

    @property
    def dtype(self) -> str:
        return next(name for name, dtype in DTYPES.items() if dtype == self.values.dtype)

    @property
    def dense(self) -> bool:
        return self.mask is None

    @property
    def cols_padded(self) -> int:
        return self.values.shape[1] if self.mask is None else self.mask.shape[1] * 8

    @property
    def kept(self) -> int:
        """Stored weights (every weight of a dense layer, padding excluded)."""
        return self.rows * self.cols if self.mask is None else int(self.row_offsets[-1])

    def nbytes(self) -> int:
        """Bytes a matrix-vector product reads: mask, values, offsets and scales (whichever exist)."""
        tensors = (self.mask, self.values, self.row_offsets, self.scale)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _layout_problem(p: PackedWeight) -> str | None:
    """What makes ``p`` unsafe for the kernels, or None: shapes, dtypes, offsets against the mask."""
    if p.values.dtype not in DTYPES.values():
        return f"values dtype {p.values.dtype} is not one of {', '.join(DTYPES)}"
    if (p.scale is not None) != (p.values.dtype == torch.int8):
        return "int8 values need a scale per row, other types none"
    if p.scale is not None and (p.scale.dtype != torch.float32 or tuple(p.scale.shape) != (p.rows,)):
        return f"scale must be float32 [{p.rows}], got {p.scale.dtype} {list(p.scale.shape)}"
    if p.mask is None:
        if p.row_offsets is not None:
            return "a dense weight has no row offsets"
        if p.values.dim() != 2 or p.values.shape[0] != p.rows or not _padded_width(p.values.shape[1], p.cols):
            return f"dense values must be [{p.rows}, {_padded(p.cols)}], got {list(p.values.shape)}"
        return None
    if p.mask.dtype != torch.uint8 or p.mask.dim() != 2 or p.mask.shape[0] != p.rows:
        return f"mask must be uint8 [{p.rows}, {_padded(p.cols) // 8}], got {p.mask.dtype} {list(p.mask.shape)}"
    if not _padded_width(p.mask.shape[1] * 8, p.cols):
        return f"mask rows hold {p.mask.shape[1] * 8} columns, expected {_padded(p.cols)}"
    if p.row_offsets is None or p.row_offsets.dtype != torch.int64 or tuple(p.row_offsets.shape) != (p.rows + 1,):
        return f"row_offsets must be int64 [{p.rows + 1}]"
    if p.values.dim() != 1:
        return "bitmask values must be one flat tensor"
    counts = _POPCOUNT[p.mask.long()].sum(dim=1)
    if int(p.row_offsets[0]) != 0:
        return "row_offsets must start at 0"
    steps = p.row_offsets[1:] - p.row_offsets[:-1]
    if bool((steps < 0).any()):
        return "row_offsets decrease"
    if not torch.equal(steps, counts):
        row = int((steps != counts).nonzero()[0])
        return f"row {row} has {int(counts[row])} mask bits but {int(steps[row])} values in row_offsets"
    if int(p.row_offsets[-1]) + PAD > p.values.numel():
        return f"values hold {p.values.numel()} entries, row_offsets and padding need {int(p.row_offsets[-1]) + PAD}"
    tail = p.mask[:, p.cols // 8:].to(torch.int64)  # bytes holding columns past the width (if any)
    if tail.numel() and bool(((tail[:, 0] >> (p.cols % 8)).any()) or tail[:, 1:].any()):
        return "mask has bits set past the weight's width"
    return None


def _padded(cols: int) -> int:
    return -(-cols // ROW_ALIGN) * ROW_ALIGN


def _padded_width(width: int, cols: int) -> bool:
    return width == _padded(cols)


def pack(weight: torch.Tensor, dtype: str = "float32", dense: bool | None = None) -> PackedWeight:
    """Pack a (pruned) weight; exact zeros are dropped from the bitmask layout, everything else is kept.

    ``dense=None`` picks the layout that reads fewer bytes: dense for layers with no (or very few)
    zeros, such as the output head, where a mask and row offsets would only add to every product."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    weight = weight.detach().to("cpu", torch.float32)
    rows, cols = weight.shape
    padded = _padded(cols)
    kept = torch.zeros(rows, padded, dtype=torch.bool)
    kept[:, :cols] = weight != 0
    scale = None
    if dtype == "int8":
        scale = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    if dense is None:
        width = DTYPES[dtype].itemsize
        bitmask_bytes = rows * padded // 8 + (int(kept.sum()) + PAD) * width + (rows + 1) * 8
        dense = rows * padded * width <= bitmask_bytes
    if dense:
        full = torch.zeros(rows, padded)
        full[:, :cols] = weight if scale is None else torch.round(weight / scale[:, None]).clamp(-127, 127)
        return PackedWeight(None, full.to(DTYPES[dtype]).contiguous(), None, scale, rows, cols)
    bits = kept.reshape(rows, padded // 8, 8).to(torch.uint8)
    mask = (bits << torch.arange(8, dtype=torch.uint8)).sum(dim=2, dtype=torch.uint8)
    counts = kept.sum(dim=1)
    row_offsets = torch.zeros(rows + 1, dtype=torch.int64)
    row_offsets[1:] = counts.cumsum(0)
    kept_values = weight[kept[:, :cols]]
    if scale is not None:
        row_of_value = torch.repeat_interleave(torch.arange(rows), counts)
        kept_values = torch.round(kept_values / scale[row_of_value]).clamp(-127, 127)
    values = torch.cat([kept_values, torch.zeros(PAD)]).to(DTYPES[dtype])
    return PackedWeight(mask.contiguous(), values.contiguous(), row_offsets, scale, rows, cols)


def stored_values(packed: PackedWeight) -> torch.Tensor:
    """The dense float32 [rows, cols] of the stored values, int8 left unscaled (integers)."""
    if packed.mask is None:
        return packed.values[:, : packed.cols].to(torch.float32)
    shifts = torch.arange(8, dtype=torch.uint8)
    kept = ((packed.mask.unsqueeze(-1) >> shifts) & 1).bool().reshape(packed.rows, -1)[:, : packed.cols]
    dense = torch.zeros(packed.rows, packed.cols)
    dense[kept] = packed.values[: packed.kept].to(torch.float32)
    return dense


def unpack(packed: PackedWeight) -> torch.Tensor:
    """The dense float32 weight the packed form stands for (int8 values times their row's scale)."""
    values = stored_values(packed)
    return values if packed.scale is None else values * packed.scale[:, None]


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input row: s = max|x| / 127 and q = clamp(round(x / s), -127, 127), q = 0 where s = 0.

    Symmetric levels keep |q| <= 127, so the kernels' int16 pair sums (2 * 127 * 127) never saturate."""
    x = x.to(torch.float32)
    s = x.abs().amax(dim=1, keepdim=True) / 127
    q = torch.where(s > 0, x / torch.where(s > 0, s, 1), 0).round().clamp(-127, 127)
    return q, s.squeeze(1)


def reference_matmul(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """x [batch, cols] times the packed weight's transpose, as float32: the kernels' definition.

    fp32 and bf16 values multiply x in fp32; int8 values multiply int8 activations with exact
    integer sums (``quantize_activations``), then y = float(sum) * s * scale."""
    if packed.scale is None:
        return x.to(torch.float32) @ stored_values(packed).T
    q, s = quantize_activations(x)
    sums = q.to(torch.int64) @ stored_values(packed).to(torch.int64).T
    return sums.to(torch.float32) * s[:, None] * packed.scale[None, :]


def save_packed(layers: dict[str, PackedWeight], path: Path, metadata: dict | None = None) -> dict:
    """Write packed layers to one safetensors file; returns the summary a manifest records."""
    from safetensors.torch import save_file

    tensors = {}
    shapes = {}
    for name, packed in layers.items():
        tensors[f"{name}.values"] = packed.values
        for part in ("mask", "row_offsets", "scale"):
            if getattr(packed, part) is not None:
                tensors[f"{name}.{part}"] = getattr(packed, part)
        shapes[name] = [packed.rows, packed.cols]
    header = {"format": FORMAT, "shapes": json.dumps(shapes), **{k: str(v) for k, v in (metadata or {}).items()}}
    save_file(tensors, path, metadata=header)
    return {"format": FORMAT, "file": path.name, "layers": len(layers), "bytes": path.stat().st_size,
            "weight_bytes": sum(p.nbytes() for p in layers.values())}


def load_packed(path: Path) -> dict[str, PackedWeight]:
    """Read what ``save_packed`` wrote; each layer is validated (``ValueError`` names the layer)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        header = handle.metadata() or {}
        if header.get("format") not in READABLE_FORMATS:
            raise ValueError(f"{path} is not a {FORMAT} file")
        shapes = json.loads(header["shapes"])
        names = set(handle.keys())
        layers = {}
        for name, (rows, cols) in shapes.items():
            parts = {part: handle.get_tensor(f"{name}.{part}") if f"{name}.{part}" in names else None
                     for part in ("mask", "values", "row_offsets", "scale")}
            if parts["values"] is None:
                raise ValueError(f"{path}: layer {name} has no values")
            try:
                layers[name] = PackedWeight(parts["mask"], parts["values"], parts["row_offsets"], parts["scale"],
                                            rows, cols)
            except ValueError as exc:
                raise ValueError(f"{path}: layer {name}: {exc}") from None
    return layers
