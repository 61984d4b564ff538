"""The plan: a loaded causal LM read once into what the lean decoder computes with.

``read_family`` turns the model's **config** into a ``Family`` (widths, norms, activation, scales,
sliding windows): every difference between the supported architectures is a field there, read
from the config, never guessed from a name.  ``build_plan`` then takes the weights: per block one
fused q/k/v product, o, one fused gate/up product and down, the norms with Gemma's ``1 + w``
folded in, the RoPE cos/sin tables computed by the model's own rotary module(s) (so every static
rope-scaling variant matches transformers), the final norm and the head.  Each linear is dense
fp32 or bitmask-packed, as the caller chooses per role (``blocks``, ``head``).

What differs between the families (transformers' own classes are the reference):

=============  ========  ==============  =======  ======  ==========================================
model_type     qkv bias  norm            q/k norm  act     else
=============  ========  ==============  =======  ======  ==========================================
llama          config    w * x/rms       no       silu    attention_bias / mlp_bias from config
mistral        no        w * x/rms       no       silu    ``sliding_window`` on every layer when set
qwen2          yes       w * x/rms       no       silu    per-layer windows from ``layer_types``
qwen3          config    w * x/rms       yes      silu    per-layer windows from ``layer_types``
gemma3_text    config    (1 + w) * x/rms yes      gelu    embedding * sqrt(hidden); extra norms after
                                                          attention and MLP; ``query_pre_attn_scalar``;
                                                          local/global RoPE per ``layer_types``
=============  ========  ==============  =======  ======  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...core.errors import ModelError
from ..kernels.packed import DTYPES, PackedWeight, pack, unpack

#: model_type values the lean decoder reads (transformers' own modeling code is the reference)
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
#: config activation name -> the lean decoder's (both implementations compute these two)
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
#: rope types whose tables depend on the sequence length seen so far: one table for all positions cannot match them
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class Family:
    """What one architecture computes, read from its config (see the module docstring's table)."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    norm_eps: float
    norm_offset: float  # 1.0 for Gemma's (1 + w) norms, folded into the plan's norm weights
    activation: str  # "silu" or "gelu_tanh"
    embed_scale: float  # Gemma: sqrt(hidden) rounded to the model's dtype, as transformers does; else 1.0
    attn_scale: float  # 1/sqrt(head_dim), or Gemma 3's 1/sqrt(query_pre_attn_scalar)
    qk_norm: bool  # RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3)
    sandwich_norms: bool  # Gemma 3: norms on the attention and MLP outputs before the residual add
    windows: tuple[int | None, ...]  # per layer: sliding window (keys within the last `w` positions) or None
    rope_kinds: tuple[str, ...]  # the distinct RoPE tables ("default", or Gemma 3's layer types)
    layer_rope: tuple[int, ...]  # per layer: index into rope_kinds
    final_softcap: float | None  # Gemma: logits = c * tanh(logits / c) when set


@dataclass
class Linear:
    """One linear layer of the plan: y = x W^T + b, W dense fp32 or packed (never both)."""

    rows: int
    cols: int
    weight: torch.Tensor | None = None
    packed: PackedWeight | None = None
    bias: torch.Tensor | None = None

    def module(self, path: str | None = None) -> nn.Module:
        """An ``nn.Linear`` or ``SparseLinear`` sharing this layer's tensors (no copy)."""
        if self.packed is not None:
            from ..kernels.sparse_linear import SparseLinear

            return SparseLinear(self.packed, self.bias, path)
        linear = nn.Linear(self.cols, self.rows, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias, requires_grad=False)
        return linear

    def nbytes(self) -> int:
        """Bytes one batch-1 product reads: the packed form as stored, or the dense weight; plus the bias."""
        weight = self.packed.nbytes() if self.packed is not None else self.weight.nbytes
        return weight + (self.bias.nbytes if self.bias is not None else 0)


@dataclass
class BlockPlan:
    """One decoder block's weights (norm weights with any ``norm_offset`` already added)."""

    qkv: Linear  # [(heads + 2 kv_heads) * head_dim, hidden]: q rows, then k, then v
    o: Linear
    gate_up: Linear  # [2 * intermediate, hidden]: gate rows, then up
    down: Linear
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor  # Llama's post_attention_layernorm, Gemma's pre_feedforward_layernorm
    attn_out_norm: torch.Tensor | None = None  # Gemma's post_attention_layernorm (on the attention output)
    mlp_out_norm: torch.Tensor | None = None  # Gemma's post_feedforward_layernorm
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None

    def linears(self) -> tuple[Linear, ...]:
        return (self.qkv, self.o, self.gate_up, self.down)

    def norms(self) -> list[torch.Tensor]:
        return [t for t in (self.attn_norm, self.mlp_norm, self.attn_out_norm, self.mlp_out_norm,
                            self.q_norm, self.k_norm) if t is not None]


@dataclass
class Plan:
    """Everything the lean decoder computes with, in float32 (packed layers in their own value type)."""

    family: Family
    embed: torch.Tensor  # [vocab, hidden], shared with the model when it is fp32
    blocks: list[BlockPlan]
    final_norm: torch.Tensor
    head: Linear
    cos: torch.Tensor  # [len(rope_kinds), max_len, head_dim]
    sin: torch.Tensor
    formats: dict[str, str | None] = field(default_factory=dict)  # role -> packed value type, None = dense

    @property
    def max_len(self) -> int:
        """Positions the RoPE tables cover (the longest sequence this plan runs)."""
        return self.cos.shape[1]

    def weight_bytes_per_token(self) -> dict[str, int]:
        """Bytes of weights one batch-1 decode step reads: packed layers as stored (mask, values,
        offsets, scales), dense layers whole, biases, norms, one row of the embedding."""
        linears = [linear for block in self.blocks for linear in block.linears()] + [self.head]
        packed = sum(linear.nbytes() for linear in linears if linear.packed is not None)
        dense = sum(linear.nbytes() for linear in linears if linear.packed is None)
        norms = sum(t.nbytes for block in self.blocks for t in block.norms()) + self.final_norm.nbytes
        return {"packed_weights": packed, "dense_weights": dense, "other": norms + self.embed[0].nbytes}


def read_family(config, dtype: torch.dtype = torch.float32) -> Family:
    """The architecture of ``config``, or a one-line ModelError for one the lean decoder does not run.

    ``dtype``: the model's embedding dtype (Gemma's embedding scale is rounded to it, as transformers does)."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED:
        raise ModelError(f"the lean decoder does not run model_type {model_type!r}; it runs {', '.join(SUPPORTED)}")
    gemma = model_type == "gemma3_text"
    act_name = config.hidden_activation if gemma else config.hidden_act
    if act_name not in ACTIVATIONS:
        raise ModelError(f"the lean decoder does not run activation {act_name!r} ({model_type}); "
                         f"it runs {', '.join(ACTIVATIONS)}")
    if gemma and (config.attn_logit_softcapping is not None or config.use_bidirectional_attention):
        raise ModelError("the lean decoder does not run Gemma 3 with attention soft-capping or bidirectional attention")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = config.num_hidden_layers
    if model_type == "llama":
        windows: list[int | None] = [None] * layers
    elif model_type == "mistral":
        windows = [config.sliding_window] * layers  # None when the config sets no window
    else:
        windows = [config.sliding_window if kind == "sliding_attention" else None for kind in config.layer_types]
    rope_kinds = tuple(sorted(set(config.layer_types))) if gemma else ("default",)
    layer_rope = tuple(rope_kinds.index(kind) for kind in config.layer_types) if gemma else (0,) * layers
    rope = config.rope_parameters
    for params in (rope.values() if gemma else [rope]):
        if (params or {}).get("rope_type") in LENGTH_DEPENDENT_ROPE:
            raise ModelError(f"the lean decoder does not run rope_type {params['rope_type']!r} (its tables change "
                             "with the sequence length); static rope types run")
    return Family(
        model_type=model_type, layers=layers, hidden=config.hidden_size, heads=heads,
        kv_heads=config.num_key_value_heads or heads, head_dim=head_dim, intermediate=config.intermediate_size,
        vocab=config.vocab_size, max_positions=config.max_position_embeddings, norm_eps=config.rms_norm_eps,
        norm_offset=1.0 if gemma else 0.0, activation=ACTIVATIONS[act_name],
        embed_scale=float(torch.tensor(config.hidden_size**0.5, dtype=dtype)) if gemma else 1.0,
        attn_scale=(config.query_pre_attn_scalar if gemma else head_dim) ** -0.5,
        qk_norm=model_type in ("qwen3", "gemma3_text"), sandwich_norms=gemma, windows=tuple(windows),
        rope_kinds=rope_kinds, layer_rope=layer_rope,
        final_softcap=config.final_logit_softcapping if gemma else None)


def build_plan(model: nn.Module, blocks: str | None = None, head: str | None = None,
               max_len: int | None = None) -> Plan:
    """Read ``model`` (a transformers causal LM of a supported family) into a plan.

    ``blocks`` / ``head``: the packed value type of the blocks' linears / the head ("float32",
    "bfloat16", "int8"; see ``kernels/packed.py``), or None for dense fp32.  ``max_len``: the
    positions the RoPE tables cover (default and at most the model's ``max_position_embeddings``).
    Linear layers already swapped for ``SparseLinear`` are read back to their dense values first.
    The embedding and the dense fp32 layers that are not fused (o, down, head) share storage with
    the model, no copy: build the plan once the model's weights are final.
    """
    family = read_family(model.config, model.get_input_embeddings().weight.dtype)
    for role, dtype in (("blocks", blocks), ("head", head)):
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"{role} must be one of {', '.join(DTYPES)} or None, got {dtype!r}")
    max_len = min(max_len or family.max_positions, family.max_positions)
    base = getattr(model, model.base_model_prefix)
    layers = [_block(layer, family, blocks) for layer in base.layers]
    cos, sin = _rope_tables(base.rotary_emb, family, max_len)
    head_module = model.get_output_embeddings()
    return Plan(family=family, embed=_fp32(base.embed_tokens.weight), blocks=layers,
                final_norm=_norm(base.norm, family), head=_linear([head_module], head), cos=cos, sin=sin,
                formats={"blocks": blocks, "head": head})


def _block(layer: nn.Module, family: Family, dtype: str | None) -> BlockPlan:
    attn, mlp = layer.self_attn, layer.mlp
    gemma = family.sandwich_norms
    return BlockPlan(
        qkv=_linear([attn.q_proj, attn.k_proj, attn.v_proj], dtype), o=_linear([attn.o_proj], dtype),
        gate_up=_linear([mlp.gate_proj, mlp.up_proj], dtype), down=_linear([mlp.down_proj], dtype),
        attn_norm=_norm(layer.input_layernorm, family),
        mlp_norm=_norm(layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm, family),
        attn_out_norm=_norm(layer.post_attention_layernorm, family) if gemma else None,
        mlp_out_norm=_norm(layer.post_feedforward_layernorm, family) if gemma else None,
        q_norm=_norm(attn.q_norm, family) if family.qk_norm else None,
        k_norm=_norm(attn.k_norm, family) if family.qk_norm else None)


def _fp32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as contiguous float32, the same storage when it already is."""
    return tensor.detach().to(torch.float32).contiguous()


def _norm(module: nn.Module, family: Family) -> torch.Tensor:
    """An RMSNorm's effective weight: w, or Gemma's 1 + w (added in fp32, as Gemma3RMSNorm does)."""
    weight = module.weight.detach().to(torch.float32)
    return (weight + family.norm_offset).contiguous() if family.norm_offset else weight.contiguous()


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's dense fp32 weight (a ``SparseLinear``'s unpacked)."""
    packed = getattr(module, "packed", None)
    return unpack(packed) if isinstance(packed, PackedWeight) else _fp32(module.weight)


def _linear(modules: list[nn.Module], dtype: str | None) -> Linear:
    """The layers' weights stacked row-wise into one product (q, k, v; gate, up), dense or packed."""
    weights = [_dense_weight(m) for m in modules]
    weight = weights[0] if len(weights) == 1 else torch.cat(weights)
    bias = None
    if any(getattr(m, "bias", None) is not None for m in modules):
        bias = torch.cat([_fp32(m.bias) if m.bias is not None else torch.zeros(w.shape[0])
                          for m, w in zip(modules, weights)])
    rows, cols = weight.shape
    if dtype is None:
        return Linear(rows, cols, weight=weight, bias=bias)
    return Linear(rows, cols, packed=pack(weight, dtype), bias=bias)


def _rope_tables(rotary: nn.Module, family: Family, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [kinds, max_len, head_dim] for positions 0..max_len-1, from the model's own rotary module."""
    positions = torch.arange(max_len)[None]
    probe = torch.zeros(1, dtype=torch.float32)  # the module takes only the dtype and device from it
    with torch.no_grad():
        if family.rope_kinds == ("default",):
            tables = [rotary(probe, positions)]
        else:
            tables = [rotary(probe, positions, kind) for kind in family.rope_kinds]
    cos = torch.stack([c[0] for c, _ in tables]).to(torch.float32).contiguous()
    sin = torch.stack([s[0] for _, s in tables]).to(torch.float32).contiguous()
    if cos.shape[-1] != family.head_dim:
        raise ModelError(f"the lean decoder needs RoPE over the whole head ({family.head_dim}); "
                         f"this {family.model_type} rotates {cos.shape[-1]} dimensions")
    return cos, sin
