"""The physical limit of batch-1 decode: bytes read per token over the machine's memory bandwidth.

One decode step of a batch of one reads every linear weight once (a matrix-vector product per
layer) plus the KV cache of the past; the arithmetic is tiny next to that traffic, so the time
per token cannot be below ``bytes / bandwidth``.  The bytes depend on how the engine stores the
weights:

* ``dense``: every weight in its stored type (4 bytes fp32, 1 byte int8), zeros included; this
  is what ONNX Runtime reads, since it does not exploit unstructured zeros;
* ``bitmask``: the kept values packed, plus one bit per weight saying where they go; the
  smallest general format for unstructured sparsity;
* ``auto``: per layer, the smaller of the two: what an engine that stores sparse layers packed
  and dense layers dense reads.  Assumed for DeepSparse, whose own format is not published.

The ceiling is a lower bound on latency, so ``share = ceiling_ms / measured_ms`` says how much
of the hardware's limit an engine reaches (1.0 = the limit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FORMATS = ("dense", "bitmask", "auto")
#: which weight format each engine reads (see the module docstring)
ENGINE_FORMAT = {"onnxruntime": "dense", "deepsparse": "auto"}


@dataclass
class DecodeBytes:
    """Bytes one decode step reads, by part, for a graph."""

    weights: int
    weight_elements: int
    weight_zeros: int
    bytes_per_value: int
    scale_bytes: int
    kv_cache: int
    weights_auto: int

    def total(self, weight_format: str) -> int:
        """Weights in ``weight_format`` plus scales and the KV cache."""
        if weight_format == "auto":
            weights = self.weights_auto
        elif weight_format == "dense":
            weights = self.weight_elements * self.bytes_per_value
        elif weight_format == "bitmask":
            kept = self.weight_elements - self.weight_zeros
            weights = kept * self.bytes_per_value + (self.weight_elements + 7) // 8
        else:
            raise ValueError(f"unknown weight format {weight_format!r}; one of {FORMATS}")
        return weights + self.scale_bytes + self.kv_cache

    def to_dict(self) -> dict:
        return {**asdict(self), **{f"total_{name}": self.total(name) for name in FORMATS}}


def linear_weights(proto) -> list[tuple[np.ndarray, object]]:
    """(weight, zero point) of every constant-weight MatMul / MatMulInteger, each weight once."""
    from onnx import numpy_helper

    arrays = {init.name: init for init in proto.graph.initializer}
    found, seen = [], set()
    for node in proto.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in arrays:
            name, zero_point = node.input[1], 0
        elif node.op_type == "MatMulInteger" and node.input[1] in arrays:
            name = node.input[1]
            zero_point = numpy_helper.to_array(arrays[node.input[3]]) if len(node.input) > 3 and node.input[3] else 0
        else:
            continue
        if name in seen or len(arrays[name].dims) != 2:
            continue
        seen.add(name)
        found.append((numpy_helper.to_array(arrays[name]), zero_point))
    return found


def decode_bytes(graph: Path, past_tokens: int, num_layers: int, kv_heads: int, head_dim: int) -> DecodeBytes:
    """Count what one batch-1 decode step of ``graph`` reads, past ``past_tokens`` tokens (fp32 cache)."""
    import onnx

    proto = onnx.load(str(graph), load_external_data=True)
    elements = zeros = weight_bytes = scale_bytes = auto = 0
    value_bytes = 4
    for weight, zero_point in linear_weights(proto):
        layer_zeros = int(np.count_nonzero(weight == zero_point))
        elements += weight.size
        zeros += layer_zeros
        weight_bytes += weight.nbytes
        value_bytes = weight.itemsize
        auto += min(weight.nbytes, (weight.size - layer_zeros) * weight.itemsize + (weight.size + 7) // 8)
        if weight.itemsize == 1:
            scale_bytes += weight.shape[1] * 4  # one fp32 scale per output channel
    kv_cache = 2 * num_layers * kv_heads * head_dim * past_tokens * 4
    return DecodeBytes(weight_bytes, elements, zeros, value_bytes, scale_bytes, kv_cache, auto)


def measure_bandwidth(threads: int, megabytes: int = 1024, repeats: int = 5) -> float:
    """Best read bandwidth in GB/s over a float32 buffer larger than any cache, read once per repeat as a
    decode step reads its weights: the better of ``threads`` threads summing their slices (numpy releases
    the GIL in reductions) and a matrix-vector product on ``threads`` of torch's threads (BLAS streams
    faster than numpy's pairwise sum; taking the best keeps a slow probe from inflating every share)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import torch

    data = np.ones(megabytes * (1 << 20) // 4, dtype=np.float32)
    slices = np.array_split(data, threads)
    matrix = torch.from_numpy(data).view(-1, 4096)
    vector = torch.ones(4096)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = float("inf")
    try:
        with ThreadPoolExecutor(threads) as pool:
            for _ in range(repeats):
                for read in (lambda: list(pool.map(np.sum, slices)), lambda: torch.mv(matrix, vector)):
                    start = time.perf_counter()
                    read()
                    best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return data.nbytes / best / 1e9


def ceiling_ms(total_bytes: int, bandwidth_gb_s: float) -> float:
    """The shortest possible time to read ``total_bytes`` at ``bandwidth_gb_s``, in ms."""
    return total_bytes / (bandwidth_gb_s * 1e9) * 1000.0
