"""Build (once, cached) and call the native sparse kernel, with the path chosen at run time.

The kernel is compiled on first use with torch's C++ extension tooling (a C++ compiler and
ninja; ``pip install -e .`` brings ninja) into torch's extension cache, so it needs no DeepSparse,
no particular onnx or numpy, and no Python-version pin.  ``available_paths`` says what this CPU
runs, best first ("avx2", then the portable "generic"); ``SparseLinear`` takes the best unless
told otherwise and passes it to every call, so benchmarks can name the path that ran.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ...core.errors import LosaError
from .packed import PackedWeight

#: the C++ sources, compiled together into one extension (kernels.h is their shared interface;
#: decode.cpp is the lean decoder's native step, ``runtime/decode/native.py``)
SOURCES = [Path(__file__).with_name(name) for name in ("module.cpp", "sparse_mv.cpp", "decode.cpp")]


class KernelUnavailable(LosaError):
    """The native kernel cannot be built here (no compiler); the message says what to install."""


@functools.lru_cache(maxsize=1)
def extension():
    """The compiled extension module (built on the first call of a process, then cached on disk)."""
    from torch.utils.cpp_extension import load

    try:
        return load(name="losa_sparse_mv", sources=[str(s) for s in SOURCES], extra_cflags=["-O3"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - compiler, ninja or linker failures all mean "cannot build"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KernelUnavailable(f"cannot build losa's sparse kernel ({first}): install a C++ compiler (g++ or clang) "
                                "and ninja (`pip install ninja`)") from exc


@functools.lru_cache(maxsize=1)
def available_paths() -> tuple[str, ...]:
    """Kernel paths this CPU runs, best first (asked once: the CPU does not change)."""
    return tuple(extension().available_paths())


# The kernel as torch operators, so ``torch.compile`` keeps it in one graph with the rest of the
# model instead of breaking the graph at every layer; eager calls skip the operator's dispatch cost.
@torch.library.custom_op("losa::sparse_matmul", mutates_args=())
def _matmul_op(x: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
               scale: torch.Tensor, path: str) -> torch.Tensor:
    return extension().sparse_matmul(x, mask, values, row_offsets, scale, path)


@_matmul_op.register_fake
def _(x, mask, values, row_offsets, scale, path):
    return x.new_empty((x.shape[0], mask.shape[0]))


@torch.library.custom_op("losa::sparse_unpack", mutates_args=())
def _unpack_op(mask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, scale: torch.Tensor,
               path: str) -> torch.Tensor:
    return extension().sparse_unpack(mask, values, row_offsets, scale, path)


@_unpack_op.register_fake
def _(mask, values, row_offsets, scale, path):
    return mask.new_empty((mask.shape[0], mask.shape[1] * 8), dtype=torch.float32)


_NO_SCALE = torch.empty(0)  # what the kernel takes for "no scales" (fp32, bf16): made once, not per call


def _scale(packed: PackedWeight) -> torch.Tensor:
    return packed.scale if packed.scale is not None else _NO_SCALE


def sparse_matmul(x: torch.Tensor, packed: PackedWeight, path: str) -> torch.Tensor:
    """x [batch, cols] (any float dtype) times the packed weight's transpose, as float32 [batch, rows]."""
    if x.dtype == torch.float32 and x.is_contiguous() and packed.cols == packed.cols_padded:
        padded = x  # widths that are a multiple of 64 (SmolLM2's, Llama's) need no padded copy
    else:
        padded = torch.zeros(x.shape[0], packed.cols_padded, dtype=torch.float32)
        padded[:, : packed.cols] = x
    kernel = torch.ops.losa.sparse_matmul if torch.compiler.is_compiling() else extension().sparse_matmul
    return kernel(padded, packed.mask, packed.values, packed.row_offsets, _scale(packed), path)


def dense_weight(packed: PackedWeight, path: str) -> torch.Tensor:
    """The packed weight as a dense float32 [rows, cols] tensor, unpacked by the native kernel."""
    unpack = torch.ops.losa.sparse_unpack if torch.compiler.is_compiling() else extension().sparse_unpack
    dense = unpack(packed.mask, packed.values, packed.row_offsets, _scale(packed), path)
    return dense if packed.cols == packed.cols_padded else dense[:, : packed.cols]
