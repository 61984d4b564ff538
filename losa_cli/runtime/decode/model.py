"""``LeanModel``: the whole decoder in readable PyTorch over a plan's weights (gpt-fast style).

One ``forward(token_ids, start_position)`` serves the prefill (many positions) and each decode
step (one position): embed, per block RMSNorm -> fused q/k/v product -> (q/k norms) -> RoPE from
the plan's tables -> write k, v into the static cache at their positions -> attention over the
cache up to the last position (GQA; causal, and sliding-window for the layers that have one) -> o
-> residual -> RMSNorm -> fused gate/up -> act(gate) * up -> down -> residual; final norm and head.

The KV cache is one preallocated tensor ``[layers, batch, kv_heads, capacity, head_dim]`` indexed
by position (``setup_cache``), so a step allocates nothing but its operators' outputs; the native
decode step (``native.py``) reads and writes the same tensor, which is how a prefill run here
fills its cache.  Linears are ``nn.Linear`` or ``SparseLinear`` (packed; many-row prefill calls
take its unpack + GEMM path).  The forward has no data-dependent control flow, so
``torch.compile(model, fullgraph=True)`` traces it whole.  transformers' modeling code for each
family is the reference the tests hold it to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .plan import BlockPlan, Family, Plan


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dimension (weights already hold Gemma's 1 + w)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [batch, positions, heads, head_dim] in the half-split layout transformers
    uses: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); cos, sin [positions, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) if name == "silu" else F.gelu(x, approximate="tanh")


class LeanBlock(nn.Module):
    """One decoder block over its plan (see the module docstring for the order of operations)."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor

    def __init__(self, plan: BlockPlan, family: Family, window: int | None, path: str | None) -> None:
        super().__init__()
        self.family, self.window = family, window
        self.qkv, self.o = plan.qkv.module(path), plan.o.module(path)
        self.gate_up, self.down = plan.gate_up.module(path), plan.down.module(path)
        for name in ("attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm", "q_norm", "k_norm"):
            self.register_buffer(name, getattr(plan, name), persistent=False)
        self.split = [family.heads * family.head_dim, family.kv_heads * family.head_dim,
                      family.kv_heads * family.head_dim]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                start: int) -> torch.Tensor:
        f = self.family
        batch, length, _ = x.shape
        end = start + length
        q, k, v = self.qkv(rms_norm(x, self.attn_norm, f.norm_eps)).split(self.split, dim=-1)
        q = q.view(batch, length, f.heads, f.head_dim)
        k = k.view(batch, length, f.kv_heads, f.head_dim)
        if self.q_norm is not None:
            q, k = rms_norm(q, self.q_norm, f.norm_eps), rms_norm(k, self.k_norm, f.norm_eps)
        q, k = rope(q, cos, sin).transpose(1, 2), rope(k, cos, sin).transpose(1, 2)
        self.k_cache[:batch, :, start:end] = k
        self.v_cache[:batch, :, start:end] = v.view(batch, length, f.kv_heads, f.head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, self.k_cache[:batch, :, :end], self.v_cache[:batch, :, :end],
                                                  attn_mask=mask, scale=f.attn_scale, enable_gqa=True)
        out = self.o(attended.transpose(1, 2).reshape(batch, length, -1))
        if self.attn_out_norm is not None:
            out = rms_norm(out, self.attn_out_norm, f.norm_eps)
        x = x + out
        gate, up = self.gate_up(rms_norm(x, self.mlp_norm, f.norm_eps)).chunk(2, dim=-1)
        out = self.down(activation(f.activation, gate) * up)
        if self.mlp_out_norm is not None:
            out = rms_norm(out, self.mlp_out_norm, f.norm_eps)
        return x + out


class LeanModel(nn.Module):
    """The decoder over a plan, with a static KV cache; ``path`` names the kernel path of packed layers."""

    def __init__(self, plan: Plan, path: str | None = None) -> None:
        super().__init__()
        self.plan, self.family = plan, plan.family
        f = plan.family
        self.register_buffer("embed", plan.embed, persistent=False)
        self.register_buffer("final_norm", plan.final_norm, persistent=False)
        self.register_buffer("cos", plan.cos, persistent=False)
        self.register_buffer("sin", plan.sin, persistent=False)
        self.register_buffer("positions", torch.arange(plan.max_len), persistent=False)
        self.blocks = nn.ModuleList(LeanBlock(block, f, f.windows[i], path) for i, block in enumerate(plan.blocks))
        self.head = plan.head.module(path)
        self.k_cache = self.v_cache = torch.empty(0)
        self.setup_cache(1, 0)

    @property
    def capacity(self) -> int:
        """Positions the KV cache holds."""
        return self.k_cache.shape[3]

    def setup_cache(self, batch: int, capacity: int) -> None:
        """(Re)allocate the KV cache for ``batch`` sequences of up to ``capacity`` positions, keeping
        what it held (so a grown cache goes on from where it was)."""
        f = self.family
        if capacity > self.plan.max_len:
            raise ValueError(f"a cache of {capacity} positions is longer than the plan's {self.plan.max_len}")
        shape = (f.layers, batch, f.kv_heads, capacity, f.head_dim)
        old_k, old_v = self.k_cache, self.v_cache
        self.k_cache, self.v_cache = torch.zeros(shape), torch.zeros(shape)
        if old_k.numel():
            b, n = min(batch, old_k.shape[1]), min(capacity, old_k.shape[3])
            self.k_cache[:, :b, :, :n] = old_k[:, :b, :, :n]
            self.v_cache[:, :b, :, :n] = old_v[:, :b, :, :n]
        for i, block in enumerate(self.blocks):  # views: the blocks write into the one cache tensor
            block.register_buffer("k_cache", self.k_cache[i], persistent=False)
            block.register_buffer("v_cache", self.v_cache[i], persistent=False)

    def masks(self, start: int, length: int) -> dict[int | None, torch.Tensor | None]:
        """Per window (None = full causal) which cached positions each new position attends to;
        None where every cached position is allowed (one new token, no window in reach)."""
        end = start + length
        queries, keys = self.positions[start:end, None], self.positions[None, :end]
        causal = keys <= queries if length > 1 else None
        masks: dict[int | None, torch.Tensor | None] = {None: causal}
        for window in set(self.family.windows) - {None}:
            if end > window or length > 1:
                near = keys > queries - window
                masks[window] = near if causal is None else causal & near
            else:
                masks[window] = causal
        return masks

    def forward(self, token_ids: torch.Tensor, start_position: int = 0, last_only: bool = False) -> torch.Tensor:
        """Logits [batch, positions (or 1 with ``last_only``), vocab] for ``token_ids`` [batch, positions]
        placed at ``start_position``..; their keys and values are written into the cache."""
        f = self.family
        batch, length = token_ids.shape
        end = start_position + length
        if end > self.capacity or batch > self.k_cache.shape[1]:
            raise ValueError(f"positions up to {end} (batch {batch}) do not fit the KV cache "
                             f"({self.capacity} positions, batch {self.k_cache.shape[1]}): call setup_cache first")
        x = F.embedding(token_ids, self.embed)
        if f.embed_scale != 1.0:
            x = x * f.embed_scale
        masks = self.masks(start_position, length)
        cos, sin = self.cos[:, start_position:end], self.sin[:, start_position:end]
        for i, block in enumerate(self.blocks):
            kind = f.layer_rope[i]
            x = block(x, cos[kind], sin[kind], masks[f.windows[i]], start_position)
        if last_only:
            x = x[:, -1:]
        logits = self.head(rms_norm(x, self.final_norm, f.norm_eps))
        if f.final_softcap is not None:
            logits = torch.tanh(logits / f.final_softcap) * f.final_softcap
        return logits
