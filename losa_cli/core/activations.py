"""Calibration activations on disk, for runs whose hidden states would not fit in memory.

The sequential pass keeps every window's input to the current block, and produces every
window's output, so memory holds two copies of nsamples x seqlen x hidden values: 4 GB in bf16
for Llama-2-7B with the usual 128 x 2048 tokens, more than one block's weights.  ``DiskWindows``
keeps them in files instead (one safetensors file per window, written and read whole), so only
the window being computed is in memory.  Reads return CPU tensors; the block step moves each
to the compute device.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


class DiskWindows:
    """An append-only list of per-window tensors stored as files in ``root/<generation>``; a store
    with a ``label`` (``beside``) gets a folder of its own, unique under ``root``."""

    def __init__(self, root: Path, generation: int = 0, label: str | None = None) -> None:
        self.root, self.generation, self.label = root, generation, label
        if label is None:
            self.folder = root / str(generation)
            self.folder.mkdir(parents=True, exist_ok=True)
        else:
            self.folder = Path(tempfile.mkdtemp(prefix=f"{generation}-{label}-", dir=root))
        self.count = 0

    def append(self, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        save_file({"hidden": tensor.detach().to("cpu").contiguous()}, self.folder / f"{self.count}.safetensors")
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        from safetensors.torch import load_file

        if not 0 <= index < self.count:
            raise IndexError(index)
        return load_file(self.folder / f"{index}.safetensors")["hidden"]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[index] for index in range(self.count))

    def successor(self) -> DiskWindows:
        """An empty store beside this one, for the next block's outputs."""
        return DiskWindows(self.root, self.generation + 1, self.label)

    def beside(self, label: str) -> DiskWindows:
        """An empty store in a folder of its own, named after ``label`` (a block's kept outputs,
        reconstruction targets): whoever asked for it discards it."""
        return DiskWindows(self.root, self.generation, label)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def activation_bytes(windows: torch.Tensor, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block's inputs plus outputs for these windows (what the pass holds at once)."""
    return 2 * windows.numel() * hidden_size * dtype.itemsize
