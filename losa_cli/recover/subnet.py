"""LoSiA-style subnet fine-tuning (arXiv 2507.04487): train a sub-matrix of each sparse weight.

Instead of low-rank factors, every linear layer trains a core sub-matrix of its own weight,
W[rows][:, cols], with k_r = ratio * d_out core rows (output channels) and k_c = ratio * d_in
core columns (input channels); the rest of the layer stays frozen.  The update is high-rank
inside the sub-matrix (up to min(k_r, k_c)), and the step costs one small extra matmul.

* **Parametrisation.**  The trainable parameter ``delta`` has the fixed shape k_r x k_c and holds
  the change of the sub-matrix since the last relocalisation:
  y = x W^T + b, plus (x[..., cols] (delta * M_sub)^T) added to the outputs ``rows``, where
  M_sub = M[rows][:, cols] is the layer's mask (True = kept).  Its gradient is masked too
  (autograd through ``* M_sub``), so a pruned weight can never move: zeros by construction.
* **Scores.**  On scoring steps a hook on the layer's output forms the dense weight gradient
  G = g^T x and accumulates s = |G * W_eff| (W_eff: W with the delta in place; the first-order
  loss change if the weight were removed, which is zero on pruned weights) into per-row and
  per-column sums.  Scoring steps are the last ``period // 4`` (at least 1) steps before each
  relocalisation, so most steps skip the dense gradient (LoSiA scores only near reselection).
* **Relocalisation** (every ``period`` optimizer steps, and after the first step of every stage,
  i.e. on scores of the freshly pruned model): fold delta * M_sub into W, pick the k_r rows with
  the largest row sums and the k_c columns with the largest column sums (rows and columns
  chosen independently: the best k_r x k_c block is a hard combinatorial problem), set delta to
  zero and drop its AdamW moments (they belong to the old weights).  Scores are summed across
  processes first, so every process picks the same subnet.
* **Merge/unmerge** keep masked LoRA's contract: ``merge`` folds delta into W (pruning sees the
  trained weights), ``unmerge(new_mask=True)`` re-reads the mask from W's zeros, takes delta
  back out and schedules a relocalisation after the next step.

Everything that decides the future (rows, cols, scores, the countdown, delta) is a buffer or
parameter, so ``blocks.state_dict()`` checkpoints make resumption exact.  Differences from the
paper: one shared period for all layers (no asynchronous slots), no learning-rate rewarming
beyond the stage schedule, sums instead of moving averages of the scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .masked_lora import AdapterLinear, wrap_linears


def core_size(ratio: float, width: int) -> int:
    """round(ratio * width), at least 1 and at most width."""
    return min(width, max(1, int(round(ratio * width))))


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest scores, ascending (ties: the lower index, stably)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


class SubnetLinear(AdapterLinear):
    """A frozen sparse ``nn.Linear`` whose core sub-matrix is trained (see module docstring)."""

    def __init__(self, base: nn.Linear, ratio: float, period: int) -> None:
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        out_f, in_f = base.weight.shape
        device = base.weight.device
        k_rows, k_cols = core_size(ratio, out_f), core_size(ratio, in_f)
        self.delta = nn.Parameter(torch.zeros(k_rows, k_cols, device=device, dtype=torch.float32))
        self.register_buffer("mask", base.weight.detach() != 0)
        self.register_buffer("rows", torch.arange(k_rows, device=device))
        self.register_buffer("cols", torch.arange(k_cols, device=device))
        self.register_buffer("row_scores", torch.zeros(out_f, device=device))
        self.register_buffer("col_scores", torch.zeros(in_f, device=device))
        self.register_buffer("countdown", torch.ones((), dtype=torch.long))  # steps to the next relocalisation
        self.period = period
        self.score_steps = max(1, period // 4)
        self.merged = False

    def trainable(self) -> list[nn.Parameter]:
        return [self.delta]

    def sub_mask(self) -> torch.Tensor:
        return self.mask[self.rows][:, self.cols]

    def block_update(self) -> torch.Tensor:
        """delta * M_sub (fp32, k_r x k_c)."""
        return self.delta * self.sub_mask()

    def scoring(self) -> bool:
        return self.training and int(self.countdown) <= self.score_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        update = self.block_update()
        out = self.base(x)
        out = out.index_add(-1, self.rows, F.linear(x.index_select(-1, self.cols), update.to(x.dtype)))
        if self.scoring() and out.requires_grad:
            inputs = x.detach()
            out.register_hook(lambda grad: self._accumulate_scores(grad, inputs, update.detach()))
        return out

    @torch.no_grad()
    def _accumulate_scores(self, grad: torch.Tensor, inputs: torch.Tensor, update: torch.Tensor) -> None:
        """Row and column sums of |G * W_eff| with G = g^T x, the dense weight gradient."""
        dense_grad = grad.reshape(-1, grad.shape[-1]).float().T @ inputs.reshape(-1, inputs.shape[-1]).float()
        weight = self.base.weight.float().clone()
        weight[self.rows[:, None], self.cols] += update
        scores = (dense_grad * weight).abs_()
        self.row_scores += scores.sum(1)
        self.col_scores += scores.sum(0)

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        block = (sign * self.block_update()).to(self.base.weight.dtype)
        self.base.weight[self.rows[:, None], self.cols] += block

    @torch.no_grad()
    def relocalize(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Fold delta into W, choose the rows/cols with the largest scores, restart delta and its
        AdamW state, clear the scores."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.row_scores)
            torch.distributed.all_reduce(self.col_scores)
        self._fold(1.0)
        self.rows.copy_(top_indices(self.row_scores, self.rows.numel()))
        self.cols.copy_(top_indices(self.col_scores, self.cols.numel()))
        self.delta.zero_()
        if optimizer is not None:
            optimizer.state.pop(self.delta, None)
        self.row_scores.zero_()
        self.col_scores.zero_()
        self.countdown.fill_(self.period)

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
            self.row_scores.zero_()
            self.col_scores.zero_()
        self._fold(-1.0)
        self.base.weight.masked_fill_(~self.mask, 0.0)
        self.merged = False


def attach_subnets(blocks: nn.ModuleList, ratio: float, period: int) -> dict[str, AdapterLinear]:
    """Wrap every nn.Linear inside the blocks in a :class:`SubnetLinear`."""
    return wrap_linears(blocks, lambda linear: SubnetLinear(linear, ratio, period))


def step_subnets(wrappers: dict[str, AdapterLinear], optimizer: torch.optim.Optimizer) -> None:
    """After every optimizer step: count down, and relocalise the subnets that are due."""
    for wrapper in wrappers.values():
        if isinstance(wrapper, SubnetLinear):
            wrapper.countdown -= 1
            if int(wrapper.countdown) <= 0:
                wrapper.relocalize(optimizer)
