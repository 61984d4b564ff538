"""Workflow of ``losa bench --cpu``: sparse vs dense latency on ONNX Runtime, DeepSparse and losa's own kernel.

the graph sets the caller made (``export/bench_inputs.py``: sparse, dense, and their int8 copies with
``--precisions``; None when no ONNX engine runs) -> the machine's read bandwidth -> for every engine,
precision, phase and model: compile and time in a child process -> latency statistics, throughput,
speed-ups against dense fp32 ONNX Runtime and against the same engine's dense model, and for decode
the bandwidth ceiling of the format the engine reads (``ceiling.py``) and the share of it reached;
the machine's load before and after.

The ``losa`` engine (``losa_engine.py``) times the model folder itself in PyTorch: its sparse rows
on losa's bitmask kernel (``--precisions`` fp32, bf16, int8), its dense row in plain PyTorch, with
the bytes its packed format reads per token for the ceiling.  It needs the safetensors, not graphs.

Decode is timed as one new token per sequence attending to a fixed past of ``--seqlen``
tokens, ``--decode-tokens`` steps per iteration; the cache is not grown between steps, so every
engine (DeepSparse compiles static shapes) times the same computation.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.config import to_dict
from ..core.errors import ConfigError
from ..core.manifest import library_versions
from ..core.sequential import ProgressFn
from .bench_accuracy import accuracy_of, measure_accuracy
from .bench_plan import ONNX_ENGINES, LosaModel, bench_threads, engines_to_run, losa_plan, onnx_plan
from .ceiling import ENGINE_FORMAT, ceiling_ms, decode_bytes, measure_bandwidth
from .config import BenchConfig, Engine
from .engines import (
    EngineFailure,
    cpu_info,
    engine_versions,
    run_job,
    summarize,
)
from .graph_sets import BenchGraphs, GraphSet
from .losa_engine import describe_format

DECODE_PROTOCOL = (
    "one new token per sequence attending to a fixed past of --seqlen tokens; "
    "--decode-tokens steps per iteration; the cache is not grown between steps"
)


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


# ----------------------------------------------------------------------------- timing


def _job(graphs: GraphSet | LosaModel, engine: str, phase: str, config: BenchConfig, threads: int) -> dict:
    common = {
        "engine": engine,
        "phase": phase,
        "batch": config.batch,
        "seqlen": config.seqlen,
        "decode_tokens": config.decode_tokens,
        "threads": threads,
        "warmup": config.warmup,
        "iterations": config.iterations,
        "seed": 0,
    }
    if isinstance(graphs, LosaModel):
        return {
            **common,
            "source": graphs.source,
            "precision": graphs.precision,
            "kernel": graphs.kernel,
            "trust_remote_code": config.trust_remote_code,
            "compile": config.compile,
        }
    spec = graphs.spec
    return {
        **common,
        "graph": str(graphs.path(phase)),
        "vocab_size": spec.vocab_size,
        "kv_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
    }


def _label(row: dict) -> str:
    return f"{row['engine']} {row['model']} {row['precision']}"


def _speedups(runs: list[dict]) -> list[dict]:
    """Fill each row's speed-ups; return the sparse-over-dense pairs (same engine and precision) and
    every sparse row over dense fp32 ONNX Runtime, the baseline a user starts from."""
    median = {
        (r["engine"], r["model"], r["precision"], r["phase"]): r["timing"]["median_ms"] for r in runs if r["timing"]
    }
    pairs = []
    for row in runs:
        if not row["timing"]:
            continue
        own = row["timing"]["median_ms"]
        reference = median.get(("onnxruntime", "dense", "fp32", row["phase"]))
        # the same engine's dense model at the same precision; losa's bf16/int8 rows: its dense fp32 PyTorch
        precision = row["precision"] if (row["engine"], "dense", row["precision"], row["phase"]) in median else "fp32"
        dense = median.get((row["engine"], "dense", precision, row["phase"]))
        row["speedup_vs_onnxruntime_dense_fp32"] = reference / own if reference else None
        row["speedup_vs_same_engine_dense"] = dense / own if dense else None
        if row["model"] != "sparse":
            continue
        same_engine = (row["engine"], "dense", precision)
        bases = [(same_engine, dense)]
        if same_engine != ("onnxruntime", "dense", "fp32"):
            bases.append((("onnxruntime", "dense", "fp32"), reference))
        for key, base in bases:
            if base is not None:
                pairs.append(
                    {
                        "phase": row["phase"],
                        "sparse": _label(row),
                        "dense": " ".join(key),
                        "dense_median_ms": base,
                        "sparse_median_ms": own,
                        "speedup": base / own,
                    }
                )
    return pairs


def _ceiling(row: dict, graphs: GraphSet, config: BenchConfig, bandwidth_gb_s: float, cache: dict) -> dict | None:
    """Bytes per decode step of the format the engine reads, the time they take at the measured bandwidth,
    and the share of that limit the measured step reached (batch 1 only: larger batches reuse weights)."""
    counted = row.pop("bytes", None)  # the losa engine's own count (losa_engine.weight_bytes_per_token)
    if row["phase"] != "decode" or config.batch != 1 or not row["timing"]:
        return None
    if isinstance(graphs, LosaModel):
        total = sum(counted.values())
        limit = ceiling_ms(total, bandwidth_gb_s)
        return {
            "format": describe_format(graphs.precision) if graphs.kernel else "dense fp32",
            "bytes_per_token": total,
            "ceiling_ms": limit,
            "share": limit / row["timing"]["median_ms"],
            "bytes": counted,
            "bandwidth_gb_s": bandwidth_gb_s,
        }
    if graphs.spec.kv_heads is None:
        return None
    path = graphs.path("decode")
    if path not in cache:
        cache[path] = decode_bytes(
            path, config.seqlen, graphs.spec.num_layers, graphs.spec.kv_heads, graphs.spec.head_dim
        )
    counted = cache[path]
    weight_format = ENGINE_FORMAT[row["engine"]]
    limit = ceiling_ms(counted.total(weight_format), bandwidth_gb_s)
    return {
        "format": weight_format,
        "bytes_per_token": counted.total(weight_format),
        "ceiling_ms": limit,
        "share": limit / row["timing"]["median_ms"],
        "bytes": counted.to_dict(),
        "bandwidth_gb_s": bandwidth_gb_s,
    }


def run_bench(
    config: BenchConfig, graphs: BenchGraphs | None = None, progress: ProgressFn | None = None
) -> BenchResult:
    """Time the sparse model and its dense counterpart on each engine; see the module docstring.

    ``graphs``: what the ONNX engines time, made by the caller (``export.bench_graphs``); None when
    only the losa engine runs."""
    started = time.perf_counter()
    warnings: list[str] = []
    notes: list[str] = []
    machine = cpu_info()
    threads = bench_threads(config, machine["cores"], warnings)
    engines = engines_to_run(config, warnings, notes)
    precisions = list(config.precisions)
    onnx_engines = [e for e in engines if e in ONNX_ENGINES]
    if onnx_engines and graphs is None:
        raise ConfigError(f"{', '.join(onnx_engines)} time ONNX graphs: make them first (export.bench_graphs)")
    warnings += graphs.warnings if graphs is not None and onnx_engines else []
    if onnx_engines:
        phases, plan = onnx_plan(config, graphs, onnx_engines, precisions, warnings)
        described = {"sparse": graphs.sparse.describe(), "dense": graphs.dense.describe()}
    else:
        phases, plan = ["prefill", "decode"] if config.decode_tokens > 0 else ["prefill"], []
        described = {
            role: {
                "source": config.model if role == "sparse" else f"{config.model} in dense PyTorch",
                "origin": "model folder (losa engine)",
                "matmul_zero_fraction": None,
            }
            for role in ("sparse", "dense")
        }
    if Engine.LOSA in engines:
        plan += losa_plan(config, precisions, phases)
    load_before = list(os.getloadavg())
    machine["read_bandwidth_gb_s"] = measure_bandwidth(threads)
    runs, byte_counts = [], {}
    for done, (engine, phase, timed) in enumerate(plan):
        if progress:
            progress("bench", done, len(plan))
        runs.append(_timed_run(timed, engine, phase, config, threads, warnings))
    if progress:
        progress("bench", len(plan), len(plan))
    load_after = list(os.getloadavg())
    if runs and all(row["error"] for row in runs):
        raise EngineFailure(f"every timing failed; the first: {runs[0]['error']}")
    speedups = _speedups(runs)
    # after the timings, so they run on a quiet machine; on every core, as nothing here is timed
    accuracy = measure_accuracy(config, [timed for _, _, timed in plan], machine["cores"], progress, warnings) \
        if config.data else {}
    for row, (_, _, timed) in zip(runs, plan):
        row["ceiling"] = _ceiling(row, timed, config, machine["read_bandwidth_gb_s"], byte_counts)
        found = accuracy_of(timed, accuracy) if config.data else None
        row["accuracy"] = asdict(found) if found else None
        zeros = row.pop("block_zero_fraction", None)
        if zeros is not None and described[row["model"]]["matmul_zero_fraction"] is None:
            described[row["model"]]["matmul_zero_fraction"] = zeros
    if max(load_before[0], load_after[0]) > threads + 0.5:  # more than this benchmark's own threads
        warnings.append(
            f"the machine was busy (load average {load_before[0]:.2f} before, {load_after[0]:.2f} after, "
            f"{machine['cores']} cores): timings are pessimistic and noisy"
        )
    result = BenchResult(
        model=config.model,
        sparse=described["sparse"],
        dense=described["dense"],
        settings={
            **to_dict(config),
            "threads": threads,
            "engines_run": engines,
            "phases": phases,
            "precisions": precisions,
        },
        decode_protocol=DECODE_PROTOCOL,
        machine=machine,
        load_average_before=load_before,
        load_average_after=load_after,
        versions={**library_versions(), **engine_versions()},
        runs=runs,
        speedups=speedups,
        notes=notes,
        warnings=warnings,
        wall_time_s=time.perf_counter() - started,
    )
    if config.report:
        result.report = str(plot_report(Path(config.report), result))
    return result


def _timed_run(
    graphs: GraphSet | LosaModel, engine: str, phase: str, config: BenchConfig, threads: int, warnings: list[str]
) -> dict:
    """One child-process timing; an engine failure is recorded, not fatal."""
    row = {
        "engine": engine,
        "model": graphs.role,
        "precision": graphs.precision,
        "int8_activations": graphs.form,
        "phase": phase,
        "timing": None,
        "error": None,
    }
    if isinstance(graphs, LosaModel):
        row["kernel_path"] = None
    try:
        raw = run_job(_job(graphs, engine, phase, config, threads), config.timeout_s)
    except EngineFailure as exc:
        row["error"] = str(exc)
        hint = (
            "; DeepSparse 1.8 crashes on some shapes (seen: tiny dense graphs under 16 tokens), try another --seqlen"
            if engine == "deepsparse"
            else ""
        )
        warnings.append(
            f"{engine} {graphs.role} {graphs.precision} {phase}: {exc}{hint}; the other timings are unaffected"
        )
        return row
    tokens = config.batch * (config.seqlen if phase == "prefill" else 1)
    row["timing"] = summarize(raw["latencies_ms"], tokens, raw["compile_s"]).to_dict()
    for fact in ("kernel_path", "bytes", "block_zero_fraction"):  # the losa engine's (losa_engine.make_runner)
        if fact in raw:
            row[fact] = raw[fact]
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
        labels = [f"{r['engine']}\n{r['model']} {r['precision']}" for r in rows]
        medians = [r["timing"]["median_ms"] for r in rows]
        spread = [r["timing"]["p90_ms"] - r["timing"]["median_ms"] for r in rows]
        colors = ["#4c72b0" if r["model"] == "sparse" else "#999999" for r in rows]
        ax.bar(range(len(rows)), medians, yerr=[[0] * len(rows), spread], color=colors, capsize=4)
        ax.set_xticks(range(len(rows)), labels)
        unit = f"{settings['seqlen']} tokens" if phase == "prefill" else f"1 token, past {settings['seqlen']}"
        ax.set_title(f"{phase} (batch {settings['batch']}, {unit})")
        ax.set_ylabel("median latency, ms (bar: p90)")
    zeros = result.sparse.get("matmul_zero_fraction")  # None when every sparse timing failed
    fig.suptitle(
        f"{Path(result.model).name}: {'?' if zeros is None else f'{zeros:.0%}'} zeros in MatMul weights, "
        f"{settings['threads']} thread(s), {result.machine['cpu']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(staging, dpi=120)
    plt.close(fig)
    staging.replace(path)
    return path
