"""Perplexity of exported ONNX graphs, run by ONNX Runtime on the same windows as ``losa eval``.

Why: an int8 graph is a different model from the PyTorch one it came from, so its accuracy
must be measured, not assumed; and measuring the fp32 graph the same way shows what the export
itself costs (nothing, within float rounding).  The prefill graph maps ``input_ids`` and
``attention_mask`` to ``logits``; the NLL is computed exactly as for the PyTorch model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core.errors import ConfigError
from ..core.sequential import ProgressFn
from ..export.onnx_graphs import SIDECAR_FILE, ort_session, read_graph_spec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def onnx_prefill_graph(spec: str) -> Path | None:
    """The prefill graph named by ``spec`` (a .onnx file, or an ``onnx``/``onnx-int8`` folder), else None.

    An export folder itself names its safetensors model, which stays the PyTorch path.
    """
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".onnx":
        return path
    if path.is_dir() and (path / SIDECAR_FILE).is_file():
        return path / read_graph_spec(path).prefill
    return None


def tokenizer_folder(graph: Path, given: str | None) -> str:
    """Where the tokenizer is: ``given``, else the graph's folder or the export folder above it."""
    if given:
        return given
    for folder in (graph.parent, graph.parent.parent):
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return str(folder)
    raise ConfigError(f"no tokenizer beside {graph}: give --tokenizer MODEL_DIR (the model the graph was exported from)")


def onnx_window_nll(graph: Path, windows: torch.Tensor, threads: int, batch_size: int = 1,
                    progress: ProgressFn | None = None) -> tuple[float, int]:
    """Summed next-token NLL over all windows through ONNX Runtime, and the number of predicted tokens."""
    session = ort_session(graph, threads)
    inputs = {i.name for i in session.get_inputs()}
    if inputs != {"input_ids", "attention_mask"}:
        raise ConfigError(f"{graph} takes {sorted(inputs)}; perplexity needs a prefill graph (input_ids, attention_mask)")
    from .evaluate import summed_nll

    def logits_of(batch: torch.Tensor) -> torch.Tensor:
        ids = batch.numpy().astype(np.int64)
        return torch.from_numpy(session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0])

    return summed_nll(logits_of, windows, batch_size, progress)
