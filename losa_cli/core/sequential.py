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


#: tokens per block forward: several short windows go through a block together (bigger matrix
#: products, fewer calls) while the activations of one forward stay bounded
BATCH_TOKENS = 4096

Windows = list[torch.Tensor] | DiskWindows


def windows_per_forward(seqlen: int, tokens: int = BATCH_TOKENS) -> int:
    """How many windows of ``seqlen`` tokens one block forward takes (at least one)."""
    return max(1, tokens // max(1, seqlen))


@dataclass
class Observation:
    """What one observing forward pass over all windows saw (``BlockStep.observe``)."""

    observers: dict[str, Observer]
    #: the block's outputs (None unless asked for: the pass stops early without them)
    outputs: Windows | None = None
    #: the ``tap`` module's outputs, per window (None without a tap)
    tapped: Windows | None = None


class _Watch:
    """Forward pre-hooks that feed each linear layer's inputs to its observer, window by window.

    Layers that read the very same input tensor (q/k/v, gate/up) are found on the first forward
    and share their leader's observer, so their statistics are gathered once.  Each window is added
    on its own, in window order, so the sums are those of a pass that runs one window at a time.
    With ``stop`` the forward ends (``_StopForward``) as soon as every layer's inputs were seen:
    the last layer's product and what follows it are not needed for statistics."""

    def __init__(self, linears: dict[str, nn.Linear], observers: dict[str, Observer], stop: bool) -> None:
        self.count = len(linears)
        self.observers = observers
        self.leader: dict[str, str] = {}
        self.stop = stop
        self.rows = 1
        self.previous: tuple[torch.Tensor, str] | None = None
        self.seen: set[str] = set()

    def start(self, rows: int) -> None:
        """A new forward of ``rows`` windows begins."""
        self.rows, self.previous, self.seen = rows, None, set()

    def hook_for(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in self.leader:
                same = self.previous is not None and x is self.previous[0]
                self.leader[name] = self.leader[self.previous[1]] if same else name
                self.observers[name] = self.observers[self.leader[name]]
            if self.leader[name] == name:
                # window by window: (rows, T, d), or (rows * T, d) where a model flattens the tokens (OPT's MLP)
                windows = x.reshape(self.rows, -1, x.shape[-1]).unbind(0) if x.shape[0] % self.rows == 0 else (x,)
                for window in windows:
                    self.observers[name].add(window)
            self.previous = (x, name)
            self.seen.add(name)
            if self.stop and len(self.seen) == self.count:
                raise _StopForward

        return hook


@dataclass
class BlockStep:
    """One block of the sequential pass, on the compute device, with its current inputs."""

    index: int
    block: nn.Module
    inputs: Windows
    call: dict
    device: torch.device
    #: windows per block forward (``windows_per_forward``)
    batch: int = 1

    def batches(self, inputs: Windows | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(first window, windows ``batch`` at a time stacked on the compute device)."""
        inputs = self.inputs if inputs is None else inputs
        for start in range(0, len(inputs), self.batch):
            rows = [inputs[i] for i in range(start, min(start + self.batch, len(inputs)))]
            yield start, (torch.cat(rows) if len(rows) > 1 else rows[0]).to(self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output on a stack of windows, with the arguments every block receives."""
        return _output_tensor(self.block(x, *self.call["args"], **self.call["kwargs"]))

    def run(self, inputs: Windows | None = None) -> Windows:
        """The block's outputs on its current inputs (or ``inputs``), on disk when the inputs are."""
        inputs = self.inputs if inputs is None else inputs
        outputs = _like(inputs)
        with torch.inference_mode():
            for _, x in self.batches(inputs):
                _extend(outputs, self.forward(x))
        return outputs

    def observe_linear_inputs(self, make: Callable[[nn.Linear], Observer]) -> dict[str, Observer]:
        """Every linear layer's inputs to the ``add`` of its observer (``make(linear)``: an input-norm
        or Hessian accumulator, shared by layers that read the same input); returns them by layer name."""
        return self.observe(make).observers

    def observe(self, make: Callable[[nn.Linear], Observer] | None, outputs: bool = False,
                tap: nn.Module | None = None, inputs: Windows | None = None) -> Observation:
        """One pass of the block as it is over its inputs (or ``inputs``), the linear layers' inputs to
        observers made by ``make`` (none without it); with ``outputs`` the block's outputs are kept,
        with ``tap`` that module's outputs too (reconstruction targets; on disk in folders of their
        own when the inputs are).  Without either the pass skips what follows the last linear
        layer's input."""
        inputs = self.inputs if inputs is None else inputs
        linears = find_linears(self.block) if make is not None else {}
        observers = {name: make(linear) for name, linear in linears.items()}
        watch = _Watch(linears, observers, stop=not outputs and tap is None)
        handles = [linear.register_forward_pre_hook(watch.hook_for(name)) for name, linear in linears.items()]
        kept = _like(inputs, "outputs") if outputs else None
        tapped = _like(inputs, "tapped") if tap is not None else None
        if tap is not None:
            handles.append(tap.register_forward_hook(lambda _m, _a, out: _extend(tapped, _output_tensor(out))))
        try:
            with torch.inference_mode():
                for _, x in self.batches(inputs):
                    watch.start(x.shape[0])
                    try:
                        out = self.forward(x)
                    except _StopForward:
                        continue
                    if kept is not None:
                        _extend(kept, out)
        finally:
            for handle in handles:
                handle.remove()
        return Observation(observers, kept, tapped)


def _like(inputs: Windows, label: str = "") -> Windows:
    """An empty store of the same kind as ``inputs``: in memory, or on disk as the next generation
    (the block's outputs, the next block's inputs) or beside them under ``label``."""
    if not isinstance(inputs, DiskWindows):
        return []
    return inputs.beside(label) if label else inputs.successor()


def _extend(store: Windows, stacked: torch.Tensor) -> None:
    """Append each window of a stacked output (views of it in memory, copies on disk)."""
    for window in stacked.split(1):
        store.append(window)


def sequential_blocks(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    progress: ProgressFn | None = None,
    on_outputs: Callable[[int, list[torch.Tensor]], None] | None = None,
    loader: BlockLoader | None = None,
    activations_dir: Path | None = None,
    batch: int | None = None,
) -> Iterator[BlockStep]:
    """Yield each block on ``device`` with the outputs of the (already modified) blocks before it.

    The caller may change the block while holding the step; its outputs are computed after the
    caller resumes the iteration, so block l+1 sees what the modified block l produces.
    ``loader`` materialises each block for its step and releases it after (default: the blocks
    are in memory and only move to ``device`` and back; ``offload.MappedBlocks`` reads them from
    a memory-mapped checkpoint, for models larger than memory).  With ``activations_dir`` the
    windows' hidden states live in files there (``activations.DiskWindows``), not in memory.
    ``batch`` windows go through a block per forward (default ``windows_per_forward``).
    """
    blocks = find_blocks(model)
    if loader is None:
        loader = ResidentBlocks(next(blocks[0].parameters()).device)
    store = DiskWindows(activations_dir) if activations_dir is not None else None
    hidden, calls = capture_block_inputs(model, windows, device, store)
    batch = batch or windows_per_forward(windows.shape[1])
    for index, block in enumerate(blocks):
        loader.load(index, block, device)
        step = BlockStep(index, block, hidden, calls[index], device, batch)
        yield step
        last = index == len(blocks) - 1
        outputs = [] if last and on_outputs is None else step.run()  # nothing reads the last block's outputs
        if isinstance(hidden, DiskWindows):
            hidden.discard()
        hidden = outputs
        if on_outputs is not None:
            on_outputs(index, hidden)
        loader.release(index, block)
        if progress:
            progress("blocks", index + 1, len(blocks))
