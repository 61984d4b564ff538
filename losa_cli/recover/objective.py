"""The loss of one training batch of ``losa recover`` for the chosen ``Loss`` (math: ``losses.py``); the teacher is
a live model, or its cached rows carried by the batch (``teacher_cache.py``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import Loss
from .losses import cached_kd_loss, feature_loss, kd_loss


class BlockOutputs:
    """Forward hooks that keep every block's hidden-state output, only inside :meth:`record`
    (the blocks also run outside training, block by block, when a stage prunes)."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.outputs: list[torch.Tensor] = []
        self.recording = False
        self.handles = [block.register_forward_hook(self._keep) for block in blocks]

    def _keep(self, _module: nn.Module, _args: tuple, output) -> None:
        if self.recording:
            self.outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    def record(self, forward: Callable[[], object]) -> tuple[object, list[torch.Tensor]]:
        """Run ``forward`` and return its result with the blocks' outputs, in block order."""
        self.outputs, self.recording = [], True
        try:
            result = forward()
        finally:
            self.recording = False
        taken, self.outputs = self.outputs, []
        return result, taken


class Objective:
    """The loss of one training batch for the chosen ``kind`` (see the module docstring)."""

    def __init__(self, kind: Loss, temperature: float = 1.0, teacher: nn.Module | None = None,
                 student_blocks: nn.ModuleList | None = None, teacher_blocks: nn.ModuleList | None = None,
                 cached: bool = False) -> None:
        kind = Loss(kind)  # ValueError for an unknown loss
        if kind != Loss.CE and teacher is None and not cached:
            raise ValueError(f"loss {kind!r} needs the dense teacher")
        if cached and kind not in (Loss.KD, Loss.KD_CE):
            raise ValueError(f"loss {kind!r} cannot train from cached teacher rows")
        self.cached = cached  # every batch carries teacher_values / teacher_indices / teacher_lse
        self.kind = kind
        self.temperature = temperature
        self.teacher = teacher
        self.features = kind == Loss.SQUAREHEAD
        self.student_hooks = BlockOutputs(student_blocks) if self.features else None
        self.teacher_hooks = BlockOutputs(teacher_blocks) if self.features else None

    def __call__(self, model: Callable[..., object], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.kind == Loss.CE:
            return model(**batch, use_cache=False).loss
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        if self.cached:
            return self._cached(model, batch, inputs)
        with torch.no_grad():
            teacher_forward = lambda: self.teacher(**inputs).logits  # noqa: E731
            teacher_logits, teacher_features = (self.teacher_hooks.record(teacher_forward) if self.features
                                                else (teacher_forward(), None))
        labels = {"labels": batch["labels"]} if self.kind == Loss.KD_CE else {}
        student_forward = lambda: model(**inputs, **labels)  # noqa: E731
        output, student_features = (
            self.student_hooks.record(student_forward) if self.features else (student_forward(), None)
        )
        loss = kd_loss(output.logits, teacher_logits, batch["attention_mask"], self.temperature)
        if self.kind == Loss.KD_CE:
            loss = loss + output.loss
        if self.features:
            loss = loss + feature_loss(student_features, teacher_features, batch["attention_mask"])
        return loss

    def _cached(self, model: Callable[..., object], batch: dict[str, torch.Tensor], inputs: dict) -> torch.Tensor:
        labels = {"labels": batch["labels"]} if self.kind == Loss.KD_CE else {}
        output = model(**inputs, **labels)
        loss = cached_kd_loss(output.logits, batch["teacher_values"], batch["teacher_indices"], batch["teacher_lse"],
                              batch["attention_mask"], self.temperature)
        return loss + output.loss if self.kind == Loss.KD_CE else loss
