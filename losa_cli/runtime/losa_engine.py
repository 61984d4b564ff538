"""The ``losa`` engine of ``losa bench``: the model in PyTorch, its pruned layers on losa's own sparse kernel.

It runs in the bench's child process (``engines.py``) like ONNX Runtime and DeepSparse, so it gets
the same fresh process, thread count, inputs' shapes and timing loop, and its rows land in the same
table.  Its ``sparse`` rows run the decoder blocks' linear layers as ``SparseLinear`` (bitmask-packed,
``kernels/``); its ``dense`` row is the same model in plain PyTorch (dense ``F.linear`` multiplies the
zeros: its time does not depend on the values), the baseline a PyTorch user starts from.

Formats per ``--precisions`` (blocks; head):

* ``fp32``: blocks packed fp32; head dense fp32 (the model's own numbers, bit for bit up to summation order);
* ``bf16``: blocks and head packed bf16 (the head is a third of SmolLM2's bytes per token);
* ``int8``: blocks int8 with one scale per output channel; head packed bf16 (an int8 head changes
  greedy tokens on SmolLM2, see the README's kernel section).

With ``--compile`` both the sparse and the dense model run under ``torch.compile`` (the kernel is a
torch operator, ``kernels/native.py``, so it stays inside the graph).

Decode follows the bench's protocol: one new token attending to a fixed past of ``seqlen`` tokens,
the cache cropped back after each step so every step times the same computation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: precision -> (value type of the blocks' packed layers, of the head's; None = head left dense fp32)
LOSA_FORMATS = {"fp32": ("float32", None), "bf16": ("bfloat16", "bfloat16"), "int8": ("int8", "bfloat16")}


def describe_format(precision: str) -> str:
    """The losa engine's weight format for a precision, in words (for the ceiling column)."""
    blocks, head = LOSA_FORMATS[precision]
    return f"bitmask {blocks}" + (f", head {head}" if head else ", head dense fp32")


def prepare_model(
    source: str, precision: str, kernel: bool, trust_remote_code: bool = False
) -> tuple[torch.nn.Module, dict]:
    """Load ``source`` in fp32 and, with ``kernel``, swap its linear layers for SparseLinear per LOSA_FORMATS."""
    from ..core.modeling import load_model, sparsity_report
    from ..core.offload import module_name
    from .kernels.sparse_linear import block_linear_names, sparsify

    model = load_model(source, "float32", trust_remote_code).model.eval()
    names = block_linear_names(model)
    info: dict = {"kernel_path": None, "packed_layers": 0, "block_zero_fraction": sparsity_report(model)[2]}
    if kernel:
        from .kernels.native import available_paths

        blocks, head = LOSA_FORMATS[precision]
        sparsify(model, names, blocks)
        if head:
            sparsify(model, [module_name(model, model.get_output_embeddings())], head)
        info.update(kernel_path=available_paths()[0], packed_layers=len(names) + bool(head))
    return model, info


def weight_bytes_per_token(model: torch.nn.Module) -> dict:
    """Bytes of weights one batch-1 decode step reads: packed layers as stored (mask, values, scales,
    row offsets), dense linear layers whole, norms whole, and one row of the input embedding."""
    from torch import nn

    from .kernels.sparse_linear import SparseLinear

    packed = dense = other = 0
    embedding = model.get_input_embeddings()
    for module in model.modules():
        if isinstance(module, SparseLinear):
            packed += module.packed.nbytes() + (module.bias.nbytes if module.bias is not None else 0)
        elif isinstance(module, nn.Linear):
            dense += sum(t.nbytes for t in module.parameters(recurse=False))
        elif module is embedding:
            other += module.weight[0].nbytes
        elif not list(module.children()):
            other += sum(t.nbytes for t in module.parameters(recurse=False))
    return {"packed_weights": packed, "dense_weights": dense, "other": other}


def _kv_bytes(cache) -> int:
    """Bytes of the KV cache (what attention reads each step)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def make_runner(job: dict, phase: str) -> tuple[Callable[[], None], dict]:
    """Build the model for ``job`` and return a function running one ``phase`` step, plus facts for the ceiling."""
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job.get("seed", 0))
    model, info = prepare_model(job["source"], job["precision"], job["kernel"], job.get("trust_remote_code", False))
    batch, seqlen, vocab = job["batch"], job["seqlen"], model.config.vocab_size
    past = torch.randint(0, vocab, (batch, seqlen))
    info["bytes"] = weight_bytes_per_token(model)
    forward = model.forward
    if job.get("compile"):
        # PyTorch's per-token overhead (module calls, cache bookkeeping: ~11 ms for SmolLM2's 30 blocks on
        # a Zen 3 core) is most of what separates the kernel from the ceiling; inductor fuses it away.
        # Compiling happens on the first call, which make_runner makes, so it counts as compile time.
        forward = torch.compile(model.forward, dynamic=False)
    if phase == "prefill":
        mask = torch.ones(batch, seqlen, dtype=torch.long)

        def prefill() -> None:
            with torch.inference_mode():
                forward(input_ids=past, attention_mask=mask, use_cache=True)

        prefill()
        return prefill, info
    with torch.inference_mode():
        cache = model(input_ids=past, use_cache=True).past_key_values
    info["bytes"]["kv_cache"] = _kv_bytes(cache)
    new = torch.randint(0, vocab, (batch, 1))
    mask = torch.ones(batch, seqlen + 1, dtype=torch.long)

    def decode() -> None:
        with torch.inference_mode():
            forward(input_ids=new, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the new token: every step attends to the same past

    decode()
    return decode, info
