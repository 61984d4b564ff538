"""Models larger than memory: one decoder block materialised at a time.

The model is built on the meta device (accelerate's ``init_empty_weights``: parameters take no
memory, buffers such as rotary tables are real).  Everything outside the decoder blocks
(embeddings, final norm, head) is read from the checkpoint at once; each block is read from the
memory-mapped safetensors when the sequential pass reaches it and dropped back to the meta
device when the pass leaves it, after ``on_release`` has seen it (``losa prune`` writes it to
its own shard there).  Peak memory is then about one block plus the non-block tensors and the
calibration activations, whatever the number of blocks.

Only local safetensors checkpoints can be read this way (a GGUF file is dequantised whole by
transformers; a Hub id must be downloaded first).
"""

from __future__ import annotations

import ctypes
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError

INDEX_FILE = "model.safetensors.index.json"
ReleaseFn = Callable[[int, nn.Module], None]


@dataclass
class Checkpoint:
    """A local safetensors checkpoint: which file holds each tensor."""

    folder: Path
    weight_map: dict[str, str]

    @classmethod
    def open(cls, folder: str | Path) -> Checkpoint:
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / INDEX_FILE
        if index.is_file():
            return cls(folder, dict(json.loads(index.read_text())["weight_map"]))
        files = sorted(folder.glob("*.safetensors"))
        if len(files) != 1:
            raise ModelError(f"{folder} has {len(files)} .safetensors files and no {INDEX_FILE}; "
                             "--low-memory needs a single file or a sharded checkpoint with its index")
        try:
            with safe_open(files[0], "pt") as handle:
                return cls(folder, {name: files[0].name for name in handle.keys()})
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a broken header
            raise ModelError(f"cannot read {files[0]} (corrupt or incomplete checkpoint?): {exc}") from exc

    def elements(self) -> int:
        """Number of values in all tensors (read from the headers only)."""
        from safetensors import safe_open

        total = 0
        for file in set(self.weight_map.values()):
            with safe_open(self.folder / file, "pt") as handle:
                for name in handle.keys():
                    total += math.prod(handle.get_slice(name).get_shape())
        return total

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Copies of the named tensors in ``dtype``; the mapped file pages are not kept."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        tensors = {}
        for file, group in by_file.items():
            with safe_open(self.folder / file, "pt") as handle:
                for name in group:
                    tensors[name] = handle.get_tensor(name).to(dtype, copy=True)  # never a view of the input file
        return tensors


def module_name(model: nn.Module, target: nn.Module) -> str:
    """The qualified name of ``target`` inside ``model`` (``model.layers`` for Llama's blocks)."""
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError("module not found in model")


def empty_model(config, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model's structure on the meta device; buffers (rotary tables) are computed for real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def load_outside_blocks(model: nn.Module, checkpoint: Checkpoint, blocks_prefix: str, dtype: torch.dtype) -> None:
    """Materialise every parameter and persistent buffer that is not inside a decoder block."""
    wanted = [name for name in model.state_dict() if not name.startswith(blocks_prefix + ".")]
    present = [name for name in wanted if name in checkpoint.weight_map]
    model.load_state_dict(checkpoint.read(present, dtype), strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [name for name, tensor in model.state_dict().items()
               if not name.startswith(blocks_prefix + ".") and tensor.device.type == "meta"]
    if missing:
        raise ModelError(f"the checkpoint in {checkpoint.folder} has no tensor {missing[0]} "
                         "(names differ from the model's); prune it without --low-memory")


class ResidentBlocks:
    """Blocks already in memory: move each to the compute device for its step, then back."""

    def __init__(self, home: torch.device) -> None:
        self.home = home

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        block.to(device)

    def release(self, index: int, block: nn.Module) -> None:
        block.to(self.home)


class MappedBlocks:
    """Blocks read from the checkpoint when needed and dropped after ``on_release`` saw them."""

    def __init__(self, checkpoint: Checkpoint, blocks_prefix: str, dtype: torch.dtype,
                 on_release: ReleaseFn | None = None) -> None:
        self.checkpoint = checkpoint
        self.prefix = blocks_prefix
        self.dtype = dtype
        self.on_release = on_release

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        prefix = f"{self.prefix}.{index}."
        names = list(block.state_dict())
        absent = [name for name in names if prefix + name not in self.checkpoint.weight_map]
        if absent:
            raise ModelError(f"the checkpoint in {self.checkpoint.folder} has no tensor {prefix + absent[0]}; "
                             "prune it without --low-memory")
        tensors = self.checkpoint.read([prefix + name for name in names], self.dtype)
        block.load_state_dict({name: tensors[prefix + name] for name in names}, strict=True, assign=True)
        block.to(device)

    def release(self, index: int, block: nn.Module) -> None:
        if self.on_release is not None:
            self.on_release(index, block)
        block.to("meta")
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the freed block back to the OS.  glibc keeps freed tensors below its (adaptive) mmap
    threshold in the heap, so without a trim the resident size grows by part of a block per step."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc (musl): nothing to trim
            pass


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def should_stream(folder: Path, dtype: torch.dtype) -> bool:
    """``--low-memory`` unset: stream when the model in ``dtype`` would take over half the free memory."""
    try:
        checkpoint = Checkpoint.open(folder)
    except ModelError:
        return False
    free = available_memory_bytes()
    try:
        return free is not None and checkpoint.elements() * dtype.itemsize > free // 2
    except Exception:  # noqa: BLE001 - a broken shard: the normal load reports it in one line
        return False


class ShardWriter:
    """Writes a model as a sharded safetensors checkpoint with one decoder block per shard, so a
    pruned block can leave memory as soon as it is written; the index makes it an ordinary
    Hugging Face checkpoint (``from_pretrained`` and ``Checkpoint.open`` read it)."""

    def __init__(self, folder: Path, blocks_prefix: str, num_blocks: int) -> None:
        self.folder = folder
        self.prefix = blocks_prefix
        self.shards = num_blocks + 1
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write_block(self, index: int, block: nn.Module) -> None:
        state = block.state_dict()
        self._write(index + 1, {f"{self.prefix}.{index}.{name}": tensor for name, tensor in state.items()})

    def write_outside_blocks(self, model: nn.Module) -> None:
        """Embeddings, final norm and head; a head tied to the embedding is stored once, as
        ``save_pretrained`` does."""
        seen: set[int] = set()
        tensors = {}
        for name, tensor in model.state_dict().items():
            if name.startswith(self.prefix + ".") or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            tensors[name] = tensor
        self._write(self.shards, tensors)

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def _write(self, number: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        file = f"model-{number:05d}-of-{self.shards:05d}.safetensors"
        save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, self.folder / file,
                  metadata={"format": "pt"})
        for name, tensor in tensors.items():
            self.weight_map[name] = file
            self.total_size += tensor.numel() * tensor.element_size()
