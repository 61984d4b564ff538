"""The sequential pipeline: run a model one decoder block at a time on captured inputs.

Block l is calibrated on the outputs of blocks < l *after* they were pruned, which is how Wanda
and SparseGPT reach their published numbers.  Only the current block lives on the compute
device; the other blocks stay where they were loaded.  The inputs of block 0 and the keyword
arguments every block receives (attention mask, rotary embeddings, ... which differ per block
in e.g. Gemma 3) are captured by running the model once with every block replaced by a
recorder that computes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .activations import DiskWindows
from .modeling import find_blocks, find_linears
from .offload import MappedBlocks, ResidentBlocks

BlockLoader = ResidentBlocks | MappedBlocks

#: progress(description, done, total[, info]) -- the CLI draws it; workflows never print
ProgressFn = Callable[..., None]


class Observer(Protocol):
    """What watches a linear layer's inputs during a sequential pass (``BlockStep.observe_linear_inputs``)."""

    def add(self, inputs: torch.Tensor) -> None: ...


class _StopForward(Exception):
    """Raised by a recorder to end a forward pass once it has what it needs."""


class _BlockRecorder(nn.Module):
    """Stands in for a decoder block: records its inputs and returns them unchanged."""

    def __init__(self, block: nn.Module, index: int, last: bool, sink: _Capture) -> None:
        super().__init__()
        self.block = block
        self.index = index
        self.last = last
        self.sink = sink

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # models read attributes such as ``attention_type`` off blocks
            return getattr(super().__getattr__("block"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.sink.hidden.append(hidden)
        if self.sink.record_kwargs:
            self.sink.kwargs.append(
                {"args": args[1:], "kwargs": {k: v for k, v in kwargs.items() if k != "hidden_states"}}
            )
        if self.last or not self.sink.record_kwargs:
            raise _StopForward
        return hidden


@dataclass
class _Capture:
    hidden: list[torch.Tensor] | DiskWindows
    kwargs: list[dict]
    record_kwargs: bool


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def move_all_but_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Put embeddings, norms and rotary tables on ``device``; leave the blocks where they are.

    Runs outside inference mode and only moves what is elsewhere, so no parameter or buffer is
    ever replaced by an inference tensor (DDP and autograd refuse those later).
    """
    in_blocks = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) in in_blocks:
            continue
        for param in module.parameters(recurse=False):
            if param.device != device:
                param.data = param.data.to(device)
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)


def capture_block_inputs(
    model: nn.Module, windows: torch.Tensor, device: torch.device, store: DiskWindows | None = None
) -> tuple[list[torch.Tensor] | DiskWindows, list[dict]]:
    """Inputs of block 0 for every window (in ``store`` when given), and the extra arguments each block receives."""
    blocks = find_blocks(model)
    move_all_but_blocks(model, blocks, device)
    with torch.inference_mode():
        return _record(model, blocks, windows, device, [] if store is None else store)


def _record(
    model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, device: torch.device, hidden: list | DiskWindows
) -> tuple[list | DiskWindows, list]:
    capture = _Capture(hidden=hidden, kwargs=[], record_kwargs=True)
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _BlockRecorder(block, i, i == len(originals) - 1, capture)
    try:
        for row in range(windows.shape[0]):
            try:
                model(input_ids=windows[row : row + 1].to(device), use_cache=False)
            except _StopForward:
                pass
            capture.record_kwargs = False
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return capture.hidden, [_to_device(k, device) for k in capture.kwargs]


def _output_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class BlockStep:
    """One block of the sequential pass, on the compute device, with its current inputs."""

    index: int
    block: nn.Module
    inputs: list[torch.Tensor] | DiskWindows
    call: dict
    device: torch.device

    def run(self) -> list[torch.Tensor] | DiskWindows:
        """The block's outputs on its current inputs (on disk when the inputs are)."""
        outputs = self.inputs.successor() if isinstance(self.inputs, DiskWindows) else []
        with torch.inference_mode():
            for x in self.inputs:
                outputs.append(_output_tensor(self.block(x.to(self.device), *self.call["args"], **self.call["kwargs"])))
        return outputs

    def observe_linear_inputs(self, make: Callable[[nn.Linear], Observer]) -> dict[str, Observer]:
        """Run the block once, every linear layer's inputs going to the ``add`` of its own observer
        (``make(linear)``: an input-norm or Hessian accumulator); returns them by layer name."""
        observers = {name: make(linear) for name, linear in find_linears(self.block).items()}

        def hook_for(observe: Callable[[torch.Tensor], None]):
            def hook(_module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
                observe(args[0])  # returns None: a forward hook's return value would replace the output

            return hook

        linears = find_linears(self.block)
        handles = [linears[name].register_forward_hook(hook_for(observer.add)) for name, observer in observers.items()]
        try:
            self.run()
        finally:
            for handle in handles:
                handle.remove()
        return observers


def sequential_blocks(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    progress: ProgressFn | None = None,
    on_outputs: Callable[[int, list[torch.Tensor]], None] | None = None,
    loader: BlockLoader | None = None,
    activations_dir: Path | None = None,
) -> Iterator[BlockStep]:
    """Yield each block on ``device`` with the outputs of the (already modified) blocks before it.

    The caller may change the block while holding the step; its outputs are computed after the
    caller resumes the iteration, so block l+1 sees what the modified block l produces.
    ``loader`` materialises each block for its step and releases it after (default: the blocks
    are in memory and only move to ``device`` and back; ``offload.MappedBlocks`` reads them from
    a memory-mapped checkpoint, for models larger than memory).  With ``activations_dir`` the
    windows' hidden states live in files there (``activations.DiskWindows``), not in memory.
    """
    blocks = find_blocks(model)
    if loader is None:
        loader = ResidentBlocks(next(blocks[0].parameters()).device)
    store = DiskWindows(activations_dir) if activations_dir is not None else None
    hidden, calls = capture_block_inputs(model, windows, device, store)
    for index, block in enumerate(blocks):
        loader.load(index, block, device)
        step = BlockStep(index, block, hidden, calls[index], device)
        yield step
        outputs = step.run()
        if isinstance(hidden, DiskWindows):
            hidden.discard()
        hidden = outputs
        if on_outputs is not None:
            on_outputs(index, hidden)
        loader.release(index, block)
        if progress:
            progress("blocks", index + 1, len(blocks))
