"""Workflow of ``losa generate``: text from a (sparse) model on losa's lean decode path.

load model -> the lean decoder (``decode/``): with ``--kernel fp32|bf16|int8`` the pruned block
linears (fused q/k/v and gate/up) and the head packed in that format (the bench's ``LOSA_FORMATS``),
with ``--kernel off`` dense fp32 -> the prompt through ``LeanModel`` in one forward, each new token
through the native step (one C++ call) -> the text, the prefill time and the time per new token.

A model the lean decoder does not run (another architecture) is generated with transformers'
``generate`` instead, its block linears on ``SparseLinear``, and a warning says so.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ..core.errors import ModelError
from ..core.modeling import load_model
from ..core.sequential import ProgressFn
from .config import LOSA_FORMATS, GenerateConfig, Kernel, Precision


@dataclass
class GenerateResult:
    """The continuation and how fast it came."""

    model: str
    text: str
    prompt_tokens: int
    new_tokens: int
    kernel: str
    kernel_path: str | None
    sparse_layers: int
    prefill_ms: float
    ms_per_token: float  # median decode step, the prefill excluded
    tokens_per_s: float
    threads: int
    engine: str  # "losa lean decoder" or "transformers" (an architecture the lean decoder does not run)
    stopped_by: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def run_generate(config: GenerateConfig, progress: ProgressFn | None = None) -> GenerateResult:
    """``losa generate``: see the module docstring."""
    from .decode import Decoder
    from .kernels.native import available_paths

    if config.threads:
        torch.set_num_threads(config.threads)
    loaded = load_model(config.model, "float32", config.trust_remote_code)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    blocks, head = (None, None) if config.kernel == Kernel.OFF else LOSA_FORMATS[Precision(config.kernel.value)]
    ids = tokenizer(config.prompt, return_tensors="pt")["input_ids"]
    path = available_paths()[0] if blocks else None
    try:
        decoder = Decoder.from_model(model, blocks, head)
    except ModelError as exc:
        return _with_transformers(config, model, tokenizer, ids, blocks, path, str(exc))
    out = decoder.generate(ids, config.max_new_tokens, sample=config.sample, temperature=config.temperature,
                           top_p=config.top_p, seed=config.seed)
    per_token = out.ms_per_token
    return GenerateResult(model=config.model, text=tokenizer.decode(out.tokens, skip_special_tokens=True),
                          prompt_tokens=out.prompt_tokens, new_tokens=len(out.tokens), kernel=config.kernel,
                          kernel_path=path, sparse_layers=_packed_layers(decoder.plan), prefill_ms=out.prefill_ms,
                          ms_per_token=per_token, tokens_per_s=1000.0 / per_token if per_token == per_token else 0.0,
                          threads=torch.get_num_threads(), engine="losa lean decoder", stopped_by=out.stopped_by)


def _packed_layers(plan) -> int:
    """Linear layers of the plan on the kernel (a fused q/k/v or gate/up product counts once)."""
    linears = [linear for block in plan.blocks for linear in block.linears()] + [plan.head]
    return sum(linear.packed is not None for linear in linears)


def _with_transformers(config: GenerateConfig, model, tokenizer, ids: torch.Tensor, blocks: str | None,
                       path: str | None, reason: str) -> GenerateResult:
    """transformers' ``generate`` for an architecture the lean decoder does not run (block linears on SparseLinear)."""
    from .kernels.sparse_linear import block_linear_names, sparsify

    names = block_linear_names(model) if blocks else []
    if names:
        sparsify(model, names, blocks, path)
    torch.manual_seed(config.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = {"do_sample": config.sample, "max_new_tokens": config.max_new_tokens, "pad_token_id": pad}
    if config.sample:
        settings.update(temperature=config.temperature, top_p=config.top_p)
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), **settings)
    elapsed = time.perf_counter() - started
    new = output[0, ids.shape[1]:]
    count = max(1, int(new.numel()))
    return GenerateResult(model=config.model, text=tokenizer.decode(new, skip_special_tokens=True),
                          prompt_tokens=int(ids.shape[1]), new_tokens=int(new.numel()), kernel=config.kernel,
                          kernel_path=path, sparse_layers=len(names), prefill_ms=float("nan"),
                          ms_per_token=elapsed * 1000 / count, tokens_per_s=count / elapsed,
                          threads=torch.get_num_threads(), engine="transformers", stopped_by="max_new_tokens",
                          warnings=[f"{reason}: generated with transformers instead (no per-token timing split)"])
