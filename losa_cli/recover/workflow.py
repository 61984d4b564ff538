"""Workflow of ``losa recover``: the LoSA schedule (docs/losa-method.md §3-§5).

setup: load the model, the fine-tuning examples and the calibration windows; record the dense
        block outputs on a few windows (the reference for reconstruction error); attach masked
        LoRA (``--adapter losia``: a trained core sub-matrix, ``subnet.py``) to every linear
        layer of every block.
stage t = 1..T:
        s_t = S (1 - (1 - t/T)^3); merge the adapters; per-block rates (RMI / OWL / uniform, never
        below a block's current sparsity); prune block by block, measuring each block's
        reconstruction error; unmerge with the new mask; ranks from the errors (exact budget);
        fine-tune the adapters for K_t steps.
finish: merge -> check every weight pruned in any stage is still exactly zero -> save the
        merged model + manifest atomically.

Pruned weights never come back: each stage's zeros are checked to be a superset of the previous
stage's mask (the input model's zeros for stage 1), and the merged result against the last mask.
The adapters are not saved: their base (the unmerged last-stage weights) exists only inside the
run, and the merged model already holds their effect.

Training runs through ``accelerate``: ``accelerate launch --num_processes N losa recover ...``
trains data-parallel, each process taking its slice of every global batch.  A checkpoint
(safetensors + JSON, see ``checkpoint.py``) is written at the start of every stage and every
``--checkpoint-every`` steps; ``--resume`` continues from it and ends with the same weights as
an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..prune.allocation import owl_allocation, rmi_allocation
from ..core.atomic import atomic_folder, check_output
from ..core.sequential import ProgressFn, sequential_blocks
from ..core.config import OWL_LAMBDA, OWL_M, RecoverConfig, to_dict
from ..core.data import collate, load_documents, training_examples
from ..core.errors import ConfigError, LosaError, NumericalError
from ..core.manifest import build_manifest, peak_rss_mib, write_manifest
from ..core.modeling import block_linears, find_blocks, load_model, resolve_device, save_model, sparsity_report
from ..prune.masks import group_zero_counts, parse_nm
from ..prune.pruning import Criterion, calibration_windows, check_nm_widths, nm_violations, prune_blocks, revived
from ..prune.rmi import DEFAULT_BETA, default_delta
from .checkpoint import STATE_FILE, Checkpoints
from .losses import Objective
from .masked_lora import AdapterLinear, MaskedLoRALinear, attach, detach, set_block_ranks, wrappers_of
from .rank_alloc import ReconstructionError, allocate_ranks
from .schedule import cubic_sparsity, lr_factor, nm_ramp
from .subnet import attach_subnets, step_subnets

__all__ = ["STATE_FILE", "InterruptForTest", "RecoverResult", "StageRecord", "run_recover"]
#: settings that may differ between a run and its resumption
RESUME_FREE = ("resume", "force", "checkpoint_every", "device")


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


@dataclass
class RecoverResult:
    out: str
    stages: list[StageRecord]
    global_sparsity: float
    per_block_sparsity: list[float]
    mask_checksum: str
    ranks: list[int]
    per_block_rates: list[float]
    tokens_trained: int
    processes: int
    wall_time_s: float
    peak_memory_mib: float
    resumed_from: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class InterruptForTest(Exception):
    """Raised by the test hook ``stop_after_steps`` to simulate a killed run."""


def _fingerprint(config: RecoverConfig) -> dict:
    return {k: v for k, v in to_dict(config).items() if k not in RESUME_FREE}


def _stage_rates(config: RecoverConfig, model: nn.Module, windows: torch.Tensor, device: torch.device, target: float,
                 stage: int, progress: ProgressFn | None) -> list[float]:
    """This stage's per-block rates, never below what a block already has."""
    current = sparsity_report(model)[1]
    if config.pattern:  # N:M fixes every block's rate
        n, m = nm_ramp(*parse_nm(config.pattern), stage, config.stages)
        return [n / m] * len(current)
    if config.allocation == "rmi" and target > 0:
        delta = config.delta if config.delta is not None else default_delta(target)
        beta = config.beta if config.beta is not None else DEFAULT_BETA[config.method]
        return rmi_allocation(model, windows[: config.rmi_samples], device, target, delta, beta, progress, floor=current).rates
    if config.allocation == "owl" and target > 0:
        rates = owl_allocation(model, windows, device, target, OWL_LAMBDA, OWL_M, progress).rates
        return [max(r, c) for r, c in zip(rates, current)]
    return [max(target, c) for c in current]


def _snapshot_inactive(wrappers: dict[str, AdapterLinear]) -> list[tuple[MaskedLoRALinear, torch.Tensor, torch.Tensor]]:
    """Adapter components above the active rank, to restore after the optimizer step (AdamW's
    moments and weight decay would otherwise move them although their gradient is zero)."""
    return [(w, w.lora_A[w.rank :].detach().clone(), w.lora_B[:, w.rank :].detach().clone())
            for w in wrappers.values() if isinstance(w, MaskedLoRALinear) and w.rank < w.r_max]


@torch.no_grad()
def _restore_inactive(saved) -> None:
    for wrapper, a, b in saved:
        wrapper.lora_A[wrapper.rank :].copy_(a)
        wrapper.lora_B[:, wrapper.rank :].copy_(b)


def _dense_teacher(model: nn.Module, device: torch.device) -> nn.Module:
    """A frozen copy of the input model, before any pruning: the distillation teacher (one more
    copy of the weights in memory, one more forward pass per step)."""
    teacher = copy.deepcopy(model).to(device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def _dense_outputs(model: nn.Module, windows: torch.Tensor, device: torch.device) -> list[list[torch.Tensor]]:
    """Every block's outputs on ``windows`` in the input model, kept on the CPU in bf16: the
    reconstruction reference (n x T x d x L values, so only ``--error-samples`` windows).  bf16
    has fp32's range (fp16 overflows past 65,504, which residual streams of e.g. Gemma 3 exceed)
    and its rounding (2^-9 relative) is far below any pruning error; errors are reduced in fp32."""
    stored: list[list[torch.Tensor]] = []
    for _ in sequential_blocks(model, windows, device, on_outputs=lambda i, outs: stored.append(
            [o.detach().to("cpu", torch.bfloat16) for o in outs])):
        pass
    return stored


def run_recover(config: RecoverConfig, progress: ProgressFn | None = None, stop_after_steps: int | None = None) -> RecoverResult:
    """``losa recover``: see the module docstring."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config.validate()
    out = check_output(config.out, config.force, inputs=(config.model,))
    resolve_device(config.device)  # --device cuda without a GPU: refuse, never fall back to the CPU
    checkpoints = Checkpoints(out)
    resume_state = None
    if checkpoints.exists():
        if config.force and not config.resume:
            checkpoints.remove()
        elif not config.resume:
            raise ConfigError(f"{checkpoints.folder} holds a checkpoint of an earlier run; pass --resume to continue it "
                              "or --force to start over")
        else:
            resume_state = checkpoints.read_state()
            differ = [k for k, v in _fingerprint(config).items() if json.dumps(resume_state["settings"].get(k)) != json.dumps(v)]
            if differ:
                raise ConfigError(f"{checkpoints.folder} was made by a run with other settings ({', '.join(differ)}); "
                                  "use the same settings to resume, or --force to start over")
    elif config.resume:
        raise ConfigError(f"--resume: no checkpoint at {checkpoints.folder}")

    started = time.perf_counter()
    accelerator = Accelerator(cpu=config.device == "cpu" or not torch.cuda.is_available(),
                              gradient_accumulation_steps=config.grad_accum)
    device = accelerator.device
    set_seed(config.calibration.seed)
    loaded = load_model(config.model, config.dtype, config.trust_remote_code)
    model = loaded.model
    blocks = find_blocks(model)
    head = model.get_output_embeddings()
    head_pruned = {"lm_head": head.weight.detach() == 0} if head is not None and bool((head.weight == 0).any()) else {}
    if config.pattern:
        _check_nm_input(model, config.pattern)
    warnings: list[str] = []
    calib = config.calibration
    calibration = calibration_windows(model, loaded.tokenizer, calib, warnings)
    windows = calibration.windows
    data = load_documents(config.data, calib.encoding, "fine-tuning file", warnings)
    examples = training_examples(loaded.tokenizer, config.data, data, config.max_length, config.response_only)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else (loaded.tokenizer.eos_token_id or 0)
    error_windows = windows[: config.error_samples]
    dense = _dense_outputs(model, error_windows, device)

    teacher = _dense_teacher(model, device) if config.loss != "ce" else None
    if config.adapter == "losia":
        wrappers = attach_subnets(blocks, config.losia_ratio, config.losia_period)
    else:
        wrappers = attach(blocks, config.rank_max, config.alpha, config.dropout, config.fused)
    objective = Objective(config.loss, config.kd_temperature, teacher, blocks, find_blocks(teacher) if teacher else None)
    params = [p for w in wrappers.values() for p in w.trainable()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    steps = config.plan_steps()
    mean_ranks = config.plan_ranks()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, config.warmup))
    model, prepared_optimizer = accelerator.prepare(model, optimizer)

    history: list[StageRecord] = []
    first_stage, first_step, tokens_before = 1, 0, 0
    if resume_state is not None:
        checkpoints.load(accelerator, blocks, optimizer, scheduler)
        history = [StageRecord(**record) for record in resume_state["history"]]
        first_stage, first_step = resume_state["stage"], resume_state["step"]
        tokens_before = resume_state["tokens_trained"]
        set_block_ranks(blocks, history[-1].ranks)
        for wrapper in wrappers.values():
            wrapper.merged = False

    world = accelerator.num_processes
    global_batch = config.batch_size * config.grad_accum * world
    tokens_trained = tokens_before

    def batch_for(micro_index: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``micro_index`` of this process: its slice of a seeded permutation."""
        per_epoch = len(examples)
        rows = []
        for k in range(config.batch_size):
            position = (micro_index * world + accelerator.process_index) * config.batch_size + k
            epoch, offset = divmod(position, per_epoch)
            order = torch.randperm(per_epoch, generator=torch.Generator().manual_seed(calib.seed * 100003 + epoch))
            rows.append(examples[int(order[offset])])
        return {k: v.to(device) for k, v in collate(rows, pad_id).items()}

    steps_done_before = sum(steps[: first_stage - 1]) + first_step
    global_step = steps_done_before
    for stage in range(first_stage, config.stages + 1):
        stage_started = time.perf_counter()
        if resume_state is not None and stage == first_stage:
            record, start_step = history[-1], first_step  # pruned before the checkpoint was written
        else:
            record = _prune_stage(config, stage, model=accelerator.unwrap_model(model), blocks=blocks, windows=windows,
                                  error_windows=error_windows, dense=dense, device=device, mean_rank=mean_ranks[stage - 1],
                                  steps=steps[stage - 1], progress=progress)
            history.append(record)
            if config.reset_optimizer:
                optimizer.state.clear()
            checkpoints.save(accelerator, blocks, optimizer, scheduler, _state(config, stage, 0, history, tokens_trained))
            start_step = 0
        model.train()
        for step in range(start_step, steps[stage - 1]):
            inactive = _snapshot_inactive(wrappers)
            step_loss = 0.0
            for micro in range(config.grad_accum):
                batch = batch_for(global_step * config.grad_accum + micro)
                with accelerator.accumulate(model):
                    loss = objective(model, batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, config.grad_clip)
                    prepared_optimizer.step()
                    prepared_optimizer.zero_grad()
                step_loss += float(accelerator.reduce(loss.detach(), "mean")) / config.grad_accum
                tokens_trained += int((batch["labels"] != -100).sum()) * world
            scheduler.step()
            _restore_inactive(inactive)
            step_subnets(wrappers, optimizer)
            global_step += 1
            if not math.isfinite(step_loss):
                raise NumericalError(f"the loss became {step_loss} at stage {stage} step {step + 1}; the last good "
                                     f"checkpoint is in {checkpoints.folder} (resume with --resume after lowering --lr)")
            record.losses.append(step_loss)
            if progress:
                progress(f"stage {stage}/{config.stages} train", step + 1, steps[stage - 1], f"loss {step_loss:.3f}")
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < steps[stage - 1]:
                checkpoints.save(accelerator, blocks, optimizer, scheduler,
                                 _state(config, stage, step + 1, history, tokens_trained))
            if stop_after_steps is not None and global_step - steps_done_before >= stop_after_steps:
                raise InterruptForTest(f"stopped after {stop_after_steps} steps")
        model.eval()
        record.wall_time_s += time.perf_counter() - stage_started

    result = _finish(config, out, loaded, accelerator, model, blocks, history, tokens_trained, started, warnings,
                     resume_state, global_batch, head_pruned,
                     encodings={"data": data.encoding, "calibration": calibration.encoding})
    if accelerator.is_main_process:
        checkpoints.remove()
    return result


def _state(config: RecoverConfig, stage: int, step: int, history: list[StageRecord], tokens_trained: int) -> dict:
    return {"stage": stage, "step": step, "tokens_trained": tokens_trained, "settings": _fingerprint(config),
            "history": [asdict(h) for h in history]}


def _check_nm_input(model: nn.Module, pattern: str) -> None:
    """An N:M run can end with exactly N zeros per group only if no group already holds more."""
    check_nm_widths(model, pattern)
    n, m = parse_nm(pattern)
    crowded = [name for name, linear in block_linears(find_blocks(model)).items() if bool((group_zero_counts(linear.weight, m) > n).any())]
    if crowded:
        raise ConfigError(f"--pattern {pattern}: the input model already has more than {n} zeros in some groups of {m} "
                          f"({crowded[0]} and {len(crowded) - 1} more layers); start from the dense model or one pruned "
                          f"with --pattern {pattern}")


def _stage_target(config: RecoverConfig, stage: int) -> tuple[float, tuple[int, int] | None]:
    """This stage's global target and, for N:M runs, its pattern (see ``schedule.py``)."""
    if config.pattern:
        n, m = nm_ramp(*parse_nm(config.pattern), stage, config.stages)
        return n / m, (n, m)
    return cubic_sparsity(config.target_sparsity(), stage, config.stages), None


def _pruned_masks(wrappers: dict[str, AdapterLinear]) -> dict[str, torch.Tensor]:
    """The current mask of every layer (True = pruned), as the adapters hold it: set when the
    last stage pruned, never re-read from the weights being checked."""
    return {name: ~wrapper.mask for name, wrapper in wrappers.items()}


def _check_kept_zeros(pruned: dict[str, torch.Tensor], wrappers: dict[str, AdapterLinear], when: str) -> None:
    """Every weight in ``pruned`` must be exactly zero now, or we stop before anything is saved."""
    found = revived(pruned, {name: wrapper.base for name, wrapper in wrappers.items()})
    if found:
        name, count = next(iter(found.items()))
        raise NumericalError(f"{when}: {count} pruned weights of {name} became non-zero (and {len(found) - 1} more layers "
                             "too); not saving -- this is a bug in losa, please report it")


def _prune_stage(config: RecoverConfig, stage: int, *, model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor,
                 error_windows: torch.Tensor, dense: list[list[torch.Tensor]], device: torch.device, mean_rank: float,
                 steps: int, progress: ProgressFn | None) -> StageRecord:
    """Merge, allocate rates, prune with error measurement (the previous mask kept), unmerge with
    the new mask, set ranks."""
    target, nm = _stage_target(config, stage)
    wrappers = wrappers_of(blocks)
    previous = _pruned_masks(wrappers)
    for wrapper in wrappers.values():
        wrapper.merge()
    model.eval()
    rates = _stage_rates(config, model, windows, device, target, stage, progress)
    errors: list[ReconstructionError] = [ReconstructionError() for _ in blocks]
    count = error_windows.shape[0]

    def measure(index: int, outputs: list[torch.Tensor]) -> None:
        for reference, produced in zip(dense[index], outputs[:count]):
            errors[index].add(reference, produced)

    criterion = Criterion(config.method, nm, config.damp, config.blocksize)
    prune_warnings = prune_blocks(model, criterion, rates, windows, device, progress, on_outputs=measure)
    _check_kept_zeros(previous, wrappers, f"stage {stage} pruning")
    for wrapper in wrappers.values():
        wrapper.unmerge(new_mask=True)
    block_errors = [e.value() for e in errors]
    if config.rank_allocation == "uniform":
        ranks = [int(round(mean_rank))] * len(blocks)
    else:
        ranks = allocate_ranks(block_errors, mean_rank, config.rank_min, config.rank_max)
    set_block_ranks(blocks, ranks)
    return StageRecord(stage=stage, target_sparsity=target, rates=rates, errors=block_errors, ranks=ranks,
                       sparsity=sparsity_report(model)[2], steps=steps, warnings=prune_warnings,
                       pattern=f"{nm[0]}:{nm[1]}" if nm else None)


def _finish(config, out, loaded, accelerator, model, blocks, history, tokens_trained, started, warnings, resume_state,
            global_batch, head_pruned: dict[str, torch.Tensor], encodings: dict[str, str | None]) -> RecoverResult:
    """Merge, verify the zeros (and N:M), and save the model + manifest atomically (main process).

    ``encodings``: how the ``data`` and ``calibration`` files were decoded, recorded beside them."""
    wrappers = wrappers_of(blocks)
    final_mask = _pruned_masks(wrappers)
    for name, wrapper in wrappers.items():
        try:
            wrapper.merge()
        except FloatingPointError:
            raise NumericalError(f"the adapter of {name} holds NaN/inf; not saving (lower --lr and start over)") from None
    _check_kept_zeros(final_mask, wrappers, "merging the adapters")
    if revived(head_pruned, {"lm_head": loaded.model.get_output_embeddings()}):  # a pruned head (prune --prune-lm-head) stays frozen
        raise NumericalError("the pruned output head lost zeros during recovery; not saving -- this is a bug in losa")
    if config.pattern:
        n, m = parse_nm(config.pattern)
        off = nm_violations({name: w.base for name, w in wrappers.items()}, n, m)
        if off:
            raise NumericalError(f"{off[0]} does not hold exactly {n} zeros in every group of {m} (and {len(off) - 1} more "
                                 "layers); not saving")
    detach(blocks)
    per_layer, per_block, global_sparsity, checksum = sparsity_report(loaded.model)
    result = RecoverResult(
        out=str(out), stages=history, global_sparsity=global_sparsity, per_block_sparsity=per_block, mask_checksum=checksum,
        ranks=history[-1].ranks if history else [], per_block_rates=history[-1].rates if history else [],
        tokens_trained=tokens_trained, processes=accelerator.num_processes, wall_time_s=0.0,
        peak_memory_mib=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mib(),
        resumed_from={"stage": resume_state["stage"], "step": resume_state["step"]} if resume_state else None,
        warnings=warnings,
    )
    if accelerator.is_main_process:
        with atomic_folder(out) as staging:
            save_model(loaded, staging)
            result.wall_time_s = time.perf_counter() - started
            manifest = build_manifest(
                "recover",
                inputs={"model": loaded.source.describe(), "data": config.data, "data_encoding": encodings["data"],
                        "calibration": config.calibration.calib, "calibration_encoding": encodings["calibration"]},
                settings={**to_dict(config), "global_batch": global_batch, "steps_per_stage": config.plan_steps(),
                          "mean_ranks": config.plan_ranks()},
                results={k: v for k, v in result.to_dict().items() if k != "out"},
                parent_folder=Path(loaded.source.location) if loaded.source.is_local else None,
            )
            write_manifest(staging, manifest)
    accelerator.wait_for_everyone()
    return result
