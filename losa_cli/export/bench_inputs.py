"""The ONNX graphs a bench times, made for it: a model folder exported on the fly, a dense counterpart,
and int8 copies.

``losa bench`` times graphs that ``runtime`` only reads; what has to be *written* first is planned
here, by the bench's callers (the CLI and ``losa run``), before ``runtime.run_bench`` runs:

MODEL_DIR_OR_ONNX (a .onnx file, an export folder, or a model folder exported here) -> the dense
counterpart (``--dense-baseline``, or a densified copy) -> for ``--precisions int8``, int8 copies of
both, made exactly as ``losa export --int8`` makes them (per-token activations).
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..core.errors import ModelError
from ..core.modeling import load_model
from ..core.sequential import ProgressFn
from ..runtime import (
    BenchConfig,
    BenchGraphs,
    GraphSet,
    Precision,
    check_onnx_environment,
    onnx_engines_to_run,
    read_graph_set,
)
from .int8 import quantize_graph
from .onnx_graphs import EXTERNAL_DATA_THRESHOLD, export_graphs
from .verify import verify_export

#: the int8 activation form timed on both engines: the accurate one (int8.py)
INT8_FORM = "token"


@contextmanager
def bench_graphs(config: BenchConfig, progress: ProgressFn | None = None) -> Iterator[BenchGraphs | None]:
    """The graphs ``run_bench`` times with ONNX Runtime / DeepSparse, in a scratch folder that lives as long
    as the ``with`` block; None when no ONNX engine will run (the losa engine reads the model folder itself).

        with bench_graphs(config, progress) as graphs:
            result = run_bench(config, graphs, progress)
    """
    if not onnx_engines_to_run(config):
        yield None
        return
    check_onnx_environment(config.opset)
    with tempfile.TemporaryDirectory(prefix="losa-bench-") as scratch_name:
        yield _made_graphs(config, Path(scratch_name), progress)


def _made_graphs(config: BenchConfig, scratch: Path, progress: ProgressFn | None) -> BenchGraphs:
    warnings: list[str] = []
    sparse = _graphs_of(config.model, scratch, "sparse", config, progress, warnings)
    dense = (_graphs_of(config.dense_baseline, scratch, "dense", config, progress, warnings) if config.dense_baseline
             else _densified(sparse, scratch))
    int8 = {fp32.role: _quantized(fp32, scratch, INT8_FORM) for fp32 in (sparse, dense)} \
        if Precision.INT8 in config.precisions else {}
    return BenchGraphs(sparse, dense, int8, warnings)


def _graphs_of(source: str, scratch: Path, role: str, config: BenchConfig, progress: ProgressFn | None,
               warnings: list[str]) -> GraphSet:
    """MODEL_DIR_OR_ONNX as graphs: read when it already is (a .onnx file, an export folder), else exported here."""
    found = read_graph_set(source, role)
    if found is not None:
        return found
    try:
        return _export_on_the_fly(source, scratch, role, config, progress, warnings)
    except ModelError as exc:
        raise ModelError(
            f"{source} is neither an ONNX file, a losa export folder nor a loadable model ({exc})"
        ) from None


def _export_on_the_fly(
    source: str, scratch: Path, role: str, config: BenchConfig, progress: ProgressFn | None, warnings: list[str]
) -> GraphSet:
    """Export a model folder to dynamic-shape graphs in ``scratch`` and verify them (logits, zeros)."""
    loaded = load_model(source, "float32", config.trust_remote_code)
    folder = scratch / role
    spec, export_warnings = export_graphs(loaded.model, folder, None, None, config.opset, True, progress)
    warnings += [f"{role}: {w}" for w in export_warnings]
    verification = verify_export(loaded.model, folder, spec, 1e-3, greedy_steps=2, progress=progress)
    summary = {
        "prefill_max_abs_diff": verification.prefill_max_abs_diff,
        "decode_max_abs_diff": verification.decode_max_abs_diff,
        "greedy_match": verification.greedy_match,
        "weights_checked": verification.layers_checked,
    }
    del loaded
    gc.collect()
    return GraphSet(role, source, folder, spec, "model folder, exported to ONNX for this run", verification=summary)


def _densified(sparse: GraphSet, scratch: Path) -> GraphSet:
    """A copy of the sparse graphs with no zeros: the dense timing reference when none is given."""
    folder = scratch / "densified"
    folder.mkdir(parents=True, exist_ok=True)
    for phase in ("prefill", "decode"):
        path = sparse.path(phase)
        if path is not None:
            densify_graph(path, folder / path.name)
    return GraphSet(
        "dense",
        f"densified copy of {sparse.source}",
        folder,
        sparse.spec,
        "densified copy: the sparse graphs with every zero weight replaced by a small value",
    )


def _quantized(fp32: GraphSet, scratch: Path, form: str) -> GraphSet:
    """int8-weight copies of a graph set (prefill and decode) in ``scratch``."""
    folder = scratch / f"{fp32.role}-int8-{form}"
    for phase in ("prefill", "decode"):
        path = fp32.path(phase)
        if path is not None:
            quantize_graph(path, folder / path.name, form)
    return GraphSet(
        fp32.role,
        f"{fp32.source} (int8, {form} activations)",
        folder,
        fp32.spec,
        f"int8 weights per output channel, {form} activations, quantized for this run",
        precision="int8",
        form=form,
    )


def densify_graph(source: Path, target: Path, seed: int = 0) -> int:
    """Copy an ONNX graph with every zero of its MatMul/Gemm weights replaced by a small value.

    The dense counterpart for a timing comparison when no original model is given: same graph,
    same shapes, no zeros.  Its outputs are meaningless; only its speed is used.  Returns the
    number of zeros filled.
    """
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    proto = onnx.load(str(source), load_external_data=True)
    consumers = {name for node in proto.graph.node if node.op_type in ("MatMul", "Gemm") for name in node.input}
    filled = 0
    for init in proto.graph.initializer:
        if init.name not in consumers or len(init.dims) != 2 or init.data_type != 1:
            continue
        array = numpy_helper.to_array(init).copy()
        zeros = array == 0
        count = int(zeros.sum())
        if count == 0:
            continue
        scale = float(np.abs(array[~zeros]).mean()) if count < array.size else 0.02
        array[zeros] = (rng.standard_normal(count) * scale * 0.01 + scale * 0.001).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(array, init.name))
        filled += count
    size = sum(init.ByteSize() for init in proto.graph.initializer)
    if size >= EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            proto,
            str(target),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=target.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(proto, str(target))
    return filled
