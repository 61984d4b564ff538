"""Verify an ONNX export against the PyTorch model it came from, through ONNX Runtime.

Logits of the prefill graph and of one decode step are compared with the model's on a few
inputs, greedy generation runs through prefill + decode, and every pruned linear weight must
reach the ONNX file with the same zeros (found by value, since the exporter renames and
transposes).  A failed check raises, and the caller writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.errors import NumericalError
from ..core.modeling import find_blocks, find_linears
from ..core.sequential import ProgressFn
from ..runtime import GraphSpec, kv_names, onnx_greedy, onnx_matmul_weights, ort_session


@dataclass
class ZeroCheck:
    """One pruned linear weight: its zero fraction in the model and in the ONNX file."""

    layer: str
    model_zeros: float
    onnx_zeros: float | None
    initializer: str | None
    transposed: bool


@dataclass
class Verification:
    """Numbers from comparing the ONNX graphs with the PyTorch model."""

    prefill_max_abs_diff: float
    decode_max_abs_diff: float | None
    logits_scale: float
    tolerance: float
    greedy_tokens_torch: list[list[int]] | None
    greedy_tokens_onnx: list[list[int]] | None
    greedy_match: bool | None
    layers_checked: int
    zero_mismatches: list[str]
    zero_checks: list[ZeroCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        limit = self.tolerance * max(1.0, self.logits_scale)
        logits_ok = self.prefill_max_abs_diff <= limit and (self.decode_max_abs_diff or 0.0) <= limit
        return logits_ok and not self.zero_mismatches and self.greedy_match is not False


def _verify_shapes(spec: GraphSpec) -> list[tuple[int, int]]:
    """A few (batch, seqlen) pairs inside what the graph allows; two shapes when dims are dynamic."""
    first = (spec.batch or 1, spec.seqlen or 12)
    second = (spec.batch or 2, spec.seqlen or 5)
    return [first] if first == second else [first, second]


@torch.no_grad()
def verify_logits(model: nn.Module, folder: Path, spec: GraphSpec, greedy_steps: int = 4,
                  seed: int = 1) -> tuple[float, float | None, float, list[list[int]] | None, list[list[int]] | None]:
    """Max |ONNX - PyTorch| of prefill logits and of one decode step, plus greedy tokens of both.

    The reference is the model as loaded (its own attention implementation), so the check
    covers the eager rewrite too.
    """
    generator = torch.Generator().manual_seed(seed)
    prefill = ort_session(folder / spec.prefill)
    decode = ort_session(folder / spec.decode) if spec.decode else None
    prefill_diff, scale, decode_diff = 0.0, 0.0, None
    for batch, seqlen in _verify_shapes(spec):
        ids = torch.randint(0, spec.vocab_size, (batch, seqlen), generator=generator)
        mask = torch.ones_like(ids)
        reference = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().numpy()
        outputs = prefill.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        prefill_diff = max(prefill_diff, float(np.abs(outputs[0] - reference).max()))
        scale = max(scale, float(np.abs(reference).max()))
        if decode is None:
            continue
        new = torch.randint(0, spec.vocab_size, (batch, 1), generator=generator)
        longer = torch.cat([ids, new], dim=1)
        full = (
            model(input_ids=longer, attention_mask=torch.ones_like(longer), use_cache=False)
            .logits[:, -1:]
            .float()
            .numpy()
        )
        feed = {
            "input_ids": new.numpy(),
            "attention_mask": np.ones(longer.shape, dtype=np.int64),
            **dict(zip(kv_names(spec.num_layers, "past_key_values"), outputs[1:])),
        }
        step = decode.run(None, feed)[0]
        decode_diff = max(decode_diff or 0.0, float(np.abs(step - full).max()))
    torch_tokens = onnx_tokens = None
    if decode is not None and greedy_steps > 0:
        ids = torch.randint(0, spec.vocab_size, (spec.batch or 1, spec.seqlen or 6), generator=generator)
        torch_tokens = greedy_torch(model, ids, greedy_steps).tolist()
        onnx_tokens = onnx_greedy(prefill, decode, ids.numpy(), greedy_steps, spec.num_layers).tolist()
    return prefill_diff, decode_diff, scale, torch_tokens, onnx_tokens


@torch.no_grad()
def greedy_torch(model: nn.Module, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy generation in PyTorch by full forward passes (no cache: an independent reference)."""
    ids = input_ids
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, input_ids.shape[1] :]


def _fingerprint(array: np.ndarray) -> tuple:
    """Exact, transpose-invariant key: sorted shape, zero count, largest and smallest value."""
    return (tuple(sorted(array.shape)), int(np.count_nonzero(array == 0)), float(array.max()), float(array.min()))


def pruned_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every block linear layer (``index.name``), plus the output head when it holds zeros (``--prune-lm-head``)."""
    layers = {
        f"{index}.{name}": linear
        for index, block in enumerate(find_blocks(model))
        for name, linear in find_linears(block).items()
    }
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and bool((head.weight == 0).any()):
        layers["lm_head"] = head
    return layers


def check_zeros(model: nn.Module, weights: dict[str, np.ndarray]) -> list[ZeroCheck]:
    """Find each block linear weight among the ONNX initializers (same values, maybe transposed).

    Matching is by value, not name: the exporter renames folded weights and stores MatMul
    weights transposed; identical initializers may be shared (deduplicated).
    """
    buckets: dict[tuple, list[str]] = {}
    for name, array in weights.items():
        buckets.setdefault(_fingerprint(array), []).append(name)
    checks = []
    for layer, linear in pruned_linears(model).items():
        weight = linear.weight.detach().float().numpy()
        model_zeros = float(np.count_nonzero(weight == 0)) / weight.size
        found = None
        for candidate in buckets.get(_fingerprint(weight), []):
            array = weights[candidate]
            if array.shape == weight.shape and np.array_equal(array, weight):
                found = (candidate, False)
            elif array.shape == weight.T.shape and np.array_equal(array, weight.T):
                found = (candidate, True)
            if found:
                break
        if found is None:
            checks.append(ZeroCheck(layer, model_zeros, None, None, False))
            continue
        array = weights[found[0]]
        checks.append(
            ZeroCheck(layer, model_zeros, float(np.count_nonzero(array == 0)) / array.size, found[0], found[1])
        )
    return checks


def verify_export(
    model: nn.Module,
    folder: Path,
    spec: GraphSpec,
    tolerance: float,
    greedy_steps: int = 4,
    progress: ProgressFn | None = None,
) -> Verification:
    """Logits, greedy tokens and zeros of the exported graphs against the model; raises on failure."""
    if progress:
        progress("verify ONNX", 0, 2)
    prefill_diff, decode_diff, scale, torch_tokens, onnx_tokens = verify_logits(model, folder, spec, greedy_steps)
    if progress:
        progress("verify ONNX", 1, 2)
    zero_checks: list[ZeroCheck] = []
    mismatches: list[str] = []
    for graph in filter(None, (spec.prefill, spec.decode)):
        checks = check_zeros(model, onnx_matmul_weights(folder / graph))
        for check in checks:
            if check.onnx_zeros is None:
                mismatches.append(f"{graph}: {check.layer} not found among the MatMul/Gemm weights")
            elif check.onnx_zeros != check.model_zeros:
                mismatches.append(
                    f"{graph}: {check.layer} zeros {check.onnx_zeros:.6f} != model {check.model_zeros:.6f}"
                )
        zero_checks = zero_checks or checks
    if progress:
        progress("verify ONNX", 2, 2)
    result = Verification(
        prefill_diff,
        decode_diff,
        scale,
        tolerance,
        torch_tokens,
        onnx_tokens,
        None if torch_tokens is None else torch_tokens == onnx_tokens,
        len(zero_checks),
        mismatches,
        zero_checks,
    )
    if not result.passed:
        raise NumericalError(_failure_message(result))
    return result


def _failure_message(result: Verification) -> str:
    limit = result.tolerance * max(1.0, result.logits_scale)
    parts = []
    if result.prefill_max_abs_diff > limit or (result.decode_max_abs_diff or 0.0) > limit:
        parts.append(
            "ONNX logits differ from PyTorch by "
            f"{max(result.prefill_max_abs_diff, result.decode_max_abs_diff or 0):.3g} "
            f"(limit {limit:.3g}); this architecture does not trace faithfully with the TorchScript exporter"
        )
    if result.greedy_match is False:
        parts.append(f"greedy tokens differ (torch {result.greedy_tokens_torch}, onnx {result.greedy_tokens_onnx})")
    if result.zero_mismatches:
        parts.append(f"{len(result.zero_mismatches)} weights lost their zeros, first: {result.zero_mismatches[0]}")
    return "ONNX verification failed: " + "; ".join(parts) + "; nothing was written"
