"""Settings of ``losa recover`` (LoSA; paper defaults unless the README says otherwise), validated when built."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from ..core.config import DEFAULT_MODEL, CalibrationConfig, Device, DType, choice, raise_problems
from ..core.errors import key
from ..prune import (
    OWL_LAMBDA,
    OWL_M,
    RECONSTRUCT,
    Allocation,
    Method,
    Stream,
    Tuned,
    parse_nm,
    pattern_problem,
    reconstruct_problems,
    sparsegpt_problems,
)

#: the last stage's target when neither ``sparsity`` nor ``pattern`` is given
RECOVER_SPARSITY = 0.7
#: below this, kd's softened distributions are one-hot and T^2 * KL vanishes (the loss shows 0.0000)
KD_MIN_TEMPERATURE = 0.1
#: the criteria that prune the model again at every stage (magnitude ignores activations: no stages needed)
STAGE_METHODS = (Method.WANDA, Method.SPARSEGPT)


class Loss(StrEnum):
    """The training objective (``losses.py``): cross-entropy, distillation from the dense model, or both; SquareHead
    adds its per-block feature loss."""

    CE = "ce"
    KD = "kd"
    KD_CE = "kd+ce"
    SQUAREHEAD = "squarehead"


class Adapter(StrEnum):
    """What is trained: masked LoRA (LoSA, ``masked_lora.py``), a gradient-localised core sub-matrix
    of each weight and of the output head (LoSiA as its authors define it, ``subnet.py``), or every
    kept weight in place (``kept_weights.py``)."""

    MASKED_LORA = "masked-lora"
    LOSIA = "losia"
    KEPT_WEIGHTS = "kept-weights"


class ReconstructTarget(StrEnum):
    """What a stage's block fits reproduce: the block itself before the stage's pruning (what one-shot
    reconstruction does), or the dense input model's block, so the fit also undoes what earlier stages left."""

    STAGE = "stage"
    DENSE = "dense"


class RankAllocation(StrEnum):
    """Per-block LoRA ranks: from each block's reconstruction error (LoSA), or the same for all."""

    ERROR = "error"
    UNIFORM = "uniform"


@dataclass
class RecoverConfig:
    """Settings of ``losa recover``."""

    model: str = DEFAULT_MODEL
    out: str = ""
    data: str = ""
    sparsity: float | None = None  # None: RECOVER_SPARSITY, or N/M with pattern
    method: Method = Method.WANDA
    pattern: str | None = None
    damp: float = 0.01
    blocksize: int = 128
    loss: Loss = Loss.CE
    kd_temperature: float = 1.0
    #: 0: the dense teacher runs live beside the student; K > 0: its top-K logits per token are cached on disk
    #: by one pass before training and the teacher is freed (``teacher_cache.py``; kd and kd+ce)
    teacher_topk: int = 0
    allocation: Allocation = Allocation.RMI
    delta: float | None = None
    beta: float | None = None
    rmi_samples: int = 64
    owl_lambda: float = OWL_LAMBDA
    owl_m: float = OWL_M
    stages: int = 5
    total_steps: int = 1250
    final_share: float = 0.6
    steps_per_stage: list[int] | None = None
    mean_ranks: list[float] | None = None
    rank_allocation: RankAllocation = RankAllocation.ERROR
    rank_min: int = 2
    rank_max: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    fused: bool = True
    adapter: Adapter = Adapter.MASKED_LORA
    losia_ratio: float = 0.125  # LoSiA's rank factor p = 1/8: core rows and columns per layer
    losia_period: int = 50  # T, one time slot: each block relocalises every T x (blocks [+ head]) steps, in its slot
    losia_beta1: float = 0.85  # EMA factor of the sensitivity |W G - (W G)^2 / 2|
    losia_beta2: float = 0.85  # EMA factor of its uncertainty
    losia_rewarm: int | None = None  # learning-rate re-warm-up steps after a relocalisation; None: T (LoSiA's), 0: none
    losia_head: float = 1.0  # share of the output head's rows trained (all its columns); 0: frozen
    error_samples: int = 16
    #: fit each block to its outputs before this stage's pruning, inside every stage before the training steps
    #: (the default recipe: wiki perplexity 87.0 -> 78.6 at 70%, seed 0; docs/results.md)
    reconstruct: bool = False
    reconstruct_steps: int = RECONSTRUCT.steps
    reconstruct_batch: int = RECONSTRUCT.batch
    reconstruct_lr: float = RECONSTRUCT.recover_lr
    reconstruct_params: Tuned = RECONSTRUCT.params
    reconstruct_split: bool = RECONSTRUCT.split
    reconstruct_inputs: Stream = RECONSTRUCT.inputs
    #: dense: the targets are the input model's blocks (the live teacher, or a frozen copy of the input model)
    reconstruct_target: ReconstructTarget = ReconstructTarget.STAGE
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    max_length: int = 1024
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.001
    grad_clip: float = 0.3
    warmup: float = 0.3
    response_only: bool = True
    reset_optimizer: bool = True
    dtype: DType = DType.FLOAT32
    device: Device = Device.AUTO
    checkpoint_every: int = 100
    resume: bool = False
    force: bool = False
    trust_remote_code: bool = False

    def target_sparsity(self) -> float:
        """The sparsity the last stage reaches: N/M with a pattern, else ``sparsity`` (default 0.7)."""
        if self.pattern is not None:
            n, m = parse_nm(self.pattern)
            return n / m
        return RECOVER_SPARSITY if self.sparsity is None else self.sparsity

    def plan_steps(self) -> list[int]:
        """Steps per stage: explicit, or ``total_steps`` with ``final_share`` for the last stage
        and the rest split evenly (the paper: 125 x 4 + 750)."""
        if self.steps_per_stage is not None:
            return list(self.steps_per_stage)
        if self.stages == 1:
            return [self.total_steps]
        final = int(round(self.total_steps * self.final_share))
        early, extra = divmod(self.total_steps - final, self.stages - 1)
        return [early + (1 if i < extra else 0) for i in range(self.stages - 1)] + [final]

    def plan_ranks(self) -> list[float]:
        """Mean rank per stage: explicit, or 6 -> 10 in even steps (the paper: 6, 7, 8, 9, 10)."""
        if self.mean_ranks is not None:
            return list(self.mean_ranks)
        if self.stages == 1:
            return [10.0]
        return [6.0 + 4.0 * t / (self.stages - 1) for t in range(self.stages)]

    def __post_init__(self) -> None:
        found = self.calibration.problems()
        self.method = choice(self.method, Method, "method", found)
        self.loss = choice(self.loss, Loss, "loss", found)
        self.allocation = choice(self.allocation, Allocation, "allocation", found)
        self.rank_allocation = choice(self.rank_allocation, RankAllocation, "rank_allocation", found)
        self.adapter = choice(self.adapter, Adapter, "adapter", found)
        self.reconstruct_target = choice(self.reconstruct_target, ReconstructTarget, "reconstruct_target", found)
        self.dtype = choice(self.dtype, DType, "dtype", found)
        self.device = choice(self.device, Device, "device", found)
        if not self.out:
            found.append(f"{key('out')} is required: the folder to write the recovered model to")
        if not self.data:
            found.append(f"{key('data')} is required: the fine-tuning text (.jsonl instructions or .txt)")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            found.append(f"{key('sparsity')} must be in [0, 1), got {self.sparsity}")
        if isinstance(self.method, Method) and self.method not in STAGE_METHODS:
            found.append(f"{key('method')} {str(self.method)!r}: recover prunes with wanda or sparsegpt")
        if self.pattern is not None:
            problem = pattern_problem(self.pattern)
            if problem:
                found.append(problem)
            elif self.sparsity is not None and abs(self.sparsity - self.target_sparsity()) > 1e-9:
                found.append(f"{key('sparsity')} {self.sparsity} contradicts {key('pattern')} {self.pattern} "
                             f"({self.target_sparsity():g} zeros): drop {key('sparsity')}, N:M sets it")
        found += sparsegpt_problems(self.damp, self.blocksize)
        found += reconstruct_problems(self)
        if not KD_MIN_TEMPERATURE <= self.kd_temperature <= 100.0:  # a loss of 0 says nothing: refuse it up front
            found.append(f"{key('kd_temperature')} must be in [{KD_MIN_TEMPERATURE}, 100], got {self.kd_temperature}: "
                         "below it both distributions are one-hot and T^2 * KL is ~0, so nothing is learnt (1 to 4 "
                         "is usual)")
        found += self._teacher_problems()
        if self.owl_m <= 0 or self.owl_lambda <= 0:
            found.append(f"{key('owl_lambda')} and {key('owl_m')} must be positive, got {self.owl_lambda} and "
                         f"{self.owl_m}")
        found += self._schedule_problems()
        found += self._training_problems()
        raise_problems(found)

    def _teacher_problems(self) -> list[str]:
        """``teacher_topk``: >= 0 (its upper bound, the vocabulary, is checked once the model is loaded), and only
        for the losses whose teacher is its logits alone."""
        if self.teacher_topk < 0:
            return [f"{key('teacher_topk')} must be >= 0 (0: the live teacher), got {self.teacher_topk}"]
        if self.teacher_topk and self.loss == Loss.SQUAREHEAD:
            return [f"{key('teacher_topk')} caches the teacher's logits, but {key('loss')} squarehead also needs its "
                    f"block features every step: use {key('loss')} kd or kd+ce, or {key('teacher_topk')} 0 "
                    "(the live teacher)"]
        if self.teacher_topk and self.loss == Loss.CE:
            return [f"{key('teacher_topk')} caches the distillation teacher, which {key('loss')} ce does not use: "
                    f"use {key('loss')} kd or kd+ce, or drop it"]
        return []

    def _schedule_problems(self) -> list[str]:
        found = []
        if self.stages < 1:
            found.append(f"{key('stages')} must be at least 1, got {self.stages}")
        steps = self.plan_steps() if self.stages >= 1 else []
        if self.steps_per_stage is not None and len(self.steps_per_stage) != self.stages:
            found.append(f"{key('steps_per_stage')} gives {len(self.steps_per_stage)} values for {self.stages} stages")
        elif any(k < 0 for k in steps) or sum(steps) < 1:
            found.append(f"training steps per stage must be >= 0 with at least one in all, got {steps}")
        if not 0.0 <= self.final_share <= 1.0:
            found.append(f"{key('final_share')} must be in [0, 1], got {self.final_share}")
        if not 1 <= self.rank_max <= 1024:
            found.append(f"{key('rank_max')} must be in [1, 1024], got {self.rank_max}")
        if not 0 <= self.rank_min <= self.rank_max:
            found.append(f"{key('rank_min')} must be in [0, {key('rank_max')}={self.rank_max}], got {self.rank_min}")
        if self.mean_ranks is not None and len(self.mean_ranks) != self.stages:
            found.append(f"{key('mean_ranks')} gives {len(self.mean_ranks)} values for {self.stages} stages")
        elif self.stages >= 1:
            bad = [m for m in self.plan_ranks() if not self.rank_min <= m <= self.rank_max]
            if bad:
                found.append(
                    f"mean ranks {bad} lie outside [{key('rank_min')}, {key('rank_max')}] = "
                    f"[{self.rank_min}, {self.rank_max}]; raise {key('rank_max')} or give {key('mean_ranks')}"
                )
        return found

    def _training_problems(self) -> list[str]:
        found = []
        if self.alpha <= 0:
            found.append(f"{key('alpha')} must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            found.append(f"{key('dropout')} must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.losia_ratio <= 1.0:
            found.append(f"{key('losia_ratio')} must be in (0, 1], got {self.losia_ratio}")
        if self.losia_period < 1:
            found.append(f"{key('losia_period')} must be at least 1, got {self.losia_period}")
        for name in ("losia_beta1", "losia_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                found.append(f"{key(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.losia_rewarm is not None and self.losia_rewarm < 0:
            found.append(f"{key('losia_rewarm')} must be at least 0 (0: no re-warm-up), got {self.losia_rewarm}")
        if not 0.0 <= self.losia_head <= 1.0:
            found.append(f"{key('losia_head')} must be in [0, 1] (0: a frozen head), got {self.losia_head}")
        if self.error_samples < 1:
            found.append(f"{key('error_samples')} must be at least 1, got {self.error_samples}")
        if self.max_length < 8:
            found.append(f"{key('max_length')} must be at least 8, got {self.max_length}")
        if self.batch_size < 1 or self.grad_accum < 1:
            found.append(
                f"{key('batch_size')} and {key('grad_accum')} must be at least 1, got {self.batch_size} "
                f"and {self.grad_accum}"
            )
        if not 0.0 < self.lr < 1.0:
            found.append(f"{key('lr')} must be in (0, 1), got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            found.append(f"{key('warmup')} must be in [0, 1), got {self.warmup}")
        if self.grad_clip <= 0:
            found.append(f"{key('grad_clip')} must be positive, got {self.grad_clip}")
        if self.checkpoint_every < 1:
            found.append(f"{key('checkpoint_every')} must be at least 1, got {self.checkpoint_every}")
        return found
