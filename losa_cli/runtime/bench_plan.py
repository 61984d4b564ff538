"""What one ``losa bench`` times: the engines that can run here, the threads, and the timing plan --
a row per engine, precision, phase and model (ONNX graph sets, or the losa engine's model folder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ConfigError
from ..core.modeling import resolve_source
from .config import BenchConfig, Engine, Precision
from .engines import deepsparse_unavailable, safe_threads
from .graph_sets import BenchGraphs, check_shapes
from .onnx_io import weight_sparsity

ORT_NOTE = "ONNX Runtime runs sparse weights as dense matrices: its sparse and dense timings should match"
ONNX_ENGINES = (Engine.ONNXRUNTIME, Engine.DEEPSPARSE)
LOSA_NOTE = (
    "losa = the model on losa's lean decoder (a native step per decoded token); losa sparse = its block linears "
    "bitmask-packed and its head in the kernel's dense layout, in the row's precision; losa dense = the same decoder "
    "with dense fp32 layers (zeros multiplied); losa prefill computes the last position's logits only (what "
    "generation needs), the ONNX graphs every position's"
)


@dataclass
class LosaModel:
    """The model folder as the losa engine runs it: ``kernel`` on (sparse rows, packed) or off (dense fp32)."""

    role: str
    source: str
    precision: str
    kernel: bool
    form: str | None = None  # the int8 activation form of ONNX rows; none here


def losa_unavailable(source: str) -> str | None:
    """None when the losa engine can load ``source``, else why not (one line).  It runs the weights in
    PyTorch, so it needs a model folder (or an export folder that kept its safetensors), not graphs."""
    path = Path(source).expanduser()
    if path.suffix == ".onnx" or (
        path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.gguf"))
    ):
        return (
            f"the losa engine runs a model's safetensors and {source} has none (ONNX graphs only): give the model "
            "folder, or an export made without --no-safetensors"
        )
    return None


def onnx_engines_to_run(config: BenchConfig) -> list[str]:
    """The ONNX engines of ``--engines`` that can run here (DeepSparse only where it is installed): the
    bench's callers make graphs for them (``export/bench_inputs.py``) only when there is one."""
    return [
        e for e in config.engines if e in ONNX_ENGINES and not (e == Engine.DEEPSPARSE and deepsparse_unavailable())
    ]


def engines_to_run(config: BenchConfig, warnings: list[str], notes: list[str]) -> list[str]:
    """The engines of ``--engines`` that can run here; why each other cannot joins ``warnings`` (and, when
    none can, the error: the reason is what the user must fix, not the engine list)."""
    engines = list(config.engines)
    refused: list[str] = []
    if Engine.LOSA in engines:
        reason = losa_unavailable(config.model)
        if reason:
            refused.append(reason)
            engines.remove(Engine.LOSA)
        else:
            resolve_source(config.model)  # a wrong path fails here, in one line, not in every child
            notes.append(LOSA_NOTE)
    if Precision.BF16 in config.precisions and any(e in ONNX_ENGINES for e in engines):
        notes.append("bf16 is timed on the losa engine only; ONNX Runtime and DeepSparse run fp32 and int8")
    if Engine.DEEPSPARSE in engines:
        reason = deepsparse_unavailable()
        if reason:
            refused.append(reason)
            engines.remove(Engine.DEEPSPARSE)
    elif Engine.ONNXRUNTIME in engines and Engine.LOSA not in engines:
        notes.append("DeepSparse not requested: " + ORT_NOTE.lower() + ", so only dense-vs-dense speed is measured")
    if Engine.ONNXRUNTIME in engines:
        notes.append(ORT_NOTE)
    if not engines:
        raise ConfigError(f"no engine of --engines can run: {'; '.join(refused)}" if refused else
                          "no engine can run here: add onnxruntime or losa to --engines, or install DeepSparse")
    warnings += refused
    return engines


def bench_threads(config: BenchConfig, cores: int, warnings: list[str]) -> int:
    if config.threads is None:
        return safe_threads(cores)
    if config.threads > cores:
        warnings.append(f"--threads {config.threads} is above the {cores} cores here: timings will be oversubscribed")
    elif config.threads == cores and cores > 1:
        warnings.append(f"--threads {config.threads} uses every core: DeepSparse slows 10x+ when anything else runs")
    return config.threads


def onnx_plan(
    config: BenchConfig, graphs: BenchGraphs, engines: list[str], precisions: list[str], warnings: list[str]
) -> tuple[list[str], list[tuple]]:
    """The phases the sparse and dense graphs allow, and their timing plan (int8 copies as asked)."""
    sparse, dense = graphs.sparse, graphs.dense
    for graph_set in (sparse, dense):
        check_shapes(graph_set, config)
        graph_set.zero_fraction = weight_sparsity([graph_set.path("prefill")])
    if sparse.zero_fraction < 0.05:
        warnings.append(f"the sparse model has only {sparse.zero_fraction:.1%} zero weights: no speed-up to expect")
    if dense.zero_fraction > 0.05:
        warnings.append(f"the dense baseline has {dense.zero_fraction:.1%} zero weights: is it really dense?")
    phases = ["prefill"]
    if config.decode_tokens > 0 and sparse.spec.decode and dense.spec.decode:
        phases.append("decode")
    elif config.decode_tokens > 0:
        warnings.append(
            "decode not timed: a decode graph is missing (export with losa export --onnx from a model folder)"
        )
    onnx_precisions = [p for p in precisions if p != Precision.BF16]
    plan = [
        (engine, phase, fp32 if precision == Precision.FP32 else graphs.int8[fp32.role])
        for engine in engines
        for precision in onnx_precisions
        for phase in phases
        for fp32 in (sparse, dense)
    ]
    return phases, plan


def losa_plan(config: BenchConfig, precisions: list[str], phases: list[str]) -> list[tuple]:
    """The losa engine's rows: the sparse model per precision on the kernel, and once in dense PyTorch."""
    models = [LosaModel("sparse", config.model, precision, True) for precision in precisions]
    models.insert(1, LosaModel("dense", config.model, "fp32", False))
    return [("losa", phase, model) for model in models for phase in phases]
