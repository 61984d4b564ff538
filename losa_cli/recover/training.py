"""The fine-tuning of one LoSA stage: K_t optimizer steps on the adapters, data-parallel through
``accelerate`` (each process takes its slice of every global batch) or sharded with FSDP2
(``sharding.py``), checkpointed every ``checkpoint_every`` steps so a killed run resumes exactly."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core.errors import NumericalError
from ..core.sequential import ProgressFn
from .checkpoint import Checkpoints
from .masked_lora import AdapterLinear, MaskedLoRALinear
from .objective import Objective
from .sharding import assign, full
from .subnet import record_subnets, rewarm_snapshot, scale_rewarm, step_subnets

if TYPE_CHECKING:
    from .teacher_cache import TeacherRows


def dense_teacher(model: nn.Module, device: torch.device) -> nn.Module:
    """A frozen copy of the input model, before any pruning: the distillation teacher (one more
    copy of the weights in memory, one more forward pass per step)."""
    teacher = copy.deepcopy(model).to(device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


@dataclass
class Batches:
    """The training examples, served as each process's slice of a seeded permutation per epoch."""

    examples: list[dict[str, torch.Tensor]]
    batch_size: int
    seed: int
    world: int
    rank: int
    collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]
    device: torch.device
    teacher: TeacherRows | None = None  # the cached teacher rows of this process's micro-batches (teacher_cache.py)

    def micro(self, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``index`` of this process (with its cached teacher rows, when there are any)."""
        per_epoch = len(self.examples)
        rows = []
        for k in range(self.batch_size):
            position = (index * self.world + self.rank) * self.batch_size + k
            epoch, offset = divmod(position, per_epoch)
            order = torch.randperm(per_epoch, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            rows.append(self.examples[int(order[offset])])
        batch = self.collate(rows)
        if self.teacher is not None:
            batch.update(self.teacher.rows(index))
        return {k: v.to(self.device) for k, v in batch.items()}


@dataclass
class Trainer:
    """The pieces one optimizer step needs, built once by the workflow's setup."""

    accelerator: object
    model: nn.Module  # as prepared by accelerate, or the sharded copy (``sharded``)
    objective: Objective
    wrappers: dict[str, AdapterLinear]
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer  # the raw optimizer (checkpoints hold its state)
    prepared_optimizer: object
    scheduler: object
    batches: Batches
    grad_accum: int
    grad_clip: float
    sharded: bool = False  # FSDP2: accelerate does not wrap the model, the step below accumulates itself
    global_step: int = 0
    tokens_trained: int = 0

    def step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns its mean loss."""
        accelerator = self.accelerator
        inactive = _snapshot_inactive(self.wrappers)
        rewarming = rewarm_snapshot(self.wrappers)  # LoSiA's relocalised subnets take a share of the lr
        step_loss = 0.0
        for micro in range(self.grad_accum):
            batch = self.batches.micro(self.global_step * self.grad_accum + micro)
            if self.sharded:  # FSDP2 averages the gradients over the processes in every backward
                loss = self.objective(self.model, batch)
                (loss / self.grad_accum).backward()
                if micro == self.grad_accum - 1:
                    torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)  # the norm over all shards
                    self.optimizer.step()
                    self.optimizer.zero_grad()
            else:
                with accelerator.accumulate(self.model):
                    loss = self.objective(self.model, batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        record_subnets(self.wrappers)  # the step's gradient, before the optimizer moves the weights
                        accelerator.clip_grad_norm_(self.params, self.grad_clip)
                    self.prepared_optimizer.step()
                    self.prepared_optimizer.zero_grad()
            step_loss += float(accelerator.reduce(loss.detach(), "mean")) / self.grad_accum
            self.tokens_trained += int((batch["labels"] != -100).sum()) * self.batches.world
        self.scheduler.step()
        _restore_inactive(inactive)
        scale_rewarm(rewarming)
        step_subnets(self.wrappers, self.optimizer)
        self.global_step += 1
        return step_loss


def train_stage(trainer: Trainer, stage: int, stages: int, first_step: int, steps: int, losses: list[float],
                checkpoint: Callable[[int], None], checkpoint_every: int, checkpoints: Checkpoints,
                progress: ProgressFn | None) -> None:
    """Steps ``first_step..steps`` of a stage; ``checkpoint(step)`` saves every ``checkpoint_every`` steps.
    A progress callback that raises stops the run after the checkpoint of that step (as a kill would)."""
    trainer.model.train()
    for step in range(first_step, steps):
        step_loss = trainer.step()
        if not math.isfinite(step_loss):
            raise NumericalError(f"the loss became {step_loss} at stage {stage} step {step + 1}; the last good "
                                 f"checkpoint is in {checkpoints.folder} (resume with --resume after lowering --lr)")
        losses.append(step_loss)
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            checkpoint(step + 1)
        if progress:
            progress(f"stage {stage}/{stages} train", step + 1, steps, f"loss {step_loss:.3f}")
    trainer.model.eval()


def _snapshot_inactive(wrappers: dict[str, AdapterLinear]) -> list[tuple[MaskedLoRALinear, torch.Tensor, torch.Tensor]]:
    """Adapter components above the active rank, to restore after the optimizer step (AdamW's
    moments and weight decay would otherwise move them although their gradient is zero).  Whole
    factors: sharded ones are gathered (a LoRA factor is small)."""
    return [(w, full(w.lora_A)[w.rank :].clone(), full(w.lora_B)[:, w.rank :].clone())
            for w in wrappers.values() if isinstance(w, MaskedLoRALinear) and w.rank < w.r_max]


@torch.no_grad()
def _restore_inactive(saved) -> None:
    for wrapper, a, b in saved:
        lora_a, lora_b = full(wrapper.lora_A).clone(), full(wrapper.lora_B).clone()
        lora_a[wrapper.rank :], lora_b[:, wrapper.rank :] = a, b
        assign(wrapper.lora_A, lora_a)
        assign(wrapper.lora_B, lora_b)
