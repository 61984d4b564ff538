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
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: buffers older checkpoints saved that transformers ignores when loading them (as ``from_pretrained`` does)
LEGACY_BUFFERS = (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$")
ReleaseFn = Callable[[int, nn.Module], None]


@dataclass
class Checkpoint:
    """A local safetensors checkpoint: which file holds each tensor, and its shape (from the headers).

    ``open`` checks what can be checked without reading the weights: the index, that every file it
    names exists and has a readable, complete header, and that each file holds the tensors the
    index assigns to it -- so a broken checkpoint fails in one line before any work, whichever
    path (in memory or ``--low-memory``) then reads it."""

    folder: Path
    weight_map: dict[str, str]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | Path) -> Checkpoint:
        folder = Path(folder)
        weight_map = _index_weight_map(folder) if not (folder / SINGLE_FILE).exists() else None
        if weight_map is None:
            files = [folder / SINGLE_FILE] if (folder / SINGLE_FILE).exists() else sorted(folder.glob("*.safetensors"))
            if len(files) != 1:
                raise ModelError(f"{folder} has {len(files)} .safetensors files and neither {SINGLE_FILE} nor "
                                 f"{INDEX_FILE}: which file holds the model is unclear; keep one, or add the index")
            weight_map = {name: files[0].name for name in _header_shapes(files[0])}
        shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(weight_map.values())):
            found = _header_shapes(folder / file)
            absent = [name for name, owner in weight_map.items() if owner == file and name not in found]
            if absent:
                raise ModelError(f"{INDEX_FILE} in {folder} puts {absent[0]} in {file}, which does not hold it: "
                                 "the index and the shards come from different checkpoints")
            shapes.update({name: shape for name, shape in found.items() if weight_map.get(name) == file})
        return cls(folder, weight_map, shapes)

    def elements(self) -> int:
        """Number of values in all tensors (read from the headers only)."""
        return sum(math.prod(shape) for shape in self.shapes.values())

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

    def first_nonfinite(self, dtype: torch.dtype) -> tuple[str, int] | None:
        """(name, count) of the first tensor holding NaN/inf once in ``dtype``, reading one tensor at a time."""
        for name in sorted(self.weight_map):
            if (count := nonfinite_count(self.read([name], dtype)[name])) is not None:
                return name, count
        return None


def _index_weight_map(folder: Path) -> dict[str, str] | None:
    """The index's tensor -> file map (None without an index), or a ModelError saying what is wrong with it."""
    index = folder / INDEX_FILE
    if not index.exists():
        return None
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(
            f"cannot read {index} (truncated or corrupt?): {exc}; restore it or re-download the model"
        ) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ModelError(f"{index} has no weight_map of tensor names to files; restore it or re-download the model")
    return weight_map


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header; a missing, truncated or corrupt file is a ModelError."""
    from safetensors import safe_open

    if not path.is_file():
        raise ModelError(f"{path.name} is missing from {path.parent} (a shard named by {INDEX_FILE}, or a link to "
                         "nowhere); restore it or re-download the model")
    try:
        with safe_open(path, "pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a broken header
        raise ModelError(f"cannot read {path} (corrupt or incomplete checkpoint?): {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    """An exception's first line, clipped: what a one-line error quotes of a library's message."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def nonfinite_count(tensor: torch.Tensor) -> int | None:
    """How many values of ``tensor`` are NaN or infinite (None when all are finite).  A float32 sum is a
    fast first test (NaN and inf survive it); only a tensor that fails it is counted value by value."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return None
    count = int((~torch.isfinite(tensor)).sum())
    return count or None


def tensor_problem(folder: str | Path, missing: list[str], unexpected: list[str],
                   mismatched: list[tuple[str, tuple, tuple]]) -> str | None:
    """One line on a checkpoint whose tensors are not the model's (None when they are): a tensor left
    out would be filled with random values, and one the model lacks means the file is another model's."""
    if mismatched:
        name, found, wanted = sorted(mismatched)[0]
        return (f"the checkpoint in {folder} holds {name} of shape {list(found)}, but its config.json makes it "
                f"{list(wanted)} ({len(mismatched)} such tensor(s)): the config and the weights do not match")
    if missing:
        extra = f" and holds {len(unexpected)} it does not use (first: {sorted(unexpected)[0]})" if unexpected else ""
        return (f"the checkpoint in {folder} lacks {len(missing)} of the model's tensors (first: {sorted(missing)[0]})"
                f"{extra}: it is incomplete or holds something other than this model's weights; losa will not fill "
                "them with random values")
    if unexpected:
        return (f"the checkpoint in {folder} holds {len(unexpected)} tensor(s) the model does not use (first: "
                f"{sorted(unexpected)[0]}): it belongs to another architecture or config.json is not its own")
    return None


def check_matches(model: nn.Module, checkpoint: Checkpoint) -> None:
    """``--low-memory``: the checkpoint holds every tensor of ``model`` (built on the meta device) in its
    shape and nothing else, as ``from_pretrained`` checks on the in-memory path -- so a missing tensor
    fails now, not when the pass reaches its block."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # a head tied to the embedding may be absent
    ignored = [re.compile(p) for p in (*(model._keys_to_ignore_on_load_unexpected or ()), *LEGACY_BUFFERS)]
    problem = tensor_problem(
        checkpoint.folder,
        missing=[name for name in expected if name not in checkpoint.shapes and name not in tied],
        unexpected=[name for name in checkpoint.shapes
                    if name not in expected and not any(p.search(name) for p in ignored)],
        mismatched=[(name, shape, expected[name]) for name, shape in checkpoint.shapes.items()
                    if name in expected and shape != expected[name]],
    )
    if problem:
        raise ModelError(problem)


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
        names = list(block.state_dict())  # all in the checkpoint: ``check_matches`` saw to it
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
    return free is not None and checkpoint.elements() * dtype.itemsize > free // 2


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
