"""Workflow of ``losa recover``: the LoSA schedule (docs/losa-method.md §3-§5), as setup / stages / finish.

setup:  check the output and any checkpoint; load the model, the fine-tuning examples and the
        calibration windows; record the dense block outputs on a few windows (the reference for
        reconstruction error); attach masked LoRA (``adapter: losia``: a trained core sub-matrix,
        ``subnet.py``) to every linear layer of every block; build the optimizer; resume.
stage t = 1..T (``stages.py``, ``training.py``):
        s_t = S (1 - (1 - t/T)^3); merge the adapters; per-block rates (RMI / OWL / uniform, never
        below a block's current sparsity); prune block by block, measuring each block's
        reconstruction error; unmerge with the new mask; ranks from the errors (exact budget);
        fine-tune the adapters for K_t steps.
finish: merge -> check every weight pruned in any stage is still exactly zero -> save the
        merged model + manifest atomically.

The adapters are not saved: their base (the unmerged last-stage weights) exists only inside the
run, and the merged model already holds their effect.

Training runs through ``accelerate``: ``accelerate launch --num_processes N losa recover ...``
trains data-parallel; with ``--use_fsdp --fsdp_version 2`` the trained copy of the model is sharded
across the processes (FSDP2, ``sharding.py``) while the stages prune a plain copy.  A checkpoint
(safetensors + JSON, see ``checkpoint.py``) is written at the start of every stage and every
``checkpoint_every`` steps; ``--resume`` continues from it and ends with the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.atomic import atomic_folder, check_output
from ..core.config import to_dict
from ..core.data import Documents, collate, load_documents, training_examples
from ..core.errors import ConfigError, NumericalError, key
from ..core.manifest import build_manifest, peak_memory_mib, write_manifest
from ..core.modeling import LoadedModel, find_blocks, load_model, resolve_device, save_model, sparsity_report
from ..core.sequential import ProgressFn
from ..prune import Allocation, CalibrationWindows, calibration_windows, revived
from .checkpoint import STATE_FILE, Checkpoints
from .config import Adapter, Loss, ReconstructTarget, RecoverConfig
from .kept_weights import KeptWeightsLinear
from .masked_lora import attach, detach, set_block_ranks, wrap_linears, wrappers_of
from .objective import Objective
from .schedule import lr_factor
from .sharding import Sharded, fsdp_settings, shard
from .stages import DensePass, NMTarget, StageRecord, check_kept_zeros, dense_pass, prune_stage, pruned_masks
from .subnet import HEAD, Timing, attach_losia, detach_head
from .teacher_cache import check_topk, prepare_teacher_cache, remove_cache
from .training import Batches, Trainer, dense_teacher, train_stage

__all__ = ["STATE_FILE", "RecoverResult", "StageRecord", "run_recover"]
#: settings that may differ between a run and its resumption
RESUME_FREE = ("resume", "force", "checkpoint_every", "device")


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
    fsdp: bool = False  # the trained copy was sharded across the processes (FSDP2)
    teacher_cache: dict | None = None  # teacher_topk: K, tokens, bytes per token and in all, the pass's seconds
    resumed_from: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Run:
    """Everything setup builds and the stages and finish use."""

    config: RecoverConfig
    out: Path
    checkpoints: Checkpoints
    resume_state: dict | None
    started: float
    accelerator: object
    loaded: LoadedModel
    blocks: nn.ModuleList
    head_pruned: dict[str, torch.Tensor]
    calibration: CalibrationWindows
    data: Documents
    dense: DensePass
    trainer: Trainer
    sharded: Sharded | None  # FSDP2: the trained copy, kept in step with the plain model
    history: list[StageRecord]
    warnings: list[str]
    nm: NMTarget | None  # N:M runs: the zeros the end must hold
    reference: nn.ModuleList | None = None  # reconstruct_target dense: the input model's blocks, the fits' targets


def run_recover(config: RecoverConfig, progress: ProgressFn | None = None) -> RecoverResult:
    """``losa recover``: see the module docstring (``config`` checked itself when built)."""
    run = _setup(config, progress)
    steps, mean_ranks = config.plan_steps(), config.plan_ranks()
    first_stage = run.resume_state["stage"] if run.resume_state else 1
    for stage in range(first_stage, config.stages + 1):
        stage_started = time.perf_counter()
        if run.resume_state is not None and stage == first_stage:
            record, first_step = run.history[-1], run.resume_state["step"]  # pruned before the checkpoint was written
        else:
            record = prune_stage(
                config,
                stage,
                model=run.loaded.model,
                blocks=run.blocks,
                windows=run.calibration.windows,
                error_windows=run.calibration.windows[: config.error_samples],
                dense=run.dense.outputs,
                device=run.accelerator.device,
                mean_rank=mean_ranks[stage - 1],
                steps=steps[stage - 1],
                progress=progress,
                grams=run.dense.grams if stage == 1 else None,  # the input model's: stage 1 prunes it as it is
                reference=run.reference,
            )
            run.history.append(record)
            if run.sharded:
                run.sharded.push()
            if config.reset_optimizer:
                run.trainer.optimizer.state.clear()
            _checkpoint(run, stage, 0)
            first_step = 0
        train_stage(
            run.trainer,
            stage,
            config.stages,
            first_step,
            steps[stage - 1],
            record.losses,
            lambda step, stage=stage: _checkpoint(run, stage, step),
            config.checkpoint_every,
            run.checkpoints,
            progress,
        )
        if run.sharded:
            run.sharded.pull()
        record.wall_time_s += time.perf_counter() - stage_started
    result = _finish(run)
    if run.accelerator.is_main_process:
        run.checkpoints.remove()
        remove_cache(run.trainer.batches.teacher)
    return result


def _fingerprint(config: RecoverConfig) -> dict:
    return {k: v for k, v in to_dict(config).items() if k not in RESUME_FREE}


def _resume_state(config: RecoverConfig, checkpoints: Checkpoints) -> dict | None:
    """The checkpoint to continue from (``resume``), or None; refuses a stale or foreign one."""
    if checkpoints.exists():
        if config.force and not config.resume:
            checkpoints.remove()
            return None
        if not config.resume:
            raise ConfigError(
                f"{checkpoints.folder} holds a checkpoint of an earlier run; pass {key('resume')} to "
                f"continue it or {key('force')} to start over"
            )
        state = checkpoints.read_state()
        differ = [k for k, v in _fingerprint(config).items() if json.dumps(state["settings"].get(k)) != json.dumps(v)]
        if differ:
            raise ConfigError(
                f"{checkpoints.folder} was made by a run with other settings ({', '.join(differ)}); "
                f"use the same settings to resume, or {key('force')} to start over"
            )
        return state
    if config.resume:
        raise ConfigError(f"{key('resume')}: no checkpoint at {checkpoints.folder}")
    return None


def _setup(config: RecoverConfig, progress: ProgressFn | None) -> _Run:
    """Checks, then the model, data, adapters and optimizer of the run (restored from a checkpoint when resuming)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = check_output(config.out, config.force, inputs=(config.model,))
    resolve_device(config.device)  # --device cuda without a GPU: refuse, never fall back to the CPU
    checkpoints = Checkpoints(out)
    resume_state = _resume_state(config, checkpoints)
    started = time.perf_counter()
    accelerator = Accelerator(
        cpu=config.device == "cpu" or not torch.cuda.is_available(), gradient_accumulation_steps=config.grad_accum
    )
    fsdp = fsdp_settings(accelerator)
    dense_target = config.reconstruct and config.reconstruct_target == ReconstructTarget.DENSE
    if fsdp is not None and (config.adapter != Adapter.MASKED_LORA or dense_target):
        what = f"{key('reconstruct_target')} dense" if dense_target else f"{key('adapter')} {config.adapter}"
        raise ConfigError(f"{what} cannot run sharded (FSDP) yet: launch without --use_fsdp")
    device = accelerator.device
    set_seed(config.calibration.seed)
    loaded = load_model(config.model, config.dtype, config.trust_remote_code)
    model, tokenizer = loaded.model, loaded.tokenizer
    blocks = find_blocks(model)
    head = model.get_output_embeddings()
    head_pruned = {"lm_head": head.weight.detach() == 0} if head is not None and bool((head.weight == 0).any()) else {}
    nm = NMTarget.of(model, config.pattern) if config.pattern else None
    check_topk(config.teacher_topk, model)
    crowded = nm.warning() if nm is not None else None
    warnings: list[str] = [crowded] if crowded else []
    calibration = calibration_windows(model, tokenizer, config.calibration, warnings)
    data = load_documents(config.data, config.calibration.encoding, "fine-tuning file", warnings)
    examples = training_examples(tokenizer, config.data, data, config.max_length, config.response_only)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    gram_samples = config.rmi_samples if config.allocation == Allocation.RMI and not config.pattern else 0
    dense = dense_pass(model, calibration.windows, config.error_samples, gram_samples, device)
    batches = Batches(examples, config.batch_size, config.calibration.seed, accelerator.num_processes,
                      accelerator.process_index, lambda rows: collate(rows, pad_id), device)
    if config.teacher_topk:  # the dense model's rows, before any adapter or pruning; no teacher from here on
        batches.teacher = prepare_teacher_cache(config, accelerator, model, loaded.source.describe(), batches, fsdp,
                                                warnings, progress)
    live = config.loss != Loss.CE and batches.teacher is None  # distillation without cached rows
    teacher = dense_teacher(model, torch.device("cpu") if fsdp else device) if live or dense_target else None
    trainer, sharded = _trainer(config, accelerator, model, blocks, batches, fsdp, warnings, teacher if live else None)
    reference = find_blocks(teacher) if dense_target else None  # one dense copy serves both
    history: list[StageRecord] = []
    if resume_state is not None:
        checkpoints.load(accelerator, _trained(blocks, trainer), trainer.optimizer, trainer.scheduler)
        history = [StageRecord(**record) for record in resume_state["history"]]
        trainer.tokens_trained = resume_state["tokens_trained"]
        trainer.global_step = sum(config.plan_steps()[: resume_state["stage"] - 1]) + resume_state["step"]
        set_block_ranks(blocks, history[-1].ranks)
        for wrapper in wrappers_of(blocks).values():
            wrapper.merged = False
        if sharded:
            sharded.push()
    return _Run(
        config,
        out,
        checkpoints,
        resume_state,
        started,
        accelerator,
        loaded,
        blocks,
        head_pruned,
        calibration,
        data,
        dense,
        trainer,
        sharded,
        history,
        warnings,
        nm,
        reference,
    )


def _trainer(config: RecoverConfig, accelerator, model: nn.Module, blocks: nn.ModuleList, batches: Batches,
             fsdp: dict | None, warnings: list[str], teacher: nn.Module | None) -> tuple[Trainer, Sharded | None]:
    """Adapters on every block linear (LoSiA: and the head), the objective (with ``teacher``, the live dense
    model, for distillation unless its rows are cached), AdamW, its schedule; with ``fsdp`` settings the trained
    model (and the teacher) are sharded copies of the plain one."""
    device, world = accelerator.device, accelerator.num_processes
    if config.adapter == Adapter.LOSIA:
        rewarm = config.losia_period if config.losia_rewarm is None else config.losia_rewarm
        timing = Timing(config.losia_period, config.losia_beta1, config.losia_beta2, rewarm)
        wrappers, untied = attach_losia(model, blocks, config.losia_ratio, config.losia_head, timing)
        if untied:
            warnings.append("lm_head was tied to the input embedding: LoSiA trains a copy of it, saved beside the "
                            "intact embedding (losia_head=0 keeps it tied and frozen)")
    elif config.adapter == Adapter.KEPT_WEIGHTS:
        wrappers = wrap_linears(blocks, KeptWeightsLinear)
    else:
        wrappers = attach(blocks, config.rank_max, config.alpha, config.dropout, config.fused)
    for p in model.parameters():
        p.requires_grad_(False)
    for w in wrappers.values():
        for p in w.trainable():
            p.requires_grad_(True)
    sharded = None
    if fsdp is not None:
        sharded = Sharded.build(model, device, world, fsdp)
        model, blocks, wrappers = sharded.model, find_blocks(sharded.model), wrappers_of(find_blocks(sharded.model))
        teacher = shard(teacher, device, world, fsdp) if teacher is not None else None
    objective = Objective(config.loss, config.kd_temperature, teacher, blocks,
                          find_blocks(teacher) if teacher else None, cached=batches.teacher is not None)
    params = [p for w in wrappers.values() for p in w.trainable()]
    steps = config.plan_steps()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, config.warmup))
    if sharded:
        prepared_model, prepared_optimizer = model, optimizer
    else:
        prepared_model, prepared_optimizer = accelerator.prepare(model, optimizer)
    return Trainer(accelerator, prepared_model, objective, wrappers, params, optimizer, prepared_optimizer, scheduler,
                   batches, config.grad_accum, config.grad_clip, sharded=sharded is not None), sharded


def _checkpoint(run: _Run, stage: int, step: int) -> None:
    if run.sharded:
        run.sharded.pull()
    state = {
        "stage": stage,
        "step": step,
        "tokens_trained": run.trainer.tokens_trained,
        "settings": _fingerprint(run.config),
        "history": [asdict(h) for h in run.history],
    }
    run.checkpoints.save(run.accelerator, _trained(run.blocks, run.trainer), run.trainer.optimizer,
                         run.trainer.scheduler, state)


def _trained(blocks: nn.ModuleList, trainer: Trainer) -> nn.Module:
    """What a checkpoint holds: the blocks, and the output head when LoSiA trains it."""
    head = trainer.wrappers.get(HEAD)
    return blocks if head is None else nn.ModuleList([*blocks, head])


def _finish(run: _Run) -> RecoverResult:
    """Merge, verify the zeros (and N:M), and save the model + manifest atomically (main process)."""
    config, accelerator, loaded = run.config, run.accelerator, run.loaded
    wrappers = wrappers_of(run.blocks) if run.sharded else run.trainer.wrappers  # LoSiA: and its head
    final_mask = pruned_masks(wrappers)
    for name, wrapper in wrappers.items():
        try:
            wrapper.merge()
        except FloatingPointError:
            raise NumericalError(
                f"the adapter of {name} holds NaN/inf; not saving (lower --lr and start over)"
            ) from None
    check_kept_zeros(final_mask, wrappers, "merging the adapters")
    detach_head(loaded.model)
    if revived(run.head_pruned, {"lm_head": loaded.model.get_output_embeddings()}):  # LoSiA's head keeps its zeros
        raise NumericalError("the pruned output head lost zeros during recovery; not saving -- this is a bug in losa")
    if run.nm is not None:
        off = run.nm.violations({name: w.base for name, w in wrappers.items() if name != HEAD})
        if off:
            raise NumericalError(
                f"{off[0]} does not hold exactly {run.nm.n} zeros in every group of {run.nm.m} (or the input "
                f"model's own zeros, where it held more; and {len(off) - 1} more layers); not saving"
            )
    detach(run.blocks)
    per_layer, per_block, global_sparsity, checksum = sparsity_report(loaded.model)
    history, resume_state = run.history, run.resume_state
    result = RecoverResult(
        out=str(run.out),
        stages=history,
        global_sparsity=global_sparsity,
        per_block_sparsity=per_block,
        mask_checksum=checksum,
        ranks=history[-1].ranks if history else [],
        per_block_rates=history[-1].rates if history else [],
        tokens_trained=run.trainer.tokens_trained,
        processes=accelerator.num_processes,
        wall_time_s=0.0,
        fsdp=run.sharded is not None,
        teacher_cache=run.trainer.batches.teacher.record if run.trainer.batches.teacher else None,
        peak_memory_mib=peak_memory_mib(accelerator.device),
        resumed_from={"stage": resume_state["stage"], "step": resume_state["step"]} if resume_state else None,
        warnings=run.warnings,
    )
    if accelerator.is_main_process:
        with atomic_folder(run.out) as staging:
            save_model(loaded, staging)
            result.wall_time_s = time.perf_counter() - run.started
            global_batch = config.batch_size * config.grad_accum * accelerator.num_processes
            manifest = build_manifest(
                "recover",
                inputs={
                    "model": loaded.source.describe(),
                    "data": config.data,
                    "data_encoding": run.data.encoding,
                    "calibration": config.calibration.calib,
                    "calibration_encoding": run.calibration.encoding,
                },
                settings={
                    **to_dict(config),
                    "global_batch": global_batch,
                    "steps_per_stage": config.plan_steps(),
                    "mean_ranks": config.plan_ranks(),
                },
                results={k: v for k, v in result.to_dict().items() if k != "out"},
                parent_folder=Path(loaded.source.location) if loaded.source.is_local else None,
            )
            write_manifest(staging, manifest)
    accelerator.wait_for_everyone()
    return result
