"""Time a model on CPU engines (ONNX Runtime, DeepSparse, losa's own kernel), each phase in a child process.

Why a child process: DeepSparse aborts the whole process when a graph fails to compile or run
(a segfault, not an exception), and a fresh process per (engine, model) gives both engines the
same clean memory and thread state.  The parent writes a job (engine, graph, phase, shapes, threads) as JSON, runs
``python -m losa_cli.runtime.engines JOB RESULT`` and reads the raw latencies back.

This module imports neither torch nor the engines at module level, so the child starts fast
and ``NM_DISABLE_ANALYTICS=1`` is set before deepsparse/sparsezoo are imported (no network).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from ..core.errors import LosaError

ENGINES = ("onnxruntime", "deepsparse", "losa")
#: the ISA flags that decide which kernels the engines can use
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
ENGINE_ENV = {"NM_DISABLE_ANALYTICS": "1", "SPARSEZOO_DISABLE_ANALYTICS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@dataclass
class Timing:
    """Latency statistics of one phase (prefill or one decode step) on one engine and model."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    tokens_per_run: int
    tokens_per_s: float
    compile_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(latencies_ms: list[float], tokens_per_run: int, compile_s: float) -> Timing:
    """Median, p90 (linear interpolation), mean and min; throughput from the median."""
    ordered = sorted(latencies_ms)
    count = len(ordered)

    def quantile(q: float) -> float:
        position = q * (count - 1)
        low = int(position)
        high = min(low + 1, count - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    median = quantile(0.5)
    return Timing(
        median,
        quantile(0.9),
        sum(ordered) / count,
        ordered[0],
        count,
        tokens_per_run,
        tokens_per_run / (median / 1000.0) if median > 0 else float("inf"),
        compile_s,
    )


# ----------------------------------------------------------------------------- machine facts


def cpu_info() -> dict:
    """CPU model, the ISA flags that matter to the engines, logical cores, load average."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu": model,
        "isa_flags": [f for f in ISA_FLAGS if f in flags],
        "cores": os.cpu_count() or 1,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def safe_threads(cores: int) -> int:
    """Default thread count: leave one core free.

    DeepSparse with as many threads as cores becomes 10-24x slower as soon as anything else
    runs on the machine; one spare core keeps timings stable.
    """
    return max(1, cores - 1)


def deepsparse_unavailable() -> str | None:
    """None when DeepSparse can run here, else why not (one line, for the user)."""
    if importlib.util.find_spec("deepsparse") is None:
        return (
            "DeepSparse is not installed (pip install 'losa[deepsparse]', Python 3.11, x86 with AVX2); "
            "ONNX Runtime does not exploit unstructured zeros, so only dense-vs-dense speed is measured"
        )
    info = cpu_info()
    if "avx2" not in info["isa_flags"]:
        return f"DeepSparse needs a CPU with AVX2; {info['cpu']} has none, so only ONNX Runtime runs"
    return None


def engine_versions() -> dict[str, str]:
    """Installed versions of the ONNX stack (without importing the engines)."""
    versions = {}
    for name in ("onnx", "onnxruntime", "deepsparse", "sparsezoo"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


# ----------------------------------------------------------------------------- parent side


class EngineFailure(LosaError):
    """The child process failed; the message is one line naming the cause."""


def run_job(job: dict, timeout_s: float) -> dict:
    """Run one timing job in a child process and return its raw result.

    Raises EngineFailure with the signal or last error line when the child dies, so the
    caller can record it and go on with the other engines.
    """
    env = {**os.environ, **ENGINE_ENV}
    with tempfile.TemporaryDirectory(prefix="losa-engine-") as scratch:
        job_path, result_path = Path(scratch) / "job.json", Path(scratch) / "result.json"
        job_path.write_text(json.dumps({**job, "scratch": scratch}))
        try:
            done = subprocess.run(
                [sys.executable, "-m", "losa_cli.runtime.engines", str(job_path), str(result_path)],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise EngineFailure(f"{job['engine']} did not finish within {timeout_s:.0f} s") from None
        if done.returncode != 0 or not result_path.is_file():
            raise EngineFailure(f"{job['engine']} {_describe_exit(done.returncode)}: {_last_error_line(done.stderr)}")
        return json.loads(result_path.read_text())


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"crashed ({signal.Signals(-code).name})"
        except ValueError:
            return f"crashed (signal {-code})"
    return f"failed (exit code {code})"


def _last_error_line(stderr: str) -> str:
    """The most telling line of a child's stderr: a crash signal or the last exception line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Received signal"):
            return line
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no message"


# ----------------------------------------------------------------------------- child side


def _graph_inputs(path: str) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(path, load_external_data=False).graph.input]


def _feeds(job: dict, phase: str, names: list[str]):
    """Random but fixed inputs of the benchmark shapes for one graph, in the graph's input order."""
    import numpy as np

    rng = np.random.default_rng(job.get("seed", 0))
    batch, seqlen, vocab = job["batch"], job["seqlen"], job["vocab_size"]
    new = seqlen if phase == "prefill" else 1
    arrays = []
    for name in names:
        if name == "input_ids":
            arrays.append(rng.integers(0, vocab, (batch, new), dtype=np.int64))
        elif name == "attention_mask":
            arrays.append(np.ones((batch, seqlen if phase == "prefill" else seqlen + 1), dtype=np.int64))
        elif name.startswith("past_key_values"):
            arrays.append(rng.standard_normal((batch, job["kv_heads"], seqlen, job["head_dim"])).astype(np.float32))
        else:
            raise ValueError(
                f"unexpected graph input {name!r}; losa bench feeds input_ids, attention_mask, past_key_values.*"
            )
    return arrays


def _private_copy(graph: Path, scratch: Path) -> Path:
    """A copy of ``graph`` in ``scratch`` that an engine may rewrite; its external data files are linked, not copied."""
    import shutil

    from .onnx_io import external_files

    copy = scratch / graph.name
    shutil.copyfile(graph, copy)
    for name in external_files(graph):
        link = scratch / name
        if not link.exists():
            link.symlink_to((graph.parent / name).resolve())
    return copy


def _make_runner(job: dict, path: str, arrays: list):
    """Compile ``path`` on the job's engine; returns a no-argument function running one inference."""
    threads = job["threads"]
    if job["engine"] == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {i.name: a for i, a in zip(session.get_inputs(), arrays)}
        return lambda: session.run(None, feed)
    if job["engine"] == "deepsparse":
        from deepsparse import Engine

        # DeepSparse 1.8 writes the input shapes into the file it is given: hand it a private copy
        engine = Engine(
            model=str(_private_copy(Path(path), Path(job["scratch"]))),
            batch_size=job["batch"],
            num_cores=threads,
            input_shapes=[list(a.shape) for a in arrays],
        )
        return lambda: engine.run(arrays)
    raise ValueError(f"unknown engine {job['engine']!r}")


def _time_phase(job: dict, phase: str) -> dict:
    """Compile, warm up, then time ``iterations`` runs (decode: ``iterations x decode_tokens`` steps).

    The losa engine loads the model folder instead of a graph (``losa_engine.py``); "compile" is then
    loading and packing, and the result also carries the bytes its format reads per decode step."""
    started = time.perf_counter()
    facts: dict = {}
    if job["engine"] == "losa":
        from .losa_engine import make_runner

        run, facts = make_runner(job, phase)
    else:
        path = job["graph"]
        run = _make_runner(job, path, _feeds(job, phase, _graph_inputs(path)))
    compile_s = time.perf_counter() - started
    repeats = job["decode_tokens"] if phase == "decode" else 1
    for _ in range(job["warmup"] * repeats):
        run()
    latencies = []
    for _ in range(job["iterations"] * repeats):
        tick = time.perf_counter()
        run()
        latencies.append((time.perf_counter() - tick) * 1000.0)
    return {"latencies_ms": latencies, "compile_s": compile_s, **facts}


def child_main(job_path: str, result_path: str) -> None:
    """Entry point of the child: time one phase (prefill or decode) and write the raw latencies.

    One phase per child, so only one compiled graph is resident at a time (large models).
    """
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    job = json.loads(Path(job_path).read_text())
    Path(result_path).write_text(json.dumps(_time_phase(job, job["phase"])))


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2])
