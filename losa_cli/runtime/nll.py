"""Summed next-token NLL over token windows: of a PyTorch model, or of an exported prefill graph on ONNX Runtime.

Why both: an int8 graph is a different model from the PyTorch one it came from, so its accuracy
must be measured, not assumed; and measuring the fp32 graph the same way shows what the export
itself costs (nothing, within float rounding).  The two are scored by the same ``summed_nll``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import ConfigError
from ..core.sequential import ProgressFn
from .onnx_io import ort_session


def summed_nll(
    logits_of, windows: torch.Tensor, batch_size: int = 1, progress: ProgressFn | None = None
) -> tuple[float, int]:
    """Summed next-token NLL (fp32) over all windows, and the number of predicted tokens.

    ``logits_of(batch)`` returns the logits of a batch of windows: a PyTorch model or an ONNX
    graph, so both are scored by the same code.
    """
    total = 0.0
    count = 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        logits = logits_of(batch)[:, :-1].float()
        targets = batch[:, 1:].to(logits.device)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
        if progress:
            progress("perplexity", min(start + batch_size, windows.shape[0]), windows.shape[0])
    return total, count


@torch.inference_mode()
def window_nll(
    model: torch.nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int = 1,
    progress: ProgressFn | None = None,
) -> tuple[float, int]:
    """Summed next-token NLL of a PyTorch model over all windows, and the number of predicted tokens."""
    return summed_nll(
        lambda batch: model(input_ids=batch.to(device), use_cache=False).logits, windows, batch_size, progress
    )


def onnx_window_nll(
    graph: Path, windows: torch.Tensor, threads: int, batch_size: int = 1, progress: ProgressFn | None = None
) -> tuple[float, int]:
    """Summed next-token NLL over all windows through ONNX Runtime, and the number of predicted tokens.

    The prefill graph maps ``input_ids`` and ``attention_mask`` to ``logits``; the NLL is computed
    exactly as for the PyTorch model."""
    session = ort_session(graph, threads)
    inputs = {i.name for i in session.get_inputs()}
    if inputs != {"input_ids", "attention_mask"}:
        raise ConfigError(
            f"{graph} takes {sorted(inputs)}; perplexity needs a prefill graph (input_ids, attention_mask)"
        )

    def logits_of(batch: torch.Tensor) -> torch.Tensor:
        ids = batch.numpy().astype(np.int64)
        return torch.from_numpy(session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0])

    return summed_nll(logits_of, windows, batch_size, progress)
