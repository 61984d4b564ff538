"""Workflow of ``losa bench --cpu``: sparse vs dense latency on ONNX Runtime and DeepSparse.

resolve the sparse model to ONNX graphs (an export folder, a .onnx file, or a model folder
exported on the fly) -> the dense counterpart (``--dense-baseline``, or a densified copy of the
sparse graphs) -> for every engine, phase and model: compile and time in a child process ->
latency statistics, throughput and speed-ups, with the machine's load before and after.

Decode is timed as one new token per sequence attending to a fixed past of ``--seqlen``
tokens, ``--decode-tokens`` steps per iteration; the cache is not grown between steps, so both
engines (DeepSparse compiles static shapes) time the same computation.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.atomic import check_output
from ..core.config import BenchConfig, to_dict
from .engines import (
    EngineFailure,
    cpu_info,
    deepsparse_unavailable,
    engine_versions,
    run_job,
    safe_threads,
    summarize,
)
from ..core.errors import ConfigError, ModelError
from ..core.manifest import library_versions
from ..core.modeling import load_model
from ..export.onnx_graphs import (
    SIDECAR_FILE,
    GraphSpec,
    ProgressFn,
    check_onnx_environment,
    densify_graph,
    export_graphs,
    read_graph_spec,
    spec_from_graph,
    verify_export,
    weight_sparsity,
)

DECODE_PROTOCOL = ("one new token per sequence attending to a fixed past of --seqlen tokens; "
                   "--decode-tokens steps per iteration; the cache is not grown between steps")
ORT_NOTE = "ONNX Runtime runs sparse weights as dense matrices: its sparse and dense timings should match"


@dataclass
class GraphSet:
    """One model as ONNX graphs, and how they were obtained."""

    role: str
    source: str
    folder: Path
    spec: GraphSpec
    origin: str
    zero_fraction: float = 0.0
    verification: dict | None = None

    def path(self, phase: str) -> Path | None:
        name = self.spec.prefill if phase == "prefill" else self.spec.decode
        return None if name is None else self.folder / name

    def describe(self) -> dict:
        return {"source": self.source, "origin": self.origin, "matmul_zero_fraction": self.zero_fraction,
                "decode_graph": self.spec.decode is not None, "verification": self.verification}


@dataclass
class BenchResult:
    """Timings of every (engine, model, phase), the speed-ups, and the conditions of the run."""

    model: str
    sparse: dict
    dense: dict
    settings: dict
    decode_protocol: str
    machine: dict
    load_average_before: list[float] | None
    load_average_after: list[float] | None
    versions: dict
    runs: list[dict]
    speedups: list[dict]
    notes: list[str]
    warnings: list[str] = field(default_factory=list)
    report: str | None = None
    wall_time_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- resolving inputs


def _from_onnx_file(path: Path, role: str) -> GraphSet:
    spec = read_graph_spec(path.parent)
    if spec is None or spec.prefill != path.name:
        spec = spec_from_graph(path)
        return GraphSet(role, str(path), path.parent, spec, "ONNX file (prefill only: no losa_onnx.json beside it)")
    return GraphSet(role, str(path), path.parent, spec, "ONNX export folder")


def _export_on_the_fly(source: str, scratch: Path, role: str, config: BenchConfig, progress: ProgressFn | None,
                       warnings: list[str]) -> GraphSet:
    """Export a model folder to dynamic-shape graphs in ``scratch`` and verify them (logits, zeros)."""
    loaded = load_model(source, "float32", config.trust_remote_code)
    folder = scratch / role
    spec, export_warnings = export_graphs(loaded.model, folder, None, None, config.opset, True, progress)
    warnings += [f"{role}: {w}" for w in export_warnings]
    verification = verify_export(loaded.model, folder, spec, 1e-3, greedy_steps=2, progress=progress)
    summary = {"prefill_max_abs_diff": verification.prefill_max_abs_diff,
               "decode_max_abs_diff": verification.decode_max_abs_diff, "greedy_match": verification.greedy_match,
               "weights_checked": verification.layers_checked}
    del loaded
    gc.collect()
    return GraphSet(role, source, folder, spec, "model folder, exported to ONNX for this run", verification=summary)


def resolve_graphs(source: str, scratch: Path, role: str, config: BenchConfig, progress: ProgressFn | None,
                   warnings: list[str]) -> GraphSet:
    """Turn MODEL_DIR_OR_ONNX into graphs: .onnx file, export folder, or model folder (exported here)."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".onnx":
        return _from_onnx_file(path, role)
    for folder in (path / "onnx", path):
        if path.is_dir() and (folder / SIDECAR_FILE).is_file():
            return GraphSet(role, source, folder, read_graph_spec(folder), "ONNX export folder")
    try:
        return _export_on_the_fly(source, scratch, role, config, progress, warnings)
    except ModelError as exc:
        raise ModelError(f"{source} is neither an ONNX file, a losa export folder nor a loadable model ({exc})") from None


def _densified(sparse: GraphSet, scratch: Path) -> GraphSet:
    """A copy of the sparse graphs with no zeros: the dense timing reference when none is given."""
    folder = scratch / "densified"
    folder.mkdir(parents=True, exist_ok=True)
    for phase in ("prefill", "decode"):
        path = sparse.path(phase)
        if path is not None:
            densify_graph(path, folder / path.name)
    return GraphSet("dense", f"densified copy of {sparse.source}", folder, sparse.spec,
                    "densified copy: the sparse graphs with every zero weight replaced by a small value")


def _check_shapes(graphs: GraphSet, config: BenchConfig) -> None:
    """Fixed-shape graphs must match --batch/--seqlen."""
    spec = graphs.spec
    if spec.batch is not None and spec.batch != config.batch:
        raise ConfigError(f"{graphs.source} was exported for batch {spec.batch}; use --batch {spec.batch} or re-export")
    if spec.seqlen is not None and spec.seqlen != config.seqlen:
        raise ConfigError(f"{graphs.source} was exported for {spec.seqlen} tokens; use --seqlen {spec.seqlen} or re-export")


# ----------------------------------------------------------------------------- timing


def _job(graphs: GraphSet, engine: str, phase: str, config: BenchConfig, threads: int) -> dict:
    spec = graphs.spec
    return {"engine": engine, "phase": phase, "graph": str(graphs.path(phase)), "batch": config.batch,
            "seqlen": config.seqlen, "decode_tokens": config.decode_tokens, "threads": threads, "warmup": config.warmup,
            "iterations": config.iterations, "vocab_size": spec.vocab_size, "kv_heads": spec.kv_heads,
            "head_dim": spec.head_dim, "seed": 0}


def _speedups(runs: list[dict]) -> list[dict]:
    """dense/sparse median per engine and phase, and DeepSparse-sparse over ONNX Runtime-dense."""
    median = {(r["engine"], r["model"], r["phase"]): r["timing"]["median_ms"] for r in runs if r["timing"]}
    rows = []
    for engine, model, phase in list(median):
        if model != "sparse" or (engine, "dense", phase) not in median:
            continue
        dense, sparse = median[(engine, "dense", phase)], median[(engine, "sparse", phase)]
        rows.append({"phase": phase, "sparse": f"{engine} sparse", "dense": f"{engine} dense",
                     "dense_median_ms": dense, "sparse_median_ms": sparse, "speedup": dense / sparse})
    for phase in ("prefill", "decode"):
        if ("deepsparse", "sparse", phase) in median and ("onnxruntime", "dense", phase) in median:
            dense, sparse = median[("onnxruntime", "dense", phase)], median[("deepsparse", "sparse", phase)]
            rows.append({"phase": phase, "sparse": "deepsparse sparse", "dense": "onnxruntime dense",
                         "dense_median_ms": dense, "sparse_median_ms": sparse, "speedup": dense / sparse})
    return rows


def _engines(config: BenchConfig, warnings: list[str], notes: list[str]) -> list[str]:
    engines = config.engine_list()
    if "deepsparse" in engines:
        reason = deepsparse_unavailable()
        if reason:
            warnings.append(reason)
            engines.remove("deepsparse")
    elif "onnxruntime" in engines:
        notes.append("DeepSparse not requested: " + ORT_NOTE.lower() + ", so only dense-vs-dense speed is measured")
    if "onnxruntime" in engines:
        notes.append(ORT_NOTE)
    if not engines:
        raise ConfigError("no engine can run here: install DeepSparse or add onnxruntime to --engines")
    return engines


def _threads(config: BenchConfig, cores: int, warnings: list[str]) -> int:
    if config.threads is None:
        return safe_threads(cores)
    if config.threads > cores:
        warnings.append(f"--threads {config.threads} is above the {cores} cores here: timings will be oversubscribed")
    elif config.threads == cores and cores > 1:
        warnings.append(f"--threads {config.threads} uses every core: DeepSparse slows 10x+ when anything else runs")
    return config.threads


def run_bench(config: BenchConfig, progress: ProgressFn | None = None) -> BenchResult:
    """Time the sparse model and its dense counterpart on each engine; see the module docstring."""
    config.validate()
    started = time.perf_counter()
    if config.report is not None:
        check_output(config.report, config.force, option="--report", folder=False)
    check_onnx_environment(config.opset)
    warnings: list[str] = []
    notes: list[str] = []
    machine = cpu_info()
    threads = _threads(config, machine["cores"], warnings)
    engines = _engines(config, warnings, notes)
    with tempfile.TemporaryDirectory(prefix="losa-bench-") as scratch_name:
        scratch = Path(scratch_name)
        sparse = resolve_graphs(config.model, scratch, "sparse", config, progress, warnings)
        if config.dense_baseline:
            dense = resolve_graphs(config.dense_baseline, scratch, "dense", config, progress, warnings)
        else:
            dense = _densified(sparse, scratch)
        for graphs in (sparse, dense):
            _check_shapes(graphs, config)
            graphs.zero_fraction = weight_sparsity([graphs.path("prefill")])
        if sparse.zero_fraction < 0.05:
            warnings.append(f"the sparse model has only {sparse.zero_fraction:.1%} zero weights: no speed-up to expect")
        if dense.zero_fraction > 0.05:
            warnings.append(f"the dense baseline has {dense.zero_fraction:.1%} zero weights: is it really dense?")
        phases = ["prefill"]
        if config.decode_tokens > 0 and sparse.spec.decode and dense.spec.decode:
            phases.append("decode")
        elif config.decode_tokens > 0:
            warnings.append("decode not timed: a decode graph is missing (export with losa export --onnx from a model folder)")
        load_before = list(os.getloadavg())
        plan = [(engine, phase, graphs) for engine in engines for phase in phases for graphs in (sparse, dense)]
        runs = []
        for done, (engine, phase, graphs) in enumerate(plan):
            if progress:
                progress("bench", done, len(plan))
            runs.append(_timed_run(graphs, engine, phase, config, threads, warnings))
        if progress:
            progress("bench", len(plan), len(plan))
        load_after = list(os.getloadavg())
    if max(load_before[0], load_after[0]) > threads + 0.5:  # more than this benchmark's own threads
        warnings.append(f"the machine was busy (load average {load_before[0]:.2f} before, {load_after[0]:.2f} after, "
                        f"{machine['cores']} cores): timings are pessimistic and noisy")
    result = BenchResult(
        model=config.model, sparse=sparse.describe(), dense=dense.describe(),
        settings={**to_dict(config), "threads": threads, "engines_run": engines, "phases": phases},
        decode_protocol=DECODE_PROTOCOL, machine=machine, load_average_before=load_before, load_average_after=load_after,
        versions={**library_versions(), **engine_versions()}, runs=runs, speedups=_speedups(runs), notes=notes,
        warnings=warnings, wall_time_s=time.perf_counter() - started,
    )
    if config.report:
        result.report = str(plot_report(Path(config.report), result))
    return result


def _timed_run(graphs: GraphSet, engine: str, phase: str, config: BenchConfig, threads: int, warnings: list[str]) -> dict:
    """One child-process timing; an engine failure is recorded, not fatal."""
    row = {"engine": engine, "model": graphs.role, "phase": phase, "timing": None, "error": None}
    try:
        raw = run_job(_job(graphs, engine, phase, config, threads), config.timeout_s)
    except EngineFailure as exc:
        row["error"] = str(exc)
        hint = "; DeepSparse 1.8 crashes on some shapes (seen: tiny dense graphs under 16 tokens), try another --seqlen" \
            if engine == "deepsparse" else ""
        warnings.append(f"{engine} {graphs.role} {phase}: {exc}{hint}; the other timings are unaffected")
        return row
    tokens = config.batch * (config.seqlen if phase == "prefill" else 1)
    row["timing"] = summarize(raw["latencies_ms"], tokens, raw["compile_s"]).to_dict()
    return row


def plot_report(path: Path, result: BenchResult) -> Path:
    """Bar chart: median latency (p90 as error bar) per engine and model, one panel per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = result.settings["phases"]
    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4.2), squeeze=False)
    settings = result.settings
    for ax, phase in zip(axes[0], phases):
        rows = [r for r in result.runs if r["phase"] == phase and r["timing"]]
        labels = [f"{r['engine']}\n{r['model']}" for r in rows]
        medians = [r["timing"]["median_ms"] for r in rows]
        spread = [r["timing"]["p90_ms"] - r["timing"]["median_ms"] for r in rows]
        colors = ["#4c72b0" if r["model"] == "sparse" else "#999999" for r in rows]
        ax.bar(range(len(rows)), medians, yerr=[[0] * len(rows), spread], color=colors, capsize=4)
        ax.set_xticks(range(len(rows)), labels)
        unit = f"{settings['seqlen']} tokens" if phase == "prefill" else f"1 token, past {settings['seqlen']}"
        ax.set_title(f"{phase} (batch {settings['batch']}, {unit})")
        ax.set_ylabel("median latency, ms (bar: p90)")
    fig.suptitle(f"{Path(result.model).name}: {result.sparse['matmul_zero_fraction']:.0%} zeros in MatMul weights, "
                 f"{settings['threads']} thread(s), {result.machine['cpu']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(staging, dpi=120)
    plt.close(fig)
    staging.replace(path)
    return path
