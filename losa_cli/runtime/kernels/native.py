"""Build (once, cached) and call the native sparse kernel, with the path chosen at run time.

The kernel is compiled on first use with torch's C++ extension tooling (a C++ compiler and
ninja; ``pip install -e .`` brings ninja) into torch's extension cache, so it needs no DeepSparse,
no particular onnx or numpy, and no Python-version pin.  ``available_paths`` says what this CPU
runs, best first ("avx2", then the portable "generic"); ``SparseLinear`` takes the best unless
told otherwise and passes it to every call, so benchmarks can name the path that ran.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch

from ...core.errors import LosaError
from .packed import PackedWeight

#: the C++ sources, compiled together into one extension (kernels.h is their shared interface;
#: decode.cpp is the lean decoder's native step, ``runtime/decode/native.py``)
SOURCES = [Path(__file__).with_name(name)
           for name in ("module.cpp", "kernels.cpp", "gemv_avx2.cpp", "gemm_avx2.cpp", "decode.cpp")]


class KernelUnavailable(LosaError):
    """The native kernel cannot be built here (no compiler); the message says what to install."""


@functools.lru_cache(maxsize=1)
def extension():
    """The compiled extension module (built on the first call of a process, then cached on disk)."""
    from torch.utils.cpp_extension import load

    try:
        return load(name="losa_sparse_mv", sources=[str(s) for s in SOURCES], extra_cflags=["-O3"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - compiler, ninja or linker failures all mean "cannot build"
        compiler = os.environ.get("CXX", "c++")  # what torch's extension builder runs
        if shutil.which(compiler) is None:  # the cause is all there is to say (the build log is its command lines)
            raise KernelUnavailable(f"losa's sparse kernel is compiled on first use, and there is no C++ compiler "
                                    f"here ({compiler!r} not found): install g++ or clang, or set CXX") from None
        raise KernelUnavailable(f"cannot build losa's sparse kernel ({_build_error(exc)}): check the C++ compiler "
                                "(g++ or clang) and ninja (`pip install ninja`)") from exc


def _build_error(exc: Exception) -> str:
    """The telling line of a failed build: the compiler's first ``error`` line, not the command lines before it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and not line.startswith(("[", "FAILED:"))]
    found = errors[0] if errors else lines[0] if lines else type(exc).__name__
    return found if len(found) <= 200 else found[:197] + "..."


@functools.lru_cache(maxsize=1)
def gemm_from() -> int:
    """Input rows from which ``sparse_matmul`` runs the prefill GEMM (kernels.h's kGemmFrom)."""
    return int(extension().gemm_from())


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


def _rows(mask: torch.Tensor, values: torch.Tensor) -> int:
    return values.shape[0] if values.dim() == 2 else mask.shape[0]  # dense weights come with an empty mask


@_matmul_op.register_fake
def _(x, mask, values, row_offsets, scale, path):
    return x.new_empty((x.shape[0], _rows(mask, values)))


@torch.library.custom_op("losa::sparse_unpack", mutates_args=())
def _unpack_op(mask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, scale: torch.Tensor,
               path: str) -> torch.Tensor:
    return extension().sparse_unpack(mask, values, row_offsets, scale, path)


@_unpack_op.register_fake
def _(mask, values, row_offsets, scale, path):
    width = values.shape[1] if values.dim() == 2 else mask.shape[1] * 8
    return values.new_empty((_rows(mask, values), width), dtype=torch.float32)


_NONE = torch.empty(0)  # what the kernel takes for an absent tensor (no mask, offsets or scales): made once


def _tensors(packed: PackedWeight) -> tuple[torch.Tensor, ...]:
    """mask, values, row_offsets, scale as the kernel takes them (empty where the format has none)."""
    return tuple(_NONE if t is None else t for t in (packed.mask, packed.values, packed.row_offsets, packed.scale))


def sparse_matmul(x: torch.Tensor, packed: PackedWeight, path: str, gemm_from: int | None = None) -> torch.Tensor:
    """x [batch, cols] (any float dtype) times the packed weight's transpose, as float32 [batch, rows].

    From ``gemm_from()`` input rows the kernel runs its prefill GEMM instead of the decode product;
    ``gemm_from`` overrides that switch (tests and benchmarks time both products at any size)."""
    if x.dtype == torch.float32 and x.is_contiguous() and packed.cols == packed.cols_padded:
        padded = x  # widths that are a multiple of 64 (SmolLM2's, Llama's) need no padded copy
    else:
        padded = torch.zeros(x.shape[0], packed.cols_padded, dtype=torch.float32)
        padded[:, : packed.cols] = x
    if gemm_from is not None:
        return extension().sparse_matmul(padded, *_tensors(packed), path, gemm_from)
    kernel = torch.ops.losa.sparse_matmul if torch.compiler.is_compiling() else extension().sparse_matmul
    return kernel(padded, *_tensors(packed), path)


def dense_weight(packed: PackedWeight, path: str) -> torch.Tensor:
    """The packed weight as a dense float32 [rows, cols] tensor, unpacked by the native kernel."""
    unpack = torch.ops.losa.sparse_unpack if torch.compiler.is_compiling() else extension().sparse_unpack
    dense = unpack(*_tensors(packed), path)
    return dense if packed.cols == packed.cols_padded else dense[:, : packed.cols]
