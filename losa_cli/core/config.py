"""Settings of each command as dataclasses that validate themselves.

Defaults live here and only here; the CLI reads them from these classes.  ``validate`` collects
every problem and raises one ``ConfigError`` listing them all, so a user fixes a run in one go.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError
from .hub import LOCAL_DATA

DEFAULT_MODEL = "smollm2-135m"
BENCH_PRECISIONS = ("fp32", "bf16", "int8")  # bf16: the losa engine only (ONNX engines run fp32 and int8)
METHODS = ("wanda", "sparsegpt", "magnitude")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
ALLOCATIONS = ("uniform", "rmi", "owl")
OWL_LAMBDA = 0.08  # OWL's published defaults: rates span 2 x lambda around s, outliers above M x mean
OWL_M = 5.0
RECOVER_LOSSES = ("ce", "kd", "kd+ce", "squarehead")  # see recover/losses.py
RECOVER_ADAPTERS = ("masked-lora", "losia")  # see recover/masked_lora.py, recover/subnet.py
RECOVER_SPARSITY = 0.7  # losa recover's target when neither --sparsity nor --pattern is given
SAMPLINGS = ("stream", "document")  # calibration windows: from the joined text, or one per document (Wanda/SparseGPT)
AUTO_ENCODING = "auto"  # text files: a byte-order mark, else UTF-8, else detected and named in a warning (core/data.py)


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> list[str]:
    """[] when ``value`` is one of ``choices``, else the message for it."""
    return [] if value in choices else [f"{option} {value!r} is unknown; choose one of {', '.join(choices)}"]


def _check_encoding(encoding: str) -> list[str]:
    """[] for ``auto`` or a Python text codec; a typo is caught here, before any model is loaded."""
    if encoding == AUTO_ENCODING:
        return []
    try:
        codecs.lookup(encoding)
        b"a".decode(encoding)  # bytes-to-bytes codecs (base64, zlib) are found but are no text encoding
    except LookupError:
        return [f"--encoding {encoding!r} is not a text encoding Python knows; give auto or a codec such as "
                "utf-8, latin-1, cp1252"]
    except ValueError:
        pass  # a text codec that cannot decode this one byte (utf-16): fine
    return []


def _sparsegpt_problems(damp: float, blocksize: int) -> list[str]:
    """SparseGPT's settings, shared by prune and recover."""
    found = []
    if not 0.0 < damp <= 1.0:
        found.append(f"--damp must be in (0, 1], got {damp}")
    if blocksize < 1:
        found.append(f"--blocksize must be positive, got {blocksize}")
    return found


def parse_nm(pattern: str) -> tuple[int, int]:
    """Parse ``"N:M"`` (zero N weights in every group of M consecutive inputs); ``ValueError``
    carries a message the CLI shows as is."""
    parts = pattern.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--pattern {pattern!r} is not N:M; use e.g. 2:4 or 4:8")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ValueError(f"--pattern {pattern}: N must be below M and above 0 (e.g. 2:4), got N={n}, M={m}")
    return n, m


def _check_nm(pattern: str) -> str | None:
    try:
        parse_nm(pattern)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass
class CalibrationConfig:
    """Where calibration windows come from and how many."""

    calib: str = ""  # no default: a Hub name (c4, wikitext2) would reach the network unasked
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    sampling: str = "stream"
    encoding: str = AUTO_ENCODING  # of the calibration file (and of recover's --data: one --encoding per command)

    def problems(self, needs_data: bool = True) -> list[str]:
        found = _check_choice("--sampling", self.sampling, SAMPLINGS)
        found += _check_encoding(self.encoding)
        if needs_data and not self.calib:
            found.append(f"--calib is required: {LOCAL_DATA}; --calib c4 or wikitext2 downloads from the Hub")
        if not 0 <= self.seed < 2**32:
            found.append(f"--seed must be in [0, 2**32), got {self.seed}")
        if self.nsamples < 1:
            found.append(f"--nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen < 2:
            found.append(f"--seqlen must be at least 2, got {self.seqlen}")
        return found


@dataclass
class PruneConfig:
    """Settings of ``losa prune``."""

    model: str = DEFAULT_MODEL
    out: str = ""
    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str | None = None
    prune_lm_head: bool = False
    per_layer: str | None = None
    allocation: str = "uniform"
    delta: float | None = None
    beta: float | None = None
    rmi_samples: int = 64
    owl_lambda: float = OWL_LAMBDA
    owl_m: float = OWL_M
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    device: str = "auto"
    dtype: str = "float32"
    damp: float = 0.01
    blocksize: int = 128
    #: stream the blocks from the memory-mapped checkpoint; None: when the model would not fit
    low_memory: bool | None = None
    #: the calibration windows' hidden states in files; None: when they would not fit in memory
    activations_on_disk: bool | None = None
    force: bool = False
    trust_remote_code: bool = False

    @property
    def needs_calibration(self) -> bool:
        """Every method but magnitude, and every allocation but uniform, reads activations."""
        return self.method != "magnitude" or self.allocation != "uniform"

    def validate(self) -> None:
        found = self.calibration.problems(self.needs_calibration)
        if not self.out:
            found.append("--out is required: the folder to write the pruned model to")
        found += _check_choice("--method", self.method, METHODS)
        if not 0.0 <= self.sparsity < 1.0:
            found.append(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern is not None:
            problem = _check_nm(self.pattern)
            if problem:
                found.append(problem)
            if self.per_layer:
                found.append("--pattern and --per-layer cannot be combined: N:M fixes every layer's rate")
            if self.allocation != "uniform":
                found.append(f"--pattern and --allocation {self.allocation} cannot be combined: N:M fixes every layer's rate")
        found += _check_choice("--allocation", self.allocation, ALLOCATIONS)
        if self.low_memory and self.prune_lm_head:
            found.append("--prune-lm-head needs the whole model in memory: drop --low-memory or --prune-lm-head")
        if self.per_layer and self.allocation != "uniform":
            found.append("--per-layer gives the rates itself; drop --allocation")
        if self.per_layer:
            try:
                load_per_layer(self.per_layer)
            except ConfigError as exc:
                found.append(str(exc))
        if self.allocation == "rmi" and self.delta is not None and not (0.0 < self.delta < 0.5 and self.sparsity + self.delta < 1.0):
            found.append(f"--delta must be in (0, 0.5) with sparsity + delta below 1, got {self.delta}")
        if self.beta is not None and self.beta <= 0:
            found.append(f"--beta must be positive, got {self.beta}")
        if self.rmi_samples < 2:
            found.append(f"--rmi-samples must be at least 2 (similarity needs several sequences), got {self.rmi_samples}")
        if self.allocation == "owl" and not (0.0 < self.owl_lambda and 2 * self.owl_lambda <= self.sparsity < 1.0 - 2 * self.owl_lambda):
            found.append(f"--owl-lambda must be positive with 2 x lambda <= sparsity < 1 - 2 x lambda "
                         f"(OWL's rates lie within sparsity +- 2 x lambda), got {self.owl_lambda}")
        if self.owl_m <= 0:
            found.append(f"--owl-m must be positive, got {self.owl_m}")
        found += _check_choice("--device", self.device, DEVICES)
        found += _check_choice("--dtype", self.dtype, DTYPES)
        found += _sparsegpt_problems(self.damp, self.blocksize)
        if found:
            raise ConfigError("; ".join(found))


@dataclass
class EvalConfig:
    """Settings of ``losa eval``."""

    model: str = DEFAULT_MODEL
    data: str | None = None
    seqlen: int = 2048
    max_windows: int | None = None
    dtype: str = "float32"
    device: str = "auto"
    batch_size: int = 1
    sparsity: bool = False
    trust_remote_code: bool = False
    tokenizer: str | None = None
    tasks: list[str] | None = None  # lm-eval task names or local .jsonl files (runtime/zeroshot.py)
    num_fewshot: int = 0
    limit: int | None = None
    encoding: str = AUTO_ENCODING

    def validate(self) -> None:
        found = _check_encoding(self.encoding)
        if self.data is None and not self.sparsity and self.tasks is None:
            found.append("give --data FILE for perplexity, --tasks for multiple-choice accuracy, or --sparsity to count zeros")
        if self.tasks is not None and (not self.tasks or not all(name.strip() for name in self.tasks)):
            found.append("--tasks needs comma-separated lm-eval task names or .jsonl files, e.g. --tasks arc_easy,my_task.jsonl")
        if self.num_fewshot < 0:
            found.append(f"--num-fewshot must be at least 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit < 1:
            found.append(f"--limit must be at least 1, got {self.limit}")
        if self.tasks is None and (self.num_fewshot or self.limit is not None):
            found.append("--num-fewshot and --limit apply to --tasks only")
        if self.seqlen < 2:
            found.append(f"--seqlen must be at least 2, got {self.seqlen}")
        if self.max_windows is not None and self.max_windows < 1:
            found.append(f"--max-windows must be at least 1, got {self.max_windows}")
        if self.batch_size < 1:
            found.append(f"--batch-size must be at least 1, got {self.batch_size}")
        found += _check_choice("--dtype", self.dtype, DTYPES)
        found += _check_choice("--device", self.device, DEVICES)
        if found:
            raise ConfigError("; ".join(found))


@dataclass
class RecoverConfig:
    """Settings of ``losa recover`` (LoSA).  Paper defaults unless noted in the README."""

    model: str = DEFAULT_MODEL
    out: str = ""
    data: str = ""
    sparsity: float | None = None  # None: RECOVER_SPARSITY, or N/M with --pattern
    method: str = "wanda"
    pattern: str | None = None
    damp: float = 0.01
    blocksize: int = 128
    loss: str = "ce"
    kd_temperature: float = 1.0
    allocation: str = "rmi"
    delta: float | None = None
    beta: float | None = None
    rmi_samples: int = 64
    stages: int = 5
    total_steps: int = 1250
    final_share: float = 0.6
    steps_per_stage: list[int] | None = None
    mean_ranks: list[float] | None = None
    rank_allocation: str = "error"
    rank_min: int = 2
    rank_max: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    fused: bool = True
    adapter: str = "masked-lora"
    losia_ratio: float = 0.125  # LoSiA's rank factor p = 1/8: core rows and columns per layer
    losia_period: int = 50
    error_samples: int = 16
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
    dtype: str = "float32"
    device: str = "auto"
    checkpoint_every: int = 100
    resume: bool = False
    force: bool = False
    trust_remote_code: bool = False

    def target_sparsity(self) -> float:
        """The sparsity the last stage reaches: N/M with a pattern, else --sparsity (default 0.7)."""
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

    def validate(self) -> None:
        found = self.calibration.problems()
        if not self.out:
            found.append("--out is required: the folder to write the recovered model to")
        if not self.data:
            found.append("--data is required: the fine-tuning text (.jsonl instructions or .txt)")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            found.append(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.method not in ("wanda", "sparsegpt"):
            found.append(f"--method {self.method!r}: recover prunes with wanda or sparsegpt")
        if self.pattern is not None:
            problem = _check_nm(self.pattern)
            if problem:
                found.append(problem)
            elif self.sparsity is not None and abs(self.sparsity - self.target_sparsity()) > 1e-9:
                found.append(f"--sparsity {self.sparsity} contradicts --pattern {self.pattern} "
                             f"({self.target_sparsity():g} zeros): drop --sparsity, N:M sets it")
        found += _sparsegpt_problems(self.damp, self.blocksize)
        found += _check_choice("--loss", self.loss, RECOVER_LOSSES)
        if not 0.0 < self.kd_temperature <= 100.0:
            found.append(f"--kd-temperature must be in (0, 100], got {self.kd_temperature}")
        found += _check_choice("--allocation", self.allocation, ALLOCATIONS)
        if self.stages < 1:
            found.append(f"--stages must be at least 1, got {self.stages}")
        steps = self.plan_steps() if self.stages >= 1 else []
        if self.steps_per_stage is not None and len(self.steps_per_stage) != self.stages:
            found.append(f"--steps-per-stage gives {len(self.steps_per_stage)} values for {self.stages} stages")
        elif any(k < 0 for k in steps) or sum(steps) < 1:
            found.append(f"training steps per stage must be >= 0 with at least one in all, got {steps}")
        if not 0.0 <= self.final_share <= 1.0:
            found.append(f"--final-share must be in [0, 1], got {self.final_share}")
        if not 1 <= self.rank_max <= 1024:
            found.append(f"--rank-max must be in [1, 1024], got {self.rank_max}")
        if not 0 <= self.rank_min <= self.rank_max:
            found.append(f"--rank-min must be in [0, --rank-max={self.rank_max}], got {self.rank_min}")
        if self.mean_ranks is not None and len(self.mean_ranks) != self.stages:
            found.append(f"--mean-ranks gives {len(self.mean_ranks)} values for {self.stages} stages")
        elif self.stages >= 1:
            bad = [m for m in self.plan_ranks() if not self.rank_min <= m <= self.rank_max]
            if bad:
                found.append(f"mean ranks {bad} lie outside [--rank-min, --rank-max] = [{self.rank_min}, {self.rank_max}]; "
                             "raise --rank-max or give --mean-ranks")
        if self.rank_allocation not in ("error", "uniform"):
            found.append(f"--rank-allocation {self.rank_allocation!r}: choose error or uniform")
        if self.alpha <= 0:
            found.append(f"--alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            found.append(f"--dropout must be in [0, 1), got {self.dropout}")
        found += _check_choice("--adapter", self.adapter, RECOVER_ADAPTERS)
        if not 0.0 < self.losia_ratio <= 1.0:
            found.append(f"--losia-ratio must be in (0, 1], got {self.losia_ratio}")
        if self.losia_period < 1:
            found.append(f"--losia-period must be at least 1, got {self.losia_period}")
        if self.error_samples < 1:
            found.append(f"--error-samples must be at least 1, got {self.error_samples}")
        if self.max_length < 8:
            found.append(f"--max-length must be at least 8, got {self.max_length}")
        if self.batch_size < 1 or self.grad_accum < 1:
            found.append(f"--batch-size and --grad-accum must be at least 1, got {self.batch_size} and {self.grad_accum}")
        if not 0.0 < self.lr < 1.0:
            found.append(f"--lr must be in (0, 1), got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            found.append(f"--warmup must be in [0, 1), got {self.warmup}")
        if self.grad_clip <= 0:
            found.append(f"--grad-clip must be positive, got {self.grad_clip}")
        if self.checkpoint_every < 1:
            found.append(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")
        found += _check_choice("--dtype", self.dtype, DTYPES)
        found += _check_choice("--device", self.device, DEVICES)
        if found:
            raise ConfigError("; ".join(found))


EXPORT_MIN_OPSET = 14
EXPORT_DEFAULT_OPSET = 17  # the highest opset DeepSparse 1.8.0 compiles
BENCH_ENGINES = ("onnxruntime", "deepsparse", "losa")  # losa: its own sparse kernel (runtime/losa_engine.py)


@dataclass
class ExportConfig:
    """Settings of ``losa export``."""

    model: str = ""
    out: str = ""
    onnx: bool = False
    int8: bool = False
    #: False: graphs only (``losa run``'s dense baseline, whose weights are the input model's)
    safetensors: bool = True
    batch: int | None = None
    seqlen: int | None = None
    opset: int = EXPORT_DEFAULT_OPSET
    decode: bool = True
    tolerance: float = 1e-3
    force: bool = False
    trust_remote_code: bool = False

    def validate(self) -> None:
        found = []
        if not self.model:
            found.append("give the model folder to export")
        if not self.out:
            found.append("--out is required: the folder to write the exported model to")
        if self.batch is not None and self.batch < 1:
            found.append(f"--batch must be at least 1 (or omitted for a dynamic batch), got {self.batch}")
        if self.seqlen is not None and self.seqlen < 1:
            found.append(f"--seqlen must be at least 1 (or omitted for a dynamic length), got {self.seqlen}")
        if self.opset < EXPORT_MIN_OPSET:
            found.append(f"--opset must be at least {EXPORT_MIN_OPSET}, got {self.opset}")
        if not 0.0 < self.tolerance < 1.0:
            found.append(f"--tolerance must be in (0, 1), got {self.tolerance}")
        if not self.safetensors and not self.onnx:
            found.append("--no-safetensors leaves nothing to write: add --onnx")
        if not self.onnx and (self.batch is not None or self.seqlen is not None):
            found.append("--batch and --seqlen shape the ONNX graphs; add --onnx or drop them")
        if self.int8 and not self.onnx:
            found.append("--int8 quantizes the ONNX graphs; add --onnx")
        if found:
            raise ConfigError("; ".join(found))


@dataclass
class BenchConfig:
    """Settings of ``losa bench``."""

    model: str = ""
    dense_baseline: str | None = None
    engines: str = ",".join(BENCH_ENGINES)
    batch: int = 1
    seqlen: int = 128
    decode_tokens: int = 16
    threads: int | None = None
    warmup: int = 2
    iterations: int = 10
    report: str | None = None
    force: bool = False
    opset: int = EXPORT_DEFAULT_OPSET
    timeout_s: float = 3600.0
    trust_remote_code: bool = False
    precisions: str = "fp32"
    compile: bool = False  # the losa engine's models under torch.compile

    def engine_list(self) -> list[str]:
        """The engines asked for, in order, without duplicates."""
        return list(dict.fromkeys(e.strip().lower() for e in self.engines.split(",") if e.strip()))

    def precision_list(self) -> list[str]:
        """The weight precisions asked for, in order, without duplicates."""
        return list(dict.fromkeys(p.strip().lower() for p in self.precisions.split(",") if p.strip()))

    def validate(self) -> None:
        found = []
        if not self.model:
            found.append("give a model folder, an export folder or a .onnx file to benchmark")
        unknown = [e for e in self.engine_list() if e not in BENCH_ENGINES]
        if unknown or not self.engine_list():
            found.append(f"--engines {self.engines!r}: choose from {', '.join(BENCH_ENGINES)} (comma-separated)")
        for name, value, low in (("--batch", self.batch, 1), ("--seqlen", self.seqlen, 1), ("--decode-tokens", self.decode_tokens, 0),
                                 ("--warmup", self.warmup, 0), ("--iterations", self.iterations, 1)):
            if value < low:
                found.append(f"{name} must be at least {low}, got {value}")
        if self.threads is not None and self.threads < 1:
            found.append(f"--threads must be at least 1, got {self.threads}")
        if not self.precision_list() or any(p not in BENCH_PRECISIONS for p in self.precision_list()):
            found.append(f"--precisions {self.precisions!r}: choose from {', '.join(BENCH_PRECISIONS)} (comma-separated)")
        if self.report is not None and not self.report.lower().endswith(".png"):
            found.append(f"--report {self.report}: give a .png file name")
        if self.timeout_s <= 0:
            found.append(f"timeout must be positive, got {self.timeout_s}")
        if found:
            raise ConfigError("; ".join(found))


def to_dict(config: object) -> dict:
    """Plain-dict view of a config dataclass (for manifests and ``--json``)."""
    return asdict(config)  # type: ignore[arg-type]


def load_per_layer(path: str, num_blocks: int | None = None) -> list[float]:
    """Read explicit per-block rates: a JSON list, a JSON object {block index: rate}, or a losa
    manifest (file or output folder: its ``per_block_rates``), so a previous run's allocation can
    be replayed.  Without ``num_blocks`` only the file itself is checked (before loading a model).
    """
    from .manifest import MANIFEST_NAME

    file = Path(path).expanduser()
    if file.is_dir():
        file = file / MANIFEST_NAME
    if not file.is_file():
        raise ConfigError(f"--per-layer {file} does not exist; give a JSON list of rates or a losa manifest")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise ConfigError(f"--per-layer file {path} is not valid JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("results"), dict):  # a losa manifest
        data = data["results"]
    if isinstance(data, dict) and "per_block_rates" in data:
        data = data["per_block_rates"]
    if isinstance(data, dict):
        data = [data.get(str(i)) for i in range(num_blocks if num_blocks is not None else len(data))]
    if not isinstance(data, list) or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in data):
        raise ConfigError(f"--per-layer file {path} must hold a list of numbers, an object {{block: rate}} for every "
                          "block, or a losa manifest with per_block_rates")
    rates = [float(r) for r in data]
    if num_blocks is not None and len(rates) != num_blocks:
        raise ConfigError(f"--per-layer file {path} gives {len(rates)} rates but the model has {num_blocks} blocks")
    bad = [f"block {i}: {r}" for i, r in enumerate(rates) if not 0.0 <= r < 1.0]
    if bad:
        raise ConfigError(f"--per-layer rates must be in [0, 1): {', '.join(bad)}")
    return rates


#: losa generate --kernel: the packed value format of SparseLinear (kernels/), or None for dense PyTorch
GENERATE_KERNELS = {"off": None, "fp32": "float32", "bf16": "bfloat16", "int8": "int8"}


@dataclass
class GenerateConfig:
    """Settings of ``losa generate``."""

    model: str = ""
    prompt: str = ""
    max_new_tokens: int = 64
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    kernel: str = "fp32"
    threads: int | None = None
    trust_remote_code: bool = False

    def validate(self) -> None:
        found = _check_choice("--kernel", self.kernel, tuple(GENERATE_KERNELS))
        if not self.prompt:
            found.append("--prompt is required: the text to continue")
        if self.max_new_tokens < 1:
            found.append(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            found.append(f"--temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            found.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.threads is not None and self.threads < 1:
            found.append(f"--threads must be at least 1, got {self.threads}")
        if found:
            raise ConfigError("; ".join(found))
