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

The teacher runs live beside the student (one extra forward pass per step, no gradient,
``objective.py``); the math functions here know nothing of models and are tested on tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
