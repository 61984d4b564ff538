"""Block-wise reconstruction, the orchestration (``--reconstruct``; the math is in ``reconstruct.py``).

Inside the sequential pass (``pruning.prune_blocks``), for block l: the pass that gathers the
pruning statistics also keeps the block's outputs *before* it is pruned -- the dense targets, on
the very inputs the block sees (no copy of the model is ever made); the block is pruned; then its
kept weights (or only its norms and biases) are trained with Adam so that the pruned block
reproduces those targets (mean squared error), and only then does the pass compute the block's
outputs for block l+1.  One block is in memory at a time, so this streams with ``--low-memory``.

Two streams of inputs can be fitted on:
* ``dense`` (default): the dense model's own block inputs, carried as a second stream (one more
  forward of the dense block per block, computed before the block is pruned); the targets are the
  dense model's block outputs, so each block learns only to undo its own pruning.
* ``sparse``: the outputs of the already pruned and reconstructed blocks before l, the inputs the
  block will really see; the targets are the dense block on those same inputs (kept from the
  statistics pass, no extra forward), so each block is also asked to undo the error its
  predecessors left.  On SmolLM2-135M at 70% (Wanda, 8 steps per block) this gave wiki perplexity
  210 against 164 for ``dense``: a few steps on a 70%-sparse block cannot absorb the upstream error
  and chasing it costs the local fit.
Recover can name ``reference`` blocks (the dense input model's, kept beside the pruned one): the
targets are then their outputs, and the dense stream flows through them, so a block of a later
LoSA stage is fitted to the dense model rather than to itself before that stage's pruning.
With ``split`` the attention half is fitted first (its module's output against the dense one),
then the rest of the block against the block's dense output with the attention half frozen.
Everything trains in fp32 (the block is cast for the fit and back), on a seeded window order,
so a run is reproducible and a streamed run equals an in-memory one bit for bit.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.activations import DiskWindows
from ..core.errors import ConfigError, key
from ..core.sequential import BlockStep, Observer, ProgressFn, Windows
from .reconstruct import MaskedAdam, block_mse, tunable_parameters


@dataclass
class Reconstruction:
    """How each pruned block is fitted: the ``reconstruct_*`` settings prune and recover share."""

    steps: int
    lr: float
    params: str
    batch: int
    split: bool
    inputs: str
    seed: int = 0

    @classmethod
    def of(cls, config) -> Reconstruction | None:
        """The settings of a ``PruneConfig`` or ``RecoverConfig``, or None when ``reconstruct`` is off."""
        if not config.reconstruct:
            return None
        return cls(config.reconstruct_steps, config.reconstruct_lr, str(config.reconstruct_params),
                   config.reconstruct_batch, config.reconstruct_split, str(config.reconstruct_inputs),
                   config.calibration.seed)


@dataclass
class BlockFit:
    """One block's fit: the loss of the first and of the last step (each on its own batch of
    windows), per half with ``split``, and the seconds it took."""

    block: int
    first_loss: float
    last_loss: float
    seconds: float
    attention_first_loss: float | None = None
    attention_last_loss: float | None = None


@dataclass
class _Targets:
    inputs: Windows
    outputs: Windows
    attention: Windows | None


@dataclass
class Reconstructor:
    """Fits each block of a sequential pruning pass; ``fits`` and ``summary`` say what it did."""

    settings: Reconstruction
    progress: ProgressFn | None = None
    #: blocks whose outputs are the targets (block l's for block l); None: each block itself, before its pruning
    reference: nn.ModuleList | None = None
    fits: list[BlockFit] = field(default_factory=list)
    _dense: Windows | None = None
    _pending: _Targets | None = None

    def observe(self, step: BlockStep, make: Any) -> dict[str, Observer]:
        """The pruning statistics of the (not yet pruned) block, and the targets it will be fitted to,
        from one pass where they share it (``sparse``), from a second pass over the dense stream (or of the
        reference block) otherwise."""
        sparse = self.settings.inputs == "sparse"
        source = step if self.reference is None else dataclasses.replace(step, block=self.reference[step.index])
        tap = attention_module(source.block) if self.settings.split else None
        if sparse and self.reference is None:
            seen = step.observe(make, outputs=True, tap=tap)
            self._pending = _Targets(step.inputs, seen.outputs, seen.tapped)
            return seen.observers
        observers = step.observe(make).observers if make is not None else {}
        inputs = step.inputs if sparse or self._dense is None else self._dense
        seen = source.observe(None, outputs=True, tap=tap, inputs=inputs)
        self._pending = _Targets(inputs, seen.outputs, seen.tapped)
        return observers

    def fit(self, step: BlockStep, total: int) -> BlockFit:
        """Fit the pruned block to the targets ``observe`` kept; then let go of what is no longer needed
        (the dense stream moves on to this block's dense outputs)."""
        targets, self._pending = self._pending, None
        fit = fit_block(step, targets.inputs, targets.outputs, targets.attention, self.settings)
        self.fits.append(fit)
        _discard(targets.attention)
        if self.settings.inputs == "dense":
            if targets.inputs is not step.inputs:
                _discard(targets.inputs)
            self._dense = targets.outputs
        else:
            _discard(targets.outputs)
        if self.progress:
            self.progress("reconstruct", step.index + 1, total, f"mse {fit.first_loss:.3g} -> {fit.last_loss:.3g}")
        return fit

    def close(self) -> None:
        """Discard the dense stream's last files (on disk)."""
        _discard(self._dense)
        self._dense = None

    def summary(self) -> dict:
        """The settings and every block's fit, for results and manifests."""
        return {**asdict(self.settings), "blocks": [asdict(f) for f in self.fits],
                "wall_time_s": sum(f.seconds for f in self.fits)}


def attention_module(block: nn.Module) -> nn.Module:
    """The block's attention module: its child named like ``self_attn`` / ``attention``."""
    for name, child in block.named_children():
        if "attn" in name.lower() or "attention" in name.lower():
            return child
    raise ConfigError(f"{key('reconstruct_split')}: a {type(block).__name__} block has no child module named "
                      f"like attn or attention; drop {key('reconstruct_split')}")


def fit_block(step: BlockStep, inputs: Windows, targets: Windows, attention_targets: Windows | None,
              settings: Reconstruction) -> BlockFit:
    """Train the pruned block (in place) to reproduce ``targets`` from ``inputs``; with
    ``attention_targets`` the attention half first, then the rest with the attention half frozen."""
    started = time.perf_counter()
    block = step.block
    with _in_float32(block), torch.inference_mode(False), torch.enable_grad():
        call = {"args": _trainable(step.call["args"]), "kwargs": _trainable(step.call["kwargs"])}
        chosen = tunable_parameters(block, settings.params)
        batch = min(settings.batch, len(inputs))
        order = window_order(len(inputs), settings.steps * batch, settings.seed * 100003 + step.index)
        with _only_trained(block, [parameter for parameter, _ in chosen]):
            attention = None
            if attention_targets is not None:
                tap = attention_module(block)
                tuner = MaskedAdam(chosen, settings.lr)
                attention = _train(step, call, tuner, inputs, attention_targets, order, batch, settings.steps, tap)
                reached = {id(parameter) for parameter in tuner.reached()}
                chosen = [(parameter, keep) for parameter, keep in chosen if id(parameter) not in reached]
            with _only_trained(block, [parameter for parameter, _ in chosen]):
                losses = _train(step, call, MaskedAdam(chosen, settings.lr), inputs, targets, order, batch,
                                settings.steps, None) if chosen else [float("nan")]
    return BlockFit(step.index, losses[0], losses[-1], time.perf_counter() - started,
                    attention[0] if attention else None, attention[-1] if attention else None)


def window_order(count: int, needed: int, seed: int) -> list[int]:
    """``needed`` window indices: seeded permutations of ``range(count)`` one after another (epochs)."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < needed:
        order += torch.randperm(count, generator=generator).tolist()
    return order[:needed]


class _Reached(Exception):
    """Ends a training forward once the tapped module's output exists."""


def _train(step: BlockStep, call: dict, tuner: MaskedAdam, inputs: Windows, targets: Windows, order: list[int],
           batch: int, steps: int, tap: nn.Module | None) -> list[float]:
    losses = []
    for number in range(steps):
        rows = order[number * batch : (number + 1) * batch]
        x = torch.cat([inputs[i] for i in rows]).to(step.device, torch.float32)
        y = torch.cat([targets[i] for i in rows]).to(step.device, torch.float32)
        losses.append(tuner.step(block_mse(_forward(step.block, x, call, tap), y)))
    return losses


def _forward(block: nn.Module, x: torch.Tensor, call: dict, tap: nn.Module | None) -> torch.Tensor:
    """The block's output on ``x``, or (``tap``) that module's output, the rest of the block not run."""
    if tap is None:
        out = block(x, *call["args"], **call["kwargs"])
        return out[0] if isinstance(out, (tuple, list)) else out
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: tuple, out: Any) -> None:
        seen.append(out[0] if isinstance(out, (tuple, list)) else out)
        raise _Reached

    handle = tap.register_forward_hook(hook)
    try:
        block(x, *call["args"], **call["kwargs"])
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen[0]


def _trainable(value: Any) -> Any:
    """The block's extra arguments as ordinary fp32 tensors: those recorded under inference mode
    cannot be saved for backward, and the block trains in fp32."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.float32, copy=True) if value.is_floating_point() else value.clone()
    if isinstance(value, tuple):
        return tuple(_trainable(v) for v in value)
    if isinstance(value, list):
        return [_trainable(v) for v in value]
    if isinstance(value, dict):
        return {k: _trainable(v) for k, v in value.items()}
    return value


@contextmanager
def _only_trained(block: nn.Module, trained: list[nn.Parameter]) -> Iterator[None]:
    """Only ``trained`` require gradients inside (no weight gradient is computed for the rest); their
    gradients are dropped after (they would cost a copy of the weights, in fp32)."""
    before = {id(p): p.requires_grad for p in block.parameters()}
    wanted = {id(p) for p in trained}
    for parameter in block.parameters():
        parameter.requires_grad_(id(parameter) in wanted)
    try:
        yield
    finally:
        for parameter in block.parameters():
            parameter.requires_grad_(before[id(parameter)])
        for parameter in trained:
            parameter.grad = None


@contextmanager
def _in_float32(block: nn.Module) -> Iterator[None]:
    """The block in fp32 inside (bf16/fp16 Adam steps would round away), back in its dtypes after;
    a zero stays a zero both ways."""
    low = [tensor for module in block.modules() for table in (module._parameters, module._buffers)
           for tensor in table.values()
           if tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float32]
    dtypes = [tensor.dtype for tensor in low]
    for tensor in low:
        tensor.data = tensor.data.float()
    try:
        yield
    finally:
        for tensor, dtype in zip(low, dtypes):
            tensor.data = tensor.data.to(dtype)


def _discard(windows: Windows | None) -> None:
    if isinstance(windows, DiskWindows):
        windows.discard()
