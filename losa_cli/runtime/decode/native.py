"""The native decode step (``kernels/decode.cpp``) built from a plan: one C++ call per token.

``NativeStep(plan, path)`` hands the C++ object the plan's tensors once (it keeps references, so
they stay alive and are never copied); ``bind_cache`` points it at a KV cache tensor, LeanModel's,
so a prefill run by LeanModel is where the native step goes on from.  ``step(token, position)``
returns the logits [vocab] in the step's own buffer, overwritten by the next step.
"""

from __future__ import annotations

import torch

from ..kernels.native import available_paths, extension
from .plan import Linear, Plan

_NONE = torch.empty(0)  # what the C++ side takes for "no tensor" (no bias, no norm, no scale)


def _tensors(linear: Linear) -> list[torch.Tensor]:
    """A linear as decode.cpp takes it: [weight, bias] or [mask, values, row_offsets, scale, bias] (an empty
    mask and row offsets for a packed weight in the dense layout)."""
    bias = linear.bias if linear.bias is not None else _NONE
    packed = linear.packed
    if packed is None:
        return [linear.weight, bias]
    parts = (packed.mask, packed.values, packed.row_offsets, packed.scale)
    return [t if t is not None else _NONE for t in parts] + [bias]


class NativeStep:
    """Batch-1 decode steps of a plan's model in one native call each (see the module docstring)."""

    def __init__(self, plan: Plan, path: str | None = None) -> None:
        f = plan.family
        self.plan, self.path = plan, path or available_paths()[0]
        linears, norms = [], []
        for block in plan.blocks:
            linears += [_tensors(linear) for linear in block.linears()]
            norms.append([t if t is not None else _NONE for t in (block.attn_norm, block.mlp_norm, block.attn_out_norm,
                                                                  block.mlp_out_norm, block.q_norm, block.k_norm)])
        self._step = extension().DecodeStep(
            [f.hidden, f.heads, f.kv_heads, f.head_dim, f.intermediate, f.vocab],
            [f.norm_eps, f.embed_scale, f.attn_scale, f.final_softcap or 0.0], f.activation == "gelu_tanh",
            [w or 0 for w in f.windows], list(f.layer_rope), plan.embed, plan.cos, plan.sin, plan.final_norm,
            _tensors(plan.head), linears, norms, self.path)

    def bind_cache(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Read and write this KV cache [layers, batch, kv_heads, capacity, head_dim] (batch row 0)."""
        self._step.set_cache(keys, values)

    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits [vocab] of ``token`` at ``position``; its keys and values go into the cache."""
        return self._step.step(token, position)
