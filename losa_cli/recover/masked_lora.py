"""Masked LoRA: low-rank adapters whose update keeps a sparse layer's zero pattern.

y = W x + s * ((B[:, :r] A[:r]) * M) dropout(x),   M = 1[W != 0],   s = alpha / r_max.

Two forms compute the same function:
* ``plain`` builds the dense masked delta and applies it as a second matmul (autograd keeps
  the delta for the backward pass) -- what the LoSA paper's code does;
* ``fused`` is a custom autograd function: without dropout it forms W + s*delta once and does
  one matmul; its backward computes the masked weight gradient dW = (g^T x) * M and from it
  dB = s dW A^T and dA = s B^T dW, recomputing the delta instead of storing it.
Components above the active rank r get no gradient (they are sliced away, not deleted) and come
back if the rank grows.  ``merge`` folds the delta into W and can never revive a pruned weight.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_META = "adapter_config.json"


class _FusedMaskedLoRA(torch.autograd.Function):
    """y = x W^T + s * x_drop (delta)^T with delta = (B A) * M, memory-lean backward."""

    @staticmethod
    def forward(ctx, x, x_drop, weight, bias, lora_a, lora_b, mask, scale):  # noqa: D401 - autograd API
        delta = (lora_b @ lora_a) * mask
        same = x_drop is x
        if same:
            out = F.linear(x, weight + scale * delta, bias)
        else:
            out = F.linear(x, weight, bias) + scale * F.linear(x_drop, delta)
        ctx.same = same
        ctx.scale = scale
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, x_drop if not same else torch.empty(0), weight, lora_a, lora_b, mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, x_drop, weight, lora_a, lora_b, mask = ctx.saved_tensors
        if ctx.same:
            x_drop = x
        scale = ctx.scale
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        delta = (lora_b @ lora_a) * mask
        grad_x = grad_x_drop = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            if ctx.same:
                grad_x = grad_out @ (weight + scale * delta).to(grad_out.dtype)
            else:
                grad_x = grad_out @ weight.to(grad_out.dtype)
                grad_x_drop = grad_out @ (scale * delta).to(grad_out.dtype)
        masked_grad = (grad_flat.T @ x_drop.reshape(-1, x_drop.shape[-1])).to(lora_a.dtype) * mask
        grad_a = scale * (lora_b.T @ masked_grad)
        grad_b = scale * (masked_grad @ lora_a.T)
        grad_bias = grad_flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, grad_x_drop, None, grad_bias, grad_a, grad_b, None, None


class MaskedLoRALinear(nn.Module):
    """A frozen sparse ``nn.Linear`` plus a masked low-rank update (see module docstring)."""

    def __init__(self, base: nn.Linear, r_max: int, alpha: float, dropout: float = 0.0, fused: bool = True) -> None:
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r_max, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r_max, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_buffer("mask", base.weight.detach() != 0)
        self.r_max = r_max
        self.rank = r_max
        self.scale = alpha / r_max
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fused = fused
        self.merged = False

    def active(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors cut to the active rank (slicing leaves the rest without gradient)."""
        return self.lora_A[: self.rank], self.lora_B[:, : self.rank]

    def delta(self) -> torch.Tensor:
        """s * (B A) * M in fp32."""
        lora_a, lora_b = self.active()
        return self.scale * (lora_b @ lora_a) * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.rank == 0:
            return self.base(x)
        lora_a, lora_b = self.active()
        x_drop = self.dropout(x)
        weight = self.base.weight
        if self.fused:
            dtype = weight.dtype
            # the bool mask goes in as is: a float copy saved for backward would cost a dense weight
            return _FusedMaskedLoRA.apply(x, x_drop, weight, self.base.bias, lora_a.to(dtype), lora_b.to(dtype),
                                          self.mask, self.scale)
        delta = ((lora_b @ lora_a) * self.mask).to(x.dtype)
        return self.base(x) + self.scale * F.linear(x_drop, delta)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s (B A) * M, refusing to write NaN/inf."""
        if self.merged:
            return
        update = self.delta()
        if not torch.isfinite(update).all():
            raise FloatingPointError("the adapter update holds NaN/inf; not merging")
        self.base.weight.add_(update.to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self, new_mask: bool = False) -> None:
        """W <- W - s (B A) * M.  With ``new_mask`` the mask is first re-read from W's zeros, so
        the adapter continues on a freshly pruned layer and the layer's output is unchanged."""
        if not self.merged:
            return
        if new_mask:
            self.mask.copy_(self.base.weight != 0)
        self.base.weight.sub_(self.delta().to(self.base.weight.dtype))
        self.base.weight.masked_fill_(~self.mask, 0.0)
        self.merged = False


def attach(blocks: nn.ModuleList, r_max: int, alpha: float, dropout: float, fused: bool) -> dict[str, MaskedLoRALinear]:
    """Wrap every nn.Linear inside the blocks; returns the wrappers by qualified name."""
    wrappers = {}
    for index, block in enumerate(blocks):
        for name, module in list(block.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and not isinstance(module, MaskedLoRALinear):
                    wrapper = MaskedLoRALinear(child, r_max, alpha, dropout, fused)
                    setattr(module, child_name, wrapper)
                    wrappers[f"{index}.{name + '.' if name else ''}{child_name}"] = wrapper
    return wrappers


def detach(blocks: nn.ModuleList) -> None:
    """Put the plain nn.Linear layers back (merge first to keep the adapters' effect)."""
    for block in blocks:
        for module in list(block.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, MaskedLoRALinear):
                    setattr(module, child_name, child.base)


def wrappers_of(blocks: nn.ModuleList) -> dict[str, MaskedLoRALinear]:
    """The attached wrappers by qualified name (``block.path``)."""
    found = {}
    for index, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, MaskedLoRALinear):
                found[f"{index}.{name}"] = module
    return found


def set_block_ranks(blocks: nn.ModuleList, ranks: list[int]) -> None:
    """All adapters of block l share rank ranks[l]."""
    for index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(module, MaskedLoRALinear):
                if not 0 <= ranks[index] <= module.r_max:
                    raise ValueError(f"rank {ranks[index]} for block {index} outside [0, {module.r_max}]")
                module.rank = int(ranks[index])


def base_checksum(blocks: nn.ModuleList) -> str:
    """SHA-256 of the unmerged base weights: ties saved adapters to the base they were trained on."""
    import hashlib

    digest = hashlib.sha256()
    for name, wrapper in sorted(wrappers_of(blocks).items()):
        was_merged = wrapper.merged
        wrapper.unmerge()
        digest.update(name.encode())
        digest.update(wrapper.base.weight.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        if was_merged:
            wrapper.merge()
    return digest.hexdigest()


def save_adapters(blocks: nn.ModuleList, folder: Path, base_sha: str, extra: dict | None = None) -> None:
    """Write the factors (full r_max width) and their ranks/scale as safetensors + JSON."""
    from safetensors.torch import save_file

    wrappers = wrappers_of(blocks)
    tensors = {}
    for name, wrapper in wrappers.items():
        tensors[f"{name}.lora_A"] = wrapper.lora_A.detach().to("cpu").contiguous()
        tensors[f"{name}.lora_B"] = wrapper.lora_B.detach().to("cpu").contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_FILE))
    first = next(iter(wrappers.values()))
    meta = {
        "format": "losa-masked-lora/1",
        "r_max": first.r_max,
        "scale": first.scale,
        "alpha": first.scale * first.r_max,
        "ranks": {name: w.rank for name, w in wrappers.items()},
        "base_sha256": base_sha,
        "applies_to": "the unmerged sparse base weights whose sha256 is base_sha256",
        **(extra or {}),
    }
    (folder / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")


def read_adapters(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load saved factors and metadata, with errors a user can act on."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path, tensor_path = folder / ADAPTER_META, folder / ADAPTER_FILE
    if not meta_path.is_file() or not tensor_path.is_file():
        raise ConfigError(f"{folder} holds no losa adapters ({ADAPTER_META} and {ADAPTER_FILE})")
    try:
        tensors, meta = load_file(str(tensor_path)), json.loads(meta_path.read_text(encoding="utf-8"))
    except (SafetensorError, ValueError, OSError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise ConfigError(f"adapters in {folder} are corrupt: {exc}") from None
    if not isinstance(meta, dict) or not {"r_max", "alpha", "ranks", "base_sha256"} <= meta.keys():
        raise ConfigError(f"{meta_path} lacks r_max, alpha, ranks or base_sha256; "
                          "give the adapters folder losa recover wrote")
    return tensors, meta


@torch.no_grad()
def merge_adapters_from_folder(model: nn.Module, folder: Path, blocks: nn.ModuleList | None = None) -> dict:
    """Merge saved adapters into a model's plain linear layers in place; zeros stay zeros.

    Refuses when the model's weights are not the base the adapters were trained on (for example
    a folder that already holds the merged result), since merging twice would double the update.
    """
    from ..core.modeling import find_blocks

    blocks = blocks if blocks is not None else find_blocks(model)
    tensors, meta = read_adapters(Path(folder))
    wrappers = attach(blocks, int(meta["r_max"]), float(meta["alpha"]), 0.0, fused=False)
    missing = [n for n in wrappers if f"{n}.lora_A" not in tensors]
    if missing:
        detach(blocks)
        raise ConfigError(f"adapters in {folder} do not fit this model: no factors for {missing[0]} (and {len(missing) - 1} more)")
    if base_checksum(blocks) != meta.get("base_sha256"):
        detach(blocks)
        raise ConfigError(
            f"adapters in {folder} were trained on other base weights (sha256 mismatch); "
            "a losa recover output already holds its adapters merged"
        )
    for name, wrapper in wrappers.items():
        wrapper.lora_A.copy_(tensors[f"{name}.lora_A"])
        wrapper.lora_B.copy_(tensors[f"{name}.lora_B"])
        wrapper.rank = int(meta["ranks"][name])
        wrapper.merge()
    detach(blocks)
    return {"adapters": str(folder), "r_max": meta["r_max"], "base_sha256": meta["base_sha256"]}
