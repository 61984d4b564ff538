"""The ``losa`` engine of ``losa bench``: the model folder on losa's lean decode path (``decode/``).

It runs in the bench's child process (``engines.py``) like ONNX Runtime and DeepSparse, so it gets
the same fresh process, thread count, inputs' shapes and timing loop, and its rows land in the same
table.  Its ``sparse`` rows pack the decoder blocks' linear layers (fused q/k/v and gate/up) and the
head per ``LOSA_FORMATS``; its ``dense`` row is the same decoder with dense fp32 layers (zeros
multiplied), so "sparse vs dense" compares formats on one engine.

* decode (batch 1): one native step per token (``decode/native.py``: one C++ call for the whole
  model); batches above 1, and ``--compile``, run ``LeanModel`` (PyTorch, ``torch.compile`` when asked);
* prefill: ``LeanModel`` over the prompt, the packed layers on the kernel's GEMM; it computes the
  logits of the last position only (all a generation needs), where the exported ONNX graphs
  compute every position's.

Decode follows the bench's protocol: one new token attending to a fixed past of ``seqlen`` tokens,
every step at the same position (the cache past it is simply overwritten), so every step times the
same computation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import LOSA_FORMATS, Precision


def describe_format(precision: str) -> str:
    """The losa engine's weight format for a precision, in words (for the ceiling column)."""
    blocks, head = LOSA_FORMATS[Precision(precision)]
    return f"bitmask {blocks}, head {head}"


def build_decoder(source: str, precision: str, kernel: bool, trust_remote_code: bool = False,
                  max_len: int | None = None):
    """Load ``source`` in fp32 and read it into the lean decoder: packed per ``LOSA_FORMATS`` with ``kernel``,
    else dense fp32.  Returns the decoder and facts for the bench row."""
    from ..core.modeling import load_model, sparsity_report
    from .decode import Decoder
    from .kernels.native import KernelUnavailable, available_paths

    model = load_model(source, "float32", trust_remote_code).model.eval()
    blocks, head = LOSA_FORMATS[Precision(precision)] if kernel else (None, None)
    try:
        native = kernel or bool(available_paths())
    except KernelUnavailable:  # no compiler: the dense row still runs, on LeanModel's PyTorch path
        native = False
    decoder = Decoder.from_model(model, blocks, head, native=native, max_len=max_len)
    info = {"kernel_path": available_paths()[0] if kernel else None, "block_zero_fraction": sparsity_report(model)[2]}
    return decoder, info


def make_runner(job: dict, phase: str) -> tuple[Callable[[], None], dict]:
    """Build the decoder for ``job`` and return a function running one ``phase`` step, plus facts for the ceiling."""
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job.get("seed", 0))
    batch, seqlen = job["batch"], job["seqlen"]
    decoder, info = build_decoder(job["source"], job["precision"], job["kernel"], job.get("trust_remote_code", False),
                                  max_len=seqlen + 1)
    past = torch.randint(0, decoder.plan.family.vocab, (batch, seqlen))
    info["bytes"] = {**decoder.weight_bytes_per_token(), "kv_cache": batch * decoder.kv_bytes(seqlen)}
    decoder.reserve(seqlen + 1, batch)
    # torch.compile fuses LeanModel's per-op overhead; compiling happens on the first call, which this
    # function makes, so it counts as compile time
    model = torch.compile(decoder.model, dynamic=False) if job.get("compile") else decoder.model

    def lean(tokens: torch.Tensor, start: int) -> None:
        with torch.inference_mode():
            model(tokens, start, last_only=True)

    if phase == "prefill":
        run = lambda: lean(past, 0)  # noqa: E731
    else:
        decoder.prefill(past)  # the past the step attends to
        new = torch.randint(0, decoder.plan.family.vocab, (batch, 1))
        if batch == 1 and decoder.native is not None and not job.get("compile"):
            token = int(new)
            run = lambda: decoder.step(token, seqlen)  # noqa: E731
        else:
            run = lambda: lean(new, seqlen)  # noqa: E731
    run()
    return run, info
