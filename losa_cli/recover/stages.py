"""One LoSA stage's pruning (docs/losa-method.md §3-§4): merge the adapters, choose this stage's rates,
prune every block again (the previous mask kept), measure each block's reconstruction error against
the dense model, unmerge with the new mask and set the ranks from the errors.

Pruned weights never come back: each stage's zeros are checked to be a superset of the previous
stage's mask (the input model's zeros for stage 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import NumericalError
from ..core.modeling import block_linears, find_blocks, sparsity_report
from ..core.sequential import ProgressFn, sequential_blocks
from ..prune import (
    Criterion,
    RateRule,
    Reconstruction,
    Reconstructor,
    block_rates,
    check_nm_widths,
    gram_matrix,
    group_zero_counts,
    parse_nm,
    prune_blocks,
    revived,
    satisfies_nm,
)
from .config import RankAllocation, RecoverConfig
from .masked_lora import AdapterLinear, set_block_ranks, wrappers_of
from .rank_alloc import ReconstructionError, allocate_ranks
from .schedule import cubic_sparsity, nm_ramp


@dataclass
class StageRecord:
    """What one stage did (all of it goes into the manifest)."""

    stage: int
    target_sparsity: float
    rates: list[float]
    errors: list[float]
    ranks: list[int]
    sparsity: float
    steps: int
    losses: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0
    pattern: str | None = None
    #: ``reconstruct``: the settings and each block's fit (``prune.Reconstructor.summary``); None when off, and in
    #: an N:M stage whose pattern is the stage before's (it prunes nothing new)
    reconstruction: dict | None = None


def stage_target(config: RecoverConfig, stage: int) -> tuple[float, tuple[int, int] | None]:
    """This stage's global target and, for N:M runs, its pattern (see ``schedule.py``)."""
    if config.pattern:
        n, m = nm_ramp(*parse_nm(config.pattern), stage, config.stages)
        return n / m, (n, m)
    return cubic_sparsity(config.target_sparsity(), stage, config.stages), None


def repeats_pattern(config: RecoverConfig, stage: int) -> bool:
    """An N:M stage with the stage before's pattern (2:4 over five stages: stages 3 to 5) prunes nothing new,
    so its block fits would start and end at an MSE of exactly 0 and change nothing: they are skipped (about
    55 s per stage on SmolLM2-135M)."""
    nm = stage_target(config, stage)[1]
    return nm is not None and stage > 1 and stage_target(config, stage - 1)[1] == nm


@dataclass
class NMTarget:
    """What an N:M run must end with: exactly N zeros in every group of M, except where the input model's
    group already held more -- those keep exactly their own zeros (pruned weights never come back, and a
    group sparser than N:M is still a valid N:M group).  A dense model can hold such groups: the default
    model, dequantised from a 4-bit GGUF, has 473 groups of 4 with three or four exact zeros among 26.5
    million.  Per layer only the total this allows is kept (the sum over groups of max(N, the input's
    zeros)); with every group at N or more and every input zero kept, that total holds only when each
    group holds exactly max(N, its input zeros)."""

    n: int
    m: int
    zeros: dict[str, int]
    crowded: int
    groups: int

    @classmethod
    def of(cls, model: nn.Module, pattern: str) -> NMTarget:
        check_nm_widths(model, pattern)
        n, m = parse_nm(pattern)
        zeros, crowded, groups = {}, 0, 0
        for name, linear in block_linears(find_blocks(model)).items():
            counts = group_zero_counts(linear.weight, m)
            zeros[name] = int(counts.clamp(min=n).sum())
            crowded += int((counts > n).sum())
            groups += counts.numel()
        return cls(n, m, zeros, crowded, groups)

    def warning(self) -> str | None:
        """One line when the input has groups past N zeros (they end sparser than N:M), else None."""
        if not self.crowded:
            return None
        return (f"the input model already has more than {self.n} zeros in {self.crowded:,} of {self.groups:,} groups "
                f"of {self.m} ({self.crowded / self.groups:.4%}); they keep their zeros, so those groups end sparser "
                f"than {self.n}:{self.m}")

    def violations(self, linears: dict[str, nn.Linear]) -> list[str]:
        """Names of the layers that miss the target: a group with fewer than N zeros, or more zeros in all
        than N per group (or the input's own, where more) allows."""
        return [name for name, linear in linears.items()
                if not satisfies_nm(linear.weight, self.n, self.m)
                or int((linear.weight == 0).sum()) != self.zeros[name]]


@dataclass
class DensePass:
    """What one pass over the input model gives the whole run: every block's outputs on the error
    windows (the reconstruction-error reference) and, for RMI, every block's Gram matrix on the
    similarity windows -- the similarity pass of stage 1, whose model is still the input model."""

    outputs: list[list[torch.Tensor]]
    grams: list[torch.Tensor] | None


def dense_pass(model: nn.Module, windows: torch.Tensor, error_samples: int, gram_samples: int,
               device: torch.device) -> DensePass:
    """Every block's outputs on the first ``error_samples`` windows, kept on the CPU in bf16 (n x T x d
    x L values, so only a few windows), and with ``gram_samples`` each block's input Gram matrix on the
    first ``gram_samples`` windows.  bf16 has fp32's range (fp16 overflows past 65,504, which residual
    streams of e.g. Gemma 3 exceed) and its rounding (2^-9 relative) is far below any pruning error;
    errors are reduced in fp32."""
    stored: list[list[torch.Tensor]] = []
    grams: list[torch.Tensor] = []
    for step in sequential_blocks(
        model,
        windows[: max(error_samples, gram_samples)],
        device,
        on_outputs=lambda i, outs: stored.append([o.detach().to("cpu", torch.bfloat16) for o in outs[:error_samples]]),
    ):
        if gram_samples:
            grams.append(gram_matrix(step.inputs[:gram_samples]))
    return DensePass(stored, grams if gram_samples else None)


def pruned_masks(wrappers: dict[str, AdapterLinear]) -> dict[str, torch.Tensor]:
    """The current mask of every layer (True = pruned), as the adapters hold it: set when the
    last stage pruned, never re-read from the weights being checked."""
    return {name: ~wrapper.mask for name, wrapper in wrappers.items()}


def check_kept_zeros(pruned: dict[str, torch.Tensor], wrappers: dict[str, AdapterLinear], when: str) -> None:
    """Every weight in ``pruned`` must be exactly zero now, or we stop before anything is saved."""
    found = revived(pruned, {name: wrapper.base for name, wrapper in wrappers.items()})
    if found:
        name, count = next(iter(found.items()))
        raise NumericalError(
            f"{when}: {count} pruned weights of {name} became non-zero (and {len(found) - 1} more "
            "layers too); not saving -- this is a bug in losa, please report it"
        )


def prune_stage(
    config: RecoverConfig,
    stage: int,
    *,
    model: nn.Module,
    blocks: nn.ModuleList,
    windows: torch.Tensor,
    error_windows: torch.Tensor,
    dense: list[list[torch.Tensor]],
    device: torch.device,
    mean_rank: float,
    steps: int,
    progress: ProgressFn | None,
    grams: list[torch.Tensor] | None = None,
    reference: nn.ModuleList | None = None,
) -> StageRecord:
    """Merge, allocate rates, prune with error measurement (the previous mask kept), unmerge with
    the new mask, set ranks.  ``grams``: the blocks' Gram matrices of the model as it is now, when a
    pass already made them (stage 1: the dense pass), so RMI needs no similarity pass of its own.
    ``reference``: the dense input model's blocks, the reconstruction targets (``reconstruct_target`` dense)."""
    target, nm = stage_target(config, stage)
    wrappers = wrappers_of(blocks)
    previous = pruned_masks(wrappers)
    for wrapper in wrappers.values():
        wrapper.merge()
    model.eval()
    current = sparsity_report(model)[1]  # no block's rate goes below what it already has
    rates = block_rates(
        model, RateRule.of(config), target, windows, device, nm=nm, floor=current, progress=progress, grams=grams
    ).rates
    errors: list[ReconstructionError] = [ReconstructionError() for _ in blocks]
    count = error_windows.shape[0]

    def measure(index: int, outputs: list[torch.Tensor]) -> None:
        for reference, produced in zip(dense[index], outputs[:count]):
            errors[index].add(reference, produced)

    criterion = Criterion(config.method, nm, config.damp, config.blocksize)
    settings = Reconstruction.of(config)
    if repeats_pattern(config, stage):
        settings = None
    reconstructor = Reconstructor(settings, progress, reference) if settings is not None else None
    prune_warnings = prune_blocks(model, criterion, rates, windows, device, progress, on_outputs=measure,
                                  reconstructor=reconstructor)
    check_kept_zeros(previous, wrappers, f"stage {stage} pruning")
    for wrapper in wrappers.values():
        wrapper.unmerge(new_mask=True)
    block_errors = [e.value() for e in errors]
    if config.rank_allocation == RankAllocation.UNIFORM:
        ranks = [int(round(mean_rank))] * len(blocks)
    else:
        ranks = allocate_ranks(block_errors, mean_rank, config.rank_min, config.rank_max)
    set_block_ranks(blocks, ranks)
    return StageRecord(
        stage=stage,
        target_sparsity=target,
        rates=rates,
        errors=block_errors,
        ranks=ranks,
        sparsity=sparsity_report(model)[2],
        steps=steps,
        warnings=prune_warnings,
        pattern=f"{nm[0]}:{nm[1]}" if nm else None,
        reconstruction=reconstructor.summary() if reconstructor is not None else None,
    )
