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
``objective.py``), or its top-K rows were cached on disk before training (``teacher_cache.py``:
:func:`top_rows` writes them, :func:`cached_kd_loss` reads them); the math functions here know nothing
of models and are tested on tensors.
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


#: the smallest float16: a shifted logit below it is stored as this (its probability is 0 in float32 anyway)
_FP16_MIN = float(torch.finfo(torch.float16).min)


def top_rows(teacher_logits: torch.Tensor, mask: torch.Tensor, k: int,
             temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's cached form of every attended position: its ``k`` largest logits minus the row's
    largest (float16: the mass sits near 0, where float16 is finest; softmax ignores the shift), their
    vocabulary indices (int32), and logsumexp of the whole shifted row at temperature T (float32), from
    which each cached token's exact probability and the mass of the rest follow."""
    valid = mask.reshape(-1).bool()
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])[valid].float()
    t = t - t.max(dim=-1, keepdim=True).values
    lse = torch.logsumexp(t / temperature, dim=-1)
    values, indices = t.topk(k, dim=-1)
    return values.clamp_min(_FP16_MIN).to(torch.float16), indices.to(torch.int32), lse


def cached_kd_loss(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor,
                   mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``kd_loss`` against cached teacher rows (:func:`top_rows`): T^2 * KL over K + 1 outcomes, the K
    cached tokens and one bucket for the rest of the vocabulary, averaged over the attended positions.

    Why the tail bucket: the K cached probabilities sum to less than 1.  Renormalising them over the K
    tokens would tell the student that every other token is impossible, and dropping the rest would
    leave a sum that is no divergence at all (it rewards the student for moving mass anywhere outside
    the K tokens, unbounded below).  With the tail as one outcome -- the teacher's remaining mass
    1 - sum p_k (known exactly from the row's logsumexp) against the student's mass outside those K
    tokens -- both sides are distributions over the same K + 1 outcomes and the loss is a true KL:
    >= 0, 0 only when the student matches the teacher on those outcomes, never more than the full-vocabulary
    KL, and equal to it when K is the vocabulary size (the bucket is then empty on both sides).

    The teacher's K + 1 probabilities are renormalised to sum to 1, which only absorbs the float16
    rounding of the cached logits."""
    valid = mask.reshape(-1).bool()
    s = student_logits.reshape(-1, student_logits.shape[-1])
    if not bool(valid.all()):
        s = s[valid]
    if s.shape[0] != values.shape[0]:
        raise ValueError(f"{values.shape[0]} cached teacher rows for {s.shape[0]} attended positions")
    s = s.float() / temperature
    k, vocab = values.shape[-1], s.shape[-1]
    index = indices.long()
    student_lse = torch.logsumexp(s, dim=-1, keepdim=True)
    log_q = s.gather(-1, index) - student_lse
    p = torch.exp(values.float() / temperature - lse.float().unsqueeze(-1))
    if k < vocab:
        p_tail = (1.0 - p.sum(-1, keepdim=True)).clamp_min(0.0)
        outside = s.scatter(-1, index, torch.finfo(s.dtype).min)  # the student's logits off the K tokens
        log_q = torch.cat([log_q, torch.logsumexp(outside, dim=-1, keepdim=True) - student_lse], dim=-1)
        p = torch.cat([p, p_tail], dim=-1)
    p = p / p.sum(-1, keepdim=True)
    kl = (torch.xlogy(p, p) - p * log_q).sum()
    return kl * temperature**2 / max(int(valid.sum()), 1)
