"""Training objectives of ``losa recover``: cross-entropy, and distillation from the dense model.

* ``ce``: next-token cross-entropy on the labels (what the LoSA paper trains with).
* ``kd``: T^2 * KL(p_teacher || p_student) of the next-token distributions at temperature T,
  averaged over the attended positions.  The teacher is the input model itself, unpruned: every
  position carries a full distribution of targets instead of one token, which is why
  distillation recovers sparse models faster than CE (SparseGPT/SquareHead lines of work).
* ``kd+ce``: the sum of both.
* ``squarehead``: ``kd`` plus the per-block feature loss of SquareHead (Kurtic et al., 2023): for
  every decoder block, ||h_student - h_teacher||^2 / ||h_teacher||^2 over the attended tokens,
  averaged over blocks.  Normalising by the teacher's energy keeps blocks with large activations
  from dominating.

The teacher runs live beside the student (one extra forward pass per step, no gradient); the
math functions below know nothing of models and are tested on tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import RECOVER_LOSSES as LOSSES


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over positions where ``mask`` is set."""
    valid = mask.reshape(-1).bool()
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if not bool(valid.all()):  # unpadded text windows skip two vocab-wide copies (~200 MB per 1k tokens)
        s, t = s[valid], t[valid]
    s, t = s.float(), t.float()
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="sum", log_target=True)
    return kl * temperature**2 / max(int(valid.sum()), 1)


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mean over blocks of ||s - t||^2 / ||t||^2 on the positions where ``mask`` is set."""
    valid = mask.reshape(-1).bool()
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher):
        s = s.reshape(-1, s.shape[-1])[valid].float()
        t = t.reshape(-1, t.shape[-1])[valid].float()
        total = total + (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)
    return total / max(len(student), 1)


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

    def __init__(self, kind: str, temperature: float = 1.0, teacher: nn.Module | None = None,
                 student_blocks: nn.ModuleList | None = None, teacher_blocks: nn.ModuleList | None = None) -> None:
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}")
        if kind != "ce" and teacher is None:
            raise ValueError(f"loss {kind!r} needs the dense teacher")
        self.kind = kind
        self.temperature = temperature
        self.teacher = teacher
        self.features = kind == "squarehead"
        self.student_hooks = BlockOutputs(student_blocks) if self.features else None
        self.teacher_hooks = BlockOutputs(teacher_blocks) if self.features else None

    def __call__(self, model: Callable[..., object], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.kind == "ce":
            return model(**batch, use_cache=False).loss
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        with torch.no_grad():
            teacher_forward = lambda: self.teacher(**inputs).logits  # noqa: E731
            teacher_logits, teacher_features = (self.teacher_hooks.record(teacher_forward) if self.features
                                                else (teacher_forward(), None))
        labels = {"labels": batch["labels"]} if self.kind == "kd+ce" else {}
        student_forward = lambda: model(**inputs, **labels)  # noqa: E731
        output, student_features = self.student_hooks.record(student_forward) if self.features else (student_forward(), None)
        loss = kd_loss(output.logits, teacher_logits, batch["attention_mask"], self.temperature)
        if self.kind == "kd+ce":
            loss = loss + output.loss
        if self.features:
            loss = loss + feature_loss(student_features, teacher_features, batch["attention_mask"])
        return loss
