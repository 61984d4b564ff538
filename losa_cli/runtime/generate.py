"""Workflow of ``losa generate``: text from a (sparse) model, with losa's sparse kernel or without.

load model -> with ``--kernel fp32|bf16|int8``, every pruned block linear becomes a
``SparseLinear`` (bitmask-packed weights, native kernel) -> greedy or sampled decoding with the KV
cache (transformers' ``generate``) -> the text, and the time per generated token.  ``--kernel off``
runs the model as loaded (dense PyTorch), so the two can be compared on the same prompt.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ..core.modeling import load_model
from ..core.sequential import ProgressFn
from .config import KERNEL_DTYPES, GenerateConfig


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
    ms_per_token: float
    tokens_per_s: float
    threads: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def run_generate(config: GenerateConfig, progress: ProgressFn | None = None) -> GenerateResult:
    """``losa generate``: see the module docstring."""
    if config.threads:
        torch.set_num_threads(config.threads)
    loaded = load_model(config.model, "float32", config.trust_remote_code)
    model, tokenizer = loaded.model, loaded.tokenizer
    path, names = None, []
    if KERNEL_DTYPES[config.kernel]:
        from .kernels.native import available_paths
        from .kernels.sparse_linear import block_linear_names, sparsify

        path = available_paths()[0]
        names = block_linear_names(model)
        sparsify(model, names, KERNEL_DTYPES[config.kernel], path)
    inputs = tokenizer(config.prompt, return_tensors="pt")
    torch.manual_seed(config.seed)
    settings = {
        "do_sample": config.sample,
        "max_new_tokens": config.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    }
    if config.sample:
        settings.update(temperature=config.temperature, top_p=config.top_p)
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, **settings)
    elapsed = time.perf_counter() - started
    new = output[0, inputs["input_ids"].shape[1] :]
    return GenerateResult(
        model=config.model,
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=int(inputs["input_ids"].shape[1]),
        new_tokens=int(new.numel()),
        kernel=config.kernel,
        kernel_path=path,
        sparse_layers=len(names),
        ms_per_token=elapsed * 1000 / max(1, int(new.numel())),
        tokens_per_s=int(new.numel()) / elapsed,
        threads=torch.get_num_threads(),
    )
