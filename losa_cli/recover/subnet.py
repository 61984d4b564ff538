"""LoSiA (arXiv 2507.04487, Wang, Qi & Xu): train a gradient-localised core sub-matrix of each sparse weight.

Every linear layer of the blocks trains a core sub-matrix of its own weight, W[rows][:, cols], with
k_r = ratio * d_out rows (output channels) and k_c = ratio * d_in columns (input channels); the rest
stays frozen.  The update is high-rank inside the sub-matrix (up to min(k_r, k_c)).  As the authors'
method defines it (their paper and public code, github.com/KlozeWang/LoSiA):

* **Parametrisation.**  The trainable ``delta`` (k_r x k_c) holds the change of the sub-matrix since
  the last relocalisation: y = x W^T + b, plus x[..., cols] (delta * M_sub)^T added to the outputs
  ``rows``, where M_sub = M[rows][:, cols] is the layer's mask (True = kept).  Its gradient is
  masked too (autograd through ``* M_sub``), so a pruned weight can never move.
* **Importance** (scored in the layer's own time slot, see below).  From the step's dense weight
  gradient G = g^T x (summed over micro-batches, averaged over processes) and the weight W_eff (W
  with delta in place), the second-order Taylor sensitivity I = |W_eff G - (W_eff G)^2 / 2|
  (the authors' default ``param_mix``; zero on pruned weights) is smoothed per weight as in AdaLoRA:
  I_bar <- b1 I_bar + (1 - b1) I, then U_bar <- b2 U_bar + (1 - b2) |I - I_bar|, with b1 = b2 = 0.85.
  The score of a weight is I_bar * U_bar.
* **Selection** (:func:`best_core`): the best of three greedy choices -- rows and columns by their
  own score sums; rows first, then columns by their sums over those rows; columns first, then rows --
  best meaning the largest total score inside the chosen k_r x k_c block (ties: the earlier choice).
* **Asynchronous time slots.**  Block l's layers relocalise every T * S steps (T = ``period``,
  S = slots: one per block, plus one for the output head when it localises), each at the end of its
  own slot of T steps, in which it scores; so at any time one block computes a dense gradient.
  Relocalising folds delta * M_sub into W, picks the new core, zeroes delta, drops its AdamW moments
  and starts the **learning-rate re-warm-up**: that layer's update is scaled by k / R on its k-th
  step (k = 1..R, R = ``rewarm``, the authors' R = T), as their per-layer schedule restarts.
* **Output head.**  LoSiA trains the output layer too: the head becomes a subnet of ``head share``
  of its rows (vocabulary entries) and all its columns (share 1: the whole head, never relocalised).
  A head pruned with ``--prune-lm-head`` keeps its zeros like any layer (its mask is its zeros).

Where this differs from the authors, for the staged LoSA schedule or for clarity: every stage start
(a new mask) relocalises every block layer after that stage's first step, on that step's scores,
and restarts its slot cycle there, without a re-warm-up (the stage's own warm-up covers it);
re-warm-up steps are k / R for k = 1..R (the authors start at 0 / T); and the re-warm-up multiplies
the current stage schedule (the authors freeze its cosine value at the restart).

``merge`` folds delta into W (pruning sees the trained weights); ``unmerge(new_mask=True)`` re-reads
the mask from W's zeros, takes delta back out and schedules the stage-start relocalisation.
Everything that decides the future (rows, cols, the smoothed scores, the countdowns, delta) is a
buffer or parameter, so checkpoints of the blocks' (and head's) ``state_dict`` resume exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..prune import untie_lm_head
from .masked_lora import AdapterLinear, wrap_linears

#: the key of the output head among the wrappers (block layers are ``block.path``)
HEAD = "lm_head"


@dataclass(frozen=True)
class Timing:
    """When subnets relocalise, how their scores are smoothed, how their learning rate re-warms."""

    period: int  # T: steps of one time slot
    beta1: float = 0.85  # EMA factor of the sensitivity I
    beta2: float = 0.85  # EMA factor of the uncertainty |I - I_bar|
    rewarm: int = 0  # R: steps of learning-rate re-warm-up after a periodic relocalisation (0: none)
    slots: int = 1  # S: slots per cycle; each layer relocalises every T * S steps


def core_size(ratio: float, width: int) -> int:
    """round(ratio * width), at least 1 and at most width."""
    return min(width, max(1, int(round(ratio * width))))


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest scores, ascending (ties: the lower index, stably)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def sensitivity(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """|W G - (W G)^2 / 2|: the loss change if a weight were removed, to second order with the
    Fisher approximation of the Hessian's diagonal (zero where W is zero)."""
    first = weight * grad
    return (first - 0.5 * first * first).abs()


def smooth_scores(average: torch.Tensor, uncertainty: torch.Tensor, importance: torch.Tensor, beta1: float,
                  beta2: float) -> None:
    """In place: I_bar <- b1 I_bar + (1 - b1) I, then U_bar <- b2 U_bar + (1 - b2) |I - I_bar| (new I_bar)."""
    average.mul_(beta1).add_(importance, alpha=1.0 - beta1)
    uncertainty.mul_(beta2).add_((importance - average).abs_(), alpha=1.0 - beta2)


def best_core(scores: torch.Tensor, k_rows: int, k_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k_rows x k_cols block with the largest total score among LoSiA's three greedy choices.

    Choosing the best block exactly is combinatorial; each greedy order misses blocks the others
    find, and comparing their totals costs three small sums.
    """
    rows, cols = top_indices(scores.sum(1), k_rows), top_indices(scores.sum(0), k_cols)
    candidates = [
        (rows, cols),  # rows and columns apart
        (rows, top_indices(scores[rows].sum(0), k_cols)),  # rows, then the columns best over them
        (top_indices(scores[:, cols].sum(1), k_rows), cols),  # columns, then the rows best over them
    ]
    totals = [float(scores[r][:, c].sum()) for r, c in candidates]
    return candidates[totals.index(max(totals))]


class SubnetLinear(AdapterLinear):
    """A frozen sparse ``nn.Linear`` whose core sub-matrix is trained (see module docstring)."""

    def __init__(self, base: nn.Linear, k_rows: int, k_cols: int, slot: int, timing: Timing) -> None:
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        out_f, in_f = base.weight.shape
        device = base.weight.device
        self.delta = nn.Parameter(torch.zeros(k_rows, k_cols, device=device, dtype=torch.float32))
        self.register_buffer("mask", base.weight.detach() != 0)
        self.register_buffer("rows", torch.arange(k_rows, device=device))
        self.register_buffer("cols", torch.arange(k_cols, device=device))
        self.register_buffer("countdown", torch.ones((), dtype=torch.long))  # steps to the next relocalisation
        self.register_buffer("since", torch.tensor(timing.rewarm, dtype=torch.long))  # steps since a re-warming one
        self.register_buffer("fresh", torch.ones((), dtype=torch.bool))  # the next one follows a new mask
        self.register_buffer("importance", torch.empty(0, device=device))  # I_bar while scoring, else empty
        self.register_buffer("uncertainty", torch.empty(0, device=device))  # U_bar while scoring, else empty
        self.register_buffer("grad_sum", torch.empty(0, device=device), persistent=False)  # this step's G
        self.slot = slot
        self.timing = timing
        self.fixed = k_rows == out_f and k_cols == in_f  # the whole layer: nothing to localise
        self.merged = False

    def trainable(self) -> list[nn.Parameter]:
        return [self.delta]

    def sub_mask(self) -> torch.Tensor:
        return self.mask[self.rows][:, self.cols]

    def block_update(self) -> torch.Tensor:
        """delta * M_sub (fp32, k_r x k_c)."""
        return self.delta * self.sub_mask()

    def scoring(self) -> bool:
        """In this layer's time slot: the last T steps before its relocalisation."""
        return self.training and not self.fixed and int(self.countdown) <= self.timing.period

    def rewarm_factor(self) -> float:
        """The share of the learning rate this step's update gets: k / R on the k-th step after a
        periodic relocalisation, else 1."""
        rewarm = self.timing.rewarm
        return 1.0 if rewarm <= 0 else min(1.0, (int(self.since) + 1) / rewarm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        update = self.block_update()
        if self.fixed:  # one matmul on W + delta * M instead of two
            return F.linear(x, self.base.weight + update.to(self.base.weight.dtype), self.base.bias)
        out = self.base(x)
        out = out.index_add(-1, self.rows, F.linear(x.index_select(-1, self.cols), update.to(x.dtype)))
        if self.scoring() and out.requires_grad:
            inputs = x.detach()
            out.register_hook(lambda grad: self._accumulate_grad(grad, inputs))
        return out

    @torch.no_grad()
    def _accumulate_grad(self, grad: torch.Tensor, inputs: torch.Tensor) -> None:
        """G += g^T x, the dense weight gradient of this micro-batch."""
        dense = grad.reshape(-1, grad.shape[-1]).float().T @ inputs.reshape(-1, inputs.shape[-1]).float()
        if self.grad_sum.numel():
            self.grad_sum += dense
        else:
            self.grad_sum = dense

    def effective_weight(self) -> torch.Tensor:
        """W with delta * M_sub in place (fp32 copy)."""
        weight = self.base.weight.detach().float().clone()
        weight[self.rows[:, None], self.cols] += self.block_update().detach()
        return weight

    @torch.no_grad()
    def record(self) -> None:
        """Smooth the step's sensitivity into I_bar and U_bar (before the optimizer moves delta, so
        the weight is the one the gradient belongs to)."""
        if not self.grad_sum.numel():
            return
        grad = self.grad_sum
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(grad)  # every process then scores, and picks, the same
            grad /= torch.distributed.get_world_size()
        if not self.importance.numel():
            self.importance, self.uncertainty = torch.zeros_like(grad), torch.zeros_like(grad)
        smooth_scores(self.importance, self.uncertainty, sensitivity(self.effective_weight(), grad),
                      self.timing.beta1, self.timing.beta2)
        self.grad_sum = grad.new_empty(0)

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        block = (sign * self.block_update()).to(self.base.weight.dtype)
        self.base.weight[self.rows[:, None], self.cols] += block

    def _clear_scores(self) -> None:
        self.importance, self.uncertainty = self.importance.new_empty(0), self.uncertainty.new_empty(0)

    @torch.no_grad()
    def relocalize(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Fold delta into W, choose the best core on I_bar * U_bar, restart delta and its AdamW
        moments; after a periodic relocalisation the learning rate re-warms."""
        self._fold(1.0)
        if self.importance.numel():
            rows, cols = best_core(self.importance * self.uncertainty, self.rows.numel(), self.cols.numel())
            self.rows.copy_(rows)
            self.cols.copy_(cols)
        self.delta.zero_()
        if optimizer is not None:
            optimizer.state.pop(self.delta, None)
        self._clear_scores()
        fresh = bool(self.fresh)
        timing = self.timing
        self.countdown.fill_(timing.period * ((self.slot + 1) if fresh else timing.slots))
        self.since.fill_(timing.rewarm if fresh else 0)
        self.fresh.fill_(False)

    @torch.no_grad()
    def merge(self) -> None:
        """W[rows][:, cols] += delta * M_sub, refusing to write NaN/inf."""
        if self.merged:
            return
        if not torch.isfinite(self.delta).all():
            raise FloatingPointError("the subnet update holds NaN/inf; not merging")
        self._fold(1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self, new_mask: bool = False) -> None:
        """Take delta back out of W.  With ``new_mask`` the mask is first re-read from W's zeros
        (the layer's output is unchanged on the kept weights) and a relocalisation is scheduled
        after the next step, on that step's scores of the freshly pruned layer."""
        if not self.merged:
            return
        if new_mask:
            self.mask.copy_(self.base.weight != 0)
            self.countdown.fill_(1)
            self.fresh.fill_(True)
            self.since.fill_(self.timing.rewarm)
            self._clear_scores()
        self._fold(-1.0)
        self.base.weight.masked_fill_(~self.mask, 0.0)
        self.merged = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """The smoothed scores exist only while scoring: take the checkpoint's size before copying."""
        for name in ("importance", "uncertainty"):
            stored = state_dict.get(prefix + name)
            if stored is not None:
                setattr(self, name, torch.empty(stored.shape, dtype=stored.dtype, device=self.mask.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def attach_losia(model: nn.Module, blocks: nn.ModuleList, ratio: float, head_share: float,
                 timing: Timing) -> tuple[dict[str, AdapterLinear], bool]:
    """Wrap every block linear (and, with ``head_share`` > 0, the output head) in a subnet; returns
    the wrappers by name (the head's is ``HEAD``) and whether the head had to be untied from the
    input embedding (its update must not move the embedding)."""
    head = model.get_output_embeddings()
    train_head = head_share > 0 and isinstance(head, nn.Linear)
    head_slot = train_head and core_size(head_share, head.out_features) < head.out_features
    timing = dataclasses.replace(timing, slots=len(blocks) + int(head_slot))
    wrappers = wrap_linears(blocks, lambda linear: SubnetLinear(
        linear, core_size(ratio, linear.out_features), core_size(ratio, linear.in_features), 0, timing))
    for name, wrapper in wrappers.items():
        wrapper.slot = int(name.split(".")[0]) + int(head_slot)  # the head, when it localises, takes slot 0
    untied = False
    if train_head:
        untied = untie_lm_head(model)
        head = model.get_output_embeddings()
        wrappers[HEAD] = SubnetLinear(head, core_size(head_share, head.out_features), head.in_features, 0, timing)
        model.set_output_embeddings(wrappers[HEAD])
    return wrappers, untied


def detach_head(model: nn.Module) -> None:
    """Put the plain output head back (merge first to keep its training)."""
    head = model.get_output_embeddings()
    if isinstance(head, SubnetLinear):
        model.set_output_embeddings(head.base)


def subnets(wrappers: dict[str, AdapterLinear]) -> list[SubnetLinear]:
    return [w for w in wrappers.values() if isinstance(w, SubnetLinear)]


def record_subnets(wrappers: dict[str, AdapterLinear]) -> None:
    """Before the optimizer step: smooth the scores of the subnets in their slot."""
    for wrapper in subnets(wrappers):
        wrapper.record()


def rewarm_snapshot(wrappers: dict[str, AdapterLinear]) -> list[tuple[SubnetLinear, float, torch.Tensor]]:
    """Before the optimizer step: each re-warming subnet, its factor and its delta."""
    return [(w, factor, w.delta.detach().clone()) for w in subnets(wrappers) if (factor := w.rewarm_factor()) < 1.0]


@torch.no_grad()
def scale_rewarm(saved: list[tuple[SubnetLinear, float, torch.Tensor]]) -> None:
    """After it: scale each re-warming subnet's step by its factor (AdamW's step, weight decay
    included, is linear in the learning rate, so this is the step at factor x lr)."""
    for wrapper, factor, before in saved:
        wrapper.delta.sub_(before).mul_(factor).add_(before)


def step_subnets(wrappers: dict[str, AdapterLinear], optimizer: torch.optim.Optimizer) -> None:
    """After every optimizer step: count down, and relocalise the subnets that are due."""
    for wrapper in subnets(wrappers):
        if wrapper.fixed:
            continue
        wrapper.since += 1
        wrapper.countdown -= 1
        if int(wrapper.countdown) <= 0:
            wrapper.relocalize(optimizer)
