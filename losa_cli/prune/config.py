"""Settings of ``losa prune`` (validated when built: ``core/config.py``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from ..core.config import DEFAULT_MODEL, CalibrationConfig, Device, DType, choice, raise_problems
from ..core.errors import ConfigError, key

OWL_LAMBDA = 0.08  # OWL's published defaults: rates span 2 x lambda around s, outliers above M x mean
OWL_M = 5.0


def parse_nm(pattern: str) -> tuple[int, int]:
    """Parse ``"N:M"`` (zero N weights in every group of M consecutive inputs); ``ValueError``
    carries a message to show as is."""
    parts = pattern.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--pattern {pattern!r} is not N:M; use e.g. 2:4 or 4:8")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ValueError(f"--pattern {pattern}: N must be below M and above 0 (e.g. 2:4), got N={n}, M={m}")
    return n, m


class Method(StrEnum):
    """Pruning criterion: |W|·||X|| per output row (Wanda), OBS reconstruction (SparseGPT), |W| per layer."""

    WANDA = "wanda"
    SPARSEGPT = "sparsegpt"
    MAGNITUDE = "magnitude"


class Allocation(StrEnum):
    """Per-block rates: one for all, block similarity (RMI, LoSA), or outlier ratios (OWL)."""

    UNIFORM = "uniform"
    RMI = "rmi"
    OWL = "owl"


class Tuned(StrEnum):
    """What ``--reconstruct`` trains: the kept weights (masked) with the norms and biases, or the norms
    and biases only (PERP: they merge for free and change no zero)."""

    WEIGHTS = "weights"
    NORMS = "norms"


class Stream(StrEnum):
    """Which inputs a pruned block is fitted on: the dense model's own block inputs (a second stream,
    one more forward per block; the default, measured better), or the outputs of the pruned (and
    fitted) blocks before it."""

    SPARSE = "sparse"
    DENSE = "dense"


@dataclass(frozen=True)
class ReconstructDefaults:
    """Defaults of the ``reconstruct_*`` settings of prune and recover, written once (measured on
    SmolLM2-135M at 70%, docs/results.md)."""

    steps: int = 8
    batch: int = 4
    #: one-shot pruning: a block at its full rate is far from its targets
    lr: float = 3e-3
    #: inside recovery stages each block is pruned a little more than it was, and 3e-3 overshoots (the
    #: block MSE rose over the steps in stage 1 on SmolLM2-135M); 5e-4 lowers it in every stage
    recover_lr: float = 5e-4
    params: Tuned = Tuned.WEIGHTS
    split: bool = False
    #: dense: 164 wiki perplexity against 210 with sparse inputs (Wanda 70%, 8 steps of 4 x 512 tokens, lr 3e-3)
    inputs: Stream = Stream.DENSE


RECONSTRUCT = ReconstructDefaults()


def reconstruct_problems(config) -> list[str]:
    """Every problem of a config's ``reconstruct_*`` settings (prune's or recover's); their enums are
    made members of their choices on the way."""
    found: list[str] = []
    config.reconstruct_params = choice(config.reconstruct_params, Tuned, "reconstruct_params", found)
    config.reconstruct_inputs = choice(config.reconstruct_inputs, Stream, "reconstruct_inputs", found)
    if config.reconstruct_steps < 1:
        found.append(f"{key('reconstruct_steps')} must be at least 1, got {config.reconstruct_steps}")
    if config.reconstruct_batch < 1:
        found.append(f"{key('reconstruct_batch')} must be at least 1 window, got {config.reconstruct_batch}")
    if not 0.0 < config.reconstruct_lr < 1.0:
        found.append(f"{key('reconstruct_lr')} must be in (0, 1), got {config.reconstruct_lr}")
    return found


def sparsegpt_problems(damp: float, blocksize: int) -> list[str]:
    """SparseGPT's settings, shared by prune and recover."""
    found = []
    if not 0.0 < damp <= 1.0:
        found.append(f"{key('damp')} must be in (0, 1], got {damp}")
    if blocksize < 1:
        found.append(f"{key('blocksize')} must be positive, got {blocksize}")
    return found


def pattern_problem(pattern: str) -> str | None:
    """The problem of an N:M ``pattern`` string, or None when it parses."""
    try:
        parse_nm(pattern)
    except ValueError as exc:
        return str(exc).replace("--pattern", key("pattern"))
    return None


@dataclass
class PruneConfig:
    """Settings of ``losa prune``."""

    model: str = DEFAULT_MODEL
    out: str = ""
    method: Method = Method.WANDA
    sparsity: float = 0.5
    pattern: str | None = None
    prune_lm_head: bool = False
    per_layer: str | None = None
    allocation: Allocation = Allocation.UNIFORM
    delta: float | None = None
    beta: float | None = None
    rmi_samples: int = 64
    owl_lambda: float = OWL_LAMBDA
    owl_m: float = OWL_M
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    device: Device = Device.AUTO
    dtype: DType = DType.FLOAT32
    damp: float = 0.01
    blocksize: int = 128
    #: stream the blocks from the memory-mapped checkpoint; None: when the model would not fit
    low_memory: bool | None = None
    #: the calibration windows' hidden states in files; None: when they would not fit in memory
    activations_on_disk: bool | None = None
    #: fit each pruned block to the dense block's outputs (``reconstruction.py``)
    reconstruct: bool = False
    reconstruct_steps: int = RECONSTRUCT.steps
    reconstruct_batch: int = RECONSTRUCT.batch
    reconstruct_lr: float = RECONSTRUCT.lr
    reconstruct_params: Tuned = RECONSTRUCT.params
    reconstruct_split: bool = RECONSTRUCT.split
    reconstruct_inputs: Stream = RECONSTRUCT.inputs
    force: bool = False
    trust_remote_code: bool = False

    @property
    def needs_calibration(self) -> bool:
        """Every method but magnitude, every allocation but uniform, and reconstruction read activations."""
        return self.method != Method.MAGNITUDE or self.allocation != Allocation.UNIFORM or self.reconstruct

    def __post_init__(self) -> None:
        found: list[str] = []
        self.method = choice(self.method, Method, "method", found)
        self.allocation = choice(self.allocation, Allocation, "allocation", found)
        self.device = choice(self.device, Device, "device", found)
        self.dtype = choice(self.dtype, DType, "dtype", found)
        found += self.calibration.problems(self.needs_calibration)
        if not self.out:
            found.append(f"{key('out')} is required: the folder to write the pruned model to")
        if not 0.0 <= self.sparsity < 1.0:
            found.append(f"{key('sparsity')} must be in [0, 1), got {self.sparsity}")
        if self.pattern is not None:
            problem = pattern_problem(self.pattern)
            if problem:
                found.append(problem)
            if self.per_layer:
                found.append(
                    f"{key('pattern')} and {key('per_layer')} cannot be combined: N:M fixes every layer's rate"
                )
            if self.allocation != Allocation.UNIFORM:
                found.append(
                    f"{key('pattern')} and {key('allocation')} {self.allocation} cannot be combined: "
                    "N:M fixes every layer's rate"
                )
        if self.low_memory and self.prune_lm_head:
            found.append(
                f"{key('prune_lm_head')} needs the whole model in memory: drop {key('low_memory')} or "
                f"{key('prune_lm_head')}"
            )
        if self.per_layer and self.allocation != Allocation.UNIFORM:
            found.append(f"{key('per_layer')} gives the rates itself; drop {key('allocation')}")
        if self.per_layer:
            try:
                load_per_layer(self.per_layer)
            except ConfigError as exc:
                found += exc.problems
        if (
            self.allocation == Allocation.RMI
            and self.delta is not None
            and not (0.0 < self.delta < 0.5 and self.sparsity + self.delta < 1.0)
        ):
            found.append(f"{key('delta')} must be in (0, 0.5) with sparsity + delta below 1, got {self.delta}")
        if self.beta is not None and self.beta <= 0:
            found.append(f"{key('beta')} must be positive, got {self.beta}")
        if self.rmi_samples < 2:
            found.append(
                f"{key('rmi_samples')} must be at least 2 (similarity needs several sequences), got {self.rmi_samples}"
            )
        if self.allocation == Allocation.OWL and not (
            0.0 < self.owl_lambda and 2 * self.owl_lambda <= self.sparsity < 1.0 - 2 * self.owl_lambda
        ):
            found.append(
                f"{key('owl_lambda')} must be positive with 2 x lambda <= sparsity < 1 - 2 x lambda "
                f"(OWL's rates lie within sparsity +- 2 x lambda), got {self.owl_lambda}"
            )
        if self.owl_m <= 0:
            found.append(f"{key('owl_m')} must be positive, got {self.owl_m}")
        found += sparsegpt_problems(self.damp, self.blocksize)
        found += reconstruct_problems(self)
        raise_problems(found)


def load_per_layer(path: str, num_blocks: int | None = None) -> list[float]:
    """Read explicit per-block rates: a JSON list, a JSON object {block index: rate}, or a losa
    manifest (file or output folder: its ``per_block_rates``), so a previous run's allocation can
    be replayed.  Without ``num_blocks`` only the file itself is checked (before loading a model).
    """
    from ..core.manifest import MANIFEST_NAME

    option = key("per_layer")
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / MANIFEST_NAME
    if not file.is_file():
        raise ConfigError(f"{option} {file} does not exist; give a JSON list of rates or a losa manifest")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise ConfigError(f"{option} file {path} is not valid JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("results"), dict):  # a losa manifest
        data = data["results"]
    if isinstance(data, dict) and "per_block_rates" in data:
        data = data["per_block_rates"]
    if isinstance(data, dict):
        data = [data.get(str(i)) for i in range(num_blocks if num_blocks is not None else len(data))]
    if not isinstance(data, list) or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in data):
        raise ConfigError(
            f"{option} file {path} must hold a list of numbers, an object {{block: rate}} for every "
            "block, or a losa manifest with per_block_rates"
        )
    rates = [float(r) for r in data]
    if num_blocks is not None and len(rates) != num_blocks:
        raise ConfigError(f"{option} file {path} gives {len(rates)} rates but the model has {num_blocks} blocks")
    bad = [f"block {i}: {r}" for i, r in enumerate(rates) if not 0.0 <= r < 1.0]
    if bad:
        raise ConfigError(f"{option} rates must be in [0, 1): {', '.join(bad)}")
    return rates
